"""The GPU check: kernels against their references and float64, kernel benchmarks, SFT and GRPO steps, in one run.

    python bench/gpu_check.py --out bench/results/gpu_check    # a CUDA GPU: about 5 minutes on an H200 (cap 8)
    python bench/gpu_check.py --dry --out /tmp/gpu_check        # a CPU: the same code paths, tiny shapes, < 60 s

Everything goes to one folder (``--out``, default ``bench/results/gpu_check/``):

* ``kernel_checks.md``: every public kernel with ``backend="triton"`` against ``backend="torch"`` and against a
  float64 truth (``tests/_kernel_truths.py``, with its per-dtype tolerances), for the output and every input
  gradient, in float32 and bfloat16, over odd shapes (vocabularies that are not powers of two, up to Qwen2.5's
  151,936; row counts that are not multiples of the block; partial LM-head chunks; every GRPO aggregation).
  Errors are ``max |actual - expected| / max |expected|``, the criterion of ``assert_close`` there.
* ``kernels_cuda.md``: ``bench/kernel_speed.py --device cuda`` (its H200 shapes), run as a subprocess.
* ``train_steps.md``: SFT steps through ``prouie_pl.sft.SFTModule`` and GRPO steps through
  ``prouie_pl.grpo.GRPOModule`` (Lightning ``Trainer``, ``bf16-mixed``, bf16 base weights, LoRA r=16 on every
  linear layer) on a randomly initialised model with Qwen2.5-0.5B's architecture (Qwen2, hidden 896, 24 layers,
  14 heads, 2 KV heads, intermediate 4864, vocabulary 151,936, tied embeddings, rope theta 1e6, RMS eps 1e-6),
  with the time and peak CUDA memory of every step. The tokenizer is the project's offline one
  (``prouie_pl.tiny_model.train_tokenizer`` on the demo data); the model's vocabulary stays 151,936, so the LM
  head, the logits and the log-probability kernels have their real size. The data are the bundled demo data.
  The kernels run with ``backend="auto"``, i.e. Triton behind the first-use guard; a kernel that fell back to
  its reference is reported.
* ``summary.json``: every figure above, the machine, the kernel backends used by the steps, and ``ok``.

The exit status is 0 when every kernel check passed, the benchmark ran without a failed row, both training
steps ran with finite losses and no kernel fell back; 1 otherwise (the files are written either way).

``--dry`` runs every part that does not need CUDA on the CPU: the kernel checks on tiny shapes under the Triton
interpreter, ``bench/kernel_speed.py --smoke`` (tiny shapes, Triton variants interpreted), and two measured steps of
each module on a tiny model of the same architecture, whose kernel calls also go through the guard and the
interpreter. Torch runs on one thread there. Memory figures are the process's peak resident set size per step.

What the GPU machine needs: torch with CUDA, triton, lightning, transformers and peft, and what those install
themselves (tokenizers, safetensors, huggingface_hub, pyyaml, numpy). Nothing is downloaded: no model hub, no
data set. Not needed: bitsandbytes (the steps use plain AdamW), jsonargparse (no CLI), datasets, matplotlib,
rich (imported only by code these steps do not run), pytest and hypothesis (the checks run here, not through the
test suite; ``python -m pytest -q tests/test_kernels_*.py`` runs the kernel tests on a GPU where pytest and
hypothesis are installed). ``liger_kernel``, when importable, adds a comparison row to ``kernels_cuda.md``.
A missing package is named at start; to bring one to a machine without internet, ``pip download PKG --no-deps
-d wheels/`` elsewhere, put ``wheels/`` in the working tree (it travels capped at 64 MiB, so a few pure-Python
wheels, not torch) and ``pip install --no-index --find-links wheels PKG`` before the check.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
# load bench/kernel_speed.py by its path, and keep bench/ off sys.path so no script there can shadow a package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
for _path in (REPO, REPO / "tests"):  # the package, and tests/_kernel_truths.py
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

DEFAULT_OUT = REPO / "bench" / "results" / "gpu_check"
REQUIRED = ["torch", "triton", "lightning", "transformers", "peft", "tokenizers", "safetensors", "yaml", "numpy"]

# Qwen2.5-0.5B's architecture (its config.json); the dry run keeps the class and the proportions, not the size.
QWEN25_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
                  rms_norm_eps=1e-6, max_position_embeddings=32768, hidden_act="silu")
DRY_MODEL = dict(QWEN25_05B, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 vocab_size=1536, max_position_embeddings=4096)
# At most this many tokens (the demo data give about 1,100). The model's ids beyond the tokenizer's are never
# encoded; sampled ones decode to nothing, as unused vocabulary slots of real checkpoints do.
TOKENIZER_VOCAB = 2000


@dataclass
class Sizes:
    """Everything that differs between the GPU run and the dry run."""

    device: str
    token_shapes: list  # (logits shape, temperature)
    linear_shapes: list  # (batch, seq, width, vocab, bias, frozen head, chunk size)
    group_shapes: list  # (groups, group size, scale)
    stepwise_shapes: list  # (batch, group size, steps, seq_len)
    grpo_shapes: list  # (batch, seq_len, loss type, with old log-probs, beta, per-token advantages)
    model: dict
    sft_batch: int
    sft_steps: tuple[int, int]  # (untimed warm-up steps, measured steps)
    grpo_prompts: int
    grpo_generations: int
    grpo_new_tokens: int
    grpo_micro_batch: int
    grpo_steps: tuple[int, int]
    bench_args: list = field(default_factory=list)


GPU_SIZES = Sizes(
    device="cuda",
    token_shapes=[((5, 123, 123), 1.0), ((37, 32003), 0.7), ((3, 17, 151936), 1.0)],
    linear_shapes=[(5, 123, 64, 1003, True, False, 97), (2, 61, 896, 151936, False, True, None)],
    group_shapes=[(13, 7, "group"), (5, 16, "batch"), (3, 5, "none")],
    stepwise_shapes=[(6, 3, 5, 123), (64, 8, 17, 1023)],
    grpo_shapes=[(5, 123, "grpo", True, 0.04, False), (64, 1023, "dapo", True, 0.0, True),
                 (7, 301, "dr_grpo", False, 0.04, False), (16, 517, "bnpo", True, 0.1, False)],
    model=QWEN25_05B,
    sft_batch=8, sft_steps=(2, 5),
    grpo_prompts=4, grpo_generations=8, grpo_new_tokens=128, grpo_micro_batch=8, grpo_steps=(1, 3),
    bench_args=["--device", "cuda", "--repeats", "10"],
)
DRY_SIZES = Sizes(
    device="cpu",
    token_shapes=[((2, 5, 123), 1.0), ((7, 301), 0.7)],
    linear_shapes=[(2, 5, 16, 123, True, False, 3), (1, 9, 16, 301, False, True, None)],
    group_shapes=[(3, 7, "group"), (2, 5, "batch"), (3, 5, "none")],
    stepwise_shapes=[(6, 3, 4, 19)],
    grpo_shapes=[(3, 19, "grpo", True, 0.04, False), (4, 23, "dapo", True, 0.0, True),
                 (3, 17, "dr_grpo", False, 0.04, False), (2, 11, "bnpo", True, 0.1, False)],
    model=DRY_MODEL,
    sft_batch=4, sft_steps=(1, 2),
    grpo_prompts=2, grpo_generations=2, grpo_new_tokens=8, grpo_micro_batch=2, grpo_steps=(1, 2),
    bench_args=["--device", "cpu", "--smoke", "--threads", "1", "--repeats", "1", "--warmup", "0"],
)
DTYPES = ("float32", "bfloat16")


# ------------------------------------------------------------------------------------------------ kernel checks


@dataclass
class CheckRow:
    kernel: str
    dtype: str
    shape: str
    quantity: str
    vs_reference: float  # max |triton - reference| / max |reference|
    vs_float64: float  # max |triton - float64 truth| / max |truth|
    tol_reference: float
    tol_float64: float
    passed: bool
    error: str = ""


def _relative_error(actual, expected) -> float:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if actual.shape != expected.shape:
        return math.inf
    if not expected.numel():
        return 0.0
    scale = float(expected.abs().max()) or 1.0
    return float((actual - expected).abs().max()) / scale


class _Checker:
    """Builds the rows of one kernel case: triton output vs the reference's and vs the float64 truth."""

    def __init__(self, kernel: str, dtype, shape: str):
        self.kernel, self.dtype, self.shape = kernel, str(dtype).removeprefix("torch."), shape
        self.rows: list[CheckRow] = []

    def compare(self, quantity: str, triton, reference, truth, tol_reference: float, tol_float64: float) -> None:
        vs_ref, vs_f64 = _relative_error(triton, reference), _relative_error(triton, truth)
        finite = math.isfinite(vs_ref) and math.isfinite(vs_f64)
        passed = finite and vs_ref <= tol_reference and vs_f64 <= tol_float64
        self.rows.append(CheckRow(self.kernel, self.dtype, self.shape, quantity, vs_ref, vs_f64, tol_reference,
                                  tol_float64, passed, "" if finite else "non-finite values or wrong shape"))


