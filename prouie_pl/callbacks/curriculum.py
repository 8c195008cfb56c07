"""``CurriculumCallback``: moves the CM stage through its phases.

The data module derives each epoch's phase from the epoch number; this callback makes Lightning ask for a
new training loader every epoch (so a phase change takes effect), holds early stopping off until the last
phase has started (``min_epochs``), warns when ``max_epochs`` ends the run before the last phase, and logs
the phase index.  When the last phase starts, early stopping and the best-adapter tracking start afresh:
scores of earlier phases, which had not yet trained the later tasks, are not the yardstick for the final
model.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn


class CurriculumCallback(L.Callback):
    def _curriculum(self, trainer):
        dm = getattr(trainer, "datamodule", None)
        return getattr(dm, "curriculum", None)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        cur = self._curriculum(trainer)
        if cur is None or len(cur.phases) == 1:
            return
        trainer.reload_dataloaders_every_n_epochs = 1
        trainer.fit_loop.min_epochs = max(trainer.fit_loop.min_epochs or 0, cur.last_phase_start + 1)
        if trainer.max_steps == -1 and trainer.max_epochs is not None and 0 <= trainer.max_epochs < cur.planned_epochs:
            rank_zero_warn(
                f"trainer.max_epochs={trainer.max_epochs} ends the run before the curriculum's last phase "
                f"({cur.describe()}, {cur.planned_epochs} epochs); raise trainer.max_epochs or lower data.epochs_per_phase"
            )

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        cur = self._curriculum(trainer)
        if cur is None:
            return
        pl_module.log("train/phase", float(cur.phase_index(trainer.current_epoch)), on_step=False, on_epoch=True, sync_dist=False)
        if len(cur.phases) > 1 and trainer.current_epoch == cur.last_phase_start:
            self._start_afresh(trainer)

    @staticmethod
    def _start_afresh(trainer: L.Trainer) -> None:
        from lightning.pytorch.callbacks import EarlyStopping

        from .adapter_export import AdapterExport

        for cb in trainer.callbacks:
            if isinstance(cb, EarlyStopping):
                cb.wait_count = 0
                cb.stopped_epoch = 0
                cb.best_score = torch.tensor(torch.inf if cb.mode == "min" else -torch.inf)
            elif isinstance(cb, AdapterExport):
                cb.best = None
        trainer.should_stop = False
