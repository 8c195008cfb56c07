"""GRPO step time on the tiny offline model: where a step's time goes, and throughput.

One ``GRPOModule`` training run per ``beta`` (0: no reference pass; 0.04: a reference pass with the adapter
disabled), ``--warmup`` untimed steps and then ``--steps`` measured ones, each with P prompts x G sampled
completions from the demo data (all three tasks).  The split comes from the module's own timers
(``last_step_stats``): ``generate`` (the batched sampling call), ``reward`` (SFR rewards and advantages),
``reference`` (the no-grad reference pass, and the old-policy pass when ``num_iterations > 1``), ``policy``
(forward, backward and optimizer step of every pass) and ``step`` (all of ``training_step``).  Completion tokens
count each completion up to and including its end token.  Process CPU time over wall time is recorded per row,
as a check on a machine other jobs share.

The adapter the runs start from: with a fresh adapter every completion of the tiny model earns the same reward,
so with ``beta = 0`` no completion would reach the backward pass (groups without reward spread are skipped) and
the policy time would be nil.  By default a short SFT warm-up (``--sft_steps`` on 16 records per data set) makes
an adapter whose answers differ in quality, as at the start of a real DE stage; ``--adapter`` uses a given one.
Both rows start from the same adapter and seed, so their first rollouts are the same.

Torch runs on one thread by default (``--threads``): the tiny model's matrices are small, and on a machine shared
with other jobs extra OpenMP threads mostly wait.

    python bench/grpo_step.py                  # writes bench/results/grpo_step.md
    python bench/grpo_step.py --steps 2 --warmup 1 --out /tmp/grpo_step.md
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

from _common import fit_steps, markdown_table, sft_warmup_adapter, write_result  # noqa: E402


def run_grpo(adapter: str, beta: float, args) -> dict:
    """Train ``warmup + steps`` GRPO steps; per-step stats of the measured steps."""
    import lightning as L

    from prouie_pl.datamodules import UIEDataModule
    from prouie_pl.grpo import GRPOModule, RolloutSettings
    from prouie_pl.modeling import BaseModelSettings, LoRASettings
    from prouie_pl.uie_module import GenerationSettings

    class Collect(L.Callback):
        def __init__(self):
            self.steps: list[dict] = []
            self._cpu = 0.0

        def on_train_batch_start(self, trainer, pl_module, *a):
            self._cpu = time.process_time()

        def on_train_batch_end(self, trainer, pl_module, *a):
            self.steps.append({**pl_module.last_step_stats, "cpu": time.process_time() - self._cpu})

    L.seed_everything(args.seed, verbose=False)
    module = GRPOModule(
        base=BaseModelSettings(name_or_path="tiny"),
        lora=LoRASettings(init_adapter=adapter),
        generation=GenerationSettings(max_new_tokens=args.max_new_tokens),
        rollout=RolloutSettings(num_generations=args.generations, temperature=1.0, max_new_tokens=args.max_new_tokens),
        advantage="stepwise", beta=beta, learning_rate=2e-4, warmup_steps=0,
    )
    per_dataset = -(-args.prompts * (args.warmup + args.steps) // 3) + 1  # enough prompts for one epoch, 3 data sets
    data = UIEDataModule(stage="de", sample_per_dataset=per_dataset, batch_size=args.prompts, max_val_records=0, seed=args.seed)
    collect = Collect()
    fit_steps(module, data, args.warmup + args.steps, [collect])
    measured = collect.steps[args.warmup:]
    assert len(measured) == args.steps, (len(collect.steps), args.warmup, args.steps)
    return {"steps": measured, "reference_passes": module.reference_passes}


def summary_row(beta: float, res: dict, completions: int) -> list:
    steps = res["steps"]
    mean = lambda key: statistics.fmean(s[key] for s in steps)  # noqa: E731
    step_s = mean("time/step")
    tokens = sum(s["train/completion_length"] * completions for s in steps)
    wall = sum(s["time/step"] for s in steps)
    return [
        beta, len(steps), step_s, mean("time/generate"), mean("time/reward"), mean("time/reference"), mean("time/policy"),
        completions * len(steps) / wall, tokens / wall, 100 * mean("time/outside_generate_share"),
        100 * sum(s["time/reward"] for s in steps) / wall, mean("train/completion_length"),
        100 * mean("train/zero_spread_groups"), mean("train/reward"), sum(s["cpu"] for s in steps) / wall,
    ]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=4, help="P, prompts per step (data.batch_size)")
    ap.add_argument("--generations", type=int, default=8, help="G, completions per prompt")
    ap.add_argument("--steps", type=int, default=5, help="measured steps per row")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    ap.add_argument("--max_new_tokens", type=int, default=64, help="completion length cap (configs/tiny/de.yaml: 64)")
    ap.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.04], help="one row per KL weight")
    ap.add_argument("--adapter", default=None, help="adapter to start from (default: a short SFT warm-up, see above)")
    ap.add_argument("--sft_steps", type=int, default=30, help="steps of the default SFT warm-up")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: small matrices; 0 leaves torch's choice)")
    ap.add_argument("--out", default=None, help="default: bench/results/grpo_step.md")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        adapter = args.adapter
        t_sft = 0.0
        if adapter is None:
            t0 = time.perf_counter()
            adapter = str(sft_warmup_adapter(Path(tmp) / "adapter", args.sft_steps, args.seed, sample_per_dataset=16))
            t_sft = time.perf_counter() - t0
        results = {beta: run_grpo(adapter, beta, args) for beta in args.betas}
    total = time.perf_counter() - t_start

    completions = args.prompts * args.generations
    headers = ["beta", "steps", "step s", "generate s", "reward s", "reference s", "policy s", "completions/s",
               "completion tokens/s", "outside generate %", "reward % of step", "mean completion tokens",
               "zero-spread groups %", "mean reward", "CPU/wall"]
    rows = [summary_row(beta, res, completions) for beta, res in results.items()]
    detail = []
    for beta, res in results.items():
        for i, s in enumerate(res["steps"]):
            detail.append([beta, args.warmup + i + 1, s["time/step"], s["time/generate"], s["time/reward"], s["time/reference"],
                           s["time/policy"], s["train/completion_length"], s["train/reward"]])
    cmd = " ".join(["python bench/grpo_step.py", *(argv if argv is not None else sys.argv[1:])])
    reward_shares = [r[10] for r in rows]
    body = "\n".join([
        f"`{cmd}`; torch threads {torch.get_num_threads()}; load average {load_start:.1f} at start; "
        f"total {total:.0f} s" + (f" (SFT warm-up {t_sft:.0f} s, {args.sft_steps} steps)" if t_sft else f" (adapter {args.adapter})") + ".",
        "",
        f"Tiny offline model (`tiny`), LoRA adapter r=16 on every linear layer, stepwise advantages; "
        f"P={args.prompts} prompts x G={args.generations} completions per step ({completions} completions), "
        f"temperature 1.0, at most {args.max_new_tokens} new tokens; {args.warmup} untimed step(s), then the mean of "
        f"{args.steps} measured steps. Times are seconds per step from the module's timers.",
        "",
        markdown_table(headers, rows),
        "",
        f"Reward share of a step (SFR rewards + advantages): {', '.join(f'{x:.2f} %' for x in reward_shares)} "
        f"({'below' if max(reward_shares) < 5 else 'NOT below'} the 5 % target). "
        "`outside generate %` is the share of `training_step` not spent in the sampling call; `reference s` is 0 "
        "with beta = 0 (no reference pass: "
        + ", ".join(f"beta {b}: {res['reference_passes']} reference passes" for b, res in results.items()) + ").",
        "",
        "### Every measured step",
        "",
        markdown_table(["beta", "step", "step s", "generate s", "reward s", "reference s", "policy s", "mean completion tokens",
                        "mean reward"], detail),
    ])
    write_result("grpo_step.md", "GRPO step time split (tiny model, CPU)", body, args.out)


if __name__ == "__main__":
    main()
