"""What a reward model reads: the prompt with the cartoon's context, then the caption. Training (`humor-ray rm`)
and scoring (best-of-N, the judge, PPO) encode it the same way, here."""

from __future__ import annotations


def encode(tokenizer, prompts: list[str], captions: list[str], max_length: int) -> list[list[int]]:
    """Token ids of prompt + caption, at most `max_length`. A long prompt loses its beginning (its end,
    "funny caption:", and the caption are what the score depends on); a caption keeps at most half the
    room. Encoders (BERT-like) read `[CLS] prompt [SEP] caption [SEP]`; decoders prompt, " caption",
    end-of-text (the score is read at the last token)."""
    encoder = tokenizer.cls_token_id is not None and tokenizer.sep_token_id is not None
    if encoder:
        prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        caption_ids = tokenizer(captions, add_special_tokens=False)["input_ids"]
        start, middle, end = [tokenizer.cls_token_id], [tokenizer.sep_token_id], [tokenizer.sep_token_id]
    else:
        prompt_ids = tokenizer(prompts)["input_ids"]  # with the model's begin-of-text token, if it uses one
        caption_ids = tokenizer([" " + c for c in captions], add_special_tokens=False)["input_ids"]
        start, middle, end = [], [], [tokenizer.eos_token_id]
    encoded = []
    for head, tail in zip(prompt_ids, caption_ids):
        tail = tail[: max_length // 2]
        room = max_length - len(start) - len(middle) - len(end) - len(tail)
        encoded.append(start + head[max(0, len(head) - room):] + middle + tail + end)
    return encoded
