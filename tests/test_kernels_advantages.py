"""group_advantages and stepwise_advantages: hand-computed values, Triton vs reference vs float64 loops."""

import math

import pytest
import torch
from _markers import KERNEL_DEVICE, requires_triton
from _kernel_truths import assert_close, truth_stepwise_advantages
from hypothesis import given, settings
from hypothesis import strategies as st

from prouie_pl.kernels import group_advantages, stepwise_advantages

DEV = KERNEL_DEVICE
BACKENDS = [pytest.param("triton", marks=requires_triton), "torch"]


def _truth_group(rewards, group_size, scale, eps):
    r = rewards.double().view(-1, group_size)
    out = torch.zeros_like(r)
    batch_std = r.reshape(-1).std() if r.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
    for g, row in enumerate(r):
        if row.max() == row.min():
            continue
        denom = {"group": row.std() + eps, "batch": batch_std + eps, "none": 1.0}[scale]
        out[g] = (row - row.mean()) / denom
    return out.reshape(-1)


# ------------------------------------------------------------------------------------------------ group (outcome)


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_advantages_hand_computed(backend):
    rewards = torch.tensor([1.0, 2.0, 3.0, 3.0, 3.0, 3.0], device=DEV)
    # group [1, 2, 3]: mean 2, unbiased std 1 -> [-1, 0, 1]; group [3, 3, 3]: all equal -> exact zeros
    out = group_advantages(rewards, 3, "group", eps=0.0, backend=backend)
    assert torch.equal(out.cpu(), torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))
    # batch std of [1, 2, 3, 3, 3, 3]: mean 2.5, squared deviations sum 3.5, / 5 -> sqrt(0.7)
    out = group_advantages(rewards, 3, "batch", eps=0.0, backend=backend)
    expected = torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]) / math.sqrt(0.7)
    assert_close(out, expected, 1e-6, "batch scale")
    out = group_advantages(rewards, 3, "none", backend=backend)
    assert torch.equal(out.cpu(), torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))
    assert out.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("group_size", [1, 4, 7])
def test_group_advantages_match_float64(backend, scale, group_size):
    gen = torch.Generator().manual_seed(group_size)
    n_groups = 5
    rewards = torch.randn(n_groups * group_size, generator=gen)
    rewards[group_size : 2 * group_size] = 0.1  # an equal-reward group (0.1 is not exact in binary: no luck needed)
    out = group_advantages(rewards.to(DEV), group_size, scale, backend=backend)
    truth = _truth_group(rewards, group_size, scale, 1e-4)
    assert_close(out, truth, 1e-5, f"{scale} advantages")
    assert torch.equal(out[group_size : 2 * group_size].cpu(), torch.zeros(group_size))
    if group_size == 1:
        assert torch.equal(out.cpu(), torch.zeros(n_groups))


@requires_triton
def test_group_advantages_bf16_rewards():
    rewards = torch.tensor([0.5, 1.0, 0.25, 0.75, 2.0, 2.0], dtype=torch.bfloat16)
    out = group_advantages(rewards.to(DEV), 2, backend="triton")
    assert out.dtype == torch.float32
    assert_close(out, _truth_group(rewards, 2, "group", 1e-4), 1e-6, "bf16 rewards")


def test_group_advantages_rejects_bad_groups():
    rewards = torch.randn(6)
    for bad in (0, 4, -3):
        with pytest.raises(ValueError, match="group_size"):
            group_advantages(rewards, bad)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(rewards, 3, scale="global")
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(rewards.view(2, 3), 3)


# ------------------------------------------------------------------------------------------------------ stepwise


