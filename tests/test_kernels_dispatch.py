"""Backend selection: auto, the PROUIE_KERNELS override, invalid names, missing interpreter, missing Triton."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _markers import KERNEL_DEVICE, requires_cuda, requires_triton, triton_available

import prouie_pl.kernels as kernels
from prouie_pl.kernels import fallback
from prouie_pl.kernels import logprobs as logprobs_module
from prouie_pl.kernels import reference, resolve_backend

REPO_ROOT = Path(__file__).resolve().parents[1]


def _calls(backend):
    """One small call of every public kernel function with the given backend."""
    logits = torch.randn(3, 11)
    targets = torch.randint(0, 11, (3,))
    lp = torch.randn(2, 4)
    return [
        lambda: kernels.token_logprobs(logits, targets, backend=backend),
        lambda: kernels.linear_token_logprobs(torch.randn(3, 5), torch.randn(11, 5), targets, backend=backend),
        lambda: kernels.group_advantages(torch.randn(4), 2, backend=backend),
        lambda: kernels.stepwise_advantages(torch.randn(2, 2), torch.zeros(2, 2, dtype=torch.long),
                                            torch.ones(2, 2, dtype=torch.bool), 2, 3, backend=backend),
        lambda: kernels.grpo_loss(lp, None, None, torch.randn(2), torch.ones(2, 4), backend=backend),
    ]


def test_auto_picks_torch_on_cpu_and_triton_on_cuda(monkeypatch):
    monkeypatch.delenv("PROUIE_KERNELS", raising=False)
    assert resolve_backend("auto", "cpu") == "torch"
    if triton_available():
        assert resolve_backend("auto", torch.device("cuda")) == "triton"


def test_environment_override(monkeypatch):
    monkeypatch.setenv("PROUIE_KERNELS", "torch")
    assert resolve_backend("auto", "cuda") == "torch"
    assert resolve_backend("torch", "cpu") == "torch"
    if triton_available():
        assert resolve_backend("triton", "cuda") == "triton"  # an explicit backend beats the environment
    monkeypatch.setenv("PROUIE_KERNELS", "cuda")
    with pytest.raises(ValueError, match="PROUIE_KERNELS"):
        resolve_backend("auto", "cpu")


def test_auto_on_cpu_never_launches_triton(monkeypatch):
    monkeypatch.delenv("PROUIE_KERNELS", raising=False)

    def boom(*args, **kwargs):
        raise AssertionError("the Triton path ran on CPU tensors with backend='auto'")

    monkeypatch.setattr(logprobs_module.TokenLogprobsFunction, "apply", boom)
    monkeypatch.setattr(logprobs_module, "TRITON_ROW_OPS", reference.RowOps(boom, boom))
    for call in _calls(backend="auto")[:2]:
        assert torch.isfinite(call()).all()


@requires_triton
def test_environment_override_forces_triton_under_auto(monkeypatch):
    monkeypatch.setenv("PROUIE_KERNELS", "triton")

    def no_reference(*args, **kwargs):
        raise AssertionError("the reference ran although PROUIE_KERNELS=triton")

    for name in ("token_logprobs", "group_advantages", "stepwise_advantages", "grpo_loss"):
        monkeypatch.setattr(reference, name, no_reference)
    monkeypatch.setattr(reference, "TORCH_ROW_OPS", reference.RowOps(no_reference, no_reference))
    logits = torch.randn(3, 40, device=KERNEL_DEVICE)
    targets = torch.tensor([1, 2, 39], device=KERNEL_DEVICE)
    expected = torch.log_softmax(logits.double(), -1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(kernels.token_logprobs(logits, targets).double(), expected, atol=1e-5, rtol=0)
    hidden, weight = torch.randn(3, 5, device=KERNEL_DEVICE), torch.randn(40, 5, device=KERNEL_DEVICE)
    expected = torch.log_softmax(hidden.double() @ weight.double().t(), -1).gather(1, targets[:, None]).squeeze(1)
    out = kernels.linear_token_logprobs(hidden, weight, targets)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)
    assert kernels.group_advantages(torch.tensor([1.0, 3.0], device=KERNEL_DEVICE), 2).tolist() == pytest.approx(
        [-1 / (2**0.5 + 1e-4), 1 / (2**0.5 + 1e-4)]
    )


@pytest.mark.parametrize("index", range(5))
def test_invalid_backend_name_is_a_value_error(index):
    with pytest.raises(ValueError, match="'auto', 'triton', 'torch'"):
        _calls(backend="cuda")[index]()


@pytest.mark.skipif(not triton_available(), reason="needs an importable triton")
@pytest.mark.parametrize("index", range(5))
def test_triton_on_cpu_without_interpreter_says_what_to_do(monkeypatch, index):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _calls(backend="triton")[index]()


def test_import_without_triton_keeps_the_reference_path():
    script = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        sys.modules["triton.language"] = None
        import torch
        import prouie_pl.kernels as k
        from prouie_pl.kernels._dispatch import triton_available
        assert not triton_available()
        out = k.token_logprobs(torch.zeros(2, 4), torch.tensor([0, 3]))
        assert torch.allclose(out, torch.full((2,), -1.3862944)), out
        try:
            k.token_logprobs(torch.zeros(2, 4), torch.tensor([0, 3]), backend="triton")
        except RuntimeError as exc:
            assert "cannot be imported" in str(exc), exc
        else:
            raise AssertionError("backend='triton' without triton did not raise")
        print("ok")
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@requires_cuda
def test_auto_on_cuda_runs_triton_and_matches_the_reference(monkeypatch):
    monkeypatch.delenv("PROUIE_KERNELS", raising=False)
    fallback.reset_kernel_guard()
    logits = torch.randn(64, 32003, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, 32003, (64,), device="cuda")
    expected = reference.token_logprobs(logits, targets)
    # The first auto call on CUDA runs the fallback guard's self-check, which calls the reference once.
    kernels.token_logprobs(logits[:2], targets[:2])
    assert kernels.fallback_status()["token_logprobs"] == "triton"
    monkeypatch.setattr(reference, "token_logprobs", lambda *a: pytest.fail("auto used the reference on CUDA"))
    torch.testing.assert_close(kernels.token_logprobs(logits, targets), expected, atol=1e-4, rtol=0)
    fallback.reset_kernel_guard()