def _leaf(t, dev, dtype=None):
    """A fresh leaf copy of ``t`` on ``dev`` that records its gradient (``.to`` alone may return ``t`` itself)."""
    return t.detach().to(dev, dtype, copy=True).requires_grad_()


def _targets(shape, vocab: int, gen):
    import torch

    from prouie_pl.kernels.reference import IGNORE_INDEX

    targets = torch.randint(0, vocab, shape, generator=gen)
    flat = targets.view(-1)
    flat[::7] = IGNORE_INDEX  # ignored positions
    flat[-1] = vocab - 1  # the last vocabulary entry lives in the remainder block
    return targets


def check_token_logprobs(dev, dtype, truths, shape, temperature) -> list[CheckRow]:
    import torch

    from prouie_pl.kernels import token_logprobs

    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(shape, generator=gen)).to(dtype)  # the rounded values are everyone's inputs
    targets = _targets(shape[:-1], shape[-1], gen).to(dev)
    upstream = torch.randn(shape[:-1], generator=gen).to(dev)  # non-uniform: per-row scale bugs cannot hide
    got = {}
    for backend in ("triton", "torch"):
        x = _leaf(logits, dev)
        out = token_logprobs(x, targets, temperature, backend=backend)
        (out * upstream).sum().backward()
        got[backend] = (out, x.grad)
    x64 = _leaf(logits, dev, torch.float64)
    truth = truths.truth_token_logprobs(x64, targets, temperature)
    (truth * upstream.double()).sum().backward()
    check = _Checker("token_logprobs", dtype, f"{list(shape)}, T={temperature}")
    check.compare("output", got["triton"][0], got["torch"][0], truth, truths.OUTPUT_TOL, truths.OUTPUT_TOL)
    check.compare("grad logits", got["triton"][1], got["torch"][1], x64.grad, truths.GRAD_TOL[dtype],
                  truths.GRAD_TOL[dtype])
    return check.rows


