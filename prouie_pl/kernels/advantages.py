"""GRPO advantages: group-normalised outcome rewards and stepwise (process-supervision) advantages.

``group_advantages`` turns one reward per completion into ``(r - group mean) / (std + eps)``; the G completions of a
prompt are G consecutive rows. ``stepwise_advantages`` follows DeepSeekMath's process supervision: all valid step
rewards of a group are normalised together, then a token's advantage is the sum of the normalised rewards of the
steps of its own completion that end at or after it.

Standard deviations are unbiased (``n - 1``, as ``torch.std`` and TRL); a group whose rewards are all equal, or
that has fewer than two (valid) values, gets exact zeros. Step ends are token indices within the completion,
clamped into ``[0, seq_len - 1]``.

Triton: one program per group for the normalisation, and for stepwise one program per completion that evaluates
``adv[t] = sum_s norm[s] * (end[s] >= t)`` over [tokens x steps] tiles (no atomics, deterministic). These tensors
are tiny next to the logits, so the kernels are about avoiding a dozen small launches, not bandwidth.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from ._dispatch import jit, next_power_of_2, resolve_backend, row_block, tl
from .fallback import kernel_guard

__all__ = ["group_advantages", "stepwise_advantages"]

_SCALE_CODES = {"none": 0, "group": 1, "batch": 2}


@jit
def _group_advantages_kernel(
    rewards_ptr,
    out_ptr,
    n_total,
    group_size,
    eps,
    SCALE: tl.constexpr,  # 0: none, 1: group std, 2: batch std
    BLOCK_G: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    group = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_G)
    in_group = offs < group_size
    r = tl.load(rewards_ptr + group * group_size + offs, mask=in_group, other=0.0).to(tl.float32)
    n = group_size * 1.0
    centred = tl.where(in_group, r - tl.sum(r, axis=0) / n, 0.0)
    top = tl.max(tl.where(in_group, r, float("-inf")), axis=0)
    constant = top == tl.min(tl.where(in_group, r, float("inf")), axis=0)

    if SCALE == 1:
        denom = tl.sqrt(tl.sum(centred * centred, axis=0) / tl.maximum(n - 1.0, 1.0)) + eps
    elif SCALE == 2:
        # Every program recomputes the batch statistics: B is a few hundred rewards, cheaper than a second launch.
        total = 0.0
        for start in range(0, n_total, BLOCK_B):
            idx = start + tl.arange(0, BLOCK_B)
            total += tl.sum(tl.load(rewards_ptr + idx, mask=idx < n_total, other=0.0).to(tl.float32), axis=0)
        batch_mean = total / n_total
        sq = 0.0
        for start in range(0, n_total, BLOCK_B):
            idx = start + tl.arange(0, BLOCK_B)
            x = tl.load(rewards_ptr + idx, mask=idx < n_total, other=0.0).to(tl.float32)
            d = tl.where(idx < n_total, x - batch_mean, 0.0)
            sq += tl.sum(d * d, axis=0)
        denom = tl.sqrt(sq / tl.maximum(n_total - 1.0, 1.0)) + eps
    else:
        denom = 1.0
    denom = tl.where(constant, 1.0, denom)  # keeps eps=0 from computing 0/0 in the discarded branch
    adv = tl.where(constant, 0.0, centred / denom)
    tl.store(out_ptr + group * group_size + offs, adv, mask=in_group)


@jit
def _step_normalise_kernel(
    rewards_ptr,
    mask_ptr,
    out_ptr,
    group_numel,  # group_size * n_steps: a group's steps are contiguous in the [B, S] tensors
    eps,
    BLOCK: tl.constexpr,
):
    base = tl.program_id(0).to(tl.int64) * group_numel
    total = 0.0
    count = 0.0
    top = float("-inf")
    bottom = float("inf")
    for start in range(0, group_numel, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = (tl.load(mask_ptr + base + offs, mask=offs < group_numel, other=0) != 0) & (offs < group_numel)
        r = tl.load(rewards_ptr + base + offs, mask=valid, other=0.0).to(tl.float32)
        total += tl.sum(r, axis=0)
        count += tl.sum(valid.to(tl.float32), axis=0)
        top = tl.maximum(top, tl.max(tl.where(valid, r, float("-inf")), axis=0))
        bottom = tl.minimum(bottom, tl.min(tl.where(valid, r, float("inf")), axis=0))
    mean = total / tl.maximum(count, 1.0)
    sq = 0.0
    for start in range(0, group_numel, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = (tl.load(mask_ptr + base + offs, mask=offs < group_numel, other=0) != 0) & (offs < group_numel)
        r = tl.load(rewards_ptr + base + offs, mask=valid, other=0.0).to(tl.float32)
        d = tl.where(valid, r - mean, 0.0)
        sq += tl.sum(d * d, axis=0)
    std = tl.sqrt(sq / tl.maximum(count - 1.0, 1.0))
    degenerate = (count <= 1.0) | (top == bottom)
    denom = tl.where(degenerate, 1.0, std + eps)  # keeps eps=0 from computing 0/0 in the discarded branch
    for start in range(0, group_numel, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = (tl.load(mask_ptr + base + offs, mask=offs < group_numel, other=0) != 0) & (offs < group_numel)
        r = tl.load(rewards_ptr + base + offs, mask=valid, other=0.0).to(tl.float32)
        norm = tl.where(valid, (r - mean) / denom, 0.0)
        norm = tl.where(degenerate, 0.0, norm)
        tl.store(out_ptr + base + offs, norm, mask=offs < group_numel)


@jit
def _step_reverse_sum_kernel(
    norm_ptr,
    ends_ptr,
    out_ptr,
    n_steps,
    seq_len,
    BLOCK_T: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    for t_start in range(0, seq_len, BLOCK_T):
        t = t_start + tl.arange(0, BLOCK_T)
        acc = tl.zeros([BLOCK_T], dtype=tl.float32)
        for s_start in range(0, n_steps, BLOCK_S):
            s = s_start + tl.arange(0, BLOCK_S)
            in_row = s < n_steps
            value = tl.load(norm_ptr + row * n_steps + s, mask=in_row, other=0.0)
            end = tl.load(ends_ptr + row * n_steps + s, mask=in_row, other=0)
            end = tl.minimum(tl.maximum(end, 0), seq_len - 1)
            covers = end[None, :] >= t[:, None]
            acc += tl.sum(tl.where(covers, value[None, :], 0.0), axis=1)
        tl.store(out_ptr + row * seq_len + t, acc, mask=t < seq_len)


def _check_group_size(batch: int, group_size: int) -> None:
    if int(group_size) != group_size or group_size < 1 or batch % group_size:
        raise ValueError(
            f"group_size={group_size!r} must be a positive integer dividing the batch size {batch} "
            "(consecutive rows form a group)."
        )


@kernel_guard("group_advantages")
def group_advantages(
    rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4, backend: str = "auto"
) -> Tensor:
    """Float32 outcome advantages [B] for rewards [B] (B = groups * group_size, groups consecutive).

    ``scale``: ``"group"`` divides by the group's unbiased std + eps, ``"batch"`` by the whole batch's, ``"none"``
    only centres. Groups with equal rewards (and ``group_size == 1``) get exact zeros.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}.")
    _check_group_size(rewards.shape[0], group_size)
    if scale not in _SCALE_CODES:
        valid = ", ".join(map(repr, reference.ADVANTAGE_SCALES))
        raise ValueError(f"scale={scale!r} is not valid; use one of {valid}.")
    if eps < 0:
        raise ValueError(f"eps={eps!r} must be >= 0.")
    group_size = int(group_size)
    if resolve_backend(backend, rewards.device) == "torch":
        return reference.group_advantages(rewards, group_size, scale, eps).float()
    rewards = rewards.contiguous()
    out = torch.empty(rewards.shape, dtype=torch.float32, device=rewards.device)
    n_groups = rewards.shape[0] // group_size
    if n_groups:
        block_b, _ = row_block(rewards.shape[0])
        _group_advantages_kernel[(n_groups,)](
            rewards, out, rewards.shape[0], group_size, float(eps),
            SCALE=_SCALE_CODES[scale], BLOCK_G=max(16, next_power_of_2(group_size)), BLOCK_B=block_b,
        )
    return out


