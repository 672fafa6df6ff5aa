"""`humor-ray judge`: win rates of generated captions against human captions of four ranks.

Per evaluation contest, a method's 10 captions are compared with four groups of 10 human captions
(ranks 1-10, 200-209, 1000-1009 and the median ten; `references/eval` of the data stage). Judges:
- `rm`: the reward model (offline): the group with the higher mean reward of prompt-with-context +
  caption is funnier. Symmetric, so each contest is one judgment.
- `llm`, protocol `overall` (the paper's): an OpenAI-compatible model reads the cartoon's description
  and two groups, few-shot with human top-10 vs #1000-1009 examples from TRAINING contests, and answers
  A or B; asked in both orders. The decision uses the log-probabilities of A and B against a threshold
  fitted on reference comparisons (human top-10 vs #1000-1009 of the evaluation contests, both orders):
  the median P(A), which cancels the judge's preference for a position.
- `llm`, protocol `best_pick`: with the cartoon image, the judge picks the funniest caption of each
  group, then says which of the two picks is funnier (both orders); ties by position cancel out.
The judge-reliability check (can it tell human top-10 from #1000-1009?) is reported beside the win rates.
Confidence intervals: 95%, bootstrap over contests (the two orders of a contest stay together).

Generations: our `humor-ray generate`/`bon` output directories, wide CSV files (contest_number, prompt,
caption1..N, or the paper's release with columns 0..9 and contest_num) or a directory of them (the
paper's released generations, one file per method; its human_* files are skipped).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np

from humor_ray.config import ConfigError, Options, UserError, field
from humor_ray.data.generations import choose_contests, read_generations
from humor_ray.data.outputs import require_complete
from humor_ray.log import get_logger

GROUPS = ("top10", "rank200", "rank1000", "median")
JUDGES = ("rm", "llm")
PROTOCOLS = ("overall", "best_pick")
log = get_logger("judge")


@dataclasses.dataclass
class JudgeConfig(Options):
    """Win rates of methods' captions against human captions."""
    dataset_dir: str = field(None, "the output of `humor-ray data build` (references, prompts, captions)",
                            required=True)
    generations: list[str] = field(None, "generation outputs: `humor-ray generate` directories, wide CSVs or "
                                         "directories of them", required=True)
    output_dir: str = field(None, "where judgments and win rates go", required=True)
    judge: str = field("rm", "rm (the reward model, offline) or llm (an OpenAI-compatible endpoint)", choices=JUDGES)
    reward_model: str | None = field(None, "for --judge rm: a `humor-ray rm` output or reward model directory")
    reward_max_length: int = field(512, "for --judge rm: tokens of prompt + caption the reward model reads (as "
                                        "trained)", minimum=1)
    use_gpu: bool = field(False, "for --judge rm: score on a GPU of the Ray cluster")
    base_url: str | None = field(None, "for --judge llm: the endpoint, e.g. https://api.openai.com/v1 or "
                                       "http://127.0.0.1:8000/v1")
    model: str | None = field(None, "for --judge llm: the judge model")
    api_key_env: str | None = field(None, "environment variable holding the endpoint's API key, sent only over https "
                                          "or to loopback (default: $OPENAI_API_KEY, to api.openai.com only); never "
                                          "logged or written")
    protocol: str = field("overall", "overall (text, few-shot, both orders) or best_pick (with the image)",
                          choices=PROTOCOLS)
    shots: int = field(5, "few-shot examples from training contests (overall)", minimum=0)
    images_dir: str | None = field(None, "cartoon images (best_pick); default: the data root's images/",
                                     existing=True)
    concurrency: int = field(16, "requests in flight", minimum=1)
    cache_dir: str | None = field(None, "answers cache (default <output_dir>/cache): a rerun sends nothing already "
                                        "answered")
    price_per_mtok_in: float = field(0.0, "USD per million prompt tokens, for the cost count", minimum=0)
    price_per_mtok_out: float = field(0.0, "USD per million completion tokens", minimum=0)
    dry_run: bool = field(False, "print what would be sent and its cost; send nothing")
    max_contests: int | None = field(None, "only the first this many evaluation contests", minimum=1)
    contests: list[int] = field([], "only these evaluation contests (before --max_contests)", minimum=1)
    bootstrap: int = field(2000, "bootstrap resamples for the confidence intervals", minimum=1)
    seed: int = field(2024, "seed for few-shot choice and the bootstrap", minimum=0)

    def __post_init__(self):
        if not self.dataset_dir or not self.generations or not self.output_dir:
            raise ConfigError("judge needs --dataset_dir, --generations and --output_dir")
        super().__post_init__()
        if self.judge == "rm" and not self.reward_model:
            raise ConfigError("--judge rm needs --reward_model")
        if self.judge == "llm" and not (self.base_url and self.model):
            raise ConfigError("--judge llm needs --base_url and --model")


