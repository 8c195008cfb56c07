"""Prompts computed once in training: the shared-prefix paths against the per-row paths, side by side.

Three measurements on one base model (``--model``: the tiny offline Llama or Gemma 3 270M) with one LoRA adapter
(r=16 on every linear layer, no dropout, as the stage configs; ``--adapter`` loads one, for realistic completions):

* **GRPO policy pass**: forward + backward of the policy over P prompts x G completions
  (``GRPOModule.accumulate_policy_gradients``, every completion in the backward pass, one micro-batch), with
  ``policy_prefix: per_row`` (prompt + completion through the decoder for every completion) and ``shared``
  (each prompt once, its KV cache indexed for its G completions).  The completions are sampled once from the
  model (``generate_rollouts``, temperature 1) on real DE prompts and reused by both paths, with random
  advantages;
* **GRPO reference pass**: the no-grad log-probs of the same completions with the adapter disabled (what
  ``beta > 0`` adds to a step);
* **SFT step**: forward + backward of ``answer_nll`` on batches of ``--sft_batch`` full-format CM examples, one
  data set per batch (as the CM curriculum's phases draw them), length-grouped, with the per-row path and with
  the shared head (:func:`prouie_pl.shared_prefix.answer_nll_shared_head`).

Each repeat runs every path once, in alternating order; the table gives medians, the ratio of the medians and
how far the two paths' values lie apart (the policy pass's LoRA gradients, the reference's log-probs, the SFT
batches' mean losses; mean and largest absolute difference over the mean magnitude) as a check that both compute
the same thing: in float32 they agree to about 1e-6 (``tests/test_shared_prefix.py``); with a bfloat16 base the
two orders of summation round differently.
With ``--memory`` each (measurement, path) also runs alone in a fresh process (model loaded, two repeats) and
its peak resident memory is reported (``ru_maxrss``, which includes loading the model, so the same for both
paths when the step itself adds little).

    python bench/shared_prefix.py --model gemma-3-270m --adapter outputs/.../sa/adapter --memory
    python bench/shared_prefix.py --quick --out /tmp/shared_prefix.md      # tiny model, smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from _common import machine_line, markdown_table, model_defaults, write_result  # noqa: E402

REAL_DATASETS = ["CoNLL2003", "CoNLL2004", "PHEE"]
PATHS = {"grpo_policy": ("per_row", "shared"), "grpo_reference": ("per_row", "shared"), "sft_step": ("per_row", "shared")}


def load(args):
    import torch

    from prouie_pl.modeling import BaseModelSettings, LoRASettings, load_model, load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.model)
    # no LoRA dropout, as in the shipped configs: a shared prefix draws one dropout mask for all its rows
    lora = LoRASettings(init_adapter=args.adapter, dropout=0.0)
    model = load_model(BaseModelSettings(name_or_path=args.model, dtype=args.dtype), lora)
    model.train()
    return tok, model


def grpo_inputs(args, tok, model):
    """A trajectory of P real DE prompts x G sampled completions with random advantages."""
    import torch

    from prouie_pl.datamodules import UIEDataModule
    from prouie_pl.grpo import RolloutSettings, generate_rollouts
    from prouie_pl.grpo.trajectory import Trajectory

    data = UIEDataModule(stage="de", data_dir=args.data_dir, datasets=args.datasets, sample_per_dataset=args.prompts,
                         batch_size=args.prompts, max_val_records=0, seed=args.seed)
    data.connect(tok)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    torch.manual_seed(args.seed)
    settings = RolloutSettings(num_generations=args.generations, temperature=1.0, max_new_tokens=args.max_new_tokens)
    rollout = generate_rollouts(model, tok, batch["input_ids"], batch["attention_mask"], settings)
    model.train()
    gen = torch.Generator().manual_seed(args.seed)
    adv = torch.randn(rollout.completion_mask.shape, generator=gen) * rollout.completion_mask
    return Trajectory.from_rollout(rollout, [], adv, args.generations)


def sft_batches(args, tok):
    """``--sft_batches`` batches of each data set's full-format training examples (length-grouped, one data set
    per batch)."""
    from prouie_pl.datamodules import UIEDataModule

    batches = []
    for name in args.datasets or [None]:
        data = UIEDataModule(stage="sa", target_format="full", data_dir=args.data_dir, datasets=[name] if name else None,
                             sample_per_dataset=args.sft_batch * args.sft_batches * 4, batch_size=args.sft_batch,
                             max_val_records=0, seed=args.seed)
        data.connect(tok)
        data.setup("fit")
        loader = iter(data.train_dataloader())
        batches += [next(loader) for _ in range(args.sft_batches)]
    return batches


def grpo_module(args, model, mode: str, beta: float):
    from prouie_pl.grpo.module import GRPOModule
    from prouie_pl.grpo.rollout import RolloutSettings

    module = GRPOModule(rollout=RolloutSettings(num_generations=args.generations), policy_prefix=mode, beta=beta,
                        skip_zero_advantage=False)
    module.model = model
    return module


def run_one(what: str, mode: str, model, inputs, args) -> tuple[float, float, object]:
    """(seconds, completion or answer tokens, values) of one measurement with one path."""
    import torch

    from prouie_pl.sft import answer_nll
    from prouie_pl.shared_prefix import answer_nll_shared_head

    for p in model.parameters():
        p.grad = None
    t0 = time.perf_counter()
    if what == "grpo_policy":
        module = grpo_module(args, model, mode, 0.0)
        module.accumulate_policy_gradients(inputs)
        seconds = time.perf_counter() - t0
        grads = torch.cat([p.grad.flatten().float() for _, p in sorted(model.named_parameters()) if p.grad is not None])
        return seconds, inputs.tokens, grads
    if what == "grpo_reference":
        module = grpo_module(args, model, mode, 0.04)
        module.add_comparison_logprobs(inputs)
        return time.perf_counter() - t0, inputs.tokens, inputs.ref_logprobs[inputs.completion_mask.bool()]
    loss_fn = answer_nll_shared_head if mode == "shared" else answer_nll
    losses, tokens = [], 0
    for batch in inputs:
        nll, n = loss_fn(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        (nll / max(n, 1)).backward()
        losses.append(float(nll.detach()) / max(n, 1))
        tokens += n
    return time.perf_counter() - t0, tokens, torch.tensor(losses)


def gap(a, b) -> str:
    """How far the shared path's values (LoRA gradients, log-probs of the completion tokens, or per-batch mean
    answer losses) lie from the per-row path's: mean and largest absolute difference, relative to the mean size."""
    diff = (b - a).abs()
    scale = float(a.abs().mean())
    return f"{float(diff.mean()) / scale:.1e} / {float(diff.max()) / scale:.1e}"


