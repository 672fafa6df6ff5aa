"""The cluster definitions parse, validate against their schemas (Ray's autoscaler config, KubeRay's CRDs), run
the project's image from the user's registry, require Ray's token and scale workers from zero."""

import copy
import functools
import importlib
import json
import os
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

import ray

from humor_ray.cli import STAGES
from humor_ray.config import parse_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTERS = ROOT / "clusters"
JOBS = ROOT / "jobs"
SHARED = "/mnt/shared"  # where every KubeRay pod mounts the shared volume
# The KubeRay operator's CRDs (RayCluster, RayJob, RayService; ray.io/v1), in ../shared/kuberay beside the checkout.
KUBERAY_CRDS = Path(os.environ.get("HUMOR_RAY_KUBERAY_CRDS") or ROOT.parent / "shared" / "kuberay")
# Core Kubernetes kinds the manifests hold beside KubeRay's: no CRD describes them and no schema of the Kubernetes
# API is at hand, so they are not validated (the tests below check what the cluster needs of them).
CORE_KINDS = {"PersistentVolumeClaim"}
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
# clusters/Dockerfile, as the definitions name it: in a registry under a reserved top-level domain that never
# resolves (RFC 2606 `.invalid`), so an unedited definition cannot pull someone else's image; users put theirs.
REGISTRY = "your-registry.invalid"
IMAGE = f"{REGISTRY}/humor-ray:{VERSION}"


def test_every_image_named_is_the_projects_in_the_placeholder_registry():
    """Any image reference in the definitions (docker, KubeRay containers) names the project's image in the
    placeholder registry: an unqualified name (docker.io's namespace) or any other registry would pull an image
    that is not this project's."""
    named = set()
    for path in CLUSTERS.glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            for image in images_in(doc):
                assert image in (f"{IMAGE}-cpu", f"{IMAGE}-gpu"), f"{path.name}: image {image}"
                named.add(image)
    assert named == {f"{IMAGE}-cpu", f"{IMAGE}-gpu"}
    assert f"-t $REGISTRY/humor-ray:{VERSION}-cpu" in (CLUSTERS / "Dockerfile").read_text()


def images_in(node) -> list[str]:
    """Every value of a key `image` or `*_image` (ray up's `worker_image`, `head_image`) anywhere in a document."""
    if isinstance(node, dict):
        found = [v for k, v in node.items() if k == "image" or k.endswith("_image")]
        return found + [image for v in node.values() for image in images_in(v)]
    if isinstance(node, list):
        return [image for v in node for image in images_in(v)]
    return []


