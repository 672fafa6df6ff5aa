"""`humor-ray sft`: supervised fine-tuning on human captions, loss on the caption tokens only."""

from __future__ import annotations

import dataclasses

from humor_ray.config import field
from humor_ray.train.launcher import Stage, TrainConfig, hf_args, launch, lora_config

NAME = "sft"


@dataclasses.dataclass
class Config(TrainConfig):
    """Supervised fine-tuning: prompt with the cartoon's context -> a human caption."""
    simple_prompt: bool = field(False, "train on the four-line prompt (the form DPO uses) instead of the long one")


def dataset_name(cfg: Config) -> str:
    return "sft_simple" if cfg.simple_prompt else "sft"


def make_trainer(cfg: Config, train, evaluation, scratch: str):
    from trl import SFTConfig, SFTTrainer

    from humor_ray.models import registry

    # Prompt-completion rows: TRL masks the prompt, so the loss is on the caption alone.
    args = hf_args(cfg, SFTConfig, scratch, max_length=cfg.max_length, completion_only_loss=True)
    model, tokenizer = registry.load_model(cfg.base_model(), new_padding_token=cfg.new_padding_token)
    return SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                      processing_class=tokenizer, peft_config=lora_config(cfg, "CAUSAL_LM"))


STAGE = Stage(name=NAME, columns=("prompt", "completion"), caption_columns=("completion",),
              model_kind="causal_lm", best_metric=("eval_loss", "min"), dataset_name=dataset_name,
              make_trainer=make_trainer)


def run(cfg: Config):
    return launch(STAGE, cfg)
