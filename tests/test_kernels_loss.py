"""grpo_loss: hand-computed aggregations and clipping, Triton vs reference vs float64 truth, gradients."""

import math

import pytest
import torch
from _markers import KERNEL_DEVICE, requires_triton
from _kernel_truths import GRAD_TOL, assert_close, truth_grpo_loss

from prouie_pl.kernels import grpo_loss, reference

DEV = KERNEL_DEVICE
BACKENDS = [pytest.param("triton", marks=requires_triton), "torch"]
LOSS_TYPES = list(reference.LOSS_TYPES)


def _hand_batch():
    # On-policy (old=None): ratio 1, per-token loss -A. Row 0: A=1 on 2 valid tokens; row 1: A=-3 on 1 token;
    # row 2: no valid token.
    logprobs = torch.tensor([[-0.5, -1.0, -2.0], [-0.1, -0.2, -0.3], [-1.0, -1.0, -1.0]])
    advantages = torch.tensor([1.0, -3.0, 2.0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    return logprobs, advantages, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "loss_type,kwargs,expected",
    [
        ("grpo", {}, (-1.0 + 3.0 + 0.0) / 3),  # per-sequence means -1, 3, 0 (empty), averaged
        ("bnpo", {}, (-2.0 + 3.0) / 3),  # token sum 1 over 3 valid tokens
        ("dr_grpo", {}, 1.0 / (3 * 3)),  # token sum / (B * T)
        ("dr_grpo", {"max_completion_length": 4}, 1.0 / (3 * 4)),
        ("dapo", {}, 1.0 / 3),  # local token mean, like bnpo
        ("dapo", {"num_items_in_batch": 10}, 1.0 / 10),  # the given (global) token count replaces it
    ],
)
def test_aggregations_hand_computed(backend, loss_type, kwargs, expected):
    logprobs, advantages, mask = _hand_batch()
    lp = logprobs.to(DEV).requires_grad_()
    loss, metrics = grpo_loss(lp, None, None, advantages.to(DEV), mask.to(DEV), loss_type=loss_type,
                              backend=backend, **kwargs)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert metrics["clip_ratio"].item() == 0.0 and metrics["kl"].item() == 0.0
    loss.backward()
    # d loss / d lp = -A * w_b on valid tokens (ratio = exp(lp - lp.detach()) has gradient 1).
    weights = {
        "grpo": [1 / (3 * 2), 1 / (3 * 1), 1 / 3],
        "bnpo": [1 / 3] * 3,
        "dr_grpo": [1 / (3 * kwargs.get("max_completion_length", 3))] * 3,
        "dapo": [1 / kwargs.get("num_items_in_batch", 3)] * 3,
    }[loss_type]
    expected_grad = -advantages[:, None] * torch.tensor(weights)[:, None] * mask
    assert_close(lp.grad, expected_grad, 1e-6, "hand-computed gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_clipping_and_kl_hand_computed(backend):
    # One sequence, four tokens: ratios 1.5 (A=+1: high-clipped), 0.5 (A=-1: low-clipped), 0.5 (A=+1: not clipped),
    # 1.0 (A=-1). The reference differs from the policy by log 2 on the first token only.
    lp = torch.zeros(1, 4)
    old = -torch.log(torch.tensor([[1.5, 0.5, 0.5, 1.0]]))
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    ref = torch.tensor([[math.log(2.0), 0.0, 0.0, 0.0]])
    mask = torch.ones(1, 4)
    beta = 0.1
    kl0 = 2.0 - math.log(2.0) - 1.0
    # per token: -min(1.5, 1.2) = -1.2; -min(-0.5, -0.8) = 0.8; -min(0.5, 0.8) = -0.5; -min(-1, -1) = 1.
    expected = (-1.2 + 0.8 - 0.5 + 1.0 + beta * kl0) / 4
    x = lp.to(DEV).requires_grad_()
    loss, metrics = grpo_loss(x, old.to(DEV), ref.to(DEV), adv.to(DEV), mask.to(DEV), beta=beta, backend=backend)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert metrics["clip_ratio"].item() == pytest.approx(0.5)
    assert metrics["clip_ratio_low"].item() == pytest.approx(0.25)
    assert metrics["clip_ratio_high"].item() == pytest.approx(0.25)
    assert metrics["kl"].item() == pytest.approx(kl0 / 4, abs=1e-6)
    loss.backward()
    # clipped tokens get no surrogate gradient; d kl / d lp = 1 - exp(ref - lp) = -1 on token 0.
    expected_grad = torch.tensor([[beta * (1 - 2.0), 0.0, -0.5, 1.0]]) / 4
    assert_close(x.grad, expected_grad, 1e-6, "clipped gradient")


def _random_case(seed, batch=6, seq=37, adv_per_token=False, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    lp = (-torch.rand(batch, seq, generator=gen) * 3).to(dtype)
    old = lp.float() + 0.3 * torch.randn(batch, seq, generator=gen)  # ratios spread across both clip bounds
    ref = lp.float() + 0.5 * torch.randn(batch, seq, generator=gen)
    adv = torch.randn((batch, seq) if adv_per_token else (batch,), generator=gen)
    mask = torch.rand(batch, seq, generator=gen) > 0.25
    mask[batch // 2] = False  # an empty sequence
    mask[-1, seq // 2 :] = False  # a short one
    return lp, old, ref, adv, mask


@requires_triton
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("with_old", [False, True], ids=["on_policy", "old"])
@pytest.mark.parametrize("beta", [0.0, 0.05], ids=["no_kl", "kl"])
@pytest.mark.parametrize("adv_per_token", [False, True], ids=["adv_B", "adv_BT"])
def test_grpo_loss_triton_matches_reference_and_float64(loss_type, with_old, beta, adv_per_token):
    seed = 8 * LOSS_TYPES.index(loss_type) + 4 * with_old + 2 * (beta > 0) + adv_per_token
    lp, old, ref, adv, mask = _random_case(seed, adv_per_token=adv_per_token)
    old = old if with_old else None
    ref = ref if beta > 0 else None
    kwargs = dict(eps_low=0.2, eps_high=0.28, beta=beta, loss_type=loss_type, max_completion_length=40)
    results = {}
    for backend in ("triton", "torch"):
        x = lp.clone().to(DEV).requires_grad_()
        loss, metrics = grpo_loss(x, None if old is None else old.to(DEV), None if ref is None else ref.to(DEV),
                                  adv.to(DEV), mask.to(DEV), backend=backend, **kwargs)
        loss.backward()
        results[backend] = (loss, metrics, x.grad)

    x64 = lp.double().requires_grad_()
    truth = truth_grpo_loss(x64, old, ref, adv, mask, 0.2, 0.28, beta, loss_type, max_len=40)
    truth.backward()

    for backend, (loss, metrics, grad) in results.items():
        assert_close(loss, truth, 1e-5, f"{backend} loss")
        assert_close(grad, x64.grad, 1e-5, f"{backend} grad")
    tri_metrics, ref_metrics = results["triton"][1], results["torch"][1]
    for name in ("clip_ratio", "clip_ratio_low", "clip_ratio_high", "kl"):
        assert_close(tri_metrics[name], ref_metrics[name], 1e-5, name)
        assert tri_metrics[name].dtype == torch.float32 and not tri_metrics[name].requires_grad
    if with_old:
        assert tri_metrics["clip_ratio"] > 0  # the random ratios do get clipped: the flags are exercised
    if beta > 0:
        assert tri_metrics["kl"] > 0


@requires_triton
def test_grpo_loss_triton_bf16_logprobs_and_float_mask():
    lp, old, ref, adv, mask = _random_case(5, dtype=torch.bfloat16)
    x = lp.clone().to(DEV).requires_grad_()
    loss, _ = grpo_loss(x, old.to(DEV), ref.to(DEV), adv.to(DEV), mask.float().to(DEV), beta=0.04, loss_type="bnpo",
                        backend="triton")
    loss.backward()
    assert x.grad.dtype == torch.bfloat16
    x64 = lp.double().requires_grad_()
    truth = truth_grpo_loss(x64, old, ref, adv, mask, 0.2, 0.2, 0.04, "bnpo")
    truth.backward()
    assert_close(loss, truth, 1e-5, "bf16 loss")
    assert_close(x.grad, x64.grad, GRAD_TOL[torch.bfloat16], "bf16 grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_metrics_with_reference_but_no_kl_penalty(backend):
    lp, old, ref, adv, mask = _random_case(6)
    loss_kl0, metrics = grpo_loss(lp.to(DEV), old.to(DEV), ref.to(DEV), adv.to(DEV), mask.to(DEV), beta=0.0,
                                  backend=backend)
    loss_noref, metrics_noref = grpo_loss(lp.to(DEV), old.to(DEV), None, adv.to(DEV), mask.to(DEV), backend=backend)
    assert loss_kl0.item() == pytest.approx(loss_noref.item(), abs=1e-7)  # beta = 0: KL is logged, not added
    assert metrics["kl"] > 0 and metrics_noref["kl"].item() == 0.0
    truth_kl = ((torch.exp(ref.double() - lp.double()) - (ref.double() - lp.double()) - 1) * mask).sum() / mask.sum()
    assert metrics["kl"].item() == pytest.approx(truth_kl.item(), rel=1e-5)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_loss_reference_gradcheck_float64(loss_type):
    lp, old, ref, adv, mask = _random_case(7, batch=3, seq=5, adv_per_token=True)
    lp = lp.double().requires_grad_()
    old, ref, adv = old.double(), ref.double(), adv.double()
    fn = lambda x: reference.grpo_loss(x, old, ref, adv, mask, 0.2, 0.2, 0.1, loss_type, None)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (lp,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_on_policy_equals_old_logprobs_equal_to_current(backend):
    """old_logprobs=None means ratio = exp(lp - lp.detach()): value 1, gradient that of old == lp (constant)."""
    lp, _, ref, adv, mask = _random_case(9, adv_per_token=True)
    grads, losses = [], []
    for old in (None, lp.clone()):
        x = lp.clone().to(DEV).requires_grad_()
        loss, _ = grpo_loss(x, None if old is None else old.to(DEV), ref.to(DEV), adv.to(DEV), mask.to(DEV),
                            beta=0.1, loss_type="dr_grpo", backend=backend)
        loss.backward()
        grads.append(x.grad)
        losses.append(loss)
    assert losses[0].item() == pytest.approx(losses[1].item(), abs=1e-7)
    assert_close(grads[0], grads[1], 1e-6, "on-policy gradient")
    assert grads[0].abs().sum() > 0


def test_grpo_loss_rejects_bad_arguments():
    lp, old, ref, adv, mask = _random_case(8, batch=2, seq=4)
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(lp, old, None, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="'grpo', 'bnpo', 'dr_grpo', 'dapo'"):
        grpo_loss(lp, old, ref, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(lp, old, ref, adv[:1], mask)
    with pytest.raises(ValueError, match="mask"):
        grpo_loss(lp, old, ref, adv, mask[:, :2])
