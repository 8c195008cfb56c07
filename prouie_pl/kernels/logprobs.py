"""Per-token log-probabilities without materialising the log-softmax: Triton kernels, autograd, public API.

``token_logprobs(logits, targets)`` returns ``log_softmax(logits / T)[target]`` per row. The Triton forward runs one
program per row, walks the vocabulary in blocks with an online max / sum-of-exponentials (one ``exp`` per logit),
and stores the row's log-sum-exp (float32) for the backward, which recomputes the softmax block by block and writes
``grad * (onehot - softmax) / T``. Logits are read in their own dtype (fp32 / bf16 / fp16) and converted to float32
in registers; only the gradient store goes back to the logits' dtype.

``linear_token_logprobs(hidden, weight, targets)`` fuses the LM head: rows are processed in chunks, each chunk's
logits are a cuBLAS matmul in the input dtype, the row kernels above turn them into log-probabilities (forward) and,
recomputed, into gradient logits in place (backward). With a frozen head only ``hidden`` needs a gradient, which is
``upstream * (onehot - softmax) @ weight / T``: forward builds ``(onehot - softmax) @ weight`` chunk by chunk and
backward is a row scaling, so the whole thing costs the same two matmuls as ``hidden @ weight.T`` forward + backward.
The chunking and matmuls live in
:func:`prouie_pl.kernels.reference.chunked_linear_token_logprobs`, shared with the CPU reference so both paths
differ only in the row operations.

Targets equal to ``IGNORE_INDEX`` (-100) give log-probability 0 and a zero gradient. Other out-of-range targets raise in the torch
path and give NaN in the Triton path (the kernels do not synchronise to check).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from ._dispatch import jit, resolve_backend, row_block, tl
from .fallback import kernel_guard

_IGNORE_INDEX = tl.constexpr(reference.IGNORE_INDEX)  # a Triton kernel reads globals only as constexpr

__all__ = ["linear_token_logprobs", "token_logprobs"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@jit
def _logprobs_fwd_kernel(
    logits_ptr,
    targets_ptr,
    logprobs_ptr,
    lse_ptr,
    n_cols,
    rows_per_batch,
    batch_stride,
    row_stride,
    inv_temperature,
    BLOCK: tl.constexpr,
):
    # Rows are addressed as [batch, row] so a sliced [B, T, V] view (e.g. logits[:, :-1]) needs no copy.
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + (row // rows_per_batch) * batch_stride + (row % rows_per_batch) * row_stride
    target = tl.load(targets_ptr + row)
    ignored = target == _IGNORE_INDEX

    running_max = float("-inf")
    running_sum = 0.0
    for start in range(0, n_cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + offs, mask=offs < n_cols, other=float("-inf")).to(tl.float32) * inv_temperature
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        # A row whose logits so far are all -inf keeps a zero sum instead of producing exp(-inf - -inf) = NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(x - shift), axis=0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)

    safe_target = tl.where(ignored, 0, target)
    in_range = (safe_target >= 0) & (safe_target < n_cols)
    target_logit = tl.load(row_ptr + safe_target, mask=in_range, other=float("nan")).to(tl.float32) * inv_temperature
    tl.store(lse_ptr + row, lse)
    tl.store(logprobs_ptr + row, tl.where(ignored, 0.0, target_logit - lse))


@jit
def _logprobs_bwd_kernel(
    logits_ptr,
    grad_logits_ptr,
    targets_ptr,
    lse_ptr,
    grad_logprobs_ptr,
    n_cols,
    rows_per_batch,
    batch_stride,
    row_stride,
    grad_batch_stride,
    grad_row_stride,
    inv_temperature,
    BLOCK: tl.constexpr,
):
    # grad_logits may alias logits (the LM-head path overwrites its recomputed chunk): each block is fully read
    # before it is written, and no other program touches this row.
    row = tl.program_id(0).to(tl.int64)
    batch, row_in_batch = row // rows_per_batch, row % rows_per_batch
    row_ptr = logits_ptr + batch * batch_stride + row_in_batch * row_stride
    grad_row_ptr = grad_logits_ptr + batch * grad_batch_stride + row_in_batch * grad_row_stride
    target = tl.load(targets_ptr + row)
    ignored = target == _IGNORE_INDEX
    scale = tl.load(grad_logprobs_ptr + row).to(tl.float32) * inv_temperature
    scale = tl.where(ignored, 0.0, scale)
    lse = tl.load(lse_ptr + row)
    for start in range(0, n_cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        in_row = offs < n_cols
        x = tl.load(row_ptr + offs, mask=in_row, other=float("-inf")).to(tl.float32) * inv_temperature
        softmax = tl.exp(x - lse)
        grad = scale * (tl.where(offs == target, 1.0, 0.0) - softmax)
        grad = tl.where(ignored, 0.0, grad)
        tl.store(grad_row_ptr + offs, grad.to(grad_logits_ptr.dtype.element_ty), mask=in_row)


def _row_layout(x: Tensor) -> tuple[int, int, int]:
    """(rows per batch, batch stride, row stride) of a [N, V] or [B, T, V] tensor with unit stride along V."""
    if x.dim() == 2:
        return max(x.shape[0], 1), 0, x.stride(0)
    return max(x.shape[1], 1), x.stride(0), x.stride(1)


def _triton_rows_forward(logits: Tensor, targets: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(logprobs, lse) in float32, flat over rows, for [N, V] or [B, T, V] logits with unit stride along V."""
    n_cols = logits.shape[-1]
    n_rows = logits.numel() // n_cols if n_cols else 0
    logprobs = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows:
        block, num_warps = row_block(n_cols)
        _logprobs_fwd_kernel[(n_rows,)](
            logits, targets, logprobs, lse, n_cols, *_row_layout(logits), 1.0 / temperature,
            BLOCK=block, num_warps=num_warps,
        )
    return logprobs, lse


