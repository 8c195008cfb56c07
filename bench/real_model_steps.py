"""Where an SFT step, greedy generation and a GRPO step spend their time on Gemma 3 270M, on this machine.

Each stored dtype of the frozen base (``float32``; ``bfloat16`` with the LoRA weights kept in float32) runs in a
process of its own, so peak RSS is that configuration's alone.  Per process:

* prompt lengths: the Gemma tokenizer over the IE prompts of the batch (the label schema makes prompts long
  next to their answers);
* SFT: ``--sft_steps`` timed steps (after one untimed) of ``answer_nll`` + backward + AdamW on a fixed batch of
  ``--batch`` real training examples (concise format, LoRA r=16 on every linear layer), split into the decoder
  forward, the chunked LM head over the answer positions, and backward + optimizer; non-padding tokens/s;
* generation: greedy decoding of exactly ``--gen_tokens`` new tokens at batch 1, 8 and 32, new tokens/s;
* GRPO: ``--grpo_steps`` steps of ``GRPOModule`` (P=4 prompts x G=4 completions, at most 64 new tokens, beta 0)
  with the module's own phase timers (generate, reward, reference, policy).

Data: NER/CoNLL2003, RE/CoNLL2004 and EE/PHEE training sentences from ``../shared/data/uie`` (the bundled
synthetic demo data if that is absent, and the table says so).

    python bench/real_model_steps.py                      # writes bench/results/real_model_steps.md
    python bench/real_model_steps.py --dtypes bfloat16 --sft_steps 1 --grpo_steps 1 --out /tmp/r.md
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

from _common import REPO, SHARED_DATA, markdown_table, write_result  # noqa: E402

MODEL = "gemma-3-270m"
DATASETS = ["CoNLL2003", "CoNLL2004", "PHEE"]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def data_root() -> tuple[str, str]:
    if (SHARED_DATA / "NER").is_dir():
        return str(SHARED_DATA), "CoNLL2003 / CoNLL2004 / PHEE train"
    from prouie_pl.demo_data import demo_data_dir

    return str(demo_data_dir()), "bundled synthetic demo data (../shared/data/uie not found)"


def train_records(n_per_dataset: int):
    from prouie_pl.reader import load_records

    root, _ = data_root()
    datasets = DATASETS if root == str(SHARED_DATA) else None
    recs = load_records(root, "train", datasets=datasets, max_records=200)
    by_ds: dict = {}
    for r in recs:
        if len(by_ds.setdefault(r.dataset, [])) < n_per_dataset and (r.entities or r.relations or r.events):
            by_ds[r.dataset].append(r)
    return [r for rs in by_ds.values() for r in rs]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def child(dtype: str, args) -> dict:
    import torch

    from prouie_pl.chat import chat_prompt_ids, stop_token_ids
    from prouie_pl.datamodules.batching import collate_prompts, collate_sft, encode_sft
    from prouie_pl.formats import build_prompt, render_target
    from prouie_pl.kernels import linear_token_logprobs
    from prouie_pl.kernels.reference import IGNORE_INDEX
    from prouie_pl.modeling import BaseModelSettings, LoRASettings, decoder_and_head, load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = load_tokenizer(MODEL)
    (model, load_s) = timed(lambda: load_model(BaseModelSettings(name_or_path=MODEL, dtype=dtype), LoRASettings(r=16, alpha=32, dropout=0.0)))
    out: dict = {"dtype": dtype, "load_s": load_s}

    recs = train_records(max(1, args.batch // 3 + 1))
    recs = (recs * 4)[: max(args.batch, 32)]
    prompts = [chat_prompt_ids(tok, build_prompt(r, "concise")) for r in recs]
    out["prompt_tokens"] = {"mean": statistics.mean(map(len, prompts)), "max": max(map(len, prompts))}
    examples = [encode_sft(tok, build_prompt(r, "concise"), render_target(r, "concise"), 512) for r in recs[: args.batch]]
    out["answer_tokens_mean"] = statistics.mean(sum(1 for t in e.labels if t != IGNORE_INDEX) for e in examples)
    batch = collate_sft(tok.pad_token_id)(examples)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    real_tokens = int(mask.sum())

    # ---- SFT: decoder forward, head, backward + optimizer
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    decoder, head = decoder_and_head(model)
    model.train()
    parts: dict[str, list[float]] = {"forward (decoder)": [], "LM head (answer positions)": [], "backward + AdamW": [], "step": []}
    for i in range(args.sft_steps + 1):
        t0 = time.perf_counter()
        hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        t1 = time.perf_counter()
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        lp = linear_token_logprobs(hidden[:, :-1][keep], head.weight, targets[keep], bias=head.bias)
        loss = -lp.sum() / max(int(keep.sum()), 1)
        t2 = time.perf_counter()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if i:  # the first step is a warm-up
            for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                parts[k].append(v)
    out["sft"] = {k: statistics.median(v) for k, v in parts.items()}
    out["sft_tokens_per_s"] = real_tokens / out["sft"]["step"]
    out["sft_batch"] = [int(ids.shape[0]), int(ids.shape[1]), real_tokens]

    # ---- greedy generation of exactly gen_tokens new tokens
    model.eval()
    stops = stop_token_ids(tok, model.generation_config)
    gen = {}
    for bs in args.gen_batches:
        pb = collate_prompts(tok.pad_token_id)([(r, p) for r, p in zip(recs[:bs], prompts[:bs])])
        with torch.no_grad():
            _, dt = timed(lambda: model.generate(input_ids=pb["input_ids"], attention_mask=pb["attention_mask"], do_sample=False,
                                                 max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens,
                                                 eos_token_id=stops, pad_token_id=tok.pad_token_id, use_cache=True))
        gen[bs] = {"s": dt, "new_tokens_per_s": bs * args.gen_tokens / dt}
    out["generate"] = gen
    del model, opt
    out["peak_rss_mb_sft_gen"] = peak_rss_mb()

    # ---- GRPO through the module
    if args.grpo_steps:
        out["grpo"] = grpo_steps(dtype, args)
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def grpo_steps(dtype: str, args) -> dict:
    import lightning as L

    sys.path.insert(0, str(REPO / "tests"))
    from training_helpers import stage_config

    from prouie_pl.lightning_cli import build_cli

    root, _ = data_root()

    class Collect(L.Callback):
        def __init__(self):
            self.steps: list[dict] = []

        def on_train_batch_end(self, trainer, pl_module, *a):
            self.steps.append(dict(pl_module.last_step_stats))

    with tempfile.TemporaryDirectory() as tmp:
        cfg = stage_config("de", Path(tmp) / "de.yaml", **{
            "seed_everything": 0,
            "trainer.default_root_dir": str(Path(tmp) / "run"),
            "trainer.max_steps": args.grpo_steps,
            "trainer.limit_val_batches": 0,
            "trainer.callbacks": [],
            "trainer.logger": False,
            "trainer.enable_checkpointing": False,
            "trainer.enable_progress_bar": False,
            "trainer.enable_model_summary": False,
            "model.init_args.base": {"name_or_path": MODEL, "dtype": dtype},
            "model.init_args.lora": {"r": 16, "alpha": 32, "dropout": 0.0},
            "model.init_args.rollout": {"num_generations": 4, "temperature": 1.0, "max_new_tokens": 64},
            "model.init_args.beta": 0.0,
            "data.data_dir": root,
            "data.datasets": DATASETS if root == str(SHARED_DATA) else None,
            "data.sample_per_dataset": 8,
            "data.batch_size": 4,
        })
        cli = build_cli(["--config", str(cfg)], run=False)
        collect = Collect()
        cli.trainer.callbacks.append(collect)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    keys = ["time/step", "time/generate", "time/reward", "time/reference", "time/policy", "train/completion_length"]
    return {k: statistics.median(s.get(k, 0.0) for s in collect.steps) for k in keys}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--sft_steps", type=int, default=3)
    ap.add_argument("--gen_batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--gen_tokens", type=int, default=32)
    ap.add_argument("--grpo_steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args)), flush=True)
        return 0

    results = []
    load0 = os.getloadavg()[0]
    for dtype in args.dtypes:
        cmd = [sys.executable, __file__, "--child", dtype] + [a for a in (argv if argv is not None else sys.argv[1:])]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{dtype} run failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(line[7:]))
    _, data_desc = data_root()
    r0 = results[0]
    body = [f"`python bench/real_model_steps.py {' '.join(argv if argv is not None else sys.argv[1:])}`: {time.strftime('%Y-%m-%d')}, "
            f"{args.threads} torch threads, load average {load0:.1f} at start. Data: {data_desc}; prompts with the Gemma "
            f"tokenizer: mean {r0['prompt_tokens']['mean']:.0f} tokens, max {r0['prompt_tokens']['max']}; answers (concise, with "
            f"`<end_of_turn>`) mean {r0['answer_tokens_mean']:.0f} tokens.",
            "", "## SFT step (LoRA r=16 on every linear layer, batch " + " x ".join(map(str, r0["sft_batch"][:2])) + f", {r0['sft_batch'][2]} non-padding tokens)", ""]
    rows = [[r["dtype"] + (" base, fp32 LoRA" if r["dtype"] == "bfloat16" else ""), *[r["sft"][k] for k in r["sft"]], r["sft_tokens_per_s"], r["peak_rss_mb"]] for r in results]
    body.append(markdown_table(["base dtype", *[f"{k} s" for k in r0["sft"]], "tokens/s", "peak RSS MB"], rows))
    body += ["", f"## Greedy generation ({args.gen_tokens} new tokens per row)", ""]
    rows = [[r["dtype"], int(bs), g["s"], g["new_tokens_per_s"]] for r in results for bs, g in r["generate"].items()]
    body.append(markdown_table(["base dtype", "batch", "s", "new tokens/s"], rows))
    if args.grpo_steps:
        body += ["", "## GRPO step (P=4 x G=4, at most 64 new tokens, beta 0; medians of the module's timers)", ""]
        keys = ["time/step", "time/generate", "time/reward", "time/reference", "time/policy"]
        rows = [[r["dtype"], *[r["grpo"][k] for k in keys], r["grpo"]["time/generate"] / max(r["grpo"]["time/step"], 1e-9), r["grpo"]["train/completion_length"]] for r in results]
        body.append(markdown_table(["base dtype", *[k.split("/")[1] + " s" for k in keys], "generate share", "completion tokens"], rows))
    write_result("real_model_steps.md", "Gemma 3 270M on the CPU: SFT, generation and GRPO steps", "\n".join(body), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