# ---------------------------------------------------------------- inputs

def read_references(dataset_dir: str):
    import pandas as pd

    require_complete(dataset_dir)
    path = os.path.join(dataset_dir, "references", "eval")
    if not os.path.isdir(path):
        raise UserError(f"{path} not found: run `humor-ray data build` with the references dataset")
    return pd.read_parquet(path).sort_values(["contest", "group", "rank"])


def read_context(dataset_dir: str, split: str):
    """contest -> (simple prompt: the cartoon's context lines, image path) for a split."""
    import pandas as pd

    table = pd.read_parquet(os.path.join(dataset_dir, "prompts", split))
    return {int(r.contest): (r.prompt, r.image) for r in table.itertuples()}


def few_shot_groups(dataset_dir: str, shots: int, seed: int) -> list[tuple[str, list[str], list[str]]]:
    """(context, top-10, #1000-1009) of `shots` training contests, for the overall judge's examples."""
    import pandas as pd

    context = read_context(dataset_dir, "train")
    captions = pd.read_parquet(os.path.join(dataset_dir, "captions"), columns=["contest", "caption", "rank", "split"])
    captions = captions[(captions["split"] == "train")]
    usable = sorted(c for c, n in captions.groupby("contest").size().items() if n >= 1010 and int(c) in context)
    rng = np.random.default_rng(seed)
    examples = []
    for contest in rng.choice(usable, min(shots, len(usable)), replace=False) if usable else []:
        ranked = captions[captions["contest"] == contest].sort_values("rank")["caption"].tolist()
        examples.append((context[int(contest)][0], ranked[:10], ranked[999:1009]))
    return examples


# ---------------------------------------------------------------- statistics

def bootstrap_ci(wins_by_contest: list[list[float]], resamples: int, seed: int) -> tuple[float, float, float]:
    """(win rate, 95% low, 95% high); contests are resampled whole."""
    per = [np.asarray(w, dtype=float) for w in wins_by_contest if len(w)]
    if not per:
        return math.nan, math.nan, math.nan
    sums = np.array([w.sum() for w in per])
    counts = np.array([len(w) for w in per])
    rate = sums.sum() / counts.sum()
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(per), size=(resamples, len(per)))
    rates = sums[draws].sum(1) / counts[draws].sum(1)
    low, high = np.percentile(rates, [2.5, 97.5])
    return float(rate), float(low), float(high)


# ---------------------------------------------------------------- the reward-model judge

def rm_judgments(cfg: JudgeConfig, generations, references) -> list[dict]:
    """One judgment per (method or reference group, human group, contest): mean rewards compared."""
    from humor_ray.rl.reward import RewardModel, resolve_reward_model

    context = read_context(cfg.dataset_dir, "eval")
    spec = resolve_reward_model(cfg.reward_model)
    pairs = []  # (kind, name, contest, captions)
    for (method, contest), rows in generations.groupby(["method", "contest"]):
        pairs.append(("method", method, int(contest), rows.sort_values("sample")["caption"].tolist()))
    for (group, contest), rows in references.groupby(["group", "contest"]):
        pairs.append(("human", group, int(contest), rows["caption"].tolist()))
    pairs = [p for p in pairs if p[2] in context]
    flat_prompts = [context[c][0] for _, _, c, caps in pairs for _ in caps]
    flat_captions = [cap for _, _, _, caps in pairs for cap in caps]
    log.info(f"scoring {len(flat_captions):,} captions with the reward model")
    if cfg.use_gpu:
        scores = _score_on_gpu(cfg, spec, flat_prompts, flat_captions)
    else:
        scores = RewardModel(spec, cfg.reward_max_length).score(flat_prompts, flat_captions, progress=True)
    means, start = {}, 0
    for kind, name, contest, caps in pairs:
        means[(kind, name, contest)] = float(np.mean(scores[start:start + len(caps)]))
        start += len(caps)
    out = []
    for (kind, name, contest), value in means.items():
        for group in GROUPS:
            human = means.get(("human", group, contest))
            if human is None or (kind == "human" and name == group):
                continue
            out.append({"contest": contest, "method": name if kind == "method" else f"human_{name}",
                        "against": group, "order": "-", "win": float(value > human),
                        "score": value, "against_score": human})
    return out


