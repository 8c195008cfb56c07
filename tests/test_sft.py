"""Curriculum SFT on the tiny offline model: learning, QLoRA, DDP, resume and configuration errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import needs_shared_data
from training_helpers import QUIET_TRAINER as QUIET, REPO, assert_config_error, column, stage_config
from prouie_pl.lightning_cli import build_cli
from prouie_pl.reports import latest_metrics



# ------------------------------------------------------------------ 32 real records, learned to F1 = 100


@pytest.fixture(scope="module")
def memorise_setup(tmp_path_factory, shared_data):
    """32 short records from the real data (NER, RE, EE) as train and dev, and a tiny model built on them."""
    from prouie_pl.formats import render_target
    from prouie_pl.reader import SPLITS, load_records, write_dataset
    from prouie_pl.tiny_model import build_tiny_model

    picks = {"CoNLL2003": 12, "ADE_corpus": 10, "GENIA2011": 10}
    root = tmp_path_factory.mktemp("memorise_data")
    for ds, n in picks.items():
        recs = [r for r in load_records(shared_data, "train", datasets=[ds], max_records=3000) if r.entities or r.relations or r.events]
        recs.sort(key=lambda r: (len(render_target(r, "full")) + len(r.sentence), r.index))
        chosen = recs[:n]
        write_dataset(root, chosen[0].task, ds, chosen[0].schema, dict.fromkeys(SPLITS, chosen))
    model = build_tiny_model(tmp_path_factory.mktemp("memorise_model"), corpus=root, vocab_size=1500, pretrain_steps=300)
    return root, model


@needs_shared_data
def test_cm_learns_32_real_records_to_f1_100(memorise_setup, tmp_path):
    from prouie_pl.modeling import base_parameters

    data, model_dir = memorise_setup
    cfg = stage_config("cm", tmp_path / "cm.yaml", **{
        "trainer.default_root_dir": str(tmp_path / "run"),
        "trainer.max_epochs": 100,
        "trainer.check_val_every_n_epoch": 5,
        "trainer.gradient_clip_val": 1.0,
        "trainer.callbacks": [
            {"class_path": "prouie_pl.callbacks.StageCheckpoint"},
            {"class_path": "prouie_pl.callbacks.AdapterExport"},
            {"class_path": "prouie_pl.callbacks.GenerationEvaluator", "init_args": {"sample_rows": 0}},
            {"class_path": "prouie_pl.callbacks.CurriculumCallback"},
            {"class_path": "prouie_pl.callbacks.CurriculumEarlyStopping",
             "init_args": {"monitor": "val/f1", "mode": "max", "stopping_threshold": 99.99, "patience": 100}},
        ],
        "model.init_args.base.name_or_path": str(model_dir),
        "model.init_args.generation.max_new_tokens": 160,
        "model.init_args.learning_rate": 3.0e-3,
        "model.init_args.min_lr_ratio": 0.1,
        "data.data_dir": str(data),
        "data.schedule": "cumulative",
        "data.epochs_per_phase": [5, 5, 90],
        "data.max_val_records": 32,
        "data.eval_batch_size": 32,
        **QUIET,
    })
    cli = build_cli(["--config", str(cfg)], run=False)
    cli.model.configure_model()
    init_base = {k: v.detach().clone() for k, v in base_parameters(cli.model.model).items()}
    init_lora = {n: p.detach().clone() for n, p in cli.model.named_parameters() if p.requires_grad}
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)

    evaluator = next(c for c in cli.trainer.callbacks if type(c).__name__ == "GenerationEvaluator")
    report = evaluator.last_report
    assert report["n"] == 32
    for metric in ("NER", "RE_strict", "EE_trigger", "EE_argument"):
        assert report["tasks"][metric]["average_f1"] == 100.0, (metric, report["tasks"][metric])
    rows = latest_metrics(tmp_path / "run")
    losses = column(rows, "train/loss")
    assert losses[-1] < 0.25 * losses[0]
    assert column(rows, "val/f1")[-1] == 100.0
    # LoRA weights changed, base weights did not
    trained = {n: p for n, p in cli.model.named_parameters() if p.requires_grad}
    assert trained and all(not torch.equal(init_lora[n], p) for n, p in trained.items())
    assert all(torch.equal(init_base[n], p) for n, p in base_parameters(cli.model.model).items())
    # the stage folder describes itself; the checkpoint holds no base weights
    adapter = tmp_path / "run" / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "training_config.yaml"} <= {p.name for p in adapter.iterdir()}
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter)
    assert any("lora_A" in n for n, _ in reloaded.named_parameters())


# ------------------------------------------------------------------ QLoRA on the CPU


def test_qlora_nf4_trains_on_cpu(tmp_path):
    import bitsandbytes as bnb

    cfg = stage_config("sa", tmp_path / "sa.yaml", **{
        "trainer.default_root_dir": str(tmp_path / "run"),
        "trainer.max_steps": 3,
        "trainer.max_epochs": 1,
        "trainer.limit_val_batches": 0,
        "trainer.callbacks": [{"class_path": "prouie_pl.callbacks.AdapterExport"}],
        "model.init_args.base.quantization": "nf4",
        "model.init_args.base.compute_dtype": "float32",
        "model.init_args.lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data.sample_per_dataset": 8,
        **QUIET,
    })
    cli = build_cli(["--config", str(cfg)], run=False)
    cli.model.configure_model()
    four_bit = [m for m in cli.model.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) >= 7 * 4  # every linear layer of every block
    packed = {id(m): m.weight.data.clone() for m in four_bit}
    lora = {n: p.detach().clone() for n, p in cli.model.named_parameters() if p.requires_grad}
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 3
    assert all(torch.equal(packed[id(m)], m.weight.data) for m in four_bit)
    assert any(not torch.equal(lora[n], p) for n, p in cli.model.named_parameters() if p.requires_grad)
    assert all(torch.isfinite(torch.tensor(v)) for v in column(latest_metrics(tmp_path / "run"), "train/loss"))
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------ DDP on the CPU


def test_ddp_two_processes_end_with_identical_adapters(tmp_path):
    cfg = stage_config("cm", tmp_path / "cm.yaml", **{
        "trainer.default_root_dir": str(tmp_path / "run"),
        "trainer.max_epochs": 3,
        "trainer.limit_val_batches": 0,
        "trainer.strategy": "ddp",
        "trainer.devices": 2,
        "trainer.callbacks": [{"class_path": "prouie_pl.callbacks.RankConsistencyCheck"}, {"class_path": "prouie_pl.callbacks.CurriculumCallback"}],
        "model.init_args.lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data.max_train_records": 16,
        "data.epochs_per_phase": 1,
        **QUIET,
    })
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "prouie_pl", "fit", "--config", str(cfg)], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check = json.loads((tmp_path / "run" / "rank_check.json").read_text())
    assert [r["rank"] for r in check["ranks"]] == [0, 1] and check["identical"] is True
    steps = column(latest_metrics(tmp_path / "run"), "train/loss")
    assert steps  # training happened


# ------------------------------------------------------------------ resume


class _Interrupt(Exception):
    pass


def test_resume_mid_epoch_matches_an_uninterrupted_run(tmp_path):
    import lightning as L

    class StopAt(L.Callback):
        def __init__(self, step):
            self.step = step

        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == self.step:
                raise _Interrupt

    def config(name, **extra):
        return stage_config("cm", tmp_path / f"{name}.yaml", **{
            "trainer.default_root_dir": str(tmp_path / name),
            "trainer.max_epochs": 3,
            "trainer.limit_val_batches": 0,
            "trainer.callbacks": [{"class_path": "prouie_pl.callbacks.StageCheckpoint", "init_args": {"every_n_train_steps": 3}},
                                  {"class_path": "prouie_pl.callbacks.CurriculumCallback"}],
            "model.init_args.lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "data.max_train_records": 20,
            "data.batch_size": 4,
            "data.epochs_per_phase": 1,
            **QUIET, **extra,
        })

    full = build_cli(["--config", str(config("full"))], run=False)
    full.trainer.fit(full.model, datamodule=full.datamodule)
    reference = {n: p.detach().clone() for n, p in full.model.named_parameters() if p.requires_grad}
    steps_per_epoch = [full.datamodule.batches_in_epoch(e) for e in range(3)]
    assert steps_per_epoch == [5, 10, 15]  # cumulative phases NER; NER+RE; NER+RE+EE of 20 records each, batch 4

    # interrupted in the middle of the second epoch (phase 2), after the checkpoint of step 9
    stop_at = 11
    run = build_cli(["--config", str(config("part"))], run=False)
    run.trainer.callbacks.append(StopAt(stop_at))
    with pytest.raises(_Interrupt):
        run.trainer.fit(run.model, datamodule=run.datamodule)
    class FirstStep(L.Callback):
        first = None

        def on_train_batch_start(self, trainer, *args):
            if self.first is None:
                self.first = trainer.global_step

    resumed = build_cli(["--config", str(config("part"))], run=False)
    first = FirstStep()
    resumed.trainer.callbacks.append(first)
    resumed.trainer.fit(resumed.model, datamodule=resumed.datamodule, ckpt_path="last")
    assert first.first == 9  # resumed after the checkpoint of step 9, not from scratch
    assert resumed.trainer.global_step == full.trainer.global_step
    assert resumed.trainer.current_epoch == full.trainer.current_epoch
    assert resumed.datamodule.curriculum.phase_index(resumed.trainer.current_epoch - 1) == 2
    for n, p in resumed.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, reference[n], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ configuration errors


@pytest.mark.parametrize("override,expected", [
    (["--data.datasets", "[NoSuchSet]"], "unknown data set 'NoSuchSet' in datasets"),
    (["--data.data_dir", "/nonexistent/folder"], "data.data_dir '/nonexistent/folder' does not exist"),
    (["--data.stage", "sa", "--data.sample_per_dataset", "100000"], "data.sample_per_dataset=100000 is larger than the 240 training records of NER/DemoNER"),
    (["--data.schedule", "zigzag"], "data.schedule"),
])
def test_wrong_configuration_names_the_option(tmp_path, capsys, override, expected):
    assert_config_error(["fit", "--config", str(REPO / "configs" / "tiny" / "cm.yaml"), "--trainer.default_root_dir", str(tmp_path)] + override,
                        capsys, expected)


# ------------------------------------------------------------------ every shipped config parses


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml") if "pipeline" not in p.name))
def test_shipped_config_parses_against_the_code(path):
    from prouie_pl.lightning_cli import parse_config

    text = (REPO / path).read_text()
    assert text.startswith("# python -m prouie_pl ")  # each config opens with the command that runs it
    parser, cfg = parse_config(["--config", str(REPO / path)])
    if cfg.trainer.accelerator == "gpu":  # build everything but the GPU: the classes and their arguments
        cfg.trainer.accelerator = "cpu"
    objs = parser.instantiate_classes(cfg)
    assert type(objs.model).__name__ in ("SFTModule", "GRPOModule")
    assert objs.data.stage in ("cm", "sa", "de")
    assert objs.model.model is None  # no weights are loaded by parsing


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*pipeline*.yaml")))
def test_shipped_pipeline_config_names_parseable_stages(path):
    from prouie_pl.pipeline import load_pipeline_config

    assert (REPO / path).read_text().startswith("# python -m prouie_pl pipeline ")
    cfg = load_pipeline_config(str(REPO / path))
    assert list(cfg["stages"]) == ["cm", "sa", "de"]
    for stage_file in cfg["stages"].values():
        assert Path(stage_file).is_file(), stage_file
