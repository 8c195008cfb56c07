"""Data sources through 🤗 datasets: IE INSTRUCTIONS folders, ``load_dataset`` sources and BIO / CoNLL data.

One entry of ``data.sources`` is a :class:`SourceSpec`; the plain ``data.data_dir`` is the one-entry list
``[{format: uie, path: data_dir}]``.  Formats:

* ``uie``: an IE INSTRUCTIONS folder (``ROOT/{NER,RE,EE}/<Dataset>/{split}.json`` + ``labels.json``), read
  and validated by :mod:`prouie_pl.reader` exactly as before, one data set per folder.
* ``records``: a ``load_dataset`` source whose rows hold IE INSTRUCTIONS records: a hub id, a local
  ``save_to_disk`` folder, or ``json`` / ``jsonl`` / ``csv`` / ``parquet`` files; ``columns`` maps the
  record's fields (``sentence``, ``entities`` / ``relations`` / ``events``) to the source's column names; a
  structure held as a JSON string (csv) is decoded.
* ``bio``: token + tag sequences: CoNLL / BIO files (token in the first column, tag in the last, or the
  columns ``columns`` names by number), or a ``load_dataset`` source with a token column and a tag column
  (``columns: {tokens: ..., tags: ...}``; ``ClassLabel`` tags are read by name).  Tags follow ``tag_scheme``
  (:mod:`prouie_pl.bio`) and become entities with character offsets in the space-joined sentence.

Each split of a data set becomes an Arrow table of *rows* (:data:`ROW_FEATURES`): the source's row index, the
validated record as JSON, its number of structural units, and, for a bad row, the problem instead of the
record.  Rows are built once per source file content (a fingerprint of the file's bytes, or the source
dataset's own ``datasets`` fingerprint) and cached by ``datasets``; a second start only memory-maps them.
Problems are the reader's one-line messages (``WHERE: record N: what is wrong``; ``row N`` for
``load_dataset`` sources, ``sentence N (line L)`` for CoNLL files), and ``on_error`` decides between failing
with every line and skipping with a count, as for IE INSTRUCTIONS folders.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence, Union

from .bio import TagError, bio_record, check_scheme, label_from_tag, read_conll
from .reader import (SPLITS, DataError, DatasetInfo, LoadReport, _iter_json_array, _RecordProblem, _SKIP_HINT, discover, load_schema,
                     parse_record, schema_json)
from .schema import TASKS, LabelSchema, Record, count_units

ROWS_VERSION = "rows-1"  # part of every rows fingerprint: bump when the row layout or validation changes
FIELD = {"NER": "entities", "RE": "relations", "EE": "events"}
DEFAULT_SPLITS = {"train": ("train",), "dev": ("dev", "validation", "valid"), "test": ("test",)}
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
CONLL_SUFFIXES = (".conll", ".conllu", ".txt", ".bio", ".iob", ".iob2", ".bioes", ".tsv")


def row_features():
    from datasets import Features, Value

    return Features({"index": Value("int64"), "line": Value("int64"), "task": Value("string"), "dataset": Value("string"),
                     "record": Value("string"), "units": Value("int32"), "kind": Value("string"), "problem": Value("string")})


@dataclass
class SourceSpec:
    """One data source.

    Args:
        format: ``uie`` (IE INSTRUCTIONS folder), ``records`` (rows holding IE INSTRUCTIONS records) or ``bio``
            (tokens and tags).
        path: the folder, file, ``save_to_disk`` folder or hub id.
        task: NER, RE or EE (``bio``: NER; ``uie``: taken from the folders).
        name: the data set's name in reports (default: the last part of ``path``).
        labels: the label schema: entity / relation types, or ``{event type: [roles]}``; default read from the
            data (``labels.json``, ``ClassLabel`` names, or every label the splits use).
        splits: split (train, dev, test) -> the source's split name, or a file (relative to ``path`` when it
            is a folder); default train / dev or validation / test as far as they exist.
        columns: our column -> the source's: ``sentence`` and ``entities`` / ``relations`` / ``events``
            (records), ``tokens`` and ``tags`` (bio; column numbers for CoNLL files, default 0 and -1).
        subset: the ``load_dataset`` configuration name.
        tag_scheme: BIO (IOB2), BIOES (IOBES, BILOU) or IO.
        strict: strict tagging (an ``I-`` that continues nothing is an error) or the lenient IOB1 reading.
        label_map: tag type -> label (default rule: ``PER`` -> person, ``Work_For`` -> work for, ...).
    """

    format: Literal["uie", "records", "bio"] = "uie"
    path: str = ""
    task: Optional[str] = None
    name: Optional[str] = None
    labels: Optional[Union[list[str], dict[str, list[str]]]] = None
    splits: Optional[dict[str, str]] = None
    columns: Optional[dict[str, Union[str, int]]] = None
    subset: Optional[str] = None
    tag_scheme: str = "BIO"
    strict: bool = True
    label_map: Optional[dict[str, str]] = None


@dataclass
class SourceSet:
    """One data set of a source: task, name, schema, and the function that builds a split's rows."""

    task: str
    name: str
    schema: LabelSchema
    where: str
    build: Callable[[str], Any] = field(repr=False)  # split -> rows Dataset (cached by datasets)

    @property
    def id(self) -> str:
        return f"{self.task}/{self.name}"


