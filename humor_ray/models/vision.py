"""What the vision-language (LLaVA) stages share: the cartoon images, the conversation, the saved layout.

Images are read one at a time, when a batch needs them (training, generation), from a folder or URI
(`--images`). Before a run, `check_images` opens each contest's image once: a missing or unreadable
file is reported by contest and file and that contest is left out; a file whose content is another
format than its name says (the real data has a PNG saved as `571.jpg`) is reported and read by its
content.
"""

from __future__ import annotations

import io
import json
from pathlib import Path


def image_location(images_root: str, name: str) -> str:
    """Where the image a dataset names lies: always inside `images_root`. A dataset is input like any other,
    and a name such as `../../home/user/.ssh/id_rsa` must never be read, let alone sent to a judge."""
    from humor_ray.config import UserError

    parts = Path(name).parts
    if not name or Path(name).is_absolute() or ".." in parts or "://" in name:
        raise UserError(f"image {name!r} is not a file name inside --images ({images_root})")
    location = f"{images_root.split('?', 1)[0].rstrip('/')}/{name}"
    if "://" in images_root:
        return location + (f"?{images_root.split('?', 1)[1]}" if "?" in images_root else "")
    root = Path(images_root).resolve()
    resolved = Path(location).resolve()  # a link inside the folder may still point outside it
    if not resolved.is_relative_to(root):
        raise UserError(f"image {name!r} resolves to {resolved}, outside --images ({root})")
    return str(resolved)


def _read(images_root: str, name: str) -> bytes:
    from humor_ray.data.readers import open_filesystem

    fs, path = open_filesystem(image_location(images_root, name))
    with fs.open_input_file(path) as handle:
        return handle.read()


def _decode(data: bytes):
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()  # decode now: a truncated file fails here, not later inside a batch
    return image


def open_image(images_root: str, name: str):
    """One image as RGB, from a local folder or a URI (s3://...), whatever its size or format."""
    return _decode(_read(images_root, name)).convert("RGB")


def check_images(images_root: str, image_of: dict[int, str | None]) -> tuple[dict[int, str], list[str]]:
    """(contest -> image name for the usable ones, one line per problem). Never raises for bad files."""
    from PIL import Image

    usable, problems = {}, []
    for contest, name in sorted(image_of.items()):
        if not name:
            problems.append(f"contest {contest}: no image; left out")
            continue
        try:
            image = _decode(_read(images_root, name))
        except (OSError, Image.DecompressionBombError) as err:  # missing, truncated or not an image
            problems.append(f"contest {contest}: cannot read image {images_root}/{name} ({err}); left out")
            continue
        actual = (image.format or "").lower()
        suffix = Path(name).suffix.lower().lstrip(".")
        if actual and suffix and actual != {"jpg": "jpeg"}.get(suffix, suffix):
            problems.append(f"contest {contest}: {name} is a {actual.upper()} file despite its name; read as "
                            f"{actual.upper()} ({image.width}x{image.height})")
        usable[contest] = name
    return usable, problems


def prompt_messages(instruction: str) -> list[dict]:
    """The user's turn: the cartoon, then the instruction (LLaVA reads the image first)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]


def completion_messages(caption: str) -> list[dict]:
    return [{"role": "assistant", "content": [{"type": "text", "text": caption}]}]


def chat_prompt(processor, instruction: str) -> str:
    """The text a vision-language model is prompted with, in its own chat template, ready for its reply."""
    return processor.apply_chat_template(prompt_messages(instruction), add_generation_prompt=True, tokenize=False)


def instruction_of(prompt: str) -> str:
    """The llava_sft datasets' prompt is `<image>\\n` + instruction; the chat template places the image."""
    return prompt.split("\n", 1)[1] if prompt.startswith("<image>\n") else prompt


# Transformers 5 writes a LLaVA's CLIP tower as `vision_tower.<layer>`; vLLM (and the llava-hf checkpoints)
# name it `vision_tower.vision_model.<layer>`. Transformers reads either, so the saved model takes vLLM's.
_TOWER, _VLLM_TOWER = "vision_tower.", "vision_tower.vision_model."


