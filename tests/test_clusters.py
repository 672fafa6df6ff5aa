"""The cluster definitions parse, validate, run the project's image and scale workers from zero."""

import json
import tomllib
from pathlib import Path

import jsonschema
import yaml

import ray

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"humor-ray/humor-ray:{VERSION}"  # clusters/Dockerfile, tagged as its header says


def test_autoscaler_config_validates_runs_our_image_and_scales_gpus_from_zero():
    spec = yaml.safe_load((CLUSTERS / "aws-autoscaling.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(spec, schema)
    assert spec["head_node_type"] in spec["available_node_types"]
    gpu = spec["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0
    assert spec["docker"]["image"] == f"{IMAGE}-cpu" and gpu["docker"]["worker_image"] == f"{IMAGE}-gpu"
    assert not spec.get("setup_commands"), "the image holds the stack; the nodes install nothing"


def test_kuberay_cluster_uses_our_ray_version_and_image():
    spec = yaml.safe_load((CLUSTERS / "kuberay.yaml").read_text())
    assert spec["kind"] == "RayCluster" and spec["spec"]["rayVersion"] == ray.__version__
    head = spec["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    groups = {g["groupName"]: g for g in spec["spec"]["workerGroupSpecs"]}
    assert head == groups["cpu"]["template"]["spec"]["containers"][0]["image"] == f"{IMAGE}-cpu"
    assert groups["gpu"]["template"]["spec"]["containers"][0]["image"] == f"{IMAGE}-gpu"
    assert {g["minReplicas"] for g in groups.values()} == {0}