def measure(args, only: str | None = None) -> dict:
    tok, model = load(args)
    wanted = [only.split(":")[0]] if only else list(PATHS)
    inputs = {}
    if any(w.startswith("grpo") for w in wanted):
        inputs["grpo"] = grpo_inputs(args, tok, model)
    if "sft_step" in wanted:
        inputs["sft"] = sft_batches(args, tok)
    results = {}
    for what in wanted:
        data = inputs["sft"] if what == "sft_step" else inputs["grpo"]
        modes = [only.split(":")[1]] if only else list(PATHS[what])
        times = {m: [] for m in modes}
        values = {}
        for r in range(args.repeats):
            for mode in (modes if r % 2 == 0 else modes[::-1]):
                seconds, tokens, value = run_one(what, mode, model, data, args)
                times[mode].append(seconds)
                values[mode] = value
        results[what] = {"seconds": times, "tokens": tokens,
                         "gap": gap(values["per_row"], values["shared"]) if len(modes) == 2 else None}
        if what.startswith("grpo"):
            results[what]["shape"] = grpo_shape(data)
        else:
            results[what]["shape"] = sft_shape(data)
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return results


def grpo_shape(trajectory) -> dict:
    prompt_tokens = trajectory.prompt_mask.view(-1, trajectory.group_size, trajectory.prompt_mask.shape[1])[:, 0].sum(dim=1)
    return {"prompts": int(trajectory.size // trajectory.group_size), "completions": int(trajectory.size),
            "prompt tokens (mean)": float(prompt_tokens.float().mean()), "prompt width": int(trajectory.prompt_ids.shape[1]),
            "completion tokens (mean)": float(trajectory.lengths.float().mean()),
            "completion width": int(trajectory.completion_length)}


def sft_shape(batches) -> dict:
    from prouie_pl.shared_prefix import shared_head_length

    heads = [shared_head_length(b["input_ids"], b["attention_mask"], b["labels"]) for b in batches]
    tokens = [int(b["attention_mask"].sum()) for b in batches]
    rows = sum(b["input_ids"].shape[0] for b in batches)
    return {"batches": len(batches), "examples": rows, "shared head (mean tokens)": sum(heads) / len(heads),
            "tokens per example (mean)": sum(tokens) / rows}


def memory(args) -> dict:
    """Peak RSS of each (measurement, path) alone in a fresh process."""
    out = {}
    for what, modes in PATHS.items():
        for mode in modes:
            cmd = [sys.executable, __file__, "--child", f"{what}:{mode}", "--repeats", "2"] + forwarded(args)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"memory run {what}:{mode} failed:\n{proc.stderr[-3000:]}")
            out[f"{what}:{mode}"] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    return out


