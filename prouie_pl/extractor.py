"""``Extractor``: a trained model run on new text with the user's own schema.

::

    from prouie_pl import Extractor

    ex = Extractor.from_pretrained("outputs/demo/de/adapter")
    doc = ex.extract("Ann Lee joined IBM in Oslo.", {"entities": ["person", "organization", "location"]})
    doc.entities  # [EntityMention(text='Ann Lee', type='person', start=0, end=7), ...]

How a document goes through it:

1. it is cut into windows that fit ``max_input_tokens`` together with the longest of the tasks' prompts
   (:mod:`prouie_pl.text_windows`); every task of the schema (NER for ``entities``, RE for ``relations``, EE
   for ``events``) gets one prompt per window, built by :func:`prouie_pl.formats.build_prompt` and
   :func:`prouie_pl.chat.chat_prompt_ids` exactly as in training;
2. prompts of several documents are decoded greedily in batches of similar prompt length
   (:func:`prouie_pl.decoding.iter_decode`, the path evaluation and GRPO rollouts decode through too, stopping
   on :func:`prouie_pl.chat.stop_token_ids`), optionally under the schema constraint of
   :mod:`prouie_pl.constrained`;
3. each answer is read by :func:`prouie_pl.parser.parse_output` (which never raises) and every span is placed
   back at character offsets of the document (:mod:`prouie_pl.span_alignment`); a span that cannot be placed, or
   a type the schema does not have, goes to ``unaligned`` with the reason;
4. a document's results are merged over its windows, duplicates removed, and it is handed out as soon as it is
   complete (documents come out in input order).
"""

from __future__ import annotations

import bisect
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import torch

from .chat import chat_prompt_ids, stop_token_ids
from .extraction_schema import as_schema
from .formats import build_prompt, check_format, read_answer_format
from .parser import parse_output
from .schema import LabelSchema, Record
from .span_alignment import SpanFinder
from .text_windows import TextWindow, TokenCounter, fit_windows, pack_windows

GROUP_BATCHES = 8  # prompts of this many batches are sorted by length together
MIN_TEXT_TOKENS = 8


# ------------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class TextSpan:
    """A piece of the document: ``document[start:end] == text``."""

    text: str
    start: int
    end: int

    def to_json(self) -> dict:
        return {"text": self.text, "start": self.start, "end": self.end}


def _with_score(out: dict, score: Optional[float]) -> dict:
    if score is not None:
        out["score"] = round(float(score), 4)
    return out


@dataclass(frozen=True)
class EntityMention:
    """An entity; ``score`` is how sure the model was of it (:mod:`prouie_pl.confidence`; the highest over the
    windows that found it), None when scores are off."""

    text: str
    type: str
    start: int
    end: int
    score: Optional[float] = None

    def to_json(self) -> dict:
        return _with_score({"text": self.text, "type": self.type, "start": self.start, "end": self.end}, self.score)


@dataclass(frozen=True)
class RelationMention:
    type: str
    head: TextSpan
    tail: TextSpan
    score: Optional[float] = None

    def to_json(self) -> dict:
        return _with_score({"type": self.type, "head": self.head.to_json(), "tail": self.tail.to_json()}, self.score)


@dataclass(frozen=True)
class ArgumentMention:
    role: str
    text: str
    start: int
    end: int
    score: Optional[float] = None

    def to_json(self) -> dict:
        return _with_score({"role": self.role, "text": self.text, "start": self.start, "end": self.end}, self.score)


@dataclass
class EventMention:
    """An event; ``score`` is its trigger's, each argument has its own."""

    type: str
    trigger: TextSpan
    arguments: list[ArgumentMention] = field(default_factory=list)
    score: Optional[float] = None

    def to_json(self) -> dict:
        return _with_score({"type": self.type, "trigger": self.trigger.to_json(), "arguments": [a.to_json() for a in self.arguments]},
                           self.score)


