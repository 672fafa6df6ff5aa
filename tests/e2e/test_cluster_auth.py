"""The cluster definitions' token authentication, for real: a Ray head started with the environment and start
command that a definition gives its head (clusters/aws-autoscaling.yaml, clusters/kuberay.yaml) refuses a job
submitted without the cluster's token and runs one submitted with it, as the README tells users to submit.

What a cloud provides is stood in for on this machine: the node's token file (the AWS file mount) lives in a
temporary folder, the KubeRay Secret is a token generated here, and every component gets a free port (the suite's
own Ray holds the defaults). `ray stop`, which the AWS head runs first, is not run: it stops every Ray on the
machine; the cluster started here is stopped by its own processes.
"""

import os
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests
import yaml
from conftest import RAY, forget_cluster_record, free_port, stop_cluster

pytestmark = pytest.mark.timeout(300)

CLUSTERS = Path(__file__).resolve().parents[2] / "clusters"
AUTH_VARIABLES = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without the suite's RAY_AUTH_MODE=disabled (or any other token setting), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARIABLES}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return {**env, **extra}


AWS = yaml.safe_load((CLUSTERS / "aws-autoscaling.yaml").read_text())


def aws_node_env(tmp_path: Path, node: str) -> dict:
    """The environment of an AWS node's container (the definition's docker run options), with the user's token
    where the definition's file mount puts it on the node, here under tmp_path/node."""
    container_env = dict(option.removeprefix("--env ").split("=", 1) for option in AWS["docker"]["run_options"]
                         if option.startswith("--env "))
    node_path = container_env["RAY_AUTH_TOKEN_PATH"]
    assert AWS["file_mounts"][node_path] == "~/.ray/auth_token"
    node_token = tmp_path / node / node_path.lstrip("/")
    node_token.parent.mkdir(parents=True)
    shutil.copy(tmp_path / "user" / ".ray" / "auth_token", node_token)
    return clean_env(**{**container_env, "RAY_AUTH_TOKEN_PATH": str(node_token), "HOME": str(tmp_path / node)})


def aws_head(tmp_path: Path) -> tuple[list[str], dict, dict, str]:
    """The AWS head's `ray start` arguments and environment, the environment a user submits with (the README's),
    and the token. The token is made as the README says (`ray get-auth-token --generate`, into the user's home)
    and placed where the definition's file mount puts it on a node."""
    user_home = tmp_path / "user"
    user = clean_env(HOME=str(user_home))
    subprocess.run([RAY, "get-auth-token", "--generate"], env=user, check=True, capture_output=True)
    token = (user_home / ".ray" / "auth_token").read_text()
    head_env = aws_node_env(tmp_path, "head")
    stop, start = AWS["head_start_ray_commands"]
    assert stop == "ray stop"
    argv = shlex.split(start)
    assert argv[:3] == ["ray", "start", "--head"]
    # Not here: the autoscaler's bootstrap config, which names AWS; GCS on a port of its own.
    flags = [a for a in argv[3:] if not a.startswith(("--autoscaling-config=", "--port="))]
    assert len(flags) == len(argv) - 5, argv
    client = clean_env(RAY_AUTH_MODE="token", HOME=str(user_home))
    return flags, head_env, client, token


def kuberay_head(tmp_path: Path) -> tuple[list[str], dict, dict, str]:
    """The KubeRay head container's environment (its token from the operator's Secret, made here as the operator
    makes it) and its rayStartParams as `ray start` flags, and the user's environment as the README gives it."""
    (cluster,) = [d for d in yaml.safe_load_all((CLUSTERS / "kuberay.yaml").read_text()) if d["kind"] == "RayCluster"]
    head = cluster["spec"]["headGroupSpec"]
    token = secrets.token_urlsafe(32)
    env = {}
    for variable in head["template"]["spec"]["containers"][0]["env"]:
        if "value" in variable:
            env[variable["name"]] = variable["value"]
        else:
            assert variable["valueFrom"]["secretKeyRef"]["key"] == "auth_token", variable
            env[variable["name"]] = token
    flags = [f"--{key}={value}" for key, value in head["rayStartParams"].items()]
    client = clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, HOME=str(tmp_path))
    return flags, clean_env(**env, HOME=str(tmp_path)), client, token


NODE_PORTS = ("metrics-export-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
              "runtime-env-agent-port", "node-manager-port", "object-manager-port")


