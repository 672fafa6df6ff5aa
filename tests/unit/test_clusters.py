"""The cluster definitions parse, validate, run the project's image and scale workers from zero."""

import importlib
import json
import shlex
import tomllib
from pathlib import Path

import jsonschema
import yaml

import ray

from humor_ray.cli import STAGES
from humor_ray.config import parse_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTERS = ROOT / "clusters"
JOBS = ROOT / "jobs"
SHARED = "/mnt/shared"  # where every KubeRay pod mounts the shared volume
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


def kuberay(name: str) -> dict[str, list[dict]]:
    """The objects of a multi-document manifest, by kind."""
    objects: dict[str, list[dict]] = {}
    for doc in yaml.safe_load_all((CLUSTERS / name).read_text()):
        objects.setdefault(doc["kind"], []).append(doc)
    return objects


def validate_kuberay(doc: dict) -> None:
    """Against the CRDs' structure transcribed in tests/kuberay/crd-structure.yaml (its header says what was
    read from KubeRay's CRD files and what was not)."""
    schema = yaml.safe_load((ROOT / "tests" / "kuberay" / "crd-structure.yaml").read_text())
    jsonschema.validate(doc, {**schema, "$ref": f"#/{doc['kind']}"})


def pods(cluster: dict) -> list[dict]:
    spec = cluster["spec"]
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


def test_kuberay_cluster_validates_uses_our_image_scales_from_zero_and_shares_storage():
    objects = kuberay("kuberay.yaml")
    (cluster,), (claim,) = objects.pop("RayCluster"), objects.pop("PersistentVolumeClaim")
    assert not objects
    validate_kuberay(cluster)
    spec = cluster["spec"]
    assert spec["rayVersion"] == ray.__version__ and spec["enableInTreeAutoscaling"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    images = [pod["containers"][0]["image"] for pod in pods(cluster)]
    assert images == [f"{IMAGE}-cpu", f"{IMAGE}-gpu", f"{IMAGE}-cpu"] and list(groups) == ["gpu", "cpu"]
    assert {g["minReplicas"] for g in groups.values()} == {g["replicas"] for g in groups.values()} == {0}
    # Every pod mounts the one ReadWriteMany claim at the same place.
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for pod in pods(cluster):
        (volume,) = [v for v in pod["volumes"] if v.get("persistentVolumeClaim")]
        assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        assert [m["mountPath"] for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"]] == [
            SHARED]
    # A GPU pod holds the CPUs its GPUs' training workers reserve (the 7B specs' cpus_per_worker).
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["requests"]
    cpus_per_worker = max(yaml.safe_load(p.read_text()).get("cpus_per_worker", 1) for p in JOBS.glob("*-7b.yaml"))
    assert int(gpu["nvidia.com/gpu"]) * cpus_per_worker <= int(gpu["cpu"])


def test_rayjobs_validate_and_run_the_papers_pipeline_with_real_job_specs_and_stages(monkeypatch):
    """One RayJob per step, on the RayCluster; each entrypoint is a real `humor-ray` stage with a job spec of
    jobs/ (copied into the image) whose options parse; each step reads only what an earlier one wrote."""
    monkeypatch.setenv("HUMOR_RAY_DATA", f"{SHARED}/data")
    (cluster,) = kuberay("kuberay.yaml")["RayCluster"]
    jobs = kuberay("rayjobs.yaml").pop("RayJob")
    dockerfile = (CLUSTERS / "Dockerfile").read_text()
    assert "WORKDIR /opt/humor_ray" in dockerfile and "COPY jobs jobs" in dockerfile
    written, specs = [], set()
    for job in jobs:
        validate_kuberay(job)
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
        argv = shlex.split(job["spec"]["entrypoint"])
        assert argv[0] == "humor-ray"
        key = tuple(argv[1:3]) if tuple(argv[1:3]) in STAGES else tuple(argv[1:2])
        module_name, config_name, *_ = STAGES[key]
        options = dict(zip(argv[1 + len(key)::2], argv[2 + len(key)::2]))
        spec = Path(options["--config"]).relative_to("/opt/humor_ray")
        specs.add(spec.name)
        argv[argv.index("--config") + 1] = str(ROOT / spec)
        config_cls = getattr(importlib.import_module(module_name), config_name)
        # The paths are the cluster's volume: their existence is checked there, when the job starts.
        parse_config(config_cls, argv[1 + len(key):], " ".join(argv[:1 + len(key)]), check_inputs=False)
        for name in ("--dataset_dir", "--model_name", "--model_checkpoint_name", "--reward_model"):
            if name in options:
                assert any(options[name] in (out, f"{out}/final") for out in written), \
                    f"{job['metadata']['name']}: {name} {options[name]} is no earlier step's output"
        out = options.get("--output_dir") or options["--output"]
        assert out.startswith(f"{SHARED}/")
        written.append(out)
    assert specs == {"data.yaml"} | {p.name for p in JOBS.glob("*-7b.yaml")}
