"""Checkpoint callbacks: a resumable stage checkpoint at a fixed place, and a cross-rank consistency check."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint


class StageCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that defaults to ``<default_root_dir>/checkpoints`` with ``save_last=True``.

    Lightning's own default puts checkpoints under a new ``version_N`` folder per run, where ``fit
    --ckpt_path last`` of the next run does not look; a fixed folder makes an interrupted stage resumable.
    Checkpoints hold the trainable (LoRA) weights, optimizer, scheduler, loops and data-loader position.
    """

    def __init__(self, *args, save_last: Optional[bool] = True, **kwargs):
        super().__init__(*args, save_last=save_last, **kwargs)

    def resolve_dirpath(self, trainer: L.Trainer) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.realpath(os.path.join(trainer.default_root_dir, "checkpoints"))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.resolve_dirpath(trainer)
        super().setup(trainer, pl_module, stage)


def trainable_checksum(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted((n, p) for n, p in module.named_parameters() if p.requires_grad):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


class RankConsistencyCheck(L.Callback):
    """At the end of fit, compare the trainable weights of every rank; raise if they differ.

    Writes ``rank_check.json`` (per-rank checksums) into ``dirpath`` (default: ``default_root_dir``).
    A difference means the ranks' updates diverged (unsynchronised gradients), which no metric shows.
    """

    def __init__(self, dirpath: Optional[str] = None):
        self.dirpath = dirpath

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        mine = {"rank": trainer.global_rank, "checksum": trainable_checksum(pl_module)}
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, mine)
        else:
            gathered = [mine]
        identical = len({g["checksum"] for g in gathered}) == 1
        if trainer.is_global_zero:
            folder = Path(self.dirpath or trainer.default_root_dir)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "rank_check.json").write_text(json.dumps({"ranks": gathered, "identical": identical}, indent=2) + "\n")
        if not identical:
            raise RuntimeError(f"trainable weights differ across ranks: {gathered}")