# ---------------------------------------------------------------------------------------------------- fingerprints


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(*parts) -> str:
    from datasets.fingerprint import Hasher

    return Hasher.hash([ROWS_VERSION, *parts])


def schema_from_json(task: str, labels) -> LabelSchema:
    if task == "EE":
        return LabelSchema("EE", tuple(labels), {k: tuple(v) for k, v in labels.items()})
    return LabelSchema(task, tuple(labels))


# ---------------------------------------------------------------------------------------------------- rows


def _row(index: int, task: str, dataset: str, record=None, units: int = 0, problem: Optional[_RecordProblem] = None,
         line: int = -1, where: str = "") -> dict:
    if problem is not None:
        return {"index": index, "line": line, "task": task, "dataset": dataset, "record": None, "units": 0,
                "kind": problem.kind, "problem": f"{where}: {problem}"}
    return {"index": index, "line": line, "task": task, "dataset": dataset, "record": json.dumps(record, ensure_ascii=False),
            "units": units, "kind": None, "problem": None}


def validated_row(obj, index: int, task: str, dataset: str, schema: LabelSchema, split: str, where: str, line: int = -1) -> dict:
    """The row of one raw IE INSTRUCTIONS record: validated by the reader's rules, or the problem."""
    try:
        rec = parse_record(obj, task, dataset, schema, index, split)
    except _RecordProblem as exc:
        return _row(index, task, dataset, problem=exc, line=line, where=where)
    return _row(index, task, dataset, obj, count_units(rec), line=line)


def _uie_rows(path: str, task: str, dataset: str, labels, split: str):
    """Rows of one IE INSTRUCTIONS split file (a generator for ``Dataset.from_generator``)."""
    from .reader import Problem

    schema = schema_from_json(task, json.loads(labels))
    problems: list[Problem] = []
    text = Path(path).read_text(encoding="utf-8")
    for index, obj in _iter_json_array(text, Path(path), problems):
        while problems:  # broken JSON reported before this record
            p = problems.pop(0)
            yield {**_row(-1, task, dataset), "record": None, "kind": p.kind, "problem": p.line}
        yield validated_row(obj, index, task, dataset, schema, split, f"{path}: record {index}")
    for p in problems:
        yield {**_row(-1, task, dataset), "record": None, "kind": p.kind, "problem": p.line}


def _conll_rows(path: str, token_column: int, tag_column: int):
    """Sentences of a CoNLL / BIO file with the line each starts on (a generator for ``from_generator``)."""
    for i, (line, tokens, tags, problem) in enumerate(read_conll(path, token_column, tag_column)):
        yield {"sentence_index": i, "line": line, "tokens": tokens, "tags": tags, "problem": problem}


def _from_generator(generator, gen_kwargs: dict, fp: str, cache_dir: Optional[str], features=None):
    from datasets import Dataset

    return Dataset.from_generator(generator, gen_kwargs=gen_kwargs, fingerprint=fp, cache_dir=cache_dir, features=features)


