"""The first-use guard of the kernels: simulated compile/launch failures and wrong results fall back to the reference.

On a machine without a GPU, ``backend="auto"`` never picks Triton, so the ``guard_on`` fixture adds the CPU to
``_dispatch.AUTO_TRITON_DEVICES``: "auto" then picks the interpreted kernels, and the real guard watches them.
Failures are simulated at the launch seam (``_LazyKernel.__getitem__``, through which every kernel launches) or
by corrupting what one Triton launch returns.
"""

import contextlib
import importlib
import re
import warnings

import pytest
import torch
from _markers import KERNEL_DEVICE, requires_triton

import prouie_pl.kernels as kernels
from prouie_pl.kernels import KernelFallbackWarning, _dispatch, fallback, fallback_status
from prouie_pl.kernels import advantages as advantages_module
from prouie_pl.kernels import logprobs as logprobs_module

# The package exports the function grpo_loss under the submodule's name.
grpo_loss_module = importlib.import_module("prouie_pl.kernels.grpo_loss")

DEV = KERNEL_DEVICE
pytestmark = requires_triton


@pytest.fixture(autouse=True)
def guard_on(monkeypatch):
    """Backend "auto" picks Triton on the test device, no PROUIE_KERNELS override, a fresh guard before and after."""
    monkeypatch.setattr(_dispatch, "AUTO_TRITON_DEVICES", ("cuda", DEV.type))
    monkeypatch.delenv("PROUIE_KERNELS", raising=False)
    fallback.reset_kernel_guard()
    yield
    fallback.reset_kernel_guard()


class Launches:
    """Replaces the launch of every kernel: counts launches, and raises ``error`` for grids of at least
    ``from_rows`` programs (the self-check inputs are small, so a large ``from_rows`` spares them)."""

    def __init__(self, monkeypatch, error: BaseException | None = None, from_rows: int = 0):
        self.count = 0
        self.error, self.from_rows = error, from_rows
        real = _dispatch._LazyKernel.__getitem__

        def launch(kernel, grid):
            self.count += 1
            if self.error is not None and grid[0] >= self.from_rows:
                raise self.error
            return real(kernel, grid)

        monkeypatch.setattr(_dispatch._LazyKernel, "__getitem__", launch)


def _inputs(name: str, rows: int = 6) -> dict:
    """Keyword arguments of one call of kernel ``name`` on the test device (``rows`` rows or groups)."""
    gen = torch.Generator().manual_seed(0)
    if name == "token_logprobs":
        return {"logits": torch.randn(rows, 37, generator=gen).to(DEV).requires_grad_(),
                "targets": torch.randint(0, 37, (rows,), generator=gen).to(DEV)}
    if name == "linear_token_logprobs":
        return {"hidden": torch.randn(rows, 8, generator=gen).to(DEV).requires_grad_(),
                "weight": torch.randn(37, 8, generator=gen).to(DEV),
                "targets": torch.randint(0, 37, (rows,), generator=gen).to(DEV)}
    if name == "group_advantages":
        return {"rewards": torch.rand(2 * rows, generator=gen).to(DEV), "group_size": 2}
    if name == "stepwise_advantages":
        return {"step_rewards": torch.rand(2 * rows, 3, generator=gen).to(DEV),
                "step_ends": torch.randint(0, 9, (2 * rows, 3), generator=gen).to(DEV),
                "step_mask": torch.ones(2 * rows, 3, dtype=torch.bool, device=DEV), "group_size": 2, "seq_len": 9}
    if name == "grpo_loss":
        lp = -torch.rand(rows, 9, generator=gen)
        old = lp + 0.2 * torch.randn(rows, 9, generator=gen)
        return {"logprobs": lp.to(DEV).requires_grad_(), "old_logprobs": old.to(DEV),
                "ref_logprobs": None, "advantages": torch.randn(rows, generator=gen).to(DEV),
                "mask": torch.ones(rows, 9, device=DEV)}
    raise AssertionError(name)


KERNELS = ["token_logprobs", "linear_token_logprobs", "group_advantages", "stepwise_advantages", "grpo_loss"]


def _call(name: str, inputs: dict, backend: str = "auto"):
    return getattr(kernels, name)(**inputs, backend=backend)


def _values(out) -> list[torch.Tensor]:
    if isinstance(out, tuple):  # grpo_loss: (loss, metrics)
        return [out[0], *out[1].values()]
    return [out]


def _assert_equal(actual, expected) -> None:
    for a, e in zip(_values(actual), _values(expected), strict=True):
        assert torch.equal(a.detach(), e.detach()), (a, e)


