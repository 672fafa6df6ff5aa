"""`humor-ray data build`: rating files -> validated, scrubbed, split datasets (a Ray Data program).

Two streaming passes, each a Ray Data `map` whose unit of work is small and independent:
1. per input file: parse, validate, scrub, aggregate raw votes; stage the canonical rows per contest
   (`_staging/`) and return the facts the planner needs (counts, a caption fingerprint);
2. per contest: combine its staged parts, rank, and write every dataset for that contest.
Between them the driver looks at all files at once, which is where cross-file problems show:
corrupted vote counts and files whose captions belong to another contest.
Memory stays bounded by the largest single file or contest, however many there are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import hashlib
import json
import time
from collections import Counter, defaultdict
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from humor_ray.config import ConfigError, Options, UserError, field
from humor_ray.data import prompts, readers, text
from humor_ray.data.outputs import written_aside
from humor_ray.data.pairs import sample_pairs
from humor_ray.log import get_logger, redact
from humor_ray.metrics import StageMetrics

log = get_logger("data build")

SPLITS = ("train", "eval")
BUILDABLE = ("captions", "pairs", "sft", "sft_simple", "prompts", "llava_sft", "references")
DATASETS = (*BUILDABLE, "quarantine")
REFERENCE_GROUPS = {"top10": 0, "rank200": 199, "rank1000": 999}  # first 0-based position of each group
GROUP_SIZE = 10
MIN_VOTES_FOR_CORRUPTION_CHECK = 10_000


@dataclasses.dataclass
class BuildConfig(Options):
    """Build the training and evaluation datasets from contest rating files."""
    input: str = field(None, "directory, glob or URI (s3://...) of rating files (CSV or Parquet)",
                       required=True)
    output: str = field(None, "output directory or URI", required=True)
    splits: str | None = field(None, "JSON with train/validation/test contest lists (the paper's split)",
                               existing=True)
    descriptions: list[str] = field([], "CSV files with contest,scene,description,uncanny_description,entities",
                                  existing=True)
    images: str | None = field(None, "directory of <contest>.jpg|png cartoon images", existing=True)
    seed: int = field(2024, "seed for every sample drawn", minimum=0)
    max_pairs_per_contest: int = field(1000, "distinct preference pairs per contest, at most", minimum=1)
    sigma: float = field(3.0, "keep a pair when mean_c - mean_r > sigma * sqrt(se_c^2 + se_r^2)",
                         minimum=0)
    sft_per_contest: int = field(1000, "captions sampled uniformly per contest for SFT", minimum=1)
    llava_per_contest: int = field(1000, "top captions per contest for the LLaVA dataset", minimum=1)
    eval_fraction: float = field(0.25, "share of contests held out when the splits file does not list them",
                                 minimum=0, maximum=1)
    exclude: list[str] = field([], "file names or glob patterns to leave out (e.g. 560_KLUCB_original.csv)")
    combine: str = field("sum", "several files of one contest: 'sum' their vote counts per caption "
                                "(NEXT files of one contest are disjoint vote pools) or keep the 'largest'",
                         choices=("sum", "largest"))
    corrupt_unfunny_share: float = field(0.98, "a file whose votes are more 'unfunny' than this is corrupted",
                                         minimum=0, maximum=1)
    duplicate_overlap: float = field(0.5, "a file sharing this share of captions with an earlier contest's "
                                          "file holds that contest's captions", minimum=0, maximum=1)
    strict: bool = field(False, "exit non-zero when anything was quarantined")
    datasets: list[str] = field(list(BUILDABLE), "which datasets to write (default: all)", choices=BUILDABLE)
    overwrite: bool = field(False, "replace --output even when it holds files that are not an earlier build")

    def __post_init__(self):
        if not self.input or not self.output:
            raise ConfigError("data build needs --input and --output")
        super().__post_init__()


class BuildError(UserError):
    """Nothing usable came out of the input (or --strict and something was rejected)."""



# ---------------------------------------------------------------- output filesystem helpers

def _join(root: str, *parts) -> str:
    return "/".join([root.rstrip("/"), *map(str, parts)])


# Columns that repeat one value per contest; dictionary-encoding unique text only costs time.
_REPEATED = {"contest", "prompt", "prompt_long", "image", "split", "group", "source", "reason"}


# Free text: min/max statistics of captions help no reader and cost a string comparison per row.
_FREE_TEXT = {"caption", "completion", "text", "chosen", "rejected", "prompt_long", "record"}


def _write(table: pa.Table, fs: pafs.FileSystem, path: str) -> None:
    fs.create_dir(str(PurePosixPath(path).parent), recursive=True)
    pq.write_table(table, path, filesystem=fs, compression="zstd", compression_level=1,
                   use_dictionary=[c for c in table.column_names if c in _REPEATED],
                   write_statistics=[c for c in table.column_names if c not in _FREE_TEXT])


def _stage(table: pa.Table, fs: pafs.FileSystem, path: str) -> None:
    """Intermediate rows between the passes: uncompressed Arrow IPC, written and read at memory speed."""
    fs.create_dir(str(PurePosixPath(path).parent), recursive=True)
    with fs.open_output_stream(path) as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def _read_staged(fs: pafs.FileSystem, path: str) -> pa.Table:
    with fs.open_input_file(path) as source:
        return pa.ipc.open_file(source).read_all()


def _quarantine_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=readers.QUARANTINE_SCHEMA)


# ---------------------------------------------------------------- pass 1: one input file

def _fingerprint(captions: pa.Array) -> list[int]:
    """Hashes of a sample of the captions: those whose key is a non-empty multiple of 8 bytes long,
    so every file samples the same captions and only an eighth of them is hashed."""
    keys = text.caption_key(captions)
    lengths = pc.binary_length(keys)
    sample = keys.filter(pc.and_(pc.equal(pc.bit_wise_and(lengths, 7), 0), pc.greater(lengths, 0)))
    return np.unique(_hash_words(sample)).tolist()


def _hash_words(strings: pa.Array) -> np.ndarray:
    """A 63-bit hash of each string whose length is a multiple of 8, for the whole array at once:
    the strings are read as 8-byte words, each word is mixed with its position, and the mixed
    words of a string are summed."""
    if not len(strings):
        return np.array([], np.int64)
    offsets = np.frombuffer(strings.buffers()[1], np.int32)[strings.offset:strings.offset + len(strings) + 1]
    data = np.frombuffer(strings.buffers()[2], np.uint8)[offsets[0]:offsets[-1]]
    words = np.frombuffer(data.tobytes(), np.uint64)
    word_starts = (offsets[:-1] - offsets[0]) // 8
    position = np.arange(len(words), dtype=np.uint64) - np.repeat(word_starts, np.diff(offsets) // 8).astype(np.uint64)
    x = words ^ (position * np.uint64(0x9E3779B97F4A7C15))
    # splitmix64's finaliser: every input bit moves about half of the output bits.
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return (np.add.reduceat(x, word_starts) >> np.uint64(1)).astype(np.int64)


def stage_file(item: dict, output: str) -> dict:
    """Read one file, stage its rows per contest, and return a JSON summary for the planner."""
    fs, root = readers.open_filesystem(output)
    in_fs, _ = readers.open_filesystem(item["uri"])
    path, index = item["path"], item["index"]
    result = {"index": index, "path": path, "error": None, "groups": [], "warnings": [], "stats": {}}
    try:
        read = readers.read_file(in_fs, path)
    except readers.InputFileError as err:
        result["error"] = str(err)
        return result
    result.update(kind=read.kind, warnings=read.warnings, stats=read.stats,
                  quarantined=dict(Counter(q["reason"] for q in read.quarantine)))
    if read.quarantine:
        _write(_quarantine_table(read.quarantine), fs, _join(root, "quarantine", f"rows-{index:06d}.parquet"))
    table, suffix = (read.captions, "") if read.captions is not None else (read.lookup, ".lookup")
    contests = table["contest"].to_numpy()
    distinct = np.unique(contests)
    for contest in distinct:
        # Most files hold one contest: their rows need no copy.
        part = table if len(distinct) == 1 else table.filter(pa.array(contests == contest))
        staged = _join(root, "_staging", f"{int(contest):06d}", f"{index:06d}{suffix}.arrow")
        _stage(part, fs, staged)
        group = {"contest": int(contest), "staged": staged, "lookup": bool(suffix), "rows": part.num_rows}
        if not suffix:
            sums = {name: int(pc.sum(part[name]).as_py() or 0) for name in readers.COUNT_COLUMNS}
            group.update(sums, votes=sum(sums.values()))
            if pc.any(pc.is_valid(part["caption"])).as_py():
                group["fingerprint"] = _fingerprint(part["caption"].combine_chunks().drop_null())
        result["groups"].append(group)
    return result


# ---------------------------------------------------------------- between passes: the planner

def _find_foreign_captions(groups: list[dict], min_overlap: float) -> dict[int, str]:
    """Groups (by position in `groups`) whose captions are mostly another, earlier contest's."""
    sizes = [len(g.get("fingerprint", ())) for g in groups]
    hashes = np.concatenate([np.zeros(0, np.int64), *(np.asarray(g.get("fingerprint", ()), np.int64) for g in groups)])
    owners = np.repeat(np.arange(len(groups)), sizes)
    order = np.argsort(hashes, kind="stable")
    hashes, owners = hashes[order], owners[order]
    run_starts = np.flatnonzero(np.r_[True, hashes[1:] != hashes[:-1]])
    run_lengths = np.diff(np.r_[run_starts, len(hashes)])
    shared = Counter()
    # A caption in dozens of files is a stock phrase, not a copy.
    for start, length in zip(run_starts.tolist(), run_lengths.tolist()):
        if 1 < length <= 50:
            members = owners[start:start + length].tolist()
            for a in members:
                for b in members:
                    if groups[a]["contest"] < groups[b]["contest"]:
                        shared[(a, b)] += 1
    foreign = {}
    for (a, b), count in sorted(shared.items()):
        size = min(len(groups[a]["fingerprint"]), len(groups[b]["fingerprint"]))
        if size >= 20 and count / size >= min_overlap and b not in foreign:
            foreign[b] = (f"captions are contest {groups[a]['contest']}'s ({count / size:.0%} of sampled "
                          f"captions shared with {PurePosixPath(groups[a]['path']).name}); "
                          f"contest {groups[b]['contest']}'s own ratings are not in this file")
    return foreign


