"""ProUIE-PL against TRL on the same work: SFT and GRPO throughput, side by side, in fresh processes.

Both sides train the same base model (``--model``: the tiny offline Llama ``tiny``, hidden 256, 4 layers,
vocabulary 2,000, by default; ``gemma-3-270m`` for the real model, vocabulary 262,144) with its frozen weights in
the same dtype (``--dtype``: float32 for ``tiny``, ``auto`` otherwise, i.e. bfloat16 on a CPU with native bf16),
LoRA r=16, alpha 32, no dropout, on every linear layer, in float32, without gradient checkpointing, on the same
records: prompts and concise targets of ``RE/CoNLL2004`` and ``NER/CoNLL2003`` from ``../shared/data/uie`` (a
stratified sample of ``--records`` per data set, seeded).

* **SFT**: ``prouie_pl.sft.SFTModule`` under a Lightning ``Trainer`` with ``UIEDataModule`` (length-grouped
  batches, the project default) against TRL's ``SFTTrainer`` given the very same token ids and labels (prompt
  masked, answer and end token trained) as a pre-tokenised data set, with its default random batches.  Batch size,
  learning rate, AdamW, cosine schedule with warm-up and the step count are equal.  Throughput counts the
  non-padding tokens (``attention_mask.sum()``) of each measured step's batch over the wall time between the ends
  of consecutive steps (fetching and collating a batch are inside).
* **GRPO**: ``prouie_pl.grpo.GRPOModule`` against TRL's ``GRPOTrainer``, both from the same adapter (a short
  ProUIE-PL SFT warm-up on the same records, made once per invocation, so that rewards differ within groups), with
  the same outcome reward (``prouie_pl.rewards.sfr_reward(...).outcome``: F1 of the structural units plus the
  format term; ProUIE-PL runs with ``advantage: outcome``), P prompts x G completions per step, the same
  temperature, top-p 1, no top-k, the same completion cap, ``beta = 0``, one update pass per batch, ``dapo`` loss
  aggregation (TRL's default), group-scaled rewards, clip 0.2, gradient norm 1.0.  Rollout time is TRL's
  ``generate`` (timed by a wrapper that also counts completion tokens up to and including the first stop token,
  :func:`prouie_pl.chat.stop_token_ids`) and ProUIE-PL's ``generate`` phase of its own timers (the prompts'
  shared prefill and ``generate``; its rollouts count tokens the same way).  Step time is the wall time between
  the ends of consecutive steps.

  ProUIE-PL leaves the completions of groups whose advantages are all zero out of the backward pass (with
  ``beta = 0`` their loss and gradient are exactly zero, so the update is the same); TRL runs them.  The table
  records the share of such groups.

Two extra rows say how much of the gap one difference explains: ``trl-grouped`` is TRL's ``SFTTrainer`` with
length-grouped batches too (``train_sampling_strategy="group_by_length"``), ``prouie-pl-noskip`` is ProUIE-PL's
GRPO with ``skip_zero_advantage=False``.  The headline ratios compare the defaults (``prouie-pl`` / ``trl``).

Runs alternate (ours, TRL, ours, TRL, ...) in fresh Python processes, each with untimed warm-up steps; the table
gives the median of the per-run throughputs and the ratio of the medians, plus the ratio of each pair, and each
process's peak resident memory (``ru_maxrss``: the model, the optimizer state and everything the run touched).

    pip install -e ".[bench]"                          # TRL, only for this benchmark
    python bench/compare_trl.py                        # writes bench/results/compare_trl.md
    python bench/compare_trl.py --repeats 1 --sft_steps 4 --grpo_steps 2 --out /tmp/compare_trl.md   # smoke run
    python bench/compare_trl.py --model gemma-3-270m --records 32 --batch_size 8 --prompts 4 --generations 4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fit_steps, markdown_table, require_shared_data, sft_warmup_adapter, write_result  # noqa: E402

DATASETS = ["RE/CoNLL2004", "NER/CoNLL2003"]
SIDES = {"sft": ("prouie-pl", "trl", "trl-grouped"), "grpo": ("prouie-pl", "prouie-pl-noskip", "trl")}


# ------------------------------------------------------------------------------------------ shared pieces


def select_records(args) -> list:
    """The stratified, seeded sample both sides train on (the SA stage's own sampler)."""
    from prouie_pl.datamodules import UIEDataModule

    dm = UIEDataModule(data_dir=args.data_dir, stage="sa", datasets=DATASETS, sample_per_dataset=args.records,
                       batch_size=args.batch_size, max_val_records=0, max_seq_length=args.max_seq_length, seed=args.seed)
    dm.setup("fit")
    return dm.train_records


def sft_examples(args, tokenizer) -> list[dict]:
    from prouie_pl.datamodules.batching import encode_sft
    from prouie_pl.formats import example

    out = []
    for rec in select_records(args):
        prompt, target = example(rec, "concise")
        enc = encode_sft(tokenizer, prompt, target, args.max_seq_length)
        if enc is not None:
            out.append({"input_ids": enc.input_ids, "labels": enc.labels})
    return out


class TimedGenerate:
    """Wraps a model's ``generate``: wall time and completion tokens (to the first stop token, inclusive, as
    GRPO rollouts count them)."""

    def __init__(self, model, stop_ids: list[int]):
        self.inner = model.generate
        self.stop_ids = stop_ids
        self.calls: list[dict] = []

    def __call__(self, *a, **kw):
        from prouie_pl.decoding import completion_mask

        t0 = time.perf_counter()
        out = self.inner(*a, **kw)
        dt = time.perf_counter() - t0
        mask, _ = completion_mask(out[:, kw["input_ids"].shape[1]:], self.stop_ids)
        self.calls.append({"seconds": dt, "completions": int(mask.shape[0]), "tokens": int(mask.sum())})
        return out


def step_clock():
    """Wall time between consecutive step ends; the first call only starts the clock."""
    state = {"t": None}

    def tick() -> float | None:
        now = time.perf_counter()
        prev, state["t"] = state["t"], now
        return None if prev is None else now - prev

    return tick


# ------------------------------------------------------------------------------------------ workers


def worker_warmup(args) -> dict:
    """A short ProUIE-PL SFT run from a fresh adapter; both GRPO sides start from it."""
    sft_warmup_adapter(args.adapter, args.warmup_adapter_steps, args.seed, model=args.model, dtype=args.dtype,
                       data_dir=args.data_dir, datasets=DATASETS, sample_per_dataset=args.records,
                       max_seq_length=args.max_seq_length)
    return {"adapter": args.adapter, "steps": args.warmup_adapter_steps}


def lora_settings(init_adapter: str | None = None):
    from prouie_pl.modeling import LoRASettings

    return LoRASettings(r=16, alpha=32, dropout=0.0, target_modules="all-linear", init_adapter=init_adapter)


def worker_sft_ours(args) -> dict:
    import lightning as L

    from prouie_pl.datamodules import UIEDataModule
    from prouie_pl.modeling import BaseModelSettings
    from prouie_pl.sft import SFTModule

    tick = step_clock()
    steps: list[dict] = []

    class Clock(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            dt = tick()
            if dt is not None:
                am = batch["attention_mask"]
                steps.append({"seconds": dt, "tokens": int(am.sum()), "positions": int(am.numel())})

    L.seed_everything(args.seed, verbose=False)
    module = SFTModule(base=BaseModelSettings(name_or_path=args.model, dtype=args.dtype), lora=lora_settings(), learning_rate=args.lr,
                       warmup_ratio=0.1)
    data = UIEDataModule(data_dir=args.data_dir, stage="sa", datasets=DATASETS, sample_per_dataset=args.records,
                         batch_size=args.batch_size, max_val_records=0, max_seq_length=args.max_seq_length, seed=args.seed)
    fit_steps(module, data, args.warmup + args.sft_steps, [Clock()])
    return {"steps": steps[args.warmup - 1:]}  # the clock starts at the end of step 1


def worker_sft_trl(args, grouped: bool = False) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from prouie_pl.modeling import load_tokenizer, resolve_dtype, resolve_model_path

    path = resolve_model_path(args.model)
    tok = load_tokenizer(args.model)
    examples = sft_examples(args, tok)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(args.dtype))
    tick = step_clock()
    batches: list[dict] = []
    steps: list[dict] = []

    base_collator = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)

    def collate(items):
        batch = base_collator(items)
        am = batch["attention_mask"]
        batches.append({"tokens": int(am.sum()), "positions": int(am.numel())})
        return batch

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            dt = tick()
            if dt is not None:
                steps.append({"seconds": dt, **batches[state.global_step - 1]})

    cfg = SFTConfig(
        output_dir=args.tmp, per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
        max_steps=args.warmup + args.sft_steps, lr_scheduler_type="cosine", warmup_steps=max(1, int(0.1 * (args.warmup + args.sft_steps))),
        logging_steps=1, report_to=[], save_strategy="no", gradient_checkpointing=False, bf16=False, fp16=False,
        use_cpu=True, dataloader_num_workers=0, max_length=args.max_seq_length, seed=args.seed, packing=False,
        weight_decay=0.0, max_grad_norm=1.0, disable_tqdm=True,
        train_sampling_strategy="group_by_length" if grouped else "random",
    )
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(examples), processing_class=tok,
                         peft_config=peft_config, data_collator=collate, callbacks=[Clock()])
    trainer.train()
    return {"steps": steps[args.warmup - 1:]}


