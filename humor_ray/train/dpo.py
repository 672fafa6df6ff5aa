"""`humor-ray dpo`: direct preference optimisation on the preference pairs.

Starts from `--model_checkpoint_name` (an SFT output, as in the paper: the simple-prompt SFT with a new
pad token) or `--model_name`. Under LoRA the reference model is the same network with the adapter
disabled, so there is one copy of the weights; without LoRA a frozen copy is loaded.

The pairs are the dataset's (`--pairs ratings`, from the human ratings), or (`--pairs diverse`) built from a
pool of sampled captions scored by a reward model (`--pairs_from`: `humor-ray bon --split train`'s output,
its candidates.parquet): per training contest the most distinct captions at or above a reward quantile
against the least distinct below it (`humor_ray.data.pairs.diverse_pairs`), distinct meaning far in
sentence-embedding space from the rest of the contest's pool. They are written to `<output_dir>/pairs/train`
before training; evaluation stays on the dataset's held-out pairs.
"""

from __future__ import annotations

import dataclasses

import os

from humor_ray.config import ConfigError, UserError, field
from humor_ray.eval.diversity import EMBEDDING_MODELS
from humor_ray.train.launcher import Stage, TrainConfig, hf_args, launch, lora_config

NAME = "dpo"
PAIR_SOURCES = ("ratings", "diverse")


@dataclasses.dataclass
class Config(TrainConfig):
    """DPO: raise the likelihood of the funnier caption of each pair over the other, relative to the reference."""
    model_checkpoint_name: str | None = field(None, "start from this checkpoint (e.g. an SFT run's final/) "
                                              "instead of --model_name", model=("causal_lm",))
    beta: float = field(0.1, "strength of the pull towards the reference model", exclusive_minimum=0)
    loss_type: list[str] = field(["sigmoid"], "TRL DPO loss(es): sigmoid, hinge, ipo, robust, ... (several are summed)")
    max_prompt_length: int = field(128, "prompt tokens kept (from the end, which holds the cartoon's lines)",
                                   minimum=1)
    pairs: str = field("ratings", "training pairs: ratings (the dataset's, from the human ratings) or diverse "
                                  "(from --pairs_from: distinct captions above a reward quantile against "
                                  "repetitive ones below it)", choices=PAIR_SOURCES)
    pairs_from: str | None = field(None, "--pairs diverse: a `humor-ray bon --split train` output directory (its "
                                         "candidates.parquet: sampled captions with their rewards)", existing=True)
    pairs_quantile: float = field(0.5, "--pairs diverse: the reward quantile of a contest's pool that splits "
                                       "chosen (at or above) from rejected (below)",
                                  exclusive_minimum=0, exclusive_maximum=1)
    pairs_per_contest: int = field(4, "--pairs diverse: pairs per training contest at most", minimum=1)
    pairs_embedding: str = field("minilm", "--pairs diverse: sentence embeddings that measure distinctness",
                                 choices=EMBEDDING_MODELS)

    def __post_init__(self):
        super().__post_init__()
        if (self.pairs == "diverse") != bool(self.pairs_from):
            raise ConfigError("--pairs diverse and --pairs_from go together: the pool is what the pairs come from")
        if self.pairs_from and "://" in self.output_dir:
            raise ConfigError("--pairs diverse writes its pairs into --output_dir: use a local folder")

    def base_model(self) -> str:
        return self.model_checkpoint_name or self.model_name


def dataset_name(cfg: Config) -> str:
    return "pairs"


def train_dir(cfg: Config) -> str | None:
    """Where the pairs built from --pairs_from are (None: the dataset's pairs)."""
    return os.path.join(cfg.output_dir, "pairs", "train") if cfg.pairs == "diverse" else None


def _cut_prompts(dataset, tokenizer, max_prompt_length: int):
    """Prompts longer than `max_prompt_length` tokens lose their beginning. Prompts repeat per contest,
    so each distinct one is tokenized once."""
    import datasets
    import pyarrow as pa

    if dataset is None:
        return None
    prompts = list(dataset["prompt"])
    cut = {}
    for prompt in set(prompts):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        cut[prompt] = prompt if len(ids) <= max_prompt_length else tokenizer.decode(ids[-max_prompt_length:])
    table = dataset.data.table
    return datasets.Dataset(table.set_column(table.column_names.index("prompt"), "prompt",
                                             pa.array([cut[p] for p in prompts], pa.string())))