def _load_contexts(paths: list[str]) -> dict[int, dict]:
    """Cartoon context per contest; an earlier file's non-empty field wins over a later one's."""
    import pyarrow.csv as pacsv

    contexts: dict[int, dict] = {}
    for path in paths:
        try:
            table = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(newlines_in_values=True))
        except (pa.ArrowInvalid, OSError) as err:
            raise BuildError(f"{path}: cannot read descriptions: {err}") from None
        if "contest" not in table.column_names:
            raise BuildError(f"{path}: descriptions need a 'contest' column, found {table.column_names}")
        fields = [k for k, _ in prompts.CONTEXT_FIELDS if k in table.column_names]
        if not fields:
            raise BuildError(f"{path}: no context columns; expected any of "
                             f"{[k for k, _ in prompts.CONTEXT_FIELDS]}")
        for row in table.select(["contest", *fields]).to_pylist():
            if row["contest"] is None:
                continue
            context = contexts.setdefault(int(row["contest"]), {})
            for key in fields:
                if row[key] is not None and str(row[key]).strip() and not context.get(key):
                    context[key] = " ".join(str(row[key]).split())
    return contexts


def _load_splits(path: str | None) -> dict[int, str]:
    if not path:
        return {}
    try:
        with open(path) as handle:
            data = json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise BuildError(f"{path}: cannot read splits: {err}") from None
    splits = {}
    for name, split in (("train", "train"), ("validation", "eval"), ("test", "eval")):
        for contest in data.get(name, []):
            splits[int(contest)] = split
    if not splits:
        raise BuildError(f"{path}: no 'train', 'validation' or 'test' lists")
    return splits