def _triton_rows_backward(
    logits: Tensor, targets: Tensor, lse: Tensor, grad: Tensor, temperature: float, out: Tensor | None = None
) -> Tensor:
    """Gradient logits in ``logits.dtype``; written into ``out`` (default: into ``logits`` itself)."""
    out = logits if out is None else out
    n_cols = logits.shape[-1]
    n_rows = logits.numel() // n_cols if n_cols else 0
    if n_rows:
        block, num_warps = row_block(n_cols)
        _, out_batch_stride, out_row_stride = _row_layout(out)
        _logprobs_bwd_kernel[(n_rows,)](
            logits, out, targets, lse, grad.contiguous(), n_cols, *_row_layout(logits), out_batch_stride,
            out_row_stride, 1.0 / temperature, BLOCK=block, num_warps=num_warps,
        )
    return out


TRITON_ROW_OPS = reference.RowOps(_triton_rows_forward, _triton_rows_backward)


class TokenLogprobsFunction(torch.autograd.Function):
    """Triton ``token_logprobs`` on [N, V] or [B, T, V] logits (any row strides, unit stride along V).

    Returns flat [rows] log-probabilities; saves the logits (no copy), the flat targets and the per-row lse.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, temperature: float) -> Tensor:
        logprobs, lse = _triton_rows_forward(logits, targets, temperature)
        ctx.save_for_backward(logits, targets, lse)
        ctx.temperature = temperature
        return logprobs

    @staticmethod
    def backward(ctx, grad_logprobs: Tensor):
        logits, targets, lse = ctx.saved_tensors
        grad_logits = None
        if ctx.needs_input_grad[0]:
            grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
            _triton_rows_backward(logits, targets, lse, grad_logprobs, ctx.temperature, out=grad_logits)
        return grad_logits, None, None


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0.")


def _check_targets(targets: Tensor, lead_shape: torch.Size, what: str) -> None:
    if targets.shape != lead_shape:
        raise ValueError(f"targets has shape {tuple(targets.shape)} but {what} needs {tuple(lead_shape)}.")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor (token ids, {reference.IGNORE_INDEX} to ignore), got {targets.dtype}.")


@kernel_guard("token_logprobs")
def token_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0, backend: str = "auto") -> Tensor:
    """Float32 ``log_softmax(logits / temperature)`` at ``targets``, shape ``logits.shape[:-1]``.

    ``logits``: [N, V] or [B, T, V], fp32 / bf16 / fp16. ``targets``: integer ids of the leading shape; ``IGNORE_INDEX`` (-100) gives
    0 and no gradient. Differentiable w.r.t. ``logits`` (the gradient has the logits' dtype).
    """
    if logits.dim() not in (2, 3) or logits.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"logits must be a float [N, V] or [B, T, V] tensor, got {logits.dtype} {tuple(logits.shape)}."
        )
    _check_targets(targets, logits.shape[:-1], "logits of shape " + str(tuple(logits.shape)))
    _check_temperature(temperature)
    if resolve_backend(backend, logits.device) == "torch":
        return reference.token_logprobs(logits, targets.to(torch.long), temperature)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    flat_targets = targets.reshape(-1).to(torch.long).contiguous()
    return TokenLogprobsFunction.apply(logits, flat_targets, float(temperature)).reshape(logits.shape[:-1])


@kernel_guard("linear_token_logprobs")
def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> Tensor:
    """Float32 log-probabilities of ``targets`` under the LM head ``hidden @ weight.T + bias`` (logits never whole).

    ``hidden``: [N, H] or [B, T, H]; ``weight``: [V, H]; ``bias``: [V] or None. ``hidden`` and ``bias`` are cast
    to ``weight.dtype``. ``chunk_size`` is the number of rows whose logits exist at once (default: at most 1/8 of
    the rows and at most ``reference.CHUNK_BUDGET_BYTES`` of float32 logits, ``CPU_CHUNK_BUDGET_BYTES`` on a
    CPU). Gradients flow to ``hidden`` and, only when they require grad, to ``weight`` and ``bias`` (a frozen head
    skips the weight-gradient matmul).
    """
    if hidden.dim() not in (2, 3) or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be [N, H] or [B, T, H] and [V, H]."
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},).")
    _check_targets(targets, hidden.shape[:-1], "hidden of shape " + str(tuple(hidden.shape)))
    _check_temperature(temperature)
    if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive integer (rows per chunk) or None.")
    use_triton = resolve_backend(backend, hidden.device) == "triton"
    row_ops = TRITON_ROW_OPS if use_triton else reference.TORCH_ROW_OPS
    return reference.chunked_linear_token_logprobs(hidden, weight, targets, bias, temperature, chunk_size, row_ops)
