"""The cluster definitions parse and run the Ray version the project pins."""

from pathlib import Path

import yaml

import ray

CLUSTERS = Path(__file__).resolve().parents[1] / "clusters"


def test_autoscaler_config_pins_our_ray_and_scales_gpus_from_zero():
    spec = yaml.safe_load((CLUSTERS / "aws-autoscaling.yaml").read_text())
    assert spec["head_node_type"] in spec["available_node_types"]
    assert spec["available_node_types"]["gpu_worker"]["min_workers"] == 0
    assert any(f"ray[data,train,default]=={ray.__version__}" in c for c in spec["setup_commands"])
    assert (CLUSTERS.parent / spec["file_mounts"]["/opt/humor_ray/requirements-cpu.txt"]).exists()


def test_kuberay_cluster_uses_our_ray_version():
    spec = yaml.safe_load((CLUSTERS / "kuberay.yaml").read_text())
    assert spec["kind"] == "RayCluster" and spec["spec"]["rayVersion"] == ray.__version__
    images = [spec["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]]
    images += [g["template"]["spec"]["containers"][0]["image"] for g in spec["spec"]["workerGroupSpecs"]]
    assert all(image.startswith(f"rayproject/ray:{ray.__version__}-") for image in images)
    assert {g["minReplicas"] for g in spec["spec"]["workerGroupSpecs"]} == {0}
