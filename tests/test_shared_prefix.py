"""Prompts computed once in training (:mod:`prouie_pl.shared_prefix`): the GRPO passes and the SFT loss give the
per-row path's values and LoRA gradients.

Models: the session's tiny Llama and a tiny randomly initialised Gemma 3 whose sliding-window layers (window 6)
are shorter than every prompt, each with LoRA adapters on every linear layer initialised at random (so both
LoRA matrices get gradients) and no dropout.  The reference is always the per-row computation the stages ran
before: prompt + completion (or the whole SFT row) through the decoder for every row.

``test_*_cut_prefix_gradient_is_caught`` run the same comparisons with the shared prefix's gradient cut (its KV
cache detached) and check that the gradients then differ by far more than the tolerance: the equality tests
would fail if the backward pass did not reach the prefix.
"""

from __future__ import annotations

import pytest
import torch

import prouie_pl.shared_prefix as shared_prefix
from prouie_pl.decoding import left_pad
from prouie_pl.grpo.logprobs import completion_logprobs
from prouie_pl.kernels.reference import IGNORE_INDEX, LOSS_TYPES
from prouie_pl.shared_prefix import (answer_nll_shared_head, group_owners, grouped_completion_logprobs, shared_head_length)
from prouie_pl.sft import answer_nll
from training_helpers import single_thread, tiny_gemma3

PAD = 0
ATOL_LP = 1e-5
# float32 sums taken in another order: each gradient within 1e-5 of its tensor's largest entry
GRAD_SCALE_TOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with single_thread(deterministic=True):
        yield


def with_lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(model, config).train()


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return with_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))


@pytest.fixture(scope="module")
def gemma():
    return with_lora(tiny_gemma3(PAD))


MODELS = ["llama", "gemma"]


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def zero_grads(model) -> None:
    for p in model.parameters():
        p.grad = None


def assert_same_grads(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() and len(want) > 0
    for name in want:
        scale = float(want[name].abs().max())
        assert scale > 0, f"{name}: no gradient reached it"
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=GRAD_SCALE_TOL * scale, msg=lambda m: f"{name}: {m}")


def max_grad_gap(got: dict, want: dict) -> float:
    return max(float((got[n] - want[n]).abs().max() / (want[n].abs().max() + 1e-12)) for n in want)


def cut_prefix_gradient(monkeypatch) -> None:
    """Make every shared prefix's KV cache detached: its values stay, its gradient is cut."""
    real = shared_prefix.prefix_cache

    def detached(*args, **kwargs):
        cache = real(*args, **kwargs)
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys.detach(), layer.values.detach()
        return cache

    monkeypatch.setattr(shared_prefix, "prefix_cache", detached)


