"""``AdapterExport``: the stage's result as a self-describing folder.

At the end of fit it writes ``<dirpath>/adapter/`` (the LoRA adapter in PEFT format, loadable with
``PeftModel.from_pretrained``, plus the tokenizer, ``answer_format.json``: the answer format the data module
trained it on, which ``extract`` uses unless told otherwise, and ``training_config.yaml``: the resolved config
the command line saved for the run, the same as its ``config.yaml``; a trainer built in Python without the
command line has none).  When validation runs it also keeps ``<dirpath>/adapter_best/``, the adapter
with the best monitored score so far.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal, Optional

import lightning as L

from ..formats import FORMATS, write_answer_format


def run_config(trainer: L.Trainer) -> Optional[str]:
    """The run's resolved config as LightningCLI saves it (``config.yaml`` in the log folder), or None for a
    trainer built without the command line."""
    from lightning.pytorch.cli import SaveConfigCallback

    for cb in trainer.callbacks:
        if isinstance(cb, SaveConfigCallback):
            return cb.parser.dump(cb.config, skip_none=False)
    return None


class AdapterExport(L.Callback):
    """Write the adapter (PEFT format), tokenizer and the run's resolved config.

    Args:
        dirpath: output folder (default: the trainer's ``default_root_dir``).
        monitor: metric that picks ``adapter_best`` (None: no best copy).
        mode: ``max`` or ``min`` for the monitored metric.
    """

    def __init__(self, dirpath: Optional[str] = None, monitor: Optional[str] = "val/f1", mode: Literal["max", "min"] = "max"):
        self.dirpath = dirpath
        self.monitor = monitor
        self.mode = mode
        self.best: Optional[float] = None

    def _root(self, trainer) -> Path:
        return Path(self.dirpath or trainer.default_root_dir)

    def _save(self, trainer, pl_module, name: str) -> Path:
        folder = self._root(trainer) / name
        if trainer.is_global_zero:
            tmp = folder.with_name(folder.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            pl_module.save_adapter(str(tmp))
            fmt = getattr(trainer.datamodule, "format", None)
            if fmt in FORMATS:
                write_answer_format(tmp, fmt)
            config = run_config(trainer)
            if config is not None:
                (tmp / "training_config.yaml").write_text(config, encoding="utf-8")
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
        trainer.strategy.barrier()
        return folder

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor is None or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if better:
            self.best = value
            self._save(trainer, pl_module, "adapter_best")

    def on_curriculum_phase_start(self, trainer: L.Trainer, pl_module: L.LightningModule, index: int, phase) -> None:
        """The last curriculum phase starts: earlier phases' scores are no yardstick for ``adapter_best``."""
        if index == len(trainer.datamodule.curriculum.phases) - 1:
            self.best = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer, pl_module, "adapter")

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best = state_dict.get("best")
