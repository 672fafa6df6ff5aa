"""`humor-ray report`: one static HTML file (plus its images) that opens without a server.

- the win rates of each method against the four human groups, raw and length-controlled, with 95% intervals
  and mean caption lengths, and the judge's reliability block; a leaderboard only when the judge clears
  chance, else a warning in words above a table that is not ordered as a ranking;
- a table of methods and human groups: raw and length-controlled win rates, diversity, mean length and, with
  --reward_dir, the mean reward of a second reward model (humor_ray/eval/table.py);
- diversity beside win rate (a scatter: embedding diversity and EAD against the mean win rate), human groups
  included;
- caption length distributions (words per caption) of every method and of the human top captions;
- per-contest examples: the cartoon, each method's captions next to the human top captions.
Plots are drawn with matplotlib into PNG files next to the page.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import os
import shutil
from pathlib import Path

from humor_ray.config import ConfigError, Options, UserError, data_root, field
from humor_ray.data.generations import read_generations
from humor_ray.data.outputs import written_aside
from humor_ray.eval import table
from humor_ray.eval.benchmark import GROUPS, read_references, reliability_lines, reliability_warning
from humor_ray.log import get_logger
from humor_ray.models.vision import image_location

log = get_logger("report")
# What a report folder holds: an earlier report there is replaced whole, anything else is refused.
REPORT_FILES = ("report.html", "diversity.json", "images", "*.png")


@dataclasses.dataclass
class ReportConfig(Options):
    """An HTML report of a benchmark run."""
    judge_dir: str = field(None, "the output of `humor-ray judge` (winrates.json)", required=True)
    generations: list[str] = field(None, "the generation outputs that were judged", required=True)
    dataset_dir: str = field(None, "the output of `humor-ray data build` (references, prompts)", required=True)
    output_dir: str = field(None, "where report.html and its images go", required=True)
    images_dir: str | None = field(None, "cartoon images (default: the data root's images/)", existing=True)
    reward_dir: str | None = field(None, "a `humor-ray judge --judge rm` output of the same captions by another reward "
                                         "model (the study's: the one the policies were tuned against): its mean "
                                         "reward per method goes in the table", existing=True)
    examples: int = field(6, "contests shown with their captions", minimum=0)
    captions_shown: int = field(5, "captions per method and contest in the examples", minimum=1)
    title: str = field("humor_ray benchmark", "the page title")
    embedding: str = field("mpnet", "the embedding diversity's model: mpnet (the paper's) or minilm (faster)")
    ead: str = field("paper", "the EAD: paper (the paper's words, V = 32,000) or words (our tokens)")
    pairs: str = field("with_self", "embedding cosines: with_self (the paper's) or distinct (two different captions)")
    overwrite: bool = field(False, "replace --output_dir even when it holds files that are not an earlier report")
    note: str | None = field(None, "a paragraph shown at the top of the page (say, what the runs judged can and "
                                   "cannot show)")

    def __post_init__(self):
        if not (self.judge_dir and self.generations and self.dataset_dir and self.output_dir):
            raise ConfigError("report needs --judge_dir, --generations, --dataset_dir and --output_dir")
        super().__post_init__()


def _plots(out: Path, summary: dict, diversity: dict, lengths: dict) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    files = {}
    points = table.plot_points(summary, diversity)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "embedding", "embedding diversity (1 - mean cosine)"),
                           (axes[1], "ead", "EAD (mean of n = 1..5)")):
        for human, colour, kind in ((False, "tab:blue", "methods"), (True, "tab:orange", "human groups")):
            shown = [p for p in points if p["human"] == human]
            ax.scatter([p[key] for p in shown], [p["win_rate"] for p in shown], color=colour, label=kind)
            for p in shown:
                ax.annotate(p["name"], (p[key], p["win_rate"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("mean win rate vs the 4 human groups (%)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "diversity.png", dpi=110)
    plt.close(fig)
    files["diversity"] = "diversity.png"
    fig, ax = plt.subplots(figsize=(10, 4))
    names = list(lengths)
    ax.boxplot([lengths[n] for n in names], showfliers=False)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("words per caption")
    fig.tight_layout()
    fig.savefig(out / "lengths.png", dpi=110)
    plt.close(fig)
    files["lengths"] = "lengths.png"
    return files


def _rate_cell(r: dict | None, key: str) -> str:
    if not r or r.get(key) is None or math.isnan(r[key]):
        return "-"
    low, high = ("lc_ci_low", "lc_ci_high") if key == "lc_win_rate" else ("ci_low", "ci_high")
    return f"{100 * r[key]:.1f}% <small>[{100 * r[low]:.1f}, {100 * r[high]:.1f}]</small>"


def _leaderboard(summary: dict) -> str:
    """The win rates, raw and length-controlled, with each method's mean caption length. Under a judge whose
    reliability does not clear chance, the warning comes first, and the table is neither called a leaderboard
    nor ordered by win rate."""
    rates = {(r["method"], r["against"]): r for r in summary["win_rates"]}
    lengths = summary.get("lengths", {})
    warning = reliability_warning(summary.get("reliability"))
    methods = sorted({m for m, _ in rates})
    if not warning:  # a ranking: best mean win rate first
        methods.sort(key=lambda m: -sum(rates[(m, g)]["win_rate"] for g in GROUPS if (m, g) in rates))
    head = "".join(f"<th>vs {g}</th><th>vs {g}, length-controlled</th>" for g in GROUPS)
    rows = []
    for m in methods:
        cells = "".join(f"<td>{_rate_cell(rates.get((m, g)), 'win_rate')}</td>"
                        f"<td>{_rate_cell(rates.get((m, g)), 'lc_win_rate')}</td>" for g in GROUPS)
        words = f"{lengths[m]:.1f}" if m in lengths else "-"
        rows.append(f"<tr><td>{html.escape(m)}</td><td>{words}</td>{cells}</tr>")
    humans = ", ".join(f"{g} {lengths[f'human_{g}']:.1f}" for g in GROUPS if f"human_{g}" in lengths)
    table = (f"<table id='leaderboard'><tr><th>method</th><th>words per caption</th>{head}</tr>{''.join(rows)}</table>"
             + (f"<p>Human captions, mean words per caption: {humans}.</p>" if humans else ""))
    if warning:
        return (f"<h2>Win rates (not a ranking)</h2><p id='judge-warning' class='warning'>{html.escape(warning)}</p>"
                + table)
    return f"<h2>Leaderboard</h2>{table}"


def _reliability(summary: dict) -> str:
    """The judge's reliability block, (a)-(d), as the judge prints it."""
    lines = reliability_lines(summary.get("reliability"))[1:]  # the first is the heading
    items = "".join(f"<li>{html.escape(line.strip())}</li>" for line in lines)
    return f"<h2>Judge reliability</h2><p>Chance is 50%.</p><ul id='reliability'>{items}</ul>"