def hash_split(contest: int, eval_fraction: float) -> str:
    """Stable split for contests no splits file lists: the same contest always lands on the same side."""
    bucket = int(hashlib.sha256(f"contest-{contest}".encode()).hexdigest()[:8], 16) % 10_000
    return "eval" if bucket < eval_fraction * 10_000 else "train"


def _find_images(images: str | None, warnings: list[str]) -> dict[int, str]:
    """Image file name per contest. Byte-identical images of two contests (NEXT's 607.jpg is 605's
    cartoon) stay with the earlier contest; the later one gets none, with a warning."""
    if not images:
        return {}
    fs, root = readers.open_filesystem(images)
    found, owner_of_digest = {}, {}
    entries = sorted(fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)), key=lambda e: e.path)
    for entry in entries:
        name = PurePosixPath(entry.path).name
        contest = readers.contest_from_name(name)
        if contest is None or not name.lower().endswith((".jpg", ".jpeg", ".png")) or contest in found:
            continue
        with fs.open_input_stream(entry.path) as handle:
            digest = hashlib.sha256(handle.read()).hexdigest()
        if digest in owner_of_digest:
            warnings.append(f"{entry.path}: identical to contest {owner_of_digest[digest]}'s image; "
                            f"contest {contest} gets no image")
            continue
        owner_of_digest[digest] = contest
        found[contest] = name
    return dict(sorted(found.items()))


# ---------------------------------------------------------------- pass 2: one contest

MERGED_COLUMNS = ["key", "caption", "funny", "somewhat_funny", "unfunny"]


def _combine(parts: list[pa.Table], lookups: list[pa.Table], contest: int) -> tuple[pa.Table, list[dict], int]:
    """All staged rows of a contest -> one row per distinct caption (counts summed)."""
    captions = pa.concat_tables(parts)
    quarantine = []
    missing = pc.is_null(captions["caption"])
    if pc.any(missing).as_py():
        lookup = (pa.concat_tables(lookups).group_by("caption_id", use_threads=False)
                  .aggregate([("caption", "first")]).rename_columns(["caption_id", "lookup_caption"])
                  if lookups else pa.table({"caption_id": pa.array([], pa.string()),
                                            "lookup_caption": pa.array([], pa.string())}))
        joined = captions.join(lookup, "caption_id", join_type="left outer")
        joined = joined.set_column(joined.schema.get_field_index("caption"), "caption",
                                   pc.coalesce(joined["caption"], joined["lookup_caption"])).drop(["lookup_caption"])
        orphan = pc.is_null(joined["caption"])
        for row in joined.filter(orphan).to_pylist():
            quarantine.append({"source": row["source"], "row": row["row"], "contest": contest,
                               "reason": f"caption_id {row['caption_id']} has no text in any captions file",
                               "record": json.dumps(row, default=str)})
        captions = joined.filter(pc.invert(orphan))
    keyed = captions.append_column("key", text.caption_key(captions["caption"]))
    # Most captions occur once: only the keys seen twice or more go through the sort and group-by.
    codes = pc.dictionary_encode(keyed["key"]).combine_chunks().indices.to_numpy()
    repeated = np.bincount(codes)[codes] > 1
    if not repeated.any():
        return keyed.select(MERGED_COLUMNS), quarantine, 0
    single, multiple = keyed.filter(pa.array(~repeated)), keyed.filter(pa.array(repeated))
    votes = pc.add(pc.add(multiple["funny"], multiple["somewhat_funny"]), multiple["unfunny"])
    # The spelling with the most votes names a caption submitted several times.
    multiple = multiple.append_column("votes", votes).sort_by(
        [("key", "ascending"), ("votes", "descending"), ("caption", "ascending")])
    merged = multiple.group_by("key", use_threads=False).aggregate([
        ("caption", "first"), ("funny", "sum"), ("somewhat_funny", "sum"), ("unfunny", "sum")])
    merged = merged.rename_columns([n.removesuffix("_first").removesuffix("_sum") for n in merged.column_names])
    merged = pa.concat_tables([single.select(MERGED_COLUMNS), merged.select(MERGED_COLUMNS)])
    return merged, quarantine, keyed.num_rows - merged.num_rows


