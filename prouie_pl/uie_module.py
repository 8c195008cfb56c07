"""``UIEModule``: what the SFT and GRPO LightningModules share.

It owns the language model (built in ``configure_model`` so configs parse without loading weights, and so
sharded strategies can wrap it), the tokenizer, greedy decoding for validation/test/predict, and adapter-only
checkpoints: Lightning checkpoints hold the trainable (LoRA) weights and optimizer state, never the frozen base,
which is rebuilt from ``model.base`` on resume.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import lightning as L
import torch

from .memory import rss_mb, trim_heap
from .modeling import BaseModelSettings, LoRASettings, load_model, load_tokenizer
from .schema import Record


@dataclass
class GenerationSettings:
    """Decoding for evaluation (greedy).

    Args:
        max_new_tokens: cap on generated tokens per answer; answers cut there count as truncated.
        constrained: schema-constrained decoding (:mod:`prouie_pl.constrained`): only the concise format's
            skeleton, the record's schema labels and spans copied from its sentence; every answer parses.  It
            writes the concise format, so it suits SA and DE models (and data with ``target_format: concise``).
        unit_scores: score every unit of every answer (:mod:`prouie_pl.confidence`, with the calibration saved
            beside ``lora.init_adapter`` when there is one); the scores go to ``predictions.jsonl``.
        loop_guard: end an answer that writes one block of tokens three times in a row
            (:class:`prouie_pl.decoding.LoopGuard`): it keeps two copies and counts as cut, like an answer
            that reaches ``max_new_tokens``, and ``predictions.jsonl`` marks it ``looped``.
    """

    max_new_tokens: int = 256
    constrained: bool = False
    unit_scores: bool = True
    loop_guard: bool = True


class UIEModule(L.LightningModule):
    """Base class: the LLM, its tokenizer, evaluation decoding and adapter-only checkpoints."""

    flops_per_batch = None  # not known for a LoRA model: Lightning's ThroughputMonitor then reports no MFU
    heap_slack_mb: Optional[float] = 1024  # trim the C heap on a CPU once RSS grew this much (None: never)
    _trimmed_rss: Optional[float] = None

    def __init__(self, base: Optional[BaseModelSettings] = None, lora: Optional[LoRASettings] = None,
                 generation: Optional[GenerationSettings] = None):
        super().__init__()
        self.base_settings = base or BaseModelSettings()
        self.lora_settings = lora if lora is not None else LoRASettings()
        self.generation_settings = generation or GenerationSettings()
        self.model = None
        self._tokenizer = None
        # checkpoints hold only the trainable weights; the frozen base comes from model.base
        self.strict_loading = False

    # ------------------------------------------------------------------ model

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.base_settings.name_or_path)
        return self._tokenizer

    def configure_model(self) -> None:
        if self.model is not None:
            return
        device = None
        if self._trainer is not None:
            device = self.trainer.strategy.root_device
            self._check_strategy()
        self.model = load_model(self.base_settings, self.lora_settings, device)
        # ``from_pretrained`` leaves the base in eval mode and Lightning does not change it at fit start (it only
        # warns about "modules in eval mode").  Eval mode there is not harmless: transformers skips gradient
        # checkpointing in layers that are not training, so ``model.base.gradient_checkpointing`` would do
        # nothing.  The bases shipped here have no dropout outside LoRA (attention dropout 0), so train mode
        # changes no number; Lightning's evaluation loops, and every decoding path (``decoding.eval_mode``),
        # switch to eval mode and back themselves.
        self.model.train()
        from .chat import check_answer_end

        check_answer_end(self.tokenizer, self.model)

    def _check_strategy(self) -> None:
        name = type(self.trainer.strategy).__name__.lower()
        if self.base_settings.quantization == "nf4" and ("fsdp" in name or "deepspeed" in name):
            raise ValueError(
                f"model.base.quantization=nf4 with trainer.strategy={type(self.trainer.strategy).__name__} is not supported: "
                "4-bit weights cannot be sharded here. Use trainer.strategy=ddp (each GPU holds the 4-bit base) "
                "or model.base.quantization=none with bf16 weights for FSDP/DeepSpeed."
            )

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # On a CPU the C library keeps the pages of a step's freed activations, and the resident set grows with
        # every new batch shape (Gemma 3 270M, demo CM: 1.5 GB live, 6.4 GB resident after 60 micro-batches).
        # Hand them back once it has grown by heap_slack_mb since the last trim: trimming after every batch
        # costs about 10% (the next step faults its pages in again), this bounds the growth for a few trims.
        if self.heap_slack_mb is None or self.device.type != "cpu":
            return
        now = rss_mb()
        if now is not None and (self._trimmed_rss is None or now - self._trimmed_rss > self.heap_slack_mb):
            trim_heap()
            self._trimmed_rss = rss_mb()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in names}
        checkpoint["prouie_base"] = asdict(self.base_settings)

    def load_adapter_weights(self, folder: str) -> None:
        """Load the weights of a saved adapter (same LoRA shape) into the current model; every LoRA tensor of
        the model must come from the file (:func:`prouie_pl.modeling.check_adapter_keys`)."""
        from peft import set_peft_model_state_dict

        from .modeling import check_adapter_keys, read_adapter_weights

        weights = read_adapter_weights(folder)
        check_adapter_keys(self.model, weights, folder)
        set_peft_model_state_dict(self.model, weights)

    def save_adapter(self, folder: str) -> None:
        """The adapter in PEFT format (``PeftModel.from_pretrained`` loads it) plus the tokenizer."""
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    # ------------------------------------------------------------------ decoding

    @property
    def stop_ids(self) -> list[int]:
        """Token ids that end an answer (see :mod:`prouie_pl.chat`)."""
        from .chat import stop_token_ids

        return stop_token_ids(self.tokenizer, getattr(self.model, "generation_config", None))

    def generate_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: Optional[int] = None,
                       records: Optional[Sequence[Record]] = None) -> tuple[list[str], list[bool]]:
        """Greedy answers for a left-padded prompt batch, and whether each was cut by the length limit.

        With ``generation.constrained`` the answers are decoded under the schema constraint of each row's record
        (``records``, in batch order: task, schema and sentence).
        """
        out = self.generate_answers(input_ids, attention_mask, max_new_tokens, records)
        return out.texts, out.truncated

    def generate_answers(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: Optional[int] = None,
                         records: Optional[Sequence[Record]] = None, with_logprobs: bool = False):
        """:meth:`generate_texts` as a :class:`prouie_pl.decoding.GreedyOutput` (token ids and their
        log-probabilities too with ``with_logprobs``)."""
        from .decoding import LoopGuard, generate_greedy

        limit = max_new_tokens or self.generation_settings.max_new_tokens
        rows = None
        if self.generation_settings.constrained:
            if records is None:
                raise ValueError("model.generation.constrained needs the batch's records (task, schema, sentence) to constrain on")
            rows = [(r.task, r.schema, r.sentence) for r in records]
        guard = LoopGuard() if self.generation_settings.loop_guard else None
        return generate_greedy(self.model, self.tokenizer, input_ids, attention_mask, limit, self.stop_ids, constraint_rows=rows,
                               with_logprobs=with_logprobs, loop_guard=guard)

    @property
    def calibration(self):
        """The unit-score calibration saved with ``lora.init_adapter`` (identity when there is none)."""
        from .confidence import Calibration

        if getattr(self, "_calibration", None) is None:
            self._calibration = Calibration.load(getattr(self.lora_settings, "init_adapter", None))
        return self._calibration

    def _decode_step(self, batch: dict, scores: bool = True) -> dict:
        records = batch["records"].items
        scored = scores and self.generation_settings.unit_scores
        out = self.generate_answers(batch["input_ids"], batch["attention_mask"], records=records, with_logprobs=scored)
        step = {"records": records, "outputs": out.texts, "truncated": out.truncated, "looped": out.looped}
        if scored and out.token_logprobs is not None:
            from .confidence import score_answer

            cal = self.calibration
            step["unit_scores"] = [score_answer(self.tokenizer, text, ids, lps, rec.task, rec.schema, calibration=cal).scores
                                   for text, ids, lps, rec in zip(out.texts, out.token_ids, out.token_logprobs, records)]
        return step

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return self._decode_step(batch, scores=False)  # dev checks need F1 only

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        return self._decode_step(batch)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        return self._decode_step(batch)

    # ------------------------------------------------------------------ callbacks

    def configure_callbacks(self):
        """Add the generation-based evaluator (decoding, scoring, ``val/f1``) unless the config lists one; every
        other callback, the curriculum's included, comes from the config."""
        from .callbacks import GenerationEvaluator

        present = self.trainer.callbacks if self._trainer is not None else []
        return [] if any(isinstance(c, GenerationEvaluator) for c in present) else [GenerationEvaluator()]