def worker_grpo_ours(args, skip: bool = True) -> dict:
    import lightning as L

    from prouie_pl.datamodules import UIEDataModule
    from prouie_pl.grpo import GRPOModule, RolloutSettings
    from prouie_pl.modeling import BaseModelSettings
    from prouie_pl.uie_module import GenerationSettings

    tick = step_clock()
    steps: list[dict] = []
    completions = args.prompts * args.generations

    class Clock(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            dt = tick()
            stats = pl_module.last_step_stats
            steps.append({"seconds": dt, "generate": stats["time/generate"], "completions": completions,
                          "tokens": round(stats["train/completion_length"] * completions), "reward": stats["train/reward"],
                          "zero_spread": stats["train/zero_spread_groups"]})

    L.seed_everything(args.seed, verbose=False)
    module = GRPOModule(
        base=BaseModelSettings(name_or_path=args.model, dtype=args.dtype), lora=lora_settings(args.adapter),
        generation=GenerationSettings(max_new_tokens=args.max_new_tokens),
        rollout=RolloutSettings(num_generations=args.generations, temperature=args.temperature, top_p=1.0,
                                max_new_tokens=args.max_new_tokens),
        advantage="outcome", scale_rewards="group", beta=0.0, num_iterations=1, loss_type="dapo",
        epsilon_low=0.2, epsilon_high=0.2, learning_rate=args.grpo_lr, warmup_steps=0, max_grad_norm=1.0,
        skip_zero_advantage=skip,
    )
    data = UIEDataModule(data_dir=args.data_dir, stage="de", datasets=DATASETS, sample_per_dataset=args.records,
                         batch_size=args.prompts, max_val_records=0, max_seq_length=args.max_seq_length, seed=args.seed)
    fit_steps(module, data, args.warmup + args.grpo_steps, [Clock()])
    return {"steps": [s for s in steps if s["seconds"] is not None][args.warmup - 1:]}


def worker_grpo_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from prouie_pl.chat import stop_token_ids
    from prouie_pl.formats import build_prompt
    from prouie_pl.modeling import load_tokenizer, resolve_dtype, resolve_model_path
    from prouie_pl.rewards import completion_token_ends, sfr_reward

    path = resolve_model_path(args.model)
    tok = load_tokenizer(args.model)
    tok.padding_side = "left"
    records = select_records(args)
    rows = [{"prompt": [{"role": "user", "content": build_prompt(r, "concise")}], "record_index": i} for i, r in enumerate(records)]
    base = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(args.dtype))
    model = PeftModel.from_pretrained(base, args.adapter, is_trainable=True)
    last: dict = {}

    def outcome_reward(prompts, completions, completion_ids, record_index, **kw):
        out = []
        for ids, i in zip(completion_ids, record_index):
            text, ends = completion_token_ends(tok, ids)
            out.append(sfr_reward(text, ends, records[i], n_tokens=len(ids)).outcome)
        rewards = torch.tensor(out).view(-1, args.generations)
        last["reward"] = float(rewards.mean())
        last["zero_spread"] = float((rewards.std(dim=1) == 0).float().mean())
        return out

    tick = step_clock()
    steps: list[dict] = []
    timer: dict = {}

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            dt = tick()
            call = timer["gen"].calls[-1]
            steps.append({"seconds": dt, "generate": call["seconds"], "completions": call["completions"],
                          "tokens": call["tokens"], "reward": last["reward"], "zero_spread": last["zero_spread"]})

    n = args.prompts * args.generations
    cfg = GRPOConfig(
        output_dir=args.tmp, per_device_train_batch_size=n, num_generations=args.generations,
        max_completion_length=args.max_new_tokens, temperature=args.temperature, top_p=1.0, top_k=0,
        beta=0.0, num_iterations=1, loss_type="dapo", scale_rewards="group", epsilon=0.2, learning_rate=args.grpo_lr,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, max_steps=args.warmup + args.grpo_steps,
        logging_steps=1, report_to=[], save_strategy="no", gradient_checkpointing=False, bf16=False, fp16=False,
        use_cpu=True, dataloader_num_workers=0, seed=args.seed, disable_tqdm=True, weight_decay=0.0,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=outcome_reward, args=cfg, train_dataset=Dataset.from_list(rows),
                          processing_class=tok, callbacks=[Clock()])
    timer["gen"] = TimedGenerate(trainer.model, stop_token_ids(tok, getattr(base, "generation_config", None)))
    trainer.model.generate = timer["gen"]
    trainer.train()
    return {"steps": [s for s in steps if s["seconds"] is not None][args.warmup - 1:]}


