"""The training recipe's guards: a model is only asked to end answers with a token it can write, every epoch of
every stage has its own batch order, empty answers are spread over the batches, a stage cut by time still ends
at its floor learning rate, a half-loaded adapter fails loudly, and a token cap below the gold answers is named."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from training_helpers import QUIET_TRAINER, single_thread, stage_config


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with single_thread():
        yield


# ------------------------------------------------------------------ the answer's end token


def collapsed_copy(tmp_path: Path, token: str, n_rows: int = 60) -> Path:
    """The tiny model saved with ``token``'s embedding row (and ``n_rows`` others) set to one shared vector, the
    shape of an untrained row in a quantised base checkpoint (Gemma 3 270M's <end_of_turn>), and, like Gemma,
    an end-of-sequence token apart from the turn end, with a trained row (the tiny tokenizer's eos is its turn
    end, and its <|endoftext|> is the padding row, all zeros: <|im_start|> stands in)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prouie_pl.modeling import resolve_model_path

    src = resolve_model_path("tiny")
    model, tok = AutoModelForCausalLM.from_pretrained(src), AutoTokenizer.from_pretrained(src)
    emb = model.get_input_embeddings().weight
    tid = tok.convert_tokens_to_ids(token)
    shared = emb[tid].detach().clone()
    g = torch.Generator().manual_seed(0)
    rows = torch.randperm(emb.shape[0], generator=g)[:n_rows].tolist()
    with torch.no_grad():
        for r in rows + [tid]:
            emb[r] = shared + 1e-4 * torch.randn(shared.shape, generator=g)
    out = tmp_path / "collapsed"
    tok.eos_token = "<|im_start|>"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_a_model_that_can_write_its_turn_end_keeps_the_chat_format():
    from prouie_pl.chat import answer_end_id, chat_prompt_ids, lookalike_rows
    from prouie_pl.modeling import input_embedding_on_disk, load_tokenizer, resolve_model_path

    tok = load_tokenizer("tiny")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.chat_template and answer_end_id(tok) == end
    assert lookalike_rows(input_embedding_on_disk(resolve_model_path("tiny")), end) == 0
    assert "<|im_start|>assistant" in tok.decode(chat_prompt_ids(tok, "Text: x"))


def test_a_base_whose_turn_end_row_is_untrained_gets_the_plain_format_ending_with_eos(tmp_path):
    from prouie_pl.chat import answer_end_id, chat_prompt_ids, lookalike_rows
    from prouie_pl.datamodules.batching import encode_sft
    from prouie_pl.modeling import input_embedding_on_disk, load_tokenizer

    folder = collapsed_copy(tmp_path, "<|im_end|>")
    tok = load_tokenizer(str(folder))
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert lookalike_rows(input_embedding_on_disk(str(folder)), end) >= 60
    assert tok.chat_template is None and answer_end_id(tok) == tok.eos_token_id != end
    enc = encode_sft(tok, "Text: Ann lives in Oslo .", '{"person": "Ann"}', 256)
    assert enc.input_ids[-1] == tok.eos_token_id and enc.labels[-1] == tok.eos_token_id
    assert "<|im_start|>" not in tok.decode(chat_prompt_ids(tok, "Text: x"))
    # the tokenised-data cache keys on the rule: the same files give another fingerprint
    from prouie_pl.datamodules.tokenized import tokenizer_id

    assert tokenizer_id(tok) != tokenizer_id(load_tokenizer("tiny"))


def test_loading_a_model_that_cannot_write_the_answer_end_is_refused(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prouie_pl.chat import check_answer_end

    folder = collapsed_copy(tmp_path, "<|im_end|>")
    tok = AutoTokenizer.from_pretrained(folder)  # not through load_tokenizer: the template stays
    model = AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(ValueError, match=r"<\|im_end\|> \(id \d+\), which this model cannot write: its embedding row is near-parallel"):
        check_answer_end(tok, model)
    tok.chat_template = None
    check_answer_end(tok, model)  # eos is a row of its own


# ------------------------------------------------------------------ batch order per epoch


class BatchLog(L.Callback):
    """Records, per epoch, what each training batch held (token ids for SFT, record keys for GRPO prompts)."""

    def __init__(self):
        self.epochs: dict[int, list] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if "records" in batch:
            key = tuple((r.task, r.dataset, r.index) for r in batch["records"])
        else:
            key = tuple(tuple(row[m.bool()].tolist()) for row, m in zip(batch["input_ids"], batch["attention_mask"]))
        self.epochs.setdefault(trainer.current_epoch, []).append(key)


def batch_orders(tmp_path: Path, base: str, name: str, epochs: int, **changes) -> dict[int, list]:
    from prouie_pl.lightning_cli import build_cli

    cfg = stage_config(base, tmp_path / f"{name}.yaml", **{
        "trainer.default_root_dir": str(tmp_path / name), "trainer.max_epochs": epochs, "trainer.max_steps": -1,
        "trainer.limit_val_batches": 0, "trainer.enable_checkpointing": False, "trainer.logger": False,
        "trainer.callbacks": [{"class_path": "prouie_pl.callbacks.CurriculumCallback"}],
        "model.init_args.lora.init_adapter": None, "data.seed": 7, "seed_everything": 7, **QUIET_TRAINER, **changes})
    cli = build_cli(["--config", str(cfg)], run=False)
    log = BatchLog()
    cli.trainer.callbacks.append(log)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return log.epochs


@pytest.mark.parametrize("stage,base,changes", [
    ("sa", "sa", {"data.sample_per_dataset": 6, "data.batch_size": 4}),
    ("mixed", "cm", {"data.schedule": "mixed", "data.epochs_per_phase": 1, "data.max_train_records": 6, "data.batch_size": 4}),
    ("de", "de", {"data.sample_per_dataset": 4, "data.batch_size": 2, "trainer.limit_train_batches": 3,
                  "model.init_args.rollout.max_new_tokens": 4, "model.init_args.rollout.num_generations": 2}),
])
def test_every_epoch_of_every_stage_has_its_own_batch_order_fixed_by_the_seed(tmp_path, stage, base, changes):
    first = batch_orders(tmp_path, base, f"{stage}-a", 3, **changes)
    assert sorted(first) == [0, 1, 2]
    orders = [first[e] for e in range(3)]
    assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2]
    if stage != "de":  # every epoch covers the same examples, only the order changes
        rows = [sorted(row for batch in order for row in batch) for order in orders]
        assert rows[0] == rows[1] == rows[2]
    again = batch_orders(tmp_path, base, f"{stage}-b", 3, **changes)
    assert [again[e] for e in range(3)] == orders


# ------------------------------------------------------------------ empty answers spread over the batches


def test_strata_put_each_batch_near_the_datas_share_of_empty_answers():
    from prouie_pl.datamodules.batching import LengthGroupedBatchSampler

    # 25% empty answers, all shorter than any other example: plain length grouping packs them together
    lengths = [3 + i % 3 for i in range(64)] + [20 + (7 * i) % 80 for i in range(192)]
    empty = [True] * 64 + [False] * 192
    plain = LengthGroupedBatchSampler(lengths, 8, seed=1)
    assert max(sum(empty[i] for i in b) for b in plain) == 8  # the problem: batches made of empty answers only
    mixed = LengthGroupedBatchSampler(lengths, 8, seed=1, strata=empty)
    batches = list(mixed)
    assert sorted(i for b in batches for i in b) == list(range(256))
    assert all(sum(empty[i] for i in b) == 2 for b in batches)  # 25% of 8, in every batch
    # length grouping still holds within each stratum: far less spread than a random batch
    spread = [max(lengths[i] for i in b if not empty[i]) - min(lengths[i] for i in b if not empty[i]) for b in batches]
    assert sum(spread) / len(spread) < 25
    mixed.set_epoch(1)
    assert list(mixed) != batches


def test_sa_batches_carry_the_datas_share_of_empty_answers(tmp_path):
    from prouie_pl.datamodules import UIEDataModule
    from prouie_pl.modeling import load_tokenizer

    dm = UIEDataModule(data_dir="demo", stage="sa", tasks=["NER", "RE"], sample_fraction=1.0, batch_size=8, max_val_records=0)
    tok = load_tokenizer("tiny")
    dm.connect(tok)
    dm.setup("fit")
    share = sum(u == 0 for u in dm._units) / len(dm._units)
    assert 0.1 < share < 0.25
    empty_per_batch = []
    for batch in dm.train_dataloader():
        answers = [tok.decode([t for t in row.tolist() if t >= 0], skip_special_tokens=True).strip() for row in batch["labels"]]
        empty_per_batch.append(sum(a == "{}" for a in answers) / len(answers))
    assert len(empty_per_batch) > 40
    full = empty_per_batch[:-1]  # the last batch may be short
    assert all(abs(s - share) <= 1 / 8 + 1e-9 for s in full), (share, sorted(full)[-5:])


# ------------------------------------------------------------------ the learning-rate schedule


def test_the_schedule_is_transformers_cosine_when_the_steps_end_the_stage():
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    from prouie_pl.optim import warmup_cosine_schedule

    def lrs(make):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = make(opt)
        out = []
        for _ in range(60):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    ours = lrs(lambda o: warmup_cosine_schedule(o, 50, 0.1, 0.1))
    ref = lrs(lambda o: get_cosine_with_min_lr_schedule_with_warmup(o, 5, 50, min_lr_rate=0.1))
    assert ours[:51] == pytest.approx(ref[:51], abs=1e-9)
    assert ours[51:] == pytest.approx([0.1] * 9)  # past the plan it stays at the floor (transformers' cosine climbs back)


def test_a_time_limit_brings_the_schedule_to_its_floor_before_the_planned_steps():
    from prouie_pl.optim import warmup_cosine_schedule

    now = {"t": 0.0}
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine_schedule(opt, 1000, 0.05, 0.1, clock=lambda: (now["t"], 20.0))
    seen = []
    for _ in range(20):  # 1 s a step, 20 s allowed: the stage ends after 20 of 1000 planned steps
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        now["t"] += 1.0
        sched.step()
    assert max(seen) == pytest.approx(1.0, abs=0.02)  # warm-up then the peak...
    assert seen[-1] == pytest.approx(0.1, abs=0.01)  # ...and the last step at the floor
    assert all(a >= b - 1e-12 for a, b in zip(seen[2:], seen[3:]))  # decaying all the way


def test_a_fit_cut_by_max_time_takes_its_last_step_near_the_floor(tmp_path):
    import time

    import lightning as L

    from prouie_pl.lightning_cli import build_cli

    class Slow(L.Callback):
        def __init__(self):
            self.lrs = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
            time.sleep(0.3)

    cfg = stage_config("sa", tmp_path / "timed.yaml", **{
        "trainer.default_root_dir": str(tmp_path / "timed"), "trainer.max_epochs": -1, "trainer.max_steps": 10_000,
        "trainer.max_time": "00:00:00:05", "trainer.limit_val_batches": 0, "trainer.enable_checkpointing": False,
        "trainer.logger": False, "trainer.callbacks": [], "model.init_args.lora.init_adapter": None,
        "model.init_args.learning_rate": 1e-3, "model.init_args.min_lr_ratio": 0.1, "data.sample_per_dataset": 8,
        "data.batch_size": 2, **QUIET_TRAINER})
    cli = build_cli(["--config", str(cfg)], run=False)
    slow = Slow()
    cli.trainer.callbacks.append(slow)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert 3 <= len(slow.lrs) < 100  # the clock ended the stage, far before 10,000 steps
    assert max(slow.lrs) > 5e-4
    assert slow.lrs[-1] < 1e-4 + 0.25 * (1e-3 - 1e-4), slow.lrs  # the last step trains near the floor of 1e-4


# ------------------------------------------------------------------ adapters load whole or not at all


def test_an_adapter_missing_a_lora_tensor_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from prouie_pl.modeling import BaseModelSettings, LoRASettings, load_model
    from prouie_pl.sft import SFTModule

    module = SFTModule(base=BaseModelSettings("tiny"), lora=LoRASettings(r=4, alpha=8, dropout=0.0))
    module.configure_model()
    with torch.no_grad():
        for n, p in module.model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.01)
    whole, half = tmp_path / "whole", tmp_path / "half"
    module.save_adapter(str(whole))
    module.save_adapter(str(half))
    weights = load_file(str(half / "adapter_model.safetensors"))
    dropped = sorted(k for k in weights if "lora_B" in k)[0]
    save_file({k: v for k, v in weights.items() if k != dropped}, str(half / "adapter_model.safetensors"))

    fresh = SFTModule(base=BaseModelSettings("tiny"), lora=LoRASettings(r=4, alpha=8, dropout=0.0))
    fresh.configure_model()
    fresh.load_adapter_weights(str(whole))
    assert all(float(p.abs().max()) == pytest.approx(0.01) for n, p in fresh.model.named_parameters() if "lora_B" in n)
    with pytest.raises(ValueError, match=r"lacks 1 of the \d+ adapter tensors"):
        fresh.load_adapter_weights(str(half))
    with pytest.raises(ValueError, match=r"lacks 1 of the \d+ adapter tensors"):
        load_model(BaseModelSettings("tiny"), LoRASettings(init_adapter=str(half)))
    other = SFTModule(base=BaseModelSettings("tiny"), lora=LoRASettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj"]))
    other.configure_model()
    with pytest.raises(ValueError, match="does not fit this model"):
        other.load_adapter_weights(str(whole))


# ------------------------------------------------------------------ token caps against the gold


def test_a_token_cap_below_gold_answers_is_named_with_the_figures():
    from prouie_pl.callbacks.generation_eval import cap_below_gold
    from prouie_pl.chat import answer_ids
    from prouie_pl.demo_data import demo_data_dir
    from prouie_pl.formats import render_target
    from prouie_pl.modeling import load_tokenizer
    from prouie_pl.reader import load_records

    tok = load_tokenizer("tiny")
    recs = load_records(demo_data_dir(), "test", datasets=["EE/DemoEE", "NER/DemoNER"])
    longest = {ds: max(len(answer_ids(tok, render_target(r, "full"))) for r in recs if r.dataset == ds) for ds in ("DemoEE", "DemoNER")}
    assert cap_below_gold(recs, "full", tok, max(longest.values())) is None
    cap = min(longest.values()) - 1
    message = cap_below_gold(recs, "full", tok, cap, "test")
    assert f"max_new_tokens={cap} is shorter" in message and "EE/DemoEE:" in message and "NER/DemoNER:" in message
    assert f"Raise it to at least {max(longest.values())}" in message
    n_ee = sum(1 for r in recs if r.dataset == "DemoEE" and len(answer_ids(tok, render_target(r, "full"))) > cap)
    assert f"EE/DemoEE: {n_ee} of " in message


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_model_trains_in_train_mode_so_gradient_checkpointing_runs(checkpointing):
    """``from_pretrained`` leaves the base in eval mode, and transformers skips gradient checkpointing in layers
    that are not training: the module puts the whole model in train mode, so the option does what it says
    (each decoder layer runs again in the backward pass) and Lightning finds no module in eval mode."""
    from prouie_pl.modeling import BaseModelSettings, LoRASettings
    from prouie_pl.sft import SFTModule

    module = SFTModule(base=BaseModelSettings("tiny", gradient_checkpointing=checkpointing),
                       lora=LoRASettings(r=4, alpha=8, dropout=0.0))
    module.configure_model()
    assert [n for n, m in module.model.named_modules() if not m.training] == []
    layers = module.model.get_base_model().model.layers
    calls = []
    # transformers checkpoints a layer's ``forward`` (a hook on the layer sees one call) and torch stops the
    # recomputation once the last saved tensor is back (a forward hook on the last module never fires): count
    # the calls that enter the attention block, the layer's first
    hooks = [layer.self_attn.register_forward_pre_hook(lambda *a: calls.append(1)) for layer in layers]
    try:
        ids = torch.randint(3, 100, (2, 12))
        module.model(input_ids=ids, labels=ids).loss.backward()
    finally:
        for h in hooks:
            h.remove()
    assert len(calls) == len(layers) * (2 if checkpointing else 1)
