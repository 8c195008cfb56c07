"""First-use guard of the Triton kernels: a kernel that fails to build, launch or agree falls back to its reference.

The kernels are checked against their PyTorch references under the Triton interpreter, but the compiled path
depends on the GPU, the driver, the CUDA toolkit Triton finds and the Triton release. So that none of those can
stop a training run, every public kernel function is wrapped by :func:`kernel_guard`. When the backend was
resolved to Triton by ``backend="auto"`` (not forced by ``backend="triton"`` or ``PROUIE_KERNELS``):

1. once per kernel and process, before the first such call, a *self-check* runs the kernel and its reference on
   a small input built like the call (same dtype, same options) and compares the outputs and, for the autograd
   kernels, the input gradients, with tolerances for the dtype;
2. the first call itself runs on Triton; if it raises (and the reference, given the same call, does not), the
   kernel failed to compile or launch.

Either failure switches that kernel to the reference for the rest of the process, with one
:class:`KernelFallbackWarning` that names the kernel, the error or the measured mismatch, and the way out:
``PROUIE_KERNELS=torch`` chooses the reference from the start (no self-check, no warning), while
``PROUIE_KERNELS=triton`` (or ``backend="triton"``) switches the guard off, so kernel errors raise. After a first
call that succeeded, calls go straight to the kernel. Out-of-memory errors always propagate: the reference would
need the memory too. A failure in the backward pass of the first real call is not caught (autograd runs it later,
outside the call), but the self-check has built and run the same backward kernels by then.

:func:`fallback_status` says which backend each kernel uses; :func:`reset_kernel_guard` forgets every decision
(the tests use it between cases).
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from ._dispatch import ENV_VAR, resolve_backend
from .reference import IGNORE_INDEX

__all__ = ["KernelFallbackWarning", "fallback_status", "kernel_guard", "reset_kernel_guard"]


class KernelFallbackWarning(RuntimeWarning):
    """A Triton kernel was replaced by its PyTorch reference for the rest of the process."""


# Self-check tolerances, as a fraction of the largest reference value. Outputs are float32 maths on identical
# inputs in both backends; gradients are stored in the input dtype, and the LM-head gradients also go through
# matmuls in that dtype. A wrong kernel is off by O(1), far above these.
_OUTPUT_TOL = 1e-4
_GRAD_TOL = {torch.float32: 1e-4, torch.float64: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
_SCALE_FLOOR = 1e-3  # values below this count as this large, so rounding noise around 0 is not a mismatch
_MAX_ERROR_CHARS = 400


@dataclass
class _KernelState:
    self_checked: bool = False
    trusted: bool = False  # a real call ran on Triton after the self-check: later calls skip the guard
    fallback: str | None = None  # why the reference replaced Triton


_STATES: dict[str, _KernelState] = {}
_LOCK = threading.RLock()


def reset_kernel_guard() -> None:
    """Forget every self-check and fallback: the next guarded call of each kernel checks it again."""
    with _LOCK:
        _STATES.clear()


def fallback_status() -> dict[str, str]:
    """``{kernel: "unchecked" | "triton" | "torch: <why>"}`` for the kernels the guard has seen in this process."""
    out = {}
    for name, state in sorted(_STATES.items()):
        if state.fallback is not None:
            out[name] = f"torch: {state.fallback}"
        else:
            out[name] = "triton" if state.self_checked else "unchecked"
    return out


# ----------------------------------------------------------------------------------------------- self-check inputs


class _Case(NamedTuple):
    """A self-check input: keyword arguments of the public function and which of them get a gradient."""

    kwargs: dict
    grads: tuple[str, ...]
    dtype: torch.dtype  # chooses the gradient tolerance


def _rand(gen: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=gen)


def _token_logprobs_case(call: dict, device: torch.device, gen: torch.Generator) -> _Case:
    dtype = call["logits"].dtype
    vocab = 301  # not a power of two: the last block is partial
    targets = torch.randint(0, vocab, (2, 5), generator=gen)
    targets[0, 1], targets[1, 4] = IGNORE_INDEX, vocab - 1
    logits = (3 * _rand(gen, 2, 5, vocab)).to(device, dtype)
    return _Case({"logits": logits, "targets": targets.to(device), "temperature": call.get("temperature", 1.0)},
                 ("logits",), dtype)


def _linear_token_logprobs_case(call: dict, device: torch.device, gen: torch.Generator) -> _Case:
    weight_in = call["weight"]
    dtype, vocab, width, rows = weight_in.dtype, 301, 24, 11
    trainable = weight_in.requires_grad
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    targets[3] = IGNORE_INDEX
    kwargs = {
        "hidden": _rand(gen, rows, width).to(device, dtype),
        "weight": (0.3 * _rand(gen, vocab, width)).to(device, dtype),
        "targets": targets.to(device),
        "bias": None if call.get("bias") is None else (0.5 * _rand(gen, vocab)).to(device, dtype),
        "temperature": call.get("temperature", 1.0),
        "chunk_size": 4,  # three chunks, the last one partial
    }
    grads = ("hidden",) + (("weight",) + (("bias",) if kwargs["bias"] is not None else ()) if trainable else ())
    return _Case(kwargs, grads, dtype)


def _group_advantages_case(call: dict, device: torch.device, gen: torch.Generator) -> _Case:
    dtype = call["rewards"].dtype
    rewards = torch.rand(20, generator=gen)
    rewards[5:10] = 0.5  # one group with no spread: exact zeros
    kwargs = {"rewards": rewards.to(device, dtype), "group_size": 5, "scale": call.get("scale", "group"),
              "eps": call.get("eps", 1e-4)}
    return _Case(kwargs, (), dtype)


def _stepwise_advantages_case(call: dict, device: torch.device, gen: torch.Generator) -> _Case:
    dtype = call["step_rewards"].dtype
    batch, steps, seq_len = 6, 4, 13
    mask = torch.rand(batch, steps, generator=gen) > 0.25
    mask[0] = False  # a completion without steps
    kwargs = {
        "step_rewards": torch.rand(batch, steps, generator=gen).to(device, dtype),
        "step_ends": torch.randint(0, seq_len + 3, (batch, steps), generator=gen).to(device),  # some past the end
        "step_mask": mask.to(device),
        "group_size": 3,
        "seq_len": seq_len,
        "eps": call.get("eps", 1e-4),
    }
    return _Case(kwargs, (), dtype)


def _grpo_loss_case(call: dict, device: torch.device, gen: torch.Generator) -> _Case:
    dtype = call["logprobs"].dtype
    batch, seq_len = 3, 37
    lp = -3 * torch.rand(batch, seq_len, generator=gen)
    # a spread of 0.3 puts some ratios outside the clip range on both sides
    old = None if call.get("old_logprobs") is None else lp + 0.3 * _rand(gen, batch, seq_len)
    beta = call.get("beta", 0.0)
    with_ref = call.get("ref_logprobs") is not None or beta > 0
    advantages = _rand(gen, batch, seq_len) if call["advantages"].dim() == 2 else _rand(gen, batch)
    mask = torch.rand(batch, seq_len, generator=gen) > 0.2
    mask_in = call["mask"]
    num_items = call.get("num_items_in_batch")
    kwargs = {
        "logprobs": lp.to(device, dtype),
        "old_logprobs": None if old is None else old.to(device, dtype),
        "ref_logprobs": (lp + 0.1 * _rand(gen, batch, seq_len)).to(device, dtype) if with_ref else None,
        "advantages": advantages.to(device),
        "mask": mask.to(device) if mask_in.dtype == torch.bool else mask.to(device, mask_in.dtype),
        "eps_low": call.get("eps_low", 0.2),
        "eps_high": call.get("eps_high", 0.2),
        "beta": beta,
        "loss_type": call.get("loss_type", "grpo"),
        "max_completion_length": None if call.get("max_completion_length") is None else seq_len + 5,
        "num_items_in_batch": None if num_items is None else 17.0,
    }
    return _Case(kwargs, ("logprobs",), dtype)


# kernel name -> (the argument whose device decides the backend, the self-check input builder)
_GUARDED: dict[str, tuple[str, Callable[[dict, torch.device, torch.Generator], _Case]]] = {
    "token_logprobs": ("logits", _token_logprobs_case),
    "linear_token_logprobs": ("hidden", _linear_token_logprobs_case),
    "group_advantages": ("rewards", _group_advantages_case),
    "stepwise_advantages": ("step_rewards", _stepwise_advantages_case),
    "grpo_loss": ("logprobs", _grpo_loss_case),
}


# ------------------------------------------------------------------------------------------------ the comparison


def _flatten(out, prefix: str = "output") -> list[tuple[str, Tensor]]:
    """Named tensors of a kernel's return value (a tensor, or ``(loss, {metric: tensor})``)."""
    if isinstance(out, Tensor):
        return [(prefix, out)]
    if isinstance(out, dict):
        return [item for key, value in out.items() for item in _flatten(value, f"{prefix}[{key!r}]")]
    if isinstance(out, (tuple, list)):
        return [item for i, value in enumerate(out) for item in _flatten(value, f"{prefix}[{i}]")]
    return []


