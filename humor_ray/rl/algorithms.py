"""The arithmetic of policy optimisation, on padded (batch, tokens) tensors with a 0/1 mask.
Kept apart from the Ray program so each piece is checked on its own."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from humor_ray.config import ConfigError


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(var + eps) * mask


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: the KL penalty on every token, the sequence's score on its last token."""
    rewards = -kl_coef * kl * mask
    last = mask.sum(1).long().clamp(min=1) - 1
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over each sequence's tokens; returns (advantages, returns).
    Past a sequence's end the next value is 0 (the episode is over)."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    steps = rewards.shape[1]
    for t in reversed(range(steps)):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < steps else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running * (mask[:, t + 1] if t + 1 < steps else 0)
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def grpo_advantages(returns: torch.Tensor, group_size: int) -> torch.Tensor:
    """GRPO: each sequence's return normalised within its group (consecutive samples of one prompt)."""
    grouped = returns.view(-1, group_size)
    return ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-6)).reshape(-1)


def rloo_advantages(returns: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: each sequence's return less the mean of the other samples of its group."""
    if group_size < 2:
        raise ConfigError("rloo needs --samples_per_prompt of at least 2")
    grouped = returns.view(-1, group_size)
    return (grouped - (grouped.sum(1, keepdim=True) - grouped) / (group_size - 1)).reshape(-1)


# ---------------------------------------------------------------- a diversity term for the group estimators

DIVERSITY_FORMS = ("additive", "multiplicative")
# Embedding distances below this are rounding error: the captions embed the same.
SAME_MEANING = 1e-6


def diversity_term(scores: torch.Tensor, diversity: torch.Tensor, group_size: int, weight: float,
                   form: str) -> torch.Tensor:
    """What each sample's score gains for being unlike the other samples of its group (B,).
    additive: weight x its diversity. multiplicative: its score times its diversity over the group's highest
    (in [0, 1]), times weight, with the score taken above the group's lowest: the group baselines are blind
    to a shift of a group's scores, and a negative reward-model score would otherwise make diversity a
    penalty."""
    if form == "additive":
        return weight * diversity
    if form != "multiplicative":
        raise ConfigError(f"unknown diversity form {form!r}: use one of {', '.join(DIVERSITY_FORMS)}")
    grouped, spread = scores.view(-1, group_size), diversity.view(-1, group_size)
    above = grouped - grouped.min(1, keepdim=True).values
    highest = spread.max(1, keepdim=True).values
    # A group of paraphrases differs only by rounding: no sample of it is more diverse than another.
    normalised = torch.where(highest > SAME_MEANING, spread / highest.clamp(min=SAME_MEANING), 0.0)
    return (weight * above * normalised).reshape(-1)


# ---------------------------------------------------------------- advantage estimators, by name

@dataclasses.dataclass(frozen=True)
class Estimator:
    """`advantages(scores (B,), kl (B, T), mask (B, T), values (B, T), kl_coef, cfg)` -> (advantages (B, T),
    returns (B, T) or None). `critic`: it needs a value model, and its scores are normalised by running
    moments (--normalize_rewards); the group baselines normalise within each group instead."""
    advantages: Callable
    critic: bool


def gae_advantages(scores, kl, mask, values, kl_coef: float, cfg):
    """PPO: the KL penalty on every token and the score on the last, GAE over the values, whitened."""
    advantages, returns = gae(token_rewards(scores, kl, mask, kl_coef), values, mask, cfg.gamma, cfg.lam)
    return masked_whiten(advantages, mask), returns


def _group_estimator(baseline: Callable) -> Callable:
    """Critic-free: the sequence's score less its KL penalty, against a group baseline, on every token."""
    def advantages(scores, kl, mask, values, kl_coef: float, cfg):
        return baseline(scores - kl_coef * kl.sum(1), cfg.samples_per_prompt)[:, None] * mask, None

    return advantages


ESTIMATORS = {
    "gae": Estimator(gae_advantages, critic=True),
    "grpo": Estimator(_group_estimator(grpo_advantages), critic=False),
    "rloo": Estimator(_group_estimator(rloo_advantages), critic=False),
}


def policy_loss(logprobs, old_logprobs, advantages, mask, cliprange: float):
    """PPO's clipped surrogate; returns (loss, fraction of tokens clipped, approximate KL old->new)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - cliprange, 1 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean(0.5 * (logprobs - old_logprobs) ** 2, mask)
    return loss, clipfrac, approx_kl


def value_loss(values, old_values, returns, mask, cliprange: float):
    clipped = old_values + (values - old_values).clamp(-cliprange, cliprange)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


class ValueModel(torch.nn.Module):
    """The critic: a backbone (the policy's architecture, without its language-model head) and a
    scalar head, one value per token position. The head starts at zero: no value before evidence."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Linear(backbone.config.hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, input_ids, attention_mask, position_ids):
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids).last_hidden_state
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1)  # a half-precision backbone, fp32 head


class AdaptiveKL:
    """The KL coefficient, steered so that the policy's KL from the reference tracks `target`
    (nats per sequence): proportional control with the error clipped to +-20% (Ziegler et al. 2019).
    `horizon` sets how fast it reacts (samples for a full correction). Without a target it stays fixed."""

    def __init__(self, init: float, target: float | None, horizon: int):
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl: float, samples: int) -> float:
        if self.target and math.isfinite(kl):
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * samples / self.horizon
        return self.value


def pooled_std(total: float, total_sq: float, count: float) -> float:
    """The sample standard deviation (as torch.std) of values known by their sum, sum of squares and count:
    what the workers' summed figures give for all of their values together."""
    if count < 2:
        return 0.0
    return math.sqrt(max(total_sq - total ** 2 / count, 0.0) / (count - 1))


class RunningMoments:
    """Running mean and variance of scores across steps (and workers), for reward normalisation."""

    def __init__(self, mean: float = 0.0, var: float = 1.0, count: float = 0.0):
        self.mean, self.var, self.count = mean, var, count

    def update(self, total: float, total_sq: float, count: float) -> None:
        if count == 0:
            return
        batch_mean = total / count
        batch_var = max(total_sq / count - batch_mean ** 2, 0.0)
        delta = batch_mean - self.mean
        new_count = self.count + count
        self.var = (self.var * self.count + batch_var * count + delta ** 2 * self.count * count / new_count) / new_count
        self.mean += delta * count / new_count
        self.count = new_count

    def normalize(self, scores: torch.Tensor) -> torch.Tensor:
        return (scores - self.mean) / math.sqrt(self.var + 1e-8)