def check_linear_token_logprobs(dev, dtype, truths, batch, seq, width, vocab, with_bias, frozen, chunk):
    import torch

    from prouie_pl.kernels import linear_token_logprobs

    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(batch, seq, width, generator=gen).to(dtype)
    weight = (2 * width**-0.5 * torch.randn(vocab, width, generator=gen)).to(dtype)
    bias = (0.5 * torch.randn(vocab, generator=gen)).to(dtype) if with_bias else None
    targets = _targets((batch, seq), vocab, gen).to(dev)
    upstream = torch.randn(batch, seq, generator=gen).to(dev)

    def leaves(kind):
        to = torch.float64 if kind == "float64" else None
        h = _leaf(hidden, dev, to)
        w = _leaf(weight, dev, to).requires_grad_(not frozen)
        b = _leaf(bias, dev, to).requires_grad_(not frozen) if with_bias else None
        return h, w, b

    got = {}
    for backend in ("triton", "torch"):
        h, w, b = leaves(backend)
        out = linear_token_logprobs(h, w, targets, b, 0.9, backend=backend, chunk_size=chunk)
        (out * upstream).sum().backward()
        got[backend] = (out, h.grad, w.grad, None if b is None else b.grad)
    h64, w64, b64 = leaves("float64")
    logits = h64 @ w64.t() + (b64 if b64 is not None else 0.0)
    if dtype != torch.float32:  # the kernel's matmul rounds the logits to the input dtype: the truth does too
        logits = logits + (logits.to(dtype).double() - logits).detach()
    truth = truths.truth_token_logprobs(logits, targets, 0.9)
    (truth * upstream.double()).sum().backward()
    check = _Checker("linear_token_logprobs", dtype,
                     f"[{batch}, {seq}, {width}] x [{vocab}, {width}]{' + bias' if with_bias else ''}, "
                     f"{'frozen' if frozen else 'trainable'} head, chunk {chunk or 'default'}")
    tol = truths.LINEAR_TOL[dtype]
    check.compare("output", got["triton"][0], got["torch"][0], truth, truths.OUTPUT_TOL, tol)
    truth_grads = (h64.grad, w64.grad, None if b64 is None else b64.grad)
    for i, quantity in enumerate(("grad hidden", "grad weight", "grad bias")):
        if got["torch"][i + 1] is not None:
            check.compare(quantity, got["triton"][i + 1], got["torch"][i + 1], truth_grads[i],
                          truths.GRAD_TOL[dtype], tol)
    return check.rows


def _truth_group_advantages(rewards, group_size: int, scale: str, eps: float):
    """float64, one group at a time: (r - mean) / (std + eps), unbiased std; a group of equal rewards gives 0."""
    import torch

    r = rewards.double().view(-1, group_size)
    batch_std = r.reshape(-1).std()
    out = torch.zeros_like(r)
    for g, row in enumerate(r):
        if row.max() != row.min():
            out[g] = (row - row.mean()) / {"group": row.std() + eps, "batch": batch_std + eps, "none": 1.0}[scale]
    return out.reshape(-1)


