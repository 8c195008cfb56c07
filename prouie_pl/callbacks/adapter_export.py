"""``AdapterExport``: the stage's result as a self-describing folder.

At the end of fit it writes ``<dirpath>/adapter/`` (the LoRA adapter in PEFT format, loadable with
``PeftModel.from_pretrained``, plus the tokenizer and ``training_config.yaml``: the resolved settings of the
module and the data module).  When validation runs it also keeps ``<dirpath>/adapter_best/``, the adapter
with the best monitored score so far.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal, Optional

import lightning as L
import yaml


def _plain(obj):
    """Hyper-parameters as YAML-safe plain data."""
    from dataclasses import asdict, is_dataclass

    if is_dataclass(obj):
        return _plain(asdict(obj))
    if isinstance(obj, dict):  # LightningCLI's bookkeeping keys (_class_path, _instantiator) are left out
        return {str(k): _plain(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def resolved_config(trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
    cfg = {"model": {"class_path": f"{type(pl_module).__module__}.{type(pl_module).__name__}", "init_args": _plain(dict(pl_module.hparams))}}
    dm = getattr(trainer, "datamodule", None)
    if dm is not None:
        cfg["data"] = {"class_path": f"{type(dm).__module__}.{type(dm).__name__}", "init_args": _plain(dict(dm.hparams))}
    return cfg


class AdapterExport(L.Callback):
    """Write the adapter (PEFT format), tokenizer and resolved config.

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
            (tmp / "training_config.yaml").write_text(yaml.safe_dump(resolved_config(trainer, pl_module), sort_keys=False), encoding="utf-8")
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

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer, pl_module, "adapter")

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best = state_dict.get("best")