def problems_of(rows) -> list[tuple[int, str, str]]:
    """``(position, kind, line)`` of every bad row."""
    kinds = rows["kind"]
    out = [(i, k, None) for i, k in enumerate(kinds) if k is not None]
    if not out:
        return []
    lines = rows.select([i for i, _, _ in out])["problem"]
    return [(i, k, line) for (i, k, _), line in zip(out, lines)]


def good_rows(rows, on_error: str, cap: Optional[int], report: Optional[LoadReport]):
    """The rows without a problem, the first ``cap`` of them; problems among the rows read up to the cap raise
    :class:`DataError` (``on_error="error"``) or are counted in ``report`` (``skip``)."""
    bad = problems_of(rows)
    n = len(rows)
    if cap is not None:  # the cap counts good rows: problems after the cap-th good row are not read
        bad_pos, good_seen, end = {i for i, _, _ in bad}, 0, n
        for i in range(n):
            if good_seen == cap:
                end = i
                break
            good_seen += i not in bad_pos
        n = end
        bad = [b for b in bad if b[0] < n]
    if bad:
        if on_error == "error":
            raise DataError([line for _, _, line in bad], hint=_SKIP_HINT)
        if report is not None:
            report.skipped.update(k for _, k, _ in bad)
            report.lines.extend(line for _, _, line in bad)
    bad_pos = {i for i, _, _ in bad}
    keep = [i for i in range(n) if i not in bad_pos]
    return rows if len(keep) == len(rows) else rows.select(keep)


def rows_to_records(rows, schemas: dict[tuple[str, str], LabelSchema], split: str) -> list[Record]:
    """:class:`Record` objects of (good) rows."""
    out = []
    for task, dataset, index, raw in zip(rows["task"], rows["dataset"], rows["index"], rows["record"]):
        out.append(parse_record(json.loads(raw), task, dataset, schemas[(task, dataset)], index, split))
    return out


# ---------------------------------------------------------------------------------------------------- sources


def _uie_sets(spec: SourceSpec, cache_dir: Optional[str], tasks, datasets) -> list[SourceSet]:
    sets = []
    for info in discover(spec.path, tasks, datasets):
        sets.append(SourceSet(info.task, info.name, info.schema, str(info.path), _uie_builder(info, cache_dir)))
    return sets


def _uie_builder(info: DatasetInfo, cache_dir: Optional[str]):
    def build(split: str):
        path = info.path / f"{split}.json"
        if not path.is_file():
            raise DataError(f"{path}: split file is missing (data set {info.id}, split {split!r})")
        labels = schema_json(info.schema)
        fp = fingerprint("uie", file_digest(path), info.task, info.name, labels, split)
        # labels as JSON text: from_generator reads a list in gen_kwargs as shards to split between generator calls
        return _from_generator(_uie_rows, {"path": str(path), "task": info.task, "dataset": info.name, "labels": json.dumps(labels),
                                           "split": split}, fp, cache_dir, row_features())

    return build


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json"))