def run(cfg: ReportConfig) -> str:
    """Read the judge's results and the captions it judged, then write the page and its files aside and put
    them in place whole (an interrupted run leaves the earlier report)."""
    import pandas as pd

    from humor_ray.eval.diversity import method_diversity

    with written_aside(cfg.output_dir, "report", REPORT_FILES, cfg.overwrite) as work:
        summary, generations, references = _judged(cfg)
        out = Path(work)
        (out / "images").mkdir()
        # The human groups are scored as the methods are, for the plot and the table.
        humans = references.assign(method=references["group"].map(table.human_name))
        captions = pd.concat([generations[["contest", "method", "caption"]], humans[["contest", "method", "caption"]]])
        diversity_rows = method_diversity(captions, model=cfg.embedding, ead_kind=cfg.ead, pairs=cfg.pairs)
        diversity = {m: {"embedding": v["embedding"], "ead": v["ead"]} for m, v in diversity_rows.items()}
        lengths = {m: rows["caption"].str.split().str.len().tolist() for m, rows in captions.groupby("method")}
        plots = _plots(out, summary, diversity, lengths)
        ranked = reliability_warning(summary.get("reliability")) is None  # no ranking from a judge near chance
        rows = table.method_rows(summary, diversity, lengths, _rewards(cfg), ranked)
        examples = _examples(cfg, out, generations, references)
        (out / "report.html").write_text(_page(cfg, summary, diversity, plots, examples, rows))
        (out / "diversity.json").write_text(json.dumps(diversity_rows, indent=1, default=_json_number))
    path = Path(cfg.output_dir, "report.html")
    log.info(f"report in {path}")
    return str(path)


