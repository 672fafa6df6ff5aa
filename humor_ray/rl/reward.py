"""The reward-model actor: scores (prompt with the cartoon's context, caption) in its own process
(on a cluster, on its own GPU or a share of one).

`--reward_model` is the output of `humor-ray rm` (its directory, or the model inside it), any reward
model directory, or `builtin:vowel_share`: a rule with a known optimum (1.0, every letter a vowel)
for checking that a policy-optimisation run really optimises, without a trained model.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from humor_ray.config import UserError
from humor_ray.log import get_logger
from humor_ray.models.reward_inputs import encode

BUILTIN = {"builtin:vowel_share"}
log = get_logger("reward")


def vowel_share(caption: str) -> float:
    letters = [c for c in caption.lower() if c.isascii() and c.isalpha()]
    return sum(c in "aeiou" for c in letters) / len(letters) if letters else 0.0


def resolve_reward_model(spec: str) -> str:
    """A builtin name, or the directory of the reward model to load (local paths made absolute)."""
    if spec in BUILTIN:
        return spec
    path = Path(spec).expanduser()
    if (path / "metrics.json").is_file():  # a `humor-ray rm` output directory: the model it exported
        from humor_ray.train.export import final_model

        return final_model(str(path))
    if path.is_dir():
        from humor_ray.models import registry

        return registry.resolve(str(path.resolve()))
    if spec.startswith("builtin:"):
        raise UserError(f"unknown builtin reward {spec!r}: use one of {', '.join(sorted(BUILTIN))}")
    raise UserError(f"--reward_model {spec}: no such directory (train one with `humor-ray rm`, or use "
                    f"{', '.join(sorted(BUILTIN))})")


def reward_max_length(cfg) -> int:
    """The tokens the reward model reads: --reward_max_length, else what its `humor-ray rm` run trained with,
    else 512 (PPO's run and its memory plan both ask here)."""
    return cfg.reward_max_length or recorded_max_length(cfg.reward_model) or 512


def recorded_max_length(spec: str) -> int | None:
    """The --max_length a `humor-ray rm` run trained its model with (its metrics.json records it), when
    `spec` names such a run; None otherwise."""
    path = Path(spec).expanduser() / "metrics.json"
    if spec in BUILTIN or not path.is_file():
        return None
    return json.loads(path.read_text()).get("max_length")


class RewardModel:
    """Scores captions. Used directly, or as a Ray actor (`start_reward_actor`)."""

    def __init__(self, spec: str, max_length: int = 512, batch_size: int = 32, device: str | None = None):
        self.spec = spec
        self.max_length, self.batch_size = max_length, batch_size
        if spec in BUILTIN:
            return
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from humor_ray.models.loading import from_pretrained

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(spec)
        self.model = from_pretrained(AutoModelForSequenceClassification, spec, dtype=torch.float32)
        self.model.to(self.device).eval()

    def pid(self) -> int:
        return os.getpid()

    def embed(self, captions: list[str], model: str):
        """Unit-length sentence embeddings of `captions` (B, D), as `humor-ray diversity` computes them
        (`model`: one of its embedding models, loaded once per process); for PPO's diversity term."""
        from humor_ray.eval.diversity import embed

        return embed(captions, model=model).numpy()

    def score(self, prompts: list[str], captions: list[str], progress: bool = False) -> list[float]:
        """Rewards of (prompt, caption) pairs; `progress` shows a bar (long scoring runs)."""
        if self.spec == "builtin:vowel_share":
            return [vowel_share(c) for c in captions]
        import sys

        import torch
        from tqdm import tqdm

        scores: list[float] = []
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        starts = range(0, len(prompts), self.batch_size)
        for start in tqdm(starts, desc="reward", unit="batch", file=sys.stderr, disable=not progress):
            ids = encode(self.tokenizer, prompts[start:start + self.batch_size],
                         captions[start:start + self.batch_size], self.max_length)
            width = max(len(row) for row in ids)
            # Right padding: the reward is read at each sequence's last real token.
            input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in ids], device=self.device)
            mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids], device=self.device)
            with torch.no_grad():
                logits = self.model(input_ids=input_ids, attention_mask=mask).logits
            scores.extend(logits[:, 0].float().cpu().tolist())
        return scores


def start_reward_actor(spec: str, *, max_length: int = 512, num_cpus: float = 1, num_gpus: float = 0,
                       options: dict | None = None):
    """The reward model as an actor with `num_gpus` GPUs from Ray (it runs on a GPU when it sees one);
    `options`: more Ray options (a colocated reward model's node and device)."""
    import ray

    options = dict(options or {})
    env = {"OMP_NUM_THREADS": str(max(1, int(num_cpus))), **options.pop("runtime_env", {}).get("env_vars", {})}
    actor = ray.remote(RewardModel).options(**{"num_cpus": num_cpus, "num_gpus": num_gpus, **options},
                                            max_restarts=-1, runtime_env={"env_vars": env})
    return actor.remote(spec, max_length)


def score_with_retries(actor, prompts: list[str], captions: list[str], retries: int = 5) -> tuple[list[float], int]:
    """Scores from the reward actor; a failed call (the actor crashed and is restarting, or a transient
    error) is retried with backoff. Returns (scores, failed attempts)."""
    return call_with_retries(actor.score, prompts, captions, retries=retries)


def call_with_retries(method, *args, retries: int = 5):
    """(`method.remote(*args)`'s result, failed attempts): a method of the reward actor, retried with backoff."""
    import ray

    for attempt in range(retries + 1):  # the last attempt returns or raises
        try:
            return ray.get(method.remote(*args)), attempt
        except Exception as err:  # retried; the last failure is raised
            if attempt == retries:
                raise RuntimeError(f"the reward model failed {retries + 1} times: {err}") from err
            log.warning(f"scoring failed ({type(err).__name__}); retry {attempt + 1}/{retries}")
            time.sleep(min(30.0, 2.0 ** attempt))