def _raw_splits(spec: SourceSpec, cache_dir: Optional[str]) -> dict[str, Any]:
    """split -> (a raw ``datasets.Dataset``, or ``("conll", file)``) for a records / bio source."""
    base = Path(spec.path).expanduser() if spec.path else None
    wanted = {s: (spec.splits or {}).get(s) for s in SPLITS}

    def as_file(value: Optional[str]) -> Optional[Path]:
        if value is None:
            return None
        p = Path(value).expanduser()
        if not p.is_absolute() and base is not None and base.is_dir():
            p = base / p
        return p if p.is_file() else None

    files = {s: as_file(v) for s, v in wanted.items()}
    if base is not None and base.is_file() and not any(files.values()):
        files["train"] = base  # one file: the training split
    out: dict[str, Any] = {}
    if any(files.values()):
        for split, f in files.items():
            if f is None:
                if wanted[split] is not None:
                    raise DataError(f"data.sources {spec.path or spec.name}: split {split} names {wanted[split]!r}, which is not a file")
                continue
            suffix = f.suffix.lower()
            if suffix in CONLL_SUFFIXES and spec.format == "bio":
                out[split] = ("conll", f)
            elif suffix in FILE_BUILDERS:
                from datasets import load_dataset

                out[split] = load_dataset(FILE_BUILDERS[suffix], data_files=str(f), split="train", cache_dir=cache_dir)
            else:
                raise DataError(f"{f}: unknown file type {suffix!r} for format {spec.format} "
                                f"(records: {', '.join(FILE_BUILDERS)}; bio: also {', '.join(CONLL_SUFFIXES)})")
        return out
    if base is not None and _is_saved_dataset(base):
        from datasets import load_from_disk

        loaded = load_from_disk(str(base))
    else:
        from datasets import load_dataset

        try:
            loaded = load_dataset(spec.path, spec.subset, cache_dir=cache_dir)
        except Exception as exc:  # no network, unknown id, ...: say which source
            raise DataError(f"data.sources {spec.path!r}: load_dataset failed: {type(exc).__name__}: {exc}") from None
    from datasets import Dataset

    if isinstance(loaded, Dataset):
        return {"train": loaded}
    for split in SPLITS:
        names = [wanted[split]] if wanted[split] is not None else list(DEFAULT_SPLITS[split])
        hit = next((n for n in names if n in loaded), None)
        if hit is None and wanted[split] is not None:
            raise DataError(f"data.sources {spec.path!r}: no split {wanted[split]!r} (it has {', '.join(loaded)})")
        if hit is not None:
            out[split] = loaded[hit]
    return out


def _column(spec: SourceSpec, ours: str, default):
    return (spec.columns or {}).get(ours, default)


def _bio_tag_names(raw, tags_col: str) -> Optional[list[str]]:
    """Tag names of a ``Sequence(ClassLabel)`` column, None for string tags."""
    feature = raw.features.get(tags_col)
    inner = getattr(feature, "feature", None)
    if inner is None and isinstance(feature, list) and feature:
        inner = feature[0]
    return list(inner.names) if hasattr(inner, "names") else None


def _split_type(tag: str) -> str:
    if tag == "O":
        return ""
    prefix, sep, kind = tag.partition("-")
    return kind if sep and len(prefix) == 1 else tag


def _bio_converter(spec: SourceSpec, task: str, name: str, tag_names, where: str, split: str, conll: bool):
    scheme = check_scheme(spec.tag_scheme, "data.sources tag_scheme")
    tokens_col = "tokens" if conll else _column(spec, "tokens", "tokens")
    tags_col = "tags" if conll else _column(spec, "tags", "tags")

    def convert(row, index):
        line = row["line"] if conll else -1
        at = f"{where}: sentence {index} (line {line})" if conll else f"{where}: row {index}"
        if conll and row["problem"]:
            return _row(index, task, name, problem=_RecordProblem("bad line", row["problem"]), line=line, where=where)
        tags = row[tags_col]
        try:
            if tag_names is not None:
                bad = next((t for t in tags if not isinstance(t, int) or not 0 <= t < len(tag_names)), None)
                if bad is not None:
                    raise TagError(f"tag id {bad!r} is not one of the {len(tag_names)} tag names")
                tags = [tag_names[t] for t in tags]
            obj = bio_record(row[tokens_col], tags, scheme, spec.strict, spec.label_map)
        except TagError as exc:
            return _row(index, task, name, problem=_RecordProblem("bad tags", str(exc)), line=line, where=at)
        return obj, line, at

    return convert


def _records_converter(spec: SourceSpec, task: str, where: str):
    sentence_col = _column(spec, "sentence", "sentence")
    field_col = _column(spec, FIELD[task], FIELD[task])

    def convert(row, index):
        at = f"{where}: row {index}"
        value = row[field_col]
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                return _row(index, task, "", problem=_RecordProblem("invalid JSON", f"column {field_col!r} holds invalid JSON: {exc.msg}"), where=at)
        return {"sentence": row[sentence_col], FIELD[task]: value}, -1, at

    return convert


