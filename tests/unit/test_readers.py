"""Readers: every known schema into one canonical table; bad rows quarantined with row and reason."""

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from humor_ray.data import readers, text

LOCAL = pafs.LocalFileSystem()


def read(path):
    return readers.read_file(LOCAL, str(path))


def test_schema_a_matches_file_counts(real_data):
    path = real_data / "summaries" / "510_LilUCB.csv"
    result = read(path)
    raw = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(newlines_in_values=True))
    assert result.kind == "summary"
    assert result.captions.num_rows == raw.num_rows - len(result.quarantine)
    assert set(result.captions["contest"].to_pylist()) == {510}
    assert sum(result.captions["funny"].to_pylist()) <= sum(raw["funny"].to_pylist())
    assert result.stats["rank_base"] == 1


def test_schema_b_with_contest_column_mismatch(real_data):
    result = read(real_data / "summaries" / "688_KLUCB.csv")
    assert set(result.captions["contest"].to_pylist()) == {688}
    assert result.stats["contest_mismatch"] == {"column": 689, "name": 688}
    assert any("689" in w and "688" in w for w in result.warnings)


def test_newer_schemas_zero_based_rank_and_no_contest_column(real_data):
    ranked = read(real_data / "samples_newer_schema" / "598_lil-KLUCB_head25.csv")
    assert ranked.stats["rank_base"] == 0 and ranked.captions.num_rows == 25
    assert set(ranked.captions["contest"].to_pylist()) == {598}
    unranked = read(real_data / "samples_newer_schema" / "700_head25.csv")
    assert set(unranked.captions["contest"].to_pylist()) == {700}
    # The data README: 23 of 25 given means in 700.csv disagree with the counts; we recompute.
    assert unranked.stats["means_off"] == 23


def test_column_order_and_aliases_do_not_matter(tmp_path, real_data):
    table = pacsv.read_csv(real_data / "samples_newer_schema" / "895_head25.csv")
    shuffled = table.select(list(reversed(table.column_names)))
    pacsv.write_csv(shuffled, tmp_path / "895_shuffled.csv")
    a, b = read(real_data / "samples_newer_schema" / "895_head25.csv"), read(tmp_path / "895_shuffled.csv")
    assert a.captions.drop(["source"]).equals(b.captions.drop(["source"]))
    assert a.captions["unfunny"].to_pylist() == table["not_funny"].to_pylist()


def test_bad_rows_are_quarantined_with_row_numbers_and_good_rows_kept(tmp_path):
    path = tmp_path / "901_mixed.csv"
    path.write_text(
        "caption,funny,somewhat_funny,unfunny,votes\n"
        "A fine caption,3,4,5,12\n"
        "Counts are words,three,4,5,12\n"
        "Too,few\n"
        "Votes disagree,1,1,1,4\n"
        "   ,1,1,1,3\n"
        "Negative,-1,2,3,4\n"
        '"Another fine one, with a comma",0,0,7,7\n'
        "Nobody voted,0,0,0,0\n"
    )
    result = read(path)
    assert result.captions["caption"].to_pylist() == ["A fine caption", "Another fine one, with a comma"]
    reasons = {(q["row"], q["reason"]) for q in result.quarantine}
    assert (2, "funny is missing or not a non-negative integer") in reasons
    assert (4, "votes does not equal funny + somewhat_funny + unfunny") in reasons
    assert (5, "empty caption") in reasons
    assert (6, "funny is missing or not a non-negative integer") in reasons
    assert (8, "no votes") in reasons
    assert (3, "expected 5 fields, found 2") in reasons
    assert all(q["source"] == str(path) for q in result.quarantine)
    assert len(result.quarantine) == 6


def test_implausible_row_is_quarantined(real_data):
    result = read(real_data / "summaries" / "600_KLUCB.csv")
    implausible = [q for q in result.quarantine if q["reason"].startswith("implausible")]
    assert len(implausible) == 1 and implausible[0]["row"] == 1 and '"funny": 923' in implausible[0]["record"]


