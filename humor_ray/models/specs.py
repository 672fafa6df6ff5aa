"""What a model spec names, checked without building or loading anything (no torch or transformers: the command
line checks its model options with it before a stage starts). humor_ray.models.registry resolves and loads them."""

from __future__ import annotations

import difflib
import re
from pathlib import Path

from humor_ray.config import UserError

# Preset -> the kinds it can load as.
PRESETS = {
    "tiny": ("causal_lm", "reward", "embedding"),
    "smollm2-135m": ("causal_lm", "reward", "embedding"),
    "minilm": ("reward", "embedding"),
    "tiny-llava": ("image_text",),
    "smollm2-llava": ("image_text",),
    "mpnet": ("embedding",),
}
# A Hugging Face repository id: `owner/name`, neither part starting with a dot; named as `hf:owner/name`.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
HUB_PREFIX = "hf:"


class ModelError(UserError):
    """A model spec that cannot be resolved or loaded; the message says what to do."""


def hub_id(spec: str) -> str:
    repo_id = spec.removeprefix(HUB_PREFIX)
    if not HUB_ID.fullmatch(repo_id):
        raise ModelError(f"{spec!r} is not a Hugging Face id: write hf:OWNER/NAME")
    return repo_id


def unknown(spec: str, option: str = "") -> str:
    """Why a spec that is neither a preset, an `hf:` id nor a directory names no model, and the nearest
    thing it may have meant."""
    named = f"{option} {spec}" if option else f"unknown model {spec!r}"
    nearest = difflib.get_close_matches(spec, PRESETS, n=1)
    if nearest:
        hint = f"; did you mean the preset {nearest[0]}?"
    elif HUB_ID.fullmatch(spec):
        hint = f"; a Hugging Face id takes the hf: prefix ({HUB_PREFIX}{spec})"
    else:
        hint = f"; a Hugging Face id is written {HUB_PREFIX}OWNER/NAME"
    return (f"{named}: not a preset ({', '.join(PRESETS)}) and no model directory at that path{hint}")


def check_spec(spec: str, kinds: tuple[str, ...], option: str) -> None:
    """Before any work starts: `spec` names a model that `option` can load as one of `kinds` (a preset of
    such a kind, an `hf:` id of the right form, or an existing directory), without building or loading it."""
    if spec in PRESETS:
        if not set(kinds) & set(PRESETS[spec]):
            raise ModelError(f"{option} {spec}: the {spec} preset loads as {' or '.join(PRESETS[spec])}, "
                             f"and {option} needs a {' or '.join(kinds)} model")
        return
    if spec.startswith(HUB_PREFIX):
        hub_id(spec)
        return
    if not Path(spec).expanduser().is_dir():
        raise ModelError(unknown(spec, option))