WORKERS = {
    ("warmup", "prouie-pl"): worker_warmup,
    ("sft", "prouie-pl"): worker_sft_ours,
    ("sft", "trl"): worker_sft_trl,
    ("sft", "trl-grouped"): lambda args: worker_sft_trl(args, grouped=True),
    ("grpo", "prouie-pl"): worker_grpo_ours,
    ("grpo", "prouie-pl-noskip"): lambda args: worker_grpo_ours(args, skip=False),
    ("grpo", "trl"): worker_grpo_trl,
}


def run_worker(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        result = WORKERS[(args.worker, args.side)](args)
    result["threads"] = torch.get_num_threads()
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux
    Path(args.result).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------ orchestration


def spawn(args, worker: str, side: str, work: Path, tag: str) -> dict:
    result = work / f"{tag}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", worker, "--side", side, "--result", str(result),
           *args.passthrough]
    log = work / f"{tag}.log"
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"[compare_trl] {worker}/{side} failed (exit {proc.returncode}); log {log}:\n{tail}")
    out = json.loads(result.read_text())
    out["process_seconds"] = time.perf_counter() - t0
    print(f"[compare_trl] {tag}: {summarise(worker, out)}", flush=True)
    return out


def summarise(worker: str, res: dict) -> str:
    steps = res.get("steps", [])
    if worker == "sft":
        m = sft_metrics(res)
        return f"{len(steps)} steps, {m['tok_s']:,.0f} non-pad tok/s, padding {100 * m['padding']:.1f}%"
    if worker == "grpo":
        m = grpo_metrics(res)
        return (f"{len(steps)} steps, {m['comp_s']:.2f} completions/s, {m['tok_s']:.1f} completion tok/s, "
                f"step {m['step']:.2f} s (generate {m['generate']:.2f} s)")
    return "done"


