"""Shared helpers for the kernel tests: per-dtype tolerances and float64 ground truths written naively.

The ground truths are deliberately independent of ``prouie_pl.kernels.reference``: plain float64 formulas
(``log_softmax`` then gather, explicit per-aggregation sums, Python loops for stepwise advantages).
"""

from __future__ import annotations

import math

import torch
from prouie_pl.kernels.reference import IGNORE_INDEX

# Normalised tolerances: max |actual - expected| <= tol * max |expected|.
# Outputs are computed in float32 from the exact (already rounded) inputs, so they are tight for every dtype.
OUTPUT_TOL = 2e-5
# Gradients are stored in the input dtype: one rounding of a value near the max is 2^-9 (bf16) or 2^-12 (fp16).
GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# The LM-head path also rounds the logits and runs its matmuls in the input dtype.
LINEAR_TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, atol=tol * (scale or 1.0), rtol=0.0, msg=lambda m: f"{what}: {m}")


def truth_token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """float64 log_softmax, then gather; IGNORE_INDEX targets give 0. Differentiable w.r.t. ``logits``."""
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    ignored = targets == IGNORE_INDEX
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(ignored, torch.zeros_like(picked), picked)


def truth_grpo_loss(lp, old, ref, adv, mask, eps_low, eps_high, beta, loss_type, max_len=None, num_items=None):
    """float64 GRPO loss written per aggregation, as the formulas read in TRL."""
    lp = lp.double()
    old = lp.detach() if old is None else old.double()
    adv = adv.double()
    adv = adv.unsqueeze(1).expand_as(lp) if adv.dim() == 1 else adv
    m = mask.double()
    ratio = torch.exp(lp - old)
    per = -torch.min(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    if beta > 0:
        d = ref.double() - lp
        per = per + beta * (torch.exp(d) - d - 1)
    masked = per * m
    batch, seq = lp.shape
    if loss_type == "grpo":
        return (masked.sum(1) / m.sum(1).clamp(min=1)).mean()
    if loss_type == "bnpo":
        return masked.sum() / m.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return masked.sum() / (batch * (max_len or seq))
    if loss_type == "dapo":
        return masked.sum() / (num_items if num_items is not None else m.sum().clamp(min=1))
    raise AssertionError(loss_type)


def truth_stepwise_advantages(rewards, ends, mask, group_size, seq_len, eps):
    """Python loops in float64: normalise each group's valid steps, then sum per token over later-ending steps."""
    batch, n_steps = rewards.shape
    out = torch.zeros(batch, seq_len, dtype=torch.float64)
    for g in range(0, batch, group_size):
        values = [float(rewards[b, s]) for b in range(g, g + group_size) for s in range(n_steps) if mask[b, s]]
        n = len(values)
        if n < 2 or max(values) == min(values):
            continue
        mean = sum(values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
        for b in range(g, g + group_size):
            for s in range(n_steps):
                if not mask[b, s]:
                    continue
                end = min(max(int(ends[b, s]), 0), seq_len - 1)
                out[b, : end + 1] += (float(rewards[b, s]) - mean) / (std + eps)
    return out
