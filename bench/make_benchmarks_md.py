"""Assemble ``BENCHMARKS.md`` from the result files under ``bench/results/``.

Every benchmark script writes its own table (with the machine, versions and the exact command) to
``bench/results/<name>.md``; this script puts them in one page with a note on what each number means.  A result
file that does not exist yet is listed as not run.

    python bench/make_benchmarks_md.py          # rewrites BENCHMARKS.md
"""

from __future__ import annotations

import platform
import sys

from _common import REPO, RESULTS

SECTIONS = [
    ("real_model_learning", "Gemma 3 270M: SFT from the base on real data", "python bench/real_model_learning.py", """\
One LoRA SFT run of the real pretrained base on a stratified sample of CoNLL2003, CoNLL2004 and PHEE training
sentences, then strict test F1 per data set with 95% bootstrap intervals over the test sentences, all on the
2-core CPU. Needs the gemma extra and the real data."""),
    ("real_model_steps", "Gemma 3 270M: SFT, generation and GRPO steps on the CPU", "python bench/real_model_steps.py", """\
Where a step spends its time with the real 262k-vocabulary model, for a float32 and a bf16 frozen base (LoRA in
float32): SFT split into decoder forward, the chunked answer-only LM head and backward; greedy generation
tokens/s at batch 1, 8 and 32; a GRPO step by the module's timers. Each dtype runs in its own process, so peak
RSS is that configuration's."""),
    ("compare_trl", "ProUIE-PL against TRL on the same work", "python bench/compare_trl.py", """\
One section per base model (`--model tiny`, `--model gemma-3-270m`), each rewritten only by its own run. SFT:
non-padding tokens per second and peak RSS of ProUIE-PL's `SFTModule` and TRL's `SFTTrainer` on the same token ids,
labels, base model, LoRA, batch size, learning rate and step count. GRPO: completions and completion tokens per second of
`GRPOModule` and TRL's `GRPOTrainer` from the same SFT-warmed adapter with the same outcome reward, group size,
sampling and completion cap. Runs alternate between the two sides in fresh processes; "ratio of medians" divides
the medians over runs, "per pair" each ProUIE-PL run by the TRL run after it. Differences in how each side batches
(length-grouped vs random) and what it skips (groups without reward spread) are part of what is compared and are
named in the table's notes. Needs `pip install -e ".[bench]"` and the real data."""),
    ("sft_throughput", "SFT throughput: length-grouped against shuffled batches", "python bench/sft_throughput.py", """\
The same model, data and batch size trained through the data module's length-grouped batches and through plainly
shuffled ones, alternating epochs. "padding share" is padded positions over all positions; the ratio compares
non-padding tokens per second (the work that counts), by wall clock and by process CPU time."""),
    ("grpo_step", "Where a GRPO step's time goes", "python bench/grpo_step.py", """\
Rollouts with each prompt prefilled once (its KV cache repeated for its G completions) against prompts repeated G
times, on the same batches; then seconds per `GRPOModule` step, per prefill mode, split by the module's own timers
into rollouts (`generate`), SFR rewards and advantages (`reward`), the no-grad reference pass (`reference`, only
with beta > 0) and forward, backward and optimizer step (`policy`). `--policy_prefix shared per_row` times whole
steps with the policy pass computing each prompt once per group against once per completion; `--profile` lists the
CPU operators of one more step. `--model gemma-3-270m` runs it on the real model and the real IE prompts. The
targets: a reward share below 5 % of a step, at least 1.5x rollout completions/s from the shared prefill, and a
whole step at P=4, G=8 at most 1/2.5 of the 48.6 s it took before the prompt was shared in training."""),
    ("shared_prefix_gemma-3-270m", "Prompts computed once in training", "python bench/shared_prefix.py --model gemma-3-270m", """\
The GRPO policy pass (forward and backward), the no-grad reference pass and an SFT step, each with the prompt (or the
prompt head a batch shares) run once against the per-row path, on the same inputs, alternating; speed-up of the
medians and how far the two paths' values lie apart."""),
    ("decode_engines_gemma-3-270m", "Decoding: rows leave the batch as they stop, against generate", "python bench/decode_engines.py --model gemma-3-270m", """\
The project's own decoding loop (finished rows dropped from the batch and the KV cache) against `model.generate`
(every row decoded until the slowest stops) on the same prompts: greedy test-style batches and GRPO-style sampling,
interleaved; `same tokens` says whether greedy gave identical completions."""),
    ("data_loading_gemma-3-270m", "Loading and tokenising the training data", "python bench/data_loading.py", """\
All 18 shared training splits through the CM stage's validation and tokenisation with the Gemma tokenizer: the old
in-memory path, the `datasets` path on a first start (empty cache) and on a cached start, each in a fresh process
(wall time of the data part and peak RSS)."""),
    ("kernels_cpu", "Kernels on the CPU (PyTorch references; Triton under the interpreter is for correctness only)",
     "python bench/kernel_speed.py --device cpu --threads 1", """\
Time and peak extra memory of the LM-head log-prob paths, the GRPO loss and the advantage functions. "x matmul" is
the time of a variant over the bare `hidden @ W.T` forward and backward; "mem vs naive" its peak extra memory over
`log_softmax` + `gather` on full logits."""),
    ("kernels_cuda", "Kernels on a GPU (Triton against PyTorch)", "python bench/kernel_speed.py", """\
The same tables with the Triton kernels on a CUDA device, in float32 and bfloat16."""),
    ("scorer", "Parser and scorer throughput on every real test split", "python bench/scorer.py", """\
Parsing and scoring rendered gold targets of all 18 test splits of `../shared/data/uie`, best of three, in the
strict and the InstructUIE-compatible modes. F1 is 100 by construction: the point is speed and that parsing
round-trips."""),
    ("stage_ablation_gemma-3-270m", "Stage ablation on real data (Gemma 3 270M)", "python bench/stage_ablation.py --model gemma-3-270m", """\
Strict test F1 per data set after each stage of one CM -> SA -> DE chain, and of mixed multitask SFT trained for
the chain's training seconds, on the 2-core CPU: paired bootstrap intervals of what each stage adds (CM+SA - CM,
CM+SA+DE - CM+SA) and of the chain against mixed SFT, parse failures and empty answers per arm, CM's dev curve, and
what each stage cost (seconds, steps, tokens, GRPO completions). The script's docstring gives the design."""),
    ("calibration_gemma-3-270m", "Unit scores: calibration, threshold and cost (Gemma 3 270M)",
     "python bench/calibration.py --adapter ADAPTER", """How well each extracted unit's score tracks whether it is right, on CoNLL2003, CoNLL2004 and PHEE dev and test
sentences decoded by one SFT adapter: reliability tables and expected calibration error per task (three scoring
rules, raw and after a per-task temperature fitted on dev), the threshold chosen on dev and what it does to test
precision and recall, and what recording the token probabilities costs against plain decoding."""),
    ("loop_guard_gemma-3-270m", "The loop guard on real answers (Gemma 3 270M tokenizer)",
     "python bench/loop_guard.py --predictions RUN_FOLDERS --test-data DATA", """How often the guard that ends self-repeating answers would end a gold training answer (it should not), and what it
changes in saved test predictions decoded without it: answers ended, tokens saved, F1 and parse failures both
ways."""),
    ("memory_gemma-3-270m", "Where the resident memory goes (Gemma 3 270M)",
     "python bench/memory.py --model gemma-3-270m --data_dir demo_real --max_new_tokens 240 --micro_batch 8", """\
Resident memory at the start, peak and end of each phase a pipeline stage goes through on the 2-core CPU: loading,
SFT micro-batches of 4, casting the base to float32, test decoding of 32 prompts, a GRPO rollout and policy pass."""),
]