@dataclass(frozen=True)
class UnalignedUnit:
    """Something the model answered that has no place in the output lists, kept with the reason.

    ``kind`` is ``entity``, ``relation``, ``event`` (its trigger could not be placed; its arguments come along as
    ``(role, text)`` pairs), ``argument`` (of an event that was placed) or ``answer`` (a whole answer, with its
    task as ``type``, should placing it ever fail); ``chunk`` is the window it came from.
    """

    kind: str
    type: str
    reason: str
    chunk: int
    text: str = ""
    role: str = ""
    head: str = ""
    tail: str = ""
    trigger: str = ""
    arguments: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict:
        out: dict[str, Any] = {"kind": self.kind, "type": self.type}
        for name in ("text", "role", "head", "tail", "trigger"):
            value = getattr(self, name)
            if value:
                out[name] = value
        if self.arguments:
            out["arguments"] = [{"role": r, "text": t} for r, t in self.arguments]
        out["reason"] = self.reason
        out["chunk"] = self.chunk
        return out


@dataclass
class ChunkOutput:
    """One raw answer: which window and task, the model's text, whether it parsed cleanly, its length, whether
    it was cut (``truncated``: it hit ``max_new_tokens``, or ``looped`` and the loop guard ended it), and the
    score of each unit it holds (parse order)."""

    chunk: int
    task: str
    start: int
    end: int
    output: str
    parsed_ok: bool
    truncated: bool
    new_tokens: int
    unit_scores: Optional[list[float]] = None
    looped: bool = False


@dataclass(frozen=True)
class WindowReport:
    """One window of a document: its offsets, whether it cuts a sentence (a sentence longer than the prompt
    budget is split at whitespace, so the model reads it in parts), and the tasks whose answer for this window
    hit ``max_new_tokens`` (what came after the cap is lost)."""

    start: int
    end: int
    sentence_cut: bool
    truncated_tasks: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {"start": self.start, "end": self.end, "sentence_cut": self.sentence_cut, "truncated_tasks": list(self.truncated_tasks)}


@dataclass
class DocumentExtraction:
    """Everything found in one document (offsets are character offsets into the document)."""

    id: str
    entities: list[EntityMention] = field(default_factory=list)
    relations: list[RelationMention] = field(default_factory=list)
    events: list[EventMention] = field(default_factory=list)
    unaligned: list[UnalignedUnit] = field(default_factory=list)
    chunks: int = 0
    outputs: list[ChunkOutput] = field(default_factory=list)
    windows: list[WindowReport] = field(default_factory=list)
    below_threshold: int = 0  # units the threshold dropped

    def to_json(self) -> dict:
        """The output line of ``python -m prouie_pl extract`` (raw answers are not part of it)."""
        return {
            "id": self.id,
            "entities": [e.to_json() for e in self.entities],
            "relations": [r.to_json() for r in self.relations],
            "events": [e.to_json() for e in self.events],
            "unaligned": [u.to_json() for u in self.unaligned],
            "chunks": self.chunks,
            "truncated_answers": self.truncated_answers,
            "looped_answers": self.looped_answers,
            "cut_windows": self.cut_windows,
            "below_threshold": self.below_threshold,
            "windows": [w.to_json() for w in self.windows],
        }

    @property
    def parse_failures(self) -> int:
        return sum(1 for o in self.outputs if not o.parsed_ok)

    @property
    def truncated_answers(self) -> int:
        """Answers (window x task) that were cut: they hit ``max_new_tokens`` or the loop guard ended them."""
        return sum(1 for o in self.outputs if o.truncated)

    @property
    def looped_answers(self) -> int:
        """Answers the loop guard ended (:class:`prouie_pl.decoding.LoopGuard`; counted in ``truncated_answers``)."""
        return sum(1 for o in self.outputs if o.looped)

    @property
    def cut_windows(self) -> int:
        """Windows that cut a sentence."""
        return sum(1 for w in self.windows if w.sentence_cut)


# ------------------------------------------------------------------------------------------ per document


@dataclass
class _Job:
    doc: "_Document"
    chunk: int
    task: str
    schema: LabelSchema
    window: TextWindow
    prompt: list[int]


