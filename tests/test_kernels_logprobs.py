"""token_logprobs and linear_token_logprobs: Triton (interpreter on CPU) vs reference vs float64 truth."""

import math

import pytest
import torch
from _markers import KERNEL_DEVICE, requires_triton
from _kernel_truths import GRAD_TOL, LINEAR_TOL, OUTPUT_TOL, assert_close, truth_token_logprobs

from prouie_pl.kernels import linear_token_logprobs, reference, token_logprobs
from prouie_pl.kernels.reference import IGNORE_INDEX

DEV = KERNEL_DEVICE


def _id(value):
    """Readable test ids: float32 / bfloat16 instead of dtype0 / dtype1."""
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else None


def _targets(shape, vocab, generator, n_ignored=2):
    targets = torch.randint(0, vocab, shape, generator=generator)
    flat = targets.view(-1)
    flat[:: max(1, flat.numel() // n_ignored)][:n_ignored] = IGNORE_INDEX  # a couple of ignored positions
    flat[-1] = vocab - 1  # the last vocabulary entry lives in the remainder block
    return targets


# ---------------------------------------------------------------------------------------------------------- token


@requires_triton
@pytest.mark.parametrize(
    "dtype,shape,temperature",
    [
        (torch.float32, (37, 1003), 1.0),
        (torch.float32, (3, 11, 997), 0.7),
        (torch.bfloat16, (37, 1003), 1.0),
        (torch.bfloat16, (3, 11, 997), 1.3),
        (torch.float16, (29, 1003), 0.7),
    ],
    ids=_id,
)
def test_token_logprobs_triton_matches_reference_and_float64(dtype, shape, temperature):
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(shape, generator=gen)).to(dtype)  # the bf16/fp16-rounded values are the inputs
    targets = _targets(shape[:-1], shape[-1], gen)
    upstream = torch.randn(shape[:-1], generator=gen)  # a non-uniform upstream gradient catches per-row scale bugs
    results = {}
    for backend in ("triton", "torch"):
        x = logits.clone().to(DEV).requires_grad_()
        out = token_logprobs(x, targets.to(DEV), temperature, backend=backend)
        (out * upstream.to(DEV)).sum().backward()
        assert out.dtype == torch.float32 and out.shape == shape[:-1]
        assert x.grad.dtype == dtype
        results[backend] = (out, x.grad)

    x64 = logits.double().requires_grad_()
    truth = truth_token_logprobs(x64, targets, temperature)
    (truth * upstream.double()).sum().backward()

    assert_close(results["triton"][0], results["torch"][0], OUTPUT_TOL, "triton vs reference logprobs")
    assert_close(results["triton"][0], truth, OUTPUT_TOL, "triton vs float64 logprobs")
    assert_close(results["torch"][0], truth, OUTPUT_TOL, "reference vs float64 logprobs")
    assert_close(results["triton"][1], results["torch"][1], GRAD_TOL[dtype], "triton vs reference grad")
    assert_close(results["triton"][1], x64.grad, GRAD_TOL[dtype], "triton vs float64 grad")
    assert_close(results["torch"][1], x64.grad, GRAD_TOL[dtype], "reference vs float64 grad")


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=requires_triton), "torch"])
def test_ignore_index_gives_zero_logprob_and_zero_gradient(backend):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 1003, generator=gen, device="cpu").to(DEV).requires_grad_()
    targets = torch.tensor([5, IGNORE_INDEX, 1002, IGNORE_INDEX, 0, 17], device=DEV)
    out = token_logprobs(logits, targets, backend=backend)
    out.sum().backward()
    ignored = targets == IGNORE_INDEX
    assert torch.equal(out[ignored], torch.zeros(2, device=DEV))
    assert torch.equal(logits.grad[ignored], torch.zeros(2, 1003, device=DEV))
    assert (out[~ignored] < 0).all()
    assert (logits.grad[~ignored].abs().sum(dim=1) > 0).all()


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=requires_triton), "torch"])
def test_temperature_divides_the_logits(backend):
    gen = torch.Generator().manual_seed(2)
    logits = (2 * torch.randn(9, 997, generator=gen)).to(DEV)
    targets = torch.randint(0, 997, (9,), generator=gen).to(DEV)
    hot = token_logprobs(logits, targets, temperature=2.5, backend=backend)
    assert_close(hot, token_logprobs(logits / 2.5, targets, backend=backend), OUTPUT_TOL, "T=2.5 vs pre-divided")
    assert_close(hot, truth_token_logprobs(logits.cpu(), targets.cpu(), 2.5), OUTPUT_TOL, "T=2.5 vs float64")
    cold = token_logprobs(logits, targets, temperature=1.0, backend=backend)
    assert not torch.allclose(hot, cold)  # the temperature is actually applied


