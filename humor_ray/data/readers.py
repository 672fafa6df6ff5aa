"""Readers for every rating file we know, into one canonical per-caption Arrow table.

Kinds of input file (recognised by their columns, in any order):
- summary: one row per caption with vote counts. NEXT schema A
  (`rank,funny,somewhat_funny,unfunny,count,score,precision,contest,caption`), schema B (the same plus
  `target_id`), and the newer schemas (`[rank,]caption,mean,precision,votes,not_funny,somewhat_funny,funny`,
  rank 0- or 1-based, no contest column: the contest comes from the file name).
- votes: one row per rating: `contest`, `rating` (1 unfunny, 2 somewhat funny, 3 funny) and `caption`
  and/or `caption_id`; optional `participant`, `timestamp`. Aggregated per caption while reading.
- captions: a lookup `contest, caption_id, caption` for votes files that carry only caption ids.

Bad rows never stop a file: they come back in a quarantine table with the row number and the reason.
CSV lines that are not UTF-8 (captions saved as latin-1) are decoded as cp1252 and kept, and counted.
A file that cannot be read at all raises `InputFileError`, whose message names the file and the cause.
"""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from humor_ray.config import UserError
from humor_ray.data import text

# Other releases' names for our columns.
ALIASES = {"score": "mean", "count": "votes", "not_funny": "unfunny", "precision": "se",
           "target_id": "caption_id"}
COUNT_COLUMNS = ("funny", "somewhat_funny", "unfunny")

CAPTIONS_SCHEMA = pa.schema([
    ("contest", pa.int32()), ("caption", pa.string()), ("caption_id", pa.string()),
    ("funny", pa.int64()), ("somewhat_funny", pa.int64()), ("unfunny", pa.int64()),
    ("source", pa.string()), ("row", pa.int64()),
])
LOOKUP_SCHEMA = pa.schema([("contest", pa.int32()), ("caption_id", pa.string()), ("caption", pa.string())])
QUARANTINE_SCHEMA = pa.schema([
    ("source", pa.string()), ("row", pa.int64()), ("contest", pa.int32()), ("reason", pa.string()),
    ("record", pa.string()),
])

SUPPORTED_SUFFIXES = (".csv", ".csv.gz", ".parquet", ".pq")
_CONTEST_IN_NAME = re.compile(r"^(\d+)")


class InputFileError(UserError):
    """A whole file cannot be used. The message starts with the file's path."""


@dataclass
class FileRead:
    """What one input file gave: rows for the pipeline, rejected rows, and facts for the report."""
    kind: str
    captions: pa.Table | None = None          # CAPTIONS_SCHEMA (summary and votes files)
    lookup: pa.Table | None = None            # LOOKUP_SCHEMA (captions files)
    quarantine: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    record_numbers: np.ndarray | None = None  # 1-based record number in the file of each parsed row


def contest_from_name(path: str) -> int | None:
    match = _CONTEST_IN_NAME.match(PurePosixPath(path).name)
    return int(match.group(1)) if match else None


