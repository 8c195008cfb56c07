"""SFT loss normalisation under gradient accumulation: one optimizer step weighs every answer token alike,
however the step's examples are split into micro-batches."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from training_helpers import QUIET_TRAINER as QUIET, stage_config
from prouie_pl.kernels.reference import IGNORE_INDEX
from prouie_pl.lightning_cli import build_cli



class FirstStepGradients(L.Callback):
    def __init__(self):
        self.grads: dict[str, torch.Tensor] = {}
        self.answer_tokens: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.answer_tokens.append(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not self.grads:
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}


def first_step(tmp_path, tiny_model_dir, name: str, batch_size: int, accumulate: int) -> FirstStepGradients:
    cfg = stage_config("sa", tmp_path / f"{name}.yaml", **{
        "seed_everything": 3,
        "trainer.default_root_dir": str(tmp_path / name),
        "trainer.max_steps": 1,
        "trainer.accumulate_grad_batches": accumulate,
        "trainer.limit_val_batches": 0,
        "trainer.logger": False,
        "trainer.enable_checkpointing": False,
        "trainer.callbacks": [],
        "model.init_args.base.name_or_path": str(tiny_model_dir),
        "model.init_args.lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data.sample_per_dataset": 8,
        "data.tasks": ["NER", "RE", "EE"],
        "data.batch_size": batch_size,
        **QUIET,
    })
    cli = build_cli(["--config", str(cfg)], run=False)
    spy = FirstStepGradients()
    cli.trainer.callbacks.append(spy)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return spy


def test_accumulated_micro_batches_give_the_gradient_of_one_batch_holding_them(tmp_path, tiny_model_dir):
    # 24 records (8 per task): 4 micro-batches of 6 against one batch of 24, in one optimizer step each
    whole = first_step(tmp_path, tiny_model_dir, "whole", batch_size=24, accumulate=1)
    parts = first_step(tmp_path, tiny_model_dir, "parts", batch_size=6, accumulate=4)
    assert len(whole.answer_tokens) == 1 and len(parts.answer_tokens) == 4
    assert sum(parts.answer_tokens) == whole.answer_tokens[0]
    assert len(set(parts.answer_tokens)) > 1  # the micro-batches differ in answer tokens (length-grouped)
    assert whole.grads.keys() == parts.grads.keys() and whole.grads
    for name, g in whole.grads.items():
        torch.testing.assert_close(parts.grads[name], g, rtol=1e-4, atol=1e-6 * float(g.abs().max()))
