"""Backend selection and the Triton plumbing shared by the kernel files.

Every public kernel function takes ``backend="auto" | "triton" | "torch"``:

* ``"auto"`` runs Triton on CUDA tensors (the device types in ``AUTO_TRITON_DEVICES``) and the PyTorch reference
  everywhere else. The environment variable ``PROUIE_KERNELS=torch|triton`` overrides ``"auto"`` globally (an
  explicit ``backend=`` argument still wins). Triton chosen by ``"auto"`` is watched by the first-use guard of
  :mod:`prouie_pl.kernels.fallback`, which switches a kernel that fails to build or to agree with its reference
  to the reference; a forced ``"triton"`` is not watched, so its errors raise.
* ``"triton"`` on CPU tensors only works under the Triton interpreter (``TRITON_INTERPRET=1``), which is how the
  test suite checks the kernels on machines without a GPU.

Triton itself is optional at import time: if it cannot be imported, ``prouie_pl.kernels`` still imports, the
reference path works, and asking for ``backend="triton"`` raises a ``RuntimeError`` saying why.

Kernels are declared with :func:`jit`, a lazy ``triton.jit``: the real decoration happens at the first launch, so
``TRITON_INTERPRET`` is honoured whenever it was set before the first kernel call (``triton.jit`` alone reads it at
decoration time, i.e. at import).
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import torch

try:  # Triton is a dependency, but a broken or missing install must not break `import prouie_pl.kernels`.
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: BaseException | None = None
except Exception as exc:  # pragma: no cover - exercised in a subprocess test that hides triton
    triton = None
    _TRITON_IMPORT_ERROR = exc

    class _TritonUnavailable:
        """Stands in for ``triton.language`` so kernel signatures (``BLOCK: tl.constexpr``) still evaluate."""

        def __getattr__(self, name: str) -> "_TritonUnavailable":
            return self

        def __call__(self, *args, **kwargs) -> "_TritonUnavailable":  # module-level tl.constexpr(...) values
            return self

    tl = _TritonUnavailable()

__all__ = [
    "AUTO_TRITON_DEVICES",
    "BACKENDS",
    "ENV_VAR",
    "interpreting",
    "jit",
    "next_power_of_2",
    "resolve_backend",
    "row_block",
    "triton_available",
    "triton_runnable_on",
]

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "PROUIE_KERNELS"
# Device types on which backend="auto" picks Triton. Tests add "cpu" (under TRITON_INTERPRET=1) to run the
# first-use guard, which only watches Triton chosen by "auto", on machines without a GPU.
AUTO_TRITON_DEVICES: tuple[str, ...] = ("cuda",)


def triton_available() -> bool:
    """Whether ``import triton`` succeeded."""
    return triton is not None


def interpreting() -> bool:
    """Whether Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``), read at call time."""
    if triton is not None and hasattr(triton, "knobs"):
        return bool(triton.knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_runnable_on(device: torch.device | str) -> bool:
    """Whether a Triton kernel can run on tensors of ``device`` right now."""
    if triton is None:
        return False
    return interpreting() or torch.device(device).type == "cuda"


def _check_backend_name(backend: str, where: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"{where}={backend!r} is not a kernel backend; use one of {', '.join(map(repr, BACKENDS))}.")


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """Turn ``backend`` into ``"triton"`` or ``"torch"`` for tensors living on ``device``.

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` when Triton is requested but cannot run there.
    """
    _check_backend_name(backend, "backend")
    if backend == "auto":
        override = os.environ.get(ENV_VAR, "").strip().lower()
        if override:
            if override not in ("triton", "torch"):
                raise ValueError(
                    f"environment variable {ENV_VAR}={override!r} is not valid; use 'triton', 'torch' or unset it."
                )
            backend = override
        else:
            auto_triton = torch.device(device).type in AUTO_TRITON_DEVICES and triton is not None
            backend = "triton" if auto_triton else "torch"
    if backend == "triton":
        _require_triton_on(torch.device(device))
    return backend


def _require_triton_on(device: torch.device) -> None:
    if triton is None:
        raise RuntimeError(
            f"backend='triton' was requested but Triton cannot be imported ({_TRITON_IMPORT_ERROR!r}); "
            "install triton or use backend='torch'."
        )
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"backend='triton' on {device.type} tensors needs the Triton interpreter: set TRITON_INTERPRET=1 in the "
            "environment before the first kernel call, move the tensors to a CUDA device, or use backend='torch'."
        )


class _LazyKernel:
    """A ``triton.jit`` kernel decorated at its first launch, once per mode (compiled / interpreted)."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self._built: dict[bool, object] = {}
        functools.update_wrapper(self, fn)

    def __getitem__(self, grid):
        mode = interpreting()
        kernel = self._built.get(mode)
        if kernel is None:
            if triton is None:
                raise RuntimeError(f"Triton cannot be imported ({_TRITON_IMPORT_ERROR!r}); use backend='torch'.")
            kernel = self._built[mode] = triton.jit(self.fn)
        return kernel[grid]


def jit(fn: Callable) -> _LazyKernel:
    """Declare a Triton kernel (see the module docstring for why the decoration is deferred)."""
    return _LazyKernel(fn)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


# Block-size caps. On a GPU large blocks keep the row kernels bandwidth-bound; under the interpreter every loop
# iteration is Python, yet small caps make the tests cross block boundaries and exercise the masked remainders.
_GPU_MAX_BLOCK = 4096
_INTERPRET_MAX_BLOCK = 256


def row_block(n_cols: int, gpu_max: int = _GPU_MAX_BLOCK, interpret_max: int = _INTERPRET_MAX_BLOCK) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` for a kernel that walks one row of ``n_cols`` elements in blocks.

    Fixed heuristics, no autotuning: the row kernels are memory-bound and autotune cannot run under the
    interpreter anyway.
    """
    cap = interpret_max if interpreting() else gpu_max
    block = max(16, min(next_power_of_2(n_cols), cap))
    num_warps = 4 if block <= 1024 else (8 if block <= 4096 else 16)
    return block, num_warps