def demote(text: str) -> str:
    """Drop the result file's title line and push its headings two levels down."""
    lines = text.splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    return "\n".join(("##" + ln) if ln.startswith("#") else ln for ln in lines).strip()


def main() -> int:
    import torch

    out = [
        "# Benchmarks",
        "",
        "Every table below is written by a script under `bench/` (the command is above each table) into "
        "`bench/results/`, and this page is put together from those files by `python bench/make_benchmarks_md.py`. "
        "Each table names the machine, the versions and the load at its start. Speed ratios are measured side by "
        "side in one invocation; absolute figures from different tables were taken at different times and should "
        "not be compared with each other.",
        "",
        f"Page assembled with Python {platform.python_version()}, torch {torch.__version__}.",
        "",
        "## Contents",
        "",
    ]
    for name, title, _, _ in SECTIONS:
        state = "" if (RESULTS / f"{name}.md").is_file() else " (not run yet)"
        out.append(f"- [{title}](#{name.replace('_', '-')}){state}")
    for name, title, cmd, about in SECTIONS:
        out += ["", f'<a id="{name.replace("_", "-")}"></a>', f"## {title}", "", f"`{cmd}`", "", about, ""]
        path = RESULTS / f"{name}.md"
        if path.is_file():
            out.append(demote(path.read_text(encoding="utf-8")))
        else:
            out.append(f"Not run yet: no `bench/results/{name}.md`." + (
                " It needs a CUDA device." if name == "kernels_cuda" else ""))
    target = REPO / "BENCHMARKS.md"
    target.write_text("\n".join(out) + "\n", encoding="utf-8")
    print(f"written to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
