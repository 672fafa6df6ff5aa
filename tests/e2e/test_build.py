"""`data build` end to end on real contest files plus deliberately broken ones, on local Ray."""

import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from humor_ray.data import build, prompts

pytestmark = pytest.mark.timeout(600)

REAL_FILES = [
    "508-round1_LilUCB.csv", "508-round1_RoundRobin.csv", "508-round2_RoundRobin.csv",  # combined
    "530_LilUCB.csv", "536_LilUCB.csv", "543_LilUCB.csv",
    "560_KLUCB_funny.csv", "560_KLUCB_original.csv",  # the second asks about originality: excluded
    "591_KLUCB.csv",                                   # corrupted counts
    "643_KLUCB.csv", "644_KLUCB.csv",                  # 644's file holds 643's captions
    "688_KLUCB.csv",                                   # contest column says 689
]
CONTRACT = {
    "pairs": ["contest", "prompt", "chosen", "rejected", "chosen_mean", "rejected_mean", "chosen_se", "rejected_se"],
    "sft": ["contest", "prompt", "completion", "text"],
    "sft_simple": ["contest", "prompt", "completion", "text"],
    "llava_sft": ["contest", "image", "prompt", "caption", "rank"],
    "captions": ["contest", "caption_id", "caption", "funny", "somewhat_funny", "unfunny", "votes", "mean", "se",
                 "rank", "split"],
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, real_data):
    folder = tmp_path_factory.mktemp("ratings")
    for name in REAL_FILES:
        shutil.copy(real_data / "summaries" / name, folder / name)
    shutil.copy(real_data / "samples_newer_schema" / "700_head25.csv", folder / "700.csv")
    (folder / "902_garbage.parquet").write_bytes(b"\x00\x01 not parquet")
    (folder / "903_bad_rows.csv").write_text(
        "caption,funny,somewhat_funny,unfunny\n"
        "Mail me at someone@example.com,10,20,30\n"
        "Not a number,x,1,1\n"
        "Fine one,5,5,5\n")
    return folder


def build_config(inputs, output, real_data, **overrides):
    values = dict(
        input=str(inputs), output=str(output),
        splits=str(real_data / "benchmarks" / "humor_in_ai_splits.json"),
        descriptions=[str(real_data / "descriptions" / "humor_in_ai_prompt_descriptions.csv"),
                      str(real_data / "descriptions" / "nextml_descriptions.csv")],
        images=str(real_data / "images"), exclude=["560_KLUCB_original.csv"])
    values.update(overrides)
    return build.BuildConfig(**values)


@pytest.fixture(scope="module")
def built(inputs, real_data, tmp_path_factory, ray_local):
    output = tmp_path_factory.mktemp("datasets")
    report = build.run(build_config(inputs, output, real_data))
    return output, report


def table(output, dataset, split=None):
    path = output / dataset / split if split else output / dataset
    return pads.dataset(str(path), format="parquet").to_table()


def test_known_problems_are_found_in_the_data(built):
    output, report = built
    reasons = {r["source"].rsplit("/", 1)[1]: r["reason"] for r in report["quarantined"]["file_reasons"]}
    assert "corrupted vote counts" in reasons["591_KLUCB.csv"]
    assert "captions are contest 643's" in reasons["644_KLUCB.csv"]
    assert "902_garbage.parquet: cannot parse as Parquet" in reasons["902_garbage.parquet"]
    assert set(reasons) == {"591_KLUCB.csv", "644_KLUCB.csv", "902_garbage.parquet"}
    assert report["files"]["excluded"] == ["560_KLUCB_original.csv"]
    assert any("689" in w for w in report["warnings"])
    files = table(output, "quarantine").to_pylist()
    assert {r["source"].rsplit("/", 1)[1] for r in files if r["row"] is None} == set(reasons)


