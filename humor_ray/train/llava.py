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
    gradient_checkpointing: bool = field(False, "recompute activations in the backward pass: less memory, about a "
                                                "third more compute")
    lr_scheduler_type: str = field("cosine", "learning-rate schedule (cosine, linear, constant, ...)")
    warmup_ratio: float = field(0.03, "share of the steps spent warming the learning rate up", minimum=0,
                                maximum=1)
    image_aspect_ratio: str = field("native", "how a cartoon becomes image tokens: native (the model's own "
                                    "processor; LLaVA-NeXT tiles it at any resolution, 1,272-2,928 tokens) or pad "
                                    "(padded to a square, one view of the tower's input: 576 tokens at 336 px, "
                                    "as the paper's run)", choices=["native", "pad"])

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


def tokens_per_row(processor, images: str, image_names: list[str], prompts: list[str],
                   captions: list[str]) -> list[int | None]:
    """The tokens each row takes in training, as the collator builds it: the prompt in the chat template with
    the cartoon's image tokens expanded, then the caption's turn. None where the cartoon cannot be read
    (the image check reports and leaves those out). Each cartoon is processed once per instruction."""
    from PIL import Image
    from trl.data_utils import apply_chat_template

    from humor_ray.models.vision import completion_messages, instruction_of, open_image, prompt_messages

    marker = "CAPTION_GOES_HERE"
    prompt_tokens = {}
    for name, prompt in set(zip(image_names, prompts)):
        instruction = instruction_of(prompt)
        text = apply_chat_template({"prompt": prompt_messages(instruction),
                                    "completion": completion_messages(marker)}, processor)
        try:
            image = open_image(images, name)
        except (OSError, Image.DecompressionBombError):
            prompt_tokens[name, prompt] = None
            continue
        ids = processor(images=[image], text=[text["prompt"]], add_special_tokens=False)["input_ids"][0]
        prompt_tokens[name, prompt] = len(ids)
    # The caption's turn is the same text around every caption: tokenized here as the collator does, alone.
    before, after = text["completion"].split(marker) if prompt_tokens else ("", "")
    completions = processor.tokenizer([before + caption + after for caption in captions],
                                      add_special_tokens=False)["input_ids"] if captions else []
    return [None if prompt_tokens[key] is None else prompt_tokens[key] + len(ids)
            for key, ids in zip(zip(image_names, prompts), completions)]


def fitting_rows(processor, images: str, table, max_length: int, split: str, report: bool = True) -> list[bool]:
    """Which rows of `table` (contest, image, prompt, caption) fit in `max_length` tokens. A row that does not
    would lose its caption to truncation (and, cut inside the image tokens, fail): it is reported by contest
    and left out; when most rows do not fit, the recipe is refused."""
    from collections import defaultdict

    counts = tokens_per_row(processor, images, [str(n) for n in table["image"]], [str(p) for p in table["prompt"]],
                            [str(c) for c in table["caption"]])
    fits = [n is None or n <= max_length for n in counts]
    too_long = defaultdict(list)
    for contest, n, ok in zip(table["contest"], counts, fits):
        if not ok:
            too_long[str(contest)].append(n)
    for contest, lengths in sorted(too_long.items()) if report else ():
        need = f"{min(lengths):,}" + (f"-{max(lengths):,}" if max(lengths) > min(lengths) else "")
        log.warning(f"{split}: contest {contest}: {len(lengths)} row(s) need {need} tokens, more than "
                    f"--max_length {max_length}; left out")
    known = [n for n in counts if n is not None]
    if known and sum(fits) * 2 < len(fits):
        raise TrainError(f"--max_length {max_length} fits only {sum(fits):,} of {len(fits):,} {split} rows of "
                         f"llava_sft (a row takes {min(known):,}-{max(known):,} tokens with this model's processor): "
                         "raise --max_length, or read each cartoon as one view with --image_aspect_ratio pad")
    return fits


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

    report = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    train = usable_rows(train, cfg.images, "train", report)
    evaluation = usable_rows(evaluation, cfg.images, "eval", report) if evaluation is not None else None
    if len(train) == 0:
        raise TrainError(f"no training row has a readable image under {cfg.images}")
    args = hf_args(cfg, SFTConfig, scratch, max_length=cfg.max_length, completion_only_loss=True,
                   remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True},
                   lr_scheduler_type=cfg.lr_scheduler_type,
                   warmup_steps=cfg.warmup_ratio)  # a float below 1: a share of max_steps
    model, processor = load_model(cfg)
    if evaluation is not None:
        evaluation = evaluation.select([i for i, ok in enumerate(fitting_rows(
            processor, cfg.images, evaluation, cfg.max_length, "eval", report)) if ok])
    if not cfg.train_vision_tower:
        model.get_submodule(_tower_path(model)).requires_grad_(False)
    return trainer_class()(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                           processing_class=processor, peft_config=peft_config(cfg),
                           data_collator=ImageConversations(processor, cfg.images, cfg.max_length),
                           projector_lr=cfg.mm_projector_lr)