def _derived_labels(task: str, objs: Sequence[dict]) -> Union[list[str], dict[str, list[str]]]:
    """Every label the records use, sorted (EE: every event type with the roles its arguments use)."""
    if task == "EE":
        roles: dict[str, set] = {}
        for o in objs:
            for ev in o.get("events") or []:
                if isinstance(ev, dict) and isinstance(ev.get("type"), str):
                    roles.setdefault(ev["type"], set()).update(a.get("role") for a in ev.get("arguments") or []
                                                               if isinstance(a, dict) and isinstance(a.get("role"), str))
        return {k: sorted(v) for k, v in sorted(roles.items())}
    items = [x for o in objs for x in (o.get(FIELD[task]) or []) if isinstance(x, dict)]
    return sorted({x["type"] for x in items if isinstance(x.get("type"), str)})


def _generic_sets(spec: SourceSpec, cache_dir: Optional[str]) -> list[SourceSet]:
    task = (spec.task or ("NER" if spec.format == "bio" else "")).upper()
    if task not in TASKS:
        raise DataError(f"data.sources {spec.path!r}: task {spec.task!r} must be one of {', '.join(TASKS)}")
    if spec.format == "bio" and task != "NER":
        raise DataError(f"data.sources {spec.path!r}: format bio gives entities, so its task is NER, not {task}")
    name = spec.name or Path(str(spec.path).rstrip("/")).stem or "data"
    where = str(spec.path) if spec.path else name
    raw = _raw_splits(spec, cache_dir)
    if not raw:
        raise DataError(f"data.sources {where!r}: no train, dev or test split found")
    conll_cols = (0, -1)
    if any(isinstance(r, tuple) for r in raw.values()):
        try:
            conll_cols = (int(_column(spec, "tokens", 0)), int(_column(spec, "tags", -1)))
        except (TypeError, ValueError):
            raise DataError(f"data.sources {where!r}: columns of a CoNLL file are numbers (tokens: 0, tags: -1), "
                            f"not {spec.columns}") from None
    for split, r in list(raw.items()):
        if isinstance(r, tuple):  # a CoNLL file: its sentences, cached by the file's bytes
            f = r[1]
            raw[split] = ("conll", f, _from_generator(_conll_rows, {"path": str(f), "token_column": conll_cols[0], "tag_column": conll_cols[1]},
                                                      fingerprint("conll", file_digest(f), conll_cols), cache_dir))

    def table(split):
        r = raw[split]
        return r[2] if isinstance(r, tuple) else r

    for split, r in raw.items():  # a column the mapping names must exist (CoNLL files have theirs by number)
        if isinstance(r, tuple):
            continue
        need = ([_column(spec, "tokens", "tokens"), _column(spec, "tags", "tags")] if spec.format == "bio"
                else [_column(spec, "sentence", "sentence"), _column(spec, FIELD[task], FIELD[task])])
        missing = [c for c in need if c not in r.column_names]
        if missing:
            raise DataError(f"data.sources {where!r} ({split} split): no column {missing[0]!r} (it has {', '.join(r.column_names)}); "
                            f"map ours to yours with columns: {{{'tokens: ..., tags: ...' if spec.format == 'bio' else 'sentence: ..., ' + FIELD[task] + ': ...'}}}")

    def where_of(split):
        r = raw[split]
        return str(r[1]) if isinstance(r, tuple) else f"{where} ({split} split)"

    tag_names = {s: None if isinstance(r, tuple) else _bio_tag_names(r, _column(spec, "tags", "tags"))
                 for s, r in raw.items()} if spec.format == "bio" else {}
    converters = {}
    for split in raw:
        if spec.format == "bio":
            converters[split] = _bio_converter(spec, task, name, tag_names[split], where_of(split), split, isinstance(raw[split], tuple))
        else:
            converters[split] = _records_converter(spec, task, where_of(split))
    labels = spec.labels
    if labels is None:  # read from the data: ClassLabel names, else every label the splits use
        names = next((n for n in tag_names.values() if n), None)
        if names is not None:
            seen = dict.fromkeys(label_from_tag(_split_type(t), spec.label_map) for t in names if t != "O")
            labels = sorted(seen)
        else:
            objs = []
            for split in raw:
                conv, t = converters[split], table(split)
                for i, row in enumerate(t):
                    out = conv(row, i)
                    if isinstance(out, tuple):
                        objs.append(out[0])
            labels = _derived_labels(task, objs)
    if task == "EE" and not isinstance(labels, dict):
        raise DataError(f"data.sources {where!r}: EE labels must be {{event type: [roles]}}")
    schema = schema_from_json(task, labels)

    def build(split: str):
        if split not in raw:
            raise DataError(f"data.sources {where!r}: no {split} split (it has {', '.join(raw)}; name one with splits: {{{split}: ...}})")
        t, conv, at = table(split), converters[split], where_of(split)

        def to_row(row, index):
            out = conv(row, index)
            if isinstance(out, dict):
                return {**out, "dataset": name}
            obj, line, at_row = out
            return {**validated_row(obj, index, task, name, schema, split, at_row, line), "dataset": name}

        fp = fingerprint("source", t._fingerprint, spec.format, task, name, schema_json(schema), spec.tag_scheme, spec.strict,
                         spec.label_map, spec.columns, split, at)
        return t.map(to_row, with_indices=True, remove_columns=t.column_names, features=row_features(), new_fingerprint=fp,
                     desc=f"validating {name} {split}")

    return [SourceSet(task, name, schema, where, build)]


