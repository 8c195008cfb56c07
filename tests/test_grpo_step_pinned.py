"""One GRPO step on a fixed batch gives the loss and gradients pinned here.

The figures were taken from ``GRPOModule.training_step`` as it stood before the step was rebuilt from typed
pieces (trajectory, rewards, advantages, micro-batches, step statistics); any later change to the step must
leave them as they are unless it means to change the algorithm.  Everything the step sees is fixed in this
file: a tiny Llama built on two data sets written here (not the demo data, which changes), a LoRA adapter with
seeded random B matrices (so the policy differs from the reference and the KL term has a gradient), two
prompts, and four hand-written completions per prompt in place of sampling (the gold answer, a partly wrong
one, one cut off before its end token and one that is not JSON), so rewards spread within each group.

Per optimizer step (one per update pass) the test compares the gradient of every LoRA tensor through three
figures: the global L2 norm, the sum of absolute values and the dot product with a fixed random direction
(seeded, over the parameters in name order), which moves with any change of the gradient.  It also compares
the logged loss, KL, clip ratio and reward.  Cases cover both advantage modes, all four loss aggregations,
micro-batches, the zero-advantage skip, the reference pass (beta > 0) and two update passes (old log-probs).
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

import prouie_pl.grpo.module as grpo_module
from helpers import ner, rel
from training_helpers import single_thread
from prouie_pl.reader import SPLITS, write_dataset

NER_LABELS = ["person", "organization", "location"]
RE_LABELS = ["work for", "live in"]
NER_RAW = [
    ner("Ann Lee joined IBM in Oslo.", ("Ann Lee", "person"), ("IBM", "organization"), ("Oslo", "location")),
    ner("Bo Chen visited Paris with Acme staff.", ("Bo Chen", "person"), ("Paris", "location"), ("Acme", "organization")),
    ner("Cy Dorn left Rome.", ("Cy Dorn", "person"), ("Rome", "location")),
]
RE_RAW = [
    rel("Dee Ray works for Helix in Lima.", ("Dee Ray", "work for", "Helix"), ("Dee Ray", "live in", "Lima")),
    rel("Eli Moss lives in Kyiv.", ("Eli Moss", "live in", "Kyiv")),
]
# per prompt, G = 4 completions: (text, whether it ends with the end token)
COMPLETIONS = {
    "NER": [('{"person": "Ann Lee", "organization": "IBM", "location": "Oslo"}', True),
            ('{"person": "Ann Lee; IBM", "location": "Oslo"}', True),
            ('{"person": "Ann', False),
            ("Ann Lee is a person.", True)],
    "RE": [('{"work for": "Dee Ray -> Helix", "live in": "Dee Ray -> Lima"}', True),
           ('{"work for": "Dee Ray -> Lima"}', True),
           ('{"live in": "Dee Ray -> Lima", "work', False),
           ("{}", True)],
}
G = 4

# case name -> GRPOModule arguments
CASES = {
    "stepwise_grpo": dict(advantage="stepwise", loss_type="grpo", beta=0.0),
    "stepwise_bnpo_kl_micro": dict(advantage="stepwise", loss_type="bnpo", beta=0.04, micro_batch_size=4),
    "outcome_dapo_two_passes": dict(advantage="outcome", loss_type="dapo", beta=0.04, num_iterations=2, micro_batch_size=2),
    "outcome_dr_grpo_no_skip": dict(advantage="outcome", loss_type="dr_grpo", beta=0.0, skip_zero_advantage=False,
                                    scale_rewards="batch"),
}

# pinned from the step before its rebuild: logged figures, then (norm, abs sum, dot) per optimizer step
PINNED = {
    "outcome_dapo_two_passes": ({"train/loss": -0.4439213368771733, "train/kl": 0.02137696643467939, "train/clip_ratio": 0.19565216926992804,
                                 "train/reward": 0.041666675359010696},
                                [(0.3816868436223444, 12.298899268917467, 0.013342353703130055),
                                 (0.4022474830444576, 13.384105459234775, -0.5482231015559509)]),
    "outcome_dr_grpo_no_skip": ({"train/loss": -0.2303985059261322, "train/kl": 0.0, "train/clip_ratio": 0.0, "train/reward": 0.041666675359010696},
                                [(0.19071741697876704, 6.760622104609411, -0.05079688007513762)]),
    "stepwise_bnpo_kl_micro": ({"train/loss": -0.5343130675778873, "train/kl": 0.005930652592223191, "train/clip_ratio": 0.0,
                                "train/reward": 0.041666675359010696},
                               [(0.5515709752745053, 17.84966404816896, -0.2686019989873219)]),
    "stepwise_grpo": ({"train/loss": 0.21187391877174377, "train/kl": 0.0, "train/clip_ratio": 0.0, "train/reward": 0.041666675359010696},
                      [(0.47268082927885163, 16.149184731981677, 0.5169201284538844)]),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with single_thread(deterministic=True):
        yield


@pytest.fixture(scope="module")
def pinned_model_dir(tmp_path_factory):
    from prouie_pl.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("pinned_corpus")
    write_dataset(root, "NER", "People", NER_LABELS, dict.fromkeys(SPLITS, NER_RAW))
    write_dataset(root, "RE", "Jobs", RE_LABELS, dict.fromkeys(SPLITS, RE_RAW))
    return build_tiny_model(tmp_path_factory.mktemp("pinned_model"), corpus=root, vocab_size=400, hidden_size=32,
                            num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64, pretrain_steps=0)


def fixed_batch(tokenizer):
    from prouie_pl.chat import chat_prompt_ids
    from prouie_pl.datamodules.batching import collate_prompts
    from prouie_pl.formats import build_prompt
    from prouie_pl.reader import parse_record
    from prouie_pl.schema import LabelSchema

    records = [parse_record(NER_RAW[0], "NER", "People", LabelSchema("NER", tuple(NER_LABELS)), 0, "train"),
               parse_record(RE_RAW[0], "RE", "Jobs", LabelSchema("RE", tuple(RE_LABELS)), 0, "train")]
    return collate_prompts(tokenizer.pad_token_id)([(r, chat_prompt_ids(tokenizer, build_prompt(r, "concise"))) for r in records])


def fixed_rollouts(batch):
    """A stand-in for ``generate_rollouts``: the completions of ``COMPLETIONS`` for each prompt of the batch."""
    from prouie_pl.chat import answer_ids
    from prouie_pl.grpo.rollout import Rollout

    def rollouts(model, tokenizer, input_ids, attention_mask, settings):
        rows, cut = [], []
        for rec in batch["records"]:
            for text, ended in COMPLETIONS[rec.task]:
                ids = answer_ids(tokenizer, text)
                rows.append(ids if ended else ids[:-1])
                cut.append(not ended)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        return Rollout(input_ids.repeat_interleave(G, dim=0), attention_mask.repeat_interleave(G, dim=0), ids, mask,
                       torch.tensor(cut))

    return rollouts


class GradientFigures(L.Callback):
    """(L2 norm, sum of |g|, <g, r>) of the LoRA gradients at every optimizer step."""

    def __init__(self):
        self.steps: list[tuple[float, float, float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        named = sorted((n, p) for n, p in pl_module.named_parameters() if p.requires_grad)
        gen = torch.Generator().manual_seed(1234)
        norm2 = total = dot = 0.0
        for _, p in named:
            direction = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            g = torch.zeros(p.shape, dtype=torch.float64) if p.grad is None else p.grad.detach().double()
            norm2 += float((g * g).sum())
            total += float(g.abs().sum())
            dot += float((g * direction).sum())
        self.steps.append((norm2 ** 0.5, total, dot))


def run_case(model_dir, monkeypatch, **options):
    from prouie_pl.grpo import GRPOModule, RolloutSettings
    from prouie_pl.modeling import BaseModelSettings, LoRASettings

    module = GRPOModule(base=BaseModelSettings(name_or_path=str(model_dir)), lora=LoRASettings(r=4, alpha=8, dropout=0.0),
                        rollout=RolloutSettings(num_generations=G, temperature=1.0, max_new_tokens=32),
                        learning_rate=1e-2, max_grad_norm=0.0, **options)
    module.configure_model()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in sorted(module.model.named_parameters()):
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    batch = fixed_batch(module.tokenizer)
    monkeypatch.setattr(grpo_module, "generate_rollouts", fixed_rollouts(batch))
    grads = GradientFigures()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[grads])
    trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None, collate_fn=lambda b: b))
    stats = module.last_step_stats
    logged = {k: stats[k] for k in ("train/loss", "train/kl", "train/clip_ratio", "train/reward")}
    return logged, grads.steps


@pytest.mark.parametrize("case", sorted(CASES))
def test_grpo_step_matches_the_pinned_loss_and_gradients(pinned_model_dir, monkeypatch, case):
    logged, steps = run_case(pinned_model_dir, monkeypatch, **CASES[case])
    want_logged, want_steps = PINNED[case]
    assert logged == pytest.approx(want_logged, rel=1e-4, abs=1e-7)
    assert len(steps) == len(want_steps)
    for got, want in zip(steps, want_steps):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-9)
    assert all(norm > 0 for norm, _, _ in steps)  # the batch carries a learning signal in every case