def load_model(cfg: Config):
    """(model, processor) to train, reading each cartoon as --image_aspect_ratio says."""
    from humor_ray.models import registry, vision

    if cfg.image_aspect_ratio == "pad":
        return vision.load_single_view(registry.resolve(cfg.base_model()))
    return registry.load_model(cfg.base_model(), kind="image_text")


def load_processor(cfg: Config):
    """The processor alone (for a Hugging Face id only its processor files are fetched, not the weights)."""
    from transformers import AutoProcessor

    from humor_ray.models import registry, vision
    from humor_ray.models.specs import HUB_ID

    spec = cfg.base_model()
    hub_id = HUB_ID.fullmatch(spec) and not os.path.exists(spec)
    try:
        processor = AutoProcessor.from_pretrained(spec if hub_id else registry.resolve(spec))
    except OSError as err:  # offline and not cached, unknown repository
        raise TrainError(f"cannot load the processor of {spec!r} to count the rows' tokens: {err}") from None
    return vision.single_view_processor(processor) if cfg.image_aspect_ratio == "pad" else processor


class SkipRows:
    """Keeps the training rows neither of a contest left out nor among the (contest, caption) rows to skip."""

    def __init__(self, contests: set[str], rows: set[tuple[str, str]]):
        self.contests, self.rows = contests, rows

    def __call__(self, row: dict) -> bool:
        contest = str(row["contest"])
        return contest not in self.contests and (contest, str(row["caption"])) not in self.rows


def rows_to_skip(cfg: Config) -> SkipRows | None:
    """Before the cluster starts, on the whole training split: contests whose cartoon cannot be read, and rows
    that cannot fit in --max_length (counted with the model's processor), are reported and skipped; a recipe
    where most rows cannot fit is refused. Skipped here, before Ray Data splits the rows, every worker gets
    as many rows as the others (and so takes as many steps per epoch)."""
    import pyarrow.dataset as pds

    from humor_ray.models.vision import check_images
    from humor_ray.train.launcher import split_path

    path = split_path(cfg, STAGE, "train")
    if "://" not in path and not os.path.isdir(path):
        return None  # `launch` says what to run
    table = pds.dataset(path, format="parquet").to_table(columns=list(STAGE.columns)).to_pydict()
    usable, problems = check_images(cfg.images, dict(zip((int(c) for c in table["contest"]), table["image"])))
    for problem in problems:
        log.warning(f"train: {problem}")
    if not usable:
        raise TrainError(f"no training row has a readable image under {cfg.images}")
    readable = [int(c) in usable for c in table["contest"]]
    kept = {name: [v for v, ok in zip(values, readable) if ok] for name, values in table.items()}
    fits = fitting_rows(load_processor(cfg), cfg.images, kept, cfg.max_length, "train")
    unreadable = {str(c) for c, ok in zip(table["contest"], readable) if not ok}
    too_long = {(str(c), str(t)) for c, t, ok in zip(kept["contest"], kept["caption"], fits) if not ok}
    return SkipRows(unreadable, too_long) if unreadable or too_long else None


def _tower_path(model) -> str:
    return next(name for name, _ in model.named_modules() if name.split(".")[-1] == TOWER)


# No caption column gets a leading space: the chat template separates the turns.
STAGE = Stage(name=NAME, columns=("contest", "image", "prompt", "caption"), caption_columns=(),
              model_kind="image_text", best_metric=("eval_loss", "min"), dataset_name=dataset_name,
              make_trainer=make_trainer)


def run(cfg: Config):
    if "://" not in cfg.images and not os.path.isdir(cfg.images):
        raise TrainError(f"--images {cfg.images}: no such folder (the cartoons the llava_sft rows name)")
    return launch(STAGE, cfg, keep_train_row=rows_to_skip(cfg) if cfg.do_train else None)