def sft_metrics(res: dict) -> dict:
    steps = res["steps"]
    secs = sum(s["seconds"] for s in steps)
    tokens = sum(s["tokens"] for s in steps)
    return {"tok_s": tokens / secs, "padding": 1 - tokens / sum(s["positions"] for s in steps), "step": secs / len(steps)}


def peak_rss(res: dict) -> float:
    """Peak resident memory of the run's process, MB."""
    return float(res["peak_rss_mb"])


def grpo_metrics(res: dict) -> dict:
    steps = res["steps"]
    secs = sum(s["seconds"] for s in steps)
    gen = sum(s["generate"] for s in steps)
    return {"comp_s": sum(s["completions"] for s in steps) / secs, "tok_s": sum(s["tokens"] for s in steps) / secs,
            "step": secs / len(steps), "generate": gen / len(steps), "rest": (secs - gen) / len(steps),
            "length": sum(s["tokens"] for s in steps) / sum(s["completions"] for s in steps),
            "reward": statistics.fmean(s["reward"] for s in steps),
            "zero_spread": statistics.fmean(s["zero_spread"] for s in steps)}


def build_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="base model on both sides: tiny or gemma-3-270m (or a local folder)")
    ap.add_argument("--dtype", default=None, help="frozen base dtype on both sides (default: float32 for tiny, auto otherwise)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per side and workload (interleaved)")
    ap.add_argument("--records", type=int, default=64, help="records per data set (stratified, seeded)")
    ap.add_argument("--batch_size", type=int, default=8, help="SFT batch size")
    ap.add_argument("--max_seq_length", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-4, help="SFT learning rate")
    ap.add_argument("--sft_steps", type=int, default=16, help="measured SFT steps per run")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of every run (at least 2)")
    ap.add_argument("--prompts", type=int, default=8, help="GRPO prompts per step (P)")
    ap.add_argument("--generations", type=int, default=4, help="GRPO completions per prompt (G)")
    ap.add_argument("--max_new_tokens", type=int, default=64, help="GRPO completion cap")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--grpo_lr", type=float, default=1e-5)
    ap.add_argument("--grpo_steps", type=int, default=6, help="measured GRPO steps per run")
    ap.add_argument("--warmup_adapter_steps", type=int, default=120, help="SFT steps of the adapter GRPO starts from")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads in every run (0: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=["sft", "grpo"], default=None, help="run one workload only")
    ap.add_argument("--data_dir", default=None, help="default: ../shared/data/uie")
    ap.add_argument("--out", default=None, help="default: bench/results/compare_trl.md")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--side", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--adapter", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.warmup < 2:
        ap.error("--warmup must be at least 2 (the step clock starts at the end of the first step)")
    args.dtype = args.dtype or ("float32" if args.model == "tiny" else "auto")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_args(argv)
    if args.worker:
        run_worker(args)
        return 0
    try:
        import trl  # noqa: F401
    except ImportError:
        sys.exit('this benchmark needs TRL: pip install -e ".[bench]"')
    args.data_dir = args.data_dir or str(require_shared_data())
    import torch
    import transformers

    from prouie_pl.modeling import resolve_model_path

    resolve_model_path(args.model)  # build or convert the model once, outside the timed runs
    load_start = os.getloadavg()[0]
    t_start = time.perf_counter()
    cleaned, skip = [], False  # the workers' arguments: everything but --out, --only, --repeats
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--out", "--only", "--repeats"):
            skip = True
            continue
        if a.startswith(("--out=", "--only=", "--repeats=")):
            continue
        cleaned.append(a)
    with tempfile.TemporaryDirectory(prefix="compare_trl_") as tmp:
        work = Path(tmp)
        adapter = work / "warm_adapter"
        args.passthrough = [*cleaned, "--data_dir", args.data_dir, "--adapter", str(adapter)]
        runs: dict = {w: {s: [] for s in sides} for w, sides in SIDES.items()}
        workloads = [w for w in ("sft", "grpo") if args.only in (None, w)]
        if "grpo" in workloads:
            spawn(args, "warmup", "prouie-pl", work, "warmup")
        for w in workloads:
            for rep in range(args.repeats):
                for side in SIDES[w]:
                    runs[w][side].append(spawn(args, w, side, work, f"{w}-{side}-{rep + 1}"))
    total = time.perf_counter() - t_start

    import trl as trl_mod

    versions = (f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl_mod.__version__}, "
                f"lightning {__import__('lightning').__version__}, peft {__import__('peft').__version__}")
    threads = sorted({r["threads"] for w in workloads for s in SIDES[w] for r in runs[w][s]})
    cmd = " ".join(["python bench/compare_trl.py", *argv])
    parts = [
        f"`{cmd}`; {versions}; torch threads {', '.join(map(str, threads))}; load average {load_start:.1f} at start; "
        f"total {total / 60:.1f} min.",
        "",
        f"Same work on both sides: base `{args.model}` (frozen weights {args.dtype}), LoRA r=16 / alpha 32 / dropout 0 on "
        f"every linear layer in float32, no gradient checkpointing; data {', '.join(DATASETS)} train, {args.records} records per data set "
        f"(stratified, seed {args.seed}), concise targets. {args.repeats} run(s) per side, alternating "
        f"(SFT: {', '.join(SIDES['sft'])}, ...; GRPO: {', '.join(SIDES['grpo'])}, ...), each a fresh process with "
        f"{args.warmup} untimed step(s) first. The headline ratios compare each side's defaults (`prouie-pl` against "
        "`trl`); the extra rows show how much of the gap one difference explains: `trl-grouped` is TRL with "
        "`train_sampling_strategy=\"group_by_length\"`, `prouie-pl-noskip` runs the backward pass of every completion.",
    ]
    real = args.model != "tiny"
    sft_target = "target on the real model at least 2x" if real else "target at least 1.5x"
    grpo_target = "target on the real model at least 2.5x completions/s" if real else "targets at least 1.5x"
    if "sft" in workloads:
        rows, pairs = [], []
        med, rss = {}, {}
        for side in SIDES["sft"]:
            ms = [sft_metrics(r) for r in runs["sft"][side]]
            med[side] = statistics.median(m["tok_s"] for m in ms)
            rss[side] = statistics.median(peak_rss(r) for r in runs["sft"][side])
            rows.append([side, len(runs["sft"][side]), args.sft_steps, statistics.median(m["step"] for m in ms),
                         f"{100 * statistics.median(m['padding'] for m in ms):.1f}%",
                         ", ".join(f"{m['tok_s']:,.0f}" for m in ms), med[side], rss[side]])
        pairs = [sft_metrics(a)["tok_s"] / sft_metrics(b)["tok_s"] for a, b in zip(runs["sft"]["prouie-pl"], runs["sft"]["trl"])]
        ratio = med["prouie-pl"] / med["trl"]
        ratio_grouped = med["prouie-pl"] / med["trl-grouped"]
        parts += [
            "", "### SFT: non-padding tokens per second", "",
            f"Batch size {args.batch_size}, AdamW lr {args.lr}, cosine schedule with warm-up, answer-only loss on both sides; "
            f"{args.sft_steps} measured steps per run. ProUIE-PL: `SFTModule` + `UIEDataModule` (length-grouped batches, "
            "the default; answer log-probs through the chunked LM head, no full logits). TRL: `SFTTrainer` on the same "
            "token ids and labels, default random batches, its default logging (loss, entropy, token accuracy).",
            "",
            markdown_table(["side", "runs", "measured steps", "median step s", "median padding", "non-pad tok/s per run",
                            "median non-pad tok/s", "median peak RSS MB"], rows),
            "",
            f"**ProUIE-PL / TRL, SFT non-padding tokens/s (ratio of medians): {ratio:.2f}x** ({sft_target}); "
            f"per pair: {', '.join(f'{p:.2f}x' for p in pairs)}. Against TRL with length-grouped batches too: "
            f"{ratio_grouped:.2f}x. **Peak RSS, ProUIE-PL / TRL: {rss['prouie-pl'] / rss['trl']:.2f}**"
            + (" (target on the real model at most 0.33)." if real else "."),
        ]
    if "grpo" in workloads:
        rows = []
        med, rss = {}, {}
        for side in SIDES["grpo"]:
            ms = [grpo_metrics(r) for r in runs["grpo"][side]]
            med[side] = {k: statistics.median(m[k] for m in ms) for k in ms[0]}
            rss[side] = statistics.median(peak_rss(r) for r in runs["grpo"][side])
            rows.append([side, len(ms), med[side]["step"], med[side]["generate"], med[side]["rest"],
                         f"{100 * med[side]['generate'] / med[side]['step']:.0f}%", med[side]["comp_s"], med[side]["tok_s"],
                         med[side]["length"], med[side]["reward"], f"{100 * med[side]['zero_spread']:.0f}%", rss[side]])
        pair_c = [grpo_metrics(a)["comp_s"] / grpo_metrics(b)["comp_s"] for a, b in zip(runs["grpo"]["prouie-pl"], runs["grpo"]["trl"])]
        pair_t = [grpo_metrics(a)["tok_s"] / grpo_metrics(b)["tok_s"] for a, b in zip(runs["grpo"]["prouie-pl"], runs["grpo"]["trl"])]
        rc = med["prouie-pl"]["comp_s"] / med["trl"]["comp_s"]
        rt = med["prouie-pl"]["tok_s"] / med["trl"]["tok_s"]
        rc_all = med["prouie-pl-noskip"]["comp_s"] / med["trl"]["comp_s"]
        rt_all = med["prouie-pl-noskip"]["tok_s"] / med["trl"]["tok_s"]
        parts += [
            "", "### GRPO: completions per second", "",
            f"P={args.prompts} prompts x G={args.generations} completions per step, temperature {args.temperature}, "
            f"top-p 1, at most {args.max_new_tokens} new tokens, beta 0, one pass per batch, dapo aggregation, "
            f"lr {args.grpo_lr}, outcome reward (F1 + format term) on both sides, from the same adapter "
            f"({args.warmup_adapter_steps} ProUIE-PL SFT steps on the same records); {args.grpo_steps} measured steps per "
            "run. Medians over runs; `generate s` is the rollout time (ProUIE-PL: each prompt prefilled once, then "
            "`generate`; TRL: its `generate`), `rest` is the step minus that (log-probs, loss, backward, optimizer, "
            "rewards, the trainer's own work).",
            "",
            markdown_table(["side", "runs", "step s", "generate s", "rest s", "generate share", "completions/s",
                            "completion tokens/s", "mean completion tokens", "mean reward", "zero-spread groups",
                            "median peak RSS MB"], rows),
            "",
            f"**ProUIE-PL / TRL, GRPO completions/s (ratio of medians): {rc:.2f}x; completion tokens/s: {rt:.2f}x** "
            f"({grpo_target}); peak RSS ProUIE-PL / TRL {rss['prouie-pl'] / rss['trl']:.2f}; per pair, completions/s: {', '.join(f'{p:.2f}x' for p in pair_c)}; "
            f"completion tokens/s: {', '.join(f'{p:.2f}x' for p in pair_t)}.",
            "",
            "ProUIE-PL leaves completions whose group has no reward spread out of the backward pass (beta 0: their loss "
            "and gradient are exactly zero, `tests/test_grpo.py` checks that the gradient is unchanged; the share of "
            "such groups is in the last column); TRL computes them. Without the skip (`prouie-pl-noskip`): "
            f"{rc_all:.2f}x completions/s and {rt_all:.2f}x completion tokens/s against TRL.",
        ]
    where = "tiny model" if args.model == "tiny" else args.model
    write_result("compare_trl.md", "ProUIE-PL vs TRL on the same work", "\n".join(parts), args.out,
                 section=Path(args.model).name, heading=f"{where}, CPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