def _run_case(fn: Callable, case: _Case, backend: str) -> list[tuple[str, Tensor, float]]:
    """(what, value, tolerance) for every output and requested input gradient of one backend on ``case``."""
    kwargs = {
        k: v.detach().clone().requires_grad_(k in case.grads) if isinstance(v, Tensor) else v
        for k, v in case.kwargs.items()
    }
    outputs = _flatten(fn(**kwargs, backend=backend))
    values = [(what, value.detach(), _OUTPUT_TOL) for what, value in outputs]
    if case.grads:
        # A fixed, non-uniform upstream gradient: a per-row scaling bug cannot hide behind equal weights.
        objective = sum(
            (value.float() * torch.linspace(-1.0, 2.0, value.numel(), device=value.device).view(value.shape)).sum()
            for _, value in outputs
            if value.requires_grad
        )
        grads = torch.autograd.grad(objective, [kwargs[name] for name in case.grads])
        tol = _GRAD_TOL.get(case.dtype, _GRAD_TOL[torch.float32])
        values += [(f"gradient of {name}", grad, tol) for name, grad in zip(case.grads, grads)]
    return values


def _mismatch(name: str, fn: Callable, call: dict, device: torch.device) -> str | None:
    """None when Triton agrees with the reference on the self-check input, else what differs and by how much."""
    gen = torch.Generator().manual_seed(0)
    # The first call may come from a no-grad or inference-mode scoring pass, or from inside autocast: the check
    # needs gradients and must see the dtypes it built.
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        case = _GUARDED[name][1](call, device, gen)
        expected = _run_case(fn, case, "torch")
        actual = _run_case(fn, case, "triton")
    shape = next(tuple(v.shape) for v in case.kwargs.values() if isinstance(v, Tensor))
    for (what, want, tol), (_, got, _) in zip(expected, actual):
        if got.shape != want.shape:
            return f"{what} has shape {tuple(got.shape)}, the reference's {tuple(want.shape)}"
        diff = (got.double() - want.double()).abs()
        error = float(diff.max()) if diff.numel() else 0.0
        scale = max(float(want.double().abs().max()) if want.numel() else 0.0, _SCALE_FLOOR)
        if not math.isfinite(error) or error > tol * scale:
            return (f"{what}: max |triton - reference| = {error:.3g}, above the tolerance {tol:g} x {scale:.3g} "
                    f"(largest reference value), on a {list(shape)} {str(case.dtype).removeprefix('torch.')} input")
    return None


