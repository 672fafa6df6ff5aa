"""`humor-ray generate` and `humor-ray bon`: captions for the evaluation contests, as a Ray Data job.

Prompts stream through a pool of engine actors (`map_batches` over vLLM or HF-generate engines, one per
worker or GPU). Every method uses the paper's decoding; the caption is the generation's first line,
quotes stripped, with any echo of the prompt's "funny caption:" removed, and never cut inside a word
(a generation that ran into --max_new_tokens loses its unfinished last word). Empty captions are drawn
again, up to --max_attempts; what stays empty is reported.

Best-of-N (`bon`) draws --candidates_factor x N captions per contest, scores every one with the reward
model (prompt with the cartoon's context + caption, in its own Ray Data stage) and keeps N of them
(`--select`, humor_ray/infer/selection.py): `top`, the N with the highest reward, best first; or `mmr`, N
picked greedily by reward and by how little each resembles those already picked (sentence embeddings, as
`humor-ray diversity` computes them). The kept captions carry their reward.

Outputs in --output_dir: `captions.parquet` (long: contest, method, sample, caption, and reward for bon),
`<method>.csv` (wide: contest_number, prompt, caption1..N, the layout of the paper's released
generations), `candidates.parquet` (bon: every scored candidate, whether it was picked and its place among the
picks) and `summary.json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path

from humor_ray.config import ConfigError, UserError, data_root, field
from humor_ray.data.generations import choose_contests
from humor_ray.data.outputs import require_complete, written_aside
from humor_ray.engines import ENGINES, Decoding, DecodingOptions, clean_caption, vllm_env
from humor_ray.eval.diversity import EMBEDDING_MODELS
from humor_ray.infer.selection import SELECTIONS
from humor_ray.log import get_logger
from humor_ray.metrics import StageMetrics
from humor_ray.placement import EngineGpuOptions, check_cluster, inference_plan

log = get_logger("generate")


@dataclasses.dataclass
class GenerateConfig(EngineGpuOptions, DecodingOptions):
    """N captions per evaluation contest from one model."""
    dataset_dir: str = field(None, "the output of `humor-ray data build` (its prompts/<split>)",
                            required=True)
    output_dir: str = field(None, "where the captions go", required=True)
    model_name: str = field("tiny", "a training output directory (sft, dpo, ppo), a preset or a Hugging Face id "
                                    "(hf:OWNER/NAME)", model=("causal_lm", "image_text"))
    method: str | None = field(None, "the method's name in tables and the report (default: from --model_name)")
    n: int = field(10, "captions per contest", minimum=1)
    split: str = field("eval", "prompts split: eval or train")
    simple_prompt: bool = field(False, "the simple prompt (context lines only) instead of the long instruction prompt")
    max_contests: int | None = field(None, "only the first this many contests (quick runs)", minimum=1)
    contests: list[int] = field([], "only these contests (before --max_contests)", minimum=1)
    engine: str = field("vllm", "the generation engine", choices=ENGINES)
    num_engines: int = field(1, "engine actors (one per GPU with --use_gpu)", minimum=1)
    cpus_per_engine: int | None = field(None, "CPUs of each engine actor, and so its compute threads (default: on a "
                                              "local cluster without --use_gpu, this machine's cores shared among "
                                              "the engines; else 1)", minimum=1)
    use_gpu: bool = field(False, "one GPU per engine (bon: and one for the reward model)")
    batch_size: int = field(8, "contests per engine call (on a CPU, 8 make about 15% more captions a second than 4)",
                            minimum=1)
    max_new_tokens: int = field(64, "tokens per generation at most", minimum=1)
    max_attempts: int = field(3, "draws per caption before an empty one is reported", minimum=1)
    seed: int = field(2024, "sampling seed", minimum=0)
    images: str | None = field(None, "the cartoons, for a vision-language model (default: the data's images/)",
                                 existing=True)
    overwrite: bool = field(False, "replace --output_dir even when it holds files that are not an earlier generation")

    def __post_init__(self):
        if not self.dataset_dir or not self.output_dir:
            raise ConfigError("generation needs --dataset_dir and --output_dir")
        super().__post_init__()
        if self.images is None:
            self.images = str(data_root() / "images")
        if "://" not in self.images:  # the engine actors run in other directories
            self.images = os.path.abspath(self.images)

    def method_name(self) -> str:
        if self.method:
            return self.method
        path = Path(self.model_name)
        # runs/sft/final -> sft
        return path.parent.name if path.name in ("final", "merged") else (path.name or str(path))


@dataclasses.dataclass
class BonConfig(GenerateConfig):
    """Best-of-N: generate factor x N, keep the N the reward model scores highest (or, --select mmr, N picked by
    reward and by how unlike each other they are)."""
    reward_model: str = field(None, "a `humor-ray rm` output directory or a reward model directory",
                              required=True)
    candidates_factor: int = field(5, "candidates per kept caption (the paper: 50 for 10)", minimum=1)
    reward_max_length: int = field(512, "tokens of prompt + caption the reward model reads", minimum=1)
    select: str = field("top", "which candidates are kept: top (the N highest rewards) or mmr (maximal marginal "
                               "relevance: each pick maximises (1 - L) x standardised reward - L x its highest "
                               "cosine similarity to the captions already picked)", choices=SELECTIONS)
    diversity_weight: float = field(0.5, "L of --select mmr: 0 keeps the top rewards, 1 ignores them",
                                    minimum=0, maximum=1)
    embedding: str = field("minilm", "sentence embeddings of --select mmr: minilm (all-MiniLM-L6-v2, fast) or "
                                     "mpnet (all-mpnet-base-v2, what `humor-ray diversity` measures with)",
                           choices=EMBEDDING_MODELS)

    def __post_init__(self):
        super().__post_init__()
        if not self.reward_model:
            raise ConfigError("bon needs --reward_model")

    def method_name(self) -> str:
        return self.method or f"{super().method_name()}_BoN"


class CaptionWriter:
    """A Ray Data actor holding one engine: contests in, `n` clean captions each out."""

    def __init__(self, engine: str, model_dir: str, n: int, decoding: Decoding, max_attempts: int, seed: int,
                 figures: StageMetrics, images: str | None = None, gpu_memory: float = 0.0):
        from humor_ray.engines import engine_class

        # `gpu_memory`: the engine's share of its GPU's memory (humor_ray.placement); 0 on the CPU.
        self.engine = engine_class(engine)(model_dir, 0, None, gpu_memory, seed)
        self.n, self.decoding, self.max_attempts, self.images = n, decoding, max_attempts, images
        self.figures = figures

    def __call__(self, batch: dict) -> dict:
        from humor_ray.models.vision import open_image

        prompts = list(batch["policy_prompt"])
        # A vision-language model's prompts each come with their cartoon, read for this batch only.
        cartoons = [open_image(self.images, name) for name in batch["image"]] if self.images else None
        found: list[list[tuple[str, str]]] = [[] for _ in prompts]
        attempts = [0] * len(prompts)
        todo = list(range(len(prompts)))
        while todo:
            missing = {i: self.n - len(found[i]) for i in todo}
            # One call per distinct shortfall keeps the engine batched.
            for count in sorted(set(missing.values())):
                group = [i for i in todo if missing[i] == count]
                images = [cartoons[i] for i in group] if cartoons else None
                empty = 0
                for sample in self.engine.generate([prompts[i] for i in group], count, self.decoding, images=images):
                    i = group[sample.prompt_index]
                    caption = clean_caption(sample.text, sample.finished)
                    if caption and len(found[i]) < self.n:
                        found[i].append((caption, sample.text))
                    empty += not caption
                self.figures.count("infer_empty_captions", empty,
                                   "draws that gave an empty caption (drawn again up to --max_attempts)")
            for i in todo:
                attempts[i] += 1
            todo = [i for i in todo if len(found[i]) < self.n and attempts[i] < self.max_attempts]
        self.figures.count("infer_captions", sum(len(captions) for captions in found), "captions generated")
        out = {"contest": [], "sample": [], "caption": [], "generation": [], "prompt": [], "reward_prompt": []}
        for i, captions in enumerate(found):
            for k, (caption, raw) in enumerate(captions):
                out["contest"].append(int(batch["contest"][i]))
                out["sample"].append(k)
                out["caption"].append(caption)
                out["generation"].append(raw)
                out["prompt"].append(prompts[i])
                out["reward_prompt"].append(batch["reward_prompt"][i])
        return out


class RewardScorer:
    """A Ray Data actor scoring (prompt with context, caption) with the reward model."""

    def __init__(self, spec: str, max_length: int):
        from humor_ray.rl.reward import RewardModel

        self.model = RewardModel(spec, max_length)

    def __call__(self, batch: dict) -> dict:
        batch["reward"] = self.model.score(list(batch["reward_prompt"]), list(batch["caption"]))
        return batch


def read_prompts(cfg: GenerateConfig):
    """The split's prompts: contest, what the policy reads, what the reward model reads."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as pds

    require_complete(cfg.dataset_dir)
    path = os.path.join(cfg.dataset_dir, "prompts", cfg.split)
    if "://" not in path and not os.path.isdir(path):
        raise UserError(f"{path} not found: run `humor-ray data build` first")
    table = pds.dataset(path, format="parquet").to_table().sort_by("contest")
    keep = choose_contests(table["contest"].to_pylist(), cfg.contests, cfg.max_contests, path)
    table = table.filter(pc.is_in(table["contest"], pa.array(keep, table["contest"].type)))
    column = "prompt" if cfg.simple_prompt else "prompt_long"
    return pa.table({"contest": table["contest"].cast(pa.int64()), "policy_prompt": table[column],
                     "reward_prompt": table["prompt"], "image": table["image"]})


