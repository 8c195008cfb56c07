"""How the Lightning pieces are wired: the data module's tokenizer, the LR schedule's length, phase changes of the
curriculum reaching the callbacks that care, and the resolved config kept beside the adapter."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from training_helpers import QUIET_TRAINER, stage_config
from prouie_pl.callbacks import AdapterExport, CurriculumCallback, CurriculumEarlyStopping, PhaseListener
from prouie_pl.datamodules import UIEDataModule
from prouie_pl.datamodules.curriculum import Curriculum
from prouie_pl.lightning_cli import build_cli


def _cm_cli(tmp_path, name="cm", **changes):
    cfg = stage_config("cm", tmp_path / f"{name}.yaml", **{
        "trainer.default_root_dir": str(tmp_path / name),
        "trainer.max_epochs": 3,
        "trainer.limit_val_batches": 0,
        "data.max_train_records": 20,
        "data.batch_size": 4,
        "data.epochs_per_phase": 1,
        **QUIET_TRAINER, **changes,
    })
    return build_cli(["--config", str(cfg)], run=False)


def test_a_data_module_without_a_tokenizer_says_how_to_connect_one():
    data = UIEDataModule(data_dir="demo", stage="sa", sample_per_dataset=2)
    with pytest.raises(RuntimeError, match=r"connect"):
        data.tokenizer


def test_the_command_line_connects_tokenizer_and_schedule_length(tmp_path):
    cli = _cm_cli(tmp_path)
    assert cli.datamodule.tokenizer is cli.model.tokenizer
    cli.datamodule.setup("fit")
    # cumulative phases NER; NER+RE; NER+RE+EE of 20 records each in batches of 4: 5 + 10 + 15 optimizer steps
    assert cli.model.schedule_steps() == 30
    capped = _cm_cli(tmp_path, "capped", **{"trainer.max_steps": 7})
    capped.datamodule.setup("fit")
    assert capped.model.schedule_steps() == 7
    # epochs cut by limit_train_batches plan only the batches they run, so the schedule still reaches its floor
    limited = _cm_cli(tmp_path, "limited", **{"trainer.limit_train_batches": 3})
    limited.datamodule.setup("fit")
    assert limited.model.schedule_steps() == 9
    share = _cm_cli(tmp_path, "share", **{"trainer.limit_train_batches": 0.5})
    share.datamodule.setup("fit")
    assert share.model.schedule_steps() == 2 + 5 + 7  # int(5 / 2) + int(10 / 2) + int(15 / 2)


def test_lr_follows_warmup_then_cosine_over_the_planned_steps(tmp_path):
    cli = _cm_cli(tmp_path, **{"model.init_args.warmup_ratio": 0.1, "model.init_args.min_lr_ratio": 0.2,
                               "model.init_args.learning_rate": 1.0e-3})
    cli.model.configure_model()
    cli.datamodule.setup("fit")
    cli.model.trainer = cli.trainer
    sched = cli.model.configure_optimizers()["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(30):
        lrs.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(1e-3 / 3) and lrs[3] == pytest.approx(1e-3)  # 3 warm-up steps
    assert lrs[3 + 27 // 2] == pytest.approx(1e-3 * (0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 13 / 27))))
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])) and lrs[-1] > 0.2e-3


def test_a_multi_phase_curriculum_needs_its_callback(tmp_path):
    cli = _cm_cli(tmp_path, **{"trainer.callbacks": []})
    with pytest.raises(ValueError, match=r"add prouie_pl.callbacks.CurriculumCallback"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)


def test_plain_early_stopping_is_refused_under_a_curriculum(tmp_path):
    cli = _cm_cli(tmp_path, **{"trainer.callbacks": [
        {"class_path": "prouie_pl.callbacks.CurriculumCallback"},
        {"class_path": "lightning.pytorch.callbacks.EarlyStopping", "init_args": {"monitor": "val/f1", "mode": "max"}}]})
    with pytest.raises(ValueError, match=r"CurriculumEarlyStopping"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)


class Listener:
    def __init__(self):
        self.calls = []

    def on_curriculum_phase_start(self, trainer, pl_module, index, phase):
        self.calls.append((trainer.current_epoch, index, phase.name))


def _fake_trainer(curriculum, callbacks):
    return SimpleNamespace(datamodule=SimpleNamespace(curriculum=curriculum), callbacks=callbacks, current_epoch=0)


def test_phase_starts_reach_the_listeners_and_only_the_last_phase_is_judged():
    cur = Curriculum("cumulative", ["NER", "RE", "EE"], [1, 2, 2])
    listener, export = Listener(), AdapterExport()
    stopping = CurriculumEarlyStopping(monitor="val/f1", mode="max")
    assert isinstance(listener, PhaseListener) and isinstance(export, PhaseListener)
    trainer = _fake_trainer(cur, [listener, export, stopping])
    module = SimpleNamespace(log=lambda *a, **k: None)
    watched, best_after = [], []
    for epoch in range(6):
        trainer.current_epoch = epoch
        export.best = 50.0  # a score of the epoch before
        CurriculumCallback().on_train_epoch_start(trainer, module)
        watched.append(stopping.watching(trainer))
        best_after.append(export.best)
    assert [(e, i) for e, i, _ in listener.calls] == [(0, 0), (1, 1), (3, 2)]
    assert watched == [False, False, False, True, True, True]
    assert best_after == [50.0, 50.0, 50.0, None, 50.0, 50.0]  # adapter_best starts afresh with the last phase only
    assert CurriculumEarlyStopping.watching(_fake_trainer(None, []))  # SA / DE: plain early stopping


def test_the_adapter_keeps_the_config_the_command_line_saved(tmp_path):
    cli = _cm_cli(tmp_path, **{"trainer.max_steps": 1, "trainer.callbacks": [
        {"class_path": "prouie_pl.callbacks.CurriculumCallback"}, {"class_path": "prouie_pl.callbacks.AdapterExport"}]})
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    saved = list((tmp_path / "cm").rglob("config.yaml"))
    assert len(saved) == 1
    kept = (tmp_path / "cm" / "adapter" / "training_config.yaml").read_text()
    assert kept == saved[0].read_text()
    assert "prouie_pl.sft.SFTModule" in kept and "max_train_records: 20" in kept
