"""Extraction speed and quality with and without schema-constrained decoding.

A trained model (``--model``: a stage's ``adapter/``, an exported folder or an embedded name; nothing is
trained here) reads the first ``--n`` test sentences of NER/CoNLL2003, RE/CoNLL2004 and EE/PHEE, each sentence a
document, through :class:`prouie_pl.extractor.Extractor` with the data set's own schema: once plainly and once
with ``constrained=True``, the two modes alternating per data set (``--repeats`` rounds; the table keeps the
fastest round of each), after a warm-up that builds the token table and the grammars.  Reported per data set
and mode:

* documents/s, and generated tokens/s (tokens up to and including the stop token);
* model forward calls (the prefill and one per decoding step of each batch) and the wall time per call;
* the constraint's own time (the logits processor, timed around each call) as a share of the run, and the
  per-step slowdown it implies, ``1 / (1 - share)``;
* parse-failure rate and strict F1, both from the project's :class:`prouie_pl.scoring.Scorer` on the same
  records (NER F1; RE strict F1; EE the mean of trigger and argument F1).

The time ratio of the two modes compares whole runs, so it also reflects that constrained answers can be
shorter or longer than free ones (an untrained model's free answers stop early or run to the limit); the time
per forward call and the processor share isolate the per-step cost of the constraint.

    python bench/extract.py --model outputs/tiny/de/adapter                  # bench/results/extract_de-adapter.md
    python bench/extract.py --model tiny --n 20 --out /tmp/extract_tiny.md   # check that it runs
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from _common import SHARED_DATA, markdown_table, require_shared_data, write_result

DATASETS = ("NER/CoNLL2003", "RE/CoNLL2004", "EE/PHEE")
MODES = ("plain", "constrained")


def slug(model: str) -> str:
    parts = [p for p in Path(model).parts if p not in ("/", ".", "..")][-2:]
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join(parts)).strip("-") or "model"


class ProcessorClock:
    """Accumulated wall time inside the constraint's logits processor."""

    def __init__(self):
        from prouie_pl import constrained

        self.seconds = 0.0
        self.steps = 0
        cls = constrained.SchemaConstrainedLogits
        inner = cls.__call__
        clock = self

        def timed(proc, input_ids, scores):
            t = time.perf_counter()
            out = inner(proc, input_ids, scores)
            clock.seconds += time.perf_counter() - t
            clock.steps += 1
            return out

        cls.__call__ = timed

    def reset(self) -> None:
        self.seconds, self.steps = 0.0, 0


class ForwardCounter:
    """Forward calls of the model that ``generate`` runs (the base model under a PEFT wrapper)."""

    def __init__(self, model):
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.calls = 0
        inner.register_forward_hook(self._count)

    def _count(self, *args) -> None:
        self.calls += 1


def schema_of(ls):
    from prouie_pl.extraction_schema import ExtractionSchema

    if ls.task == "NER":
        return ExtractionSchema(entities=ls.labels)
    if ls.task == "RE":
        return ExtractionSchema(relations=ls.labels)
    return ExtractionSchema(events={t: ls.roles.get(t, ()) for t in ls.labels})


