"""What a ProUIE module and its data module are told about each other, in one place.

The command line (:class:`prouie_pl.lightning_cli.ProUIECLI`) and the pipeline call :func:`connect` once the
trainer, module and data module exist; code that builds them by hand calls it before ``trainer.fit``::

    module, data = SFTModule(...), UIEDataModule(...)
    trainer = L.Trainer(...)
    connect(module, data, trainer)
    trainer.fit(module, datamodule=data)

Neither side reaches into the other or into the trainer's loops for these facts.
"""

from __future__ import annotations

from functools import partial
from typing import Optional


def planned_steps(data, trainer) -> int:
    """Optimizer steps the run will take: the data's own plan over ``trainer.max_epochs`` (curriculum phases
    differ in size, so ``trainer.estimated_stepping_batches``, which multiplies the first epoch, would be off)
    with epochs cut at ``trainer.limit_train_batches``, capped by ``trainer.max_steps``; the trainer's estimate
    where neither is known."""
    steps: Optional[int] = None
    if hasattr(data, "planned_optimizer_steps") and trainer.max_epochs not in (None, -1):
        steps = data.planned_optimizer_steps(trainer.max_epochs, trainer.accumulate_grad_batches, max(1, trainer.world_size),
                                             trainer.limit_train_batches)
    if trainer.max_steps and trainer.max_steps > 0:
        steps = min(steps, trainer.max_steps) if steps else trainer.max_steps
    if not steps:
        steps = int(trainer.estimated_stepping_batches)
    return max(1, steps)


def connect(module, data, trainer=None) -> None:
    """Wire ``module`` (a :class:`~prouie_pl.uie_module.UIEModule`) and ``data`` (a
    :class:`~prouie_pl.datamodules.UIEDataModule`): the data module gets the module's tokenizer, and, given the
    trainer, the module gets the length of its learning-rate schedule (asked for when the optimizer is built,
    after the data are set up)."""
    if hasattr(data, "connect"):
        data.connect(module.tokenizer)
    if trainer is not None and hasattr(module, "schedule_steps"):
        module.schedule_steps = partial(planned_steps, data, trainer)
