"""What a training stage cost: wall seconds (and the share of them spent in validation), optimizer steps,
training tokens, GRPO completions sampled.

The counters live in the callback's state, which Lightning saves in every checkpoint, so a stage resumed from
``last.ckpt`` reports the cost of the whole stage, not of its last piece.  SFT batches count their
non-padding tokens (prompt + answer) and answer tokens; GRPO batches count their prompts times the group size
(``model.rollout.num_generations``) as completions sampled.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L

from ..kernels.reference import IGNORE_INDEX


class StageCost(L.Callback):
    def __init__(self):
        self.state = {"seconds": 0.0, "validation_seconds": 0.0, "steps": 0, "tokens": 0, "answer_tokens": 0, "completions": 0}
        self._t0: float | None = None
        self._v0: float | None = None

    def on_validation_start(self, trainer, pl_module) -> None:
        self._v0 = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._v0 is not None:
            self.state["validation_seconds"] += time.perf_counter() - self._v0
            self._v0 = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not isinstance(batch, dict):
            return
        settings = getattr(pl_module, "rollout_settings", None)
        if settings is not None and "records" in batch:
            self.state["completions"] += len(batch["records"]) * int(settings.num_generations)
            return
        mask = batch.get("attention_mask")
        if mask is not None:
            self.state["tokens"] += int(mask.sum())
        labels = batch.get("labels")
        if labels is not None:
            self.state["answer_tokens"] += int((labels != IGNORE_INDEX).sum())

    def _close(self, trainer) -> None:
        if self._t0 is None:
            return
        self.state["seconds"] += time.perf_counter() - self._t0
        self.state["steps"] = trainer.global_step  # restored on resume: the steps of the whole stage
        self._t0 = None

    def on_fit_end(self, trainer, pl_module) -> None:
        self._close(trainer)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._close(trainer)

    def state_dict(self) -> dict[str, Any]:
        # a checkpoint written mid-fit carries the time and steps up to that point
        out = dict(self.state)
        if self._t0 is not None:
            out["seconds"] += time.perf_counter() - self._t0
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.state.update({k: type(self.state[k])(v) for k, v in state_dict.items() if k in self.state})

    def summary(self) -> dict:
        return {**self.state, "seconds": round(self.state["seconds"], 1),
                "validation_seconds": round(self.state["validation_seconds"], 1)}
