"""The clipped GRPO surrogate with optional k3 KL: fused Triton forward/backward, autograd, public API.

Per token (``ratio = exp(logprobs - old_logprobs)``, ``A`` the advantage)::

    loss_t = -min(ratio * A, clamp(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * (exp(ref - lp) - (ref - lp) - 1)

and the batch loss is ``sum_b w_b * sum_t mask * loss_t`` with the per-sequence weights ``w`` of the chosen
aggregation (:func:`prouie_pl.kernels.reference.aggregation_weights`: ``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``).

Triton: the forward kernel runs one program per sequence and produces only row sums (masked loss, valid-token count,
masked KL, low- and high-clipped counts); the loss and metrics are a handful of [B]-sized torch ops on those. The
backward kernel recomputes ratio and clip flags per token and writes ``d loss / d logprobs``:
``-A * ratio`` where the unclipped term is selected (0 where the objective is clipped), plus
``beta * (1 - exp(ref - lp))``, times ``w_b * mask``. Only ``logprobs`` receives a gradient. With
``old_logprobs=None`` the ratio is ``exp(lp - lp.detach()) = 1`` with gradient 1 (the on-policy case).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from ._dispatch import jit, resolve_backend, row_block, tl
from .fallback import kernel_guard

__all__ = ["grpo_loss"]

_N_STATS = 5  # loss, count, kl, clipped low, clipped high


@jit
def _grpo_fwd_kernel(
    lp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, stats_ptr,
    n_rows, seq_len,
    lp_stride, old_stride, ref_stride, adv_stride_row, adv_stride_tok, mask_stride,
    ratio_low, ratio_high, beta,
    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, ADD_KL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    loss_sum = 0.0
    count = 0.0
    kl_sum = 0.0
    low_sum = 0.0
    high_sum = 0.0
    for start in range(0, seq_len, BLOCK):
        t = start + tl.arange(0, BLOCK)
        in_row = t < seq_len
        lp = tl.load(lp_ptr + row * lp_stride + t, mask=in_row, other=0.0).to(tl.float32)
        m = tl.load(mask_ptr + row * mask_stride + t, mask=in_row, other=0).to(tl.float32)
        adv = tl.load(adv_ptr + row * adv_stride_row + t * adv_stride_tok, mask=in_row, other=0.0).to(tl.float32)
        if HAS_OLD:
            old = tl.load(old_ptr + row * old_stride + t, mask=in_row, other=0.0).to(tl.float32)
        else:
            old = lp
        ratio = tl.exp(lp - old)
        clipped = tl.minimum(tl.maximum(ratio, ratio_low), ratio_high)
        per_token = -tl.minimum(ratio * adv, clipped * adv)
        valid = m != 0.0
        if HAS_REF:
            delta = tl.load(ref_ptr + row * ref_stride + t, mask=in_row, other=0.0).to(tl.float32) - lp
            kl = tl.exp(delta) - delta - 1.0
            if ADD_KL:
                per_token += beta * kl
            kl_sum += tl.sum(tl.where(valid, kl * m, 0.0), axis=0)
        loss_sum += tl.sum(tl.where(valid, per_token * m, 0.0), axis=0)
        count += tl.sum(m, axis=0)
        low_sum += tl.sum(tl.where(valid & (ratio < ratio_low) & (adv < 0.0), m, 0.0), axis=0)
        high_sum += tl.sum(tl.where(valid & (ratio > ratio_high) & (adv > 0.0), m, 0.0), axis=0)
    tl.store(stats_ptr + row, loss_sum)
    tl.store(stats_ptr + n_rows + row, count)
    tl.store(stats_ptr + 2 * n_rows + row, kl_sum)
    tl.store(stats_ptr + 3 * n_rows + row, low_sum)
    tl.store(stats_ptr + 4 * n_rows + row, high_sum)


@jit
def _grpo_bwd_kernel(
    lp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, row_weight_ptr, grad_loss_ptr, grad_lp_ptr,
    seq_len,
    lp_stride, old_stride, ref_stride, adv_stride_row, adv_stride_tok, mask_stride, grad_stride,
    ratio_low, ratio_high, beta,
    HAS_OLD: tl.constexpr, ADD_KL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(row_weight_ptr + row) * tl.load(grad_loss_ptr).to(tl.float32)
    for start in range(0, seq_len, BLOCK):
        t = start + tl.arange(0, BLOCK)
        in_row = t < seq_len
        lp = tl.load(lp_ptr + row * lp_stride + t, mask=in_row, other=0.0).to(tl.float32)
        m = tl.load(mask_ptr + row * mask_stride + t, mask=in_row, other=0).to(tl.float32)
        adv = tl.load(adv_ptr + row * adv_stride_row + t * adv_stride_tok, mask=in_row, other=0.0).to(tl.float32)
        if HAS_OLD:
            old = tl.load(old_ptr + row * old_stride + t, mask=in_row, other=0.0).to(tl.float32)
        else:
            old = lp
        ratio = tl.exp(lp - old)
        clipped = ((ratio < ratio_low) & (adv < 0.0)) | ((ratio > ratio_high) & (adv > 0.0))
        grad = tl.where(clipped, 0.0, -adv * ratio)
        if ADD_KL:
            delta = tl.load(ref_ptr + row * ref_stride + t, mask=in_row, other=0.0).to(tl.float32) - lp
            grad += beta * (1.0 - tl.exp(delta))
        grad = tl.where(m != 0.0, grad * m * scale, 0.0)
        tl.store(grad_lp_ptr + row * grad_stride + t, grad.to(grad_lp_ptr.dtype.element_ty), mask=in_row)


def _advantage_strides(advantages: Tensor) -> tuple[int, int]:
    if advantages.dim() == 1:
        return advantages.stride(0), 0
    return advantages.stride(0), advantages.stride(1)


def _unit_stride(x: Tensor | None) -> Tensor | None:
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


class GRPOLossFunction(torch.autograd.Function):
    """Triton GRPO loss; returns ``(loss, stats)`` where ``stats`` [5, B] are non-differentiable row sums."""

    @staticmethod
    def forward(ctx, logprobs, old_logprobs, ref_logprobs, advantages, mask, eps_low, eps_high, beta, loss_type,
                max_completion_length, num_items_in_batch):
        n_rows, seq_len = logprobs.shape
        has_old, has_ref, add_kl = old_logprobs is not None, ref_logprobs is not None, beta > 0
        stats = torch.zeros(_N_STATS, n_rows, dtype=torch.float32, device=logprobs.device)
        block, num_warps = row_block(seq_len, gpu_max=1024, interpret_max=16)
        adv_strides = _advantage_strides(advantages)
        if n_rows and seq_len:
            _grpo_fwd_kernel[(n_rows,)](
                logprobs, old_logprobs if has_old else logprobs, ref_logprobs if has_ref else logprobs,
                advantages, mask, stats, n_rows, seq_len,
                logprobs.stride(0), old_logprobs.stride(0) if has_old else 0, ref_logprobs.stride(0) if has_ref else 0,
                *adv_strides, mask.stride(0),
                1.0 - eps_low, 1.0 + eps_high, float(beta),
                HAS_OLD=has_old, HAS_REF=has_ref, ADD_KL=add_kl, BLOCK=block, num_warps=num_warps,
            )
        row_weights = reference.aggregation_weights(
            stats[1], loss_type, seq_len, max_completion_length, num_items_in_batch
        ).to(torch.float32).contiguous()
        loss = (row_weights * stats[0]).sum()
        ctx.save_for_backward(logprobs, old_logprobs, ref_logprobs, advantages, mask, row_weights)
        ctx.config = (has_old, add_kl, float(eps_low), float(eps_high), float(beta), block, num_warps)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        logprobs, old_logprobs, ref_logprobs, advantages, mask, row_weights = ctx.saved_tensors
        has_old, add_kl, eps_low, eps_high, beta, block, num_warps = ctx.config
        grad = torch.zeros(logprobs.shape, dtype=logprobs.dtype, device=logprobs.device)
        n_rows, seq_len = logprobs.shape
        if ctx.needs_input_grad[0] and n_rows and seq_len:
            _grpo_bwd_kernel[(n_rows,)](
                logprobs, old_logprobs if has_old else logprobs, ref_logprobs if add_kl else logprobs,
                advantages, mask, row_weights, grad_loss.contiguous(), grad, seq_len,
                logprobs.stride(0), old_logprobs.stride(0) if has_old else 0, ref_logprobs.stride(0) if add_kl else 0,
                *_advantage_strides(advantages), mask.stride(0), grad.stride(0),
                1.0 - eps_low, 1.0 + eps_high, beta,
                HAS_OLD=has_old, ADD_KL=add_kl, BLOCK=block, num_warps=num_warps,
            )
        return (grad,) + (None,) * 10


def _check_grpo_args(logprobs, old_logprobs, ref_logprobs, advantages, mask, eps_low, eps_high, beta, loss_type,
                     max_completion_length):
    if logprobs.dim() != 2 or not logprobs.dtype.is_floating_point:
        raise ValueError(f"logprobs must be a float [B, T] tensor, got {logprobs.dtype} {tuple(logprobs.shape)}.")
    shape = tuple(logprobs.shape)
    for name, value in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs), ("mask", mask)):
        if value is not None and tuple(value.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {shape} like logprobs.")
    if tuple(advantages.shape) not in (shape[:1], shape):
        raise ValueError(
            f"advantages has shape {tuple(advantages.shape)}; expected [B] = {shape[:1]} or [B, T] = {shape}."
        )
    if loss_type not in reference.LOSS_TYPES:
        valid = ", ".join(map(repr, reference.LOSS_TYPES))
        raise ValueError(f"loss_type={loss_type!r} is not valid; use one of {valid}.")
    if beta < 0:
        raise ValueError(f"beta={beta!r} must be >= 0.")
    if beta > 0 and ref_logprobs is None:
        raise ValueError(f"beta={beta!r} > 0 needs ref_logprobs (the reference policy's log-probabilities); "
                         "pass them or set beta=0.")
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"eps_low={eps_low!r} and eps_high={eps_high!r} must be >= 0.")
    if max_completion_length is not None and max_completion_length < 1:
        raise ValueError(f"max_completion_length={max_completion_length!r} must be a positive integer or None.")


@kernel_guard("grpo_loss")
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
    backend: str = "auto",
    num_items_in_batch: int | float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped GRPO loss (float32 scalar) and detached float32 metrics.

    ``logprobs``, ``mask`` (bool or 0/1 float): [B, T]; ``advantages``: [B] or [B, T]; ``old_logprobs``: [B, T] or
    None (on-policy: ratio 1 with gradient); ``ref_logprobs``: [B, T], required when ``beta > 0``.
    ``loss_type``: ``grpo`` (per-sequence token mean, then mean over sequences; an empty sequence contributes 0),
    ``bnpo`` (token mean over the batch), ``dr_grpo`` (token sum / (B * (max_completion_length or T))), ``dapo``
    (token sum / ``num_items_in_batch``, default the local valid-token count, which equals ``bnpo``; TRL passes the
    global count so every process and accumulation step shares one denominator).
    Metrics: ``clip_ratio`` (fraction of valid tokens where the clipped term is selected), ``clip_ratio_low``,
    ``clip_ratio_high`` and ``kl`` (masked mean k3 KL; 0 without ``ref_logprobs``).
    """
    _check_grpo_args(logprobs, old_logprobs, ref_logprobs, advantages, mask, eps_low, eps_high, beta, loss_type,
                     max_completion_length)
    if resolve_backend(backend, logprobs.device) == "torch":
        loss, metrics = reference.grpo_loss(
            logprobs, old_logprobs, ref_logprobs, advantages, mask, eps_low, eps_high, beta, loss_type,
            max_completion_length, num_items_in_batch,
        )
        return loss.float(), metrics

    mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    loss, stats = GRPOLossFunction.apply(
        _unit_stride(logprobs), _unit_stride(old_logprobs), _unit_stride(ref_logprobs), advantages,
        _unit_stride(mask), float(eps_low), float(eps_high), float(beta), loss_type, max_completion_length,
        num_items_in_batch,
    )
    _, count, kl_sum, low, high = stats.sum(dim=1)
    return loss, reference.grpo_metrics(count, low, high, kl_sum if ref_logprobs is not None else None)