@requires_triton
def test_triton_handles_sliced_3d_logits():
    """logits[:, :-1] (the shift of causal-LM logits) cannot be viewed as rows: the kernel takes the strides."""
    gen = torch.Generator().manual_seed(8)
    full = torch.randn(3, 12, 997, generator=gen).to(torch.bfloat16).to(DEV).requires_grad_()
    targets = torch.randint(0, 997, (3, 11), generator=gen).to(DEV)
    sliced = full[:, :-1]
    assert not sliced.is_contiguous()
    out = token_logprobs(sliced, targets, backend="triton")
    out.sum().backward()
    full64 = full.detach().double().requires_grad_()
    truth = truth_token_logprobs(full64[:, :-1], targets)
    truth.sum().backward()
    assert_close(out, truth, OUTPUT_TOL, "sliced logprobs")
    assert_close(full.grad, full64.grad, GRAD_TOL[torch.bfloat16], "sliced grad")
    assert torch.equal(full.grad[:, -1].cpu(), torch.zeros(3, 997, dtype=torch.bfloat16))


@requires_triton
def test_triton_handles_minus_infinity_logits():
    """A row whose first vocabulary block is all -inf (masked tokens) must not turn into NaN."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 1003, generator=gen)
    logits[0, :300] = float("-inf")  # beyond the first block: the running max starts at -inf
    logits[1, 500:] = float("-inf")
    targets = torch.tensor([400, 10, 999, IGNORE_INDEX])
    x = logits.to(DEV).requires_grad_()
    out = token_logprobs(x, targets.to(DEV), backend="triton")
    out.sum().backward()
    expected = truth_token_logprobs(logits, targets)
    assert_close(out, expected, OUTPUT_TOL, "logprobs with -inf logits")
    assert torch.isfinite(x.grad).all()
    assert torch.equal(x.grad[0, :300].cpu(), torch.zeros(300))


def test_token_logprobs_reference_gradcheck_float64():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[0, 6, IGNORE_INDEX], [3, 3, 1]])
    assert torch.autograd.gradcheck(lambda x: reference.token_logprobs(x, targets, 0.8), (logits,))


def test_token_logprobs_rejects_bad_arguments():
    logits = torch.randn(4, 10)
    with pytest.raises(ValueError, match="targets has shape"):
        token_logprobs(logits, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        token_logprobs(logits, torch.zeros(4))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(logits, torch.zeros(4, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="logits must be"):
        token_logprobs(torch.randn(10), torch.zeros((), dtype=torch.long))


# --------------------------------------------------------------------------------------------------------- linear


def _truth_linear(hidden, weight, bias, targets, temperature, round_logits_to=None):
    """float64 log_softmax(hidden @ W.T + b); the logits are rounded like the kernel's input-dtype matmul output."""
    logits = hidden.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    if round_logits_to is not None:  # straight-through rounding: same value as the bf16 matmul, float64 gradient
        logits = logits + (logits.to(round_logits_to).double() - logits).detach()
    return truth_token_logprobs(logits, targets, temperature)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("frozen_head", [False, True], ids=["trainable_head", "frozen_head"])