# --------------------------------------------------------------------------------------------------------- guard


def _guard_applies(tensor, backend: str) -> bool:
    """Whether this call is one the guard watches: Triton chosen by ``"auto"``, no ``PROUIE_KERNELS`` override."""
    if backend != "auto" or not isinstance(tensor, Tensor) or os.environ.get(ENV_VAR, "").strip():
        return False
    return resolve_backend("auto", tensor.device) == "triton"


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if len(text) > _MAX_ERROR_CHARS:
        text = text[:_MAX_ERROR_CHARS] + " ..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _fall_back(name: str, state: _KernelState, reason: str, device: torch.device) -> None:
    state.fallback = reason
    warnings.warn(
        f"prouie_pl.kernels.{name}: the Triton kernel on {device} {reason}; {name} uses the PyTorch reference "
        f"for the rest of this process. Set {ENV_VAR}=torch to choose the reference from the start (no check, no "
        f"warning), or {ENV_VAR}=triton to make kernel errors raise instead.",
        KernelFallbackWarning,
        stacklevel=4,  # _fall_back <- _first_call <- the wrapper <- the caller of the kernel function
    )


def _first_call(name: str, fn: Callable, call: inspect.BoundArguments, device: torch.device):
    state = _STATES.setdefault(name, _KernelState())
    if not state.self_checked:
        state.self_checked = True
        try:
            reason = _mismatch(name, fn, call.arguments, device)
            if reason is not None:
                reason = f"disagrees with the PyTorch reference on a self-check input ({reason})"
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # compile errors, PTX assembler failures, launch errors, missing libdevice, ...
            reason = f"failed to compile or launch during its self-check ({_short(exc)})"
        if reason is not None:
            _fall_back(name, state, reason, device)
    if state.fallback is not None:
        return _call_with(fn, call, "torch")
    try:
        out = fn(*call.args, **call.kwargs)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as exc:
        # If the reference fails on the same call too, the call is at fault (bad arguments), not the kernel:
        # its error propagates and the kernel stays on Triton.
        out = _call_with(fn, call, "torch")
        _fall_back(name, state, f"failed to compile or launch ({_short(exc)})", device)
        return out
    state.trusted = True
    return out


def _call_with(fn: Callable, call: inspect.BoundArguments, backend: str):
    arguments = dict(call.arguments, backend=backend)
    return fn(**arguments)


def kernel_guard(name: str) -> Callable[[Callable], Callable]:
    """Wrap the public kernel function ``name`` with the first-use guard described in the module docstring."""
    device_arg = _GUARDED[name][0]

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def guarded(*args, **kwargs):
            state = _STATES.get(name)
            if state is not None and state.trusted:
                return fn(*args, **kwargs)
            call = signature.bind(*args, **kwargs)
            if not _guard_applies(call.arguments.get(device_arg), call.arguments.get("backend", "auto")):
                return fn(*args, **kwargs)
            if state is not None and state.fallback is not None:
                return _call_with(fn, call, "torch")
            with _LOCK:  # one thread runs the self-check; the others wait for its verdict
                return _first_call(name, fn, call, call.arguments[device_arg].device)

        return guarded

    return decorate
