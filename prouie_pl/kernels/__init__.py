"""Triton kernels for GRPO training, each paired with a PyTorch reference that is also the CPU path.

* :func:`token_logprobs` / :func:`linear_token_logprobs`: per-token log-probabilities without materialising the
  log-softmax (online log-sum-exp over vocabulary blocks); the linear variant fuses the LM head in row chunks so the
  logits never exist in full, and skips the weight gradient when the head is frozen (LoRA).
* :func:`group_advantages` / :func:`stepwise_advantages`: GRPO outcome advantages and DeepSeekMath-style process
  supervision advantages (segmented normalisation + reverse cumulative sum).
* :func:`grpo_loss`: the clipped GRPO surrogate with k3 KL and TRL's aggregations, fused forward and backward.

Every function takes ``backend="auto" | "triton" | "torch"`` (see :mod:`prouie_pl.kernels._dispatch`):
``auto`` uses Triton on CUDA tensors and the reference otherwise; ``PROUIE_KERNELS=torch|triton`` overrides it.
On CPU, ``backend="triton"`` needs ``TRITON_INTERPRET=1``. Importing this package does not require Triton.

Triton chosen by ``auto`` is guarded (:mod:`prouie_pl.kernels.fallback`): a kernel that fails to compile or launch
on its first call, or disagrees with its reference on a small self-check, switches to the reference for the rest of
the process with one :class:`KernelFallbackWarning`; :func:`fallback_status` says which backend each kernel uses.
"""

from ._dispatch import resolve_backend
from .fallback import KernelFallbackWarning, fallback_status
from .advantages import group_advantages, stepwise_advantages
from .grpo_loss import grpo_loss
from .logprobs import linear_token_logprobs, token_logprobs

__all__ = [
    "KernelFallbackWarning",
    "fallback_status",
    "group_advantages",
    "grpo_loss",
    "linear_token_logprobs",
    "resolve_backend",
    "stepwise_advantages",
    "token_logprobs",
]
