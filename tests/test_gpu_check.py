"""bench/gpu_check.py --dry: the GPU check's every non-CUDA path runs on the CPU and writes real figures.

One subprocess (the script sets the interpreter, the thread count and a kernel hook for itself), about 30 s.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    env.pop("PROUIE_KERNELS", None)
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "summary.json").read_text())


def test_writes_every_file(dry_run):
    out, summary = dry_run
    assert {p.name for p in out.iterdir()} >= set(summary["files"]) == {
        "kernel_checks.md", "kernels_cuda.md", "train_steps.md", "summary.json"}
    assert summary["ok"] is True and summary["dry"] is True


def test_every_kernel_check_passed_with_finite_errors(dry_run):
    out, summary = dry_run
    checks = summary["kernel_checks"]
    rows = checks["rows"]
    assert checks["passed"] == checks["total"] == len(rows) >= 40 and checks["failed"] == []
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"token_logprobs", "linear_token_logprobs", "group_advantages", "stepwise_advantages",
                       "grpo_loss"}
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16"}
    quantities = {(r["kernel"], r["quantity"]) for r in rows}
    assert {("token_logprobs", "grad logits"), ("linear_token_logprobs", "grad weight"),
            ("linear_token_logprobs", "grad bias"), ("grpo_loss", "grad logprobs")} <= quantities
    for r in rows:
        assert math.isfinite(r["vs_reference"]) and math.isfinite(r["vs_float64"]), r
        assert r["vs_reference"] <= r["tol_reference"] and r["vs_float64"] <= r["tol_float64"], r
    # bf16 gradients are rounded: a measured error of exactly zero would mean nothing was compared
    assert any(r["vs_float64"] > 1e-4 for r in rows if r["dtype"] == "bfloat16" and r["quantity"].startswith("grad"))
    text = (out / "kernel_checks.md").read_text()
    assert f"**{checks['total']} of {checks['total']} checks passed.**" in text and "**NO**" not in text


def test_both_training_steps_ran_with_real_figures(dry_run):
    out, summary = dry_run
    for kind in ("sft", "grpo"):
        step = summary["steps"][kind]
        assert step["ran"] and step["measured_steps"] == 2, step
        for row in step["steps"]:
            assert 0 < row["time_s"] < 60 and 100 < row["peak_mib"] < 1e5 and math.isfinite(row["loss"]), row
            assert row["tokens"] > 0
    sft, grpo = summary["steps"]["sft"]["steps"], summary["steps"]["grpo"]["steps"]
    assert all(r["loss"] > 1.0 for r in sft)  # NLL of an untrained model over 1,536 tokens: near ln(1536) = 7.3
    assert all(r["completions"] == 4 and r["policy_s"] > 0 and r["reference_s"] > 0 for r in grpo)
    # the steps' kernel calls went through the guard and the (interpreted) Triton kernels, none fell back
    assert summary["kernel_backends"] == {"linear_token_logprobs": "triton", "stepwise_advantages": "triton",
                                          "grpo_loss": "triton"}
    assert summary["fallback_warnings"] == []
    assert summary["model"]["vocab_size"] == 1536 > summary["model"]["tokenizer_vocab"]
    text = (out / "train_steps.md").read_text()
    assert "## SFTModule" in text and "## GRPOModule" in text and "No kernel fell back" in text


def test_kernel_benchmark_ran_every_row(dry_run):
    out, summary = dry_run
    bench = summary["kernel_bench"]
    assert bench["rc"] == 0 and not bench["timed_out"] and bench["failed_rows"] == 0 and bench["table_rows"] >= 10
    text = (out / "kernels_cuda.md").read_text()
    assert "smoke run" in text and "fused (triton), frozen head" in text
    row = next(line for line in text.splitlines() if "fused (torch ref), frozen head" in line)
    assert float(row.split("|")[4].replace(",", "")) > 0  # a measured time in ms
