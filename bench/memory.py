"""Where the resident memory goes: one process walks through what a pipeline stage does and records, for each
phase, the resident set at its start, the highest it reached during the phase (a thread samples
``/proc/self/statm`` every few milliseconds) and what it held at its end.

Phases, on one base model (``--model``) with one LoRA adapter (r=16 on every linear layer), in the order a
pipeline runs them:

1. ``import``: torch, transformers, peft, Lightning and the package;
2. ``load``: tokenizer and model (frozen base in ``--dtype``, the CPU configs' ``auto``: bf16 with AVX512-BF16);
3. ``sft step`` (x ``--sft_steps``): forward + backward of ``answer_nll`` (or the shared head) on a batch of
   ``--sft_batch`` full-format CM examples, then an AdamW step (its state is created in the first), then the
   heap trimmed as the training modules do on a CPU (``--no_trim``: not);
4. ``release training``: gradients and optimizer dropped, ``gc`` and ``malloc_trim`` (what the pipeline does
   between stages);
5. ``cast float32``: the frozen base cast to float32 for test decoding (the pipeline's ``test_dtype``);
6. ``decode``: greedy decoding of ``--decode`` test prompts in batches of ``--decode_batch``, at most
   ``--max_new_tokens`` new tokens (the test split's decoding);
7. ``grpo rollout`` and ``grpo policy pass`` (``--micro_batch`` completions per forward/backward): ``--prompts`` x ``--generations`` sampled completions and one
   forward + backward of the policy over them (DE's step, without the optimizer).

    python bench/memory.py --model gemma-3-270m --data_dir demo_real --max_new_tokens 240 --micro_batch 8
    PROUIE_CACHE=$(mktemp -d) python bench/memory.py ...   # "load" then includes converting the model
    python bench/memory.py --quick --out /tmp/memory.md      # tiny model, smoke run
"""

from __future__ import annotations

import argparse
import os
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from _common import machine_line, markdown_table, model_defaults, write_result  # noqa: E402

REAL_DATASETS = ["CoNLL2003", "CoNLL2004", "PHEE"]
from prouie_pl.memory import rss_mb, trim_heap  # noqa: E402


