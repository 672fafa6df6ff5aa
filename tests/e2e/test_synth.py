"""`humor-ray data synth`: exact totals, the raw-votes schema, determinism, and realism against the
constants calibrated on the real data."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from humor_ray.cli import main
from humor_ray.data import synth, text

pytestmark = pytest.mark.timeout(120)

SMALL = 200_000


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    import ray

    started = not ray.is_initialized()
    if started:
        # A private local cluster: never attach to one another process on this machine started.
        ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING")
    yield
    if started:
        ray.shutdown()


def synthesize(path, **kwargs) -> dict:
    return synth.run(synth.SynthConfig(output=str(path), **kwargs))


def read(path, kind: str) -> pa.Table:
    return pq.read_table(path / kind)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("small")
    return path, synthesize(path, ratings=SMALL, seed=7)


@pytest.fixture(scope="module")
def realistic(tmp_path_factory):
    """Two contests of the real average size: enough captions and votes to compare with the real data."""
    path = tmp_path_factory.mktemp("realistic")
    return path, synthesize(path, ratings=2 * synth.VOTES_PER_CONTEST)


def test_exact_total_schema_and_layout(small):
    path, summary = small
    votes, captions = read(path, "votes"), read(path, "captions")
    assert summary["ratings"] == votes.num_rows == SMALL
    assert summary["contests"] == 1  # 200,000 ratings: fewer than the real average per contest
    assert votes.schema == pa.schema([("contest", pa.int32()), ("caption_id", pa.int32()), ("rating", pa.int8())])
    assert captions.schema == pa.schema([("contest", pa.int32()), ("caption_id", pa.int32()),
                                         ("caption", pa.string())])
    assert sorted(p.name for p in (path / "votes").iterdir()) == ["1000_votes_000.parquet"]
    assert sorted(p.name for p in (path / "captions").iterdir()) == ["1000_captions.parquet"]
    assert set(pc.unique(votes["rating"]).to_pylist()) == {1, 2, 3}
    assert summary["captions"] == captions.num_rows
    assert summary["files"] == 2


def test_every_voted_caption_has_a_text(small):
    path, _ = small
    votes, captions = read(path, "votes"), read(path, "captions")
    voted = votes.group_by(["contest", "caption_id"]).aggregate([]).join(captions, ["contest", "caption_id"])
    assert pc.all(pc.is_valid(voted["caption"])).as_py()
    assert pc.min(pc.utf8_length(captions["caption"])).as_py() > 5
    # No caption without a vote either: the real data has none.
    assert voted.num_rows == captions.num_rows


def test_same_seed_same_files_other_seed_other_files(small, tmp_path):
    path, _ = small
    synthesize(tmp_path / "again", ratings=SMALL, seed=7)
    synthesize(tmp_path / "other", ratings=SMALL, seed=8)
    for kind, name in (("votes", "1000_votes_000.parquet"), ("captions", "1000_captions.parquet")):
        original = (path / kind / name).read_bytes()
        assert (tmp_path / "again" / kind / name).read_bytes() == original
        assert (tmp_path / "other" / kind / name).read_bytes() != original


def test_contests_flag_spreads_ratings_exactly(tmp_path):
    summary = synthesize(tmp_path, ratings=SMALL, contests=5, seed=3)
    votes = read(tmp_path, "votes")
    assert summary["contests"] == 5 and votes.num_rows == SMALL
    per_contest = votes.group_by("contest").aggregate([([], "count_all")])
    assert sorted(per_contest["contest"].to_pylist()) == [1000, 1001, 1002, 1003, 1004]
    assert sorted(p.name for p in (tmp_path / "captions").iterdir())[0] == "1000_captions.parquet"


def test_tiny_run_and_rerun_replaces_old_files(tmp_path):
    synthesize(tmp_path, ratings=SMALL, contests=3)
    summary = synthesize(tmp_path, ratings=10)
    assert summary["ratings"] == read(tmp_path, "votes").num_rows == 10
    assert summary["contests"] == 1 and summary["captions"] <= 10 // synth.MIN_VOTES_PER_CAPTION
    assert len(list((tmp_path / "votes").iterdir())) == 1


def test_participants_and_timestamps(tmp_path):
    synthesize(tmp_path, ratings=50_000, participants=True)
    votes = read(tmp_path, "votes")
    assert votes.num_rows == 50_000
    assert votes.schema.field("participant").type == pa.int32()
    # Written as timestamp[s]; Parquet has no seconds unit, so it stores (and reads back) whole-second ms.
    assert votes.schema.field("timestamp").type == pa.timestamp("ms")
    millis = votes["timestamp"].cast(pa.int64()).to_numpy()
    assert (millis % 1000 == 0).all()
    seconds = millis // 1000
    assert (np.diff(seconds) >= 0).all()  # rows in time order
    start = synth.FIRST_CONTEST_START.astype(np.int64)
    assert start <= seconds.min() and seconds.max() < start + synth.VOTING_DAYS * 86_400
    expected = round(50_000 / synth.VOTES_PER_PARTICIPANT)
    assert 0 <= pc.min(votes["participant"]).as_py() and pc.max(votes["participant"]).as_py() < expected
    assert pc.count_distinct(votes["participant"]).as_py() > expected / 2


def test_shards_split_a_contest_exactly(monkeypatch):
    monkeypatch.setattr(synth, "SHARD_VOTES", 30_000)
    assert synth.shard_sizes(100_001) == [25_001, 25_000, 25_000, 25_000]
    plan = synth.plan_contest(1, 1000, 100_001)
    assert plan.shard_counts.sum(axis=1).tolist() == [25_001, 25_000, 25_000, 25_000]
    assert plan.shard_counts.sum(axis=0).min() >= 1
    table = synth.shard_table(1, 1000, plan, 2, participants=False)
    assert table.num_rows == 25_000
    counts = np.bincount(table["caption_id"].to_numpy(), minlength=plan.shard_counts.shape[1])
    assert (counts == plan.shard_counts[2]).all()


def test_rating_mix_and_votes_per_caption_match_the_real_data(realistic):
    path, summary = realistic
    votes = read(path, "votes")
    assert summary["contests"] == 2 and votes.num_rows == 2 * synth.VOTES_PER_CONTEST
    shares = np.bincount(votes["rating"].to_numpy(), minlength=4)[1:] / votes.num_rows
    assert np.allclose(shares, synth.RATING_SHARES, atol=0.02), shares
    per_caption = votes.group_by(["contest", "caption_id"]).aggregate(
        [([], "count_all"), ("rating", "mean")]).to_pandas()
    assert synth.CAPTIONS_MIN <= len(per_caption) / 2 <= synth.CAPTIONS_MAX
    means = per_caption["rating_mean"]
    for q in (0.25, 0.5, 0.75):
        assert abs(means.quantile(q) - synth.CAPTION_MEAN_QUANTILES[q]) < 0.04, (q, means.quantile(q))
    rel = per_caption["count_all"] / per_caption.groupby("contest")["count_all"].transform("mean")
    # Heavy tail: most captions get fewer votes than the mean, the top 1% several times more.
    assert abs(rel.quantile(0.5) / synth.VOTES_REL_QUANTILES[0.5] - 1) < 0.2, rel.quantile(0.5)
    assert abs(rel.quantile(0.99) / synth.VOTES_REL_QUANTILES[0.99] - 1) < 0.35, rel.quantile(0.99)
    assert rel.max() > 15


def test_caption_texts_repeat_rarely_and_carry_some_personal_data():
    texts = synth.caption_texts(5_500, np.random.default_rng(1))
    repeated = 1 - pc.count_distinct(pc.utf8_lower(texts)).as_py() / len(texts)
    assert 0.005 < repeated < 0.02
    many = synth.caption_texts(300_000, np.random.default_rng(2))
    _, scrubbed = text.scrub(many)
    assert 5 <= sum(scrubbed.values()) <= 50  # about 1 in 15,000
    assert pc.all(pc.match_substring_regex(many, r"^[A-Z].{8,}$")).as_py()


@pytest.mark.parametrize("flags, message", [
    (["--ratings", "0"], "--ratings 0: must be >= 1"),
    (["--ratings", "10", "--contests", "11"], "--contests must be between 1 and --ratings"),
    (["--ratings", "10", "--contests", "0"], "--contests 0: must be >= 1"),
    (["--ratings", "10", "--seed", "-1"], "--seed -1: must be >= 0"),
    ([], "--ratings is required"),
])
def test_bad_flags_are_clear_errors(tmp_path, capsys, flags, message):
    assert main(["data", "synth", "--output", str(tmp_path), *flags]) == 2
    assert message in capsys.readouterr().err


def test_cli_writes_the_files(tmp_path):
    assert main(["data", "synth", "--output", str(tmp_path), "--ratings", "20000", "--contests", "2"]) == 0
    assert read(tmp_path, "votes").num_rows == 20_000