def open_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it, for local paths and URIs (s3://, gs://, file://)."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(PurePosixPath(uri)) if uri.startswith("/") else uri


def list_input_files(uri: str) -> tuple[pafs.FileSystem, list[str]]:
    """Every rating file under a directory, a single file, or a glob (`dir/*_KLUCB.csv`), sorted."""
    import fnmatch
    import os

    pattern = None
    # A URI's query (`?endpoint_override=...`) configures the filesystem; it is not a glob.
    location, query = uri.split("?", 1) if "://" in uri and "?" in uri else (uri, "")
    if any(ch in location for ch in "*?["):
        location, pattern = location.rsplit("/", 1) if "/" in location else (".", location)
        uri = location + (f"?{query}" if query else "")
    fs, root = open_filesystem(uri)
    if "://" not in uri:
        root = os.path.abspath(root)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise InputFileError(f"{uri}: no such file or directory")
    if info.type == pafs.FileType.File:
        return fs, [root]
    selector = pafs.FileSelector(root, recursive=True)
    paths = []
    for entry in fs.get_file_info(selector):
        name = PurePosixPath(entry.path).name
        if entry.type != pafs.FileType.File or name.startswith((".", "_")):
            continue
        if pattern and not fnmatch.fnmatch(name, pattern):
            continue
        if name.lower().endswith(SUPPORTED_SUFFIXES):
            paths.append(entry.path)
    return fs, sorted(paths)


def _decode_cp1252(err: UnicodeDecodeError) -> tuple[str, int]:
    """A codecs error handler: bytes that are not UTF-8 read as cp1252, or latin-1 for the five bytes
    cp1252 leaves undefined (so every byte decodes to something)."""
    chars = []
    for byte in err.object[err.start:err.end]:
        try:
            chars.append(bytes([byte]).decode("cp1252"))
        except UnicodeDecodeError:
            chars.append(chr(byte))
    return "".join(chars), err.end


codecs.register_error("humor_ray_cp1252", _decode_cp1252)


def _is_utf8(data: bytes) -> bool:
    """Arrow's vectorised UTF-8 check of the whole file as one string (a few times faster than
    decoding it in Python)."""
    offsets = pa.py_buffer(np.array([0, len(data)], np.int64))
    try:
        pa.Array.from_buffers(pa.large_string(), 1, [None, offsets, pa.py_buffer(data)]).validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def _as_utf8(data: bytes) -> tuple[bytes, int]:
    """(the bytes as valid UTF-8, the number of lines that were not). Some files mix in captions saved
    as latin-1/cp1252: decoding just those bytes keeps every row, where Arrow would reject the file."""
    if _is_utf8(data):
        return data, 0
    lines = data.split(b"\n")
    repaired = 0
    for i, line in enumerate(lines):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            lines[i] = line.decode("utf-8", errors="humor_ray_cp1252").encode("utf-8")
            repaired += 1
    return b"\n".join(lines), repaired


def _read_raw_table(fs: pafs.FileSystem, path: str, quarantine: list[dict], stats: dict) -> pa.Table:
    """Parse CSV or Parquet. CSV rows with the wrong number of fields go to quarantine; CSV lines that
    are not UTF-8 are decoded as cp1252 (counted in `stats["not_utf8_lines"]`)."""
    lower = path.lower()
    try:
        if lower.endswith((".parquet", ".pq")):
            return pq.read_table(path, filesystem=fs)

        def bad_row(row):
            # Record numbers count from the first line after the header.
            quarantine.append({"source": path, "row": row.number - 1 if row.number else None, "contest": None,
                               "reason": f"expected {row.expected_columns} fields, found {row.actual_columns}",
                               "record": row.text})
            return "skip"

        compression = "gzip" if lower.endswith(".gz") else None
        with fs.open_input_stream(path, compression=compression) as stream:
            data, stats["not_utf8_lines"] = _as_utf8(stream.read())
        return pacsv.read_csv(
            pa.BufferReader(data),
            read_options=pacsv.ReadOptions(use_threads=False, block_size=1 << 24),
            parse_options=pacsv.ParseOptions(newlines_in_values=True, invalid_row_handler=bad_row),
            convert_options=pacsv.ConvertOptions(strings_can_be_null=False),
        )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, UnicodeDecodeError) as err:
        raise InputFileError(f"{path}: cannot parse as {'Parquet' if 'parquet' in lower else 'CSV'}: {err}") \
            from None


def _canonical_names(table: pa.Table, path: str) -> pa.Table:
    names = []
    for name in table.column_names:
        clean = name.strip().lower().replace(" ", "_").replace("-", "_")
        names.append(ALIASES.get(clean, clean))
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise InputFileError(f"{path}: columns {duplicated} appear twice (after mapping "
                             f"{', '.join(f'{k}->{v}' for k, v in ALIASES.items())})")
    return table.rename_columns(names)


def classify(columns: list[str], path: str) -> str:
    cols = set(columns)
    if "rating" in cols and "contest" in cols and cols & {"caption", "caption_id"}:
        return "votes"
    if set(COUNT_COLUMNS) <= cols and "caption" in cols:
        return "summary"
    if {"contest", "caption_id", "caption"} <= cols:
        return "captions"
    raise InputFileError(
        f"{path}: unrecognised columns {sorted(columns)}; expected per-caption counts "
        "(caption, funny, somewhat_funny, unfunny|not_funny), raw votes (contest, rating, "
        "caption|caption_id) or a caption lookup (contest, caption_id, caption)")