def test_linear_token_logprobs_triton_matches_reference_and_float64(dtype, with_bias, frozen_head):
    gen = torch.Generator().manual_seed(5)
    batch, seq, width, vocab = 2, 13, 24, 997
    hidden = torch.randn(batch, seq, width, generator=gen).to(dtype)
    weight = (0.3 * torch.randn(vocab, width, generator=gen)).to(dtype)
    bias = (0.5 * torch.randn(vocab, generator=gen)).to(dtype) if with_bias else None
    targets = _targets((batch, seq), vocab, gen)
    upstream = torch.randn(batch, seq, generator=gen)
    temperature = 0.9

    def run(backend, chunk_size):
        h = hidden.clone().to(DEV).requires_grad_()
        w = weight.clone().to(DEV).requires_grad_(not frozen_head)
        b = bias.clone().to(DEV).requires_grad_(not frozen_head) if with_bias else None
        out = linear_token_logprobs(h, w, targets.to(DEV), b, temperature, backend=backend, chunk_size=chunk_size)
        (out * upstream.to(DEV)).sum().backward()
        assert out.dtype == torch.float32 and out.shape == (batch, seq)
        if frozen_head:
            assert w.grad is None and (b is None or b.grad is None)
        return out, h.grad, w.grad, None if b is None else b.grad

    tri = run("triton", 7)  # 26 rows in chunks of 7: the last chunk is partial
    ref = run("torch", None)

    h64 = hidden.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    b64 = bias.double().requires_grad_() if with_bias else None
    rounding = None if dtype == torch.float32 else dtype
    truth = _truth_linear(h64, w64, b64, targets, temperature, rounding)
    (truth * upstream.double()).sum().backward()

    tol = LINEAR_TOL[dtype]
    assert_close(tri[0], ref[0], OUTPUT_TOL, "triton vs reference logprobs")
    assert_close(tri[0], truth, tol, "triton vs float64 logprobs")
    names = ("grad hidden", "grad weight", "grad bias")
    truths = (h64.grad, w64.grad, None if b64 is None else b64.grad)
    for name, t_grad, r_grad, truth_grad in zip(names, tri[1:], ref[1:], truths):
        if t_grad is None:
            assert r_grad is None
            continue
        assert t_grad.dtype == dtype
        assert_close(t_grad, r_grad, GRAD_TOL[dtype], f"triton vs reference {name}")
        assert_close(t_grad, truth_grad, tol, f"triton vs float64 {name}")
        assert_close(r_grad, truth_grad, tol, f"reference vs float64 {name}")


@pytest.mark.parametrize("frozen_head", [False, True], ids=["trainable_head", "frozen_head"])
def test_frozen_head_skips_the_weight_gradient_and_the_recomputation(monkeypatch, frozen_head):
    counts = {"weight_grad": 0, "logits": 0, "row_backward": 0}
    accumulate, chunk_logits = reference._accumulate_weight_grad, reference._chunk_logits
    row_ops = reference.TORCH_ROW_OPS

    def counted(name, fn):
        def wrapper(*args):
            counts[name] += 1
            return fn(*args)
        return wrapper

    monkeypatch.setattr(reference, "_accumulate_weight_grad", counted("weight_grad", accumulate))
    monkeypatch.setattr(reference, "_chunk_logits", counted("logits", chunk_logits))
    monkeypatch.setattr(reference, "TORCH_ROW_OPS",
                        reference.RowOps(row_ops.forward, counted("row_backward", row_ops.backward)))
    hidden = torch.randn(20, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=not frozen_head)
    targets = torch.randint(0, 50, (20,))
    n_chunks = 4  # ceil(20 / 6)

    with torch.no_grad():  # scoring without gradients: one matmul per chunk and nothing else
        linear_token_logprobs(hidden, weight, targets, backend="torch", chunk_size=6)
    assert counts == {"weight_grad": 0, "logits": n_chunks, "row_backward": 0}

    out = linear_token_logprobs(hidden, weight, targets, backend="torch", chunk_size=6)
    after_forward = dict(counts)
    out.sum().backward()
    assert (weight.grad is None) == frozen_head
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
    if frozen_head:  # the input gradient is prepared in forward; backward recomputes nothing
        assert after_forward == {"weight_grad": 0, "logits": 2 * n_chunks, "row_backward": n_chunks}
        assert counts == after_forward
    else:  # forward saves only lse; backward recomputes every chunk and accumulates the weight gradient
        assert after_forward == {"weight_grad": 0, "logits": 2 * n_chunks, "row_backward": 0}
        assert counts == {"weight_grad": n_chunks, "logits": 3 * n_chunks, "row_backward": n_chunks}