@kernel_guard("stepwise_advantages")
def stepwise_advantages(
    step_rewards: Tensor,
    step_ends: Tensor,
    step_mask: Tensor,
    group_size: int,
    seq_len: int,
    eps: float = 1e-4,
    backend: str = "auto",
) -> Tensor:
    """Float32 per-token advantages [B, seq_len] from per-step rewards [B, S] (DeepSeekMath process supervision).

    ``step_ends`` [B, S]: 0-based token index where each step ends (clamped into the completion);
    ``step_mask`` [B, S]: which steps exist. Rows without valid steps, and groups whose valid step rewards are all
    equal or that have a single valid step, give zeros.
    """
    if step_rewards.dim() != 2 or step_ends.shape != step_rewards.shape or step_mask.shape != step_rewards.shape:
        raise ValueError(
            "step_rewards, step_ends and step_mask must all be [B, S]; got "
            f"{tuple(step_rewards.shape)}, {tuple(step_ends.shape)}, {tuple(step_mask.shape)}."
        )
    if step_ends.dtype.is_floating_point:
        raise ValueError(f"step_ends must hold integer token indices, got {step_ends.dtype}.")
    _check_group_size(step_rewards.shape[0], group_size)
    if int(seq_len) != seq_len or seq_len < 0:
        raise ValueError(f"seq_len={seq_len!r} must be a non-negative integer.")
    if eps < 0:
        raise ValueError(f"eps={eps!r} must be >= 0.")
    group_size, seq_len = int(group_size), int(seq_len)
    if resolve_backend(backend, step_rewards.device) == "torch":
        return reference.stepwise_advantages(step_rewards, step_ends, step_mask, group_size, seq_len, eps).float()

    batch, n_steps = step_rewards.shape
    out = torch.zeros(batch, seq_len, dtype=torch.float32, device=step_rewards.device)
    if batch == 0 or n_steps == 0 or seq_len == 0:
        return out
    rewards = step_rewards.contiguous()
    mask = step_mask.to(torch.uint8).contiguous()
    ends = step_ends.to(torch.long).contiguous()
    normalised = torch.empty(batch, n_steps, dtype=torch.float32, device=rewards.device)
    block, _ = row_block(group_size * n_steps)
    _step_normalise_kernel[(batch // group_size,)](
        rewards, mask, normalised, group_size * n_steps, float(eps), BLOCK=block
    )
    block_t, _ = row_block(seq_len, gpu_max=128, interpret_max=32)
    block_s, _ = row_block(n_steps, gpu_max=64, interpret_max=16)
    _step_reverse_sum_kernel[(batch,)](normalised, ends, out, n_steps, seq_len, BLOCK_T=block_t, BLOCK_S=block_s)
    return out