def forwarded(args) -> list[str]:
    flags = ["--model", args.model, "--dtype", args.dtype, "--data_dir", args.data_dir, "--prompts", str(args.prompts),
             "--generations", str(args.generations), "--max_new_tokens", str(args.max_new_tokens), "--sft_batch",
             str(args.sft_batch), "--sft_batches", str(args.sft_batches), "--seed", str(args.seed), "--threads", str(args.threads)]
    if args.datasets:
        flags += ["--datasets", *args.datasets]
    if args.adapter:
        flags += ["--adapter", args.adapter]
    return flags


def report(args, results: dict, peaks: dict | None) -> str:
    rows = []
    for what in PATHS:
        r = results[what]
        per_row, shared = statistics.median(r["seconds"]["per_row"]), statistics.median(r["seconds"]["shared"])
        unit = "examples" if what == "sft_step" else "completion tokens"
        count = r["shape"]["examples"] if what == "sft_step" else r["tokens"]
        rows.append([what, f"{per_row:.2f}", f"{shared:.2f}", f"{per_row / shared:.2f}x", f"{count / per_row:.1f}",
                     f"{count / shared:.1f}", unit, r["gap"]])
    table = markdown_table(["measurement", "per-row s", "shared s", "speed-up", "per-row /s", "shared /s", "counted",
                            "value gap (mean / max, relative)"], rows)
    shapes = "\n".join(f"- {what}: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in results[what]["shape"].items()) for what in PATHS)
    body = (f"Model {args.model} ({args.dtype}), adapter {args.adapter or 'fresh'}; {machine_line()}; torch threads "
            f"{args.threads or 'default'}; medians of {args.repeats} repeats, paths alternating.\n\n{table}\n\n"
            f"Inputs:\n\n{shapes}\n")
    if peaks:
        mem = markdown_table(["measurement", "per-row peak RSS MB", "shared peak RSS MB"],
                             [[what, f"{peaks[f'{what}:per_row']:.0f}", f"{peaks[f'{what}:shared']:.0f}"] for what in PATHS])
        body += f"\nPeak resident memory, each alone in a fresh process (model load included, 2 repeats):\n\n{mem}\n"
    return body


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--adapter", default=None, help="an adapter folder to start from (default: a fresh LoRA adapter)")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--data_dir", default=None)
    ap.add_argument("--datasets", nargs="+", default=None)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--sft_batch", type=int, default=8)
    ap.add_argument("--sft_batches", type=int, default=2, help="batches per data set")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--memory", action="store_true", help="also the peak RSS of each path alone in a fresh process")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 repeat, 2 prompts x 2, short completions")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.prompts, args.generations, args.max_new_tokens, args.sft_batches = 1, 2, 2, 16, 1
    args.threads = model_defaults(args, REAL_DATASETS)
    import torch

    torch.manual_seed(args.seed)
    if args.child:
        print(json.dumps(measure(args, only=args.child), default=str))
        return
    results = measure(args)
    peaks = memory(args) if args.memory else None
    body = report(args, results, peaks)
    print(body)
    name = f"shared_prefix_{args.model}.md" if args.model != "tiny" else "shared_prefix.md"
    write_result(name, "Prompts computed once in training: shared prefix against per-row", body, args.out, keep_notes=True)


if __name__ == "__main__":
    main()
