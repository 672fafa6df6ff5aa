"""`humor-ray dpo`: direct preference optimisation on the preference pairs.

Starts from `--model_checkpoint_name` (an SFT output, as in the paper: the simple-prompt SFT with a new
pad token) or `--model_name`. Under LoRA the reference model is the same network with the adapter
disabled, so there is one copy of the weights; without LoRA a frozen copy is loaded.
"""

from __future__ import annotations

import dataclasses

from humor_ray.config import field
from humor_ray.train.launcher import Stage, TrainConfig, hf_args, launch, lora_config

NAME = "dpo"


@dataclasses.dataclass
class Config(TrainConfig):
    """DPO: raise the likelihood of the funnier caption of each pair over the other, relative to the reference."""
    model_checkpoint_name: str | None = field(None, "start from this checkpoint (e.g. an SFT run's final/) "
                                              "instead of --model_name", model=("causal_lm",))
    beta: float = field(0.1, "strength of the pull towards the reference model", exclusive_minimum=0)
    loss_type: list[str] = field(["sigmoid"], "TRL DPO loss(es): sigmoid, hinge, ipo, robust, ... (several are summed)")
    max_prompt_length: int = field(128, "prompt tokens kept (from the end, which holds the cartoon's lines)",
                                   minimum=1)

    def base_model(self) -> str:
        return self.model_checkpoint_name or self.model_name


def dataset_name(cfg: Config) -> str:
    return "pairs"


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
              make_trainer=make_trainer)


def run(cfg: Config):
    return launch(STAGE, cfg)