def rank_captions(table: pa.Table) -> pa.Table:
    """Means and standard errors from the counts, sorted best first.

    mean = (1*unfunny + 2*somewhat + 3*funny) / n; se = max(sd/sqrt(n), 1/sqrt(n(n-1))) with the sample
    sd (ddof=1), as NEXT computes `precision`; se is NaN for a single vote (no pair can use it)."""
    f = table["funny"].to_numpy().astype(np.float64)
    s = table["somewhat_funny"].to_numpy().astype(np.float64)
    u = table["unfunny"].to_numpy().astype(np.float64)
    n = f + s + u
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = (u + 2 * s + 3 * f) / n
        variance = (u + 4 * s + 9 * f - n * mean ** 2) / (n - 1)
        se = np.maximum(np.sqrt(np.maximum(variance, 0) / n), 1 / np.sqrt(n * (n - 1)))
    se[n < 2] = np.nan
    table = table.drop(["key"]).append_column("votes", pa.array(n.astype(np.int64))) \
        .append_column("mean", pa.array(mean)).append_column("se", pa.array(se))
    table = table.sort_by([("mean", "descending"), ("votes", "descending"), ("caption", "ascending")])
    ordered_mean = table["mean"].to_numpy()
    # Competition ranking: equal means share the better rank, as in the NEXT files.
    rank = np.searchsorted(-ordered_mean, -ordered_mean, side="left") + 1
    return table.append_column("rank", pa.array(rank.astype(np.int64))) \
        .append_column("caption_id", pa.array(np.arange(1, table.num_rows + 1, dtype=np.int64)))


def _text_rows(contest: int, prompt: str, captions: pa.Array) -> pa.Table:
    k = len(captions)
    prompt_column = pa.repeat(pa.scalar(prompt, pa.string()), k)
    return pa.table({"contest": pa.repeat(pa.scalar(contest, pa.int32()), k), "prompt": prompt_column,
                     "completion": captions,
                     "text": pc.binary_join_element_wise(prompt_column, captions, " ")})


class _DatasetWriter:
    """Buffers each (dataset, split) across contests and writes it in files of about FLUSH_BYTES:
    a Parquet file per contest would cost about twice the CPU for the same rows. A file is named
    after its first contest, so a rebuild from the same input writes the same files."""
    FLUSH_BYTES = 64 << 20

    def __init__(self, fs: pafs.FileSystem, root: str):
        self.fs, self.root = fs, root
        self.buffers: dict[tuple[str, str], list[tuple[int, pa.Table]]] = defaultdict(list)
        # Kept as a running total: summing `nbytes` over a growing buffer at every add cost a second.
        self.buffered_bytes: Counter = Counter()

    def add(self, dataset: str, split: str, contest: int, table: pa.Table) -> None:
        self.buffers[(dataset, split)].append((contest, table))
        self.buffered_bytes[(dataset, split)] += table.nbytes
        if self.buffered_bytes[(dataset, split)] >= self.FLUSH_BYTES:
            self.flush(dataset, split)

    def flush(self, dataset: str, split: str) -> None:
        self.buffered_bytes.pop((dataset, split), None)
        parts = self.buffers.pop((dataset, split), [])
        if parts:
            _write(pa.concat_tables([table for _, table in parts]), self.fs,
                   _join(self.root, dataset, split, f"part-{parts[0][0]:06d}.parquet"))

    def close(self) -> None:
        for dataset, split in sorted(self.buffers):
            self.flush(dataset, split)


def build_contests(plans: list[dict], cfg: dict, run: str) -> list[dict]:
    """Every dataset for a group of contests, written under the output root; counts as JSON."""
    fs, root = readers.open_filesystem(cfg["output"])
    writer = _DatasetWriter(fs, root)
    by_contest = {plan["contest"]: build_contest(plan, cfg, fs, root, writer)
                  for plan in sorted(plans, key=lambda p: p["contest"])}
    writer.close()
    results = [by_contest[plan["contest"]] for plan in plans]
    figures = _metrics(run)
    for result in results:
        figures.count("data_contests_built", 1, "contests whose datasets were written", split=result["split"])
        _count_quarantined(figures, result)
        for dataset, rows in result["counts"].items():
            figures.count("data_rows_written", rows, "dataset rows written", dataset=dataset, split=result["split"])
    return results


def _run_name(output: str) -> str:
    """A build's name in its figures: its output folder's name."""
    return PurePosixPath(output.split("?", 1)[0].rstrip("/")).name or output


def _metrics(run: str) -> StageMetrics:
    return StageMetrics(run, "data_build")


def _count_quarantined(figures: StageMetrics, result: dict) -> None:
    for reason, rows in result.get("quarantined", {}).items():
        figures.count("data_rows_quarantined", rows, "rows quarantined, by reason", reason=reason)


