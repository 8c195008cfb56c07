"""The shared decoding path (:mod:`prouie_pl.decoding`): prompts prefilled once for their G completions decode
exactly as repeated prompts do, sampling draws from the distribution ``generate`` draws from, batches are formed
by prompt length, and every row stops at any id of the stop set.

Models: the session's tiny Llama and a tiny randomly initialised Gemma 3 built here (no download), whose
sliding-window layers (window 6) are shorter than the prompts, so the hybrid cache drops positions before it
is repeated.  The reference is always a plain ``generate`` on the prompts repeated G times, the way rollouts
were produced before prompts shared their prefill.
"""

from __future__ import annotations

import pytest
import torch

from prouie_pl.decoding import (Completions, Sampling, completion_mask, decode_batch, decode_prompts, iter_decode, left_pad,
                                length_batches, prefill_shared_cache)
from training_helpers import single_thread

PAD = 0


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def gemma():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                              num_key_value_heads=1, head_dim=16, sliding_window=6,
                              layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
                              max_position_embeddings=256, pad_token_id=PAD, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    return Gemma3ForCausalLM(config).eval()


MODELS = ["llama", "gemma"]


def random_prompts(vocab: int, lengths, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def repeated_generate(model, ids, mask, g: int, stops, max_new_tokens: int, **sampling) -> torch.Tensor:
    """The reference: ``generate`` on every prompt repeated ``g`` times (each prefilled ``g`` times)."""
    out = model.generate(input_ids=ids.repeat_interleave(g, dim=0), attention_mask=mask.repeat_interleave(g, dim=0),
                         max_new_tokens=max_new_tokens, pad_token_id=PAD, eos_token_id=list(stops), use_cache=True, **sampling)
    return out[:, ids.shape[1]:]


def stop_set_with_early_ends(model, ids, mask, max_new_tokens: int) -> list[int]:
    """A stop set under which greedy rows end at different steps and at least one runs to the limit: the tokens
    greedy decoding writes at step 2 of the first prompt and step 4 of the second, where the last prompt writes
    neither within the limit."""
    with torch.no_grad():
        free = repeated_generate(model, ids, mask, 1, [model.config.vocab_size + 7], max_new_tokens, do_sample=False)
    stops = sorted({int(free[0, 2]), int(free[1, 4])} - set(free[-1].tolist()))
    assert stops, "this prompt set needs a last row that writes neither stop candidate"
    return stops


@pytest.mark.parametrize("name", MODELS)
def test_shared_prefix_greedy_decoding_gives_the_repeated_prompts_tokens(request, name):
    model = request.getfixturevalue(name)
    vocab = model.config.vocab_size
    ids, mask = left_pad(random_prompts(vocab, [12, 7, 20], seed=1), PAD)  # left padding of 8 and 13
    max_new, g = 14, 3
    stops = stop_set_with_early_ends(model, ids, mask, max_new)
    with torch.no_grad():
        want = repeated_generate(model, ids, mask, g, stops, max_new, do_sample=False)
    got = decode_batch(model, ids, mask, max_new_tokens=max_new, stop_ids=stops, pad_id=PAD, num_samples=g, share_prefix=True)

    want_mask, want_cut = completion_mask(want, stops)
    assert torch.equal(got.mask, want_mask) and torch.equal(got.truncated, want_cut)
    assert torch.equal(got.ids, want.masked_fill(want_mask == 0, PAD))
    lengths = got.lengths.tolist()
    # rows end at different steps (a stop id, included in the mask), the last prompt's at the limit
    assert lengths[0] <= 3 and lengths[g] <= 5 and not got.truncated[:2 * g].any()
    assert got.truncated[-g:].all() and lengths[-1] == max_new
    # the G copies of a greedy prompt agree with each other
    assert all(torch.equal(got.ids[i * g], got.ids[i * g + j]) for i in range(3) for j in range(g))


def test_gemma_hybrid_cache_repeats_its_sliding_window_layers(gemma):
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    ids, mask = left_pad(random_prompts(300, [12, 20], seed=2), PAD)
    with torch.no_grad():
        _, cache = prefill_shared_cache(gemma, ids, mask, repeats=4)
        _, single = prefill_shared_cache(gemma, ids, mask, repeats=1)
    assert isinstance(cache, DynamicCache)
    kinds = [type(layer) for layer in cache.layers]
    assert kinds == [DynamicSlidingWindowLayer, DynamicSlidingWindowLayer, DynamicLayer, DynamicSlidingWindowLayer]
    width = ids.shape[1] - 1  # 19 cached positions: the last prompt token is left to generate
    for layer, one in zip(cache.layers, single.layers):
        assert layer.keys.shape[0] == 2 * 4
        # a sliding layer keeps window - 1 = 5 positions, a full one all of them
        assert layer.keys.shape[2] == (5 if isinstance(layer, DynamicSlidingWindowLayer) else width)
        assert torch.equal(layer.keys, one.keys.repeat_interleave(4, dim=0))
        assert torch.equal(layer.values, one.values.repeat_interleave(4, dim=0))
    assert cache.get_seq_length() == width


def first_token_distribution(model, prompt: list[int], sampling: Sampling) -> torch.Tensor:
    """What ``generate`` samples the first token from: its temperature and top-p processors over the logits."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[:, -1].float()
    scores = TopPLogitsWarper(sampling.top_p)(None, TemperatureLogitsWarper(sampling.temperature)(None, logits))
    return torch.softmax(scores, dim=-1)[0].double()


def chi_square_p(counts: torch.Tensor, expected: torch.Tensor, min_expected: float = 10.0) -> float:
    """Goodness-of-fit p-value of ``counts`` against ``expected`` counts; tokens expected fewer than
    ``min_expected`` times share one bin."""
    big = expected >= min_expected
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = len(exp) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


def test_shared_prefix_sampling_draws_first_tokens_from_the_same_distribution(llama):
    """Over 2 x 1,500 draws (fixed seeds: the outcome is the same on every run), the first tokens of both paths
    fit the distribution ``generate`` samples from (temperature 0.3, top-p 0.9: about 200 tokens possible per
    prompt), and the test is sharp enough to reject a 20 % wrong temperature or a missing top-p."""
    sampling = Sampling(temperature=0.3, top_p=0.9)
    prompts = random_prompts(llama.config.vocab_size, [24, 15], seed=0)
    ids, mask = left_pad(prompts, PAD)
    g, vocab = 1500, llama.config.vocab_size
    never = [vocab + 7]  # no stop: only the first token is looked at
    torch.manual_seed(11)
    shared = decode_batch(llama, ids, mask, max_new_tokens=1, stop_ids=never, pad_id=PAD, sampling=sampling, num_samples=g)
    torch.manual_seed(12)
    with torch.no_grad():
        repeated = repeated_generate(llama, ids, mask, g, never, 1, do_sample=True, temperature=0.3, top_p=0.9, top_k=0)
    for i, prompt in enumerate(prompts):
        want = first_token_distribution(llama, prompt, sampling)
        rows = slice(i * g, (i + 1) * g)
        counts = {name: torch.bincount(out[rows, 0], minlength=vocab).double() for name, out in
                  (("shared", shared.ids), ("repeated", repeated))}
        for name, c in counts.items():
            assert c.sum() == g
            assert c[want == 0].sum() == 0, f"{name}: sampled a token top-p removes"
            assert chi_square_p(c, g * want) > 1e-3, name
        # the two samples against each other: each fits the other's pooled frequencies
        pooled = (counts["shared"] + counts["repeated"]) / (2 * g)
        assert chi_square_p(counts["shared"], g * pooled) > 1e-3
        # power: the same counts against a temperature 20 % off, and without top-p
        off = first_token_distribution(llama, prompt, Sampling(temperature=0.36, top_p=0.9))
        assert chi_square_p(counts["shared"], g * off) < 1e-6
        # without top-p, this many draws would have gone to tokens both paths never drew
        assert g * first_token_distribution(llama, prompt, Sampling(0.3, 1.0))[want == 0].sum() > 50
    # G samples of one prompt are G draws, not one draw repeated
    assert len(set(shared.ids[:g, 0].tolist())) > 20


def test_decode_prompts_batches_by_length_and_returns_prompt_order(llama):
    prompts = random_prompts(llama.config.vocab_size, [5, 30, 9, 28, 6, 31, 12], seed=3)
    widths: list[int] = []
    handle = llama.register_forward_hook(
        lambda m, args, kwargs, out: widths.append(kwargs["input_ids"].shape[1]) if kwargs["input_ids"].shape[1] > 1 else None,
        with_kwargs=True)
    try:
        batched = decode_prompts(llama, prompts, batch_size=3, max_new_tokens=6, stop_ids=[llama.config.vocab_size + 7], pad_id=PAD)
    finally:
        handle.remove()
    assert length_batches([len(p) for p in prompts], 3) == [[5, 1, 3], [6, 2, 4], [0]]
    assert widths == [31, 12, 5]  # each batch only as wide as its longest prompt
    for i, p in enumerate(prompts):  # the same tokens as decoding each prompt alone, in prompt order
        alone = decode_batch(llama, *left_pad([p], PAD), max_new_tokens=6, stop_ids=[llama.config.vocab_size + 7], pad_id=PAD)
        assert torch.equal(batched.ids[i], alone.ids[0])


def test_decode_prompts_puts_the_g_samples_of_each_prompt_together(llama):
    prompts = random_prompts(llama.config.vocab_size, [4, 18, 9], seed=4)
    stops = [llama.config.vocab_size + 7]
    parts = list(iter_decode(llama, prompts, batch_size=2, num_samples=2, max_new_tokens=5, stop_ids=stops, pad_id=PAD))
    assert [idx for idx, _ in parts] == [[1, 2], [0]]
    whole = decode_prompts(llama, prompts, batch_size=2, num_samples=2, max_new_tokens=5, stop_ids=stops, pad_id=PAD)
    assert isinstance(whole, Completions) and whole.ids.shape[0] == 6
    first, second = parts
    assert torch.equal(whole.ids[2:6], first[1].ids) and torch.equal(whole.ids[0:2], second[1].ids)


def test_completion_mask_stops_at_any_id_of_the_stop_set():
    ids = torch.tensor([[5, 9, 7, 9], [5, 6, 8, 4], [3, 3, 3, 3]])
    mask, cut = completion_mask(ids, {7, 8})
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert cut.tolist() == [False, False, True]