def group_batch(vocab: int, seed: int = 3):
    """Three prompts (9, 14 and 5 tokens, left-padded to 15 with one column of padding in every row) and six
    completions of unequal length: prompt 0 owns three, prompt 1 two, prompt 2 one."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (9, 14, 5)]
    ids, mask = left_pad(prompts, PAD)
    ids = torch.cat([torch.full((3, 1), PAD), ids], dim=1)
    mask = torch.cat([torch.zeros(3, 1, dtype=torch.long), mask], dim=1)
    owner = torch.tensor([0, 0, 0, 1, 1, 2])
    lengths = torch.tensor([7, 3, 5, 1, 7, 4])
    width = int(lengths.max())
    cmask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).long()
    completions = torch.randint(3, vocab, (6, width), generator=gen).masked_fill(cmask == 0, PAD)
    weights = torch.randn(6, width, generator=gen)
    return ids, mask, owner, completions, cmask, weights


def per_row_and_shared(model, temperature: float = 1.0):
    ids, mask, owner, comp, cmask, weights = group_batch(model.config.vocab_size)
    zero_grads(model)
    want = completion_logprobs(model, ids[owner], mask[owner], comp, cmask, temperature)
    (want * weights).sum().backward()
    want_grads = lora_grads(model)
    zero_grads(model)
    got = grouped_completion_logprobs(model, ids, mask, owner, comp, cmask, temperature)
    (got * weights).sum().backward()
    got_grads = lora_grads(model)
    zero_grads(model)
    return want, got, want_grads, got_grads, cmask


@pytest.mark.parametrize("name", MODELS)
def test_grouped_completion_logprobs_equal_the_per_row_pass(request, name):
    model = request.getfixturevalue(name)
    want, got, want_grads, got_grads, cmask = per_row_and_shared(model, temperature=0.7)
    assert bool((want[cmask == 0] == 0).all()) and bool((want[cmask == 1] < 0).all())
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL_LP)
    assert_same_grads(got_grads, want_grads)


@pytest.mark.parametrize("name", MODELS)
def test_grouped_logprobs_cut_prefix_gradient_is_caught(request, name, monkeypatch):
    model = request.getfixturevalue(name)
    cut_prefix_gradient(monkeypatch)
    want, got, want_grads, got_grads, _ = per_row_and_shared(model)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL_LP)  # the values do not see the cut
    assert max_grad_gap(got_grads, want_grads) > 1e-2  # the gradients do


def test_group_owners_map_rows_to_their_groups_first_row():
    first, owner = group_owners(torch.tensor([1, 2, 3, 7, 8, 11]), 4)
    assert first.tolist() == [0, 4, 8] and owner.tolist() == [0, 0, 0, 1, 2, 2]


# ---------------------------------------------------------------------------------------------- GRPO module


def trajectory_for(model, seed: int, zero_group: bool):
    """Two prompts x G=3 completions with random per-token advantages (the second group's all zero when
    ``zero_group``, a group without reward spread)."""
    from prouie_pl.grpo.trajectory import Trajectory

    ids, mask, _, comp, cmask, _ = group_batch(model.config.vocab_size, seed)
    g = 3
    owner = torch.tensor([0, 0, 0, 1, 1, 1])
    gen = torch.Generator().manual_seed(seed + 1)
    adv = torch.randn(6, comp.shape[1], generator=gen) * cmask
    if zero_group:
        adv[3:] = 0
    return Trajectory(ids[owner], mask[owner], comp, cmask, torch.zeros(6, dtype=torch.bool), [], adv, g)


def grpo_module(model, mode: str, **settings):
    from prouie_pl.grpo.module import GRPOModule
    from prouie_pl.grpo.rollout import RolloutSettings

    module = GRPOModule(rollout=RolloutSettings(num_generations=3, temperature=0.9), policy_prefix=mode, **settings)
    module.model = model
    return module


def run_pass(model, mode: str, seed: int, zero_group: bool, **settings):
    module = grpo_module(model, mode, **settings)
    trajectory = trajectory_for(model, seed, zero_group)
    if settings.get("num_iterations", 1) > 1 or settings.get("beta", 0) > 0:
        with torch.no_grad():  # an "old policy" a little away from the current one, so ratios are not all 1
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.01)
            module.add_comparison_logprobs(trajectory)
            for p in model.parameters():
                if p.requires_grad:
                    p.sub_(0.01)
    zero_grads(model)
    stats = module.accumulate_policy_gradients(trajectory)
    grads = lora_grads(model)
    zero_grads(model)
    return stats, grads, trajectory


CASES = [(loss, micro, beta) for loss in LOSS_TYPES for micro, beta in ((None, 0.0), (2, 0.04), (4, 0.0))]


@pytest.mark.parametrize("loss_type,micro,beta", CASES)
def test_grpo_policy_pass_shared_equals_per_row(llama, loss_type, micro, beta):
    settings = dict(loss_type=loss_type, micro_batch_size=micro, beta=beta, num_iterations=2)
    want, want_grads, want_traj = run_pass(llama, "per_row", 5, zero_group=beta == 0, **settings)
    got, got_grads, got_traj = run_pass(llama, "shared", 5, zero_group=beta == 0, **settings)
    torch.testing.assert_close(got_traj.old_logprobs, want_traj.old_logprobs, rtol=0, atol=ATOL_LP)
    if beta:
        torch.testing.assert_close(got_traj.ref_logprobs, want_traj.ref_logprobs, rtol=0, atol=ATOL_LP)
        assert abs(got.metrics["kl"] - want.metrics["kl"]) < 1e-6 and want.metrics["kl"] > 0
    assert abs(got.loss - want.loss) < 1e-5 and want.loss != 0
    assert_same_grads(got_grads, want_grads)


@pytest.mark.parametrize("micro", [None, 4])
def test_grpo_policy_pass_shared_equals_per_row_on_gemma_sliding_window(gemma, micro):
    settings = dict(loss_type="dapo", micro_batch_size=micro, beta=0.04, num_iterations=2)
    want, want_grads, _ = run_pass(gemma, "per_row", 6, zero_group=False, **settings)
    got, got_grads, _ = run_pass(gemma, "shared", 6, zero_group=False, **settings)
    assert abs(got.loss - want.loss) < 1e-5 and abs(got.metrics["kl"] - want.metrics["kl"]) < 1e-6
    assert_same_grads(got_grads, want_grads)


def test_unknown_policy_prefix_mode_is_refused():
    from prouie_pl.grpo.module import GRPOModule

    with pytest.raises(ValueError, match="model.policy_prefix"):
        GRPOModule(policy_prefix="twice")


# ---------------------------------------------------------------------------------------------- SFT


def sft_batch(vocab: int, head: int = 12, seed: int = 4):
    """Four right-padded rows that share their first ``head`` tokens, then differ (text and answer lengths
    differ); labels cover the answers only."""
    gen = torch.Generator().manual_seed(seed)
    common = torch.randint(3, vocab, (head,), generator=gen).tolist()
    rows, labels = [], []
    for text, answer in ((5, 6), (9, 3), (2, 8), (7, 5)):
        prompt = common + torch.randint(3, vocab, (text,), generator=gen).tolist()
        target = torch.randint(3, vocab, (answer,), generator=gen).tolist()
        rows.append(prompt + target)
        labels.append([IGNORE_INDEX] * len(prompt) + target)
    width = max(len(r) for r in rows)
    ids = torch.full((4, width), PAD)
    lab = torch.full((4, width), IGNORE_INDEX)
    mask = torch.zeros((4, width), dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, :len(r)], lab[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), torch.tensor(l), 1
    return ids, mask, lab


@pytest.mark.parametrize("name", MODELS)
def test_sft_shared_head_gives_the_per_row_loss_and_gradients(request, name):
    model = request.getfixturevalue(name)
    ids, mask, labels = sft_batch(model.config.vocab_size)
    assert shared_head_length(ids, mask, labels) >= 12
    zero_grads(model)
    want, n_want = answer_nll(model, ids, mask, labels)
    want.backward()
    want_grads = lora_grads(model)
    zero_grads(model)
    got, n_got = answer_nll_shared_head(model, ids, mask, labels)
    got.backward()
    got_grads = lora_grads(model)
    zero_grads(model)
    assert n_got == n_want == 22
    assert abs(float(got) - float(want)) < 1e-4 * float(want)
    assert_same_grads(got_grads, want_grads)


def test_sft_shared_head_cut_gradient_is_caught(llama, monkeypatch):
    ids, mask, labels = sft_batch(llama.config.vocab_size)
    zero_grads(llama)
    answer_nll(llama, ids, mask, labels)[0].backward()
    want = lora_grads(llama)
    zero_grads(llama)
    cut_prefix_gradient(monkeypatch)
    answer_nll_shared_head(llama, ids, mask, labels)[0].backward()
    got = lora_grads(llama)
    zero_grads(llama)
    assert max_grad_gap(got, want) > 1e-2


def test_shared_head_length_stops_short_of_the_answers_and_of_padding():
    ids, mask, labels = sft_batch(1000, head=12)
    assert shared_head_length(ids, mask, labels) == 12
    # identical rows: the head ends one token before the first answer token (its hidden state predicts it)
    same = ids[:1].repeat(3, 1)
    lab = labels[:1].repeat(3, 1)
    first_target = int((lab[0] != IGNORE_INDEX).int().argmax())
    assert shared_head_length(same, mask[:1].repeat(3, 1), lab) == first_target - 1
    # one row alone shares nothing; rows that differ at the first token share nothing
    assert shared_head_length(ids[:1], mask[:1], labels[:1]) == 0
    other = ids.clone()
    other[1, 0] = other[0, 0] + 1
    assert shared_head_length(other, mask, labels) == 0


def test_a_short_shared_head_runs_the_per_row_path(llama, monkeypatch):
    ids, mask, labels = sft_batch(llama.config.vocab_size, head=3)
    calls = []
    monkeypatch.setattr(shared_prefix, "prefix_cache", lambda *a, **k: calls.append(1))
    with torch.no_grad():
        got, _ = answer_nll_shared_head(llama, ids, mask, labels)
        want, _ = answer_nll(llama, ids, mask, labels)
    assert calls == [] and float(got) == float(want)


# ---------------------------------------------------------------------------------------------- a learning run


def test_cm_run_with_shared_heads_follows_the_per_row_loss_curve(tmp_path, monkeypatch):
    """The tiny CM stage trained twice from the same seed, shared heads on and off: the same loss at every step
    and the same adapter at the end up to AdamW's noise (float32, one thread), with the shared path taken in most
    steps."""
    import lightning as L

    from prouie_pl.lightning_cli import build_cli
    from training_helpers import QUIET_TRAINER as QUIET, stage_config

    class Losses(L.Callback):
        def __init__(self):
            self.values: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, *args):
            self.values.append(float(outputs["loss"]))

    real = shared_prefix.prefix_cache
    shared_calls = []

    def counted(*args, **kwargs):
        shared_calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(shared_prefix, "prefix_cache", counted)
    runs = {}
    for shared in (False, True):
        cfg = stage_config("cm", tmp_path / f"cm_{shared}.yaml", **{
            "trainer.default_root_dir": str(tmp_path / f"cm_{shared}"),
            "trainer.max_epochs": 2,
            "trainer.limit_val_batches": 0,
            "trainer.callbacks": [{"class_path": "prouie_pl.callbacks.CurriculumCallback"}],
            "model.init_args.lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "model.init_args.shared_head": shared,
            "data.max_train_records": 16,
            "data.batch_size": 4,
            "data.epochs_per_phase": 1,
            **QUIET,
        })
        cli = build_cli(["--config", str(cfg)], run=False)
        losses = Losses()
        cli.trainer.callbacks.append(losses)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        runs[shared] = (losses.values, {n: p.detach().clone() for n, p in cli.model.named_parameters() if p.requires_grad})
    (want, want_params), (got, got_params) = runs[False], runs[True]
    assert len(got) == len(want) >= 8 and len(shared_calls) >= len(got) // 2
    assert want[-1] < want[0]  # it learns
    for a, b in zip(got, want):
        assert abs(a - b) <= 1e-4 * abs(b)
    # AdamW moves an element by about the learning rate (2e-3) a step whatever its gradient's size, so float noise
    # in a gradient near zero can send a lone element part of a step's move the other way (seen: 1.7e-4):
    # elements get a bound of two steps' moves, each tensor as a whole a relative bound well below what a
    # systematic difference gives, every element off (seen: at most 4e-4)
    for name in want_params:
        got_p, want_p = got_params[name], want_params[name]
        torch.testing.assert_close(got_p, want_p, rtol=0.0, atol=4e-3)
        assert float((got_p - want_p).norm() / want_p.norm()) < 5e-3, name


@pytest.fixture()
def checkpointed_llama(llama):
    """The LoRA Llama with gradient checkpointing on (as the QLoRA configs set it), off again afterwards."""
    llama.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    llama.train()
    yield llama
    llama.gradient_checkpointing_disable()
    llama.train()


def counted_prefix_caches(monkeypatch) -> list:
    calls = []
    real = shared_prefix.prefix_cache

    def counted(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(shared_prefix, "prefix_cache", counted)
    return calls


def test_gradient_checkpointing_runs_the_per_row_path_with_gradients(checkpointed_llama, monkeypatch):
    """transformers drops the KV cache inside checkpointed layers: with gradients the shared-prefix functions
    must take the per-row path (before, the policy pass raised 'returned no KV cache'), and still give the
    per-row values and gradients; without gradients nothing is checkpointed and the prefix is shared."""
    calls = counted_prefix_caches(monkeypatch)
    want, got, want_grads, got_grads, cmask = per_row_and_shared(checkpointed_llama, temperature=0.7)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL_LP)
    assert_same_grads(got_grads, want_grads)
    ids, mask, labels = sft_batch(checkpointed_llama.config.vocab_size)
    want_nll, n_want = answer_nll(checkpointed_llama, ids, mask, labels)
    got_nll, n_got = answer_nll_shared_head(checkpointed_llama, ids, mask, labels)
    assert n_got == n_want and abs(float(got_nll) - float(want_nll)) < 1e-4 * float(want_nll)
    assert calls == []  # neither function shared a prefix with gradients on
    ids, mask, owner, comp, cmask, _ = group_batch(checkpointed_llama.config.vocab_size)
    with torch.no_grad():
        shared = grouped_completion_logprobs(checkpointed_llama, ids, mask, owner, comp, cmask)
        per_row = completion_logprobs(checkpointed_llama, ids[owner], mask[owner], comp, cmask)
    assert calls == [False]  # the no-grad pass shares its prefix
    torch.testing.assert_close(shared, per_row, rtol=0, atol=ATOL_LP)