def _rewards(cfg: ReportConfig) -> dict[str, float]:
    """The mean reward of each method and human group from --reward_dir's judgments (none without it)."""
    import pandas as pd

    if not cfg.reward_dir:
        return {}
    judgments = Path(cfg.reward_dir, "judgments.parquet")
    if not judgments.is_file():
        raise UserError(f"--reward_dir {cfg.reward_dir}: no judgments.parquet (run `humor-ray judge --judge rm` "
                        "into it first)")
    return table.mean_rewards(pd.read_parquet(judgments, columns=["method", "contest", "score"]))


def _methods_table(rows: list[dict]) -> str:
    """The table of methods and human groups (humor_ray/eval/table.py): raw and length-controlled win rates with
    their intervals, diversity, length and reward."""
    def rate(cell) -> str:
        if not cell or math.isnan(cell[0]):
            return "<td>-</td>"
        interval = "" if math.isnan(cell[1]) else f" <small>[{cell[1]:.1f}, {cell[2]:.1f}]</small>"
        return f"<td>{cell[0]:.1f}{interval}</td>"

    def number(value, digits: int) -> str:
        return "<td>-</td>" if value is None else f"<td>{value:.{digits}f}</td>"

    head = ("<tr><th rowspan='2'>method</th><th colspan='4'>win rate (%)</th><th colspan='4'>length-controlled win "
            "rate (%)</th><th rowspan='2'>embedding diversity</th><th rowspan='2'>EAD</th><th rowspan='2'>words</th>"
            "<th rowspan='2'>reward</th></tr><tr>" + "".join(f"<th>vs {g}</th>" for g in GROUPS) * 2 + "</tr>")
    body = "".join(
        f"<tr class='{'human' if r['human'] else 'method'}'><td>{html.escape(r['name'])}</td>"
        + "".join(rate(r["raw"].get(g)) for g in GROUPS) + "".join(rate(r["lc"].get(g)) for g in GROUPS)
        + number(r["embedding"], 3) + number(r["ead"], 3) + number(r["words"], 1) + number(r["reward"], 3) + "</tr>"
        for r in rows)
    return f"<table id='methods'>{head}{body}</table>"


def _methods_section(cfg: ReportConfig, rows: list[dict]) -> str:
    if not rows:
        return ""
    reward = f" and the mean reward of the reward model in {html.escape(cfg.reward_dir)}" if cfg.reward_dir else ""
    return (f"<h2>Methods and human groups</h2><p>Win rates against each human group (a human group is not judged "
            f"against itself), diversity and mean words per caption{reward}.</p>{_methods_table(rows)}")


def _judged(cfg: ReportConfig):
    """winrates.json, and the generations and human references of the contests the win rates come from."""
    import pandas as pd

    winrates = Path(cfg.judge_dir, "winrates.json")
    if not winrates.is_file():
        raise UserError(f"{winrates} not found: run `humor-ray judge` first")
    summary = json.loads(winrates.read_text())
    generations = read_generations(cfg.generations)
    references = read_references(cfg.dataset_dir)
    judgments = Path(cfg.judge_dir, "judgments.parquet")
    if judgments.is_file():  # diversity, lengths and examples on the contests the win rates come from
        judged = set(pd.read_parquet(judgments, columns=["contest"])["contest"])
        generations = generations[generations["contest"].isin(judged)]
        references = references[references["contest"].isin(judged)]
    return summary, generations, references


