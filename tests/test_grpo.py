"""GRPO (the DE stage) on the tiny offline models: learning, policy/reference identities, QLoRA, DDP and
configuration errors.

Torch runs these tests on one thread: the matrices of the tiny models are so small that OpenMP threads mostly
wait on each other, and when other processes share the cores a second thread makes generation many times
slower rather than faster.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import lightning as L
import pytest
import torch

import prouie_pl.grpo.module as grpo_module
from training_helpers import QUIET_TRAINER as QUIET, REPO, assert_config_error, column, dequantised_base, single_thread, stage_config
from prouie_pl.lightning_cli import build_cli
from prouie_pl.reports import latest_metrics



@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread and torch's deterministic algorithms: with the configs' seeds, every run here repeats itself."""
    with single_thread(deterministic=True):
        yield


class StepStats(L.Callback):
    """Keeps ``last_step_stats`` of every training step."""

    def __init__(self):
        self.steps: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.steps.append(dict(pl_module.last_step_stats))


class LossSpy:
    """Wraps ``grpo_loss`` as the module calls it and keeps what each call saw (one call per micro-batch and pass)."""

    def __init__(self):
        self.calls: list[dict] = []
        self.wrapped = grpo_module.grpo_loss

    def __call__(self, lp, old, ref, adv, mask, **kw):
        loss, metrics = self.wrapped(lp, old, ref, adv, mask, **kw)
        m = mask.bool()
        gap = lambda other: float((lp.detach() - other)[m].abs().max()) if m.any() else 0.0  # noqa: E731
        self.calls.append({
            "old": old is not None, "ref": ref is not None,
            "ratio_gap": 0.0 if old is None else gap(old),  # max |log ratio| against the sampling policy
            "ref_gap": None if ref is None else gap(ref),
            "tokens": float(m.sum()), "loss": float(loss),
            **{k: float(v) for k, v in metrics.items()},
        })
        return loss, metrics


def de_config(tmp_path, name: str, model_dir, **changes):
    """``configs/tiny/de.yaml`` cut down: a fresh adapter (unless changed), 2 prompts per data set, short rollouts."""
    return stage_config("de", tmp_path / f"{name}.yaml", **{
        "trainer.default_root_dir": str(tmp_path / name),
        "trainer.limit_val_batches": 0,
        "trainer.callbacks": [],
        "trainer.logger": False,
        "trainer.enable_checkpointing": False,
        "model.init_args.base.name_or_path": str(model_dir),
        "model.init_args.lora.init_adapter": None,
        "model.init_args.generation.max_new_tokens": 16,
        "model.init_args.rollout.max_new_tokens": 16,
        "data.sample_per_dataset": None,
        "data.max_train_records": 2,
        "data.batch_size": 2,
        **QUIET,
        **changes,
    })