def build_contest(plan: dict, cfg: dict, fs: pafs.FileSystem, root: str, writer: _DatasetWriter) -> dict:
    """Every dataset row of one contest, handed to `writer`; returns counts as JSON."""
    contest, split = plan["contest"], plan["split"]
    parts = [_read_staged(fs, p) for p in plan["parts"]]
    lookups = [_read_staged(fs, p) for p in plan["lookups"]]
    merged, quarantine, duplicates = _combine(parts, lookups, contest)
    out = {"contest": contest, "split": split, "merged_same_text": duplicates,
           "quarantined": dict(Counter(q["reason"] for q in quarantine)),
           "counts": {}, "references": [], "prompt": None}
    if quarantine:
        _write(_quarantine_table(quarantine), fs, _join(root, "quarantine", f"contest-{contest:06d}.parquet"))
    ranked = rank_captions(merged)
    out["captions"], out["votes"] = ranked.num_rows, int(pc.sum(ranked["votes"]).as_py() or 0)
    if ranked.num_rows == 0:
        return out
    context = plan["context"]
    simple, long = prompts.simple_prompt(context), prompts.long_prompt(context)
    out["prompt"] = {"contest": contest, "prompt": simple, "prompt_long": long, "image": plan["image"],
                     "has_context": bool(prompts.context_lines(context))}
    wanted = set(cfg["datasets"])
    tables = {}
    if "captions" in wanted:
        tables["captions"] = _captions_table(contest, split, ranked)
    if wanted & {"sft", "sft_simple"}:
        tables.update({d: t for d, t in _sft_tables(contest, ranked, cfg, simple, long).items() if d in wanted})
    if "pairs" in wanted:
        tables["pairs"] = _pairs_table(contest, ranked, cfg, simple)
    if plan["image"] and "llava_sft" in wanted:
        tables["llava_sft"] = _llava_table(contest, ranked, cfg, plan["image"])
    for dataset, table in tables.items():
        out["counts"][dataset] = table.num_rows
        if table.num_rows:
            writer.add(dataset, split, contest, table)
    if split == "eval" and "references" in wanted:
        out["references"], missing = _reference_rows(contest, ranked)
        if missing:
            out["missing_groups"] = missing
    return out


def _captions_table(contest: int, split: str, ranked: pa.Table) -> pa.Table:
    n = ranked.num_rows
    return pa.table({
        "contest": pa.repeat(pa.scalar(contest, pa.int32()), n), "caption_id": ranked["caption_id"],
        "caption": ranked["caption"], "funny": ranked["funny"], "somewhat_funny": ranked["somewhat_funny"],
        "unfunny": ranked["unfunny"], "votes": ranked["votes"], "mean": ranked["mean"], "se": ranked["se"],
        "rank": ranked["rank"], "split": pa.repeat(pa.scalar(split, pa.string()), n)})


# Separate random streams per dataset (the last seed word): changing one sample size never changes another dataset.

def _sft_tables(contest: int, ranked: pa.Table, cfg: dict, simple: str, long: str) -> dict[str, pa.Table]:
    """The same uniformly sampled captions, after the long prompt (sft) and the simple one (sft_simple)."""
    n = ranked.num_rows
    pick = np.random.default_rng([cfg["seed"], contest, 0]).choice(n, size=min(n, cfg["sft_per_contest"]),
                                                                    replace=False)
    sampled = ranked["caption"].take(pa.array(pick))
    return {"sft": _text_rows(contest, long, sampled), "sft_simple": _text_rows(contest, simple, sampled)}


def _pairs_table(contest: int, ranked: pa.Table, cfg: dict, simple: str) -> pa.Table:
    mean, se = ranked["mean"].to_numpy(), ranked["se"].to_numpy()
    chosen, rejected = sample_pairs(mean, se, cfg["max_pairs_per_contest"], cfg["sigma"],
                                    np.random.default_rng([cfg["seed"], contest, 1]))
    k = len(chosen)
    return pa.table({
        "contest": pa.repeat(pa.scalar(contest, pa.int32()), k),
        "prompt": pa.repeat(pa.scalar(simple, pa.string()), k),
        "chosen": ranked["caption"].take(pa.array(chosen)),
        "rejected": ranked["caption"].take(pa.array(rejected)),
        "chosen_mean": pa.array(mean[chosen]), "rejected_mean": pa.array(mean[rejected]),
        "chosen_se": pa.array(se[chosen]), "rejected_se": pa.array(se[rejected])})


def _llava_table(contest: int, ranked: pa.Table, cfg: dict, image: str) -> pa.Table:
    top = min(ranked.num_rows, cfg["llava_per_contest"])
    return pa.table({
        "contest": pa.repeat(pa.scalar(contest, pa.int32()), top),
        "image": pa.repeat(pa.scalar(image, pa.string()), top),
        "prompt": pa.repeat(pa.scalar(prompts.image_prompt(), pa.string()), top),
        "caption": ranked["caption"].slice(0, top), "rank": ranked["rank"].slice(0, top)})


