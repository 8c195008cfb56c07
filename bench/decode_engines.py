"""Decoding engines side by side: the decoding loop that drops finished rows (``engine: loop``) against
``model.generate`` (``engine: generate``), which runs every row until the slowest one stops.

Two workloads on one model (``--model``: the tiny offline Llama or Gemma 3 270M), the same prompts for both
engines, the engines interleaved (the order alternates per repeat) and each call seeded alike:

* **greedy**: evaluation-style decoding, ``decode_prompts`` on ``--greedy_batch`` prompts as one batch
  (``batch_size=None``, as ``generate_greedy`` decodes a validation or test batch), at most
  ``--greedy_max_new_tokens`` new tokens; both engines must give the same tokens (counted in ``same tokens``).
* **grpo**: rollout-style sampling, ``generate_rollouts`` on P = ``--prompts`` prompts x G = ``--generations``
  completions (temperature 1.0, shared prefill), at most ``--max_new_tokens`` new tokens.

Per workload and engine: the median wall seconds of a call and the median completions/s and completion tokens/s
over ``--repeats`` calls (after one untimed call of each), the mean completion length and the mean longest
completion of a call (``generate`` runs that many steps for every row), and the rows the model was fed per
call summed over its forward calls (``row-steps``: the loop's saving in forward work; the shared prefill's one
pass over the prompts is not counted).  Completion tokens count each completion up to and including its stop.

Prompts are DE-stage training prompts (concise format): the bundled demo data for the tiny model, the real
NER/CoNLL2003, RE/CoNLL2004 and EE/PHEE prompts from ``../shared/data/uie`` otherwise.  The model: the tiny one
after a short SFT warm-up (``--sft_steps``, so that answers end at different lengths instead of all running to
the limit), another base model as it is unless ``--adapter`` (or ``--sft_steps``) gives one.

    python bench/decode_engines.py --out /tmp/decode_engines.md        # tiny model: check that it runs
    python bench/decode_engines.py --model gemma-3-270m                # writes bench/results/decode_engines_gemma-3-270m.md
    python bench/decode_engines.py --model gemma-3-270m --adapter outputs/gemma-3-270m/sa/adapter
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from _common import markdown_table, model_defaults, sft_warmup_adapter, write_result  # noqa: E402

ENGINES = ("loop", "generate")
WORKLOADS = ("greedy", "grpo")
REAL_DATASETS = ["CoNLL2003", "CoNLL2004", "PHEE"]


class RowSteps:
    """Forward calls of the causal LM (under a PEFT wrapper, its base model, which both engines call) and the
    rows fed to them."""

    def __init__(self, model):
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.calls = self.rows = 0
        self.handle = inner.register_forward_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs, out) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.calls += 1
        self.rows += int(ids.shape[0]) if ids is not None else 0

    def reset(self) -> None:
        self.calls = self.rows = 0


def load_prompts(tok, args) -> list:
    """``(record, prompt ids)`` of DE training records in a seeded random order (tasks mixed)."""
    import torch

    from prouie_pl.chat import chat_prompt_ids
    from prouie_pl.datamodules import UIEDataModule
    from prouie_pl.formats import build_prompt

    n_sets = len(args.datasets) if args.datasets else 3
    need = (args.repeats + 1) * (args.greedy_batch + args.prompts)
    data = UIEDataModule(stage="de", sample_per_dataset=-(-need // n_sets) + 1, batch_size=args.prompts, max_val_records=0,
                         seed=args.seed, data_dir=args.data_dir, datasets=args.datasets)
    data.connect(tok)
    data.setup("fit")
    records = list(data.train_records)
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(args.seed)).tolist()
    return [(records[i], chat_prompt_ids(tok, build_prompt(records[i], "concise"))) for i in order]


def run(model, tok, prompts: list, args, device) -> dict:
    """Per (workload, engine), one dict per timed call."""
    import torch

    from prouie_pl.chat import stop_token_ids
    from prouie_pl.datamodules.batching import collate_prompts
    from prouie_pl.decoding import decode_prompts
    from prouie_pl.grpo import RolloutSettings, generate_rollouts

    stops = stop_token_ids(tok, getattr(model, "generation_config", None))
    collate = collate_prompts(tok.pad_token_id)
    counter = RowSteps(model)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    at = 0

    def take(n: int) -> list:
        nonlocal at
        chunk = [prompts[(at + i) % len(prompts)] for i in range(n)]
        at += n
        return chunk

    def greedy(chunk, engine):
        return decode_prompts(model, [p for _, p in chunk], batch_size=None, max_new_tokens=args.greedy_max_new_tokens,
                              stop_ids=stops, pad_id=tok.pad_token_id, device=device, engine=engine)

    def grpo(chunk, engine):
        batch = collate(chunk)
        settings = RolloutSettings(num_generations=args.generations, temperature=1.0, max_new_tokens=args.max_new_tokens,
                                   engine=engine)
        r = generate_rollouts(model, tok, batch["input_ids"].to(device), batch["attention_mask"].to(device), settings)
        return r.completion_ids, r.completion_mask

    calls: dict = {(w, e): [] for w in WORKLOADS for e in ENGINES}
    try:
        for rep in range(args.repeats + 1):  # repeat 0: untimed warm-up of both engines
            for workload in WORKLOADS:
                chunk = take(args.greedy_batch if workload == "greedy" else args.prompts)
                outputs = {}
                for engine in (ENGINES if rep % 2 == 0 else ENGINES[::-1]):
                    torch.manual_seed(args.seed + rep)
                    counter.reset()
                    sync()
                    t0 = time.perf_counter()
                    if workload == "greedy":
                        done = greedy(chunk, engine)
                        ids, mask = done.ids, done.mask
                    else:
                        ids, mask = grpo(chunk, engine)
                    sync()
                    dt = time.perf_counter() - t0
                    outputs[engine] = ids
                    lengths = mask.sum(dim=1)
                    calls[(workload, engine)].append({
                        "seconds": dt, "completions": int(ids.shape[0]), "tokens": int(lengths.sum()),
                        "longest": int(lengths.max()), "forwards": counter.calls, "row_steps": counter.rows})
                same = outputs["loop"].shape == outputs["generate"].shape and bool(torch.equal(outputs["loop"], outputs["generate"]))
                for engine in ENGINES:
                    calls[(workload, engine)][-1]["same"] = same
    finally:
        counter.handle.remove()
    return {k: v[1:] for k, v in calls.items()}  # drop the warm-up


def table_rows(calls: dict) -> tuple[list[list], dict]:
    rows, rate = [], {}
    for (workload, engine), cs in calls.items():
        rate[(workload, engine)] = statistics.median(c["completions"] / c["seconds"] for c in cs)
        rows.append([
            workload, engine, len(cs), statistics.median(c["seconds"] for c in cs), rate[(workload, engine)],
            statistics.median(c["tokens"] / c["seconds"] for c in cs), statistics.fmean(c["tokens"] / c["completions"] for c in cs),
            statistics.fmean(c["longest"] for c in cs), statistics.fmean(c["forwards"] for c in cs),
            statistics.fmean(c["row_steps"] for c in cs),
            f"{sum(c['same'] for c in cs)}/{len(cs)}" if workload == "greedy" else "-",
        ])
    return rows, rate


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="base model: tiny or gemma-3-270m (or a local folder)")
    ap.add_argument("--dtype", default=None, help="frozen base dtype (default: float32 for tiny, auto otherwise)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--data_dir", default=None, help="default: demo for tiny, ../shared/data/uie otherwise")
    ap.add_argument("--datasets", nargs="+", default=None, help=f"default: all for tiny, {' '.join(REAL_DATASETS)} otherwise")
    ap.add_argument("--greedy_batch", type=int, default=16, help="prompts per greedy batch (eval_batch_size)")
    ap.add_argument("--greedy_max_new_tokens", type=int, default=None, help="greedy length cap (default: 64 tiny, 128 otherwise)")
    ap.add_argument("--prompts", type=int, default=4, help="P, prompts per rollout batch")
    ap.add_argument("--generations", type=int, default=8, help="G, completions per prompt")
    ap.add_argument("--max_new_tokens", type=int, default=64, help="rollout length cap")
    ap.add_argument("--repeats", type=int, default=6, help="timed calls per workload and engine")
    ap.add_argument("--adapter", default=None, help="LoRA adapter to decode with")
    ap.add_argument("--sft_steps", type=int, default=None,
                    help="steps of an SFT warm-up making the adapter when --adapter is not given (default: 30 tiny, 0 otherwise)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default 1 for tiny, torch's choice otherwise; 0: torch's choice)")
    ap.add_argument("--out", default=None, help="default: bench/results/decode_engines[_MODEL].md")
    args = ap.parse_args(argv)
    tiny = args.model == "tiny"
    if args.greedy_max_new_tokens is None:
        args.greedy_max_new_tokens = 64 if tiny else 128
    if args.sft_steps is None:
        args.sft_steps = 30 if tiny else 0
    threads = model_defaults(args, REAL_DATASETS)

    import torch

    from prouie_pl.modeling import BaseModelSettings, LoRASettings, load_model, load_tokenizer

    if threads:
        torch.set_num_threads(threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    load_start = os.getloadavg()[0]
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        adapter, t_sft = args.adapter, 0.0
        if adapter is None and args.sft_steps > 0:
            t0 = time.perf_counter()
            adapter = str(sft_warmup_adapter(Path(tmp) / "adapter", args.sft_steps, args.seed, model=args.model, dtype=args.dtype,
                                             sample_per_dataset=16, data_dir=args.data_dir, datasets=args.datasets))
            t_sft = time.perf_counter() - t0
        tok = load_tokenizer(args.model)
        model = load_model(BaseModelSettings(name_or_path=args.model, dtype=args.dtype),
                           LoRASettings(init_adapter=adapter) if adapter else None,
                           device=device if device.type == "cuda" else None)
        model.to(device).eval()
        prompts = load_prompts(tok, args)
        calls = run(model, tok, prompts, args, device)
    total = time.perf_counter() - t_start

    rows, rate = table_rows(calls)
    cmd = " ".join(["python bench/decode_engines.py", *(argv if argv is not None else sys.argv[1:])])
    data_line = f"data {args.data_dir}" + (f" ({', '.join(args.datasets)})" if args.datasets else " (all data sets)")
    weights = (f"adapter {args.adapter}" if args.adapter else
               f"LoRA adapter from an SFT warm-up of {args.sft_steps} steps ({t_sft:.0f} s)" if adapter else "no adapter")
    ratios = ", ".join(f"{w}: **{rate[(w, 'loop')] / rate[(w, 'generate')]:.2f}x**" for w in WORKLOADS)
    parts = [
        f"`{cmd}`; device {device}; torch threads {torch.get_num_threads()}; load average {load_start:.1f} at start; "
        f"total {total:.0f} s.",
        "",
        f"Base `{args.model}` (weights {args.dtype}), {weights}; {data_line}. greedy: {args.greedy_batch} prompts a batch, "
        f"at most {args.greedy_max_new_tokens} new tokens; grpo: P={args.prompts} x G={args.generations} "
        f"({args.prompts * args.generations} completions), temperature 1.0, shared prefill, at most {args.max_new_tokens} new tokens. "
        f"Medians over {args.repeats} interleaved calls per row (after one untimed call of each engine), each pair seeded alike.",
        "",
        markdown_table(["workload", "engine", "calls", "median s", "completions/s", "completion tokens/s",
                        "mean completion tokens", "mean longest completion", "forward calls", "row-steps",
                        "same tokens"], rows),
        "",
        f"Loop / generate, completions/s (ratio of medians): {ratios}.",
    ]
    slug = "" if tiny else "_" + re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(args.model).name)
    where = "tiny model" if tiny else args.model
    write_result(f"decode_engines{slug}.md", f"Decoding engines: loop against generate ({where}, {device.type.upper()})",
                 "\n".join(parts), args.out, keep_notes=True)


if __name__ == "__main__":
    main()