def _score_on_gpu(cfg: JudgeConfig, spec: str, prompts: list[str], captions: list[str]) -> list[float]:
    """The reward model's scores from an actor holding one GPU of the cluster (humor_ray.placement)."""
    import ray

    from humor_ray.cluster import init_ray
    from humor_ray.placement import check_cluster, inference_plan
    from humor_ray.rl.reward import start_reward_actor

    init_ray()
    plan = inference_plan("judge", True, reward=True)
    check_cluster(plan)
    actor = start_reward_actor(spec, max_length=cfg.reward_max_length, **plan.actor_options("reward"))
    try:
        return ray.get(actor.score.remote(prompts, captions, progress=True))
    finally:
        ray.kill(actor)


# ---------------------------------------------------------------- the LLM judge

OVERALL_SYSTEM = ("You judge The New Yorker Cartoon Caption Contest. You read a description of a cartoon and two "
                  "groups of ten captions, and say which group is funnier overall. Answer with one letter: A or B.")


def _groups_text(context: str, group_a: list[str], group_b: list[str]) -> str:
    lines = [f"Cartoon:\n{context.removesuffix('funny caption:').strip()}", "", "Group A:"]
    lines += [f"{i + 1}. {c}" for i, c in enumerate(group_a)] + ["", "Group B:"]
    lines += [f"{i + 1}. {c}" for i, c in enumerate(group_b)] + ["", "Which group is funnier, A or B?"]
    return "\n".join(lines)


