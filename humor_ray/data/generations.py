"""The files generation writes and evaluation reads, and the contests a run covers.

Tables are pandas DataFrames in a long layout, one row per caption: `contest, method, sample, caption`.
Generations come in a wide layout, one row per contest (`contest_number`, optional `prompt`,
`caption1..captionN`): `humor-ray generate` writes it beside its long `captions.parquet`, and the
paper's released generations use it with small variations; `read_wide` and `read_released` turn those
into the long layout, and `read_generations` reads any mix of them.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd

from humor_ray.config import UserError, data_root
from humor_ray.log import get_logger

log = get_logger("generations")

CAPTION_COLUMN = re.compile(r"caption(\d+)")
LONG_COLUMNS = ["contest", "method", "sample", "caption"]
RELEASED_DIR = ("benchmarks", "humor_in_ai_examples")
# The released human captions have no contest column: this file (ours) gives each row's contest.
HUMAN_INDEX = "human_rows_contest_index.csv"


def choose_contests(available, contests: list[int], max_contests: int | None, source: str) -> list[int]:
    """The contests a run covers, in order: `contests` when given (each must be in `available`),
    else all of `available`; then only the first `max_contests`."""
    chosen = sorted(set(available))
    if contests:
        unknown = sorted(set(contests) - set(chosen))
        if unknown:
            raise UserError(f"--contests {unknown}: not in {source}")
        chosen = [c for c in chosen if c in set(contests)]
    return chosen[:max_contests] if max_contests else chosen


def read_generations(paths: list[str], humans: bool = False):
    """A long table (contest, method, sample, caption) from every generation source; the released
    human captions (`human_*`) only with `humans=True`."""
    frames, source_of = [], {}
    for spec in paths:
        path = Path(spec)
        if (path / "captions.parquet").is_file():
            frame = pd.read_parquet(path / "captions.parquet", columns=["contest", "method", "sample", "caption"])
        elif path.exists():
            frame = read_released(path)
        else:
            raise UserError(f"--generations {spec}: no such file or directory")
        for method in frame["method"].unique():
            if method in source_of:
                raise UserError(f"method {method!r} comes from both {source_of[method]} and {spec}: give one of "
                                "them another name (`humor-ray generate --method NAME`)")
            source_of[method] = spec
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    if not humans:
        table = table[~table["method"].str.startswith("human")]
    table = table[table["caption"].fillna("").str.strip() != ""]
    return table.assign(contest=table["contest"].astype(int))


def read_wide(path: str | Path, method: str) -> pd.DataFrame:
    """One CSV file of generations in the wide layout, one row per contest: `contest_number`, an
    optional `prompt` and `caption1..captionN` (any column order, other columns ignored), as a long
    table `contest, method, sample, caption`. Captions are stripped; empty ones are dropped and
    counted in `.attrs["empty_captions"][method]`."""
    return _wide_to_long(_read_csv(path), Path(path), method)


def read_released(path_or_dir: str | Path | None = None) -> pd.DataFrame:
    """The generations released with "Humor in AI" (a directory of them, default
    `<data root>/benchmarks/humor_in_ai_examples`, or one file) as one long table; the method is the
    file name without `.csv`. Besides the wide layout of `read_wide`, two layouts of that release
    are read: `claude`/`gpt4o` (`contest_num` and captions in columns `0..9`) and `human_*` (columns
    `0..9`, no contest column; row i is the contest in row i of `human_rows_contest_index.csv`).
    One known defect is repaired: in `zs.csv` a row with no contest number holds more captions of
    the contest above, shifted one column left (its first is under `prompt`); its texts fill that
    row's empty caption cells."""
    path = Path(path_or_dir) if path_or_dir is not None else data_root().joinpath(*RELEASED_DIR)
    files = sorted(p for p in path.glob("*.csv") if p.name != HUMAN_INDEX) if path.is_dir() else [path]
    if not files:
        raise UserError(f"{path}: no generation files (*.csv) found")
    tables = [_wide_to_long(_released_frame(file), file, file.stem) for file in files]
    table = pd.concat(tables, ignore_index=True)
    table.attrs["empty_captions"] = {m: n for t in tables for m, n in t.attrs["empty_captions"].items()}
    return table