def test_unparseable_and_unrecognised_files_name_the_file(tmp_path):
    garbage = tmp_path / "902_garbage.parquet"
    garbage.write_bytes(b"\x00\x01 this is not parquet at all")
    with pytest.raises(readers.InputFileError, match="902_garbage.parquet: cannot parse as Parquet"):
        read(garbage)
    odd = tmp_path / "903_odd.csv"
    odd.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(readers.InputFileError, match=r"903_odd.csv: unrecognised columns \['a', 'b', 'c'\]"):
        read(odd)
    nameless = tmp_path / "summary.csv"
    nameless.write_text("caption,funny,somewhat_funny,unfunny\nHi,1,1,1\n")
    with pytest.raises(readers.InputFileError, match="summary.csv: no contest id"):
        read(nameless)


def test_given_means_of_any_type_are_checked_and_rows_kept(tmp_path):
    whole = tmp_path / "904_whole.csv"  # every mean an integer: Arrow reads the column as int64
    whole.write_text("caption,mean,funny,somewhat_funny,unfunny\nOne,2,1,1,1\nTwo,2,0,0,3\n")
    result = read(whole)
    assert result.captions.num_rows == 2 and result.stats["means_off"] == 1
    texts = tmp_path / "905_text.csv"
    texts.write_text("caption,mean,funny,somewhat_funny,unfunny\nOne,2.0,1,1,1\nTwo,n/a,0,0,3\nThree, 1e0 ,0,1,1\n")
    result = read(texts)
    assert result.captions.num_rows == 3 and result.stats["means_off"] == 1 and not result.quarantine


def test_values_of_an_unforeseen_type_reject_the_file_by_name(tmp_path):
    odd = tmp_path / "906_lists.parquet"
    pq.write_table(pa.table({"caption": [["a", "b"]], "funny": [1], "somewhat_funny": [1], "unfunny": [1]}), odd)
    with pytest.raises(readers.InputFileError, match="906_lists.parquet: cannot read its summary rows"):
        read(odd)


def latin1_copy(source, target):
    """A copy of a real summary file whose lines with non-ASCII text are written in cp1252 (as a
    latin-1 editor saves them), the rest left as UTF-8. Returns the number of lines that changed."""
    lines = source.read_bytes().split(b"\n")
    changed = 0
    for i, line in enumerate(lines):
        try:
            encoded = line.decode("utf-8").encode("cp1252")
        except UnicodeEncodeError:  # characters cp1252 lacks: the line stays UTF-8
            continue
        changed += encoded != line
        lines[i] = encoded
    target.write_bytes(b"\n".join(lines))
    return changed


def test_latin1_lines_in_a_utf8_file_are_decoded_and_every_row_kept(tmp_path, real_data):
    source = real_data / "summaries" / "688_KLUCB.csv"
    damaged = tmp_path / "688_KLUCB.csv"
    changed = latin1_copy(source, damaged)
    assert changed > 100
    clean, repaired = read(source), read(damaged)
    assert repaired.stats["not_utf8_lines"] == changed and clean.stats["not_utf8_lines"] == 0
    assert any(f"{changed} lines are not valid UTF-8" in w for w in repaired.warnings)
    # cp1252 holds every character of those lines, so the text comes back exactly.
    assert repaired.captions.num_rows == clean.captions.num_rows
    assert repaired.captions["caption"].to_pylist() == clean.captions["caption"].to_pylist()
    assert len(repaired.quarantine) == len(clean.quarantine)


def test_bytes_cp1252_lacks_are_read_as_latin1(tmp_path):
    odd = tmp_path / "907_odd_bytes.csv"
    odd.write_bytes(b"caption,funny,somewhat_funny,unfunny\nCaf\xe9 \x93quoted\x94 \x81,1,1,1\n")
    result = read(odd)
    assert result.captions["caption"].to_pylist() == ["Caf\u00e9 \u201cquoted\u201d \x81"]


def test_header_only_file_is_rejected_by_name(tmp_path):
    empty = tmp_path / "908_header_only.csv"
    empty.write_text("rank,funny,somewhat_funny,unfunny,count,score,precision,contest,caption\n")
    with pytest.raises(readers.InputFileError, match="908_header_only.csv: no rows"):
        read(empty)


def test_malformed_latin1_row_is_quarantined_without_a_traceback(tmp_path, capfd):
    path = tmp_path / "909_bad_row.csv"
    path.write_bytes(b"caption,funny,somewhat_funny,unfunny\n"
                     b"Fine,1,2,3\n"
                     b"Caf\xe9 au lait,1,2,3,extra\n"
                     b"Also fine,3,2,1\n")
    result = read(path)
    assert result.captions["caption"].to_pylist() == ["Fine", "Also fine"]
    assert [(q["row"], q["reason"], q["record"]) for q in result.quarantine] == [
        (2, "expected 4 fields, found 5", "Caf\u00e9 au lait,1,2,3,extra")]
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err + captured.out and "Exception ignored" not in captured.err