def test_caption_fingerprint_ignores_case_and_array_layout():
    import pyarrow as pa

    captions = pa.array(["Sixteen letters!", "SIXTEEN LETTERS!", "eight ch", "ch eight", "twelve chars", ""])
    fingerprint = build._fingerprint(captions)
    # Only keys of a multiple of 8 bytes are sampled; case folds; reordered words are another caption.
    assert len(fingerprint) == 3
    assert set(build._fingerprint(captions.slice(2, 2))) < set(fingerprint)
    assert build._fingerprint(pa.array(["Eight ch", "CH EIGHT", "sixteen LETTERS!"])) == fingerprint
    assert build._fingerprint(captions.slice(4)) == []
    hashes = build._hash_words(pa.array(["abcdefgh" * 2, "abcdefgh" * 3, "ijklmnop" + "abcdefgh"]))
    assert len(set(hashes.tolist())) == 3 and (hashes >= 0).all()


def test_bad_rows_quarantined_good_rows_kept(built):
    output, report = built
    rows = [r for r in table(output, "quarantine").to_pylist() if r["row"] is not None]
    bad = [r for r in rows if r["source"].endswith("903_bad_rows.csv")]
    assert [(r["row"], r["reason"]) for r in bad] == [(2, "funny is missing or not a non-negative integer")]
    captions = table(output, "captions").to_pandas()
    kept = captions[captions.contest == 903].caption.tolist()
    assert sorted(kept) == ["Fine one", "Mail me at [email]"]
    assert report["quarantined"]["rows"] == len(rows)


def test_contests_and_splits(built, real_data):
    output, report = built
    captions = table(output, "captions").to_pandas()
    assert set(captions.contest) == {508, 530, 536, 543, 560, 643, 688, 700, 903}
    splits = json.loads((real_data / "benchmarks" / "humor_in_ai_splits.json").read_text())
    evaluation = set(splits["validation"] + splits["test"])
    for dataset in ("pairs", "sft", "sft_simple", "llava_sft", "prompts"):
        train = set(table(output, dataset, "train")["contest"].to_pylist())
        assert not train & evaluation, dataset
    assert set(table(output, "prompts", "eval")["contest"].to_pylist()) >= {536, 543, 643, 700}
    assert {c: s for c, s in zip(captions.contest, captions.split)}[530] == "train"


def test_dataset_columns_follow_the_contract(built):
    output, _ = built
    for dataset, columns in CONTRACT.items():
        for split in ("train", "eval"):
            assert table(output, dataset, split).column_names == columns, (dataset, split)
    assert table(output, "prompts", "eval").column_names[:2] == ["contest", "prompt"]
    assert table(output, "references", "eval").column_names == ["contest", "group", "rank", "caption", "mean"]


def test_means_recomputed_and_files_of_one_contest_summed(built, real_data):
    output, _ = built
    captions = table(output, "captions").to_pandas()
    c = captions[captions.contest == 508]
    assert np.allclose(c["mean"], (c.unfunny + 2 * c.somewhat_funny + 3 * c.funny) / c.votes)
    import pandas as pd
    raw = pd.concat(pd.read_csv(real_data / "summaries" / n) for n in REAL_FILES[:3])
    assert c.votes.sum() == raw["count"].sum()
    assert list(c["rank"])[:1] == [1] and c["mean"].is_monotonic_decreasing


def test_pairs_follow_the_three_sigma_rule(built):
    output, _ = built
    p = table(output, "pairs").to_pandas()
    assert (p.chosen_mean - p.rejected_mean > 3 * np.sqrt(p.chosen_se ** 2 + p.rejected_se ** 2)).all()
    assert p.groupby("contest").size().max() == 1000
    assert not p.duplicated(["contest", "chosen", "rejected"]).any()


def test_sft_samples_prompts_and_references(built):
    output, _ = built
    sft, simple = table(output, "sft", "eval").to_pandas(), table(output, "sft_simple", "eval").to_pandas()
    assert sft.groupby("contest").size().max() == 1000
    # The original built the simple-prompt test split with the long prompt; ours uses the simple one.
    assert simple.prompt.str.startswith("scene:").all() and not simple.prompt.str.contains("sophisticated").any()
    assert sft.prompt.str.startswith(prompts.INSTRUCTION[:40]).all()
    assert (sft.text == sft.prompt + " " + sft.completion).all()
    refs = table(output, "references", "eval").to_pandas()
    r643 = refs[refs.contest == 643]
    assert r643.groupby("group").size().to_dict() == {"median": 10, "rank1000": 10, "rank200": 10, "top10": 10}
    assert r643[r643.group == "rank200"]["rank"].tolist() == list(range(200, 210))
    assert set(refs[refs.contest == 700].group) == {"top10", "median"}  # only 25 captions there