def make_trainer(cfg: Config, train, evaluation, scratch: str):
    from trl import DPOConfig, DPOTrainer

    from humor_ray.models import registry

    args = hf_args(cfg, DPOConfig, scratch, beta=cfg.beta, loss_type=cfg.loss_type, max_length=cfg.max_length)
    model, tokenizer = registry.load_model(cfg.base_model(), new_padding_token=cfg.new_padding_token)
    peft = lora_config(cfg, "CAUSAL_LM")
    reference = None if peft else registry.load_model(cfg.base_model(), new_padding_token=cfg.new_padding_token)[0]
    return DPOTrainer(model=model, ref_model=reference, args=args,
                      train_dataset=_cut_prompts(train, tokenizer, cfg.max_prompt_length),
                      eval_dataset=_cut_prompts(evaluation, tokenizer, cfg.max_prompt_length),
                      processing_class=tokenizer, peft_config=peft)


STAGE = Stage(name=NAME, columns=("prompt", "chosen", "rejected"), caption_columns=("chosen", "rejected"),
              model_kind="causal_lm", best_metric=("eval_loss", "min"), dataset_name=dataset_name,
              make_trainer=make_trainer, train_dir=train_dir)


def read_pool(cfg: Config):
    """The pool's captions with their rewards and the simple prompt of their contest (the prompt the
    dataset's pairs have); a contest outside the training split is refused."""
    import pandas as pd

    path = os.path.join(cfg.pairs_from, "candidates.parquet")
    if not os.path.isfile(path):
        raise UserError(f"--pairs_from {cfg.pairs_from}: no candidates.parquet (make the pool with "
                        f"`humor-ray bon --split train`)")
    pool = pd.read_parquet(path, columns=["contest", "sample", "caption", "reward"])
    prompts = pd.read_parquet(os.path.join(cfg.dataset_dir, "prompts", "train"), columns=["contest", "prompt"])
    outside = sorted(set(pool["contest"]) - set(prompts["contest"]))
    if outside:
        raise UserError(f"{path}: contests {outside[:10]} are not training contests of {cfg.dataset_dir} "
                        f"(the pool must come from `humor-ray bon --split train`)")
    pool = pool[pool["caption"].fillna("").str.strip() != ""]
    return pool.merge(prompts, on="contest").sort_values(["contest", "sample"], ignore_index=True)


def pool_pairs(cfg: Config):
    """The --pairs diverse training pairs (prompt, chosen, rejected, contest) from the pool."""
    import numpy as np
    import pandas as pd

    from humor_ray.data.pairs import diverse_pairs
    from humor_ray.eval.diversity import embed, group_diversity

    pool = read_pool(cfg)
    vectors = embed(pool["caption"].tolist(), model=cfg.pairs_embedding)
    rows = []
    for contest, part in pool.groupby("contest", sort=True):
        if len(part) < 2:
            continue
        distinct = group_diversity(vectors[part.index.tolist()], len(part)).numpy()
        chosen, rejected = diverse_pairs(part["reward"].to_numpy(), distinct, cfg.pairs_quantile,
                                         cfg.pairs_per_contest)
        captions = part["caption"].to_numpy()
        rows += [{"contest": int(contest), "prompt": part["prompt"].iloc[0], "chosen": captions[c],
                  "rejected": captions[r]} for c, r in zip(chosen, rejected)]
    if not rows:
        raise UserError(f"--pairs_from {cfg.pairs_from}: no contest's pool gave a pair (every reward equal?)")
    return pd.DataFrame(rows, columns=["contest", "prompt", "chosen", "rejected"]).astype({"contest": np.int64})


def write_pool_pairs(cfg: Config) -> int:
    """Build the --pairs diverse pairs into <output_dir>/pairs/train; how many."""
    from pathlib import Path

    pairs = pool_pairs(cfg)
    folder = Path(train_dir(cfg))
    folder.mkdir(parents=True, exist_ok=True)
    pairs.to_parquet(folder / "part-0.parquet", index=False)
    return len(pairs)


def run(cfg: Config):
    if cfg.pairs == "diverse":
        from humor_ray.log import get_logger

        cfg.output_dir, cfg.pairs_from = os.path.abspath(cfg.output_dir), os.path.abspath(cfg.pairs_from)
        count = write_pool_pairs(cfg)
        get_logger(NAME).info(f"{count} diverse pairs from {cfg.pairs_from} in {train_dir(cfg)}")
    return launch(STAGE, cfg)