def with_cartoons(cfg: GenerateConfig, prompts, model_dir: str):
    """For a vision-language model: the contests whose cartoon can be read (the others are reported by
    contest and file), each prompted with the cartoon and the instruction in the model's chat template."""
    import pyarrow as pa

    from humor_ray.data.prompts import IMAGE_INSTRUCTION
    from humor_ray.models import registry
    from humor_ray.models.vision import chat_prompt, check_images

    usable, problems = check_images(cfg.images, dict(zip(prompts["contest"].to_pylist(),
                                                         prompts["image"].to_pylist())))
    for problem in problems:
        log.warning(f"{cfg.method_name()}: {problem}")
    if not usable:
        raise UserError(f"no evaluation contest has a readable cartoon under {cfg.images}")
    prompts = prompts.filter(pa.array([c in usable for c in prompts["contest"].to_pylist()]))
    text = chat_prompt(registry.load_processor(model_dir), IMAGE_INSTRUCTION)
    return prompts.set_column(prompts.column_names.index("policy_prompt"), "policy_prompt",
                              pa.repeat(pa.scalar(text, pa.string()), prompts.num_rows))


def _generate(cfg: GenerateConfig, per_contest: int):
    """Ray Data: prompts -> engine actors -> caption rows (an Arrow table)."""
    import ray.data

    from humor_ray.cluster import init_ray
    from humor_ray.models import registry

    prompts = read_prompts(cfg)
    model_dir = registry.resolve(cfg.model_name)
    vision = registry.is_vision_language(model_dir)
    if vision:
        prompts = with_cartoons(cfg, prompts, model_dir)
    init_ray()
    plan = placement_plan(cfg)
    check_cluster(plan)  # a cluster too small is one line, before anything loads
    engine = plan.role("engine")
    decoding = cfg.decoding()
    started = time.perf_counter()
    rows = ray.data.from_arrow(prompts).repartition(max(1, prompts.num_rows // cfg.batch_size)).map_batches(
        CaptionWriter, batch_size=cfg.batch_size, compute=ray.data.ActorPoolStrategy(size=cfg.num_engines),
        num_cpus=engine.cpus, num_gpus=engine.gpus,
        fn_constructor_kwargs={"engine": cfg.engine, "model_dir": model_dir, "n": per_contest,
                               "decoding": decoding, "max_attempts": cfg.max_attempts, "seed": cfg.seed,
                               "figures": figures(cfg), "images": cfg.images if vision else None,
                               "gpu_memory": engine.memory},
        runtime_env={"env_vars": vllm_env(engine.memory > 0)})
    return prompts, rows, started


def placement_plan(cfg: GenerateConfig):
    """The engines (and for bon the reward model) and their GPUs (humor_ray.placement)."""
    import ray

    bon = isinstance(cfg, BonConfig)
    cluster_cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else None
    return inference_plan("bon" if bon else "generate", cfg.use_gpu, cfg.num_engines, reward=bon,
                          engine_gpu_memory=cfg.engine_gpu_memory, engine_cpus=engine_cpus(cfg, cluster_cpus))


def engine_cpus(cfg: GenerateConfig, cluster_cpus: int | None) -> int:
    """--cpus_per_engine, else on a local cluster without GPUs the machine's cores shared among the engines (an
    engine given one CPU computes on one thread and leaves the other cores idle), within the cluster's logical
    CPUs (when known) less bon's reward model's one."""
    from humor_ray.cluster import local_cores

    if cfg.cpus_per_engine:
        return cfg.cpus_per_engine
    cores = local_cores()
    if not cores or cfg.use_gpu:
        return 1
    usable = cores if cluster_cpus is None else min(cores, cluster_cpus - isinstance(cfg, BonConfig))
    return max(1, usable // cfg.num_engines)


def figures(cfg: GenerateConfig) -> StageMetrics:
    """The run's figures for the Ray dashboard, by method name and stage (generate or bon)."""
    return StageMetrics(cfg.method_name(), "bon" if isinstance(cfg, BonConfig) else "generate")


def _finish(cfg: GenerateConfig, prompts, table, started: float, extra: dict) -> dict:
    """Write the long and wide outputs and the summary; report contests short of N captions."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    method = cfg.method_name()
    table = table.sort_by([("contest", "ascending"), ("sample", "ascending")])
    table = table.append_column("method", pa.repeat(pa.scalar(method), table.num_rows))
    long = table.select(["contest", "method", "sample", "caption", *[c for c in ("reward",) if c in table.column_names],
                         "generation"])
    pq.write_table(long, os.path.join(cfg.output_dir, "captions.parquet"))
    per_contest: dict[int, list[str]] = {}
    for contest, caption in zip(table["contest"].to_pylist(), table["caption"].to_pylist()):
        per_contest.setdefault(contest, []).append(caption)
    prompt_of = dict(zip(prompts["contest"].to_pylist(), prompts["policy_prompt"].to_pylist()))
    wide = {"contest_number": [], "prompt": [], **{f"caption{k + 1}": [] for k in range(cfg.n)}}
    for contest in sorted(prompt_of):
        captions = per_contest.get(contest, [])
        wide["contest_number"].append(contest)
        wide["prompt"].append(prompt_of[contest])
        for k in range(cfg.n):
            wide[f"caption{k + 1}"].append(captions[k] if k < len(captions) else None)
    import pyarrow.csv as pcsv

    pcsv.write_csv(pa.table(wide), os.path.join(cfg.output_dir, f"{method}.csv"))
    short = {c: cfg.n - len(per_contest.get(c, [])) for c in prompt_of if len(per_contest.get(c, [])) < cfg.n}
    summary = {"method": method, "model": cfg.model_name, "contests": len(prompt_of), "captions": table.num_rows,
               "missing_captions": short, "seconds": round(time.perf_counter() - started, 1), **extra}
    Path(cfg.output_dir, "summary.json").write_text(json.dumps(summary, indent=1))
    run_figures = figures(cfg)
    run_figures.gauge("infer_captions_per_second", table.num_rows / max(time.perf_counter() - started, 1e-9),
                      "captions kept per second, the whole run")
    run_figures.gauge("infer_captions_missing", sum(short.values()), "captions still empty after --max_attempts")
    if short:
        log.warning(f"{method}: {sum(short.values())} captions still empty after {cfg.max_attempts} draws, in "
                    f"contests {sorted(short)}")
    log.info(f"{method}: {table.num_rows} captions for {len(prompt_of)} contests in {summary['seconds']} s")
    return summary


# What a generation folder holds: an earlier generation there is replaced whole, anything else is refused.
GENERATION_FILES = ("captions.parquet", "candidates.parquet", "summary.json", "*.csv")


@contextlib.contextmanager
def _output_aside(cfg: GenerateConfig):
    """`cfg` writing into a folder beside --output_dir, put in place once every file is written."""
    with written_aside(cfg.output_dir, "captions", GENERATION_FILES, cfg.overwrite) as work:
        yield dataclasses.replace(cfg, output_dir=work)
    log.info(f"{cfg.method_name()}: captions in {cfg.output_dir}")


def run(cfg: GenerateConfig) -> dict:
    with _output_aside(cfg) as aside:
        prompts, rows, started = _generate(aside, cfg.n)
        return _finish(aside, prompts, _table(rows), started, {})


def run_bon(cfg: BonConfig) -> dict:

    from humor_ray.rl.reward import resolve_reward_model

    reward_spec = resolve_reward_model(cfg.reward_model)
    with _output_aside(cfg) as aside:
        return _best_of_n(aside, reward_spec)


def _best_of_n(cfg: BonConfig, reward_spec: str) -> dict:
    import numpy as np
    import ray.data

    prompts, rows, started = _generate(cfg, cfg.n * cfg.candidates_factor)
    scored = _table(rows.map_batches(RewardScorer, batch_size=64, compute=ray.data.ActorPoolStrategy(size=1),
                                     num_gpus=placement_plan(cfg).role("reward").gpus,
                                     fn_constructor_kwargs={"spec": reward_spec, "max_length": cfg.reward_max_length}))
    kept = _pick(cfg, scored)
    rewards = scored["reward"].to_numpy()
    return _finish(cfg, prompts, kept, started, {"reward_model": reward_spec, "candidates": scored.num_rows,
                                                 "select": cfg.select, **_selection_settings(cfg),
                                                 "mean_reward_kept": float(np.mean(kept["reward"].to_numpy())),
                                                 "mean_reward_all": float(np.mean(rewards))})


def _selection_settings(cfg: BonConfig) -> dict:
    return {"diversity_weight": cfg.diversity_weight, "embedding": cfg.embedding} if cfg.select == "mmr" else {}


def _pick(cfg: BonConfig, scored):
    """The kept candidates (numbered by their place among the picks); candidates.parquet gets every
    candidate with `picked` and `pick` (its place, -1 when not kept)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from humor_ray.eval.diversity import embed
    from humor_ray.infer.selection import pick_rows

    contests = scored["contest"].to_numpy()
    vectors = embed(scored["caption"].to_pylist(), model=cfg.embedding).numpy() if cfg.select == "mmr" else None
    keep = pick_rows(contests, scored["sample"].to_numpy(), scored["reward"].to_numpy(), cfg.n, cfg.select,
                     cfg.diversity_weight, vectors)
    place = np.full(scored.num_rows, -1, dtype=np.int64)
    for contest in np.unique(contests):
        mine = [row for row in keep if contests[row] == contest]
        place[mine] = np.arange(len(mine))
    candidates = scored.select(["contest", "sample", "caption", "reward"])
    candidates = candidates.append_column("picked", pa.array(place >= 0)).append_column("pick", pa.array(place))
    pq.write_table(candidates, os.path.join(cfg.output_dir, "candidates.parquet"))
    kept = scored.take(pa.array(keep, pa.int64()))
    return kept.set_column(kept.column_names.index("sample"), "sample", pa.array(place[keep], pa.int64()))


def _table(dataset):
    """Run the Ray Data pipeline; its rows as one Arrow table."""
    import pyarrow as pa
    import ray

    tables = [t for t in ray.get(dataset.to_arrow_refs()) if t.num_rows]
    if not tables:
        raise UserError("no captions were generated")
    return pa.concat_tables(tables, promote_options="permissive")
