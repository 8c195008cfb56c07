"""Pure-PyTorch references for the kernels: the CPU path, the tests' yardstick and the benchmarks' baseline.

Nothing here imports Triton. The public functions in ``prouie_pl.kernels`` validate their arguments and then call
either these references or the Triton kernels; the references assume valid arguments.

Precision: the maths runs in float32 (float64 when the inputs are float64, so ``torch.autograd.gradcheck`` can
check them), whatever the input dtype; outputs are float32 (float64 for float64 inputs).

Conventions shared with the Triton kernels:

* ``IGNORE_INDEX`` (-100) targets give log-probability 0 and gradient 0.
* Advantage standard deviations are the unbiased (Bessel-corrected, ``n - 1``) ones, as ``torch.std`` and TRL use;
  a group whose rewards are all equal, or that has fewer than two values, gets exact zeros (never NaN).
* ``linear_token_logprobs`` never materialises the full logits: rows are processed in chunks, and only
  ``hidden``, ``weight``, ``bias``, ``targets`` and the per-row log-sum-exp are kept for backward (which recomputes
  each chunk's logits). With a frozen head (LoRA) the [N, H] input gradient per unit upstream gradient is built in
  forward instead and is all that is kept. The Triton path reuses this chunked driver
  (:func:`chunked_linear_token_logprobs`) with Triton row kernels.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "ADVANTAGE_SCALES",
    "CHUNK_BUDGET_BYTES",
    "CPU_CHUNK_BUDGET_BYTES",
    "IGNORE_INDEX",
    "LOSS_TYPES",
    "RowOps",
    "TORCH_ROW_OPS",
    "aggregation_weights",
    "chunked_linear_token_logprobs",
    "default_chunk_rows",
    "group_advantages",
    "grpo_loss",
    "linear_token_logprobs",
    "stepwise_advantages",
    "token_logprobs",
]

IGNORE_INDEX = -100
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
ADVANTAGE_SCALES = ("group", "batch", "none")
# Largest chunk of logits (counted as float32) that linear_token_logprobs materialises at once on an accelerator,
# and on a CPU, where the chunk's float32 copies and softmax temporaries (three or four of them) add to the resident
# set.  Measured on Gemma 3 270M (bench/memory.py --cpu_chunk_mb 256 against 64): peaks up to 60 MB lower for an SFT
# micro-batch of 4 and a GRPO policy pass (the activations kept for backward, not the chunk, set the peak), and
# chunks of 64 rows of a 262k vocabulary were no slower.
CHUNK_BUDGET_BYTES = 256 * 2**20
CPU_CHUNK_BUDGET_BYTES = 64 * 2**20


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (for gradcheck); everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------------------
# per-token log-probabilities
# --------------------------------------------------------------------------------------------------------------


def token_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """``log_softmax(logits / temperature)[..., target]`` in float32; 0 where ``target == IGNORE_INDEX``."""
    x = logits.to(compute_dtype(logits.dtype)) / temperature
    ignored = targets == IGNORE_INDEX
    target_logit = x.gather(-1, targets.masked_fill(ignored, 0).unsqueeze(-1)).squeeze(-1)
    return (target_logit - torch.logsumexp(x, dim=-1)).masked_fill(ignored, 0.0)


class RowOps(NamedTuple):
    """The row-wise half of the chunked LM-head log-probabilities (the matmuls are torch in every backend).

    ``forward(logits, targets, temperature) -> (logprobs, lse)`` for one chunk of rows, both in the compute dtype.
    ``backward(logits, targets, lse, grad_logprobs, temperature) -> grad_logits`` in ``logits.dtype``; it may
    overwrite ``logits`` (the chunk was recomputed for this purpose and is not used again).
    """

    forward: Callable[[Tensor, Tensor, float], tuple[Tensor, Tensor]]
    backward: Callable[[Tensor, Tensor, Tensor, Tensor, float], Tensor]


def _torch_rows_forward(logits: Tensor, targets: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    x = logits.to(compute_dtype(logits.dtype))
    if temperature != 1.0:  # a copy of the chunk only where it changes anything
        x = x.div_(temperature) if x is not logits else x / temperature
    ignored = targets == IGNORE_INDEX
    lse = torch.logsumexp(x, dim=-1)
    target_logit = x.gather(1, targets.masked_fill(ignored, 0).unsqueeze(1)).squeeze(1)
    return (target_logit - lse).masked_fill(ignored, 0.0), lse


def _torch_rows_backward(logits: Tensor, targets: Tensor, lse: Tensor, grad: Tensor, temperature: float) -> Tensor:
    # d logp[target] / d logits = (onehot(target) - softmax(logits / T)) / T, scaled by the incoming gradient.
    x = logits.to(compute_dtype(logits.dtype))  # the chunk itself when it is already float32: updated in place
    ignored = targets == IGNORE_INDEX
    g = (grad.to(x.dtype) / temperature).masked_fill(ignored, 0.0)
    x.div_(temperature).sub_(lse.unsqueeze(1)).exp_().mul_(-g.unsqueeze(1))
    x.scatter_add_(1, targets.masked_fill(ignored, 0).unsqueeze(1), g.unsqueeze(1))
    return x.to(logits.dtype)


TORCH_ROW_OPS = RowOps(_torch_rows_forward, _torch_rows_backward)


def default_chunk_rows(n_rows: int, vocab: int, budget_bytes: int = CHUNK_BUDGET_BYTES) -> int:
    """Rows per chunk: at most 1/8 of the rows and at most ``budget_bytes`` of float32 logits."""
    by_fraction = math.ceil(n_rows / 8)
    by_budget = max(1, budget_bytes // (4 * max(vocab, 1)))
    rows = min(by_fraction, by_budget)
    if rows > 64:  # a multiple of 16 keeps the chunk matmuls on tensor-core friendly shapes
        rows -= rows % 16
    return max(1, rows)


def _chunk_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    if bias is None:
        return hidden @ weight.t()
    return torch.addmm(bias, hidden, weight.t())


def _accumulate_weight_grad(grad_weight: Tensor, grad_logits: Tensor, hidden: Tensor) -> None:
    """``grad_weight += grad_logits.T @ hidden`` in place (fp32 accumulation inside each matmul)."""
    grad_weight.addmm_(grad_logits.t(), hidden)


class _ChunkedLinearLogprobs(torch.autograd.Function):
    """Chunked LM-head log-probabilities; the logits of one chunk at a time, never all of them.

    Two backward strategies:

    * recompute (the general case): save ``hidden, weight, bias, targets, lse``; backward recomputes each chunk's
      logits, turns them into gradient logits in place, then ``grad_hidden = grad_logits @ weight`` and, only for
      a trainable head, ``grad_weight += grad_logits.T @ hidden`` and ``grad_bias += grad_logits.sum(0)``.
    * frozen head (LoRA: only ``hidden`` needs a gradient): the gradient of ``logp_i`` w.r.t. ``hidden_i`` is
      ``(onehot_i - softmax_i) @ weight / T`` times the scalar upstream gradient, so forward computes that
      ``[N, H]`` matrix chunk by chunk (one extra matmul) and saves it instead of ``hidden``; backward is a row
      scaling. Same two matmuls as a plain ``hidden @ weight.T`` forward + backward, and no recomputation.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_rows, row_ops, frozen_head):
        n_rows = hidden.shape[0]
        out_dtype = compute_dtype(hidden.dtype)
        logprobs = torch.empty(n_rows, dtype=out_dtype, device=hidden.device)
        lse = torch.empty(n_rows, dtype=out_dtype, device=hidden.device)
        unit_grad_hidden = torch.empty_like(hidden) if frozen_head else None
        # Autocast off: forward and backward must see logits of the same dtype (backward runs outside autocast).
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            for start in range(0, n_rows, chunk_rows):
                rows = slice(start, start + chunk_rows)
                logits = _chunk_logits(hidden[rows], weight, bias)
                logprobs[rows], lse[rows] = row_ops.forward(logits, targets[rows], temperature)
                if frozen_head:
                    ones = torch.ones(logits.shape[0], dtype=out_dtype, device=logits.device)
                    unit_grad_logits = row_ops.backward(logits, targets[rows], lse[rows], ones, temperature)
                    unit_grad_hidden[rows] = unit_grad_logits @ weight
        ctx.frozen_head = frozen_head
        if frozen_head:
            ctx.save_for_backward(unit_grad_hidden)
        else:
            ctx.save_for_backward(hidden, weight, bias, targets, lse)
            ctx.temperature, ctx.chunk_rows, ctx.row_ops = temperature, chunk_rows, row_ops
        return logprobs

    @staticmethod
    def backward(ctx, grad_logprobs):
        if ctx.frozen_head:
            (unit_grad_hidden,) = ctx.saved_tensors
            scale = grad_logprobs.to(compute_dtype(unit_grad_hidden.dtype)).unsqueeze(1)
            grad_hidden = (unit_grad_hidden * scale).to(unit_grad_hidden.dtype)
            return grad_hidden, None, None, None, None, None, None, None

        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_logprobs = grad_logprobs.contiguous()
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=compute_dtype(bias.dtype), device=bias.device) if need_bias else None
        if need_hidden or need_weight or need_bias:
            with torch.autocast(device_type=hidden.device.type, enabled=False):
                for start in range(0, hidden.shape[0], ctx.chunk_rows):
                    rows = slice(start, start + ctx.chunk_rows)
                    logits = _chunk_logits(hidden[rows], weight, bias)
                    grad_logits = ctx.row_ops.backward(
                        logits, targets[rows], lse[rows], grad_logprobs[rows], ctx.temperature
                    )
                    if need_hidden:
                        grad_hidden[rows] = grad_logits @ weight
                    if need_weight:  # a frozen head (LoRA) never gets here: no buffer and no matmul for it
                        _accumulate_weight_grad(grad_weight, grad_logits, hidden[rows])
                    if need_bias:
                        grad_bias += grad_logits.sum(0, dtype=grad_bias.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def chunked_linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    row_ops: RowOps = TORCH_ROW_OPS,
) -> Tensor:
    """Chunked ``log_softmax((hidden @ weight.T + bias) / T)[target]`` with a hand-written backward.

    ``hidden`` is cast to ``weight.dtype`` (the head's dtype decides the matmul precision); ``bias`` too.
    """
    lead_shape = hidden.shape[:-1]
    hidden2d = hidden.to(weight.dtype).reshape(-1, hidden.shape[-1])
    targets1d = targets.reshape(-1).to(torch.long)
    if bias is not None:
        bias = bias.to(weight.dtype)
    budget = CPU_CHUNK_BUDGET_BYTES if hidden2d.device.type == "cpu" else CHUNK_BUDGET_BYTES
    chunk_rows = chunk_size if chunk_size is not None else default_chunk_rows(hidden2d.shape[0], weight.shape[0], budget)
    # Decided here: inside Function.forward grad mode is off and requires_grad no longer tells what backward needs.
    frozen_head = (
        torch.is_grad_enabled()
        and hidden2d.requires_grad
        and not weight.requires_grad
        and (bias is None or not bias.requires_grad)
    )
    out = _ChunkedLinearLogprobs.apply(
        hidden2d, weight, bias, targets1d, float(temperature), int(chunk_rows), row_ops, frozen_head
    )
    return out.reshape(lead_shape)


