"""LightningCLI for ``fit``, ``validate``, ``test`` and ``predict``.

``python -m prouie_pl fit --config configs/tiny/cm.yaml [--model.init_args.learning_rate 1e-4 ...]``.
The module is chosen by ``model.class_path`` (``prouie_pl.sft.SFTModule`` or ``prouie_pl.grpo.GRPOModule``);
the data module is always :class:`~prouie_pl.datamodules.UIEDataModule`.  Defaults set here:
``trainer.use_distributed_sampler=False`` (the data module shards its own batches),
``trainer.num_sanity_val_steps=0`` (validation decodes, which is slow) and the config saved next to the run.
Once the objects exist, :func:`prouie_pl.wiring.connect` wires module and data module.
"""

from __future__ import annotations

import os
import sys
import warnings
from contextlib import contextmanager
from typing import Sequence

from lightning.pytorch.cli import LightningCLI

from .datamodules import UIEDataModule
from .uie_module import UIEModule


_PROGRESS_BARS = ("RichProgressBar", "TQDMProgressBar")


class ProUIECLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({
            "trainer.use_distributed_sampler": False,
            "trainer.num_sanity_val_steps": 0,
        })

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        from .wiring import connect

        connect(self.model, self.datamodule, self.trainer)

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        # StageCheckpoint defaults to <default_root_dir>/checkpoints; fix it now so `--ckpt_path last` finds it
        from .callbacks import StageCheckpoint

        for cb in trainer.callbacks:
            if isinstance(cb, StageCheckpoint):
                cb.resolve_dirpath(trainer)
        return trainer

    def before_instantiate_classes(self) -> None:
        # `--trainer.enable_progress_bar false` turns off a progress bar listed among the config's callbacks
        cfg = self.config.get(self.subcommand) if self.subcommand else self.config
        trainer = cfg.get("trainer")
        if trainer is not None and trainer.get("enable_progress_bar") is False and trainer.get("callbacks"):
            trainer.callbacks = [c for c in trainer.callbacks if str(getattr(c, "class_path", "")).rsplit(".", 1)[-1] not in _PROGRESS_BARS]


class _ParseOnlyCLI(ProUIECLI):
    """Parses and validates a config without building the trainer (configs for GPUs parse on a CPU)."""

    def instantiate_classes(self) -> None:
        pass


@contextmanager
def _argv(args: Sequence[str]):
    """Keep sys.argv in step with the args LightningCLI is given (the DDP launcher re-runs sys.argv in its child
    processes); its warning about getting both is then about one and the same command line."""
    saved = sys.argv
    sys.argv = [saved[0] if saved else "prouie_pl"] + list(args)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
            yield
    finally:
        sys.argv = saved


def parse_config(argv: Sequence[str]):
    """(parser, validated config) for ``argv`` without a subcommand (e.g. ``["--config", path]``); nothing is built.

    ``parser.instantiate_classes(config)`` then builds the objects, the trainer included.
    """
    with _argv(argv):
        cli = _ParseOnlyCLI(UIEModule, UIEDataModule, subclass_mode_model=True, args=list(argv), run=False,
                            save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False)
    return cli.parser, cli.config


def build_cli(argv: Sequence[str], run: bool = True) -> ProUIECLI:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with _argv(argv):
        return ProUIECLI(
            UIEModule,
            UIEDataModule,
            subclass_mode_model=True,
            args=list(argv),
            run=run,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
        )


def embedded_config_args(argv: Sequence[str]) -> list[str]:
    """``--config NAME`` (or ``-c NAME``, ``--config=NAME``) of a shipped config becomes its path; the rest is unchanged."""
    from .config_files import resolve_config

    out, args = [], list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("--config", "-c") and i + 1 < len(args):
            out += [a, resolve_config(args[i + 1])]
            i += 2
            continue
        if a.startswith("--config="):
            a = "--config=" + resolve_config(a.split("=", 1)[1])
        out.append(a)
        i += 1
    return out


def run_lightning_cli(argv: Sequence[str]) -> int:
    build_cli(embedded_config_args(argv))
    return 0
