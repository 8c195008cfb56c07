"""Curriculum callbacks: ``CurriculumCallback`` moves the CM stage through its phases, ``CurriculumEarlyStopping``
judges early stopping on the last phase only.

The data module derives each epoch's phase from the epoch number.  ``CurriculumCallback`` makes Lightning ask
for a new training loader every epoch (so a phase change takes effect), warns when ``max_epochs`` ends the run
before the last phase, logs the phase index, and announces the first epoch of every phase to each callback
that has an ``on_curriculum_phase_start(trainer, pl_module, index, phase)`` method (:class:`PhaseListener`):
that is the one way phase changes reach other callbacks.  :class:`~prouie_pl.callbacks.AdapterExport` listens
and starts its best-adapter tracking afresh when the last phase starts.

Scores of earlier phases, which have not trained the later tasks yet, are no yardstick for the final model,
so with a curriculum of more than one phase a plain ``EarlyStopping`` is refused (it could stop the run in
the first phase); :class:`CurriculumEarlyStopping` is ``EarlyStopping`` that only watches from the last
phase's first epoch on (and is plain early stopping in the SA and DE stages, which have no curriculum).  Both
callbacks are listed in the CM configs.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.utilities import rank_zero_warn


def _curriculum(trainer):
    return getattr(getattr(trainer, "datamodule", None), "curriculum", None)


@runtime_checkable
class PhaseListener(Protocol):
    def on_curriculum_phase_start(self, trainer: L.Trainer, pl_module: L.LightningModule, index: int, phase) -> None:
        """Called at the first epoch of curriculum phase ``index`` (a :class:`~prouie_pl.datamodules.curriculum.Phase`)."""


class CurriculumCallback(L.Callback):
    """Advance the CM curriculum every epoch and announce phase starts to the :class:`PhaseListener` callbacks."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        cur = _curriculum(trainer)
        if cur is None or len(cur.phases) == 1:
            return
        plain = [type(cb).__name__ for cb in trainer.callbacks if isinstance(cb, EarlyStopping) and not isinstance(cb, CurriculumEarlyStopping)]
        if plain:
            raise ValueError(
                f"trainer.callbacks has {plain[0]}, which would judge the curriculum ({cur.describe()}) on its first phases "
                "and could stop before the later tasks are trained: use prouie_pl.callbacks.CurriculumEarlyStopping "
                "(same arguments), which watches from the last phase on"
            )
        trainer.reload_dataloaders_every_n_epochs = 1
        if trainer.max_steps == -1 and trainer.max_epochs is not None and 0 <= trainer.max_epochs < cur.planned_epochs:
            rank_zero_warn(
                f"trainer.max_epochs={trainer.max_epochs} ends the run before the curriculum's last phase "
                f"({cur.describe()}, {cur.planned_epochs} epochs); raise trainer.max_epochs or lower data.epochs_per_phase"
            )

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        cur = _curriculum(trainer)
        if cur is None:
            return
        epoch = trainer.current_epoch
        index = cur.phase_index(epoch)
        pl_module.log("train/phase", float(index), on_step=False, on_epoch=True, sync_dist=False)
        if len(cur.phases) > 1 and epoch == cur.phase_start(index):
            for cb in trainer.callbacks:
                if isinstance(cb, PhaseListener):
                    cb.on_curriculum_phase_start(trainer, pl_module, index, cur.phases[index])


class CurriculumEarlyStopping(EarlyStopping):
    """``EarlyStopping`` (same arguments) that only watches the curriculum's last phase; without a curriculum of
    several phases it is plain early stopping."""

    @staticmethod
    def watching(trainer: L.Trainer) -> bool:
        cur = _curriculum(trainer)
        return cur is None or len(cur.phases) == 1 or cur.phase_index(trainer.current_epoch) == len(cur.phases) - 1

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.watching(trainer):
            super().on_validation_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.watching(trainer):
            super().on_train_epoch_end(trainer, pl_module)
