"""`humor-ray study` end to end with the tiny policy and the smallest budgets, then rerun: it resumes."""

import json

import pytest

from humor_ray.cli import main

pytestmark = pytest.mark.timeout(900)

REAL_DATASETS = {"summaries": "5[0-4][0-9]_*.csv", "datasets": ["sft", "sft_simple", "pairs", "prompts", "references"],
                 "images": True}
OURS = ("tiny_zs", "tiny_sft", "tiny_dpo", "tiny_ppo", "tiny_zs_BoN")
STAGES = 14  # after the data build: 2 SFTs, 2 reward models, DPO, PPO, 4 generations, best-of-N, 2 judges, report


def test_study_trains_and_judges_every_method_then_resumes_where_it_stopped(tmp_path, datasets_dir, ray_local, capfd):
    out = tmp_path / "study"
    argv = ["study", "--policy", "tiny", "--datasets", str(datasets_dir), "--output", str(out), "--train_steps", "1",
            "--rm_steps", "1", "--ppo_steps", "1", "--eval_examples", "8", "--rm_eval_pairs", "8",
            "--eval_contests", "2", "--candidates_factor", "2", "--captions", "2", "--engine", "hf"]
    assert main(argv) == 0
    first = capfd.readouterr().err
    assert "skipped" not in first and "wall time of the stages this run ran (min): sft " in first
    # Every stage that samples captions ran on the engine named once (vLLM's start is tested beside its engines).
    sampling = [line for line in first.splitlines()
                if any(f"humor-ray {command} " in line for command in ("generate", "bon", "ppo"))]
    assert len(sampling) == 6 and all("--engine hf" in line for line in sampling), sampling

    winrates = json.loads((out / "judge" / "winrates.json").read_text())
    judged = {r["method"] for r in winrates["win_rates"]}
    assert set(OURS) <= judged and {"sft", "dpo", "llava_sft", "llava_zs"} <= judged  # the released ones too
    assert {r["contests"] for r in winrates["win_rates"] if r["method"] in OURS} == {2}
    page = (out / "report" / "report.html").read_text()
    # The table: every method and human group, with fold A's reward (a number) beside fold B's win rates.
    table = page[page.index("<table id='methods'>"):]
    table = table[:table.index("</table>")]
    for name in (*OURS, "llava_sft", "human_top10", "human_median"):
        assert f"<td>{name}</td>" in table, name
    assert table.count("<tr class='human'>") == 4
    reward_cell = table[table.index("<td>tiny_sft</td>"):].split("</tr>")[0].split("<td>")[-1]
    float(reward_cell.removesuffix("</td>"))
    assert 'id="diversity-plot"' in page and (out / "report" / "diversity.png").stat().st_size > 10_000

    # Rerun: every stage is complete, skipped, and the log says so.
    assert main(argv) == 0
    second = capfd.readouterr().err
    assert second.count("skipped (delete it to run it again)") == STAGES
    assert f"resumed: {STAGES} of {STAGES} stages were complete and skipped" in second
    assert "stage 3 sft_simple: complete in" in second

    # Interrupted while writing the report (its folder is there without its completion marker): the report runs
    # again, nothing before it.
    (out / "report" / "_COMPLETE").unlink()
    assert main(argv) == 0
    third = capfd.readouterr().err
    assert "stage 15 report: " in third and "is incomplete (an interrupted run): running it again" in third
    assert f"resumed: {STAGES - 1} of {STAGES} stages were complete and skipped" in third
    assert "humor-ray judge --dataset_dir" not in third and "humor-ray report --dataset_dir" in third
    assert (out / "report" / "_COMPLETE").is_file()