@pytest.fixture(scope="module")
def random_adapter(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter for the untrained tiny model whose B matrices are random (a fresh adapter has B = 0).

    The untrained model earns the same reward for every completion, so no advantage moves it; with this
    adapter the policy differs from the reference, and the KL term (beta > 0) has a gradient."""
    from prouie_pl.modeling import BaseModelSettings, LoRASettings, load_model

    model = load_model(BaseModelSettings(name_or_path=str(tiny_model_dir)), LoRASettings(r=8, alpha=16, dropout=0.0))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    out = tmp_path_factory.mktemp("random_adapter")
    model.save_pretrained(out)
    return out


def lora_state(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------ GRPO raises the greedy reward


GRPO_MAX_NEW_TOKENS = 24  # the longest NER answer of the demo data is 21 tokens


@pytest.fixture(scope="module")
def warm_adapter(tmp_path_factory):
    """A short SFT warm-up on the tiny base (30 steps on 16 NER records): answers are JSON-like, often wrong."""
    root = tmp_path_factory.mktemp("grpo_warmup")
    cfg = stage_config("sa", root / "sa.yaml", **{
        "trainer.default_root_dir": str(root),
        "trainer.max_steps": 30,
        "trainer.max_epochs": 1000,
        "trainer.limit_val_batches": 0,
        "trainer.logger": False,
        "trainer.enable_checkpointing": False,
        "trainer.callbacks": [{"class_path": "prouie_pl.callbacks.AdapterExport"}],
        "model.init_args.lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "model.init_args.learning_rate": 1.0e-3,
        "data.tasks": ["NER"],
        "data.sample_per_dataset": 16,
        **QUIET,
    })
    cli = build_cli(["--config", str(cfg)], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 30
    assert (root / "adapter" / "adapter_config.json").is_file()
    return root / "adapter"


def greedy_outcome(module, records, max_new_tokens: int) -> float:
    """Mean outcome reward (F1 + format term) of the greedy answers to ``records``."""
    from prouie_pl.datamodules.batching import chat_prompt_ids, collate_prompts
    from prouie_pl.formats import build_prompt
    from prouie_pl.rewards import sfr_reward

    tok = module.tokenizer
    batch = collate_prompts(tok.pad_token_id)([(r, chat_prompt_ids(tok, build_prompt(r, "concise"))) for r in records])
    texts, _ = module.generate_texts(batch["input_ids"], batch["attention_mask"], max_new_tokens)
    # the outcome reward does not depend on token boundaries: one "token" holding the whole text will do
    return sum(sfr_reward(text, [len(text)], rec).outcome for rec, text in zip(records, texts)) / len(records)


@pytest.mark.slow
@pytest.mark.parametrize("advantage", ["stepwise", "outcome"])
def test_grpo_raises_greedy_reward_from_a_warm_adapter(warm_adapter, tmp_path, advantage):
    from prouie_pl.modeling import base_parameters

    cfg = stage_config("de", tmp_path / "de.yaml", **{
        "seed_everything": 42,
        "trainer.default_root_dir": str(tmp_path / "run"),
        "trainer.max_steps": 12,
        "trainer.max_epochs": 1000,
        "trainer.limit_val_batches": 0,
        "trainer.logger": False,
        "trainer.enable_checkpointing": False,
        "trainer.callbacks": [],
        "model.init_args.lora.init_adapter": str(warm_adapter),
        "model.init_args.rollout": {"num_generations": 8, "temperature": 1.0, "max_new_tokens": GRPO_MAX_NEW_TOKENS},
        "model.init_args.generation.max_new_tokens": GRPO_MAX_NEW_TOKENS,
        "model.init_args.advantage": advantage,
        "model.init_args.beta": 0.0,
        "model.init_args.learning_rate": 1.0e-3,
        "model.init_args.warmup_steps": 0,
        "data.tasks": ["NER"],
        "data.sample_per_dataset": None,
        "data.max_train_records": 4,  # the 4 prompts of every step, and the ones measured
        "data.batch_size": 4,
        **QUIET,
    })
    cli = build_cli(["--config", str(cfg)], run=False)
    module, data = cli.model, cli.datamodule
    module.configure_model()
    data.connect(module.tokenizer)
    data.setup("fit")
    prompts = data.train_records
    assert len(prompts) == 4 and {r.task for r in prompts} == {"NER"}
    init_base = {k: v.detach().clone() for k, v in base_parameters(module.model).items()}
    init_lora = lora_state(module)

    before = greedy_outcome(module, prompts, GRPO_MAX_NEW_TOKENS)
    stats = StepStats()
    cli.trainer.callbacks.append(stats)
    cli.trainer.fit(module, datamodule=data)
    after = greedy_outcome(module, prompts, GRPO_MAX_NEW_TOKENS)

    sampled = [s["train/reward"] for s in stats.steps]
    early, late = sum(sampled[:3]) / 3, sum(sampled[-3:]) / 3
    print(f"\n[{advantage}] sampled reward, steps 1-3 -> 10-12: {early:.3f} -> {late:.3f}; greedy on the 4 prompts: {before:.3f} -> {after:.3f}")
    assert cli.trainer.global_step == 12
    assert module.reference_passes == 0  # beta = 0: the reference is never run
    # the warm adapter gives groups with reward spread, i.e. a learning signal, from the first step on
    assert stats.steps[0]["train/zero_spread_groups"] < 1.0
    assert all(math.isfinite(s["train/loss"]) for s in stats.steps)
    # What GRPO raises is the expected reward of the policy on its prompts: the mean outcome reward (in [-1, 1]) of
    # the 3 x 32 completions sampled in steps 1-3 against steps 10-12.  Over 10 runs (5 rollout seeds x both
    # modes) it rose by 0.39 to 0.63, from -0.22..-0.04 to 0.25..0.45; the noise of one such mean is about 0.05.
    # Greedy answers to 4 prompts move in coarse jumps (they stayed put in one of those runs), so they are only
    # required not to get worse beyond that noise: on a CPU with AVX512 the outcome mode's run (same seeds, either
    # policy_prefix) went from 0.250 to 0.225 while its sampled reward rose by 0.45.
    assert late >= early + 0.15, sampled
    assert after >= before - 0.05, (before, after)
    trained = lora_state(module)
    assert trained and all(not torch.equal(init_lora[n], p) for n, p in trained.items())
    assert all(torch.equal(init_base[n], p) for n, p in base_parameters(module.model).items())


# ------------------------------------------------------------------ policy, old policy and reference


def test_first_step_from_a_fresh_adapter_has_ratio_one_and_zero_kl(tiny_model_dir, tmp_path, monkeypatch):
    spy = LossSpy()
    monkeypatch.setattr(grpo_module, "grpo_loss", spy)
    cfg = de_config(tmp_path, "fresh", tiny_model_dir, **{"trainer.max_steps": 1, "model.init_args.beta": 0.04,
                                                          "model.init_args.num_iterations": 1})
    cli = build_cli(["--config", str(cfg)], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)

    stats = cli.model.last_step_stats
    assert cli.trainer.global_step == 1
    assert cli.model.reference_passes == 1
    assert abs(stats["train/kl"]) < 1e-6
    assert stats["train/clip_ratio"] == 0.0
    assert math.isfinite(stats["train/loss"])
    # beta > 0: every completion goes through the loss; on-policy (no old log-probs, ratio 1); LoRA B = 0, so the
    # policy's log-probs are the reference's
    assert spy.calls and sum(c["tokens"] for c in spy.calls) > 0
    assert all(c["ref"] and not c["old"] for c in spy.calls)
    assert max(c["ref_gap"] for c in spy.calls) < 1e-6
    assert all(c["kl"] < 1e-6 and c["clip_ratio"] == 0.0 for c in spy.calls)


def test_beta_zero_runs_no_reference_pass(tiny_model_dir, tmp_path, monkeypatch):
    spy = LossSpy()
    monkeypatch.setattr(grpo_module, "grpo_loss", spy)
    cfg = de_config(tmp_path, "beta0", tiny_model_dir, **{"trainer.max_steps": 2, "model.init_args.beta": 0.0})
    cli = build_cli(["--config", str(cfg)], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2
    assert cli.model.reference_passes == 0
    assert not any(c["ref"] for c in spy.calls)
    assert cli.model.last_step_stats["train/kl"] == 0.0


def test_second_iteration_sees_the_updated_policy_and_stats_average_the_passes(tiny_model_dir, random_adapter, tmp_path, monkeypatch):
    spy = LossSpy()
    monkeypatch.setattr(grpo_module, "grpo_loss", spy)
    cfg = de_config(tmp_path, "iter2", tiny_model_dir, **{
        "trainer.max_steps": 1,
        "model.init_args.lora.init_adapter": str(random_adapter),
        "model.init_args.beta": 0.04,
        "model.init_args.num_iterations": 2,
        "model.init_args.learning_rate": 1.0e-2,
        "model.init_args.warmup_steps": 0,
    })
    cli = build_cli(["--config", str(cfg)], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)

    assert cli.model.reference_passes == 1  # once per step, whatever the number of passes
    first, second = spy.calls  # one micro-batch per pass
    assert first["old"] and second["old"]
    assert first["ratio_gap"] < 1e-6  # pass 1: the policy is still the sampling policy
    assert second["ratio_gap"] > 1e-3  # pass 2: one optimizer step later
    assert first["kl"] > 0 and second["kl"] > 0
    stats = cli.model.last_step_stats
    # logged statistics are the mean over the passes, not their sum
    assert stats["train/kl"] == pytest.approx((first["kl"] + second["kl"]) / 2, rel=1e-5)
    assert stats["train/clip_ratio"] == pytest.approx((first["clip_ratio"] + second["clip_ratio"]) / 2, abs=1e-7)
    assert stats["train/loss"] == pytest.approx((first["loss"] + second["loss"]) / 2, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_skipping_zero_advantage_completions_leaves_the_update_unchanged(warm_adapter, tmp_path, monkeypatch, loss_type):
    """With beta 0, completions of groups without reward spread may skip the backward pass: same gradient.

    Gradients, not weights, are compared: Adam's first step is blind to the gradient's scale, so a wrong loss
    normalisation would not show in the weights."""

    class GradSpy(L.Callback):
        def __init__(self):
            self.grads: dict[str, torch.Tensor] = {}

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad and p.grad is not None}

    runs = {}
    for skip in (True, False):
        spy = LossSpy()
        monkeypatch.setattr(grpo_module, "grpo_loss", spy)
        cfg = stage_config("de", tmp_path / f"skip_{skip}.yaml", **{
            "trainer.default_root_dir": str(tmp_path / f"skip_{skip}"),
            "trainer.max_steps": 1,
            "trainer.limit_val_batches": 0,
            "trainer.callbacks": [],
            "trainer.logger": False,
            "trainer.enable_checkpointing": False,
            "model.init_args.lora.init_adapter": str(warm_adapter),
            "model.init_args.rollout": {"num_generations": 2, "temperature": 1.0, "max_new_tokens": GRPO_MAX_NEW_TOKENS},
            "model.init_args.advantage": "outcome",
            "model.init_args.loss_type": loss_type,
            "model.init_args.beta": 0.0,
            "model.init_args.learning_rate": 1.0e-2,
            "model.init_args.warmup_steps": 0,
            "model.init_args.max_grad_norm": 0.0,
            "model.init_args.skip_zero_advantage": skip,
            "data.tasks": ["NER"],
            "data.sample_per_dataset": None,
            "data.max_train_records": 8,
            "data.batch_size": 8,
            **QUIET,
        })
        L.seed_everything(7, verbose=False)
        cli = build_cli(["--config", str(cfg)], run=False)
        grads = GradSpy()
        cli.trainer.callbacks.append(grads)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        runs[skip] = (grads.grads, cli.model.last_step_stats, sum(c["tokens"] for c in spy.calls))

    (g_skip, stats_skip, tokens_skip), (g_all, stats_all, tokens_all) = runs[True], runs[False]
    # the same seed samples the same completions and rewards on both sides
    assert stats_skip["train/reward"] == stats_all["train/reward"]
    assert stats_skip["train/completion_length"] == stats_all["train/completion_length"]
    zero = stats_skip["train/zero_spread_groups"]
    assert 0.0 < zero < 1.0, f"this case needs groups with and without reward spread (zero-spread share {zero})"
    assert tokens_skip < tokens_all  # rows were left out ...
    assert g_all and set(g_skip) == set(g_all)
    scale = max(float(g.abs().max()) for g in g_all.values())
    assert scale > 0
    for name in g_all:  # ... and the gradient is the same
        torch.testing.assert_close(g_skip[name], g_all[name], rtol=1e-4, atol=1e-5 * scale)


# ------------------------------------------------------------------ QLoRA on the CPU


def test_qlora_nf4_grpo_steps_on_cpu(tiny_model_dir, random_adapter, tmp_path):
    import bitsandbytes as bnb

    cfg = de_config(tmp_path, "qlora", tiny_model_dir, **{
        "trainer.max_steps": 2,
        "model.init_args.base.quantization": "nf4",
        "model.init_args.base.compute_dtype": "float32",
        "model.init_args.lora.init_adapter": str(random_adapter),
        "model.init_args.beta": 0.04,
        "model.init_args.learning_rate": 1.0e-2,
    })
    cli = build_cli(["--config", str(cfg)], run=False)
    cli.model.configure_model()
    four_bit = [m for m in cli.model.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) >= 2 * 7  # every linear layer of both blocks
    meaning = dequantised_base(cli.model.model)
    lora = lora_state(cli.model)
    stats = StepStats()
    cli.trainer.callbacks.append(stats)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)

    assert cli.trainer.global_step == 2 and len(stats.steps) == 2
    assert all(math.isfinite(s["train/loss"]) and s["train/kl"] > 0 for s in stats.steps)
    assert cli.model.reference_passes == 2  # the reference is the 4-bit base with the adapter disabled
    # the frozen base still means the same weights after rollouts (eval mode) and updates, whatever its byte layout
    after = dequantised_base(cli.model.model)
    assert after.keys() == meaning.keys() and all(torch.equal(meaning[k], after[k]) for k in meaning)
    assert any(not torch.equal(lora[n], p) for n, p in cli.model.named_parameters() if p.requires_grad)


# ------------------------------------------------------------------ DDP on the CPU


def test_ddp_two_processes_end_with_identical_adapters(tiny_model_dir, random_adapter, tmp_path):
    from safetensors.torch import load_file

    cfg = de_config(tmp_path, "ddp", tiny_model_dir, **{
        "trainer.max_steps": 3,
        "trainer.strategy": "ddp",
        "trainer.devices": 2,
        "trainer.logger": True,
        "trainer.log_every_n_steps": 1,
        "trainer.callbacks": [{"class_path": "prouie_pl.callbacks.RankConsistencyCheck"},
                              {"class_path": "prouie_pl.callbacks.AdapterExport", "init_args": {"monitor": None}},
                              {"class_path": "ddp_probe.GradientReductionCounter"}],
        # policy != reference, so the KL term has a gradient, and it differs between ranks (different prompts)
        "model.init_args.lora.init_adapter": str(random_adapter),
        "model.init_args.beta": 0.04,
        "model.init_args.learning_rate": 1.0e-2,
        "model.init_args.micro_batch_size": 4,  # 2 prompts x 4 completions per rank: two backward passes a step
    })
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}
    proc = subprocess.run([sys.executable, "-m", "prouie_pl", "fit", "--config", str(cfg)], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "ddp"
    check = json.loads((run / "rank_check.json").read_text())
    assert [r["rank"] for r in check["ranks"]] == [0, 1] and check["identical"] is True
    # each optimizer step reduces every gradient bucket exactly once, through DDP, and nothing else all-reduces
    for rank in (0, 1):
        steps = json.loads((run / f"reductions_rank{rank}.json").read_text())
        assert len(steps) == 3
        for step in steps:
            assert step["buckets"] and sorted(step["buckets"]) == sorted(set(step["buckets"])), step
            assert step["direct_all_reduce"] == 0, step
    kl = column(latest_metrics(run), "train/kl")
    assert kl and all(v > 0 for v in kl)
    start, end = load_file(str(random_adapter / "adapter_model.safetensors")), load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert start.keys() == end.keys()
    assert any(not torch.equal(start[k], end[k]) for k in start)  # the ranks agree on weights that moved


# ------------------------------------------------------------------ configuration errors


@pytest.mark.parametrize("override,expected", [
    (["--model.init_args.rollout.num_generations", "1"], "model.rollout.num_generations=1"),
    (["--model.init_args.micro_batch_size", "3"],
     "model.micro_batch_size=3 does not divide the 16 completions of a step (data.batch_size=4 x model.rollout.num_generations=4)"),
])
def test_wrong_grpo_configuration_names_the_option(tiny_model_dir, tmp_path, capsys, override, expected):
    cfg = stage_config("de", tmp_path / "de.yaml", **{
        "trainer.default_root_dir": str(tmp_path / "run"),
        "trainer.max_steps": 1,
        "trainer.limit_val_batches": 0,
        "trainer.callbacks": [],
        "trainer.logger": False,
        "model.init_args.base.name_or_path": str(tiny_model_dir),
        "model.init_args.lora.init_adapter": None,
        **QUIET,
    })
    assert_config_error(["fit", "--config", str(cfg)] + override, capsys, expected)
    assert not (tmp_path / "run" / "adapter").exists()
