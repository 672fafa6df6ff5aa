"""The stages' figures reach the Ray node's Prometheus endpoint: a real data build, a tiny SFT run, a
few PPO steps and a generation, submitted as one Ray job, the node's metrics scraped over HTTP while they run."""

import json
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

# Four stages: about 130-170 s on an idle 2-core machine, and twice that beside another CPU-heavy process.
pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
# Ray exports an application metric NAME as ray_NAME (a counter as ray_NAME_total).
SAMPLE = re.compile(r"^(ray_humor_ray_\w+)\{([^}]*)\} ([0-9.e+-]+)$", re.M)


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """Every humor_ray_ series on the endpoint: (name, its labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(name, frozenset(re.findall(r'(\w+)="([^"]*)"', labels))): float(value)
            for name, labels, value in SAMPLE.findall(text)}


def series(seen: dict, name: str, **labels) -> list[float]:
    """The values of `name`, from every process that recorded it, whose labels include `labels`."""
    return [v for (n, tags), v in seen.items() if n in (f"ray_{name}", f"ray_{name}_total")
            and set(labels.items()) <= tags]


def submit_and_watch(head_node, command: list[str], complete) -> dict:
    """Submit a job and scrape the node's metrics once a second until it ends and `complete(seen)` holds
    (workers outlive the job a moment, so their last values are still exported) or 30 s more have passed.
    Returns the latest value of every series seen."""
    seen: dict = {}
    done = threading.Event()

    def watch():
        while not done.is_set():
            try:
                seen.update(scrape(head_node.metrics_port))
            except urllib.error.URLError:  # the node's metrics agent starts a moment after the head
                pass
            time.sleep(1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        for _ in range(20):  # the dashboard answers before the node's job agent is up
            submitted = subprocess.run(command, env=head_node.env, capture_output=True, text=True, timeout=540)
            log = submitted.stdout + submitted.stderr
            if "No available agent to submit job" not in log:
                break
            time.sleep(3)
        assert submitted.returncode == 0, log
        deadline = time.time() + 30
        while time.time() < deadline and not complete(seen):
            time.sleep(1)
    finally:
        done.set()
        watcher.join()
    return seen


def test_data_build_sft_and_ppo_export_their_figures_to_the_node_metrics_endpoint(head_node, real_data, tmp_path):
    """One job runs the four stages in turn, each a `humor-ray` command as a user would chain them (one job
    instead of four: each submission starts its own supervisor and working directory)."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    # Two contests and a corrupted file (quarantined), as in the job-submission test.
    for name in ("530_LilUCB.csv", "536_LilUCB.csv", "591_KLUCB.csv"):
        shutil.copy(real_data / "summaries" / name, inputs / name)
    output = tmp_path / "metrics-build"
    steps = 2
    stages = [
        ["humor-ray", "data", "build", "--input", str(inputs), "--output", str(output),
         "--splits", str(real_data / "benchmarks" / "humor_in_ai_splits.json")],
        # A few steps of SFT on those datasets: the Ray Train worker's trainer figures.
        ["humor-ray", "sft", "--config", "jobs/sft-tiny.yaml", "--dataset_dir", str(output),
         "--output_dir", str(tmp_path / "sft"), "--run_name", "metrics-sft", "--max_steps", "4",
         "--logging_steps", "2", "--eval_steps", "4", "--save_steps", "4", "--max_eval_examples", "16"],
        # Two GRPO steps with a diversity term on the same prompts, against the builtin reward: the trainer
        # worker's step figures.
        ["humor-ray", "ppo", "--config", "jobs/ppo-tiny.yaml", "--dataset_dir", str(output),
         "--output_dir", str(tmp_path / "ppo"), "--run_name", "metrics-ppo", "--max_steps", str(steps),
         "--save_steps", str(steps), "--report_to", "none", "--estimator", "grpo", "--diversity_weight", "0.5"],
        # Captions from the tiny model for the evaluation contest: the engine actor's and the driver's figures.
        # (The judge client's are checked in serving/test_judge_client.py, beside its server.)
        ["humor-ray", "generate", "--model_name", "tiny", "--dataset_dir", str(output), "--method", "metrics-gen",
         "--output_dir", str(tmp_path / "generate"), "--n", "4", "--max_new_tokens", "16"],
    ]
    command = [RAY, "job", "submit", "--address", head_node.address, "--working-dir", str(REPO), "--",
               "bash", "-c", " && ".join(shlex.join(stage) for stage in stages)]
    build = {"run": "metrics-build", "stage": "data_build"}
    train = {"run": "metrics-sft", "stage": "sft"}
    ppo = {"run": "metrics-ppo", "stage": "ppo"}
    generation = {"run": "metrics-gen", "stage": "generate"}
    seen = submit_and_watch(head_node, command, lambda seen: (
        series(seen, "humor_ray_data_rows_written", dataset="pairs") and series(seen, "humor_ray_data_pairs_written")
        and series(seen, "humor_ray_train_eval", **train) and series(seen, "humor_ray_ppo_step", **ppo) == [steps]
        and series(seen, "humor_ray_infer_captions_per_second", **generation)))

    report = json.loads((output / "report.json").read_text())
    assert sum(series(seen, "humor_ray_data_files", outcome="read", **build)) == 3, seen
    assert sum(series(seen, "humor_ray_data_rows_read", **build)) == report["captions"]["rows_read"]
    assert sum(series(seen, "humor_ray_data_contests_built", **build)) == report["contests"]["total"] == 2
    pairs = report["datasets"]["pairs"]
    written = {s: sum(series(seen, "humor_ray_data_rows_written", dataset="pairs", split=s, **build)) for s in pairs}
    assert written == pairs
    quarantined = report["quarantined"]["rows_by_reason"]
    for reason, rows in quarantined.items():
        assert sum(series(seen, "humor_ray_data_rows_quarantined", reason=reason, **build)) == rows
    # The driver's end-of-build figures.
    assert series(seen, "humor_ray_data_pairs_written", split="train", **build) == [pairs["train"]]
    assert series(seen, "humor_ray_data_files_quarantined", **build) == [report["quarantined"]["files"]] == [1]
    assert series(seen, "humor_ray_data_rows_read_per_second", **build)[0] > 0

    logged = json.loads((tmp_path / "sft" / "metrics.json").read_text())
    assert series(seen, "humor_ray_train_step", **train) == [4]
    losses = [e["loss"] for e in logged["log_history"] if "loss" in e]
    assert series(seen, "humor_ray_train_loss", **train)[0] == pytest.approx(losses[-1])
    assert series(seen, "humor_ray_train_tokens_per_second", **train)[0] > 0
    eval_loss = series(seen, "humor_ray_train_eval", metric="loss", **train)
    assert eval_loss == [pytest.approx(logged["eval"]["eval_loss"])]

    last = json.loads((tmp_path / "ppo" / "metrics.json").read_text())["history"][-1]
    assert series(seen, "humor_ray_ppo_step", **ppo) == [steps]
    for name, key in (("reward", "reward/mean"), ("kl", "kl"), ("kl_coef", "kl_coef"),
                      ("diversity_term", "diversity/term"), ("diversity", "diversity/mean")):
        assert series(seen, f"humor_ray_ppo_{name}", **ppo) == [pytest.approx(last[key])], name
    for phase in ("rollout", "score", "make_experience", "update", "sync_weights", "checkpoint"):
        assert series(seen, "humor_ray_ppo_phase_seconds", phase=phase, **ppo)[0] > 0, phase
    # One engine, which sampled the last step with the weights of the step before.
    assert series(seen, "humor_ray_ppo_weight_version", engine="0", **ppo) == [steps - 1] == [last["engine_version"]]
    assert series(seen, "humor_ray_ppo_logprob_gap", engine="0", **ppo)[0] < 1e-3

    summary = json.loads((tmp_path / "generate" / "summary.json").read_text())
    missing = sum(summary["missing_captions"].values())
    assert sum(series(seen, "humor_ray_infer_captions", **generation)) == summary["captions"] > 0
    assert series(seen, "humor_ray_infer_captions_missing", **generation) == [missing]
    # A caption still missing was drawn empty on each of its 3 attempts (--max_attempts).
    assert sum(series(seen, "humor_ray_infer_empty_captions", **generation)) >= 3 * missing
    assert series(seen, "humor_ray_infer_captions_per_second", **generation)[0] > 0


def test_grafana_dashboard_queries_the_metrics_the_code_exports():
    """Every series a panel of clusters/grafana-dashboard.json asks for is one a stage records, and every
    recorded figure has a panel (a renamed metric would leave an empty panel)."""
    code = "\n".join(path.read_text() for path in (REPO / "humor_ray").rglob("*.py"))
    recorded = {(kind, name) for kind, name in re.findall(r'\.(count|gauge)\(\s*f?"([a-z_]+)"', code)}
    # The trainer's f"train_{key}" gauges, one per logged key it exports.
    recorded |= {("gauge", f"train_{key}") for key in ("loss", "learning_rate", "grad_norm")}
    exported = {f"ray_humor_ray_{name}" + ("_total" if kind == "count" else "") for kind, name in recorded}
    dashboard = json.loads((REPO / "clusters" / "grafana-dashboard.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"ray_humor_ray_\w+", target["expr"])}
    assert queried <= exported, f"panels query series nothing records: {queried - exported}"
    assert exported - queried <= {"ray_humor_ray_train_grad_norm"}, f"no panel for {exported - queried}"