def _record_numbers(n: int, skipped: list[int]) -> np.ndarray:
    """1-based record number of each parsed row, counting the malformed records the parser skipped
    (so the numbers match the file: record k is line k + 1 unless a caption spans lines)."""
    numbers = np.arange(1, n + 1, dtype=np.int64)
    for record in sorted(skipped):
        numbers[numbers >= record] += 1
    return numbers


def _row_records(table: pa.Table, mask: np.ndarray, limit: int | None = None) -> list[str]:
    rows = table.filter(pa.array(mask)).to_pylist()
    return [json.dumps(r, default=str, ensure_ascii=False) for r in rows[:limit]]


def _quarantine_rows(read: FileRead, table: pa.Table, bad: np.ndarray, reason, path: str,
                     contest: np.ndarray | None = None) -> None:
    """Move the rows flagged in `bad` to quarantine. `reason` is a string or a per-row array."""
    idx = np.flatnonzero(bad)
    if not len(idx):
        return
    records = _row_records(table, bad)
    reasons = [reason] * len(idx) if isinstance(reason, str) else list(np.asarray(reason, dtype=object)[idx])
    for i, rec, why in zip(idx, records, reasons):
        read.quarantine.append({"source": path, "row": int(read.record_numbers[i]),
                                "contest": None if contest is None else int(contest[i]),
                                "reason": why, "record": rec})


