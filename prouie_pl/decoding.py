"""Greedy decoding of a left-padded prompt batch, shared by evaluation (:class:`prouie_pl.uie_module.UIEModule`)
and extraction (:class:`prouie_pl.extractor.Extractor`).

Generation stops at the ids of :func:`prouie_pl.chat.stop_token_ids`; with ``constraint_rows`` the
schema-constrained processor of :mod:`prouie_pl.constrained` masks the logits at every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .schema import LabelSchema


@dataclass
class GreedyOutput:
    """Answers of one batch: decoded text, whether the length limit cut it, and tokens generated (stop included)."""

    texts: list[str]
    truncated: list[bool]
    new_tokens: list[int]


@torch.no_grad()
def generate_greedy(model, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                    stop_ids: Sequence[int],
                    constraint_rows: Optional[Sequence[tuple[str, LabelSchema, str]]] = None) -> GreedyOutput:
    """Greedy answers for a left-padded batch; ``constraint_rows`` gives ``(task, schema, text)`` per row to
    decode under the concise-format constraint."""
    kwargs = {}
    if constraint_rows is not None:
        from transformers import LogitsProcessorList

        from .constrained import SchemaConstrainedLogits

        if len(constraint_rows) != input_ids.shape[0]:
            raise ValueError(f"constrained decoding needs one (task, schema, text) per row: {len(constraint_rows)} for {input_ids.shape[0]} rows")
        kwargs["logits_processor"] = LogitsProcessorList([
            SchemaConstrainedLogits(tokenizer, constraint_rows, input_ids.shape[1], max_new_tokens, stop_ids)
        ])
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=list(stop_ids), use_cache=True, **kwargs)
    finally:
        if was_training:
            model.train()
    new = out[:, input_ids.shape[1]:]
    is_stop = torch.isin(new, torch.tensor(list(stop_ids), device=new.device))
    ended = is_stop.any(dim=1)
    # tokens up to and including the first stop (generate pads finished rows after it)
    first_stop = torch.where(ended, is_stop.float().argmax(dim=1) + 1, torch.full_like(ended, new.shape[1], dtype=torch.long))
    lengths = [int(n) for n in first_stop.tolist()]
    rows = new.tolist()
    # decoded as generated: no clean-up of spaces, which would change spans copied from the text
    texts = tokenizer.batch_decode([r[:n] for r, n in zip(rows, lengths)], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return GreedyOutput(texts, [not bool(e) for e in ended], lengths)