@pytest.mark.parametrize("backend", BACKENDS)
def test_stepwise_advantages_hand_computed(backend):
    # One group of two completions, two steps each, four tokens.
    rewards = torch.tensor([[1.0, -1.0], [1.0, 1.0]])
    ends = torch.tensor([[1, 3], [0, 2]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    # Group step rewards [1, -1, 1, 1]: mean 0.5, unbiased std sqrt(3 / 3) = 1 -> normalised [0.5, -1.5, 0.5, 0.5].
    # Row 0: t=0,1 see both steps (0.5 - 1.5), t=2,3 only the step ending at 3.
    # Row 1: t=0 sees both (1.0), t=1,2 the step ending at 2 (0.5), t=3 none.
    expected = torch.tensor([[-1.0, -1.0, -1.5, -1.5], [1.0, 0.5, 0.5, 0.0]])
    out = stepwise_advantages(rewards.to(DEV), ends.to(DEV), mask.to(DEV), 2, 4, eps=0.0, backend=backend)
    assert out.dtype == torch.float32
    assert torch.equal(out.cpu(), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stepwise_advantages_match_float64_loops(backend):
    gen = torch.Generator().manual_seed(11)
    group_size, n_groups, n_steps, seq_len = 3, 4, 5, 37
    batch = group_size * n_groups
    rewards = torch.randn(batch, n_steps, generator=gen)
    ends = torch.randint(-3, seq_len + 5, (batch, n_steps), generator=gen)  # some out of range: clamped
    mask = torch.rand(batch, n_steps, generator=gen) > 0.3
    mask[1] = False  # a row without valid steps
    rewards[3:6] = 0.7  # group 1: every step reward equal
    mask[6:9] = False
    mask[7, 2] = True  # group 2: a single valid step
    out = stepwise_advantages(rewards.to(DEV), ends.to(DEV), mask.to(DEV), group_size, seq_len, backend=backend)
    truth = truth_stepwise_advantages(rewards, ends, mask, group_size, seq_len, 1e-4)
    assert out.shape == (batch, seq_len)
    assert_close(out, truth, 1e-5, "stepwise advantages")
    zeros = torch.zeros(seq_len)
    assert torch.equal(out[1].cpu(), zeros)
    for row in range(3, 9):
        assert torch.equal(out[row].cpu(), zeros), f"row {row} of a degenerate group is not exactly zero"
    assert out[[0, 2, 9]].abs().sum() > 0


@requires_triton
def test_stepwise_triton_bf16_rewards_and_float_mask():
    gen = torch.Generator().manual_seed(12)
    rewards = torch.randn(4, 6, generator=gen).to(torch.bfloat16)
    ends = torch.randint(0, 20, (4, 6), generator=gen)
    mask = (torch.rand(4, 6, generator=gen) > 0.2).float()
    out = stepwise_advantages(rewards.to(DEV), ends.to(DEV), mask.to(DEV), 2, 20, backend="triton")
    ref = stepwise_advantages(rewards, ends, mask, 2, 20, backend="torch")
    assert_close(out, ref, 1e-5, "bf16 rewards")
    assert_close(out, truth_stepwise_advantages(rewards, ends, mask.bool(), 2, 20, 1e-4), 1e-5, "bf16 vs float64")


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    group_size=st.integers(1, 3),
    n_groups=st.integers(1, 3),
    n_steps=st.integers(1, 4),
    seq_len=st.integers(1, 9),
)
def test_stepwise_reference_property(data, group_size, n_groups, n_steps, seq_len):
    batch = group_size * n_groups
    values = st.sampled_from([-1.0, -0.5, 0.0, 0.5, 1.0, 2.0])
    rewards = torch.tensor(data.draw(st.lists(values, min_size=batch * n_steps, max_size=batch * n_steps)))
    ends = torch.tensor(data.draw(st.lists(st.integers(-2, seq_len + 2), min_size=batch * n_steps,
                                           max_size=batch * n_steps)))
    mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=batch * n_steps, max_size=batch * n_steps)))
    shape = (batch, n_steps)
    out = stepwise_advantages(rewards.view(shape), ends.view(shape), mask.view(shape), group_size, seq_len,
                              backend="torch")
    truth = truth_stepwise_advantages(rewards.view(shape), ends.view(shape), mask.view(shape), group_size, seq_len,
                                      1e-4)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), truth, atol=1e-5, rtol=1e-5)


def test_stepwise_advantages_rejects_bad_arguments():
    rewards, ends, mask = torch.zeros(4, 2), torch.zeros(4, 2, dtype=torch.long), torch.ones(4, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="group_size"):
        stepwise_advantages(rewards, ends, mask, 3, 5)
    with pytest.raises(ValueError, match="must all be"):
        stepwise_advantages(rewards, ends[:, :1], mask, 2, 5)
    with pytest.raises(ValueError, match="integer token indices"):
        stepwise_advantages(rewards, ends.float(), mask, 2, 5)
    with pytest.raises(ValueError, match="seq_len"):
        stepwise_advantages(rewards, ends, mask, 2, -1)
