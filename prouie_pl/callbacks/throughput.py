"""``TokenThroughput``: Lightning's ``ThroughputMonitor`` set up for ProUIE batches.

It counts a batch's rows as samples and its non-padding tokens as items, so the logger gets
``train/samples_per_sec`` and ``train/items_per_sec`` (non-padding tokens per second) over a sliding window, and
the same for validation.  FLOPs are not counted (``flops_per_batch`` is not known for a LoRA model), so no MFU
is reported.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import ThroughputMonitor


def batch_rows(batch: dict) -> int:
    return int(batch["input_ids"].shape[0])


def non_padding_tokens(batch: dict) -> int:
    return int(batch["attention_mask"].sum())


class TokenThroughput(ThroughputMonitor):
    """Throughput in rows and non-padding tokens per second.

    Args:
        window_size: batches the rates are averaged over.
    """

    def __init__(self, window_size: int = 20):
        super().__init__(batch_size_fn=batch_rows, length_fn=non_padding_tokens, window_size=window_size, separator="/")