@pytest.mark.parametrize("frozen_head", [False, True], ids=["trainable_head", "frozen_head"])
def test_linear_reference_gradcheck_float64(frozen_head):
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 3, generator=gen, dtype=torch.float64, requires_grad=not frozen_head)
    bias = torch.randn(7, generator=gen, dtype=torch.float64, requires_grad=not frozen_head)
    targets = torch.tensor([0, 6, IGNORE_INDEX, 3, 3])
    fn = lambda h, w, b: reference.linear_token_logprobs(h, w, targets, b, temperature=0.8, chunk_size=2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_chunked_reference_equals_naive_at_a_large_shape():
    gen = torch.Generator().manual_seed(7)
    rows, width, vocab = 2048, 64, 32000
    hidden = torch.randn(rows, width, generator=gen, requires_grad=True)
    weight = (0.2 * torch.randn(vocab, width, generator=gen)).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    upstream = torch.rand(rows, generator=gen)

    out = linear_token_logprobs(hidden, weight, targets, backend="torch", chunk_size=300)
    grads = torch.autograd.grad((out * upstream).sum(), (hidden, weight))
    naive = torch.log_softmax(hidden @ weight.t(), dim=-1).gather(1, targets[:, None]).squeeze(1)
    naive_grads = torch.autograd.grad((naive * upstream).sum(), (hidden, weight))

    assert_close(out, naive, 1e-5, "chunked vs naive logprobs")
    assert_close(grads[0], naive_grads[0], 1e-4, "chunked vs naive grad hidden")
    assert_close(grads[1], naive_grads[1], 1e-4, "chunked vs naive grad weight")


def test_default_chunk_rows_rule():
    assert reference.default_chunk_rows(48, 997) == 6  # ceil(48 / 8)
    assert reference.default_chunk_rows(1, 10) == 1
    for rows, vocab in [(2048, 32000), (4096, 151936), (16384, 128256), (1000, 1003)]:
        chunk = reference.default_chunk_rows(rows, vocab)
        assert 1 <= chunk <= math.ceil(rows / 8)
        assert chunk * vocab * 4 <= reference.CHUNK_BUDGET_BYTES
    assert reference.default_chunk_rows(2048, 32000) == 256  # an eighth of the rows
    assert reference.default_chunk_rows(16384, 128256) == 512  # limited by the memory budget, multiple of 16
    # on a CPU the budget is smaller: 64 rows of a 262k vocabulary (Gemma 3) instead of 256
    assert reference.default_chunk_rows(3072, 262144, reference.CPU_CHUNK_BUDGET_BYTES) == 64
    assert reference.default_chunk_rows(3072, 262144) == 256


def test_cpu_tensors_are_chunked_under_the_cpu_budget(monkeypatch):
    seen = []
    chunk_logits = reference._chunk_logits

    def recorded(hidden, weight, bias):
        seen.append(hidden.shape[0])
        return chunk_logits(hidden, weight, bias)

    monkeypatch.setattr(reference, "_chunk_logits", recorded)
    monkeypatch.setattr(reference, "CPU_CHUNK_BUDGET_BYTES", 3 * 50 * 4)  # three rows of 50 float32 logits
    gen = torch.Generator().manual_seed(8)
    hidden, weight = torch.randn(40, 8, generator=gen), torch.randn(50, 8, generator=gen)
    targets = torch.randint(0, 50, (40,), generator=gen)
    with torch.no_grad():
        out = linear_token_logprobs(hidden, weight, targets, backend="torch")
    assert seen == [3] * 13 + [1]
    naive = torch.log_softmax(hidden @ weight.t(), dim=-1).gather(1, targets[:, None]).squeeze(1)
    assert_close(out, naive, 1e-5, "chunked vs naive logprobs")


def test_linear_token_logprobs_rejects_bad_arguments():
    hidden, weight = torch.randn(4, 8), torch.randn(10, 8)
    targets = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="must be"):
        linear_token_logprobs(hidden, torch.randn(10, 9), targets)
    with pytest.raises(ValueError, match="bias"):
        linear_token_logprobs(hidden, weight, targets, bias=torch.randn(9))
    with pytest.raises(ValueError, match="chunk_size"):
        linear_token_logprobs(hidden, weight, targets, chunk_size=0)
    with pytest.raises(ValueError, match="targets has shape"):
        linear_token_logprobs(hidden, weight, targets[:3])