def overall_request(context: str, group_a: list[str], group_b: list[str], shots) -> dict:
    messages = [{"role": "system", "content": OVERALL_SYSTEM}]
    for k, (shot_context, top, low) in enumerate(shots):
        # Alternate where the better group stands, so the examples teach no position.
        a, b, answer = (top, low, "A") if k % 2 == 0 else (low, top, "B")
        messages += [{"role": "user", "content": _groups_text(shot_context, a, b)},
                     {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": _groups_text(context, group_a, group_b)})
    return {"messages": messages, "max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": 5}


def prob_a(answer: dict) -> float:
    """P(A) against P(B) from the first answer token's top log-probs (0.5 if neither appears)."""
    best = {"A": -math.inf, "B": -math.inf}
    first = (answer.get("logprobs") or [{}])[0]
    options = first.get("top_logprobs") or [{"token": first.get("token", ""), "logprob": first.get("logprob", 0.0)}]
    for option in options:
        token = option["token"].strip().upper()
        if token in best:
            best[token] = max(best[token], option["logprob"])
    if best["A"] == best["B"] == -math.inf:
        text = (answer.get("content") or "").strip().upper()[:1]
        return {"A": 1.0, "B": 0.0}.get(text, 0.5)
    top = max(best.values())
    a, b = math.exp(best["A"] - top), math.exp(best["B"] - top)
    return a / (a + b)


def _image_part(images_dir: str, image: str | None) -> list[dict]:
    if not image:
        return []
    from humor_ray.models.vision import image_location

    path = Path(image_location(images_dir, image))
    if not path.is_file():
        return []
    kind = "png" if path.suffix.lower() == ".png" else "jpeg"
    data = base64.b64encode(path.read_bytes()).decode()
    return [{"type": "image_url", "image_url": {"url": f"data:image/{kind};base64,{data}"}}]


def pick_request(context: str, image_parts: list[dict], captions: list[str]) -> dict:
    text = (f"Cartoon:\n{context.removesuffix('funny caption:').strip()}\n\nCaptions:\n"
            + "\n".join(f"{i + 1}. {c}" for i, c in enumerate(captions))
            + "\n\nWhich caption is the funniest? Answer with its number only.")
    content = [*image_parts, {"type": "text", "text": text}] if image_parts else text
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 3, "temperature": 0}


def _picked(answer: dict, captions: list[str]) -> str:
    digits = "".join(ch for ch in (answer.get("content") or "") if ch.isdigit())
    index = int(digits) - 1 if digits else 0
    return captions[index] if 0 <= index < len(captions) else captions[0]


def llm_judgments(cfg: JudgeConfig, generations, references) -> tuple[list[dict], dict]:
    """The LLM judge's verdicts, by --protocol, on every comparison; with --dry_run none, and what would be sent."""
    from humor_ray.cluster import init_ray
    from humor_ray.eval.client import JudgeClient
    from humor_ray.metrics import StageMetrics

    context = read_context(cfg.dataset_dir, "eval")
    comparisons = _comparisons(generations, references, context)
    if os.environ.get("RAY_ADDRESS"):  # submitted to a cluster: join it, so its dashboard shows the figures
        init_ray()
    client = JudgeClient(cfg.base_url, cfg.model, cfg.cache_dir or os.path.join(cfg.output_dir, "cache"),
                         concurrency=cfg.concurrency, price_per_mtok_in=cfg.price_per_mtok_in,
                         price_per_mtok_out=cfg.price_per_mtok_out, api_key_env=cfg.api_key_env,
                         figures=StageMetrics(Path(cfg.output_dir).name, "judge"))
    judge = _overall_judgments if cfg.protocol == "overall" else _best_pick_judgments
    return judge(cfg, client, context, comparisons)


def _comparisons(generations, references, context: dict) -> list[tuple]:
    """Every comparison, (name, group, contest, its captions, the human group's captions): each method against
    each human group, and the reference comparisons (human top10 vs rank1000) that fit the threshold and
    measure the judge's reliability."""
    humans = {(g, int(c)): rows["caption"].tolist() for (g, c), rows in references.groupby(["group", "contest"])}
    methods = {(m, int(c)): rows.sort_values("sample")["caption"].tolist()
               for (m, c), rows in generations.groupby(["method", "contest"])}
    contests = sorted({c for _, c in humans} & set(context))
    comparisons = [(m, g, c, caps, humans[(g, c)]) for (m, c), caps in methods.items() for g in GROUPS
                   if (g, c) in humans and c in context]
    comparisons += [("human_top10", "rank1000", c, humans[("top10", c)], humans[("rank1000", c)])
                    for c in contests if ("top10", c) in humans and ("rank1000", c) in humans]
    return comparisons


def _verdicts(comparisons: list[tuple], p_a: list[float], threshold: float, tie_to_b: bool) -> list[dict]:
    """Two rows per comparison, ours as A then as B: a win when P(A) says ours, against `threshold` (a P(A)
    of exactly the threshold counts for B when `tie_to_b`)."""
    out = []
    for i, (name, group, contest, _, _) in enumerate(comparisons):
        first, second = p_a[2 * i], p_a[2 * i + 1]
        out.append({"contest": contest, "method": name, "against": group, "order": "AB",
                    "win": float(first > threshold), "score": first, "against_score": threshold})
        out.append({"contest": contest, "method": name, "against": group, "order": "BA",
                    "win": float(second <= threshold if tie_to_b else second < threshold), "score": second,
                    "against_score": threshold})
    return out


def _overall_judgments(cfg: JudgeConfig, client, context: dict, comparisons: list[tuple]):
    """The paper's protocol: all captions of both sides, both orders, P(A) against a threshold fitted on the
    reference comparisons (their median)."""
    shots = few_shot_groups(cfg.dataset_dir, cfg.shots, cfg.seed)
    requests = []
    for _, _, c, ours, theirs in comparisons:
        requests.append(overall_request(context[c][0], ours, theirs, shots))  # ours as A
        requests.append(overall_request(context[c][0], theirs, ours, shots))  # ours as B
    if cfg.dry_run:
        return [], client.dry_run(requests)
    p_a = [prob_a(a) for a in client.complete_many(requests)]
    reference = [p for i, comparison in enumerate(comparisons) if comparison[0] == "human_top10"
                 for p in (p_a[2 * i], p_a[2 * i + 1])]
    threshold = float(np.median(reference)) if reference else 0.5
    return (_verdicts(comparisons, p_a, threshold, tie_to_b=True),
            {"threshold": threshold, **dataclasses.asdict(client.stats)})


def _best_pick_judgments(cfg: JudgeConfig, client, context: dict, comparisons: list[tuple]):
    """With the cartoon: the funniest caption of each group, then the better of the two picks, both orders."""
    from humor_ray.config import data_root

    images_dir = cfg.images_dir or str(data_root() / "images")
    groups = {}
    for _, _, c, ours, theirs in comparisons:
        for caps in (ours, theirs):
            groups[(c, tuple(caps))] = caps
    keys = list(groups)
    pick_requests = [pick_request(context[c][0], _image_part(images_dir, context[c][1]), list(caps))
                     for c, caps in keys]
    if cfg.dry_run:
        return [], client.dry_run(pick_requests)
    picks = {key: _picked(a, list(key[1])) for key, a in zip(keys, client.complete_many(pick_requests))}
    duel_requests = []
    for _, _, c, ours, theirs in comparisons:
        mine, other = picks[(c, tuple(ours))], picks[(c, tuple(theirs))]
        duel_requests.append(overall_request(context[c][0], [mine], [other], []))
        duel_requests.append(overall_request(context[c][0], [other], [mine], []))
    p_a = [prob_a(a) for a in client.complete_many(duel_requests)]
    return _verdicts(comparisons, p_a, 0.5, tie_to_b=False), dataclasses.asdict(client.stats)


# ---------------------------------------------------------------- driver

def win_rates(judgments, resamples: int, seed: int) -> list[dict]:
    import pandas as pd

    table = pd.DataFrame(judgments)
    rows = []
    for (method, group), part in table.groupby(["method", "against"]):
        wins = [g["win"].tolist() for _, g in part.groupby("contest")]
        rate, low, high = bootstrap_ci(wins, resamples, seed)
        rows.append({"method": method, "against": group, "win_rate": rate, "ci_low": low, "ci_high": high,
                     "contests": len(wins), "judgments": int(len(part))})
    return rows


def run(cfg: JudgeConfig) -> dict:
    import pandas as pd

    generations = read_generations(cfg.generations)
    references = read_references(cfg.dataset_dir)
    keep = choose_contests(references["contest"], cfg.contests, cfg.max_contests,
                           f"the human references of {cfg.dataset_dir}")
    references = references[references["contest"].isin(keep)]
    generations = generations[generations["contest"].isin(keep)]
    missing = sorted(set(generations["contest"]) - set(references["contest"]))
    if missing:
        log.warning(f"{len(missing)} generated contests have no human references and are skipped: {missing[:10]}")
    if cfg.judge == "rm":
        judgments, stats = rm_judgments(cfg, generations, references), {}
    else:
        judgments, stats = llm_judgments(cfg, generations, references)
        if cfg.dry_run:
            print(json.dumps(stats, indent=1))
            return stats
    os.makedirs(cfg.output_dir, exist_ok=True)
    pd.DataFrame(judgments).to_parquet(os.path.join(cfg.output_dir, "judgments.parquet"))
    rates = win_rates(judgments, cfg.bootstrap, cfg.seed)
    reliability = next((r for r in rates if r["method"] == "human_top10" and r["against"] == "rank1000"), None)
    summary = {"judge": cfg.judge if cfg.judge == "rm" else f"{cfg.model} ({cfg.protocol})",
               "win_rates": [r for r in rates if not r["method"].startswith("human_")],
               "reliability": reliability, "references": [r for r in rates if r["method"].startswith("human_")],
               "stats": stats}
    Path(cfg.output_dir, "winrates.json").write_text(json.dumps(summary, indent=1))
    print(format_table(summary))  # the command's result, on standard output
    return summary


def format_table(summary: dict) -> str:
    rates = {(r["method"], r["against"]): r for r in summary["win_rates"]}
    methods = sorted({m for m, _ in rates})
    lines = [f"win rate vs human captions ({summary['judge']}), 95% CI",
             f"{'method':<14}" + "".join(f"{g:>22}" for g in GROUPS)]
    for method in methods:
        cells = []
        for group in GROUPS:
            r = rates.get((method, group))
            cell = f"{100 * r['win_rate']:5.1f} [{100 * r['ci_low']:4.1f},{100 * r['ci_high']:5.1f}]" if r else "-"
            cells.append(cell)
        lines.append(f"{method:<14}" + "".join(f"{c:>22}" for c in cells))
    if summary.get("reliability"):
        r = summary["reliability"]
        lines.append(f"judge reliability: human top-10 beats #1000-1009 in {100 * r['win_rate']:.1f}% "
                     f"[{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}] of {r['judgments']} judgments")
    return "\n".join(lines)
