"""SFT training throughput: length-grouped batches against plainly shuffled padded batches.

Both loaders come from the same ``UIEDataModule`` and the same encoded examples; the only difference is its
``group_by_length`` switch:

* ``grouped``: ``LengthGroupedBatchSampler`` with ``group_by_length=True`` (shuffled mega-batches of
  ``16 x batch_size`` examples, each sorted by length and cut into batches, batch order shuffled);
* ``shuffled``: the same sampler with ``group_by_length=False``, i.e. a shuffled permutation cut into
  consecutive batches, the same as ``DataLoader(dataset, batch_size, shuffle=True)``.

One model (the tiny offline Llama, LoRA r=16 on every linear layer, AdamW) trains through both.  Each repeat
runs one full epoch with the grouped loader, then one with the shuffled loader (grouped, shuffled, grouped,
shuffled, ...), both reshuffled with the repeat number as epoch.  A step is forward through
``prouie_pl.sft.answer_loss``, backward and an optimizer step; the timed span of an epoch includes fetching and
collating its batches.  Throughput counts non-padding tokens (``attention_mask.sum()``) per second; the table
reports the median over repeats of each loader and the ratio of the medians.

Data: NER/CoNLL2003 and RE/CoNLL2004 train splits from ../shared/data/uie when present (stratified SA sample,
concise format; 64 per data set by default, i.e. 128 examples, one full mega-batch at batch size 8), otherwise
the bundled demo data.  Process CPU time is recorded next to wall time, as a check on a machine other jobs share.
Torch runs on one thread by default (``--threads``).

    python bench/sft_throughput.py                 # writes bench/results/sft_throughput.md
    python bench/sft_throughput.py --quick --out /tmp/sft_throughput.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from _common import SHARED_DATA, markdown_table, write_result

DEFAULT_DATASETS = ["NER/CoNLL2003", "RE/CoNLL2004"]
MODES = ("grouped", "shuffled")


def build_data(args, tokenizer):
    from prouie_pl.datamodules.uie import UIEDataModule

    real = args.data == "auto" and (SHARED_DATA / "NER").is_dir()
    if args.data not in ("auto", "demo"):
        data_dir, datasets, real = args.data, args.datasets, True
    elif real:
        data_dir, datasets = str(SHARED_DATA), args.datasets
    else:
        data_dir, datasets = "demo", None
    dm = UIEDataModule(data_dir=data_dir, stage="sa", datasets=datasets, sample_per_dataset=args.records_per_dataset,
                       batch_size=args.batch_size, max_seq_length=args.max_seq_length, seed=args.seed)
    dm.connect(tokenizer)
    dm.setup("fit")
    loaders = {}
    for mode in MODES:
        dm.group_by_length = mode == "grouped"
        loaders[mode] = dm.train_dataloader()
    assert loaders["grouped"].dataset.examples == loaders["shuffled"].dataset.examples
    source = f"{data_dir} ({', '.join(datasets) if datasets else 'all data sets'})"
    return dm, loaders, source, real


def build_model(args):
    import torch

    from prouie_pl.modeling import BaseModelSettings, LoRASettings, load_model

    torch.manual_seed(args.seed)
    model = load_model(BaseModelSettings(name_or_path="tiny"), LoRASettings(r=16, alpha=32, target_modules="all-linear"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    return model, opt, sum(p.numel() for p in params)


def train_step(model, opt, batch) -> None:
    from prouie_pl.sft import answer_loss

    loss, _ = answer_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def run_epoch(model, opt, loader, epoch: int, max_steps: int | None) -> dict:
    loader.batch_sampler.set_epoch(epoch)
    real = padded = steps = width = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for batch in loader:
        train_step(model, opt, batch)
        mask = batch["attention_mask"]
        real += int(mask.sum())
        padded += mask.numel()
        width += mask.shape[1]
        steps += 1
        if max_steps is not None and steps >= max_steps:
            break
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": seconds, "cpu": cpu, "tokens": real, "padded": padded, "steps": steps, "width": width,
            "tok_s": real / seconds, "tok_cpu_s": real / cpu}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="default: bench/results/sft_throughput.md")
    ap.add_argument("--quick", action="store_true", help="24 records per data set and 2 repeats (a smoke run)")
    ap.add_argument("--data", default="auto", help="auto (../shared/data/uie if present, else demo), demo, or a data root")
    ap.add_argument("--datasets", nargs="+", default=DEFAULT_DATASETS, help="data sets of a real data root")
    ap.add_argument("--records-per-dataset", type=int, default=None, help="SA sample per data set (default 64, quick 24)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-seq-length", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=None, help="grouped/shuffled epoch pairs (default 4, quick 2)")
    ap.add_argument("--max-steps", type=int, default=None, help="cap on steps per timed epoch (default: whole epoch)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a small machine shared with other jobs, more threads than "
                         "free cores stall on each other and make the times erratic; 0 keeps torch's choice)")
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args(argv)
    if args.records_per_dataset is None:
        args.records_per_dataset = 24 if args.quick else 64
    if args.repeats is None:
        args.repeats = 2 if args.quick else 4

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    t_start = time.perf_counter()
    model, opt, n_trainable = build_model(args)
    from prouie_pl.modeling import load_tokenizer

    _, loaders, source, real_data = build_data(args, load_tokenizer("tiny"))
    dataset = loaders["grouped"].dataset
    lengths = sorted(dataset.lengths())
    print(f"{len(lengths)} examples from {source}; tokens per example min {lengths[0]}, median "
          f"{statistics.median(lengths):.0f}, max {lengths[-1]}", file=sys.stderr)

    # warm-up (untimed): a few steps through each loader
    for mode in MODES:
        run_epoch(model, opt, loaders[mode], epoch=10_000, max_steps=3)

    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for rep in range(args.repeats):
        for mode in MODES:
            r = run_epoch(model, opt, loaders[mode], epoch=rep, max_steps=args.max_steps)
            runs[mode].append(r)
            print(f"  repeat {rep + 1}/{args.repeats} {mode:8s}: {r['steps']} steps, {r['seconds']:.2f} s, "
                  f"{r['tok_s']:,.0f} tok/s (CPU time {r['cpu']:.2f} s, {r['tok_cpu_s']:,.0f} tok/CPU-s), padding {1 - r['tokens'] / r['padded']:.1%}", file=sys.stderr)

    med = {m: statistics.median(r["tok_s"] for r in runs[m]) for m in MODES}
    med_cpu = {m: statistics.median(r["tok_cpu_s"] for r in runs[m]) for m in MODES}
    rows = []
    for m in MODES:
        rs = runs[m]
        tokens = sum(r["tokens"] for r in rs)
        padded = sum(r["padded"] for r in rs)
        steps = sum(r["steps"] for r in rs)
        rows.append([m, rs[0]["steps"], f"{1 - tokens / padded:.1%}", f"{sum(r['width'] for r in rs) / steps:.0f}",
                     f"{statistics.median(r['seconds'] for r in rs):.2f}", f"{med[m]:,.0f}",
                     f"**{med[m] / med['shuffled']:.2f}x**", f"{med_cpu[m]:,.0f}", f"{med_cpu[m] / med_cpu['shuffled']:.2f}x"])
    paired = [g["tok_s"] / s["tok_s"] for g, s in zip(runs["grouped"], runs["shuffled"])]
    paired_cpu = [g["tok_cpu_s"] / s["tok_cpu_s"] for g, s in zip(runs["grouped"], runs["shuffled"])]
    ratio = med["grouped"] / med["shuffled"]
    table = markdown_table(["loader", "steps/epoch", "padding share", "mean batch width (tokens)", "median epoch s",
                            "median non-pad tok/s", "vs shuffled", "median non-pad tok/CPU-s", "vs shuffled (CPU)"],
                           rows)
    given = argv if argv is not None else sys.argv[1:]
    cmd = " ".join(["python bench/sft_throughput.py", *given])
    data_note = "" if real_data else " (../shared/data/uie was not found: the bundled demo data)"
    print(f"grouped / shuffled non-pad tok/s, ratio of medians: {ratio:.2f}x", file=sys.stderr)
    body = "\n".join([
        f"`{cmd}`; torch threads {torch.get_num_threads()}; load average {load_start:.1f} at start"
        + (" (other processes were running: wall times are noisy)" if load_start >= 1.0 else "") + ".",
        "",
        f"Data: {len(lengths)} examples, SA stratified sample of {args.records_per_dataset} per data set from "
        f"{source}{data_note}, concise format, max_seq_length {args.max_seq_length}; tokens per example min "
        f"{lengths[0]}, median {statistics.median(lengths):.0f}, max {lengths[-1]}.",
        f"Model: tiny offline Llama with LoRA r=16 on all linear layers ({n_trainable:,} trainable parameters), "
        f"AdamW lr {args.lr:g}, float32, batch size {args.batch_size} for both loaders.",
        f"Each repeat: one {'epoch' if args.max_steps is None else f'{args.max_steps}-step run'} grouped, then one "
        f"shuffled, over the same examples; {args.repeats} repeats after an untimed 3-step warm-up of each. A step is "
        "`answer_loss` forward, backward and an AdamW step; fetching and collating the batch is inside the timed span.",
        "",
        table,
        "",
        f"**Length-grouped / shuffled, non-padding tokens per second (wall clock, ratio of medians): {ratio:.2f}x** "
        f"(target: at least 1.5x). Per-repeat ratios: {', '.join(f'{p:.2f}' for p in paired)}.",
        f"The same on process CPU time (less sensitive to other jobs on the machine): "
        f"{med_cpu['grouped'] / med_cpu['shuffled']:.2f}x; per repeat {', '.join(f'{p:.2f}' for p in paired_cpu)}.",
        "",
        "Padding share: padded positions / all positions over every timed batch of that loader. Mean batch width: "
        "padded sequence length per batch, averaged over the timed batches. "
        f"Total wall time of the run {time.perf_counter() - t_start:.0f} s.",
    ])
    write_result("sft_throughput.md", "SFT throughput: length-grouped vs shuffled batches", body, args.out)


if __name__ == "__main__":
    main()