class _Document:
    """A document being extracted: its windows, the answers so far, and the merged results."""

    def __init__(self, doc_id: str, text: str, windows: list[TextWindow], threshold: float = 0.0):
        self.id = doc_id
        self.text = text
        self.windows = windows
        self.threshold = threshold
        self.below = 0
        self._scores: dict = {}
        self.pending = 0
        self.entities: dict = {}
        self.relations: dict = {}
        self.events: dict = {}
        self.unaligned: dict = {}
        self.outputs: list[ChunkOutput] = []

    def _lost(self, unit: UnalignedUnit) -> None:
        self.unaligned.setdefault(json.dumps(unit.to_json(), sort_keys=True, ensure_ascii=False), unit)

    def _span(self, window: TextWindow, local: tuple[int, int]) -> TextSpan:
        a, b = window.start + local[0], window.start + local[1]
        return TextSpan(self.text[a:b], a, b)

    def add(self, job: _Job, output: str, truncated: bool, new_tokens: int, scored=None, looped: bool = False) -> None:
        """One answer; ``scored`` (a :class:`prouie_pl.confidence.ScoredAnswer` of it) gives each unit its score."""
        from .confidence import keep_unit

        parsed = parse_output(output, job.task, job.schema)
        units = parsed.units
        self._scores = {}
        if scored is not None and len(scored.units) == len(units):
            self._scores = {id(u): s for u, s in zip(units, scored.scores)}
        self.outputs.append(ChunkOutput(job.chunk, job.task, job.window.start, job.window.end, output, parsed.ok, truncated, new_tokens,
                                        list(scored.scores) if scored is not None else None, looped))
        if self.threshold > 0.0:
            kept = [u for u in units if keep_unit(self._scores.get(id(u)), self.threshold)]
            self.below += len(units) - len(kept)
            units = kept
        finder = SpanFinder(job.window.text)
        try:
            if job.task == "NER":
                self._entities(job, finder, units)
            elif job.task == "RE":
                self._relations(job, finder, units)
            else:
                self._events(job, finder, units)
        except Exception as exc:  # a bug here must not lose the run; the answer is kept for a person to read
            self._lost(UnalignedUnit("answer", job.task, f"could not be placed ({type(exc).__name__}: {exc})", job.chunk, text=output))

    def _entities(self, job: _Job, finder: SpanFinder, units) -> None:
        mentions: Counter = Counter()
        for u in units:
            if u.kind != "entity":
                continue
            if not u.in_schema:
                self._lost(UnalignedUnit("entity", u.label, "type not in the schema", job.chunk, text=u.text))
                continue
            k = mentions[u.text.strip()]
            mentions[u.text.strip()] += 1
            local = finder.nth(u.text, k)
            if local is None:
                self._lost(UnalignedUnit("entity", u.label, "not found in the text", job.chunk, text=u.text))
                continue
            s = self._span(job.window, local)
            self._keep_best(self.entities, (s.start, s.end, u.label), EntityMention(s.text, u.label, s.start, s.end, self._scores.get(id(u))))

    def _relations(self, job: _Job, finder: SpanFinder, units) -> None:
        for u in units:
            if u.kind != "relation":
                continue
            if not u.in_schema:
                self._lost(UnalignedUnit("relation", u.label, "type not in the schema", job.chunk, head=u.head, tail=u.tail))
                continue
            h, t = finder.pair(u.head, u.tail)
            if h is None or t is None:
                which = "head and tail" if h is None and t is None else "head" if h is None else "tail"
                self._lost(UnalignedUnit("relation", u.label, f"{which} not found in the text", job.chunk, head=u.head, tail=u.tail))
                continue
            hs, ts = self._span(job.window, h), self._span(job.window, t)
            self._keep_best(self.relations, (u.label, hs.start, hs.end, ts.start, ts.end), RelationMention(u.label, hs, ts, self._scores.get(id(u))))

    @staticmethod
    def _keep_best(found: dict, key, mention) -> None:
        """A mention found again (overlapping windows) keeps its highest score."""
        old = found.get(key)
        if old is None or (mention.score is not None and (old.score is None or mention.score > old.score)):
            found[key] = mention

    def _events(self, job: _Job, finder: SpanFinder, units) -> None:
        by_event: dict[int, list] = {}
        for u in units:
            if u.kind in ("trigger", "argument"):
                by_event.setdefault(u.event, []).append(u)
        triggers: Counter = Counter()
        for items in by_event.values():
            trig = next((u for u in items if u.kind == "trigger"), None)
            args = [u for u in items if u.kind == "argument"]
            if trig is None:
                continue
            pairs = tuple((a.role, a.text) for a in args)
            if not trig.in_schema:
                self._lost(UnalignedUnit("event", trig.label, "type not in the schema", job.chunk, trigger=trig.text, arguments=pairs))
                continue
            k = triggers[trig.text.strip()]
            triggers[trig.text.strip()] += 1
            local = finder.nth(trig.text, k)
            if local is None:
                self._lost(UnalignedUnit("event", trig.label, "trigger not found in the text", job.chunk, trigger=trig.text, arguments=pairs))
                continue
            ts = self._span(job.window, local)
            trig_score = self._scores.get(id(trig))
            event = self.events.setdefault((trig.label, ts.start, ts.end), EventMention(trig.label, ts, [], trig_score))
            if trig_score is not None and (event.score is None or trig_score > event.score):
                event.score = trig_score
            have = {(a.role, a.start, a.end): i for i, a in enumerate(event.arguments)}
            for a in args:
                if not a.in_schema:
                    self._lost(UnalignedUnit("argument", trig.label, "role not in the schema", job.chunk, text=a.text, role=a.role, trigger=trig.text))
                    continue
                spot = finder.nearest(a.text, local)
                if spot is None:
                    self._lost(UnalignedUnit("argument", trig.label, "not found in the text", job.chunk, text=a.text, role=a.role, trigger=trig.text))
                    continue
                s = self._span(job.window, spot)
                mention = ArgumentMention(a.role, s.text, s.start, s.end, self._scores.get(id(a)))
                i = have.get((a.role, s.start, s.end))
                if i is None:
                    have[(a.role, s.start, s.end)] = len(event.arguments)
                    event.arguments.append(mention)
                elif mention.score is not None and (event.arguments[i].score is None or mention.score > event.arguments[i].score):
                    event.arguments[i] = mention

    def result(self) -> DocumentExtraction:
        events = sorted(self.events.values(), key=lambda e: (e.trigger.start, e.trigger.end, e.type))
        for e in events:
            e.arguments.sort(key=lambda a: (a.start, a.end, a.role))
        return DocumentExtraction(
            id=self.id,
            entities=sorted(self.entities.values(), key=lambda e: (e.start, e.end, e.type)),
            relations=sorted(self.relations.values(), key=lambda r: (r.head.start, r.tail.start, r.type, r.head.end, r.tail.end)),
            events=events,
            unaligned=list(self.unaligned.values()),
            chunks=len(self.windows),
            outputs=sorted(self.outputs, key=lambda o: (o.chunk, o.task)),
            windows=self._window_reports(),
            below_threshold=self.below,
        )

    def _window_reports(self) -> list[WindowReport]:
        from .text_windows import split_sentences

        sentences = split_sentences(self.text) if self.windows else []
        starts = [a for a, _ in sentences]

        def inside(pos: int) -> bool:  # strictly inside a sentence (not at its edges)
            i = bisect.bisect_right(starts, pos) - 1
            return i >= 0 and sentences[i][0] < pos < sentences[i][1]

        cut: dict[int, list[str]] = {}
        for o in self.outputs:
            if o.truncated and not o.looped:  # a looping answer loses only its repeats
                cut.setdefault(o.chunk, []).append(o.task)
        return [WindowReport(w.start, w.end, inside(w.start) or inside(w.end), tuple(sorted(cut.get(i, ()))))
                for i, w in enumerate(self.windows)]


