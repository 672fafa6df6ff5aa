"""clusters/Dockerfile and jobs/runtime_env.yaml install exactly the versions the project pins.

No container runtime runs here, so the image is checked by reading its Dockerfile: the base is Ray's image of
the locked Ray version, and every `NAME==VERSION` it installs is the lock's (requirements-cpu.txt) or the
Makefile's, which are what the tests run on.
"""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
PIN = re.compile(r"([A-Za-z0-9][A-Za-z0-9._\-]*)==([0-9][A-Za-z0-9.+\-]*)")


def pins(text: str) -> dict[str, str]:
    found = {}
    for name, version in PIN.findall(text):
        key = name.lower().replace("_", "-")
        assert found.setdefault(key, version) == version, f"{name} pinned twice: {found[key]} and {version}"
    return found


def expand_foreach(makefile: str) -> str:
    """The Makefile's `$(foreach i,1 2,pkg-00$(i)==x)` spelled out, as the Dockerfile writes it."""
    def spell(match):
        var, items, body = match.groups()
        return " ".join(body.replace(f"$({var})", item) for item in items.split())
    return re.sub(r"\$\(foreach (\w+),([^,]*),([^)]*\$\(\w+\)[^)]*)\)", spell, makefile)


LOCK = pins((ROOT / "requirements-cpu.txt").read_text())
MAKEFILE = pins(expand_foreach((ROOT / "Makefile").read_text()))
DOCKERFILE = (ROOT / "clusters" / "Dockerfile").read_text()
# The one pin that only the GPU image has: the CUDA build of vLLM on the lock's torch (docs: STACK.md).
GPU_ONLY = {"vllm": "0.31.0"}
DEVELOPMENT_ONLY = {"ruff"}  # the linter of `make lint`: not needed to run jobs


def test_dockerfile_bases_on_the_locked_ray_for_both_accelerators():
    assert re.search(r"^ARG ACCELERATOR=cpu$", DOCKERFILE, re.M)
    assert re.search(rf"^FROM rayproject/ray:{LOCK['ray']}-py311-\$\{{ACCELERATOR\}}$", DOCKERFILE, re.M)
    assert 'if [ "$ACCELERATOR" = gpu ]' in DOCKERFILE and "pip install -q --no-deps ." in DOCKERFILE


def test_every_pin_in_the_dockerfile_is_the_lock_or_the_makefile():
    image = pins(DOCKERFILE)
    expected = {**LOCK, **MAKEFILE, **GPU_ONLY}
    wrong = {name: (version, expected.get(name)) for name, version in image.items() if expected.get(name) != version}
    assert not wrong, f"Dockerfile pins that differ from the lock/Makefile (found, expected): {wrong}"
    # Everything the Makefile installs beside the lock reaches the image, and the whole lock does.
    missing = set(MAKEFILE) - DEVELOPMENT_ONLY - set(image)
    assert not missing, f"missing from the image: {missing}"
    assert "-r requirements-cpu.txt" in DOCKERFILE and "COPY requirements-cpu.txt" in DOCKERFILE


def test_runtime_env_loads_and_installs_exactly_the_lock():
    env = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1" and env["env_vars"]["TRANSFORMERS_OFFLINE"] == "1"
    listed = env["pip"]["packages"]
    assert all(isinstance(p, str) and PIN.fullmatch(p) for p in listed), "every package pinned as NAME==VERSION"
    assert pins("\n".join(listed)) == LOCK
    # Ray accepts it as a runtime environment (its own validation of every field).
    from ray.runtime_env import RuntimeEnv
    assert RuntimeEnv(**env)["pip"]["packages"] == listed
