"""`humor-ray rm`: a Bradley-Terry reward model on the preference pairs.

The model reads the prompt WITH the cartoon's context, then the caption: the same text it scores later
in best-of-N and PPO (the original trained on captions alone and scored with context). Pairwise accuracy
on the held-out contests' pairs is reported at every evaluation and at the end.

`--contest_fold K/N` trains on one fold of the training contests (humor_ray.data.folds), so that the model
that steers best-of-N or PPO and the one that judges them never saw the same contest. Every fold is
evaluated on the same held-out pairs (a sample seeded by --seed, of --max_eval_examples rows, from the
evaluation contests, which no fold trains on): metrics.json's `held_out` block makes folds comparable.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from humor_ray.config import UserError, field
from humor_ray.data.folds import fold_contests, fold_rows, parse_fold
from humor_ray.models.reward_inputs import encode
from humor_ray.train.export import rewrite_record
from humor_ray.train.launcher import Stage, TrainConfig, hf_args, launch, lora_config, split_path

NAME = "rm"


@dataclasses.dataclass
class Config(TrainConfig):
    """Reward model: (prompt with context, caption) -> a scalar; chosen should outscore rejected."""
    model_name: str = field("minilm", "a preset (minilm, tiny, smollm2-135m), a Hugging Face id (a RewardBench "
                            "model such as hf:weqweasdas/RM-Mistral-7B) or a local path", model=("reward",))
    center_rewards_coefficient: float | None = field(None, "pull rewards towards zero (TRL's option)",
                                                       minimum=0)
    contest_fold: str | None = field(None, "K/N: train only on fold K (1..N) of N folds of the training contests, "
                                           "a contest's fold being sha256 of its id mod N (default: all of them)")

    def __post_init__(self):
        super().__post_init__()
        if self.contest_fold is not None:
            parse_fold(self.contest_fold)  # a malformed fold is one line, before anything runs


def dataset_name(cfg: Config) -> str:
    return "pairs"


def train_filter(cfg: Config, path: str):
    """The training rows of --contest_fold's contests (None: every row)."""
    return fold_rows(path, cfg.contest_fold) if cfg.contest_fold else None


def _tokenized(dataset, tokenizer, max_length: int):
    import datasets

    if dataset is None:
        return None
    prompts = list(dataset["prompt"])
    return datasets.Dataset.from_dict({
        "chosen_ids": encode(tokenizer, prompts, list(dataset["chosen"]), max_length),
        "rejected_ids": encode(tokenizer, prompts, list(dataset["rejected"]), max_length)})


def make_trainer(cfg: Config, train, evaluation, scratch: str):
    from trl import RewardConfig, RewardTrainer

    from humor_ray.models import registry

    args = hf_args(cfg, RewardConfig, scratch, max_length=cfg.max_length,
                   center_rewards_coefficient=cfg.center_rewards_coefficient)
    model, tokenizer = registry.load_model(cfg.base_model(), kind="reward", new_padding_token=cfg.new_padding_token)
    return RewardTrainer(model=model, args=args, train_dataset=_tokenized(train, tokenizer, cfg.max_length),
                         eval_dataset=_tokenized(evaluation, tokenizer, cfg.max_length), processing_class=tokenizer,
                         peft_config=lora_config(cfg, "SEQ_CLS"))


# No caption column gets a leading space: `encode` joins prompt and caption itself.
STAGE = Stage(name=NAME, columns=("prompt", "chosen", "rejected"), caption_columns=(),
              model_kind="reward", best_metric=("eval_accuracy", "max"), dataset_name=dataset_name,
              make_trainer=make_trainer, train_filter=train_filter)


def run(cfg: Config):
    contests = None
    train_path = split_path(cfg, STAGE, "train")
    if cfg.contest_fold and ("://" in train_path or os.path.isdir(train_path)):  # else `launch` says what to run
        contests = fold_contests(train_path, cfg.contest_fold)
        if not contests:
            raise UserError(f"--contest_fold {cfg.contest_fold}: no contest of {train_path} falls in this fold")
    result = launch(STAGE, cfg)
    _record_held_out(cfg, contests)
    return result


def _record_held_out(cfg: Config, contests: list[int] | None) -> None:
    """metrics.json's `held_out` block: the final pairwise accuracy on the held-out pairs and what they were
    (the same --seed and --max_eval_examples give the same pairs whatever the fold), and the fold trained on."""
    import pyarrow.dataset as pds

    summary = json.loads(Path(cfg.output_dir, "metrics.json").read_text())
    if cfg.do_eval:
        rows = pds.dataset(split_path(cfg, STAGE, "eval"), format="parquet").count_rows()
        summary["held_out"] = {"accuracy": summary["eval"].get("eval_accuracy"), "split": "eval",
                               "pairs": min(rows, cfg.max_eval_examples), "seed": cfg.seed}
    summary["contest_fold"] = cfg.contest_fold
    summary["train_contests"] = contests
    rewrite_record(cfg.output_dir, summary)