def run_mode(extractor, records, schema, constrained: bool, clock: ProcessorClock, forwards: ForwardCounter) -> dict:
    from prouie_pl.scoring import Scorer, task_scores

    extractor.constrained = constrained
    clock.reset()
    forwards.calls = 0
    docs = [(str(i), r.sentence) for i, r in enumerate(records)]
    t0 = time.perf_counter()
    results = list(extractor.iter_extract(docs, schema))
    dt = time.perf_counter() - t0
    scorer = Scorer("strict")
    tokens = truncated = multi = 0
    for rec, res in zip(records, results):
        if res.chunks != 1:
            multi += 1
        out = res.outputs[0] if res.outputs else None
        scorer.add(rec, out.output if out else "")
        tokens += sum(o.new_tokens for o in res.outputs)
        truncated += sum(o.truncated for o in res.outputs)
    report = scorer.report()
    first = next(iter(report["tasks"].values()))
    failures = sum(d["parse_failures"] for d in first["datasets"].values())
    return {"seconds": dt, "docs": len(records), "tokens": tokens, "failures": failures, "truncated": truncated,
            "f1": next(iter(task_scores(report).values())), "processor": clock.seconds, "steps": clock.steps, "multi": multi, "forwards": forwards.calls}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a stage's adapter/ folder, an exported model folder, or an embedded name (tiny)")
    ap.add_argument("--base", default=None, help="base model of an adapter (default: its adapter_config.json)")
    ap.add_argument("--n", type=int, default=200, help="test sentences per data set")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--max_new_tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quantization", default="none", choices=("none", "nf4"))
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--data", default=str(SHARED_DATA))
    ap.add_argument("--out", default=None, help="result file (default bench/results/extract_<model>.md)")
    args = ap.parse_args()
    if args.data == str(SHARED_DATA):
        require_shared_data()
    import torch

    from prouie_pl.extractor import Extractor
    from prouie_pl.reader import load_records

    if args.threads:
        torch.set_num_threads(args.threads)
    t = time.perf_counter()
    extractor = Extractor.from_pretrained(args.model, base=args.base, device=args.device, quantization=args.quantization,
                                          max_input_tokens=2048, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    load_s = time.perf_counter() - t
    clock = ProcessorClock()
    forwards = ForwardCounter(extractor.model)
    rows, ratios, notes = [], [], []
    warm = False
    for ds in DATASETS:
        task, name = ds.split("/")
        records = load_records(args.data, "test", [task], [name], args.n)
        schema = schema_of(records[0].schema)
        if not warm:  # token table, grammars, first-call kernels: kept out of the timed runs
            t = time.perf_counter()
            for c in (False, True):
                run_mode(extractor, records[:2], schema, c, clock, forwards)
            warm_s = time.perf_counter() - t
            warm = True
        best: dict = {}
        for _ in range(args.repeats):
            for mode in MODES:
                r = run_mode(extractor, records, schema, mode == "constrained", clock, forwards)
                if mode not in best or r["seconds"] < best[mode]["seconds"]:
                    best[mode] = r
        for mode in MODES:
            r = best[mode]
            rows.append([ds, mode, r["docs"], r["docs"] / r["seconds"], r["tokens"] / r["seconds"], r["forwards"],
                         1e3 * r["seconds"] / max(1, r["forwards"]), 100.0 * r["processor"] / r["seconds"],
                         100.0 * r["failures"] / r["docs"], 100.0 * r["truncated"] / r["docs"], r["f1"]])
            if r["multi"]:
                notes.append(f"{ds} {mode}: {r['multi']} sentences needed more than one window; their first window was scored")
        p, c = best["plain"], best["constrained"]
        share = c["processor"] / c["seconds"]
        ratios.append([ds, c["seconds"] / p["seconds"], (c["seconds"] / max(1, c["forwards"])) / (p["seconds"] / max(1, p["forwards"])),
                       1.0 / max(1e-9, 1.0 - share), 1e3 * c["processor"] / max(1, c["steps"])])
    headers = ["data set", "mode", "docs", "docs/s", "gen tokens/s", "forward calls", "ms/call", "constraint % of time",
               "parse failures %", "truncated %", "strict F1"]
    body = [f"Model `{args.model}`, batch size {args.batch_size}, max_new_tokens {args.max_new_tokens}, {args.n} test sentences per data set, "
            f"best of {args.repeats} round(s); loading took {load_s:.1f} s, warm-up (token table, grammars) {warm_s:.1f} s.", "",
            markdown_table(headers, rows), "",
            markdown_table(["data set", "constrained / plain run time", "constrained / plain time per forward call",
                            "per-step slowdown from the constraint", "constraint ms per step"], ratios)]
    body += [""] + notes if notes else []
    out = args.out or str(Path(__file__).resolve().parent / "results" / f"extract_{slug(args.model)}.md")
    write_result(Path(out).name, "Extraction with and without schema-constrained decoding", "\n".join(body), out)


if __name__ == "__main__":
    main()