class Phases:
    """Per-phase start / peak / end resident memory, the peak from a sampling thread."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.rows, self._peak, self._stop = interval, [], 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, rss_mb())
            time.sleep(self.interval)

    def run(self, name: str, fn, *a, **kw):
        start = rss_mb()
        self._peak = start
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        seconds = time.perf_counter() - t0
        end = rss_mb()
        self.rows.append({"phase": name, "start": start, "peak": max(self._peak, end), "end": end, "seconds": seconds})
        print(f"[memory] {name}: start {start:.0f} MB, peak {max(self._peak, end):.0f}, end {end:.0f} ({seconds:.1f} s)", flush=True)
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--data_dir", default=None)
    ap.add_argument("--datasets", nargs="+", default=None)
    ap.add_argument("--sft_batch", type=int, default=4, help="SFT micro-batch (the CPU configs: 4, two per step)")
    ap.add_argument("--sft_steps", type=int, default=3)
    ap.add_argument("--shared_head", action="store_true", help="SFT steps with the shared prompt head")
    ap.add_argument("--decode", type=int, default=32, help="test prompts decoded")
    ap.add_argument("--decode_batch", type=int, default=32)
    ap.add_argument("--max_new_tokens", type=int, default=160)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--rollout_tokens", type=int, default=96)
    ap.add_argument("--micro_batch", type=int, default=None, help="GRPO completions per forward/backward (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no_trim", action="store_true", help="keep the freed heap pages after each SFT step")
    ap.add_argument("--gradient_checkpointing", action="store_true",
                    help="recompute each layer's activations in backward (base.gradient_checkpointing)")
    ap.add_argument("--cpu_chunk_mb", type=int, default=None,
                    help="LM-head logits per chunk on a CPU, MB as float32 (default: the package's CPU budget)")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny shapes")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.sft_steps, args.decode, args.decode_batch, args.max_new_tokens, args.prompts, args.generations, args.rollout_tokens = 1, 4, 4, 8, 2, 2, 8
    phases = Phases()

    def imports():
        import lightning  # noqa: F401
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401

        import prouie_pl  # noqa: F401

    phases.run("import", imports)
    args.threads = model_defaults(args, REAL_DATASETS)
    import torch

    from prouie_pl.chat import chat_prompt_ids, stop_token_ids
    from prouie_pl.datamodules import UIEDataModule
    from prouie_pl.datamodules.uie import resolve_data_dir
    from prouie_pl.decoding import decode_prompts
    from prouie_pl.formats import build_prompt
    from prouie_pl.grpo import RolloutSettings, generate_rollouts
    from prouie_pl.grpo.module import GRPOModule
    from prouie_pl.grpo.trajectory import Trajectory
    from prouie_pl.modeling import BaseModelSettings, LoRASettings, cast_frozen_base, load_model, load_tokenizer
    from prouie_pl.reader import load_records
    from prouie_pl.sft import answer_nll
    from prouie_pl.shared_prefix import answer_nll_shared_head

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    import prouie_pl.kernels.reference as kernel_reference

    if args.cpu_chunk_mb:
        kernel_reference.CPU_CHUNK_BUDGET_BYTES = args.cpu_chunk_mb * 2**20

    def load():
        tok = load_tokenizer(args.model)
        model = load_model(BaseModelSettings(name_or_path=args.model, dtype=args.dtype or "auto",
                                             gradient_checkpointing=args.gradient_checkpointing), LoRASettings(dropout=0.0))
        model.train()
        return tok, model

    tok, model = phases.run("load", load)
    data = UIEDataModule(stage="cm", schedule="mixed", data_dir=args.data_dir, datasets=args.datasets,
                         max_train_records=args.sft_batch * args.sft_steps * 2, batch_size=args.sft_batch,
                         max_val_records=0, seed=args.seed)
    data.connect(tok)
    data.setup("fit")
    loader = iter(data.train_dataloader())
    batches = [next(loader) for _ in range(args.sft_steps)]
    del loader
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_fn = answer_nll_shared_head if args.shared_head else answer_nll
    shapes = []

    def sft_step(batch):
        nll, n = loss_fn(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        (nll / max(n, 1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not args.no_trim:  # what UIEModule.on_train_batch_end does on a CPU
            trim_heap()
        shapes.append(tuple(batch["input_ids"].shape))

    for k, batch in enumerate(batches):
        phases.run(f"sft step {k + 1} (batch {tuple(batch['input_ids'].shape)})", sft_step, batch)

    def release_training():
        nonlocal opt, batches
        opt, batches = None, None
        trim_heap(collect=True)

    phases.run("release training", release_training)
    phases.run("cast float32", lambda: cast_frozen_base(model, torch.float32))
    records = load_records(resolve_data_dir(args.data_dir), "test", datasets=args.datasets, max_records=max(1, args.decode // 3 + 1))[:args.decode]
    prompts = [chat_prompt_ids(tok, build_prompt(r, "full")) for r in records]
    stops = stop_token_ids(tok, getattr(model, "generation_config", None))

    def decode():
        model.eval()
        with torch.no_grad():
            c = decode_prompts(model, prompts, batch_size=args.decode_batch, max_new_tokens=args.max_new_tokens,
                               stop_ids=stops, pad_id=tok.pad_token_id, with_logprobs=True)
        model.train()
        return c

    completions = phases.run(f"decode ({len(prompts)} prompts, batch {args.decode_batch}, cap {args.max_new_tokens})", decode)
    del completions
    phases.run("release decoding", trim_heap, collect=True)
    de = UIEDataModule(stage="de", data_dir=args.data_dir, datasets=args.datasets, sample_per_dataset=args.prompts,
                       batch_size=args.prompts, max_val_records=0, seed=args.seed)
    de.connect(tok)
    de.setup("fit")
    batch = next(iter(de.train_dataloader()))

    def rollout():
        settings = RolloutSettings(num_generations=args.generations, temperature=1.0, max_new_tokens=args.rollout_tokens)
        r = generate_rollouts(model, tok, batch["input_ids"], batch["attention_mask"], settings)
        model.train()
        adv = torch.randn(r.completion_mask.shape, generator=torch.Generator().manual_seed(args.seed)) * r.completion_mask
        return Trajectory.from_rollout(r, [], adv, args.generations)

    traj = phases.run(f"grpo rollout ({args.prompts} x {args.generations})", rollout)
    module = GRPOModule(rollout=RolloutSettings(num_generations=args.generations), beta=0.0, skip_zero_advantage=False,
                        micro_batch_size=args.micro_batch)
    module.model = model
    phases.run(f"grpo policy pass (micro-batch {args.micro_batch or 'all'})", module.accumulate_policy_gradients, traj)
    phases.close()

    rows = [[r["phase"], f"{r['start']:.0f}", f"{r['peak']:.0f}", f"{r['peak'] - r['start']:+.0f}", f"{r['end']:.0f}",
             f"{r['seconds']:.1f}"] for r in phases.rows]
    table = markdown_table(["phase", "RSS at start MB", "peak MB", "peak above start MB", "RSS at end MB", "s"], rows)
    params = sum(p.numel() for p in model.parameters())
    body = (f"Model {args.model} ({params / 1e6:.0f}M parameters with the adapter), base dtype {args.dtype or 'auto'} for "
            f"training, float32 for decoding and DE; {machine_line()}; torch threads {args.threads or 'default'}; SFT "
            f"{'shared head' if args.shared_head else 'per row'}, batch {args.sft_batch}"
            f"{', gradient checkpointing' if args.gradient_checkpointing else ''}, LM-head chunks of "
            f"{kernel_reference.CPU_CHUNK_BUDGET_BYTES // 2**20} MB on the CPU, heap {'kept' if args.no_trim else 'trimmed'} after each step; data {args.data_dir or 'tiny demo'}.\n\n"
            f"{table}\n\nPeak over the whole run: {max(r['peak'] for r in phases.rows):.0f} MB.\n")
    print(body)
    name = f"memory_{args.model}.md" if args.model != "tiny" else "memory.md"
    write_result(name, "Where the resident memory goes", body, args.out, keep_notes=True)


if __name__ == "__main__":
    main()