def test_context_and_images(built):
    output, report = built
    prompts_train = table(output, "prompts", "train").to_pandas().set_index("contest")
    assert "medieval throne room" in prompts_train.loc[530, "prompt"]
    assert 508 in report["contests"]["without_context"]
    llava = table(output, "llava_sft", "train").to_pandas()
    assert (llava[llava.contest == 530].image == "530.jpg").all()
    assert llava.groupby("contest")["rank"].min().eq(1).all()


def test_scrubbed_everywhere(built):
    output, report = built
    for dataset in ("captions", "pairs", "sft", "sft_simple", "llava_sft", "references", "quarantine"):
        for column in ("caption", "chosen", "rejected", "completion", "record"):
            t = table(output, dataset)
            if column in t.column_names:
                assert not any("@example.com" in (v or "") for v in t[column].to_pylist()), (dataset, column)
    assert report["scrubbed"]["email"] >= 1


def _content_digest(folder):
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.parquet")):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(pq.read_table(path).to_string(show_metadata=True).encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def test_deterministic_byte_identical(built, inputs, real_data, tmp_path, ray_local):
    output, _ = built
    again = tmp_path / "again"
    build.run(build_config(inputs, again, real_data))
    assert _content_digest(output) == _content_digest(again)
    other_seed = tmp_path / "other"
    build.run(build_config(inputs, other_seed, real_data, seed=7))
    assert _content_digest(output) != _content_digest(other_seed)


def run_cli(*args, ray_address=None):
    import os

    env = dict(os.environ, RAY_ADDRESS=ray_address) if ray_address else None
    return subprocess.run([sys.executable, "-m", "humor_ray", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def test_cli_strict_and_nothing_usable(inputs, tmp_path, ray_local):
    # The command joins the session's cluster, as it would under `ray job submit`.
    address = ray_local.get_runtime_context().gcs_address

    def run(*args):
        return run_cli(*args, ray_address=address)

    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    shutil.copy(inputs / "902_garbage.parquet", only_bad)
    shutil.copy(inputs / "591_KLUCB.csv", only_bad)
    result = run("data", "build", "--input", str(only_bad), "--output", str(tmp_path / "o1"))
    assert result.returncode == 1
    assert "nothing usable remains" in result.stderr and "Traceback" not in result.stderr
    assert "902_garbage.parquet: cannot parse as Parquet" in result.stderr

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(inputs / "903_bad_rows.csv", mixed)
    result = run("data", "build", "--input", str(mixed), "--output", str(tmp_path / "o2"), "--strict")
    assert result.returncode == 1 and "--strict: 1 rows" in result.stderr
    # Without --strict the same input succeeds and keeps the good rows.
    assert run("data", "build", "--input", str(mixed), "--output", str(tmp_path / "o3")).returncode == 0
    assert pq.read_table(tmp_path / "o3" / "captions").num_rows == 2

    # A build that fails leaves the earlier build complete and in place, and nothing half-written beside it.
    result = run("data", "build", "--input", str(only_bad), "--output", str(tmp_path / "o3"))
    assert result.returncode == 1 and "nothing usable remains" in result.stderr
    assert (tmp_path / "o3" / "_COMPLETE").is_file() and pq.read_table(tmp_path / "o3" / "captions").num_rows == 2
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".o3.")]

    # A folder holding other work (a demo's runs) is refused before anything is deleted or Ray is joined.
    (tmp_path / "demo" / "runs").mkdir(parents=True)
    result = run_cli("data", "build", "--input", str(mixed), "--output", str(tmp_path / "demo"))
    assert result.returncode == 1 and "--overwrite" in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "demo" / "runs").is_dir()


