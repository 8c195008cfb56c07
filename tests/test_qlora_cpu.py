"""The 4-bit QLoRA base on the CPU: what an eval-mode pass (a validation decode, a GRPO rollout) leaves behind.

bitsandbytes repacks a ``Linear4bit`` weight for fast CPU inference the first time it runs in eval mode without
gradients on a CPU with AVX512-BF16; in that layout the backward pass loses the gradient through the frozen
base (see :func:`prouie_pl.modeling.keep_trainable_4bit_layout`).  These tests make every CPU take the
repack path by making ``Linear4bit`` believe the CPU has AVX512-BF16, so they check the same thing everywhere.
"""

from __future__ import annotations

import pytest
import torch

from training_helpers import dequantised_base
from prouie_pl.kernels.reference import IGNORE_INDEX

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture
def cpu_claims_avx512_bf16(monkeypatch):
    """Every ``Linear4bit`` built from here on believes the CPU has AVX512-BF16 (so the repack path is live)."""
    import bitsandbytes.nn.modules as modules

    monkeypatch.setattr(modules, "has_avx512bf16", lambda: True)


def nf4_model(model_dir):
    from prouie_pl.modeling import BaseModelSettings, LoRASettings, load_model

    torch.manual_seed(1)  # LoRA A matrices are drawn from the global generator
    model = load_model(BaseModelSettings(name_or_path=str(model_dir), quantization="nf4", compute_dtype="float32"),
                       LoRASettings(r=8, alpha=16, dropout=0.0))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B != 0, so every LoRA matrix has a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def train_pass(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    from prouie_pl.sft import answer_loss

    model.train()
    model.zero_grad(set_to_none=True)
    loss, _ = answer_loss(model, *batch)
    loss.backward()
    return float(loss.detach()), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 900, (2, 24), generator=gen)
    labels = ids.clone()
    labels[:, :8] = IGNORE_INDEX
    return ids, torch.ones_like(ids), labels


def test_a_training_pass_after_an_eval_pass_equals_one_that_never_saw_eval_mode(tiny_model_dir, cpu_claims_avx512_bf16, batch):
    never_eval, after_eval = nf4_model(tiny_model_dir), nf4_model(tiny_model_dir)
    layers = [m for m in after_eval.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7
    meaning_before = dequantised_base(after_eval)

    after_eval.eval()
    with torch.no_grad():  # what a validation decode or a rollout does
        after_eval(input_ids=batch[0], attention_mask=batch[1])
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)

    loss_ref, grads_ref = train_pass(never_eval, batch)
    loss, grads = train_pass(after_eval, batch)
    assert loss == loss_ref
    assert grads.keys() == grads_ref.keys() and len(grads) == 4 * len(layers) // 2  # A and B of every layer
    for name in grads_ref:
        assert grads_ref[name].abs().max() > 0, name
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=0, atol=0)
    meaning_after = dequantised_base(after_eval)
    for name, w in meaning_before.items():
        assert torch.equal(w, meaning_after[name]), name


def test_the_library_repack_would_change_the_gradient(tiny_model_dir, cpu_claims_avx512_bf16, batch):
    """Why the repack stays off for training: with bitsandbytes' default the same comparison fails."""
    from prouie_pl.modeling import keep_trainable_4bit_layout

    if not bnb.functional.has_avx512bf16():
        pytest.skip("the packed CPU kernel runs only on a CPU with AVX512-BF16")
    never_eval, after_eval = nf4_model(tiny_model_dir), nf4_model(tiny_model_dir)
    for m in after_eval.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = True  # undo keep_trainable_4bit_layout: the library's behaviour
    after_eval.eval()
    with torch.no_grad():
        after_eval(input_ids=batch[0], attention_mask=batch[1])
    _, grads_ref = train_pass(never_eval, batch)
    with pytest.warns(UserWarning, match="autograd kernel was not registered"):
        _, grads = train_pass(after_eval, batch)
    worst = max(float((grads[n] - grads_ref[n]).norm() / grads_ref[n].norm()) for n in grads_ref)
    assert worst > 0.1  # measured: 1.2 (the gradient through the frozen 4-bit matmul is lost)
    assert keep_trainable_4bit_layout(after_eval) == 14
