"""A real causal LM and tokenizer built offline, for tests, the demo and CPU benchmarks.

No machine here reaches a model hub, so this module trains a small byte-level BPE tokenizer with ``tokenizers``
on the training split of a corpus, wraps it in ``PreTrainedTokenizerFast`` with a ChatML chat template, builds
a small ``LlamaForCausalLM`` and saves both with ``save_pretrained``.  Everything downstream loads them through
the same ``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained`` path a user's model takes.  (A
``LlamaConfig`` rather than ``Qwen2Config``: with the latter ``AutoTokenizer`` swaps in ``Qwen2Tokenizer``,
which re-splits digits.)

Base pre-training: LoRA adapts features a base model already has; a randomly initialised base has none, and
LoRA on it barely learns.  So by default the base is first trained for a few hundred steps as a plain language
model on the training split: each sentence and each rendered answer as separate documents (never a prompt
followed by its answer), plus each sentence followed by the JSON list of its capitalised words.  The last kind
installs a generic copying skill (quote proper nouns of a text into JSON, untyped, unrelated to any label
schema) that every real base model has and that a model this small does not find on its own in a few minutes:
on the demo data, LoRA CM training for 300 steps reached NER F1 3 without it and 23 with it (55 after 700
steps).  Like a real base model it knows the words, the JSON shapes and how to quote; mapping text to the
schema's structures is left to the training stages.  Dev and test splits are never used.

Logit range: LoRA leaves the LM head and the final norm frozen, so the largest logit margin the adapted model
can reach is set by the base.  At the usual initialisation (std 0.02, hidden 256) a tiny model's head rows stay
short, and a token the base rarely predicted (an answer's opening ``{"`` after the chat header) could not rise
above p = 0.16 however long LoRA trained; the head therefore starts at ``HEAD_INIT_SCALE`` times the usual
scale (initial logits still have a std near 1).  Each document is preceded by a separator so its first token
is learned too, and the quoting skill also appears as a chat turn, so the chat markers are known tokens.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Optional

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
HEAD_INIT_SCALE = 4.0
BUILD_THREADS = 2


def corpus_records(root: Optional[str | os.PathLike] = None, max_records_per_dataset: int = 2000) -> list:
    """Training-split records of every data set under ``root`` (default: the bundled demo data)."""
    from .reader import discover, read_split_file

    if root is None:
        from .demo_data import demo_data_dir

        root = demo_data_dir()
    out = []
    for info in discover(root):
        if (info.path / "train.json").is_file():
            out.extend(read_split_file(info, "train", on_error="skip", max_records=max_records_per_dataset))
    return out


# The formats the tiny model's tokenizer and pre-training see: the two the stages train on.  A fixed tuple, not
# ``formats.FORMATS``: every merge of the tokenizer, and so every figure a test pins on the tiny model, follows
# from this text, and an optional format added to the package must not move them.
TINY_FORMATS: tuple[str, ...] = ("full", "concise")


def tokenizer_texts(records) -> Iterator[str]:
    """Texts the tokenizer learns from: prompts and answers in both formats."""
    from .formats import build_prompt, render_target

    for rec in records:
        for fmt in TINY_FORMATS:
            yield f"user\n{build_prompt(rec, fmt)}\nassistant\n"  # the chat template's role words become tokens too
            yield render_target(rec, fmt)


_PROPER_NOUNS = re.compile(r"[A-Z][\w'-]*(?: [A-Z][\w'-]*)*")


def pretraining_documents(records) -> list[str]:
    """Base pre-training documents (see the module docstring): sentences, answers, proper-noun quoting."""
    from .formats import render_target

    docs = []
    for rec in records:
        docs.append(rec.sentence)
        docs.extend(render_target(rec, fmt) for fmt in TINY_FORMATS)
        quoted = json.dumps(_PROPER_NOUNS.findall(rec.sentence), ensure_ascii=False)
        docs.append(rec.sentence + "\n" + quoted)
        # the same skill as a chat turn, so the chat markers are known tokens, as in any instruct model
        docs.append(f"<|im_start|>user\n{rec.sentence}<|im_end|>\n<|im_start|>assistant\n{quoted}<|im_end|>")
    return docs


def pretrain(model, tokenizer, documents: list[str], steps: int, batch_size: int = 16, lr: float = 2e-3, seed: int = 0) -> list[float]:
    """Plain causal-LM training of every weight on ``documents``; returns the loss per step."""
    import random

    import torch

    from .kernels.reference import IGNORE_INDEX

    if steps <= 0 or not documents:
        return []
    rng = random.Random(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / steps))
    losses = []
    for _ in range(steps):
        # a separator before each document, so its first token is predicted (and learned) too
        batch = [SPECIAL_TOKENS[0] + d + tokenizer.eos_token for d in rng.sample(documents, min(batch_size, len(documents)))]
        enc = tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=512)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, IGNORE_INDEX)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
    model.eval()
    return losses


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2000):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with ChatML special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )


def build_tiny_model(
    out_dir: str | os.PathLike,
    corpus: Optional[str | os.PathLike] = None,
    vocab_size: int = 2000,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 512,
    max_position_embeddings: int = 4096,
    pretrain_steps: int = 600,
    seed: int = 0,
    max_records_per_dataset: int = 2000,
) -> Path:
    """Build and save a tiny Llama and its tokenizer in ``out_dir``; returns the folder.

    ``corpus`` is an IE INSTRUCTIONS root (default: the demo data); its training split trains the tokenizer
    and, for ``pretrain_steps`` steps, the base (see the module docstring).  Deterministic for a given corpus,
    sizes and seed on one machine (the base trains on ``BUILD_THREADS`` threads whatever the caller uses).
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = corpus_records(corpus, max_records_per_dataset)
    tokenizer = train_tokenizer(tokenizer_texts(records), vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # room for confident logits under a frozen head (see the module docstring)
        model.lm_head.weight.mul_(HEAD_INIT_SCALE)
    # CPU matmuls round differently with another thread count; a fixed one makes the cached model the same
    # whichever process (a one-thread test, the demo) happens to build it first
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        losses = pretrain(model, tokenizer, pretraining_documents(records), pretrain_steps, seed=seed)
    finally:
        torch.set_num_threads(threads)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if losses:
        (out / "pretraining.json").write_text(
            '{"steps": %d, "first_loss": %.4f, "last_loss": %.4f}\n' % (len(losses), losses[0], sum(losses[-10:]) / len(losses[-10:])),
            encoding="utf-8",
        )
    return out
