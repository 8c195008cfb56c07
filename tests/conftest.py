"""Shared test set-up.

* Triton kernels run under the interpreter on machines without CUDA: ``TRITON_INTERPRET=1`` must be set
  before the kernel module is imported, so it is set here, before any test module imports the package.
* ``needs_shared_data``: tests that read the real benchmark data in ``../shared/data/uie`` (CI has it beside
  the clone) skip with a clear reason where it is absent.  ``PROUIE_SHARED_DATA`` points elsewhere.
* ``tiny_model_dir``: one tiny offline model and tokenizer per session, built on the demo data.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PROUIE_SHARED_DATA", REPO.parent / "shared" / "data" / "uie"))

needs_shared_data = pytest.mark.skipif(
    not (SHARED_DATA / "NER").is_dir(),
    reason=f"real benchmark data not found at {SHARED_DATA} (CI has ../shared/data/uie beside the clone; "
    "set PROUIE_SHARED_DATA to use another copy)",
)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "NER").is_dir():
        pytest.skip(f"real benchmark data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    from prouie_pl.demo_data import demo_data_dir

    return demo_data_dir()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from prouie_pl.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"), hidden_size=64, num_layers=2, num_heads=2,
                            num_kv_heads=1, intermediate_size=128, vocab_size=1000, pretrain_steps=0)