def resolve_sources(specs: Sequence[SourceSpec], cache_dir: Optional[str] = None, tasks=None, datasets=None) -> list[SourceSet]:
    """The data sets of ``specs``, in task order NER -> RE -> EE then in the order given; ``tasks`` and
    ``datasets`` (``Name`` or ``TASK/Name``) select among them, an unknown name raises :class:`DataError`."""
    want_tasks = None if tasks is None else [t.upper() for t in tasks]
    found: list[SourceSet] = []
    for spec in specs:
        if isinstance(spec, dict):
            unknown = set(spec) - set(SourceSpec.__dataclass_fields__)
            if unknown:
                raise DataError(f"data.sources: unknown key(s) {', '.join(sorted(unknown))}; "
                                f"a source takes {', '.join(SourceSpec.__dataclass_fields__)}")
            spec = SourceSpec(**spec)
        if spec.format not in ("uie", "records", "bio"):
            raise DataError(f"data.sources: format {spec.format!r} must be uie, records or bio")
        if spec.format == "uie":
            found.extend(_uie_sets(spec, cache_dir, tasks, None))
        else:
            found.extend(_generic_sets(spec, cache_dir))
    if want_tasks is not None:
        found = [s for s in found if s.task in want_tasks]
    if datasets is not None:
        chosen = []
        for name in datasets:
            hits = [s for s in found if name in (s.name, s.id)]
            if not hits:
                raise DataError(f"unknown data set {name!r} in datasets; available: {', '.join(s.id for s in found) or 'none'}")
            chosen.extend(h for h in hits if h not in chosen)
        found = chosen
    ids = [s.id for s in found]
    dup = next((i for i in ids if ids.count(i) > 1), None)
    if dup:
        raise DataError(f"two sources give the data set {dup}; give one of them another name (data.sources name)")
    if not found:
        raise DataError("no data sets found in data.sources for the selected tasks/datasets")
    order = {t: i for i, t in enumerate(TASKS)}
    return sorted(found, key=lambda s: order[s.task])


def load_rows(sets: Sequence[SourceSet], split: str, cap: Optional[int] = None, on_error: str = "error",
              report: Optional[LoadReport] = None) -> list[tuple[SourceSet, Any]]:
    """The good rows of ``split`` per data set, capped per data set; every bad file or row of every data set
    is reported in one :class:`DataError`."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    out, problems = [], []
    for s in sets:
        try:
            out.append((s, good_rows(s.build(split), on_error, cap, report)))
        except DataError as exc:
            problems.extend(exc.lines)
    if problems:
        raise DataError(problems, hint=_SKIP_HINT)
    return out


def source_specs(data_dir: Optional[str], sources: Optional[Sequence]) -> list:
    """``data.sources`` as given, or the one IE INSTRUCTIONS folder of ``data.data_dir``."""
    if sources:
        return list(sources)
    return [SourceSpec("uie", os.fspath(data_dir))]
