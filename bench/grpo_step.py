"""GRPO step time: rollouts that prefill each prompt once against repeated prompts, and where a step's time goes.

Two measurements on one base model (``--model``: the tiny offline Llama or Gemma 3 270M), from one adapter:

* **Rollouts**: ``generate_rollouts`` alone on the same P-prompt batches, ``prefill: shared`` (each prompt
  prefilled once, its KV cache repeated G times) against ``prefill: repeated`` (the prompts repeated G times before
  ``generate``, each prefilled G times), interleaved (the order alternates per batch), each call seeded alike so
  both sample nearly the same completions; medians over ``--rollout_repeats`` batches.  ``prefill s`` is the
  shared path's one prefill of the P prompts (the rest of its time is ``generate``: the last prompt token of each
  row and the decoding).
* **Steps**: one ``GRPOModule`` training run per (prefill mode, ``beta``) (beta 0: no reference pass; 0.04: a
  reference pass with the adapter disabled), ``--warmup`` untimed steps and then ``--steps`` measured ones,
  P prompts x G sampled completions each.  The split comes from the module's own timers (``last_step_stats``):
  ``generate`` (rollouts), ``reward`` (SFR rewards and advantages), ``reference`` (the no-grad reference pass, and
  the old-policy pass when ``num_iterations > 1``), ``policy`` (forward, backward and optimizer step of every pass)
  and ``step`` (all of ``training_step``).  ``--policy_prefix shared per_row`` adds a row per way the policy
  pass runs the prompt (once per group, or once per completion as before), so the whole step is compared side by
  side; ``--profile`` runs one more step of the first row under ``torch.profiler`` and lists the operators that
  took the CPU's time.

Completion tokens count each completion up to and including its stop token.  Process CPU time over wall time is
recorded per step row, as a check on a machine other jobs share.

Data: the tiny model reads the bundled demo data (all three tasks); Gemma 3 270M reads the real IE prompts of
NER/CoNLL2003, RE/CoNLL2004 and EE/PHEE from ``../shared/data/uie`` (``--data_dir`` and ``--datasets`` change
either).  The adapter the runs start from: with a fresh adapter every completion earns the same reward, so with
``beta = 0`` no completion would reach the backward pass (groups without reward spread are skipped).  By default
a short SFT warm-up (``--sft_steps`` on 16 records per data set) makes an adapter whose answers differ in quality,
as at the start of a real DE stage; ``--adapter`` uses a given one (for Gemma, an SA stage's adapter).

Torch runs on one thread for the tiny model by default (its matrices are small; on a shared machine extra OpenMP
threads mostly wait) and on torch's choice for Gemma (``--threads``).

    python bench/grpo_step.py                  # tiny model; writes bench/results/grpo_step.md
    python bench/grpo_step.py --model gemma-3-270m --adapter outputs/gemma-3-270m/sa/adapter --betas 0
    python bench/grpo_step.py --steps 1 --warmup 1 --rollout_repeats 2 --sft_steps 4 --out /tmp/grpo_step.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from _common import fit_steps, markdown_table, model_defaults, sft_warmup_adapter, write_result  # noqa: E402

PREFILL_MODES = ("shared", "repeated")
REAL_DATASETS = ["CoNLL2003", "CoNLL2004", "PHEE"]


def data_options(args) -> dict:
    """``UIEDataModule`` arguments naming the data of this run."""
    return {"data_dir": args.data_dir, "datasets": args.datasets}


def module_for(args, adapter: str, beta: float, prefill: str, policy_prefix: str = "shared"):
    from prouie_pl.grpo import GRPOModule, RolloutSettings
    from prouie_pl.modeling import BaseModelSettings, LoRASettings
    from prouie_pl.uie_module import GenerationSettings

    return GRPOModule(
        base=BaseModelSettings(name_or_path=args.model, dtype=args.dtype),
        lora=LoRASettings(init_adapter=adapter),
        generation=GenerationSettings(max_new_tokens=args.max_new_tokens),
        rollout=RolloutSettings(num_generations=args.generations, temperature=1.0, max_new_tokens=args.max_new_tokens,
                                prefill=prefill),
        advantage="stepwise", beta=beta, learning_rate=2e-4, warmup_steps=0, policy_prefix=policy_prefix,
        micro_batch_size=args.micro_batch_size,
    )


def run_grpo(adapter: str, beta: float, prefill: str, args, policy_prefix: str = "shared", profile: bool = False) -> dict:
    """Train ``warmup + steps`` GRPO steps; per-step stats of the measured steps.  With ``profile`` one more step
    runs under ``torch.profiler`` and its busiest operators come back too (``profile``)."""
    import lightning as L

    from prouie_pl.datamodules import UIEDataModule

    class Collect(L.Callback):
        def __init__(self):
            self.steps: list[dict] = []
            self._cpu = 0.0

            self.prof = None
            self.table: list[list] = []

        def on_train_batch_start(self, trainer, pl_module, *a):
            if profile and len(self.steps) == args.warmup + args.steps:
                import torch.profiler as tp

                self.prof = tp.profile(activities=[tp.ProfilerActivity.CPU], record_shapes=False)
                self.prof.__enter__()
            self._cpu = time.process_time()

        def on_train_batch_end(self, trainer, pl_module, *a):
            if self.prof is not None:
                self.prof.__exit__(None, None, None)
                self.table = profile_rows(self.prof)
                self.prof = None
                return
            self.steps.append({**pl_module.last_step_stats, "cpu": time.process_time() - self._cpu})

    L.seed_everything(args.seed, verbose=False)
    module = module_for(args, adapter, beta, prefill, policy_prefix)
    n_sets = len(args.datasets) if args.datasets else 3
    total = args.warmup + args.steps + int(profile)
    per_dataset = -(-args.prompts * total // n_sets) + 1  # enough prompts for one epoch
    data = UIEDataModule(stage="de", sample_per_dataset=per_dataset, batch_size=args.prompts, max_val_records=0,
                         seed=args.seed, **data_options(args))
    collect = Collect()
    fit_steps(module, data, total, [collect])
    measured = collect.steps[args.warmup:]
    assert len(measured) == args.steps, (len(collect.steps), args.warmup, args.steps)
    return {"steps": measured, "reference_passes": module.reference_passes, "profile": collect.table}


def profile_rows(prof, top: int = 15) -> list[list]:
    """The operators that took the most CPU time in one profiled step (self time, so nested calls count once)."""
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [[e.key, e.count, round(e.self_cpu_time_total / 1e6, 3), round(100 * e.self_cpu_time_total / total, 1)]
            for e in events[:top]]


def compare_rollouts(adapter: str, args) -> dict:
    """``generate_rollouts`` with each prefill mode on the same batches: per mode, one dict per call."""
    import torch

    import prouie_pl.decoding as decoding
    from prouie_pl.chat import chat_prompt_ids
    from prouie_pl.datamodules import UIEDataModule
    from prouie_pl.datamodules.batching import collate_prompts
    from prouie_pl.formats import build_prompt
    from prouie_pl.grpo import RolloutSettings, generate_rollouts
    from prouie_pl.modeling import BaseModelSettings, LoRASettings, load_model, load_tokenizer

    tok = load_tokenizer(args.model)
    model = load_model(BaseModelSettings(name_or_path=args.model, dtype=args.dtype), LoRASettings(init_adapter=adapter))
    n_sets = len(args.datasets) if args.datasets else 3
    data = UIEDataModule(stage="de", sample_per_dataset=-(-args.prompts * args.rollout_repeats // n_sets) + 1,
                         batch_size=args.prompts, max_val_records=0, seed=args.seed, **data_options(args))
    data.connect(tok)
    data.setup("fit")
    records = list(data.train_records)
    torch.manual_seed(args.seed)
    order = torch.randperm(len(records)).tolist()  # batches that mix tasks, as training draws them
    prompts = [(records[i], chat_prompt_ids(tok, build_prompt(records[i], "concise"))) for i in order]
    prefill_s = {"t": 0.0}
    inner = decoding.prefill_shared_cache

    def timed_prefill(*a, **kw):
        t0 = time.perf_counter()
        try:
            return inner(*a, **kw)
        finally:
            prefill_s["t"] += time.perf_counter() - t0

    decoding.prefill_shared_cache = timed_prefill
    calls: dict[str, list[dict]] = {m: [] for m in PREFILL_MODES}
    try:
        for rep in range(args.rollout_repeats):
            chunk = prompts[(rep * args.prompts) % len(prompts):][: args.prompts]
            batch = collate_prompts(tok.pad_token_id)(chunk)
            modes = PREFILL_MODES if rep % 2 == 0 else PREFILL_MODES[::-1]
            for mode in modes:
                settings = RolloutSettings(num_generations=args.generations, temperature=1.0, max_new_tokens=args.max_new_tokens,
                                           prefill=mode)
                torch.manual_seed(args.seed + rep)
                prefill_s["t"] = 0.0
                t0 = time.perf_counter()
                rollout = generate_rollouts(model, tok, batch["input_ids"], batch["attention_mask"], settings)
                dt = time.perf_counter() - t0
                calls[mode].append({"seconds": dt, "prefill": prefill_s["t"], "completions": int(rollout.completion_ids.shape[0]),
                                    "tokens": int(rollout.completion_mask.sum()),
                                    "prompt_tokens": float(batch["attention_mask"].sum(dim=1).float().mean()),
                                    "prompt_width": int(batch["input_ids"].shape[1])})
    finally:
        decoding.prefill_shared_cache = inner
    return calls


def rollout_rows(calls: dict) -> tuple[list[list], float]:
    rows, rate = [], {}
    for mode, cs in calls.items():
        med = statistics.median(c["seconds"] for c in cs)
        per_s = [c["completions"] / c["seconds"] for c in cs]
        rate[mode] = statistics.median(per_s)
        rows.append([mode, len(cs), med, statistics.median(c["prefill"] for c in cs) if mode == "shared" else "-",
                     rate[mode], statistics.median(c["tokens"] / c["seconds"] for c in cs),
                     statistics.fmean(c["tokens"] / c["completions"] for c in cs),
                     statistics.fmean(c["prompt_tokens"] for c in cs), statistics.fmean(c["prompt_width"] for c in cs)])
    return rows, rate["shared"] / rate["repeated"]


def summary_row(prefill: str, policy_prefix: str, beta: float, res: dict, completions: int) -> list:
    steps = res["steps"]
    mean = lambda key: statistics.fmean(s[key] for s in steps)  # noqa: E731
    tokens = sum(s["train/completion_length"] * completions for s in steps)
    wall = sum(s["time/step"] for s in steps)
    return [
        prefill, policy_prefix, beta, len(steps), mean("time/step"), mean("time/generate"), mean("time/reward"), mean("time/reference"),
        mean("time/policy"), completions * len(steps) / wall, tokens / wall, 100 * mean("time/outside_generate_share"),
        100 * sum(s["time/reward"] for s in steps) / wall, mean("train/completion_length"),
        100 * mean("train/zero_spread_groups"), mean("train/reward"), sum(s["cpu"] for s in steps) / wall,
    ]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="base model: tiny or gemma-3-270m (or a local folder)")
    ap.add_argument("--dtype", default=None, help="frozen base dtype (default: float32 for tiny, auto otherwise)")
    ap.add_argument("--data_dir", default=None, help="default: demo for tiny, ../shared/data/uie otherwise")
    ap.add_argument("--datasets", nargs="+", default=None, help=f"default: all for tiny, {' '.join(REAL_DATASETS)} otherwise")
    ap.add_argument("--prompts", type=int, default=4, help="P, prompts per step (data.batch_size)")
    ap.add_argument("--generations", type=int, default=8, help="G, completions per prompt")
    ap.add_argument("--steps", type=int, default=5, help="measured steps per row")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    ap.add_argument("--max_new_tokens", type=int, default=64, help="completion length cap (configs/tiny/de.yaml: 64)")
    ap.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.04], help="one step row per KL weight and prefill mode")
    ap.add_argument("--prefill", nargs="+", default=list(PREFILL_MODES), choices=PREFILL_MODES,
                    help="prefill modes of the step rows")
    ap.add_argument("--rollout_repeats", type=int, default=6, help="batches in the rollout comparison (0: none)")
    ap.add_argument("--policy_prefix", nargs="+", default=["shared"], choices=("shared", "per_row"),
                    help="the policy pass's prompt: once per group (shared) or once per completion (per_row); one step row each")
    ap.add_argument("--micro_batch_size", type=int, default=None, help="completions per policy forward/backward (default: all)")
    ap.add_argument("--profile", action="store_true", help="profile one more step of the first row (torch.profiler, CPU ops)")
    ap.add_argument("--adapter", default=None, help="adapter to start from (default: a short SFT warm-up, see above)")
    ap.add_argument("--sft_steps", type=int, default=30, help="steps of the default SFT warm-up")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default 1 for tiny, torch's choice otherwise; 0: torch's choice)")
    ap.add_argument("--out", default=None, help="default: bench/results/grpo_step.md")
    args = ap.parse_args(argv)
    tiny = args.model == "tiny"
    threads = model_defaults(args, REAL_DATASETS)

    import torch

    if threads:
        torch.set_num_threads(threads)
    load_start = os.getloadavg()[0]
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        adapter = args.adapter
        t_sft = 0.0
        if adapter is None:
            t0 = time.perf_counter()
            adapter = str(sft_warmup_adapter(Path(tmp) / "adapter", args.sft_steps, args.seed, model=args.model, dtype=args.dtype,
                                             sample_per_dataset=16, **data_options(args)))
            t_sft = time.perf_counter() - t0
        calls = compare_rollouts(adapter, args) if args.rollout_repeats else None
        results = {}
        for p in args.prefill:
            for pp in args.policy_prefix:
                for beta in args.betas:
                    results[(p, pp, beta)] = run_grpo(adapter, beta, p, args, pp, profile=args.profile and not results)
    total = time.perf_counter() - t_start

    completions = args.prompts * args.generations
    cmd = " ".join(["python bench/grpo_step.py", *(argv if argv is not None else sys.argv[1:])])
    data_line = f"data {args.data_dir}" + (f" ({', '.join(args.datasets)})" if args.datasets else " (all data sets)")
    parts = [
        f"`{cmd}`; torch threads {torch.get_num_threads()}; load average {load_start:.1f} at start; "
        f"total {total:.0f} s" + (f" (SFT warm-up {t_sft:.0f} s, {args.sft_steps} steps)" if t_sft else f" (adapter {args.adapter})") + ".",
        "",
        f"Base `{args.model}` (frozen weights {args.dtype}), LoRA adapter r=16 on every linear layer; {data_line}; "
        f"P={args.prompts} prompts x G={args.generations} completions ({completions} completions), temperature 1.0, "
        f"at most {args.max_new_tokens} new tokens.",
    ]
    if calls:
        rows, ratio = rollout_rows(calls)
        parts += [
            "", "## Rollouts: each prompt prefilled once against repeated prompts", "",
            f"`generate_rollouts` alone on the same {args.rollout_repeats} batches, both modes per batch (order alternating), "
            "each call seeded alike. Medians over batches.",
            "",
            markdown_table(["prefill", "batches", "median s", "prefill s", "completions/s", "completion tokens/s",
                            "mean completion tokens", "mean prompt tokens", "mean padded prompt width"], rows),
            "",
            f"**Shared / repeated, rollout completions/s (ratio of medians): {ratio:.2f}x** "
            "(target on the real model at P=4, G=8: at least 1.5x).",
        ]
    headers = ["prefill", "policy prompt", "beta", "steps", "step s", "generate s", "reward s", "reference s", "policy s", "completions/s",
               "completion tokens/s", "outside generate %", "reward % of step", "mean completion tokens",
               "zero-spread groups %", "mean reward", "CPU/wall"]
    rows = [summary_row(p, pp, beta, res, completions) for (p, pp, beta), res in results.items()]
    detail = []
    for (p, pp, beta), res in results.items():
        for i, s in enumerate(res["steps"]):
            detail.append([p, pp, beta, args.warmup + i + 1, s["time/step"], s["time/generate"], s["time/reward"], s["time/reference"],
                           s["time/policy"], s["train/completion_length"], s["train/reward"]])
    reward_shares = [r[12] for r in rows]
    parts += [
        "", "## GRPO steps: where the time goes", "",
        f"{args.warmup} untimed step(s), then the mean of {args.steps} measured steps per row; times are seconds per step "
        "from the module's timers.",
        "",
        markdown_table(headers, rows),
        "",
        f"Reward share of a step (SFR rewards + advantages): {', '.join(f'{x:.2f} %' for x in reward_shares)} "
        f"({'below' if max(reward_shares) < 5 else 'NOT below'} the 5 % target). "
        "`outside generate %` is the share of `training_step` not spent in rollouts; `reference s` is 0 "
        "with beta = 0 (no reference pass: "
        + ", ".join(f"{p} prefill, {pp} policy prompt, beta {b}: {res['reference_passes']} reference passes"
                    for (p, pp, b), res in results.items()) + ").",
        "",
        "### Every measured step",
        "",
        markdown_table(["prefill", "policy prompt", "beta", "step", "step s", "generate s", "reward s", "reference s", "policy s",
                        "mean completion tokens", "mean reward"], detail),
    ]
    by_prefix = {pp: [r for r in rows if r[1] == pp] for pp in args.policy_prefix}
    if len(by_prefix) == 2 and all(by_prefix.values()):
        a, b = statistics.fmean(r[4] for r in by_prefix["per_row"]), statistics.fmean(r[4] for r in by_prefix["shared"])
        pa, pb = statistics.fmean(r[8] for r in by_prefix["per_row"]), statistics.fmean(r[8] for r in by_prefix["shared"])
        parts += ["", f"**Policy prompt once per group against once per completion, side by side: step {a:.2f} s -> {b:.2f} s "
                      f"({a / b:.2f}x), policy pass {pa:.2f} s -> {pb:.2f} s ({pa / pb:.2f}x).**"]
    first = next(iter(results.values()))
    if first["profile"]:
        (p, pp, beta) = next(iter(results))
        parts += ["", f"## One more step under the profiler ({p} prefill, {pp} policy prompt, beta {beta})", "",
                  "CPU operators by self time (time inside the operator itself, not in what it calls); the profiler "
                  "slows the step, so shares matter, not seconds.", "",
                  markdown_table(["operator", "calls", "self CPU s", "% of profiled self time"], first["profile"])]
    where = "tiny model" if tiny else args.model
    write_result("grpo_step.md", f"GRPO step time split and rollout prefill ({where}, CPU)", "\n".join(parts), args.out, keep_notes=True)


if __name__ == "__main__":
    main()
