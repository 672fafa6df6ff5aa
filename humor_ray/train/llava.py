"""`humor-ray llava`: supervised fine-tuning of a vision-language model on the cartoons and their top captions.

Rows of `llava_sft/` (contest, image, prompt, caption) stream to the workers like every stage's; each batch
reads its cartoons from `--images` only when it is collated, and TRL's vision collator renders the
conversation in the model's chat template (the cartoon and the instruction, then the caption), with the
loss on the caption tokens alone. LoRA adapts the language model; the projector between the vision tower
and the language model trains fully, at `--mm_projector_lr`; the vision tower stays frozen unless
`--train_vision_tower`.
"""

from __future__ import annotations

import dataclasses
import os

from humor_ray.config import data_root, field
from humor_ray.log import get_logger
from humor_ray.train.launcher import Stage, TrainConfig, TrainError, hf_args, launch, lora_config

NAME = "llava"
log = get_logger(NAME)
PROJECTOR, TOWER = "multi_modal_projector", "vision_tower"
# The language model's linear layers (Llama, Mistral): what LoRA adapts unless --lora_targets names others.
LANGUAGE_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass
class Config(TrainConfig):
    """Vision-language SFT: the cartoon + an instruction -> a top human caption."""
    model_name: str = field("tiny-llava", "a vision-language preset (tiny-llava, smollm2-llava), a Hugging Face "
                                          "id (hf:llava-hf/llava-v1.6-mistral-7b-hf) or a local path",
                           model=("image_text",))
    images: str | None = field(None, "folder or URI of the cartoons the dataset's image column names "
                                     "(default: the data's images/)", existing=True)
    mm_projector_lr: float = field(2e-5, "learning rate of the multimodal projector", exclusive_minimum=0)
    train_vision_tower: bool = field(False, "train the vision tower too (frozen by default)")
    gradient_checkpointing: bool = field(False, "recompute activations in the backward pass (less memory)")
    lr_scheduler_type: str = field("cosine", "learning-rate schedule (cosine, linear, constant, ...)")
    warmup_ratio: float = field(0.03, "share of the steps spent warming the learning rate up", minimum=0,
                                maximum=1)

    def __post_init__(self):
        super().__post_init__()
        if self.images is None:
            self.images = str(data_root() / "images")


def dataset_name(cfg: Config) -> str:
    return "llava_sft"


class ImageConversations:
    """Collates rows into model inputs, reading each row's cartoon only now: the dataset holds file names,
    never images."""

    def __init__(self, processor, images: str, max_length: int):
        from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

        self.images = images
        self.collate = DataCollatorForVisionLanguageModeling(processor, max_length=max_length,
                                                             completion_only_loss=True)

    def __call__(self, rows: list[dict]) -> dict:
        from humor_ray.models.vision import completion_messages, instruction_of, open_image, prompt_messages

        return self.collate([{"images": [open_image(self.images, row["image"])],
                              "prompt": prompt_messages(instruction_of(row["prompt"])),
                              "completion": completion_messages(row["caption"])} for row in rows])


def usable_rows(dataset, images: str, split: str, report: bool):
    """The rows whose cartoon can be read; a contest without one is reported by contest and file."""
    from humor_ray.models.vision import check_images

    image_of = dict(zip((int(c) for c in dataset["contest"]), dataset["image"]))
    usable, problems = check_images(images, image_of)
    if report:
        for problem in problems:
            log.warning(f"{split}: {problem}")
    if len(usable) == len(image_of):
        return dataset
    keep = {str(c) for c in usable}
    return dataset.filter(lambda batch: [c in keep for c in batch["contest"]], batched=True)


def projector_param_groups(model, learning_rate: float, projector_lr: float, weight_decay: float, decayed: set):
    """Optimizer groups: the projector at its own learning rate; no weight decay on biases and norms."""
    groups: dict[tuple[float, float], list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            key = (projector_lr if PROJECTOR in name else learning_rate, weight_decay if name in decayed else 0.0)
            groups.setdefault(key, []).append(param)
    return [{"params": params, "lr": lr, "weight_decay": decay} for (lr, decay), params in groups.items()]


def trainer_class():
    from trl import SFTTrainer

    class LlavaTrainer(SFTTrainer):
        """SFT whose optimizer gives the projector its own learning rate (DeepSpeed builds it here too)."""

        def __init__(self, *args, projector_lr: float, **kwargs):
            self.projector_lr = projector_lr
            super().__init__(*args, **kwargs)

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                model = model or self.model
                optimizer_class, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
                groups = projector_param_groups(model, self.args.learning_rate, self.projector_lr,
                                                self.args.weight_decay, set(self.get_decay_parameter_names(model)))
                self.optimizer = optimizer_class(groups, **kwargs)
            return self.optimizer

    return LlavaTrainer


def peft_config(cfg: Config):
    """LoRA on the language model only; the projector (and a trained tower) are saved whole beside it."""
    names = LANGUAGE_LINEAR if cfg.lora_targets == ["all-linear"] else tuple(cfg.lora_targets)
    return lora_config(cfg, "CAUSAL_LM", target_modules=rf".*language_model.*\.({'|'.join(names)})",
                       modules_to_save=[PROJECTOR, *([TOWER] if cfg.train_vision_tower else [])])


def make_trainer(cfg: Config, train, evaluation, scratch: str):
    import torch.distributed
    from trl import SFTConfig

    from humor_ray.models import registry

    report = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    train = usable_rows(train, cfg.images, "train", report)
    evaluation = usable_rows(evaluation, cfg.images, "eval", report) if evaluation is not None else None
    if len(train) == 0:
        raise TrainError(f"no training row has a readable image under {cfg.images}")
    args = hf_args(cfg, SFTConfig, scratch, max_length=cfg.max_length, completion_only_loss=True,
                   remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True},
                   gradient_checkpointing=cfg.gradient_checkpointing, lr_scheduler_type=cfg.lr_scheduler_type,
                   warmup_steps=cfg.warmup_ratio)  # a float below 1: a share of max_steps
    model, processor = registry.load_model(cfg.base_model(), kind="image_text")
    if not cfg.train_vision_tower:
        model.get_submodule(_tower_path(model)).requires_grad_(False)
    return trainer_class()(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                           processing_class=processor, peft_config=peft_config(cfg),
                           data_collator=ImageConversations(processor, cfg.images, cfg.max_length),
                           projector_lr=cfg.mm_projector_lr)


def _tower_path(model) -> str:
    return next(name for name, _ in model.named_modules() if name.split(".")[-1] == TOWER)


# No caption column gets a leading space: the chat template separates the turns.
STAGE = Stage(name=NAME, columns=("contest", "image", "prompt", "caption"), caption_columns=(),
              model_kind="image_text", best_metric=("eval_loss", "min"), dataset_name=dataset_name,
              make_trainer=make_trainer)


def run(cfg: Config):
    if "://" not in cfg.images and not os.path.isdir(cfg.images):
        raise TrainError(f"--images {cfg.images}: no such folder (the cartoons the llava_sft rows name)")
    return launch(STAGE, cfg)