def _released_frame(path: Path) -> pd.DataFrame:
    """A released file as a frame in the wide layout (see `read_released`)."""
    frame = _read_csv(path)
    numbered = {c: f"caption{int(c) + 1}" for c in frame.columns if c.isdigit()}
    frame = frame.rename(columns={"contest_num": "contest_number", **numbered})
    if path.stem.startswith("human_"):
        frame["contest_number"] = _human_contests(path.parent / HUMAN_INDEX, len(frame))
    if "contest_number" in frame.columns and "prompt" in frame.columns:
        frame = _merge_split_rows(frame, path)
    return frame


def _human_contests(index_path: Path, rows: int) -> list[str]:
    """The contest of each row of a released `human_*` file, from the index file beside it."""
    index = _read_csv(index_path)
    if not {"row_index", "contest"} <= set(index.columns):
        raise UserError(f"{index_path}: needs columns row_index, contest")
    by_row = dict(zip(index["row_index"].astype(int), index["contest"]))
    if sorted(by_row) != list(range(rows)):
        raise UserError(f"{index_path}: does not map rows 0..{rows - 1} of the human caption files")
    return [by_row[row] for row in range(rows)]


def _merge_split_rows(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Rows with no contest number that continue the row above (see `read_released`), folded into it."""
    caption_columns = sorted((c for c in frame.columns if CAPTION_COLUMN.fullmatch(c)),
                             key=lambda c: int(c.removeprefix("caption")))
    frame = frame.copy()
    for row in reversed(frame.index[frame["contest_number"].str.strip() == ""]):
        position = frame.index.get_loc(row)
        if position == 0:
            raise UserError(f"{path}: row 2 has no contest_number and no row above it to belong to")
        above = frame.index[position - 1]
        texts = [t for t in frame.loc[row, ["prompt", *caption_columns]] if t.strip()]
        empty = [c for c in caption_columns if not frame.at[above, c].strip()]
        if len(texts) > len(empty):
            raise UserError(f"{path}: row {position + 2} has no contest_number and more captions "
                            f"({len(texts)}) than the row above has empty cells ({len(empty)})")
        for column, text in zip(empty, texts):
            frame.at[above, column] = text
        frame = frame.drop(index=row)
    return frame


def _read_csv(path: str | Path) -> pd.DataFrame:
    """Every cell as text ("NA" is a caption, not a missing value)."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise UserError(f"{path}: cannot read it as CSV: {err}") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def _wide_to_long(frame: pd.DataFrame, path: Path, method: str) -> pd.DataFrame:
    """The long table of one wide frame, after checking its columns and contest numbers."""
    caption_columns = [c for c in frame.columns if CAPTION_COLUMN.fullmatch(c)]
    missing = [what for what, absent in (("contest_number", "contest_number" not in frame.columns),
                                         ("caption1..captionN", not caption_columns)) if absent]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)} of the wide generations layout "
                        f"(found: {', '.join(frame.columns) or 'none'})")
    contests = [_contest_number(value, path, row + 2) for row, value in enumerate(frame["contest_number"])]
    repeated = sorted(set(pd.Series(contests)[pd.Series(contests).duplicated()]))
    if repeated:
        raise UserError(f"{path}: contest(s) {', '.join(map(str, repeated))} have more than one row")
    long = (frame[caption_columns].assign(contest=contests)
            .melt(id_vars="contest", var_name="sample", value_name="caption"))
    long["sample"] = long["sample"].str.removeprefix("caption").astype(int)
    long["caption"] = long["caption"].str.strip()
    empty = long["caption"] == ""
    if empty.any():
        log.warning("%s: %d empty caption(s) dropped", path, int(empty.sum()))
    long = long[~empty].assign(method=method)[LONG_COLUMNS]
    long = long.astype({"contest": "int64", "sample": "int64"}).sort_values(["contest", "sample"])
    long = long.reset_index(drop=True)
    long.attrs["empty_captions"] = {method: int(empty.sum())}
    return long


def _contest_number(value: str, path: Path, line: int) -> int:
    """A contest number; the release writes some as floats ("543.0")."""
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not number.is_integer():
        raise UserError(f"{path}: line {line}: contest_number {value!r} is not a whole number")
    return int(number)
