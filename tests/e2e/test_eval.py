"""Generation, best-of-N, the judges (reward model; an LLM behind a real local OpenAI-compatible HTTP
server), win rates and the HTML report, on real contests with real prompts and human references."""

import json
import shutil

import pandas as pd
import pytest

from humor_ray.eval import benchmark, report
from humor_ray.data.generations import read_wide
from humor_ray.infer import generate
from humor_ray.infer.generate import clean_caption

pytestmark = pytest.mark.timeout(900)
# Contests 530-549: training contests for the judge's few-shot examples, six evaluation contests with human
# references and the cartoons' descriptions.
REAL_DATASETS = {"summaries": "5[34][0-9]_*.csv", "datasets": ["prompts", "references", "captions"], "images": True}


def test_captions_are_cleaned_like_a_reader_would():
    assert clean_caption('Caption: "I said no pickles."\nmore text', finished=True) == "I said no pickles."
    assert clean_caption("funny caption: Fish are friends", finished=True) == "Fish are friends"
    # Ran into the token limit: the unfinished last word goes, never a word cut in half.
    assert clean_caption("I told you the elephant would nev", finished=False) == "I told you the elephant would"
    assert clean_caption("Incompr", finished=False) == ""
    assert clean_caption("\n\n", finished=True) == ""


@pytest.fixture(scope="module")
def generated(tmp_path_factory, datasets_dir):
    out = tmp_path_factory.mktemp("generated")
    summary = generate.run(generate.GenerateConfig(dataset_dir=str(datasets_dir), output_dir=str(out / "tiny"),
                                                   model_name="tiny", n=4, max_contests=3, max_new_tokens=16))
    return out / "tiny", summary


def test_generate_writes_long_and_wide_captions(generated):
    out, summary = generated
    long = pd.read_parquet(out / "captions.parquet")
    assert summary["contests"] == 3 and summary["method"] == "tiny"
    assert long.groupby("contest").size().tolist() == [4, 4, 4]
    assert (long["caption"].str.strip() != "").all() and not long["caption"].str.contains("\n").any()
    # The wide file reads back through the same reader as the paper's released generations.
    wide = read_wide(out / "tiny.csv", "tiny")
    assert sorted(wide["caption"]) == sorted(long["caption"])
    # Written aside and put in place whole: nothing partial beside it.
    assert sorted(p.name for p in out.iterdir()) == ["_COMPLETE", "captions.parquet", "summary.json", "tiny.csv"]
    assert [p.name for p in out.parent.iterdir()] == ["tiny"]


