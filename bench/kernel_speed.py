"""Benchmark the kernels: time and peak memory of forward + backward, as a markdown table printed and written to a file.

    python bench/kernel_speed.py --device cpu     # small shapes, torch paths; writes bench/results/kernels_cpu.md
    python bench/kernel_speed.py --device cuda    # H200 shapes, Triton paths; writes bench/results/kernels_cuda.md
    python bench/kernel_speed.py --smoke --out /tmp/k.md   # one tiny shape per case: checks the script runs, in seconds

What is compared (per-token log-probabilities of an LM head, forward + backward, gradient to ``hidden``):

* ``lm_head matmul``: ``hidden @ W.T`` forward + backward alone, the yardstick for the "within 1.3x" target;
* ``fused (triton)`` / ``fused (torch ref)``: ``prouie_pl.kernels.linear_token_logprobs`` with each backend;
* ``naive``: ``log_softmax((hidden @ W.T).float()).gather(...)`` (the full logits and log-softmax exist);
* ``per-row loop``: the full logits, then a loop over sequences computing ``log_softmax`` per sequence in the logits'
  dtype, as TRL's ``selective_log_softmax`` does for bf16.

Rows marked "frozen head" are the LoRA case (weight without gradient); "trainable head" rows also produce the weight
gradient, against a matmul yardstick that computes it too. On CUDA the script also measures ``token_logprobs``'s
achieved memory bandwidth and ``grpo_loss`` against Liger-Kernel's Triton GRPO loss when ``liger_kernel`` imports.

Method: every (case, variant) runs in a fresh Python subprocess. Inputs are built first; then ONE forward + backward
is run while peak memory is tracked, then warm-up runs, then the median of ``--repeats`` timed runs.
Memory is the peak increase above what the inputs already hold: on CUDA ``torch.cuda.max_memory_allocated()`` minus
the allocated bytes before the run (tensor memory only); on CPU the process's peak resident set size during the run
(``VmHWM`` after resetting it through ``/proc/self/clear_refs``) minus the resident size before it, i.e. real
process memory including allocator overheads and framework workspaces. Times: ``torch.cuda.Event`` pairs on CUDA
(after a synchronize), ``time.perf_counter`` on CPU.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
H200_BANDWIDTH = 4.8e12  # bytes/s, HBM3e peak of an H200

# (rows N, hidden H, vocab V, dtype, tokens per sequence for the per-row loop)
# CPU bf16 matmuls are slow (no bf16 units on most CPUs), so the bf16 CPU shape is a small one.
CPU_LINEAR_SHAPES = [(2048, 512, 32000, "float32", 512), (256, 64, 32000, "bfloat16", 128)]
CUDA_LINEAR_SHAPES = [(4096, 1536, 151936, "bfloat16", 1024), (16384, 4096, 128256, "bfloat16", 1024)]
LINEAR_VARIANTS = {
    "cpu": ["matmul", "fused_torch", "naive", "row_loop", "matmul_trainable", "fused_torch_trainable"],
    "cuda": ["matmul", "fused_triton", "fused_torch", "naive", "row_loop", "matmul_trainable",
             "fused_triton_trainable"],
}
VARIANT_LABELS = {
    "matmul": "lm_head matmul (frozen head)",
    "fused_triton": "fused (triton), frozen head",
    "fused_torch": "fused (torch ref), frozen head",
    "naive": "naive log_softmax + gather",
    "row_loop": "per-row loop (TRL selective_log_softmax)",
    "matmul_trainable": "lm_head matmul (trainable head)",
    "fused_triton_trainable": "fused (triton), trainable head",
    "fused_torch_trainable": "fused (torch ref), trainable head",
}
CUDA_TOKEN_SHAPES = [(4096, 151936), (16384, 128256)]  # bf16 logits [N, V]
GRPO_SHAPES = {"cpu": [(64, 1024)], "cuda": [(64, 4096), (256, 4096)]}  # logprobs [B, T]
LIGER_SHAPE = (16, 1024, 151936)  # B, T, V for the logits-level comparison with Liger's fused GRPO loss
# --smoke: one tiny shape per case, so that a caller (bench/gpu_check.py --dry) can run every code path of this
# script in seconds; the figures mean nothing. On CPU under TRITON_INTERPRET=1 the Triton variants run too.
SMOKE_LINEAR_SHAPES = [(64, 32, 1000, "float32", 16)]
SMOKE_TOKEN_SHAPES = [(64, 1003)]
SMOKE_GRPO_SHAPES = [(4, 64)]
SMOKE_LIGER_SHAPE = (2, 16, 1003)


# ------------------------------------------------------------------------------------------------- measurement


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(step, device: str, repeats: int, warmup: int) -> dict:
    """Peak extra memory of the first ``step()``, then the median time of ``repeats`` calls after ``warmup``."""
    import torch

    gc.collect()
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        _sync(device)
        peak = torch.cuda.max_memory_allocated() - base
        mem_method = "cuda max_memory_allocated"
    else:
        base = _rss_bytes()
        exact = _reset_peak_rss()
        step()
        peak = _peak_rss_bytes() - base
        mem_method = "VmHWM (reset)" if exact else "ru_maxrss (lifetime peak, upper bound)"
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "peak_bytes": max(peak, 0), "mem_method": mem_method}


# ------------------------------------------------------------------------------------------------------- cases


def _linear_step(variant: str, n: int, h: int, v: int, dtype_name: str, seq: int, device: str):
    import torch

    from prouie_pl.kernels import linear_token_logprobs

    dtype = getattr(torch, dtype_name)
    gen = torch.Generator(device=device).manual_seed(0)
    trainable = variant.endswith("_trainable")
    hidden = torch.randn(n, h, device=device, dtype=dtype, generator=gen).requires_grad_()
    weight = (torch.randn(v, h, device=device, dtype=dtype, generator=gen) * h**-0.5).requires_grad_(trainable)
    targets = torch.randint(0, v, (n,), device=device, generator=gen)
    upstream = torch.randn(n, device=device, generator=gen)
    base = variant.removesuffix("_trainable")
    grad_logits = torch.randn(n, v, device=device, dtype=dtype, generator=gen) if base == "matmul" else None

    def clear():
        hidden.grad = None
        weight.grad = None

    def step():
        clear()
        if base == "matmul":
            (hidden @ weight.t()).backward(grad_logits)
            return
        if base in ("fused_triton", "fused_torch"):
            out = linear_token_logprobs(hidden, weight, targets, backend=base.removeprefix("fused_"))
        elif base == "naive":
            logits = (hidden @ weight.t()).float()
            out = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
        elif base == "row_loop":
            logits = (hidden @ weight.t()).view(-1, seq, v)
            rows = []
            for row_logits, row_targets in zip(logits, targets.view(-1, seq)):
                row_logp = torch.log_softmax(row_logits, dim=-1)
                rows.append(row_logp.gather(1, row_targets[:, None]).squeeze(1))
            out = torch.stack(rows).view(-1)
        else:
            raise ValueError(variant)
        out.float().backward(upstream)

    return step


def _token_bandwidth(n: int, v: int, device: str, repeats: int, warmup: int) -> dict:
    import torch

    from prouie_pl.kernels import token_logprobs

    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(n, v, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()
    targets = torch.randint(0, v, (n,), device=device, generator=gen)
    upstream = torch.randn(n, device=device, generator=gen)
    results = {}
    for backend in ("triton", "torch"):
        fwd = measure(lambda: token_logprobs(logits.detach(), targets, backend=backend), device, repeats, warmup)
        out = token_logprobs(logits, targets, backend=backend)

        def backward():
            logits.grad = None
            out.backward(upstream, retain_graph=True)

        bwd = measure(backward, device, repeats, warmup)
        results[backend] = {"fwd_ms": fwd["ms"], "bwd_ms": bwd["ms"]}
    element = 2  # bf16
    results["fwd_bytes"] = n * v * element + n * (8 + 4 + 4)  # logits read; targets, logprobs, lse
    results["bwd_bytes"] = 2 * n * v * element + n * (8 + 4 + 4)  # logits read, gradient written
    return results


def _grpo_step(variant: str, b: int, t: int, device: str):
    import torch

    from prouie_pl.kernels import grpo_loss

    gen = torch.Generator(device=device).manual_seed(0)
    lp = (-3 * torch.rand(b, t, device=device, generator=gen)).requires_grad_()
    old = lp.detach() + 0.1 * torch.randn(b, t, device=device, generator=gen)
    ref = lp.detach() + 0.1 * torch.randn(b, t, device=device, generator=gen)
    adv = torch.randn(b, t, device=device, generator=gen)
    mask = torch.rand(b, t, device=device, generator=gen) > 0.1

    def step():
        lp.grad = None
        loss, _ = grpo_loss(lp, old, ref, adv, mask, beta=0.04, loss_type="dapo", backend=variant)
        loss.backward()

    return step


def _liger_step(variant: str, b: int, t: int, v: int, device: str):
    """Logits-level GRPO: our token_logprobs + grpo_loss vs Liger's fused triton_grpo_loss (same inputs)."""
    import torch

    from prouie_pl.kernels import grpo_loss, token_logprobs

    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(b, t + 1, v, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()
    ids = torch.randint(0, v, (b, t), device=device, generator=gen)
    old = -3 * torch.rand(b, t, device=device, generator=gen)
    ref = old + 0.1 * torch.randn(b, t, device=device, generator=gen)
    adv = torch.randn(b, device=device, generator=gen)
    mask = torch.ones(b, t, device=device, dtype=torch.int32)

    if variant == "liger":
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss

        def step():
            logits.grad = None
            out = triton_grpo_loss(logits, old, ref, ids, adv, mask, temperature=1.0, beta=0.04, eps_low=0.2,
                                   eps_high=0.2, inplace=False)
            per_token = out[0] if isinstance(out, tuple) else out
            loss = per_token if per_token.dim() == 0 else (per_token * mask).sum() / mask.sum()
            loss.backward()
    else:
        def step():
            logits.grad = None
            lp = token_logprobs(logits[:, :-1], ids, backend="triton")
            loss, _ = grpo_loss(lp, old, ref, adv, mask, beta=0.04, loss_type="bnpo", backend="triton")
            loss.backward()

    return step


def worker(spec: dict) -> dict:
    """Runs in a fresh subprocess: one measurement, returned as a dict."""
    import torch

    device, repeats, warmup = spec["device"], spec["repeats"], spec["warmup"]
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    case = spec["case"]
    if case == "linear":
        step = _linear_step(spec["variant"], *spec["shape"], device)
    elif case == "grpo":
        step = _grpo_step(spec["variant"], *spec["shape"], device)
    elif case == "liger":
        step = _liger_step(spec["variant"], *spec["shape"], device)
    elif case == "token":
        return _token_bandwidth(*spec["shape"], device, repeats, warmup)
    else:
        raise ValueError(case)
    return measure(step, device, repeats, warmup)


_THREADS: int | None = None  # --threads, forwarded to every worker


def run_worker(spec: dict) -> dict:
    spec = dict(spec, threads=_THREADS)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail[:160]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------------ report


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def linear_table(device: str, shapes, repeats: int, warmup: int, variants: list[str]) -> list[str]:
    lines = [
        "| N x H x V | dtype | variant | time (ms) | x matmul | peak extra mem (MiB) | mem vs naive |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for n, h, v, dtype, seq in shapes:
        results = {}
        for variant in variants:
            spec = {"case": "linear", "variant": variant, "shape": [n, h, v, dtype, seq], "device": device,
                    "repeats": repeats, "warmup": warmup}
            results[variant] = run_worker(spec)
            print(f"  linear {n}x{h}x{v} {dtype} {variant}: {results[variant]}", file=sys.stderr)
        naive_mem = results.get("naive", {}).get("peak_bytes")
        for variant, res in results.items():
            label = VARIANT_LABELS[variant]
            if "error" in res:
                lines.append(f"| {n} x {h} x {v} | {dtype} | {label} | failed: {res['error']} | | | |")
                continue
            yard = results["matmul_trainable" if variant.endswith("_trainable") else "matmul"]
            ratio = f"{res['ms'] / yard['ms']:.2f}" if "ms" in yard else ""
            mem_ratio = f"{res['peak_bytes'] / naive_mem:.2f}" if naive_mem else ""
            lines.append(f"| {n} x {h} x {v} | {dtype} | {label} | {res['ms']:,.1f} | {ratio} | "
                         f"{_mib(res['peak_bytes'])} | {mem_ratio} |")
    return lines


def token_table(repeats: int, warmup: int, shapes) -> list[str]:
    lines = [
        "| N x V (bf16) | backend | fwd ms | fwd TB/s | bwd ms | bwd TB/s | bwd % of 4.8 TB/s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for n, v in shapes:
        res = run_worker({"case": "token", "shape": [n, v], "device": "cuda", "repeats": repeats, "warmup": warmup})
        if "error" in res:
            lines.append(f"| {n} x {v} | | failed: {res['error']} | | | | |")
            continue
        for backend in ("triton", "torch"):
            r = res[backend]
            fwd_bw = res["fwd_bytes"] / (r["fwd_ms"] * 1e-3) / 1e12
            bwd_bw = res["bwd_bytes"] / (r["bwd_ms"] * 1e-3) / 1e12
            lines.append(f"| {n} x {v} | {backend} | {r['fwd_ms']:.2f} | {fwd_bw:.2f} | {r['bwd_ms']:.2f} | "
                         f"{bwd_bw:.2f} | {100 * bwd_bw * 1e12 / H200_BANDWIDTH:.0f}% |")
    return lines


def grpo_table(device: str, repeats: int, warmup: int, shapes, liger_shape, backends: list[str]) -> list[str]:
    lines = ["| case | shape | variant | time (ms) | peak extra mem (MiB) |", "|---|---|---|---:|---:|"]
    for b, t in shapes:
        for backend in backends:
            res = run_worker({"case": "grpo", "variant": backend, "shape": [b, t], "device": device,
                              "repeats": repeats, "warmup": warmup})
            cell = f"{res['ms']:.3f} | {_mib(res['peak_bytes'])}" if "error" not in res else f"failed: {res['error']} |"
            lines.append(f"| grpo_loss fwd+bwd (logprobs in) | B={b}, T={t} | {backend} | {cell} |")
    if device == "cuda":
        b, t, v = liger_shape
        try:
            import liger_kernel  # noqa: F401

            have_liger = True
        except Exception:
            have_liger = False
        variants = ["ours", "liger"] if have_liger else ["ours"]
        for variant in variants:
            res = run_worker({"case": "liger", "variant": variant, "shape": [b, t, v], "device": device,
                              "repeats": repeats, "warmup": warmup})
            label = "token_logprobs + grpo_loss (triton)" if variant == "ours" else "Liger triton_grpo_loss"
            cell = f"{res['ms']:.3f} | {_mib(res['peak_bytes'])}" if "error" not in res else f"failed: {res['error']} |"
            lines.append(f"| GRPO from bf16 logits fwd+bwd | B={b}, T={t}, V={v} | {label} | {cell} |")
        if not have_liger:
            lines.append(f"| GRPO from bf16 logits fwd+bwd | B={b}, T={t}, V={v} | Liger triton_grpo_loss | "
                         "skipped: liger_kernel is not importable | |")
    return lines


def environment_line(device: str) -> str:
    import torch

    if device == "cuda":
        where = f"{torch.cuda.get_device_name(0)}"
    else:
        cpu = platform.processor() or platform.machine()
        where = f"{cpu}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads"
        load = os.getloadavg()[0]
        where += f", load average {load:.1f} at start"
        if load >= 1.0:
            where += " (other processes were running: times are noisy, memory is not affected)"
    return f"{datetime.date.today().isoformat()}; {where}; torch {torch.__version__}; python {platform.python_version()}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/kernels_<device>.md")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads in every worker (default: torch's choice); 1 gives steadier numbers "
                             "on a machine shared with other jobs")
    parser.add_argument("--smoke", action="store_true",
                        help="one tiny shape per case: checks that every path of the script runs (figures meaningless)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    import torch

    global _THREADS
    _THREADS = args.threads
    if args.threads:
        torch.set_num_threads(args.threads)  # so the header reports what the workers use
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU (torch.cuda.is_available() is False)")
    repeats = args.repeats or (20 if args.device == "cuda" else 5)
    out = args.out or REPO_ROOT / "bench" / "results" / f"kernels_{args.device}.md"

    shapes = CUDA_LINEAR_SHAPES if args.device == "cuda" else CPU_LINEAR_SHAPES
    variants = list(LINEAR_VARIANTS[args.device])
    grpo_backends = ["triton", "torch"] if args.device == "cuda" else ["torch"]
    if args.smoke:
        shapes = SMOKE_LINEAR_SHAPES
        if args.device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
            variants += ["fused_triton", "fused_triton_trainable"]
            grpo_backends = ["triton", "torch"]
    lines = [
        f"# Kernel benchmarks ({args.device}{', smoke run: tiny shapes, figures meaningless' if args.smoke else ''})",
        "",
        f"`{' '.join(['python bench/kernel_speed.py', *(argv if argv is not None else sys.argv[1:])])}`: "
        f"{environment_line(args.device)}.",
        f"Median of {repeats} timed runs after {args.warmup} warm-up run(s); every variant in a fresh process.",
        "Peak extra memory: " + (
            "`torch.cuda.max_memory_allocated()` during the first forward+backward minus the bytes allocated "
            "before it (inputs, weights and the upstream gradient are not counted)."
            if args.device == "cuda" else
            "peak resident set size during the first forward+backward (VmHWM, reset through /proc/self/clear_refs) "
            "minus the resident size before it: real process memory, allocator and library workspaces included; "
            "inputs, weights and the upstream gradient are built before and not counted."
        ),
        "",
        "## LM-head per-token log-probabilities, forward + backward (gradient to hidden)",
        "",
        "`x matmul`: time relative to the plain `hidden @ W.T` forward + backward with the same head setting "
        "(target: fused within 1.3x). `mem vs naive`: peak extra memory relative to the naive path "
        "(target on CPU at 2048 x 512 x 32000 fp32: torch ref at 0.25 or less).",
        "",
        *linear_table(args.device, shapes, repeats, args.warmup, variants),
        "",
    ]
    if args.device == "cuda":
        lines += ["## token_logprobs achieved memory bandwidth (bf16 logits)", "",
                  "Bytes: forward reads the logits once; backward reads them and writes the gradient.", "",
                  *token_table(repeats, args.warmup, SMOKE_TOKEN_SHAPES if args.smoke else CUDA_TOKEN_SHAPES), ""]
    elif "fused_triton" in variants:
        lines += ["The Triton rows ran under the Triton interpreter: they show that the code runs, not its speed.", ""]
    else:
        lines += ["The Triton rows are CUDA-only: on CPU the kernels run under the Triton interpreter, which checks "
                  "correctness, not speed.", ""]
    grpo_shapes = SMOKE_GRPO_SHAPES if args.smoke else GRPO_SHAPES[args.device]
    liger_shape = SMOKE_LIGER_SHAPE if args.smoke else LIGER_SHAPE
    lines += ["## GRPO loss", "",
              *grpo_table(args.device, repeats, args.warmup, grpo_shapes, liger_shape, grpo_backends), ""]
    text = "\n".join(lines)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"\nwritten to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
