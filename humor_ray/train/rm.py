"""`humor-ray rm`: a Bradley-Terry reward model on the preference pairs.

The model reads the prompt WITH the cartoon's context, then the caption: the same text it scores later
in best-of-N and PPO (the original trained on captions alone and scored with context). Pairwise accuracy
on the held-out contests' pairs is reported at every evaluation and at the end.
"""

from __future__ import annotations

import dataclasses

from humor_ray.config import field
from humor_ray.models.reward_inputs import encode
from humor_ray.train.launcher import Stage, TrainConfig, hf_args, launch, lora_config

NAME = "rm"


@dataclasses.dataclass
class Config(TrainConfig):
    """Reward model: (prompt with context, caption) -> a scalar; chosen should outscore rejected."""
    model_name: str = field("minilm", "a preset (minilm, tiny, smollm2-135m), a Hugging Face id (a RewardBench "
                            "model such as hf:weqweasdas/RM-Mistral-7B) or a local path", model=("reward",))
    center_rewards_coefficient: float | None = field(None, "pull rewards towards zero (TRL's option)",
                                                       minimum=0)


def dataset_name(cfg: Config) -> str:
    return "pairs"


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
              make_trainer=make_trainer)


def run(cfg: Config):
    return launch(STAGE, cfg)