@contextlib.contextmanager
def no_fallback_warning():
    """Fails if a KernelFallbackWarning is issued inside, also when the block raises."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            fallbacks = [str(w.message) for w in caught if issubclass(w.category, KernelFallbackWarning)]
            assert not fallbacks, fallbacks


def _no_warnings(fn):
    with no_fallback_warning():
        return fn()


# --------------------------------------------------------------------------------------- compile or launch failure


@pytest.mark.parametrize("name", KERNELS)
def test_simulated_compile_failure_falls_back_once_with_one_clear_warning(monkeypatch, name):
    launches = Launches(monkeypatch, RuntimeError("simulated failure: ptxas exited with status 255"))
    inputs = _inputs(name)
    with pytest.warns(KernelFallbackWarning) as record:
        out = _call(name, inputs)
    assert len(record) == 1
    message = str(record[0].message)
    assert f"prouie_pl.kernels.{name}:" in message
    assert "failed to compile or launch" in message
    assert "RuntimeError: simulated failure: ptxas exited with status 255" in message
    assert "PROUIE_KERNELS=torch" in message and "PROUIE_KERNELS=triton" in message
    assert record[0].filename == __file__  # points at the caller, not at the guard
    _assert_equal(out, _call(name, inputs, backend="torch"))
    tried = launches.count
    assert tried == 1  # the self-check's first launch failed; the real call did not try Triton

    second = _no_warnings(lambda: _call(name, inputs))
    assert launches.count == tried  # Triton is not tried again
    _assert_equal(second, _call(name, inputs, backend="torch"))
    assert fallback_status()[name].startswith("torch: failed to compile or launch during its self-check")


def test_a_failure_of_the_first_real_call_falls_back_and_the_gradient_still_flows(monkeypatch):
    # The self-check's 10 rows launch fine; the real call's 40 rows raise (a specialisation that does not build).
    Launches(monkeypatch, RuntimeError("simulated out of shared memory"), from_rows=40)
    inputs = _inputs("token_logprobs", rows=40)
    with pytest.warns(KernelFallbackWarning) as record:
        out = kernels.token_logprobs(**inputs)
    assert len(record) == 1
    message = str(record[0].message)
    assert "failed to compile or launch (RuntimeError: simulated out of shared memory)" in message
    assert "self-check" not in message
    out.sum().backward()
    logits = inputs["logits"].detach()
    expected = torch.log_softmax(logits.double(), -1).gather(1, inputs["targets"][:, None]).squeeze(1)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)
    softmax = torch.softmax(logits.double(), -1)
    onehot = torch.nn.functional.one_hot(inputs["targets"], 37).double()
    torch.testing.assert_close(inputs["logits"].grad.double(), onehot - softmax, atol=1e-5, rtol=0)


def test_bad_arguments_raise_without_a_fallback(monkeypatch):
    launches = Launches(monkeypatch)
    logits = torch.randn(4, 37, device=DEV)
    with no_fallback_warning(), pytest.raises(ValueError, match="targets has shape"):
        kernels.token_logprobs(logits, torch.zeros(5, dtype=torch.long, device=DEV))
    assert fallback_status() == {"token_logprobs": "triton"}  # the self-check passed; the call was at fault
    assert launches.count > 0


def test_out_of_memory_propagates_instead_of_falling_back(monkeypatch):
    Launches(monkeypatch, torch.cuda.OutOfMemoryError("simulated: CUDA out of memory"))
    with no_fallback_warning(), pytest.raises(torch.cuda.OutOfMemoryError, match="simulated"):
        _call("grpo_loss", _inputs("grpo_loss"))
    assert "torch" not in fallback_status()["grpo_loss"]


# ------------------------------------------------------------------------------------------------- wrong results


def test_wrong_output_falls_back_and_names_the_mismatch(monkeypatch):
    real = logprobs_module._triton_rows_forward

    def off_by_half(logits, targets, temperature):
        logprobs, lse = real(logits, targets, temperature)
        return logprobs + 0.5, lse

    monkeypatch.setattr(logprobs_module, "_triton_rows_forward", off_by_half)
    inputs = _inputs("token_logprobs")
    with pytest.warns(KernelFallbackWarning) as record:
        out = kernels.token_logprobs(**inputs)
    assert len(record) == 1
    message = str(record[0].message)
    assert "token_logprobs" in message and "disagrees with the PyTorch reference on a self-check input" in message
    assert "output: max |triton - reference| = 0.5," in message
    assert "on a [2, 5, 301] float32 input" in message
    assert "PROUIE_KERNELS=torch" in message
    _assert_equal(out, kernels.token_logprobs(**inputs, backend="torch"))
    assert (out < 0).all()  # the reference's values, not the shifted ones (which exceed 0 for likely targets)


def test_wrong_gradient_alone_is_caught(monkeypatch):
    real = grpo_loss_module._grpo_bwd_kernel

    class DoubledGradient:
        """The real backward kernel, whose gradient output (argument 7) is then doubled."""

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                real[grid](*args, **kwargs)
                args[7].mul_(2.0)

            return launch

    monkeypatch.setattr(grpo_loss_module, "_grpo_bwd_kernel", DoubledGradient())
    inputs = _inputs("grpo_loss")
    with pytest.warns(KernelFallbackWarning) as record:
        loss, _ = kernels.grpo_loss(**inputs)
    assert len(record) == 1
    message = str(record[0].message)
    assert "grpo_loss" in message and "gradient of logprobs: max |triton - reference|" in message
    loss.backward()
    lp = inputs["logprobs"]
    expected = lp.detach().clone().requires_grad_()
    kernels.grpo_loss(**dict(inputs, logprobs=expected), backend="torch")[0].backward()
    assert torch.equal(lp.grad, expected.grad)  # the reference's gradient, not the doubled one


def test_wrong_advantages_fall_back(monkeypatch):
    class Sevens:
        def __getitem__(self, grid):
            return lambda rewards, out, *args, **kwargs: out.fill_(7.0)

    monkeypatch.setattr(advantages_module, "_group_advantages_kernel", Sevens())
    rewards = torch.tensor([1.0, 3.0, 2.0, 2.0], device=DEV)
    with pytest.warns(KernelFallbackWarning, match="group_advantages") as record:
        out = kernels.group_advantages(rewards, 2, eps=0.0)
    error = float(re.search(r"output: max \|triton - reference\| = ([0-9.]+),", str(record[0].message)).group(1))
    assert 7.0 < error < 9.0  # 7 minus the most negative reference advantage of the self-check input
    assert out.tolist() == pytest.approx([-2**-0.5, 2**-0.5, 0.0, 0.0])


# --------------------------------------------------------------------------------------------- turning it off / on


def test_forced_triton_raises_the_simulated_failure(monkeypatch):
    Launches(monkeypatch, RuntimeError("simulated failure"))
    monkeypatch.setenv("PROUIE_KERNELS", "triton")
    with no_fallback_warning(), pytest.raises(RuntimeError, match="simulated failure"):
        kernels.token_logprobs(**_inputs("token_logprobs"))
    monkeypatch.delenv("PROUIE_KERNELS")
    with no_fallback_warning(), pytest.raises(RuntimeError, match="simulated failure"):
        kernels.grpo_loss(**_inputs("grpo_loss"), backend="triton")
    assert fallback_status() == {}


def test_prouie_kernels_torch_never_tries_triton(monkeypatch):
    launches = Launches(monkeypatch, RuntimeError("simulated failure"))
    monkeypatch.setenv("PROUIE_KERNELS", "torch")
    for name in KERNELS:
        inputs = _inputs(name)
        _assert_equal(_no_warnings(lambda: _call(name, inputs)), _call(name, inputs, backend="torch"))
    assert launches.count == 0 and fallback_status() == {}


def test_real_kernels_pass_their_self_checks_once(monkeypatch):
    launches = Launches(monkeypatch)
    for name in KERNELS:
        inputs = _inputs(name)
        out = _no_warnings(lambda: _call(name, inputs))
        _assert_equal(out, _call(name, inputs, backend="triton"))
    assert fallback_status() == {name: "triton" for name in KERNELS}
    # Later calls skip the self-check: token_logprobs' forward is then a single launch.
    before = launches.count
    kernels.token_logprobs(**_inputs("token_logprobs"))
    assert launches.count == before + 1


def test_reset_makes_the_guard_try_triton_again(monkeypatch):
    launches = Launches(monkeypatch, RuntimeError("simulated failure"))
    with pytest.warns(KernelFallbackWarning):
        kernels.group_advantages(torch.rand(4, device=DEV), 2)
    assert launches.count == 1
    launches.error = None  # the cause is gone (say, a fixed driver); a reset lets the guard check again
    fallback.reset_kernel_guard()
    _no_warnings(lambda: kernels.group_advantages(torch.rand(4, device=DEV), 2))
    assert fallback_status() == {"group_advantages": "triton"}
    assert launches.count == 1 + 2  # the failed launch, then the self-check's Triton run and the real call