def check_group_advantages(dev, dtype, truths, groups, group_size, scale):
    import torch

    from prouie_pl.kernels import group_advantages

    gen = torch.Generator().manual_seed(2)
    rewards = torch.rand(groups * group_size, generator=gen).to(dtype)
    rewards[:group_size] = 0.5  # one group without spread
    tri = group_advantages(rewards.to(dev), group_size, scale, backend="triton")
    ref = group_advantages(rewards.to(dev), group_size, scale, backend="torch")
    check = _Checker("group_advantages", dtype, f"{groups} groups of {group_size}, scale={scale}")
    check.compare("output", tri, ref, _truth_group_advantages(rewards, group_size, scale, 1e-4), truths.OUTPUT_TOL,
                  truths.OUTPUT_TOL)
    return check.rows


def check_stepwise_advantages(dev, dtype, truths, batch, group_size, steps, seq_len):
    import torch

    from prouie_pl.kernels import stepwise_advantages

    gen = torch.Generator().manual_seed(3)
    rewards = torch.rand(batch, steps, generator=gen).to(dtype)
    ends = torch.randint(0, seq_len + 5, (batch, steps), generator=gen)  # some past the end: clamped
    mask = torch.rand(batch, steps, generator=gen) > 0.3
    mask[0] = False  # a completion without steps
    on_dev = (rewards.to(dev), ends.to(dev), mask.to(dev), group_size, seq_len)
    tri = stepwise_advantages(*on_dev, backend="triton")
    ref = stepwise_advantages(*on_dev, backend="torch")
    truth = truths.truth_stepwise_advantages(rewards, ends, mask, group_size, seq_len, 1e-4)
    check = _Checker("stepwise_advantages", dtype, f"B={batch}, G={group_size}, S={steps}, T={seq_len}")
    check.compare("output", tri, ref, truth, truths.OUTPUT_TOL, truths.OUTPUT_TOL)
    return check.rows


def check_grpo_loss(dev, dtype, truths, batch, seq_len, loss_type, with_old, beta, per_token_adv):
    import torch

    from prouie_pl.kernels import grpo_loss

    gen = torch.Generator().manual_seed(4)
    lp = (-3 * torch.rand(batch, seq_len, generator=gen)).to(dtype)
    # a spread of 0.3 puts ratios outside the (asymmetric) clip range on both sides
    old = (lp.float() + 0.3 * torch.randn(batch, seq_len, generator=gen)).to(dtype) if with_old else None
    ref_lp = (lp.float() + 0.1 * torch.randn(batch, seq_len, generator=gen)).to(dtype)
    adv = torch.randn(batch, seq_len, generator=gen) if per_token_adv else torch.randn(batch, generator=gen)
    mask = torch.rand(batch, seq_len, generator=gen) > 0.2
    mask[-1] = False  # a sequence without valid tokens
    clip = dict(eps_low=0.2, eps_high=0.28)
    got = {}
    for backend in ("triton", "torch"):
        x = _leaf(lp, dev)
        loss, _ = grpo_loss(x, None if old is None else old.to(dev), ref_lp.to(dev), adv.to(dev), mask.to(dev),
                            beta=beta, loss_type=loss_type, backend=backend, **clip)
        loss.backward()
        got[backend] = (loss, x.grad)
    x64 = _leaf(lp, "cpu", torch.float64)
    truth = truths.truth_grpo_loss(x64, old, ref_lp, adv, mask, clip["eps_low"], clip["eps_high"], beta, loss_type)
    truth.backward()
    check = _Checker("grpo_loss", dtype, f"[{batch}, {seq_len}], {loss_type}, {'old' if with_old else 'on-policy'}, "
                                         f"beta={beta}, advantages [{'B, T' if per_token_adv else 'B'}]")
    check.compare("loss", got["triton"][0], got["torch"][0], truth, truths.OUTPUT_TOL, truths.OUTPUT_TOL)
    check.compare("grad logprobs", got["triton"][1], got["torch"][1], x64.grad, truths.GRAD_TOL[dtype],
                  truths.GRAD_TOL[dtype])
    return check.rows


def kernel_checks(sizes: Sizes) -> list[CheckRow]:
    """Every case of ``sizes`` in float32 and bfloat16; a case that raises is one failed row carrying the error."""
    import torch

    truths = importlib.import_module("_kernel_truths")
    dev = torch.device(sizes.device)
    plan = [(check_token_logprobs, sizes.token_shapes), (check_linear_token_logprobs, sizes.linear_shapes),
            (check_group_advantages, sizes.group_shapes), (check_stepwise_advantages, sizes.stepwise_shapes),
            (check_grpo_loss, sizes.grpo_shapes)]
    rows = []
    for dtype_name in DTYPES:
        dtype = getattr(torch, dtype_name)
        for check, cases in plan:
            for case in cases:
                try:
                    rows += check(dev, dtype, truths, *case)
                except Exception as exc:  # a kernel that does not build or launch is a result, not the end
                    kernel = check.__name__.removeprefix("check_")
                    rows.append(CheckRow(kernel, dtype_name, repr(case), "", math.nan, math.nan, 0.0, 0.0, False,
                                         " ".join(f"{type(exc).__name__}: {exc}".split())[:300]))
    return rows