def write_vllm_layout(model_dir: str | Path) -> None:
    """Rename a saved vision-language model's tower weights in place to the layout vLLM loads (a LLaVA-NeXT
    trained on single views is first saved as the LLaVA it has become)."""
    model_dir = Path(model_dir)
    write_single_view_layout(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("vision_config", {}).get("model_type") != "clip_vision_model":
        return

    def renamed(key: str) -> str:
        return _VLLM_TOWER + key[len(_TOWER):] if key.startswith(_TOWER) and not key.startswith(_VLLM_TOWER) else key

    _rewrite_weights(model_dir, renamed)


def _rewrite_weights(model_dir: Path, renamed) -> None:
    """Rename every saved weight by `renamed` (key -> new key, or None to drop it), shard by shard."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as handle:
            if not any(renamed(k) != k for k in handle.keys()):
                continue
            tensors = {renamed(k): handle.get_tensor(k) for k in handle.keys() if renamed(k) is not None}
            metadata = handle.metadata() or {"format": "pt"}
        save_file(tensors, str(shard), metadata=metadata)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {renamed(k): v for k, v in data["weight_map"].items() if renamed(k) is not None}
        index.write_text(json.dumps(data, indent=2))


# ---------------------------------------------------------------- one padded view per cartoon
# The paper trained llava-v1.6-mistral-7b with the original LLaVA code's `--image_aspect_ratio pad`: each image
# padded to a square with the mean colour, resized to the tower's 336 pixels and read as ONE view, 576 image
# tokens, the LLaVA-1.5 way. LLaVA-NeXT's own processor instead tiles a cartoon at any resolution (1,272-2,928
# tokens for ours). Reading a LLaVA-NeXT checkpoint as a LLaVA does the former: the two share the tower, the
# projector and the language model; NeXT's one extra weight, the row-end embedding of its tiles, goes unused.

def single_view_processor(processor):
    """A LLaVA processor for one padded view per image, from a LLaVA or LLaVA-NeXT processor: the same
    tokenizer, chat template and image normalisation; (side / patch)^2 image tokens."""
    from transformers import LlavaImageProcessorPil, LlavaProcessor

    source = processor.image_processor
    side = source.crop_size["height"]
    images = LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": side},
                                    crop_size={"height": side, "width": side}, image_mean=source.image_mean,
                                    image_std=source.image_std, resample=source.resample)
    return LlavaProcessor(image_processor=images, tokenizer=processor.tokenizer, patch_size=processor.patch_size,
                          vision_feature_select_strategy=processor.vision_feature_select_strategy,
                          chat_template=processor.chat_template, image_token=processor.image_token,
                          num_additional_image_tokens=processor.num_additional_image_tokens)


def single_view_config(config):
    """A LLaVA-NeXT model config as the LLaVA config of the same weights (any other config unchanged)."""
    from transformers import LlavaConfig

    if config.model_type != "llava_next":
        return config
    vision = config.vision_config
    return LlavaConfig(vision_config=vision, text_config=config.text_config,
                       image_token_index=config.image_token_index, projector_hidden_act=config.projector_hidden_act,
                       vision_feature_select_strategy=config.vision_feature_select_strategy,
                       vision_feature_layer=config.vision_feature_layer,
                       image_seq_length=(vision.image_size // vision.patch_size) ** 2,
                       multimodal_projector_bias=config.multimodal_projector_bias,
                       tie_word_embeddings=config.tie_word_embeddings)


def load_single_view(model_dir: str, dtype=None):
    """(model, processor) of a LLaVA or LLaVA-NeXT directory, reading each image as one padded view."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from humor_ray.models.loading import from_pretrained

    processor = single_view_processor(AutoProcessor.from_pretrained(model_dir))
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    config = single_view_config(AutoConfig.from_pretrained(model_dir))
    model = from_pretrained(AutoModelForImageTextToText, model_dir, config=config, dtype=dtype or torch.float32)
    model.config.pad_token_id = processor.tokenizer.pad_token_id
    return model, processor


def write_single_view_layout(model_dir: Path) -> None:
    """A saved LLaVA-NeXT whose processor reads single views (the merge of a LoRA adapter trained that way
    onto its NeXT base) becomes a LLaVA in place: its config, and its weights without the unused row-end one."""
    from transformers import AutoConfig

    processor_file = model_dir / "processor_config.json"
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") != "llava_next" or not processor_file.is_file():
        return
    if json.loads(processor_file.read_text()).get("processor_class") != "LlavaProcessor":
        return
    single_view_config(AutoConfig.from_pretrained(model_dir)).save_pretrained(model_dir)
    _rewrite_weights(model_dir, lambda key: None if key.split(".")[-1] == "image_newline" else key)