def _examples(cfg: ReportConfig, out: Path, generations, references) -> list[str]:
    """Contests every method has captions for, each with its cartoon (copied beside the page when it exists)
    and every method's captions next to the human top 10."""
    import pandas as pd

    prompts = pd.read_parquet(os.path.join(cfg.dataset_dir, "prompts", "eval"))
    image_of = dict(zip(prompts["contest"].astype(int), prompts["image"]))
    common = set(references["contest"].astype(int))
    for _, rows in generations.groupby("method"):
        common &= set(rows["contest"].astype(int))
    images_dir = str(cfg.images_dir or data_root() / "images")
    examples = []
    for contest in sorted(common)[: cfg.examples]:
        image_html = ""
        image = image_of.get(contest)
        if image and Path(image_location(images_dir, image)).is_file():
            target = out / "images" / f"{contest}{Path(image).suffix}"
            shutil.copyfile(image_location(images_dir, image), target)
            image_html = f"<img src='images/{target.name}' alt='cartoon {contest}'>"
        columns = [("human top 10", references[(references["contest"] == contest) &
                                               (references["group"] == "top10")]["caption"].tolist())]
        for method, rows in generations[generations["contest"] == contest].groupby("method"):
            columns.append((method, rows.sort_values("sample")["caption"].tolist()))
        cells = "".join(f"<div class='col'><h4>{html.escape(name)}</h4><ol>"
                        + "".join(f"<li>{html.escape(c)}</li>" for c in caps[: cfg.captions_shown]) + "</ol></div>"
                        for name, caps in columns)
        examples.append(f"<section class='example'><h3>Contest {contest}</h3>{image_html}"
                        f"<div class='cols'>{cells}</div></section>")
    return examples


def _page(cfg: ReportConfig, summary: dict, diversity: dict, plots: dict, examples: list[str],
          rows: list[dict] = ()) -> str:
    """The page; `rows`: the table of methods and human groups (humor_ray/eval/table.py), shown when given."""
    div_rows = "".join(f"<tr><td>{html.escape(m)}</td><td>{d['embedding']:.3f}</td><td>{d['ead']:.3f}</td></tr>"
                       for m, d in sorted(diversity.items()))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(cfg.title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1200px; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; }}
img {{ max-width: 100%; }}
.example img {{ max-height: 320px; }}
.cols {{ display: flex; flex-wrap: wrap; gap: 1em; }}
.col {{ flex: 1 1 220px; font-size: 0.9em; }}
.warning {{ border-left: 4px solid #c00; background: #fff4f4; padding: 0.5em 1em; }}
</style></head><body>
<h1>{html.escape(cfg.title)}</h1>
{f"<p id='note' class='warning'>{html.escape(cfg.note)}</p>" if cfg.note else ""}
<p>Judge: {html.escape(str(summary['judge']))}. Win rate of each method's captions against four groups of human captions
(ranks 1-10, 200-209, 1000-1009, median), with 95% bootstrap intervals over contests.</p>
{_leaderboard(summary)}
{_reliability(summary)}
{_methods_section(cfg, rows)}
<h2>Diversity and win rate</h2>
<img id="diversity-plot" src="{plots['diversity']}" alt="diversity against win rate">
<table id="diversity"><tr><th>method</th><th>embedding diversity</th><th>EAD</th></tr>{div_rows}</table>
<h2>Caption lengths</h2>
<img id="lengths-plot" src="{plots['lengths']}" alt="caption length distributions">
<h2>Examples</h2>
{''.join(examples) or '<p>No contest has captions from every method.</p>'}
</body></html>
"""


def _json_number(value):
    number = float(value)
    return None if math.isnan(number) else number
