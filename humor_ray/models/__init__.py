"""Models by name: presets built or converted locally (`tiny`, `smollm2-135m`, `minilm`), local
directories and Hugging Face ids, resolved to a local directory and loaded as (model, tokenizer): see
`registry`. Nothing is imported here: a stage that only reads its config must not pay for torch."""
