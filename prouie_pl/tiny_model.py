"""A real causal LM and tokenizer built offline, for tests, the demo and CPU benchmarks.

No machine here reaches a model hub, so this module trains a small byte-level BPE tokenizer with ``tokenizers``
on the prompts and targets of a corpus, wraps it in ``PreTrainedTokenizerFast`` with a ChatML chat template,
builds a randomly initialised ``LlamaForCausalLM`` and saves both with ``save_pretrained``.  Everything
downstream then loads them through the same ``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained`` path a
user's model takes.  (A ``LlamaConfig`` rather than ``Qwen2Config``: with the latter ``AutoTokenizer`` swaps
in ``Qwen2Tokenizer``, which re-splits digits.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator, Optional

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def corpus_texts(root: Optional[str | os.PathLike] = None, max_records_per_dataset: int = 2000) -> Iterator[str]:
    """Texts the tokenizer learns from: prompts and targets (both formats) of every data set under ``root``.

    Without ``root`` the bundled demo data is used.
    """
    from .formats import FORMATS, build_prompt, render_target
    from .reader import SPLITS, discover, read_split_file

    if root is None:
        from .demo_data import demo_data_dir

        root = demo_data_dir()
    for info in discover(root):
        for split in SPLITS:
            if not (info.path / f"{split}.json").is_file():
                continue
            for rec in read_split_file(info, split, on_error="skip", max_records=max_records_per_dataset):
                for fmt in FORMATS:
                    yield build_prompt(rec, fmt)
                    yield render_target(rec, fmt)


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
    seed: int = 0,
    texts: Optional[Iterable[str]] = None,
) -> Path:
    """Build and save a tiny Llama and its tokenizer in ``out_dir``; returns the folder.

    ``texts`` (if given) replaces the corpus for the tokenizer.  Deterministic for a given corpus and seed.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(texts if texts is not None else corpus_texts(corpus), vocab_size)
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
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
