"""The two prompt forms of the original system, built from a contest's cartoon context.

A context is a dict with any of `scene`, `description`, `uncanny_description`, `entities`; missing or
empty fields are left out, so a contest without descriptions still gets a usable prompt.
Chat templates are the model's business: these are plain texts, the same for every model.
"""

from __future__ import annotations

CONTEXT_FIELDS = (("scene", "scene"), ("description", "description"),
                  ("uncanny_description", "uncanny description"), ("entities", "entities"))

INSTRUCTION = (
    "I want you to act as a sophisticated reader of The New Yorker Magazine. You are competing in The "
    "New Yorker Cartoon Caption Contest. Your task is to generate funny captions for a cartoon. Here are "
    "some ideas for developing funny captions. First think about characteristics associated with the "
    "objects and people featured in the cartoon. Then consider what are the unusual or absurd elements "
    "in the cartoon. It might help to imagine conversations between the characters. Then think about "
    "funny and non-obvious connections that can be made between the objects and characters. Try to come "
    "up with funny captions that fit the cartoon, but are not too direct. It may be funnier if the "
    "person reading the caption has to think a little bit to get the joke. Next, I will describe a "
    "cartoon image and then you should generate 1 funny caption for the cartoon."
)

IMAGE_INSTRUCTION = (
    "I want you to act as a sophisticated reader of The New Yorker Magazine. You are competing in The "
    "New Yorker Cartoon Caption Contest. Look at the cartoon and write 1 funny caption for it that fits "
    "the cartoon but is not too direct."
)


def context_lines(context: dict | None) -> list[str]:
    context = context or {}
    lines = []
    for key, label in CONTEXT_FIELDS:
        value = context.get(key)
        if value is not None and str(value).strip():
            lines.append(f"{label}: {str(value).strip()}")
    return lines


def simple_prompt(context: dict | None) -> str:
    """Four labelled lines ending in 'funny caption:' (the DPO / reward-model / simple SFT prompt)."""
    return "\n".join(context_lines(context) + ["funny caption:"])


def long_prompt(context: dict | None) -> str:
    """The instruction to write like a New Yorker reader, then the same lines (the SFT/PPO prompt)."""
    return INSTRUCTION + "\n" + simple_prompt(context)


def image_prompt() -> str:
    """The LLaVA conversation's user turn; the image token comes first, as LLaVA expects."""
    return "<image>\n" + IMAGE_INSTRUCTION
