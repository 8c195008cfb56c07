"""Hardware gates for the kernel tests, in one place.

Without a GPU the Triton kernels run under the interpreter: ``TRITON_INTERPRET=1`` is set here (as
``tests/conftest.py`` does) so the kernel tests also work when run on their own. ``prouie_pl.kernels`` reads the
variable at the first kernel launch, so setting it at import of this module is early enough.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from prouie_pl.kernels._dispatch import triton_available, triton_runnable_on  # noqa: E402

#: Where the Triton tests put their tensors: CUDA when present, else CPU under the interpreter.
KERNEL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
requires_triton = pytest.mark.skipif(
    not triton_runnable_on(KERNEL_DEVICE),
    reason="needs Triton on a CUDA device or under the interpreter (TRITON_INTERPRET=1)",
)

__all__ = ["KERNEL_DEVICE", "requires_cuda", "requires_triton", "triton_available"]
