"""Models by name: presets built or converted locally (`tiny`, `smollm2-135m`, `minilm`), local
directories and Hugging Face ids, resolved to a local directory and loaded as (model, tokenizer)."""

from humor_ray.models.registry import ModelError, load_model, load_tokenizer, resolve

__all__ = ["ModelError", "load_model", "load_tokenizer", "resolve"]