# ------------------------------------------------------------------------------------------ the extractor


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """``auto`` -> the first GPU when there is one, else the CPU; anything else as ``torch.device`` reads it."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asks for a GPU but torch sees none; use --device cpu")
    return dev


class Extractor:
    """A causal LM and its tokenizer, run on documents with a schema.

    Args:
        model: a loaded causal LM (a ``PeftModel`` or a plain model), in eval mode.
        tokenizer: its tokenizer.
        max_input_tokens: cap on prompt tokens (instruction, schema and text) per window.
        max_new_tokens: cap on answer tokens per window.
        batch_size: prompts decoded together.
        constrained: decode under the schema constraint (concise format only; see :mod:`prouie_pl.constrained`).
        target_format: the answer format the model was trained to write, ``concise`` (SA, DE), ``full`` (CM) or
            ``keyed``; ``from_pretrained`` reads it from the model folder's ``answer_format.json`` when not given.
        threshold: keep only the units scored above it (0, the default, keeps all; :mod:`prouie_pl.confidence`).
        scores: score every unit (the ``score`` of each mention); off, mentions carry none and decoding skips
            the log-probabilities.
        calibration: a :class:`prouie_pl.confidence.Calibration` for the scores (``from_pretrained`` loads the
            one saved with an adapter; identity otherwise).
        loop_guard: end an answer that writes one block of tokens three times in a row
            (:class:`prouie_pl.decoding.LoopGuard`): it keeps two copies and counts as truncated.
    """

    def __init__(self, model, tokenizer, *, max_input_tokens: int = 512, max_new_tokens: int = 256, batch_size: int = 16,
                 constrained: bool = False, target_format: str = "concise", threshold: float = 0.0, scores: bool = True,
                 calibration=None, loop_guard: bool = True):
        from .confidence import Calibration, check_threshold

        if batch_size < 1:
            raise ValueError(f"--batch_size must be at least 1, not {batch_size}")
        if max_new_tokens < 8:
            raise ValueError(f"--max_new_tokens must be at least 8, not {max_new_tokens}")
        check_format(target_format, "--format")
        if constrained and target_format != "concise":
            raise ValueError("--constrained writes the concise format; use it with --format concise (an SA or DE model)")
        self.model = model
        self.tokenizer = tokenizer
        self.max_input_tokens = max_input_tokens
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.constrained = constrained
        self.format = target_format
        self.threshold = check_threshold(threshold, "--threshold")
        if self.threshold > 0.0 and not scores:
            raise ValueError("--threshold needs unit scores; drop --no_scores")
        self.scores = scores
        from .decoding import LoopGuard

        self.loop_guard = LoopGuard() if loop_guard else None
        self.calibration = calibration if calibration is not None else Calibration()
        self.stop_ids = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    # -------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, model: str, *, base: Optional[str] = None, device: Union[str, torch.device, None] = "auto",
                        quantization: str = "none", dtype: str = "auto", **options) -> "Extractor":
        """Load ``model``: a stage's ``adapter/`` folder (its base from ``adapter_config.json``, or ``base``), a
        merged ``export`` folder, or an embedded model name (``tiny``, ``gemma-3-270m``).  ``options`` go to
        :class:`Extractor`; without a ``target_format`` (or with None) the folder's recorded answer format is
        used, and ``concise`` where it records none."""
        from .modeling import BaseModelSettings, load_model, load_tokenizer

        dev = resolve_device(device)
        if dtype == "auto":
            dtype = "bfloat16" if dev.type == "cuda" else "float32"
        if quantization not in ("none", "nf4"):
            raise ValueError(f"--quantization must be none or nf4, not {quantization!r}")
        path = Path(model)
        if options.get("target_format") is None:
            options["target_format"] = read_answer_format(path) or "concise"
        load_on = dev if (dev.type == "cuda" or quantization == "nf4") else None
        if (path / "adapter_config.json").is_file():
            base_name = base or adapter_base(path)
            settings = BaseModelSettings(name_or_path=base_name, quantization=quantization, dtype=dtype)
            lm = _load(lambda: load_model(settings, None, load_on), f"base model {base_name!r} of adapter {path}", "--base")
            from peft import PeftModel

            from .modeling import check_adapter_keys, read_adapter_weights

            if "calibration" not in options:
                from .confidence import Calibration

                options["calibration"] = Calibration.load(path)
            lm = PeftModel.from_pretrained(lm, str(path))
            check_adapter_keys(lm, read_adapter_weights(path), path)
            if quantization == "none":
                lm = lm.merge_and_unload()  # plain weights decode faster; a 4-bit base keeps the adapter apart
            tok_src = str(path) if (path / "tokenizer_config.json").is_file() else base_name
        else:
            if path.is_dir() and not (path / "config.json").is_file():
                raise ValueError(f"--model {model}: a folder with neither adapter_config.json (a stage's adapter/) nor config.json (an exported model)")
            if not path.exists() and _looks_local(model):
                raise ValueError(f"--model {model} does not exist (give a stage's adapter/ folder, an exported model folder, "
                                 "or an embedded model name such as tiny)")
            settings = BaseModelSettings(name_or_path=model, quantization=quantization, dtype=dtype)
            lm = _load(lambda: load_model(settings, None, load_on), f"model {model!r}", "--model")
            tok_src = model
        lm.eval()
        tokenizer = load_tokenizer(tok_src)
        return cls(lm, tokenizer, **options)

    # -------------------------------------------------------------- windows and prompts

    def prompt_ids(self, text: str, task: str, schema: LabelSchema) -> list[int]:
        """The chat-formatted prompt of one window for one task, as the model was trained on it."""
        record = Record(sentence=text, task=task, dataset="", schema=schema)
        return chat_prompt_ids(self.tokenizer, build_prompt(record, self.format, schema))

    def _text_budget(self, schemas: dict[str, LabelSchema]) -> int:
        overhead = {task: len(self.prompt_ids("", task, s)) for task, s in schemas.items()}
        task, worst = max(overhead.items(), key=lambda kv: kv[1])
        budget = self.max_input_tokens - worst
        if budget < MIN_TEXT_TOKENS:
            raise ValueError(f"--max_input_tokens {self.max_input_tokens} leaves no room for text: the {task} prompt alone takes "
                             f"{worst} tokens; raise --max_input_tokens to at least {worst + 64}")
        return budget

    def windows(self, text: str, schema: Any) -> list[TextWindow]:
        """The windows ``text`` is read in with this schema (what the ``chunks`` count of a result counts)."""
        schemas = as_schema(schema).label_schemas()
        return self._windows(text, schemas, self._text_budget(schemas), {})

    def _windows(self, text: str, schemas: dict[str, LabelSchema], budget: int, prompts: dict) -> list[TextWindow]:
        if not text.strip():
            return []
        packed = pack_windows(text, budget, TokenCounter(self.tokenizer, text))

        def fits(w: TextWindow) -> bool:
            ok = True
            for task, s in schemas.items():
                ids = prompts.get((w.start, w.end, task))
                if ids is None:
                    ids = prompts[(w.start, w.end, task)] = self.prompt_ids(w.text, task, s)
                ok = ok and len(ids) <= self.max_input_tokens
            return ok

        return fit_windows(text, packed, fits)

    # -------------------------------------------------------------- extraction

    def extract(self, texts: Union[str, Sequence[str]], schema: Any, ids: Optional[Sequence[str]] = None,
                progress: bool = False) -> Union[DocumentExtraction, list[DocumentExtraction]]:
        """Extract from one text (returns one result) or a list of texts (returns a list, in the same order).

        ``schema``: an :class:`~prouie_pl.extraction_schema.ExtractionSchema`, a mapping such as
        ``{"entities": [...], "relations": [...], "events": {type: [roles]}}``, or the path of a YAML/JSON file.
        """
        single = isinstance(texts, str)
        items = [texts] if single else list(texts)
        names = [str(i) for i in (ids if ids is not None else range(len(items)))]
        if len(names) != len(items):
            raise ValueError(f"{len(names)} ids for {len(items)} texts")
        results = list(self.iter_extract(zip(names, items), schema, total=len(items), progress=progress))
        return results[0] if single else results

    def iter_extract(self, documents: Iterable[tuple[str, str]], schema: Any, total: Optional[int] = None,
                     progress: bool = False) -> Iterator[DocumentExtraction]:
        """Results of ``(id, text)`` documents, each handed out as soon as it (and every document before it) is done."""
        schemas = as_schema(schema).label_schemas()
        budget = self._text_budget(schemas)
        with _progress(progress, total) as bar:
            group: list[tuple[_Document, list[_Job]]] = []
            n_jobs = 0
            for doc_id, text in documents:
                doc, jobs = self._prepare(str(doc_id), text, schemas, budget)
                group.append((doc, jobs))
                n_jobs += len(jobs)
                if n_jobs >= self.batch_size * GROUP_BATCHES:
                    yield from self._run_group(group, bar)
                    group, n_jobs = [], 0
            if group:
                yield from self._run_group(group, bar)

    def _prepare(self, doc_id: str, text: str, schemas: dict[str, LabelSchema], budget: int) -> tuple[_Document, list[_Job]]:
        prompts: dict = {}
        windows = self._windows(text, schemas, budget, prompts)
        doc = _Document(doc_id, text, windows, self.threshold)
        jobs = []
        for i, w in enumerate(windows):
            for task, s in schemas.items():
                ids = prompts.get((w.start, w.end, task)) or self.prompt_ids(w.text, task, s)
                jobs.append(_Job(doc, i, task, s, w, ids))
        doc.pending = len(jobs)
        return doc, jobs

    def _run_group(self, group: list, bar) -> Iterator[DocumentExtraction]:
        from .confidence import score_answer
        from .decoding import constraint_factory, greedy_output, iter_decode

        jobs = [j for _, js in group for j in js]
        order = [doc for doc, _ in group]
        emitted = 0

        def ready() -> Iterator[DocumentExtraction]:
            nonlocal emitted
            while emitted < len(order) and order[emitted].pending == 0:
                bar.advance()
                yield order[emitted].result()
                emitted += 1

        yield from ready()
        rows = [(j.task, j.schema, j.window.text) for j in jobs]
        factory = constraint_factory(self.tokenizer, rows, self.max_new_tokens, self.stop_ids) if self.constrained else None
        # batches of similar prompt length, longest first, as every decoding path batches them
        for idx, done in iter_decode(self.model, [j.prompt for j in jobs], batch_size=self.batch_size,
                                     max_new_tokens=self.max_new_tokens, stop_ids=self.stop_ids,
                                     pad_id=self.tokenizer.pad_token_id, processor_for=factory, with_logprobs=self.scores,
                                     loop_guard=self.loop_guard):
            out = greedy_output(self.tokenizer, done)
            for k, (i, text, cut, n) in enumerate(zip(idx, out.texts, out.truncated, out.new_tokens)):
                scored = None
                if out.token_logprobs is not None:
                    scored = score_answer(self.tokenizer, text, out.token_ids[k], out.token_logprobs[k], jobs[i].task, jobs[i].schema,
                                          calibration=self.calibration)
                jobs[i].doc.add(jobs[i], text, cut, n, scored, bool(out.looped and out.looped[k]))
                jobs[i].doc.pending -= 1
            yield from ready()


def _looks_local(name: str) -> bool:
    """A name meant as a local path (not a hub id): absolute, relative to ``.`` or ``~``, or under an existing folder."""
    if name.startswith(("/", ".", "~")) or "\\" in name:
        return True
    first = name.split("/", 1)[0]
    return "/" in name and Path(first).is_dir()


def _load(fn, what: str, flag: str):
    """Run a loader; a missing or unreadable model becomes one line naming it and the flag to change."""
    try:
        return fn()
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot load the {what}: {first}; check {flag}") from None


def adapter_base(folder: Path) -> str:
    """The base model an adapter was trained on: ``adapter_config.json``'s ``base_model_name_or_path``; when that
    is a folder that no longer exists, the ``model.base.name_or_path`` of the stage's ``training_config.yaml``
    (with a warning, since an embedded model rebuilt since then may differ)."""
    import warnings

    cfg_path = folder / "adapter_config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{cfg_path}: not readable JSON ({exc}); pass --base NAME_OR_PATH") from None
    name = cfg.get("base_model_name_or_path") or ""
    if name and (Path(name).is_dir() or not _looks_local(name)):
        return name  # a folder, an embedded model name or a hub id
    trained = _training_config_base(folder)
    if trained:
        warnings.warn(f"{cfg_path} names the base {name!r}, which is not here; using {trained!r} from "
                      f"{folder / 'training_config.yaml'} (pass --base to choose another)", stacklevel=2)
        return trained
    if name:
        raise ValueError(f"{cfg_path}: the base model {name!r} does not exist; pass --base NAME_OR_PATH")
    raise ValueError(f"{cfg_path} names no base model; pass --base NAME_OR_PATH")


def _training_config_base(folder: Path) -> Optional[str]:
    import yaml

    p = folder / "training_config.yaml"
    if not p.is_file():
        return None
    try:
        cfg = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        return cfg["model"]["init_args"]["base"]["name_or_path"]
    except (yaml.YAMLError, KeyError, TypeError):
        return None


class _NoBar:
    def advance(self) -> None:
        pass


class _progress:
    """A rich progress bar on standard error (documents done, documents per second), or nothing."""

    def __init__(self, enabled: bool, total: Optional[int]):
        self.enabled = enabled
        self.total = total

    def __enter__(self):
        if not self.enabled:
            return _NoBar()
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
        from rich.text import Text

        class DocsPerSecond(ProgressColumn):
            def render(self, task) -> Text:
                elapsed = task.elapsed or 0.0
                return Text(f"{task.completed / elapsed:.2f} docs/s" if elapsed > 0 and task.completed else "-- docs/s")

        self._progress = Progress(TextColumn("extract"), BarColumn(), MofNCompleteColumn(), DocsPerSecond(), TimeElapsedColumn(),
                                  console=Console(stderr=True))
        self._progress.start()
        task = self._progress.add_task("extract", total=self.total)
        progress = self._progress

        class Bar:
            def advance(self) -> None:
                progress.advance(task)

        return Bar()

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._progress.stop()