def _as_count(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(values as int64, valid mask) for a count column that should hold non-negative integers."""
    column = table[name].combine_chunks() if isinstance(table[name], pa.ChunkedArray) else table[name]
    if pa.types.is_integer(column.type):
        valid = np.asarray(pc.fill_null(pc.greater_equal(column, 0), False))
        return np.asarray(pc.fill_null(column, 0).cast(pa.int64())), valid
    as_text = pc.utf8_trim_whitespace(column.cast(pa.string()))
    valid = np.asarray(pc.fill_null(pc.match_substring_regex(as_text, r"^\d+(\.0*)?$"), False))
    cleaned = pc.if_else(pa.array(valid), as_text, "0")
    values = pc.cast(pc.cast(cleaned, pa.float64()), pa.int64())
    return np.asarray(values), valid


def _as_float(table: pa.Table, name: str) -> np.ndarray:
    """A column that should hold numbers as float64: NaN where a value is missing or not a number."""
    column = table[name].combine_chunks() if isinstance(table[name], pa.ChunkedArray) else table[name]
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
        as_text = pc.utf8_trim_whitespace(column.cast(pa.string()))
        number = pc.fill_null(pc.match_substring_regex(as_text, r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"), False)
        column = pc.if_else(number, as_text, pa.scalar(None, pa.string()))
    return np.asarray(pc.fill_null(pc.cast(column, pa.float64()), np.nan))


def _resolve_contest(table: pa.Table, path: str, read: FileRead) -> np.ndarray:
    """One contest id per row. Rule (documented in the README):
    - a contest column with several values: each row's own value (a multi-contest file);
    - a single value that differs from the number the file name starts with: the file name wins
      (NEXT's 688 file says 689 in its column; its captions are 688's), reported as a warning;
    - no column: the number the file name starts with."""
    from_name = contest_from_name(path)
    n = table.num_rows
    if "contest" in table.column_names:
        values, valid = _as_count(table, "contest")
        distinct = np.unique(values[valid]) if valid.any() else np.array([], dtype=np.int64)
        if len(distinct) > 1:
            if not valid.all():
                _quarantine_rows(read, table, ~valid, "contest is missing or not a number", path)
            return np.where(valid, values, -1)
        if len(distinct) == 1 and from_name is not None and distinct[0] != from_name:
            read.warnings.append(f"{path}: contest column says {distinct[0]} but the file name says "
                                 f"{from_name}; using {from_name}")
            read.stats["contest_mismatch"] = {"column": int(distinct[0]), "name": from_name}
            return np.full(n, from_name, dtype=np.int64)
        if len(distinct) == 1:
            return np.full(n, distinct[0], dtype=np.int64)
    if from_name is None:
        raise InputFileError(f"{path}: no contest id: the file has no contest column and its name "
                             "does not start with the contest number")
    return np.full(n, from_name, dtype=np.int64)


def _clean_captions(raw: pa.Array, read: FileRead) -> pa.Array:
    captions, counts = text.clean(pc.fill_null(raw.cast(pa.string()), ""))
    read.stats["scrubbed"] = counts
    return captions


def _read_summary(table: pa.Table, path: str, read: FileRead) -> None:
    n = table.num_rows
    contest = _resolve_contest(table, path, read)
    # Row problems as codes into `reasons` (0 = fine); the first problem found names the row.
    reasons = [""]
    problem = np.zeros(n, dtype=np.int16)

    def flag(mask: np.ndarray, reason: str) -> None:
        reasons.append(reason)
        problem[mask & (problem == 0)] = len(reasons) - 1

    counts = {}
    for name in COUNT_COLUMNS:
        counts[name], valid = _as_count(table, name)
        flag(~valid, f"{name} is missing or not a non-negative integer")
    votes = counts["funny"] + counts["somewhat_funny"] + counts["unfunny"]
    if "votes" in table.column_names:
        given, valid = _as_count(table, "votes")
        flag(valid & (given != votes), "votes does not equal funny + somewhat_funny + unfunny")
    if "mean" in table.column_names and n:
        given = _as_float(table, "mean")
        recomputed = (counts["unfunny"] + 2 * counts["somewhat_funny"] + 3 * counts["funny"]) / np.maximum(votes, 1)
        read.stats["means_off"] = int(np.sum(np.abs(given - recomputed) > 1e-6))
    if "rank" in table.column_names and n:
        ranks, valid = _as_count(table, "rank")
        read.stats["rank_base"] = int(ranks[valid].min()) if valid.any() else None

    captions = _clean_captions(table["caption"].combine_chunks(), read)
    flag(np.asarray(pc.equal(pc.utf8_length(captions), 0)), "empty caption")
    flag(votes == 0, "no votes")
    flag(contest < 0, "contest is missing or not a number")
    # NEXT produced rows like 923 funny / 1 somewhat / 0 unfunny: no real crowd agrees like that.
    flag((votes >= 100) & ((counts["somewhat_funny"] + counts["unfunny"]) < 0.01 * votes),
         "implausible counts: over 99% of 100+ votes are 'funny'")

    bad = problem > 0
    if bad.any():
        _quarantine_rows(read, table, bad, np.asarray(reasons, dtype=object)[problem], path, contest)
    caption_id = (table["caption_id"].cast(pa.string()) if "caption_id" in table.column_names
                  else pa.nulls(n, pa.string()))
    read.captions = pa.table({
        "contest": pa.array(contest, pa.int32()), "caption": captions, "caption_id": caption_id,
        "funny": counts["funny"], "somewhat_funny": counts["somewhat_funny"], "unfunny": counts["unfunny"],
        "source": pa.repeat(pa.scalar(path, pa.string()), n),
        "row": pa.array(read.record_numbers),
    }, schema=CAPTIONS_SCHEMA)
    if bad.any():
        read.captions = read.captions.filter(pa.array(~bad))


def _checked_integers(table: pa.Table, name: str, low: int, high: int | None) -> tuple[pa.Array, np.ndarray | None]:
    """(the column as int64, mask of valid rows or None when every row is valid). The common case,
    a clean integer column, is settled by one min/max pass instead of building masks."""
    column = table[name]
    if pa.types.is_integer(column.type) and column.null_count == 0 and len(column):
        bounds = pc.min_max(column)
        if bounds["min"].as_py() >= low and (high is None or bounds["max"].as_py() <= high):
            return column, None
    values, valid = _as_count(table, name)
    valid &= (values >= low) & ((values <= high) if high is not None else True)
    return pa.array(values), valid


def _read_votes(table: pa.Table, path: str, read: FileRead) -> None:
    """Aggregate rating events to per-caption counts with hash aggregations, no Python loop."""
    n = table.num_rows
    has_text = "caption" in table.column_names
    key_name = "caption" if has_text else "caption_id"
    keys = ["contest", key_name] + (["caption_id"] if has_text and "caption_id" in table.column_names else [])
    contest, valid_contest = _checked_integers(table, "contest", 0, None)
    rating, valid_rating = _checked_integers(table, "rating", 1, 3)
    key_missing = table[key_name].null_count > 0
    events = pa.table({"contest": contest.cast(pa.int32()), **{k: table[k] for k in keys[1:]},
                       "rating": rating.cast(pa.int8())})
    if valid_contest is not None or valid_rating is not None or key_missing:
        ok_contest = np.ones(n, bool) if valid_contest is None else valid_contest
        ok_rating = np.ones(n, bool) if valid_rating is None else valid_rating
        ok_key = np.asarray(pc.is_valid(table[key_name]))
        bad = ~(ok_contest & ok_rating & ok_key)
        reason = np.where(~ok_contest, "contest is missing or not a number",
                          np.where(~ok_rating, "rating is not 1, 2 or 3", f"{key_name} is missing"))
        _quarantine_rows(read, table, bad, reason, path, np.asarray(contest))
        events = events.filter(pa.array(~bad))
    per_rating = events.group_by(keys + ["rating"]).aggregate([([], "count_all")])
    # Few rows now (captions x 3): pivot the three ratings into columns.
    for value, name in ((3, "funny"), (2, "somewhat_funny"), (1, "unfunny")):
        per_rating = per_rating.append_column(
            name, pc.if_else(pc.equal(per_rating["rating"], value), per_rating["count_all"], 0))
    merged = per_rating.group_by(keys).aggregate([(name, "sum") for name in COUNT_COLUMNS])
    merged = merged.rename_columns([n.removesuffix("_sum") for n in merged.column_names])
    merged = merged.sort_by([(k, "ascending") for k in keys])  # hash order is not reproducible
    m = merged.num_rows
    caption = (_clean_captions(merged["caption"].combine_chunks(), read) if has_text
               else pa.nulls(m, pa.string()))
    caption_id = (merged["caption_id"].cast(pa.string()) if "caption_id" in merged.column_names
                  else pa.nulls(m, pa.string()))
    read.captions = pa.table({
        "contest": merged["contest"], "caption": caption, "caption_id": caption_id,
        **{name: merged[name].cast(pa.int64()) for name in COUNT_COLUMNS},
        "source": pa.repeat(pa.scalar(path, pa.string()), m),
        "row": pa.nulls(m, pa.int64()),
    }, schema=CAPTIONS_SCHEMA)
    read.stats["vote_rows"] = n


def _read_lookup(table: pa.Table, path: str, read: FileRead) -> None:
    contest, valid = _as_count(table, "contest")
    caption_id = table["caption_id"].cast(pa.string())
    valid &= np.asarray(pc.is_valid(caption_id))
    if (~valid).any():
        _quarantine_rows(read, table, ~valid, "contest or caption_id is missing", path, contest)
    lookup = pa.table({"contest": pa.array(contest, pa.int32()), "caption_id": caption_id,
                       "caption": _clean_captions(table["caption"].combine_chunks(), read)},
                      schema=LOOKUP_SCHEMA)
    read.lookup = lookup.filter(pa.array(valid))


def read_file(fs: pafs.FileSystem, path: str) -> FileRead:
    """Read one input file into canonical rows; raises InputFileError when nothing in it is usable."""
    quarantine: list[dict] = []
    stats: dict = {}
    table = _canonical_names(_read_raw_table(fs, path, quarantine, stats), path)
    kind = classify(table.column_names, path)
    if table.num_rows == 0 and not quarantine:
        raise InputFileError(f"{path}: no rows: the file has its column names and nothing under them")
    read = FileRead(kind=kind, quarantine=quarantine, stats=stats,
                    record_numbers=_record_numbers(table.num_rows, [q["row"] for q in quarantine if q["row"]]))
    read.stats["rows"] = table.num_rows
    if stats.get("not_utf8_lines"):
        read.warnings.append(f"{path}: {stats['not_utf8_lines']} lines are not valid UTF-8; their text was "
                             "decoded as cp1252 (latin-1 for bytes cp1252 lacks) and their rows kept")
    try:
        {"summary": _read_summary, "votes": _read_votes, "captions": _read_lookup}[kind](table, path, read)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as err:
        # Values no check above foresaw: this file is reported and skipped, the other files still count.
        raise InputFileError(f"{path}: cannot read its {kind} rows: {err}") from None
    return read