def test_raw_votes_aggregate_to_counts(tmp_path):
    rng = np.random.default_rng(0)
    captions = np.array(["Alpha joke", "Beta joke", "Gamma joke"])
    pick = rng.integers(0, 3, 5000)
    rating = rng.integers(1, 4, 5000)
    rating[:3] = [0, 4, 7]  # three bad ratings
    votes = pa.table({"rating": rating.astype(np.int8), "caption": captions[pick],
                      "contest": np.full(5000, 904, np.int32), "participant": np.arange(5000)})
    pq.write_table(votes, tmp_path / "votes.parquet")
    result = read(tmp_path / "votes.parquet")
    assert result.kind == "votes" and len(result.quarantine) == 3
    assert {q["reason"] for q in result.quarantine} == {"rating is not 1, 2 or 3"}
    got = {r["caption"]: r for r in result.captions.to_pylist()}
    for k, caption in enumerate(captions):
        mine = (pick == k) & (rating >= 1) & (rating <= 3)
        assert got[caption]["funny"] == int(((rating == 3) & mine).sum())
        assert got[caption]["somewhat_funny"] == int(((rating == 2) & mine).sum())
        assert got[caption]["unfunny"] == int(((rating == 1) & mine).sum())
    # The same votes as CSV give the same counts.
    pacsv.write_csv(votes, tmp_path / "votes.csv")
    assert read(tmp_path / "votes.csv").captions.drop(["source"]).equals(result.captions.drop(["source"]))


def test_votes_by_caption_id_and_lookup_file(tmp_path):
    pq.write_table(pa.table({"contest": [905] * 4, "caption_id": [7, 7, 8, 8], "rating": [3, 1, 2, 2]}),
                   tmp_path / "905_votes.parquet")
    pq.write_table(pa.table({"contest": [905, 905], "caption_id": [7, 8], "caption": ["Seven", "Eight"]}),
                   tmp_path / "905_captions.parquet")
    votes, lookup = read(tmp_path / "905_votes.parquet"), read(tmp_path / "905_captions.parquet")
    assert votes.kind == "votes" and lookup.kind == "captions"
    assert votes.captions.select(["caption_id", "funny", "somewhat_funny", "unfunny"]).to_pylist() == [
        {"caption_id": "7", "funny": 1, "somewhat_funny": 0, "unfunny": 1},
        {"caption_id": "8", "funny": 0, "somewhat_funny": 2, "unfunny": 0}]
    assert lookup.lookup["caption"].to_pylist() == ["Seven", "Eight"]


def test_scrub_and_whitespace():
    captions = pa.array([
        "Write me at jane.doe@example.com\nplease",
        "See https://example.org/x for more",
        "Call 608-555-1234 now",
        "Amazon.com delivers   fast",
        "In 1999 I had 3 dogs",
    ])
    clean, counts = text.scrub(text.normalise_whitespace(captions))
    assert clean.to_pylist() == ["Write me at [email] please", "See [url] for more", "Call [phone] now",
                                 "Amazon.com delivers fast", "In 1999 I had 3 dogs"]
    assert counts == {"email": 1, "url": 1, "phone": 1}


def test_listing_directory_glob_and_single_file(tmp_path, real_data):
    for name in ("510_LilUCB.csv", "511_LilUCB.csv", "511_RoundRobin.csv"):
        shutil.copy(real_data / "summaries" / name, tmp_path / name)
    (tmp_path / "notes.txt").write_text("not data")
    (tmp_path / "_staging").mkdir()
    assert [p.rsplit("/", 1)[1] for p in readers.list_input_files(str(tmp_path))[1]] == [
        "510_LilUCB.csv", "511_LilUCB.csv", "511_RoundRobin.csv"]
    assert len(readers.list_input_files(str(tmp_path / "*_RoundRobin.csv"))[1]) == 1
    assert len(readers.list_input_files(str(tmp_path / "510_LilUCB.csv"))[1]) == 1
    with pytest.raises(readers.InputFileError, match="no such file"):
        readers.list_input_files(str(tmp_path / "missing"))