def test_damaged_copies_keep_their_good_rows_and_are_reported(built, real_data, tmp_path, ray_local):
    from test_readers import latin1_copy

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    changed = latin1_copy(real_data / "summaries" / "688_KLUCB.csv", damaged / "688_KLUCB.csv")
    (damaged / "701_header_only.csv").write_text("caption,funny,somewhat_funny,unfunny\n")
    (damaged / "702_bad_row.csv").write_bytes(b"caption,funny,somewhat_funny,unfunny\n"
                                              b"Fine,1,2,3\nCaf\xe9 au lait,1,2,3,extra\n")
    out = tmp_path / "o"
    result = run_cli("data", "build", "--input", str(damaged), "--output", str(out),
                     ray_address=ray_local.get_runtime_context().gcs_address)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["captions"]["not_utf8_lines_decoded_as_cp1252"] == changed + 1  # and 702's "Caf\xe9" line
    assert any(f"688_KLUCB.csv: {changed} lines are not valid UTF-8" in w for w in report["warnings"])
    reasons = {r["source"].rsplit("/", 1)[-1]: r["reason"] for r in report["quarantined"]["file_reasons"]}
    assert list(reasons) == ["701_header_only.csv"] and "no rows" in reasons["701_header_only.csv"]
    assert report["quarantined"]["rows_by_reason"].get("expected 4 fields, found 5") == 1
    # Every caption of the latin-1 copy is kept, with the same text as from the clean file.
    clean_output, _ = built
    ours = table(out, "captions").to_pandas()
    clean = table(clean_output, "captions").to_pandas()
    assert sorted(ours[ours["contest"] == 688]["caption"]) == sorted(clean[clean["contest"] == 688]["caption"])
    assert "Fine" in set(ours[ours["contest"] == 702]["caption"])


def test_cli_usage_errors(tmp_path):
    result = run_cli("data", "build", "--output", str(tmp_path))
    assert result.returncode == 2 and result.stderr == "humor-ray data build: error: --input is required\n"
    result = run_cli("data", "build", "--input", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o"))
    assert result.returncode == 1 and "nowhere: no such file or directory" in result.stderr
    assert run_cli("nonsense").returncode == 2


def test_combine_largest_and_dataset_subset(inputs, real_data, tmp_path, ray_local):
    import pandas as pd

    files = REAL_FILES[:3]  # contest 508: two round-1 pools and a round-2 pool
    report = build.run(build.BuildConfig(input=str(inputs / "508-*"), output=str(tmp_path / "o"),
                                         combine="largest", datasets=["captions", "pairs"]))
    votes = {name: pd.read_csv(real_data / "summaries" / name)["count"].sum() for name in files}
    assert report["votes"] == max(votes.values())
    assert set(report["datasets"]) == {"captions", "pairs"}
    written = {p.name for p in (tmp_path / "o").iterdir()} - {"quarantine"}
    assert written == {"captions", "pairs", "report.json", "_COMPLETE"}


def test_stages_run_together_give_their_results_in_order_and_a_failure_waits_for_the_other(inputs, tmp_path,
                                                                                          ray_local):
    """`pipeline.run_together` (the demo's independent stages side by side): each stage's result in the order given;
    one that fails is raised only once the other has finished, its output complete."""
    from humor_ray import pipeline
    from humor_ray.config import UserError
    from humor_ray.data.outputs import MARKER

    good, other, bad = tmp_path / "good", tmp_path / "other", tmp_path / "bad"
    for folder, names in ((good, ["530_LilUCB.csv"]), (other, ["536_LilUCB.csv", "543_LilUCB.csv"]),
                          (bad, ["902_garbage.parquet"])):
        folder.mkdir()
        for name in names:
            shutil.copy(inputs / name, folder)

    def stage(number, folder, output):
        return number, "data build", None, ["--input", str(folder), "--output", str(tmp_path / output)]

    reports = pipeline.run_together([stage(1, good, "one"), stage(2, other, "two")])
    assert [report["contests"]["total"] for report in reports] == [1, 2]
    with pytest.raises(UserError, match="nothing usable remains"):
        pipeline.run_together([stage(3, bad, "three"), stage(4, good, "four")])
    assert (tmp_path / "four" / MARKER).is_file() and not (tmp_path / "three").exists()