def start_node(argv: list[str], env: dict, log: Path) -> subprocess.Popen:
    """`ray start` with these arguments, on loopback, each component on a port of its own."""
    return subprocess.Popen(
        [RAY, *argv, "--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats",
         *(f"--{flag}={free_port()}" for flag in NODE_PORTS)],
        env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def start_head(flags: list[str], env: dict, tmp_path: Path) -> tuple[subprocess.Popen, int, int]:
    gcs, dashboard = free_port(), free_port()
    # DASHBOARD_METRIC_PORT: the dashboard's own metrics server has a fixed default port another dashboard may hold.
    env = {**env, "DASHBOARD_METRIC_PORT": str(free_port())}
    head = start_node(["start", "--head", *flags, f"--port={gcs}", f"--dashboard-port={dashboard}",
                       "--include-dashboard=true", f"--ray-client-server-port={free_port()}"],
                      env, tmp_path / "head.log")
    return head, gcs, dashboard


def wait_for_dashboard(head: subprocess.Popen, url: str, tmp_path: Path) -> dict:
    deadline = time.time() + 120
    while time.time() < deadline:
        assert head.poll() is None, (tmp_path / "head.log").read_text()
        try:
            return requests.get(f"{url}/api/authentication_mode", timeout=5).json()
        except (requests.ConnectionError, requests.Timeout, ValueError):
            time.sleep(1)
    pytest.fail("the Ray head's dashboard did not answer within 120 s")


def submit(address: str, env: dict, *entrypoint: str) -> subprocess.CompletedProcess:
    command = [RAY, "job", "submit", "--address", address, "--", *entrypoint]
    for _ in range(20):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        # The dashboard answers before the node's job agent is up; Ray says so and asks to retry.
        if "No available agent to submit job" not in done.stdout + done.stderr:
            return done
        time.sleep(3)
    return done


@pytest.mark.parametrize("definition", [aws_head, kuberay_head], ids=["aws", "kuberay"])
def test_the_job_api_refuses_a_job_without_the_token_and_runs_one_with_it(definition, tmp_path):
    flags, head_env, user_env, token = definition(tmp_path)
    assert head_env["RAY_AUTH_MODE"] == "token"
    head, gcs, dashboard = start_head(flags, head_env, tmp_path)
    url = f"http://127.0.0.1:{dashboard}"
    worker = None
    try:
        assert wait_for_dashboard(head, url, tmp_path)["authentication_mode"] == "token"
        if definition is aws_head:  # the dashboard listens on loopback only, as `ray dashboard` reaches it
            listening = {c.laddr.ip for c in psutil.net_connections("tcp")
                         if c.status == psutil.CONN_LISTEN and c.laddr.port == dashboard}
            assert listening == {"127.0.0.1"}, listening

        # Anyone who reaches the port: no token, a wrong one. The job would have written the marker.
        marker = tmp_path / "ran-without-token"
        job = {"entrypoint": f"touch {marker}"}
        assert requests.post(f"{url}/api/jobs/", json=job, timeout=30).status_code == 401
        wrong = {"Authorization": f"Bearer {secrets.token_hex(32)}"}
        assert requests.post(f"{url}/api/jobs/", json=job, headers=wrong, timeout=30).status_code == 403
        refused = submit(url, clean_env(RAY_AUTH_MODE="disabled"), "touch", str(marker))
        assert refused.returncode != 0 and "Authentication required" in refused.stdout + refused.stderr, refused
        assert requests.get(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"}, timeout=30).json() == []
        assert not marker.exists()

        # The user, as the README says: RAY_AUTH_MODE=token and the cluster's token.
        accepted = submit(url, user_env, "python", "-c", "print('ran with the token')")
        log = accepted.stdout + accepted.stderr
        assert accepted.returncode == 0 and "ran with the token" in log and "succeeded" in log, log

        if definition is aws_head:  # a worker node, started as the head starts its workers, joins
            (start,) = [c for c in AWS["worker_start_ray_commands"] if c.startswith("ray start")]
            argv = shlex.split(start.replace("$RAY_HEAD_IP:6379", f"127.0.0.1:{gcs}"))
            worker = start_node(argv[1:], aws_node_env(tmp_path, "worker"), tmp_path / "worker.log")
            nodes = []
            deadline = time.time() + 120
            while len(nodes) < 2 and time.time() < deadline:
                assert worker.poll() is None, (tmp_path / "worker.log").read_text()
                time.sleep(1)
                answer = requests.get(f"{url}/api/v0/nodes", headers={"Authorization": f"Bearer {token}"}, timeout=30)
                nodes = [n for n in answer.json()["data"]["result"]["result"] if n["state"] == "ALIVE"]
            assert len(nodes) == 2, nodes
    finally:
        if worker is not None:
            stop_cluster(worker, gcs)
        stop_cluster(head, gcs)
        forget_cluster_record(gcs)