def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> Tensor:
    """Reference LM-head log-probabilities: the chunked driver with torch row operations."""
    return chunked_linear_token_logprobs(hidden, weight, targets, bias, temperature, chunk_size, TORCH_ROW_OPS)


# --------------------------------------------------------------------------------------------------------------
# advantages
# --------------------------------------------------------------------------------------------------------------


def _unbiased_std(centred: Tensor, count: Tensor | int, dim: int) -> Tensor:
    """Bessel-corrected std from already-centred values (``count`` of them), with ``n - 1`` floored at 1."""
    dof = (count - 1).clamp(min=1) if isinstance(count, Tensor) else max(count - 1, 1)
    return (centred.square().sum(dim) / dof).sqrt()


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """GRPO outcome advantages ``(r - group mean) / (std + eps)`` for consecutive groups of ``group_size``."""
    r = rewards.to(compute_dtype(rewards.dtype)).reshape(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        denom = _unbiased_std(centred, group_size, dim=1).unsqueeze(1) + eps
    elif scale == "batch":
        flat = r.reshape(-1)
        denom = _unbiased_std(flat - flat.mean(), flat.numel(), dim=0) + eps
    else:
        denom = torch.ones((), dtype=r.dtype, device=r.device)
    constant = (r.amax(dim=1) == r.amin(dim=1)).unsqueeze(1)
    return torch.where(constant, torch.zeros_like(r), centred / denom).reshape(-1)


def stepwise_advantages(
    step_rewards: Tensor,
    step_ends: Tensor,
    step_mask: Tensor,
    group_size: int,
    seq_len: int,
    eps: float = 1e-4,
) -> Tensor:
    """Process-supervision advantages: group-normalised step rewards, reverse-cumulated over token positions."""
    batch, n_steps = step_rewards.shape
    dtype = compute_dtype(step_rewards.dtype)
    valid = step_mask.to(torch.bool)
    r = step_rewards.to(dtype).masked_fill(~valid, 0.0)

    grouped_r = r.reshape(-1, group_size * n_steps)
    grouped_valid = valid.reshape(-1, group_size * n_steps)
    count = grouped_valid.sum(dim=1).to(dtype)
    mean = grouped_r.sum(dim=1) / count.clamp(min=1)
    centred = (grouped_r - mean.unsqueeze(1)).masked_fill(~grouped_valid, 0.0)
    std = _unbiased_std(centred, count, dim=1)
    top = grouped_r.masked_fill(~grouped_valid, -math.inf).amax(dim=1)
    bottom = grouped_r.masked_fill(~grouped_valid, math.inf).amin(dim=1)
    degenerate = (count <= 1) | (top == bottom)
    normalised = torch.where(
        grouped_valid & ~degenerate.unsqueeze(1), centred / (std + eps).unsqueeze(1), torch.zeros_like(centred)
    ).reshape(batch, n_steps)

    out = torch.zeros(batch, seq_len, dtype=dtype, device=step_rewards.device)
    if seq_len == 0 or n_steps == 0:
        return out
    ends = step_ends.to(torch.long).clamp(0, seq_len - 1)
    out.scatter_add_(1, ends, normalised)
    # advantage[t] = sum of the rewards of steps ending at or after t: a reverse cumulative sum.
    return out.flip(1).cumsum(1).flip(1)


# --------------------------------------------------------------------------------------------------------------
# GRPO loss
# --------------------------------------------------------------------------------------------------------------


def aggregation_weights(
    row_counts: Tensor,
    loss_type: str,
    seq_len: int,
    max_completion_length: int | None = None,
    num_items_in_batch: int | float | Tensor | None = None,
) -> Tensor:
    """Per-sequence weights ``w`` with ``loss = sum_b w_b * sum_t mask * per_token_loss`` for each aggregation.

    * ``grpo``: mean over each sequence's valid tokens, then over sequences: ``1 / (B * max(count_b, 1))``.
    * ``bnpo``: mean over all valid tokens of the local batch: ``1 / max(total, 1)``.
    * ``dr_grpo``: ``1 / (B * (max_completion_length or T))``, a constant independent of lengths.
    * ``dapo``: like ``bnpo`` unless ``num_items_in_batch`` is given, which replaces the denominator. TRL's DAPO
      divides by the token count of the whole *global* batch (all processes and accumulation steps), divided by
      the number of processes; pass that number here to reproduce it.
    """
    batch = row_counts.shape[0]
    dtype = row_counts.dtype
    if loss_type == "grpo":
        return 1.0 / (batch * row_counts.clamp(min=1))
    if loss_type == "bnpo" or (loss_type == "dapo" and num_items_in_batch is None):
        return (1.0 / row_counts.sum().clamp(min=1)).expand(batch)
    if loss_type == "dapo":
        denom = torch.as_tensor(num_items_in_batch, dtype=dtype, device=row_counts.device)
        return (1.0 / denom).expand(batch)
    if loss_type == "dr_grpo":
        length = max_completion_length if max_completion_length is not None else seq_len
        return torch.full((batch,), 1.0 / (batch * length), dtype=dtype, device=row_counts.device)
    raise ValueError(f"loss_type={loss_type!r} is not valid; use one of {', '.join(map(repr, LOSS_TYPES))}.")


def grpo_metrics(total: Tensor, clipped_low: Tensor, clipped_high: Tensor, kl_sum: Tensor | None) -> dict[str, Tensor]:
    """Detached float32 scalars from masked sums over the batch (``total`` = number of valid tokens)."""
    denom = total.clamp(min=1)
    metrics = {
        "clip_ratio": (clipped_low + clipped_high) / denom,
        "clip_ratio_low": clipped_low / denom,
        "clip_ratio_high": clipped_high / denom,
        "kl": kl_sum / denom if kl_sum is not None else torch.zeros_like(denom),
    }
    return {name: value.detach().to(torch.float32) for name, value in metrics.items()}


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor | None,
    ref_logprobs: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    num_items_in_batch: int | float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped GRPO surrogate with optional k3 KL; see ``prouie_pl.kernels.grpo_loss`` for the arguments."""
    dtype = compute_dtype(logprobs.dtype)
    lp = logprobs.to(dtype)
    old = lp.detach() if old_logprobs is None else old_logprobs.to(dtype)
    adv = advantages.to(dtype)
    if adv.dim() == 1:
        adv = adv.unsqueeze(1)
    m = mask.to(dtype)
    valid = m != 0

    ratio = torch.exp(lp - old)
    clipped_ratio = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    per_token = -torch.minimum(ratio * adv, clipped_ratio * adv)
    kl = None
    if ref_logprobs is not None:
        delta = ref_logprobs.to(dtype) - lp
        kl = torch.exp(delta) - delta - 1.0
        if beta > 0:
            per_token = per_token + beta * kl

    row_counts = m.sum(dim=1)
    weights = aggregation_weights(row_counts, loss_type, lp.shape[1], max_completion_length, num_items_in_batch)
    row_sums = torch.where(valid, per_token * m, torch.zeros_like(per_token)).sum(dim=1)
    loss = (weights * row_sums).sum()

    with torch.no_grad():
        low = ((ratio < 1.0 - eps_low) & (adv < 0)).to(dtype)
        high = ((ratio > 1.0 + eps_high) & (adv > 0)).to(dtype)
        kl_sum = torch.where(valid, kl * m, torch.zeros_like(kl)).sum() if kl is not None else None
        metrics = grpo_metrics(row_counts.sum(), (low * m).sum(), (high * m).sum(), kl_sum)
    return loss.to(dtype), metrics