def test_generation_and_report_refuse_a_folder_holding_other_work(tmp_path, datasets_dir):
    from humor_ray.config import UserError

    (tmp_path / "runs").mkdir()
    with pytest.raises(UserError, match=r"holds files that are not a `captions` output \(runs\).*--overwrite"):
        generate.run(generate.GenerateConfig(dataset_dir=str(datasets_dir), output_dir=str(tmp_path),
                                             model_name="tiny", n=1, max_contests=1))
    (tmp_path / "winrates.json").write_text('{"win_rates": []}')
    with pytest.raises(UserError, match=r"not a `report` output \(runs, winrates.json\)"):
        report.run(report.ReportConfig(judge_dir=str(tmp_path), generations=[str(tmp_path)],
                                       dataset_dir=str(datasets_dir), output_dir=str(tmp_path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs", "winrates.json"]


def test_a_chosen_set_of_contests_is_read_and_an_unknown_one_named(datasets_dir):
    from humor_ray.config import UserError

    chosen = generate.read_prompts(generate.GenerateConfig(dataset_dir=str(datasets_dir), output_dir="unused",
                                                           model_name="tiny", contests=[548, 536]))
    assert chosen["contest"].to_pylist() == [536, 548]
    with pytest.raises(UserError, match=r"--contests \[9999\]"):
        generate.read_prompts(generate.GenerateConfig(dataset_dir=str(datasets_dir), output_dir="unused",
                                                      model_name="tiny", contests=[536, 9999]))


def test_best_of_n_keeps_the_highest_rewards(tmp_path, datasets_dir):
    out = tmp_path / "bon"
    summary = generate.run_bon(generate.BonConfig(
        dataset_dir=str(datasets_dir), output_dir=str(out), model_name="tiny", n=3, candidates_factor=4,
        max_contests=2, max_new_tokens=12, reward_model="builtin:vowel_share", engine="hf"))
    kept = pd.read_parquet(out / "captions.parquet")
    candidates = pd.read_parquet(out / "candidates.parquet")
    assert summary["method"] == "tiny_BoN" and summary["mean_reward_kept"] >= summary["mean_reward_all"]
    for contest, rows in kept.groupby("contest"):
        pool = candidates[candidates["contest"] == contest]["reward"].sort_values(ascending=False).tolist()
        assert rows.sort_values("sample")["reward"].tolist() == pytest.approx(pool[:3])
        picked = candidates[(candidates["contest"] == contest) & candidates["picked"]].sort_values("pick")
        assert picked["caption"].tolist() == rows.sort_values("sample")["caption"].tolist()


def test_reward_model_judge_win_rates_and_report_in_a_browser(tmp_path, datasets_dir, generated, real_data):
    out, _ = generated
    judged = tmp_path / "judged"
    released = tmp_path / "released"
    released.mkdir()
    for name in ("sft.csv", "gpt4o.csv"):
        shutil.copy(real_data / "benchmarks" / "humor_in_ai_examples" / name, released / name)
    summary = benchmark.run(benchmark.JudgeConfig(
        dataset_dir=str(datasets_dir), generations=[str(out), str(released)], output_dir=str(judged),
        judge="rm", reward_model="builtin:vowel_share", bootstrap=200))
    rates = {(r["method"], r["against"]): r for r in summary["win_rates"]}
    assert {m for m, _ in rates} == {"tiny", "sft", "gpt4o"}
    for r in rates.values():
        assert 0.0 <= r["ci_low"] <= r["win_rate"] <= r["ci_high"] <= 1.0
        assert 0.0 <= r["lc_ci_low"] <= r["lc_win_rate"] <= r["lc_ci_high"] <= 1.0
    # The released files cover the six evaluation contests built here; ours the first three.
    assert rates[("sft", "top10")]["contests"] == 6 and rates[("tiny", "top10")]["contests"] == 3
    reliability = summary["reliability"]
    assert reliability["contests"] == 6 and reliability["top10_vs_rank1000"]["contests"] == 6
    assert reliability["group_order"]["contests"] == 6 and reliability["group_order"]["pairs"] == 36
    assert reliability["length_correlation"]["captions"] == 6 * 4 * 10
    assert reliability["rm_held_out"] is None  # no pairs dataset in this build
    assert set(summary["lengths"]) == {"tiny", "sft", "gpt4o"} | {f"human_{g}" for g in benchmark.GROUPS}
    assert json.loads((judged / "winrates.json").read_text())["reliability"] == reliability

    site = tmp_path / "site"
    page = report.run(report.ReportConfig(judge_dir=str(judged), generations=[str(out), str(released)],
                                          dataset_dir=str(datasets_dir), output_dir=str(site), examples=2))
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        view = browser.new_page()
        view.goto(f"file://{page}")
        assert view.locator("#leaderboard tr").count() == 1 + 3
        # A judge that does not clear chance is said so in words above the table.
        assert view.locator("#judge-warning").count() == int(reliability["includes_chance"])
        assert view.locator("#reliability li").count() >= 3
        images = view.locator("img")
        assert images.count() >= 4  # two plots, two cartoons
        for i in range(images.count()):
            image = images.nth(i)
            assert image.evaluate("img => img.complete && img.naturalWidth > 0"), image.get_attribute("src")
        view.screenshot(path=str(site / "screenshot.png"), full_page=True)
        browser.close()
    assert (site / "screenshot.png").stat().st_size > 10_000


def test_llm_judge_over_http_asks_both_orders_calibrates_and_caches(tmp_path, datasets_dir, generated, ray_local):
    from humor_ray.serve import ServeConfig, free_port, running_server

    out, _ = generated
    judged = tmp_path / "llm"
    # The SmolLM2 LLaVA on `humor-ray serve`: its 8k context holds the judge's prompt (the example, the
    # description, two groups), and it reads the cartoon that best pick sends.
    with running_server(ServeConfig(model="smollm2-llava", port=free_port(), max_model_len=8192)) as base_url:
        config = dict(dataset_dir=str(datasets_dir), generations=[str(out)], output_dir=str(judged), judge="llm",
                      base_url=base_url, model="smollm2-llava", shots=1, max_contests=1, bootstrap=100,
                      concurrency=4)
        dry = benchmark.run(benchmark.JudgeConfig(**config, dry_run=True))
        summary = benchmark.run(benchmark.JudgeConfig(**config))
        again = benchmark.run(benchmark.JudgeConfig(**config))
        # Best pick sends the cartoon with each group.
        picked = benchmark.run(benchmark.JudgeConfig(**{**config, "output_dir": str(tmp_path / "pick"),
                                                        "protocol": "best_pick", "max_contests": 1}))
    judgments = pd.read_parquet(judged / "judgments.parquet")
    ours = judgments[judgments["method"] == "tiny"]
    assert len(ours) == 1 * 4 * 2 and set(ours["order"]) == {"AB", "BA"}
    assert 0.0 <= summary["stats"]["threshold"] <= 1.0
    # 1 contest x (4 groups + the 6 pairs of human groups, for the reliability checks) x 2 orders.
    assert dry["to_send"] == 20
    assert summary["stats"]["sent"] == 20 and again["stats"]["sent"] == 0 and again["stats"]["cache_hits"] == 20
    reliability = json.loads((judged / "winrates.json").read_text())["reliability"]
    assert reliability["judgments"] == 2 and reliability["group_order"]["pairs"] == 6
    assert picked["stats"]["sent"] > 0 and {r["against"] for r in picked["win_rates"]} == set(benchmark.GROUPS)
