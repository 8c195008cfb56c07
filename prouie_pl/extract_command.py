"""``python -m prouie_pl extract``: a trained model run on your own documents with your own schema.

::

    python -m prouie_pl extract --model outputs/demo/de/adapter --schema schema.yaml --input docs/ --out found.jsonl

Inputs (``--input``): a ``.txt`` file (one document, its id the file name without ``.txt``), a folder of ``.txt``
files (not recursive, in name order), a ``.jsonl`` file with ``{"id": ..., "text": ...}`` per line (a missing id
becomes the line number), or ``-`` for standard input (one document with id ``stdin``, or JSON lines with
``--input_format jsonl``).  Every input is read and checked before the model loads, so a bad file stops the run
at once with one line naming it (exit code 2).

Output (``--out``): one JSON line per document, written and flushed as soon as the document is done, so an
interrupted run keeps what it finished; ``--resume`` skips the ids already in ``--out`` and appends the rest.
See :class:`prouie_pl.extractor.DocumentExtraction` for the fields of a line.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

INPUT_FORMATS = ("auto", "txt", "jsonl")
DESCRIPTION = "Extract entities, relations and events from your own documents with a trained model and your schema."
EPILOG = """example:
  python -m prouie_pl extract --model outputs/demo/de/adapter --schema schema.yaml --input docs/ --out found.jsonl

schema.yaml (any of the three keys; each one present runs its task):
  entities: [person, organization, location]
  relations: [work for, live in]
  events: {attack: [attacker, target, place]}

Each output line: {"id", "entities": [{"text", "type", "start", "end", "score"}], "relations": [{"type", "head", "tail",
"score"}], "events": [{"type", "trigger", "arguments": [{"role", "text", "start", "end", "score"}], "score"}],
"unaligned": [...], "chunks", "truncated_answers", "looped_answers", "cut_windows", "below_threshold", "windows": [{"start", "end",
"sentence_cut", "truncated_tasks"}]} with character offsets into the document; "score" is how sure the model was
of the unit (0-1); "unaligned" keeps what the model named but the text does not hold."""


def decode_utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                         f"convert it first, e.g. iconv -f latin1 -t utf-8") from None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def read_jsonl(text: str, where: str) -> list[tuple[str, str]]:
    docs = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: line {n}: not JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise ValueError(f'{where}: line {n}: needs an object with a string "text" (and an "id")')
        doc_id = obj.get("id", n)
        if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
            raise ValueError(f'{where}: line {n}: "id" must be a string or a number, not {type(doc_id).__name__}')
        docs.append((str(doc_id), obj["text"]))
    return docs


def read_documents(source: str, input_format: str = "auto") -> list[tuple[str, str]]:
    """``(id, text)`` of every document of ``--input``; raises ValueError naming the file for bad input."""
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"--input_format must be one of {', '.join(INPUT_FORMATS)}, not {input_format!r}")
    if source == "-":
        text = decode_utf8(sys.stdin.buffer.read(), "standard input")
        docs = read_jsonl(text, "standard input") if input_format == "jsonl" else [("stdin", text)]
    else:
        path = Path(source)
        if not path.exists():
            raise ValueError(f"--input {source} does not exist")
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix == ".txt" and p.is_file())
            if not files:
                raise ValueError(f"--input {source}: the folder holds no .txt files")
            docs = [(p.stem, decode_utf8(_read_bytes(p), str(p))) for p in files]
        else:
            text = decode_utf8(_read_bytes(path), str(path))
            as_jsonl = input_format == "jsonl" or (input_format == "auto" and path.suffix == ".jsonl")
            docs = read_jsonl(text, str(path)) if as_jsonl else [(path.stem, text)]
    seen: dict[str, int] = {}
    for i, (doc_id, _) in enumerate(docs):
        if doc_id in seen:
            raise ValueError(f"--input {source}: document id {doc_id!r} appears twice (documents {seen[doc_id] + 1} and {i + 1}); ids must be unique")
        seen[doc_id] = i
    return docs


def done_ids(out: Path) -> set[str]:
    """Ids already written to ``out``.  A last line cut off by an interruption is removed from the file."""
    if not out.is_file():
        return set()
    data = out.read_bytes()
    lines = data.split(b"\n")
    ids: set[str] = set()
    keep = len(data)
    pos = 0
    for n, raw in enumerate(lines, start=1):
        start = pos
        pos += len(raw) + 1
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
            ids.add(str(obj["id"]))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            if n == len(lines) or (n == len(lines) - 1 and not lines[-1]):
                keep = start  # the unfinished last line of an interrupted run
                break
            raise ValueError(f"{out}: line {n} is not an output line of extract; cannot --resume into this file") from None
    if keep < len(data):
        with out.open("r+b") as fh:
            fh.truncate(keep)
    if keep and not data[:keep].endswith(b"\n"):
        with out.open("ab") as fh:  # so that the next line starts on a line of its own
            fh.write(b"\n")
    return ids


def run_extract(args) -> int:
    """The ``extract`` command on its parsed options (:func:`prouie_pl.cli.build_parser`)."""
    from .extraction_schema import load_extraction_schema

    schema = load_extraction_schema(args.schema, args.labels_from)
    docs = read_documents(args.input, args.input_format)
    out = Path(args.out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name such as {out / 'extracted.jsonl'}")
    skip: set[str] = set()
    if args.resume:
        skip = done_ids(out)
    elif out.is_file() and out.stat().st_size and not args.overwrite:
        raise ValueError(f"--out {out} already holds results; pass --resume to skip the documents in it, or --overwrite to replace it")
    todo = [(i, t) for i, t in docs if i not in skip]
    print(f"{len(docs)} documents, {len(docs) - len(todo)} already in {out}, {len(todo)} to do", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    mode = "a" if args.resume else "w"
    if not todo:
        if mode == "w":
            out.write_text("", encoding="utf-8")
        return 0
    from .extractor import Extractor

    extractor = Extractor.from_pretrained(args.model, base=args.base, device=args.device, quantization=args.quantization, dtype=args.dtype,
                                          max_input_tokens=args.max_input_tokens, max_new_tokens=args.max_new_tokens,
                                          batch_size=args.batch_size, constrained=args.constrained, target_format=args.format,
                                          threshold=args.threshold, scores=args.scores, loop_guard=args.loop_guard)
    t0 = time.perf_counter()
    n = windows = failures = lost = truncated = looped = cut = below = 0
    with out.open(mode, encoding="utf-8") as fh:
        for result in extractor.iter_extract(todo, schema, total=len(todo), progress=args.progress):
            fh.write(json.dumps(result.to_json(), ensure_ascii=False) + "\n")
            fh.flush()
            n += 1
            windows += result.chunks
            failures += result.parse_failures
            lost += len(result.unaligned)
            truncated += result.truncated_answers
            looped += result.looped_answers
            cut += result.cut_windows
            below += result.below_threshold
    dt = max(time.perf_counter() - t0, 1e-9)
    print(f"wrote {n} documents ({windows} windows) to {out} in {dt:.1f} s ({n / dt:.2f} documents/s); "
          f"{failures} answers did not parse cleanly, {lost} units could not be placed in the text (see 'unaligned'); "
          f"{truncated - looped} answers hit --max_new_tokens {args.max_new_tokens} (raise it to read them whole), "
          f"{looped} answers were ended looping (one block written three times; two copies are kept), "
          f"{cut} windows cut a sentence longer than --max_input_tokens {args.max_input_tokens} allows"
          + (f"; {below} units scored at or below --threshold {args.threshold:g} were dropped" if args.threshold > 0 else ""),
          file=sys.stderr)
    return 0

