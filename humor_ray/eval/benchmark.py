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
Beside each raw win rate, a length-controlled one (as AlpacaEval 2 does): per method and human group, a
logistic regression of the judgments on the difference in mean caption length (words) between the two
groups of a contest, read at zero difference.
The judge's reliability is printed with every table and written to winrates.json: (a) human top-10 against
#1000-1009; (b) the share of the six pairs of human groups the judge orders as their ranks do (top-10 over
#200 over #1000 over median), averaged over contests; for the reward model (c) its accuracy on seeded
held-out pairs, by vote margin and on length-matched pairs, and (d) the rank correlation of its reward with
caption length on human captions, beside that of the human mean rating. When (a) or (b) does not clear
chance, the table is shown as what it is, not as a ranking.
Confidence intervals: 95%, bootstrap over contests (the two orders of a contest stay together).

Generations: our `humor-ray generate`/`bon` output directories, wide CSV files (contest_number, prompt,
caption1..N, or the paper's release with columns 0..9 and contest_num) or a directory of them (the
paper's released generations, one file per method; its human_* files are skipped).
"""

from __future__ import annotations

import base64
import dataclasses
import itertools
import json
import math
import os
from pathlib import Path

import numpy as np

from humor_ray.config import ConfigError, Options, UserError, field
from humor_ray.data.generations import choose_contests, read_generations
from humor_ray.data.outputs import require_complete
from humor_ray.log import get_logger

GROUPS = ("top10", "rank200", "rank1000", "median")  # best first: the order reliability (b) expects
LENGTH_MATCHED_WORDS = 2  # reliability (c): a pair whose captions differ by at most this many words
CHANCE = 0.5
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
    reliability_pairs: int = field(2000, "for --judge rm: seeded held-out preference pairs the reward model's "
                                         "accuracy is measured on for the reliability block, drawn as `humor-ray rm` "
                                         "draws its --max_eval_examples (jobs/rm-minilm.yaml: 2000); 0: none",
                                   minimum=0)
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


def words(caption) -> int:
    return len(str(caption).split())


def _contest_weights(contests: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(1 + resamples, judgments): each judgment's weight, its contest's count in the sample; the first row
    the data as they are, then one row per bootstrap resample of whole contests."""
    ids, index = np.unique(contests, return_inverse=True)
    draws = np.random.default_rng(seed).integers(0, len(ids), size=(resamples, len(ids)))
    counts = np.zeros((resamples, len(ids)))
    np.add.at(counts, (np.arange(resamples)[:, None], draws), 1)
    return np.vstack([np.ones(len(ids)), counts])[:, index]


def _logistic_intercepts(x: np.ndarray, y: np.ndarray, weights: np.ndarray, ridge: float = 1e-3) -> np.ndarray:
    """The intercepts of logistic regressions of y on x, one per row of `weights`, fitted together by Newton's
    method. A small ridge keeps a fit finite when the judgments are separable (all wins, or length decides).
    Each fit has two parameters: its Hessian's three entries are sums, and the step is solved by hand (a
    batched einsum and solve over 2,001 fits took seconds of every judge run)."""
    intercept, slope = np.zeros(len(weights)), np.zeros(len(weights))
    for _ in range(60):
        p = 1.0 / (1.0 + np.exp(-np.clip(intercept[:, None] + slope[:, None] * x, -30, 30)))
        residual, curvature = weights * (y - p), weights * p * (1 - p)
        g0, g1 = residual.sum(1) - ridge * intercept, residual @ x - ridge * slope
        h00, h01, h11 = curvature.sum(1) + ridge, curvature @ x, curvature @ (x * x) + ridge
        determinant = h00 * h11 - h01 * h01
        step0, step1 = (h11 * g0 - h01 * g1) / determinant, (h00 * g1 - h01 * g0) / determinant
        intercept += np.clip(step0, -2.0, 2.0)  # damped: the first steps of a separable fit would overshoot
        slope += np.clip(step1, -2.0, 2.0)
        if max(np.abs(step0).max(), np.abs(step1).max()) < 1e-12:  # every fit has converged
            break
    return intercept


def lc_win_rate(contests, wins, length_diffs, resamples: int, seed: int) -> tuple[float, float, float]:
    """(length-controlled win rate, 95% low, 95% high): the win probability at zero difference in mean
    caption length, from a logistic regression of the judgments on that difference; contests resampled whole."""
    x, y = np.asarray(length_diffs, dtype=float), np.asarray(wins, dtype=float)
    if not len(y):
        return math.nan, math.nan, math.nan
    weights = _contest_weights(np.asarray(contests), resamples, seed)
    rates = 1.0 / (1.0 + np.exp(-_logistic_intercepts(x, y, weights)))
    low, high = np.percentile(rates[1:], [2.5, 97.5])
    return float(rates[0]), float(low), float(high)


def mean_lengths(generations, references) -> dict[tuple[str, int], float]:
    """(method, or human_<group>, contest) -> the mean caption length in words."""
    out = {(m, int(c)): float(rows["caption"].map(words).mean()) for (m, c), rows in
           generations.groupby(["method", "contest"])}
    out.update({(f"human_{g}", int(c)): float(rows["caption"].map(words).mean()) for (g, c), rows in
                references.groupby(["group", "contest"])})
    return out


def add_length_diffs(judgments: list[dict], lengths: dict[tuple[str, int], float]) -> None:
    """Each judgment's difference in mean caption length, its side's minus the human group's (words)."""
    for j in judgments:
        ours, theirs = lengths.get((j["method"], j["contest"])), lengths.get((f"human_{j['against']}", j["contest"]))
        j["length_diff"] = math.nan if ours is None or theirs is None else ours - theirs


# ---------------------------------------------------------------- the judge's reliability

def group_order(judgments: list[dict], resamples: int, seed: int) -> dict | None:
    """(b) Per contest, the share of the six pairs of human groups the judge orders as their ranks do (top-10
    over #200 over #1000 over median; a pair judged in both orders counts their mean), averaged over contests."""
    right: dict[int, list[float]] = {}
    for higher, lower in itertools.combinations(GROUPS, 2):
        verdicts: dict[int, list[float]] = {}
        for j in judgments:
            if j["method"] == f"human_{higher}" and j["against"] == lower:
                verdicts.setdefault(j["contest"], []).append(j["win"])
        for contest, wins in verdicts.items():
            right.setdefault(contest, []).append(float(np.mean(wins)))
    if not right:
        return None
    rate, low, high = bootstrap_ci([[float(np.mean(v))] for v in right.values()], resamples, seed)
    return {"share_right": rate, "ci_low": low, "ci_high": high, "contests": len(right),
            "pairs": sum(map(len, right.values()))}


def held_out_pairs(dataset_dir: str, limit: int, seed: int):
    """(c) A seeded sample of `limit` held-out preference pairs, drawn as `humor-ray rm` draws its evaluation
    pairs (the same --seed and --max_eval_examples give the same pairs); None without a pairs dataset."""
    from humor_ray.train.launcher import seeded_sample

    path = os.path.join(dataset_dir, "pairs", "eval")
    if not os.path.isdir(path):
        return None
    columns = ["contest", "prompt", "chosen", "rejected", "chosen_mean", "rejected_mean"]
    return seeded_sample(path, columns, limit, seed).to_pandas()


def held_out_accuracy(pairs, chosen_scores, rejected_scores) -> dict:
    """(c) Pairwise accuracy on the held-out pairs: overall, by quartile of the vote margin (chosen minus
    rejected mean rating), and on length-matched pairs; beside it, how often the longer caption is the chosen."""
    right = np.asarray(chosen_scores) > np.asarray(rejected_scores)
    margin = (pairs["chosen_mean"] - pairs["rejected_mean"]).to_numpy()
    gap = (pairs["chosen"].map(words) - pairs["rejected"].map(words)).to_numpy()
    edges = np.quantile(margin, [0, 0.25, 0.5, 0.75, 1])
    bucket = np.clip(np.searchsorted(edges, margin, side="right") - 1, 0, 3)
    by_margin = [{"margin_low": float(edges[b]), "margin_high": float(edges[b + 1]),
                  "pairs": int((bucket == b).sum()), "accuracy": float(right[bucket == b].mean())}
                 for b in range(4) if (bucket == b).any()]
    matched = np.abs(gap) <= LENGTH_MATCHED_WORDS
    return {"pairs": int(len(right)), "accuracy": float(right.mean()), "by_margin": by_margin,
            "length_matched": {"max_words_apart": LENGTH_MATCHED_WORDS, "pairs": int(matched.sum()),
                               "accuracy": float(right[matched].mean()) if matched.any() else None},
            "longer_caption_accuracy": float(np.mean(np.where(gap == 0, 0.5, gap > 0)))}


def spearman(x, y) -> float:
    """Spearman's rank correlation: Pearson's on the ranks, ties sharing their mean rank."""
    import pandas as pd

    ranks = pd.DataFrame({"x": np.asarray(x, dtype=float), "y": np.asarray(y, dtype=float)}).rank()
    if len(ranks) < 2 or ranks["x"].nunique() < 2 or ranks["y"].nunique() < 2:
        return math.nan
    return float(np.corrcoef(ranks["x"], ranks["y"])[0, 1])


def length_correlation(human) -> dict:
    """(d) Spearman's rank correlation with caption length (words), over the human reference captions, of the
    judge's reward and of the human mean rating."""
    length = human["caption"].map(words)
    return {"captions": int(len(human)), "reward_vs_words": spearman(human["reward"], length),
            "human_mean_vs_words": spearman(human["mean"], length)}


# ---------------------------------------------------------------- the reward-model judge

def rm_judgments(cfg: JudgeConfig, generations, references) -> tuple[list[dict], dict]:
    """One judgment per (method or reference group, human group, contest): mean rewards compared; and the
    reward model's part of the reliability block: (c) on seeded held-out pairs, (d) on the human captions."""
    context = read_context(cfg.dataset_dir, "eval")
    sets = []  # (kind, name, contest, captions)
    for (method, contest), rows in generations.groupby(["method", "contest"]):
        sets.append(("method", method, int(contest), rows.sort_values("sample")["caption"].tolist()))
    human = references[references["contest"].astype(int).isin(context)].sort_values(["group", "contest", "rank"])
    for (group, contest), rows in human.groupby(["group", "contest"], sort=False):
        sets.append(("human", group, int(contest), rows["caption"].tolist()))  # in `human`'s row order
    sets = [s for s in sets if s[2] in context]
    pairs = held_out_pairs(cfg.dataset_dir, cfg.reliability_pairs, cfg.seed) if cfg.reliability_pairs else None
    prompts = [context[c][0] for _, _, c, caps in sets for _ in caps]
    captions = [cap for _, _, _, caps in sets for cap in caps]
    if pairs is not None:  # chosen, then rejected, after the groups' captions
        prompts += list(pairs["prompt"]) * 2
        captions += list(pairs["chosen"]) + list(pairs["rejected"])
    log.info(f"scoring {len(captions):,} captions with the reward model")
    scores = np.asarray(_reward_scores(cfg, prompts, captions), dtype=float)
    means, start = {}, 0
    for kind, name, contest, caps in sets:
        means[(kind, name, contest)] = float(np.mean(scores[start:start + len(caps)]))
        start += len(caps)
    extra = {"length_correlation": length_correlation(human.assign(reward=_human_scores(sets, scores)))}
    if pairs is not None:
        extra["rm_held_out"] = held_out_accuracy(pairs, scores[start:start + len(pairs)],
                                                 scores[start + len(pairs):])
    return _mean_judgments(means), extra


def _human_scores(sets: list[tuple], scores: np.ndarray) -> np.ndarray:
    """The human captions' rewards, in the order their sets were listed."""
    out, start = [], 0
    for kind, _, _, caps in sets:
        if kind == "human":
            out.append(scores[start:start + len(caps)])
        start += len(caps)
    return np.concatenate(out) if out else np.empty(0)


def _mean_judgments(means: dict[tuple[str, str, int], float]) -> list[dict]:
    """Every method and human group against each other human group of its contest, by mean reward."""
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


def _reward_scores(cfg: JudgeConfig, prompts: list[str], captions: list[str]) -> list[float]:
    from humor_ray.rl.reward import RewardModel, resolve_reward_model

    spec = resolve_reward_model(cfg.reward_model)
    if cfg.use_gpu:
        return _score_on_gpu(cfg, spec, prompts, captions)
    return RewardModel(spec, cfg.reward_max_length).score(prompts, captions, progress=True)


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
    each human group, and each human group against each lower-ranked one (the reliability checks; human
    top10 vs rank1000 also fits the threshold)."""
    humans = {(g, int(c)): rows["caption"].tolist() for (g, c), rows in references.groupby(["group", "contest"])}
    methods = {(m, int(c)): rows.sort_values("sample")["caption"].tolist()
               for (m, c), rows in generations.groupby(["method", "contest"])}
    contests = sorted({c for _, c in humans} & set(context))
    comparisons = [(m, g, c, caps, humans[(g, c)]) for (m, c), caps in methods.items() for g in GROUPS
                   if (g, c) in humans and c in context]
    comparisons += [(f"human_{higher}", lower, c, humans[(higher, c)], humans[(lower, c)])
                    for c in contests for higher, lower in itertools.combinations(GROUPS, 2)
                    if (higher, c) in humans and (lower, c) in humans]
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
    reference = [p for i, comparison in enumerate(comparisons) if comparison[:2] == ("human_top10", "rank1000")
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
    """Per method (or human group) and human group: the raw win rate and, where the judgments carry their
    `length_diff`, the length-controlled one, each with its 95% interval over contests."""
    import pandas as pd

    table = pd.DataFrame(judgments)
    rows = []
    for (method, group), part in table.groupby(["method", "against"]):
        wins = [g["win"].tolist() for _, g in part.groupby("contest")]
        rate, low, high = bootstrap_ci(wins, resamples, seed)
        row = {"method": method, "against": group, "win_rate": rate, "ci_low": low, "ci_high": high,
               "contests": len(wins), "judgments": int(len(part))}
        if "length_diff" in part:
            known = part[part["length_diff"].notna()]
            lc, lc_low, lc_high = lc_win_rate(known["contest"], known["win"], known["length_diff"], resamples, seed)
            row.update(lc_win_rate=lc, lc_ci_low=lc_low, lc_ci_high=lc_high,
                       length_diff=float(known["length_diff"].mean()) if len(known) else math.nan)
        rows.append(row)
    return rows


def reliability_block(rates: list[dict], judgments: list[dict], rm_part: dict, resamples: int, seed: int) -> dict:
    """winrates.json's `reliability`: (a)'s row at the top (its fields as before), then (a)-(d) by name, and
    `includes_chance`: whether (a) or (b) is missing or its interval reaches down to chance (50%)."""
    top = next((r for r in rates if r["method"] == "human_top10" and r["against"] == "rank1000"), None)
    order = group_order(judgments, resamples, seed)
    block = {**(top or {}), "top10_vs_rank1000": top, "group_order": order,
             "rm_held_out": rm_part.get("rm_held_out"), "length_correlation": rm_part.get("length_correlation")}
    block["includes_chance"] = (top is None or order is None or not top["ci_low"] > CHANCE
                                or not order["ci_low"] > CHANCE)
    return block


def reliability_warning(reliability: dict | None) -> str | None:
    """The words shown above a table whose judge does not clear chance (None when it does)."""
    if reliability and not reliability.get("includes_chance", True):
        return None
    top = (reliability or {}).get("top10_vs_rank1000")
    order = (reliability or {}).get("group_order")
    measured = []
    if top:
        measured.append(f"it picks human top-10 over #1000-1009 in {_percent(top)} of its judgments")
    if order:
        measured.append(f"it orders the four human groups as their ranks do in {_percent(order, 'share_right')} "
                        "of group pairs")
    evidence = "; ".join(measured) if measured else "no contest had the human groups to check it on"
    return (f"This judge cannot rank these methods: its reliability does not clear chance (50%) ({evidence}). "
            "The win rates below are not a ranking; a judge that tells good human captions from worse ones "
            "is needed before any method can be said to beat another.")


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
        (judgments, rm_part), stats = rm_judgments(cfg, generations, references), {}
    else:
        (judgments, stats), rm_part = llm_judgments(cfg, generations, references), {}
        if cfg.dry_run:
            print(json.dumps(stats, indent=1))
            return stats
    add_length_diffs(judgments, mean_lengths(generations, references))
    os.makedirs(cfg.output_dir, exist_ok=True)
    pd.DataFrame(judgments).to_parquet(os.path.join(cfg.output_dir, "judgments.parquet"))
    rates = win_rates(judgments, cfg.bootstrap, cfg.seed)
    judged = {j["contest"] for j in judgments}
    summary = {"judge": cfg.judge if cfg.judge == "rm" else f"{cfg.model} ({cfg.protocol})",
               "win_rates": [r for r in rates if not r["method"].startswith("human_")],
               "reliability": reliability_block(rates, judgments, rm_part, cfg.bootstrap, cfg.seed),
               "references": [r for r in rates if r["method"].startswith("human_")],
               "lengths": caption_lengths(generations[generations["contest"].isin(judged)],
                                          references[references["contest"].isin(judged)]),
               "stats": stats}
    Path(cfg.output_dir, "winrates.json").write_text(json.dumps(summary, indent=1, default=_json_number))
    print(format_table(summary))  # the command's result, on standard output
    return summary


def caption_lengths(generations, references) -> dict[str, float]:
    """Mean caption length in words of each method and each human group (human_<group>), over the contests judged."""
    out = {m: float(rows["caption"].map(words).mean()) for m, rows in generations.groupby("method")}
    out.update({f"human_{g}": float(rows["caption"].map(words).mean()) for g, rows in references.groupby("group")})
    return out


def _json_number(value):
    number = float(value)
    return None if math.isnan(number) else number


def _cell(r: dict | None, key: str = "win_rate", low: str = "ci_low", high: str = "ci_high") -> str:
    if not r or r.get(key) is None or math.isnan(r[key]):
        return "-"
    return f"{100 * r[key]:5.1f} [{100 * r[low]:4.1f},{100 * r[high]:5.1f}]"


def _percent(r: dict, key: str = "win_rate") -> str:
    return f"{100 * r[key]:.1f}% [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]"


def format_table(summary: dict) -> str:
    """The win rates, raw and length-controlled, with mean caption lengths and the judge's reliability; a
    judge that does not clear chance is said so first, and its table is not called a ranking."""
    import textwrap

    rates = {(r["method"], r["against"]): r for r in summary["win_rates"]}
    lengths = summary.get("lengths", {})
    warning = reliability_warning(summary.get("reliability"))
    lines = textwrap.wrap(f"WARNING: {warning}", 110) + [""] if warning else []
    for title, keys in (("win rate", ("win_rate", "ci_low", "ci_high")),
                        ("length-controlled win rate", ("lc_win_rate", "lc_ci_low", "lc_ci_high"))):
        lines += [f"{title} vs human captions ({summary['judge']}), 95% CI"
                  + (" (not a ranking)" if warning else ""),
                  f"{'method':<14}{'words':>6}" + "".join(f"{g:>22}" for g in GROUPS)]
        for method in sorted({m for m, _ in rates}):
            words_cell = f"{lengths[method]:6.1f}" if method in lengths else f"{'-':>6}"
            lines.append(f"{method:<14}{words_cell}" + "".join(f"{_cell(rates.get((method, g)), *keys):>22}"
                                                             for g in GROUPS))
    humans = ", ".join(f"{g} {lengths[f'human_{g}']:.1f}" for g in GROUPS if f"human_{g}" in lengths)
    if humans:
        lines.append(f"human groups, mean words per caption: {humans}")
    return "\n".join(lines + reliability_lines(summary.get("reliability")))


def reliability_lines(reliability: dict | None) -> list[str]:
    """The reliability block, (a)-(d), in words."""
    reliability = reliability or {}
    top, order = reliability.get("top10_vs_rank1000"), reliability.get("group_order")
    held, length = reliability.get("rm_held_out"), reliability.get("length_correlation")
    lines = ["judge reliability (chance: 50%):"]
    lines.append(f"  (a) human top-10 beats #1000-1009 in {_percent(top)} of {top['judgments']} judgments "
                 f"({top['contests']} contests)" if top else "  (a) human top-10 vs #1000-1009: not measured")
    lines.append(f"  (b) the four human groups ordered as their ranks in {_percent(order, 'share_right')} of "
                 f"group pairs ({order['contests']} contests)" if order else "  (b) human group order: not measured")
    if held:
        buckets = ", ".join(f"{b['margin_low']:.2f}-{b['margin_high']:.2f}: {b['accuracy']:.3f}"
                            for b in held["by_margin"])
        matched = held["length_matched"]
        matched_text = f"{matched['accuracy']:.3f}" if matched["accuracy"] is not None else "-"
        lines += [f"  (c) reward model on {held['pairs']:,} held-out pairs: accuracy {held['accuracy']:.3f} (the "
                  f"longer caption: {held['longer_caption_accuracy']:.3f}); length-matched (<= "
                  f"{matched['max_words_apart']} words apart, {matched['pairs']:,} pairs): {matched_text}",
                  f"      by vote margin (mean rating, quartiles): {buckets}"]
    if length:
        lines.append(f"  (d) Spearman with caption length over {length['captions']:,} human captions: reward "
                     f"{length['reward_vs_words']:+.3f}, human mean rating {length['human_mean_vs_words']:+.3f}")
    return lines