def kernel_checks_markdown(rows: list[CheckRow], context: str) -> str:
    passed = sum(r.passed for r in rows)
    lines = [
        "# Kernel checks: Triton against the PyTorch reference and a float64 truth", "", context, "",
        "Every public kernel with `backend=\"triton\"`, its output and every input gradient (upstream gradients are "
        "random), against `backend=\"torch\"` and against float64 formulas from `tests/_kernel_truths.py`. "
        "Error: max |triton - expected| / max |expected|; tolerances are the tests' per-dtype ones.", "",
        f"**{passed} of {len(rows)} checks passed.**", "",
        "| kernel | dtype | case | quantity | vs reference | tol | vs float64 | tol | pass |",
        "|---|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        verdict = "yes" if r.passed else f"**NO** {r.error}".strip()
        lines.append(f"| {r.kernel} | {r.dtype} | {r.shape} | {r.quantity} | {r.vs_reference:.2e} | "
                     f"{r.tol_reference:.0e} | {r.vs_float64:.2e} | {r.tol_float64:.0e} | {verdict} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- kernel benchmarks


def run_kernel_bench(sizes: Sizes, out_file: Path, timeout_s: float) -> dict:
    """``bench/kernel_speed.py`` in a subprocess (it starts one process per measurement itself)."""
    cmd = [sys.executable, str(REPO / "bench" / "kernel_speed.py"), *sizes.bench_args, "--out", str(out_file)]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    result = {"command": " ".join(["python bench/kernel_speed.py", *sizes.bench_args]), "timeout_s": round(timeout_s)}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s, cwd=REPO)
        result.update(rc=proc.returncode, timed_out=False,
                      stderr_tail=proc.stderr.strip().splitlines()[-5:] if proc.returncode else [])
    except subprocess.TimeoutExpired:
        result.update(rc=None, timed_out=True, stderr_tail=[])
    result["wall_s"] = time.perf_counter() - t0
    if out_file.is_file():
        rows = [line for line in out_file.read_text().splitlines() if line.startswith("| ") and "---" not in line]
        headers = ("| N x", "| case")
        result["table_rows"] = sum(1 for line in rows if not line.startswith(headers))
        result["failed_rows"] = sum("failed:" in line for line in rows)
    else:  # killed before it wrote its table: say so in the file the reader looks for
        why = f"timed out after {timeout_s:.0f} s" if result["timed_out"] else f"exited with status {result['rc']}"
        out_file.write_text(f"# Kernel benchmarks\n\n`{result['command']}` {why}; no table was written.\n"
                            + "".join(f"\n    {line}" for line in result["stderr_tail"]) + "\n")
        result.update(table_rows=0, failed_rows=0)
    return result


# ------------------------------------------------------------------------------------------------ training steps


def build_model(folder: Path, arch: dict, device: str) -> dict:
    """A randomly initialised bf16 Qwen2 model of ``arch`` and the offline tokenizer, saved in ``folder``."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from prouie_pl.tiny_model import corpus_records, tokenizer_texts, train_tokenizer

    tokenizer = train_tokenizer(tokenizer_texts(corpus_records()), TOKENIZER_VOCAB)
    config = Qwen2Config(**arch, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):  # draw the 0.5B random weights where they are used: quick on a GPU
        model = Qwen2ForCausalLM(config)
    model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, do_sample=False)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": getattr(config, "rope_theta", None)}
    info = {**arch, "parameters": sum(p.numel() for p in model.parameters()), "tokenizer_vocab": len(tokenizer),
            "rope_theta": rope.get("rope_theta")}  # as the config understood it
    del model
    return info


def _bench_kernels_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("prouie_bench_kernels", REPO / "bench" / "kernel_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def meter(cuda: bool):
    """A Lightning callback that times every training step and records its peak memory and what it computed
    (defined here so that importing this script does not import Lightning)."""
    import lightning as L
    import torch

    from prouie_pl.kernels.reference import IGNORE_INDEX

    kernel_bench = _bench_kernels_module()  # its peak-RSS helpers, for the CPU

    class _StepMeter(L.Callback):
        def __init__(self):
            self.steps: list[dict] = []
            self._t0 = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            else:
                kernel_bench._reset_peak_rss()
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - self._t0
            peak = torch.cuda.max_memory_allocated() if cuda else kernel_bench._peak_rss_bytes()
            row = {"step": len(self.steps) + 1, "time_s": seconds, "peak_mib": peak / 2**20}
            stats = getattr(pl_module, "last_step_stats", None)
            if stats:  # GRPO: the module's own timers and the rollout size
                completions = batch["input_ids"].shape[0] * pl_module.rollout_settings.num_generations
                row.update(loss=float(stats["train/loss"]), completions=completions,
                           tokens=stats["train/completion_length"] * completions,
                           **{key.split("/")[1] + "_s": stats[key] for key in
                              ("time/generate", "time/reward", "time/reference", "time/policy")})
            else:  # SFT: the loss Lightning hands back, and the tokens of the batch
                loss = outputs["loss"] if isinstance(outputs, dict) else outputs
                row.update(loss=float(loss), tokens=int(batch["attention_mask"].sum()),
                           answer_tokens=int((batch["labels"] != IGNORE_INDEX).sum()))
            self.steps.append(row)

    return _StepMeter()


def train_steps(kind: str, model_dir: Path, sizes: Sizes) -> dict:
    """``warm-up + measured`` optimizer steps of SFTModule (``sft``) or GRPOModule (``grpo``) on ``model_dir``."""
    import lightning as L
    import torch

    from prouie_pl.datamodules import UIEDataModule
    from prouie_pl.grpo import GRPOModule, RolloutSettings
    from prouie_pl.modeling import BaseModelSettings, LoRASettings
    from prouie_pl.sft import SFTModule
    from prouie_pl.uie_module import GenerationSettings

    cuda = sizes.device == "cuda"
    L.seed_everything(0, verbose=False)
    base = BaseModelSettings(name_or_path=str(model_dir), dtype="bfloat16", attn_implementation="sdpa")
    lora = LoRASettings(r=16, alpha=32, dropout=0.0)
    if kind == "sft":
        warmup, measured = sizes.sft_steps
        module = SFTModule(base=base, lora=lora, learning_rate=1e-4, warmup_ratio=0.0)
        data = UIEDataModule(stage="sa", sample_per_dataset=-(-sizes.sft_batch * (warmup + measured) // 3) + 1,
                             batch_size=sizes.sft_batch, max_val_records=0, seed=0)
        setting = f"batch {sizes.sft_batch} records (demo data, concise format), lr 1e-4"
    else:
        warmup, measured = sizes.grpo_steps
        n_new = sizes.grpo_new_tokens
        module = GRPOModule(
            base=base, lora=lora, generation=GenerationSettings(max_new_tokens=n_new),
            rollout=RolloutSettings(num_generations=sizes.grpo_generations, temperature=1.0, max_new_tokens=n_new),
            advantage="stepwise", beta=0.04, micro_batch_size=sizes.grpo_micro_batch, learning_rate=1e-5,
        )
        data = UIEDataModule(stage="de", sample_per_dataset=-(-sizes.grpo_prompts * (warmup + measured) // 3) + 1,
                             batch_size=sizes.grpo_prompts, max_val_records=0, seed=0)
        # beta > 0: every completion goes through the reference pass and the backward pass, whatever the rewards
        setting = (f"P={sizes.grpo_prompts} prompts x G={sizes.grpo_generations} completions, at most {n_new} new "
                   f"tokens, micro-batch {sizes.grpo_micro_batch}, stepwise advantages, beta 0.04")
    step_meter = meter(cuda)
    trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, precision="bf16-mixed",
                        max_steps=warmup + measured, max_epochs=1000, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, use_distributed_sampler=False, callbacks=[step_meter])
    from prouie_pl.wiring import connect

    connect(module, data, trainer)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=data)
    wall = time.perf_counter() - t0
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    del module, trainer
    if cuda:
        torch.cuda.empty_cache()
    return {"setting": setting, "warmup_steps": warmup, "steps": step_meter.steps[warmup:],
            "warmup": step_meter.steps[:warmup], "fit_wall_s": wall, "trainable_parameters": trainable}


@contextlib.contextmanager
def guard_on_cpu(enabled: bool):
    """Dry run: "auto" picks the interpreted Triton kernels on the CPU, as it picks the compiled ones on a GPU."""
    from prouie_pl.kernels import _dispatch

    saved = _dispatch.AUTO_TRITON_DEVICES
    if enabled:
        _dispatch.AUTO_TRITON_DEVICES = tuple(saved) + ("cpu",)
    try:
        yield
    finally:
        _dispatch.AUTO_TRITON_DEVICES = saved


def steps_markdown(model: dict, results: dict, backends: dict, fallbacks: list[str], context: str,
                   cuda: bool) -> str:
    memory = "peak CUDA memory allocated (MiB)" if cuda else "peak RSS of the process (MiB)"
    arch = ", ".join(f"{k} {model[k]}" for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                  "num_key_value_heads", "intermediate_size", "vocab_size"))
    lines = ["# SFT and GRPO steps", "", context, ""]
    if "error" in model:
        lines += [f"**The model ({arch}) could not be built**: {model['error']}", ""]
    else:
        lines += [
            f"Randomly initialised Qwen2 ({arch}, tied embeddings, rope theta {model['rope_theta']:g}, RMS eps "
            f"{model['rms_norm_eps']:g}; {model['parameters'] / 1e6:,.1f} M parameters) in bf16, `bf16-mixed`, "
            f"LoRA r=16 on every linear layer; offline tokenizer of {model['tokenizer_vocab']} tokens. Measured "
            "steps only (after the warm-up steps); memory is the peak of each step.", "",
        ]
    for kind, res in results.items():
        title = {"sft": "SFTModule", "grpo": "GRPOModule"}[kind]
        if "error" in res:
            lines += [f"## {title}", "", f"**failed**: {res['error']}", ""]
            continue
        lines += [f"## {title}", "", f"{res['setting']}; {res['warmup_steps']} warm-up step(s); "
                                     f"{res['trainable_parameters']:,} trainable parameters.", ""]
        extra = ["generate s", "reward s", "reference s", "policy s"] if kind == "grpo" else ["answer tokens"]
        lines += ["| step | time s | " + memory + " | tokens | tokens/s | loss | " + " | ".join(extra) + " |",
                  "|---:|---:|---:|---:|---:|---:|" + "---:|" * len(extra)]
        for s in res["steps"]:
            cells = ([f"{s[k]:.3f}" for k in ("generate_s", "reward_s", "reference_s", "policy_s")]
                     if kind == "grpo" else [str(s["answer_tokens"])])
            lines.append(f"| {s['step']} | {s['time_s']:.3f} | {s['peak_mib']:,.0f} | {s['tokens']:,.0f} | "
                         f"{s['tokens'] / s['time_s']:,.0f} | {s['loss']:.4f} | " + " | ".join(cells) + " |")
        if kind == "grpo":
            lines += ["", "Tokens are completion tokens. An untrained model earns every completion the same reward "
                          "(zero advantages) and a fresh adapter leaves policy = reference (zero KL), so the loss is "
                          "0; with beta > 0 every completion still goes through the reference and the backward pass."]
        lines.append("")
    lines += ["Kernel backends during the steps (`prouie_pl.kernels.fallback_status()`): "
              + (", ".join(f"{k}: {v}" for k, v in backends.items()) or "none guarded (reference on this device)")
              + ".", ""]
    lines += [f"Fallback warning: {w}" for w in fallbacks] or ["No kernel fell back to its reference."]
    return "\n".join(lines) + "\n"


def step_summary(res: dict) -> dict:
    if "error" in res:
        return {"ran": False, "error": res["error"]}
    steps = res["steps"]
    finite = all(math.isfinite(s[k]) for s in steps for k in ("time_s", "peak_mib", "loss"))
    return {"ran": bool(steps) and finite, "measured_steps": len(steps),
            "mean_step_s": sum(s["time_s"] for s in steps) / max(len(steps), 1),
            "max_peak_mib": max((s["peak_mib"] for s in steps), default=math.nan),
            "tokens_per_s": sum(s["tokens"] for s in steps) / max(sum(s["time_s"] for s in steps), 1e-9),
            "losses": [s["loss"] for s in steps], **{k: v for k, v in res.items() if k != "steps"},
            "steps": steps}


# ------------------------------------------------------------------------------------------------------- main


def machine(dry: bool) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    for name in ("triton", "lightning", "transformers", "peft"):
        try:
            info[name] = importlib.import_module(name).__version__
        except Exception as exc:  # reported, not fatal: the preflight has already named what is missing
            info[name] = f"unavailable ({type(exc).__name__})"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    info["mode"] = "dry run on the CPU (Triton interpreter, tiny shapes)" if dry else "CUDA"
    return info


def missing_packages() -> list[str]:
    import importlib.util

    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    parser.add_argument("--dry", action="store_true",
                        help="CPU only: every part with tiny shapes under the Triton interpreter, one thread")
    parser.add_argument("--budget_s", type=float, default=450.0,
                        help="wall-clock budget of the whole check; the kernel benchmark gets what the other "
                             "parts leave (default 450: inside an 8-minute slot)")
    parser.add_argument("--skip_bench", action="store_true", help="leave out bench/kernel_speed.py")
    args = parser.parse_args(argv)

    t_start = time.perf_counter()
    missing = missing_packages()
    if missing:
        print(f"gpu_check: missing Python packages: {', '.join(missing)}. Install them, or bring wheels: "
              "`pip download PKG --no-deps -d wheels/` on a machine with internet, then "
              "`pip install --no-index --find-links wheels PKG` here (see the docstring).", file=sys.stderr)
        return 2
    if args.dry:
        os.environ["TRITON_INTERPRET"] = "1"  # read at the first kernel launch, and by the benchmark's workers
        os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # weight loading and saving bars would bury the report lines
    if args.dry:
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False). On a CPU, run with --dry.",
              file=sys.stderr)
        return 2
    sizes = DRY_SIZES if args.dry else GPU_SIZES
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    info = machine(args.dry)
    command = " ".join(["python bench/gpu_check.py", *(argv if argv is not None else sys.argv[1:])])
    context = (f"`{command}`: {datetime.date.today().isoformat()}; {info.get('gpu', 'CPU')}; {info['mode']}; "
               f"torch {info['torch']}, triton {info['triton']}, transformers {info['transformers']}, "
               f"lightning {info['lightning']}, peft {info['peft']}.")
    timings: dict[str, float] = {}
    summary: dict = {"ok": False, "complete": False, "dry": args.dry, "command": command,
                     "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": info,
                     "timings": timings}

    def write_summary() -> None:
        # after every part, so that a run stopped from outside still leaves the figures it has
        summary["wall_s"] = time.perf_counter() - t_start
        summary["files"] = sorted(p.name for p in out.iterdir() if p.suffix in (".md", ".json")) + (
            [] if (out / "summary.json").exists() else ["summary.json"])
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")

    # 1. kernels against their references and float64
    t0 = time.perf_counter()
    rows = kernel_checks(sizes)
    timings["kernel_checks_s"] = time.perf_counter() - t0
    (out / "kernel_checks.md").write_text(kernel_checks_markdown(rows, context))
    summary["kernel_checks"] = {"passed": sum(r.passed for r in rows), "total": len(rows),
                                "failed": [asdict(r) for r in rows if not r.passed], "rows": [asdict(r) for r in rows]}
    write_summary()
    print(f"kernel checks: {sum(r.passed for r in rows)} of {len(rows)} passed "
          f"({timings['kernel_checks_s']:.0f} s)", file=sys.stderr)

    # 2. SFT and GRPO steps through the LightningModules, kernels behind the first-use guard
    from prouie_pl.kernels import KernelFallbackWarning, fallback, fallback_status

    fallback.reset_kernel_guard()
    t0 = time.perf_counter()
    results: dict[str, dict] = {}
    model: dict = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_model_") as tmp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", KernelFallbackWarning)
        for kind in ("model", "sft", "grpo"):
            try:
                if kind == "model":
                    model = build_model(Path(tmp), sizes.model, sizes.device)
                else:
                    with guard_on_cpu(args.dry):
                        results[kind] = train_steps(kind, Path(tmp), sizes)
            except Exception as exc:  # reported in the files; the other parts still run
                traceback.print_exc()
                error = " ".join(f"{type(exc).__name__}: {exc}".split())[:400]
                if kind == "model":
                    model = {**sizes.model, "error": error}
                    results = {"sft": {"error": f"no model ({error})"}, "grpo": {"error": f"no model ({error})"}}
                    break
                results[kind] = {"error": error}
    fallbacks = [str(w.message) for w in caught if issubclass(w.category, KernelFallbackWarning)]
    backends = fallback_status()
    timings["train_steps_s"] = time.perf_counter() - t0
    (out / "train_steps.md").write_text(
        steps_markdown(model, results, backends, fallbacks, context, cuda=sizes.device == "cuda"))
    steps = {kind: step_summary(res) for kind, res in results.items()}
    summary.update(model=model, steps=steps, kernel_backends=backends, fallback_warnings=fallbacks)
    write_summary()
    print("training steps: " + ", ".join(f"{k} {'ok' if v['ran'] else 'FAILED'}" for k, v in steps.items())
          + f" ({timings['train_steps_s']:.0f} s)", file=sys.stderr)

    # 3. the kernel benchmark, with the time that is left
    bench: dict = {"skipped": True}
    if not args.skip_bench:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the benchmark's worker processes measure peaks on the same GPU
        left = args.budget_s - (time.perf_counter() - t_start) - 15.0
        bench = run_kernel_bench(sizes, out / "kernels_cuda.md", max(left, 30.0))
        timings["kernel_bench_s"] = bench["wall_s"]
        print(f"kernel benchmark: rc {bench['rc']}, {bench['table_rows']} rows, {bench['failed_rows']} failed "
              f"({bench['wall_s']:.0f} s)", file=sys.stderr)

    bench_ok = bench.get("skipped") or (bench["rc"] == 0 and bench["failed_rows"] == 0 and bench["table_rows"] > 0)
    ok = (bool(rows) and all(r.passed for r in rows) and bool(bench_ok) and len(steps) == 2
          and all(s["ran"] for s in steps.values()) and not fallbacks)
    summary.update(ok=ok, complete=True, kernel_bench=bench)
    write_summary()
    print(f"{'OK' if ok else 'NOT OK'}: results in {out} ({summary['wall_s']:.0f} s)", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