def _reference_rows(contest: int, ranked: pa.Table) -> tuple[list[dict], list[str]]:
    """The human reference groups of an evaluation contest, and the groups it has too few captions for."""
    n, mean = ranked.num_rows, ranked["mean"].to_numpy()
    rows, missing = [], []
    for group, start in dict(REFERENCE_GROUPS, median=max(n // 2 - GROUP_SIZE // 2, 0)).items():
        if start + GROUP_SIZE <= n:
            captions = ranked["caption"].slice(start, GROUP_SIZE).to_pylist()
            rows += [{"contest": contest, "group": group, "rank": start + i + 1, "caption": caption,
                      "mean": float(mean[start + i])} for i, caption in enumerate(captions)]
        else:
            missing.append(group)
    return rows, missing


# ---------------------------------------------------------------- the driver

def _excluded(path: str, patterns: list[str]) -> bool:
    name = PurePosixPath(path).name
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(path, p) for p in patterns)


def _use_jemalloc() -> None:
    """Arrow's default allocator here, mimalloc, returns large blocks to the system and faults them
    in again: building a column of 1 MB took 8 ms instead of 0.7 ms, and pass 2 ran 1.6x longer.
    jemalloc keeps them; the system allocator is the fallback where pyarrow is built without it."""
    try:
        pool = pa.jemalloc_memory_pool()
    except NotImplementedError:
        pool = pa.system_memory_pool()
    pa.set_memory_pool(pool)


def _run_block(batch: dict, fn, kwargs: dict) -> dict:
    _use_jemalloc()
    # Items travel as JSON: their nested, ragged fields would not fit one Arrow schema.
    results = fn([json.loads(item) for item in batch["item"]], **kwargs)
    return {"key": batch["key"], "result": np.array([json.dumps(r) for r in results], dtype=object)}


def stage_files(items: list[dict], output: str, run: str) -> list[dict]:
    results = []
    figures = _metrics(run)
    for item in items:
        result = stage_file(item, output)
        # Counted as each file finishes: a rate over these is the build's rows read per second.
        figures.count("data_files", 1, "input files read, by outcome", outcome="error" if result["error"] else "read")
        figures.count("data_rows_read", result["stats"].get("rows", 0), "rows read from the input files")
        _count_quarantined(figures, result)
        results.append(result)
    return results


def _task_slots() -> int:
    """How many map tasks run at once: every CPU of a cluster, the cores of a laptop."""
    import ray

    from humor_ray.cluster import local_cores

    return local_cores() or int(ray.cluster_resources().get("CPU", 1))


def _warm_up_workers() -> None:
    """Start a worker process per task slot and import this module in it before the clock of pass 1
    runs: on a two-core laptop this start-up takes seconds and is not part of the work. The tasks
    wait a moment so that each lands on its own worker instead of one worker taking them all."""
    size = _task_slots()
    _ray_map([{}] * size, _wait_a_moment, [1] * size)


def _wait_a_moment(items: list[dict]) -> list[dict]:
    time.sleep(0.3)
    return items


def _ray_map(items: list[dict], fn, sizes: list[int], **kwargs) -> list[dict]:
    """Run `fn` (a list of items -> their results) over `items` as a streaming Ray Data job, one call
    per block; results come back in item order.

    Items are dealt largest first into two blocks per task slot: a task per item would cost more in
    scheduling than the work itself, and blocks of equal work keep every CPU busy."""
    import ray.data

    if not items:
        return []
    size = _task_slots()
    n_blocks = max(1, min(len(items), 2 * size))
    by_size = sorted(range(len(items)), key=lambda k: -sizes[k])
    order = [k for b in range(n_blocks) for k in by_size[b::n_blocks]]
    rows = [{"key": k, "item": json.dumps(items[k])} for k in order]
    with _all_slots_from_the_start():
        ds = ray.data.from_items(rows, override_num_blocks=n_blocks)
        results = ds.map_batches(_run_block, batch_size=None, batch_format="numpy",
                                 fn_kwargs={"fn": fn, "kwargs": kwargs},
                                 compute=ray.data.TaskPoolStrategy(size=min(size, n_blocks))).take_all()
    return [json.loads(r["result"]) for r in sorted(results, key=lambda r: r["key"])]


@contextlib.contextmanager
def _all_slots_from_the_start():
    """Ray Data keeps part of the CPUs in reserve for each operator: right for long pipelines of
    several operators, but a pass here lasts seconds and has one operator, so it ran one task at a
    time (`backpressured:tasks(ResourceBudget)`). Without the reserve every task slot starts at
    once; only for this pass."""
    import ray.data

    context = ray.data.DataContext.get_current()
    saved = context.op_resource_reservation_enabled
    context.op_resource_reservation_enabled = False
    try:
        yield
    finally:
        context.op_resource_reservation_enabled = saved


def run(cfg: BuildConfig) -> dict:
    """Build every dataset into a folder beside `--output` and put it in place once complete (see
    humor_ray/data/outputs.py): an interrupted build leaves the earlier datasets as they were."""
    with written_aside(cfg.output, "datasets", (*DATASETS, "_staging", "report.json"), cfg.overwrite) as work:
        report = _build(dataclasses.replace(cfg, output=work), final=cfg.output)
    _print_summary(report, cfg.output)
    if cfg.strict and (report["quarantined"]["rows"] or report["quarantined"]["files"]):
        raise BuildError(f"--strict: {report['quarantined']['rows']} rows and {report['quarantined']['files']} "
                         f"files were quarantined (see {_join(cfg.output, 'quarantine')})")
    return report


def _build(cfg: BuildConfig, final: str) -> dict:
    """The two passes, with the checks across files between them; writes under `cfg.output`."""
    from humor_ray.cluster import init_ray, local_cores

    started = time.perf_counter()
    run_name = _run_name(final)
    splits = _load_splits(cfg.splits)
    contexts = _load_contexts(cfg.descriptions)
    warnings: list[str] = []
    images = _find_images(cfg.images, warnings)
    in_fs, paths, excluded = _input_files(cfg)

    # Without Ray Train beside it, a local cluster needs a logical CPU per core and no more: Ray starts
    # a worker process per logical CPU, which took a second longer on a two-core laptop.
    init_ray(num_cpus=local_cores())
    _warm_up_workers()
    ray_ready = time.perf_counter()
    log.info(f"pass 1/2: reading {len(paths)} files ({len(excluded)} excluded)")
    uri_prefix = cfg.input if "://" in cfg.input else ""
    sizes = [info.size or 0 for info in in_fs.get_file_info(paths)]
    files = _ray_map([{"index": i, "path": p, "uri": uri_prefix or p} for i, p in enumerate(paths)],
                     stage_files, sizes, output=cfg.output, run=run_name)
    read_done = time.perf_counter()

    usable, quarantined_files = _usable_groups(cfg, files, warnings)
    plans = _plan_contests(cfg, files, usable, splits, contexts, images)
    log.info(f"pass 2/2: building datasets for {len(plans)} contests")
    sizes = [sum(g["votes"] for g in usable[p["contest"]]) for p in plans]
    built = _ray_map(plans, build_contests, sizes, cfg=dataclasses.asdict(cfg), run=run_name)
    build_done = time.perf_counter()
    _write_across_contests(cfg, built, quarantined_files)

    report = _report(dataclasses.replace(cfg, output=final), paths, excluded, files, built, quarantined_files,
                     warnings, splits)
    report["seconds"] = {"ray_start": round(ray_ready - started, 2), "read": round(read_done - ray_ready, 2),
                         "build": round(build_done - read_done, 2),
                         "total": round(time.perf_counter() - started, 2)}
    _export_figures(run_name, report, len(quarantined_files), read_done - ray_ready)
    out_fs, root = readers.open_filesystem(cfg.output)
    with out_fs.open_output_stream(_join(root, "report.json")) as handle:
        handle.write(redact(json.dumps(report, indent=2)).encode())
    return report


def _input_files(cfg: BuildConfig) -> tuple[pafs.FileSystem, list[str], list[str]]:
    """(filesystem, the rating files to read, those left out by --exclude); none to read is an error."""
    in_fs, paths = readers.list_input_files(cfg.input)
    excluded = [p for p in paths if _excluded(p, cfg.exclude)]
    paths = [p for p in paths if not _excluded(p, cfg.exclude)]
    if not paths:
        raise BuildError(f"{cfg.input}: no rating files (.csv, .csv.gz, .parquet) found"
                         + (f"; {len(excluded)} excluded by --exclude" if excluded else ""))
    return in_fs, paths, excluded


def _usable_groups(cfg: BuildConfig, files: list[dict], warnings: list[str]) -> tuple[dict, list[dict]]:
    """Between the passes, every file's summary at once: (contest -> its usable rating groups, the files and
    groups quarantined with the reason). Corrupted vote counts and captions of another contest show here."""
    quarantined_files = []
    for f in files:
        warnings += f["warnings"]
        if f["error"]:
            quarantined_files.append({"source": f["path"], "reason": f["error"]})
            log.warning(f"skipped: {f['error']}")
    groups = [dict(g, path=f["path"]) for f in files for g in f["groups"] if not g["lookup"]]
    rejected = {}
    for g_index, g in enumerate(groups):
        if g["votes"] >= MIN_VOTES_FOR_CORRUPTION_CHECK and g["unfunny"] > cfg.corrupt_unfunny_share * g["votes"]:
            rejected[g_index] = (f"corrupted vote counts: {g['unfunny'] / g['votes']:.2%} of {g['votes']:,} votes "
                                 f"are 'unfunny' and {g['funny']:,} 'funny' (a known NEXT bug)")
    for g_index, reason in _find_foreign_captions(groups, cfg.duplicate_overlap).items():
        rejected.setdefault(g_index, reason)
    for g_index, reason in sorted(rejected.items()):
        g = groups[g_index]
        quarantined_files.append({"source": g["path"], "reason": f"contest {g['contest']}: {reason}"})
        log.warning(f"skipped {PurePosixPath(g['path']).name}: contest {g['contest']}: {reason}")
    usable = defaultdict(list)
    for g_index, g in enumerate(groups):
        if g_index not in rejected:
            usable[g["contest"]].append(g)
    return usable, quarantined_files


def _plan_contests(cfg: BuildConfig, files: list[dict], usable: dict, splits: dict, contexts: dict,
                   images: dict) -> list[dict]:
    """What pass 2 builds for each contest: its staged parts (all, or the largest file's with
    --combine largest), caption lookups, split, context and image."""
    lookups = defaultdict(list)
    for f in files:
        for g in f["groups"]:
            if g["lookup"]:
                lookups[g["contest"]].append(g["staged"])
    plans = []
    for contest in sorted(usable):
        chosen = usable[contest]
        if cfg.combine == "largest":  # the file with most votes; ties go to the first by name
            chosen = [max(chosen, key=lambda g: (g["votes"], [-ord(c) for c in g["path"]]))]
        plans.append({"contest": contest, "parts": [g["staged"] for g in chosen],
                      "lookups": lookups.get(contest, []),
                      "split": splits.get(contest) or hash_split(contest, cfg.eval_fraction),
                      "context": contexts.get(contest, {}), "image": images.get(contest)})
    if not plans:
        raise BuildError("nothing usable remains: every file was rejected (see the messages above)")
    return plans


def _write_across_contests(cfg: BuildConfig, built: list[dict], quarantined_files: list[dict]) -> None:
    """The datasets of one file for every contest (prompts, references, quarantined files); the staging goes."""
    out_fs, root = readers.open_filesystem(cfg.output)
    by_split = {s: [b for b in built if b["split"] == s and b["captions"]] for s in SPLITS}
    for split, rows in by_split.items():
        prompt_rows = [b["prompt"] for b in rows]
        if prompt_rows and "prompts" in cfg.datasets:
            _write(pa.Table.from_pylist(prompt_rows), out_fs, _join(root, "prompts", split, "prompts.parquet"))
    references = [r for b in by_split["eval"] for r in b["references"]]
    if references:
        _write(pa.Table.from_pylist(references), out_fs, _join(root, "references", "eval", "references.parquet"))
    if quarantined_files:
        _write(pa.Table.from_pylist([dict(f, row=None, contest=None, record=None) for f in quarantined_files],
                                    schema=readers.QUARANTINE_SCHEMA),
               out_fs, _join(root, "quarantine", "files.parquet"))
    out_fs.delete_dir(_join(root, "_staging"))


def _export_figures(run_name: str, report: dict, files_quarantined: int, read_seconds: float) -> None:
    figures = _metrics(run_name)
    figures.gauge("data_rows_read_per_second", report["captions"]["rows_read"] / max(read_seconds, 1e-9),
                  "rows read per second in pass 1")
    figures.gauge("data_files_quarantined", files_quarantined, "input files left out, with the reason")
    for split, pairs in report["datasets"].get("pairs", {}).items():
        figures.gauge("data_pairs_written", pairs, "preference pairs written", split=split)


def _report(cfg, paths, excluded, files, built, quarantined_files, warnings, splits) -> dict:
    scrubbed, reasons, kinds = Counter(), Counter(), Counter()
    rows_read = means_off = not_utf8 = 0
    for f in files:
        scrubbed.update(f["stats"].get("scrubbed", {}))
        rows_read += f["stats"].get("rows", 0)
        means_off += f["stats"].get("means_off", 0)
        not_utf8 += f["stats"].get("not_utf8_lines", 0)
        kinds[f.get("kind", "unreadable")] += 1
    # Workers count the rows they quarantine; the files need not be read back.
    for result in [*files, *built]:
        reasons.update(result.get("quarantined", {}))
    datasets = {name: {s: sum(b["counts"].get(name, 0) for b in built if b["split"] == s) for s in SPLITS}
                for name in ("captions", "pairs", "sft", "sft_simple", "llava_sft")}
    datasets = {name: counts for name, counts in datasets.items() if name in cfg.datasets}
    with_ratings = [b for b in built if b["captions"]]
    if "prompts" in cfg.datasets:
        datasets["prompts"] = {s: sum(1 for b in with_ratings if b["split"] == s) for s in SPLITS}
    if "references" in cfg.datasets:
        datasets["references"] = {"eval": sum(len(b["references"]) for b in built)}
    eval_listed = sorted(c for c, s in splits.items() if s == "eval")
    rated = {b["contest"] for b in with_ratings}
    return {
        "input": cfg.input, "output": cfg.output, "seed": cfg.seed,
        "files": {"found": len(paths) + len(excluded), "excluded": [PurePosixPath(p).name for p in excluded],
                  "read": len(paths), "by_kind": dict(kinds), "quarantined": len(quarantined_files)},
        "contests": {"total": len(with_ratings),
                     "train": sum(1 for b in with_ratings if b["split"] == "train"),
                     "eval": sum(1 for b in with_ratings if b["split"] == "eval"),
                     "without_context": sorted(b["contest"] for b in with_ratings if not b["prompt"]["has_context"]),
                     "without_image": sorted(b["contest"] for b in with_ratings if not b["prompt"]["image"]),
                     "eval_listed_without_ratings": [c for c in eval_listed if c not in rated],
                     "missing_reference_groups": {str(b["contest"]): b["missing_groups"]
                                                  for b in built if b.get("missing_groups")}},
        "captions": {"rows_read": rows_read, "kept": sum(b["captions"] for b in built),
                     "merged_same_text": sum(b["merged_same_text"] for b in built),
                     "given_means_recomputed_differently": means_off,
                     "not_utf8_lines_decoded_as_cp1252": not_utf8},
        "votes": sum(b["votes"] for b in built),
        "votes_read": sum(g.get("votes", 0) for f in files for g in f["groups"]),
        "scrubbed": dict(scrubbed),
        "quarantined": {"rows": sum(reasons.values()), "files": len(quarantined_files),
                        "rows_by_reason": dict(reasons.most_common()), "file_reasons": quarantined_files},
        "warnings": warnings,
        "datasets": datasets,
    }


def _print_summary(report: dict, output: str) -> None:
    c = report["contests"]
    log.info(f"done in {report['seconds']['total']} s: {c['total']} contests ({c['train']} train, {c['eval']} eval), "
             f"{report['captions']['kept']:,} captions, {report['votes']:,} votes")
    log.info("; ".join(f"{name} " + " / ".join(f"{n:,} {split}" for split, n in counts.items())
                       for name, counts in report["datasets"].items()))
    q = report["quarantined"]
    log.info(f"quarantined {q['rows']:,} rows and {q['files']} files; scrubbed {report['scrubbed']}; "
             f"{len(c['without_context'])} contests without context, {len(c['without_image'])} without image")
    log.info(f"report: {_join(output, 'report.json')}")