def test_autoscaler_config_validates_runs_our_image_and_scales_gpus_from_zero():
    spec = yaml.safe_load((CLUSTERS / "aws-autoscaling.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(spec, schema)
    assert spec["head_node_type"] in spec["available_node_types"]
    gpu = spec["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0
    assert spec["docker"]["image"] == f"{IMAGE}-cpu" and gpu["docker"]["worker_image"] == f"{IMAGE}-gpu"
    assert not spec.get("setup_commands"), "the image holds the stack; the nodes install nothing"


def test_autoscaler_config_requires_the_token_on_every_node_and_keeps_the_dashboard_on_loopback():
    """Every node's container runs with token authentication and reads the token that the file mount brings it
    (from the user's ~/.ray/auth_token); the job API listens on the head's loopback, where `ray dashboard` reaches
    it. tests/e2e/test_cluster_auth.py starts a head this way and submits jobs to it."""
    spec = yaml.safe_load((CLUSTERS / "aws-autoscaling.yaml").read_text())
    docker = spec["docker"]
    env = dict(o.removeprefix("--env ").split("=", 1) for o in docker["run_options"] if o.startswith("--env "))
    assert env["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" not in env
    assert spec["file_mounts"][env["RAY_AUTH_TOKEN_PATH"]] == "~/.ray/auth_token"
    # No node type runs its container with other options (which would replace these for its nodes).
    for config in [docker] + [node.get("docker", {}) for node in spec["available_node_types"].values()]:
        assert not {"head_run_options", "worker_run_options"} & set(config), config
    (start,) = [c for c in spec["head_start_ray_commands"] if c.startswith("ray start")]
    assert "--dashboard-host=127.0.0.1" in shlex.split(start)
    assert all("RAY_AUTH" not in c for c in spec["head_start_ray_commands"] + spec["worker_start_ray_commands"])


def kuberay(name: str) -> dict[str, list[dict]]:
    """The objects of a multi-document manifest, by kind."""
    objects: dict[str, list[dict]] = {}
    for doc in yaml.safe_load_all((CLUSTERS / name).read_text()):
        objects.setdefault(doc["kind"], []).append(doc)
    return objects


def strict(schema):
    """A CRD's OpenAPI v3 schema as the API server applies it, for `jsonschema`: `x-kubernetes-int-or-string` is
    an integer or a string, and an object that lists its `properties` refuses any other field (as
    `kubectl --validate=strict` does) unless it preserves unknown fields. CEL rules (`x-kubernetes-validations`)
    and list-map keys are not checked."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


@functools.cache
def kuberay_schemas() -> dict[str, tuple[str, dict]]:
    """Each KubeRay kind's apiVersion and strict schema, from the operator's CRD files."""
    if not KUBERAY_CRDS.is_dir():
        pytest.fail(f"KubeRay's CRDs are not at {KUBERAY_CRDS}: put shared/kuberay beside the checkout or set "
                    "HUMOR_RAY_KUBERAY_CRDS to its folder")
    schemas = {}
    for path in sorted(KUBERAY_CRDS.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=yaml.CSafeLoader)  # 1 MB each: the C parser is 10x faster
        (v1,) = [version for version in crd["spec"]["versions"] if version["name"] == "v1"]
        schemas[crd["spec"]["names"]["kind"]] = (f"{crd['spec']['group']}/v1", strict(v1["schema"]["openAPIV3Schema"]))
    assert {"RayCluster", "RayJob", "RayService"} <= set(schemas), f"CRDs found in {KUBERAY_CRDS}: {list(schemas)}"
    return schemas


def validate_kuberay(doc: dict) -> None:
    """Against the KubeRay operator's own CRD of the document's kind (ray.io/v1)."""
    api_version, schema = kuberay_schemas()[doc["kind"]]
    assert doc["apiVersion"] == api_version, f"{doc['kind']} {doc['metadata']['name']}: apiVersion {doc['apiVersion']}"
    jsonschema.Draft4Validator(schema).validate(doc)


def test_every_kuberay_object_in_the_manifests_validates_against_the_crds():
    """Every KubeRay object of every manifest in clusters/ validates; anything else is a known core kind."""
    kinds = set()
    for path in CLUSTERS.glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if "kind" not in doc:  # not a Kubernetes manifest (the ray up config)
                continue
            kinds.add(doc["kind"])
            if doc["kind"] in kuberay_schemas():
                validate_kuberay(doc)
            else:
                assert doc["kind"] in CORE_KINDS, f"{path.name}: {doc['kind']} is neither KubeRay's nor a core kind"
    assert {"RayCluster", "RayJob"} <= kinds


@pytest.mark.parametrize("break_it, error", [
    (lambda c: c["spec"]["workerGroupSpecs"][0].update(maxReplica=8), "Additional properties"),
    (lambda c: c["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(imagePullPolicy=["Always"]),
     "is not of type 'string'"),
    (lambda c: c["spec"]["workerGroupSpecs"][0].update(replicas="zero"), "is not of type 'integer'"),
    (lambda c: c["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"].update(
        {"nvidia.com/gpu": "eight"}), "does not match"),
    (lambda c: c["spec"]["headGroupSpec"].update(rayStartParams={"num-cpus": 8}), "is not of type 'string'"),
], ids=["unknown-field", "wrong-type", "replicas-not-integer", "gpu-quantity", "start-param-not-string"])
def test_a_broken_manifest_is_refused(break_it, error):
    (cluster,) = kuberay("kuberay.yaml")["RayCluster"]
    validate_kuberay(cluster)
    broken = copy.deepcopy(cluster)
    break_it(broken)
    with pytest.raises(jsonschema.ValidationError, match=error):
        validate_kuberay(broken)


def test_a_broken_rayjob_is_refused():
    job = kuberay("rayjobs.yaml")["RayJob"][0]
    for broken in ({**job, "spec": {**job["spec"], "entrypoint": job["spec"]["entrypoint"].split()}},
                   {**job, "spec": {**job["spec"], "entryPoint": job["spec"]["entrypoint"]}}):
        with pytest.raises(jsonschema.ValidationError):
            validate_kuberay(broken)


def pods(cluster: dict) -> list[dict]:
    spec = cluster["spec"]
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


def test_kuberay_cluster_requires_the_token_in_every_ray_container_and_rayjob():
    """The operator makes the Secret and hands its token to the autoscaler, the RayJob submitters and its own
    dashboard requests (authOptions); the Ray containers name it themselves too, so that they wait for the Secret
    rather than start open where an operator ignores authOptions."""
    (cluster,) = kuberay("kuberay.yaml")["RayCluster"]
    auth = cluster["spec"]["authOptions"]
    assert auth["mode"] == "token" and not auth.get("enableK8sTokenAuth")
    secret = auth.get("secretName") or cluster["metadata"]["name"]  # the operator names its Secret after the cluster
    for pod in pods(cluster):
        env = {variable["name"]: variable for variable in pod["containers"][0]["env"]}
        assert env["RAY_AUTH_MODE"] == {"name": "RAY_AUTH_MODE", "value": "token"}
        assert env["RAY_AUTH_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": secret, "key": "auth_token"}}
    for job in kuberay("rayjobs.yaml")["RayJob"]:
        # The submitter is the operator's, with the selected cluster's token.
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
        assert "submitterPodTemplate" not in job["spec"] and "rayClusterSpec" not in job["spec"]


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
    # study-7b.yaml runs these stages in one job (humor-ray study), not one RayJob each.
    assert specs == {"data.yaml"} | {p.name for p in JOBS.glob("*-7b.yaml") if not p.name.startswith("study-")}
