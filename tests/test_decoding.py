"""The shared decoding path (:mod:`prouie_pl.decoding`): prompts prefilled once for their G completions decode
exactly as repeated prompts do, sampling draws from the distribution ``generate`` draws from, batches are formed
by prompt length, and every row stops at any id of the stop set.  Both engines: the module's own loop (rows
leave the batch and the KV cache as they stop) gives ``generate``'s greedy tokens and samples from its
distribution, also after rows have left; under a logits processor every row stays to the end.

Models: the session's tiny Llama and a tiny randomly initialised Gemma 3 built here (no download), whose
sliding-window layers (window 6) are shorter than the prompts, so the hybrid cache drops positions before it
is repeated.  The reference is always a plain ``generate`` on the prompts repeated G times, the way rollouts
were produced before prompts shared their prefill.
"""

from __future__ import annotations

import pytest
import torch

from prouie_pl.decoding import (ENGINES, Completions, LoopGuard, Sampling, completion_mask, decode_batch, decode_prompts,
                                draw_tokens, greedy_output, iter_decode, left_pad, length_batches, prefill_shared_cache)
from training_helpers import single_thread, tiny_gemma3

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
    return tiny_gemma3(PAD).eval()


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


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", MODELS)
def test_shared_prefix_greedy_decoding_gives_the_repeated_prompts_tokens(request, name, engine):
    model = request.getfixturevalue(name)
    vocab = model.config.vocab_size
    ids, mask = left_pad(random_prompts(vocab, [12, 7, 20], seed=1), PAD)  # left padding of 8 and 13
    max_new, g = 14, 3
    stops = stop_set_with_early_ends(model, ids, mask, max_new)
    with torch.no_grad():
        want = repeated_generate(model, ids, mask, g, stops, max_new, do_sample=False)
    got = decode_batch(model, ids, mask, max_new_tokens=max_new, stop_ids=stops, pad_id=PAD, num_samples=g, share_prefix=True,
                       engine=engine)

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


@pytest.mark.parametrize("engine", ENGINES)
def test_shared_prefix_sampling_draws_first_tokens_from_the_same_distribution(llama, engine):
    """Over 2 x 1,500 draws (fixed seeds: the outcome is the same on every run), the first tokens of both paths
    fit the distribution ``generate`` samples from (temperature 0.3, top-p 0.9: about 200 tokens possible per
    prompt), and the test is sharp enough to reject a 20 % wrong temperature or a missing top-p."""
    sampling = Sampling(temperature=0.3, top_p=0.9)
    prompts = random_prompts(llama.config.vocab_size, [24, 15], seed=0)
    ids, mask = left_pad(prompts, PAD)
    g, vocab = 1500, llama.config.vocab_size
    never = [vocab + 7]  # no stop: only the first token is looked at
    torch.manual_seed(11)
    shared = decode_batch(llama, ids, mask, max_new_tokens=1, stop_ids=never, pad_id=PAD, sampling=sampling, num_samples=g,
                          engine=engine)
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


# ------------------------------------------------------------------ the decoding loop (engine "loop")

NEVER = 10_007  # an id neither model has: no row stops on it


def early_stop_set(model, prompts, max_new_tokens: int, picks) -> list[int]:
    """Stop ids taken from free greedy decoding of ``prompts`` (``picks``: (prompt, step) pairs), less every token
    the last prompt writes, so that rows end at different steps and the last prompt's run to the limit."""
    free = decode_prompts(model, prompts, batch_size=None, max_new_tokens=max_new_tokens, stop_ids=[NEVER], pad_id=PAD,
                          engine="generate").ids
    stops = sorted({int(free[i, step]) for i, step in picks} - set(free[len(prompts) - 1].tolist()))
    assert stops, "this prompt set needs a last row that writes none of the picked tokens"
    return stops


@pytest.mark.parametrize("g, share", [(1, True), (3, True), (3, False)], ids=["single", "shared", "repeated"])
@pytest.mark.parametrize("name", MODELS)
def test_the_loop_gives_generates_greedy_tokens_batch_by_batch(request, name, g, share):
    """Three left-padded batches (widths 25, 12 and 5) whose rows stop at many different steps, some at the limit:
    each batch's completions are a plain ``generate``'s on the prompts repeated ``g`` times, token for token, and
    as wide as its longest completion."""
    model = request.getfixturevalue(name)
    prompts = random_prompts(model.config.vocab_size, [12, 7, 20, 5, 16, 9, 25], seed=5)
    max_new = 14
    stops = early_stop_set(model, prompts, max_new, picks=[(0, 2), (1, 4), (3, 1), (4, 7), (5, 9)])
    lengths, cut = [], []
    for idx, got in iter_decode(model, prompts, batch_size=3, max_new_tokens=max_new, stop_ids=stops, pad_id=PAD,
                                num_samples=g, share_prefix=share, engine="loop"):
        ids, mask = left_pad([prompts[i] for i in idx], PAD)
        with torch.no_grad():
            want = repeated_generate(model, ids, mask, g, stops, max_new, do_sample=False)
        want_mask, want_cut = completion_mask(want, stops)
        assert got.ids.shape == want.shape
        assert torch.equal(got.ids, want.masked_fill(want_mask == 0, PAD))
        assert torch.equal(got.mask, want_mask) and torch.equal(got.truncated, want_cut)
        lengths += got.lengths.tolist()
        cut += got.truncated.tolist()
    # the case this is about: rows that end early next to rows that go on, some to the limit
    assert len(set(lengths)) >= 3 and min(lengths) < max_new // 2, lengths
    assert any(cut) and not all(cut)
    # and both engines agree on the whole set, in prompt order
    options = dict(batch_size=3, max_new_tokens=max_new, stop_ids=stops, pad_id=PAD, num_samples=g, share_prefix=share)
    loop, gen = decode_prompts(model, prompts, engine="loop", **options), decode_prompts(model, prompts, engine="generate", **options)
    assert torch.equal(loop.ids, gen.ids) and torch.equal(loop.mask, gen.mask) and torch.equal(loop.truncated, gen.truncated)


def test_the_loop_drops_padding_columns_and_returns_generates_width(llama):
    """A batch cut from a wider one (two columns of padding in every row) and a limit no row reaches a stop by."""
    ids, mask = left_pad(random_prompts(llama.config.vocab_size, [9, 4], seed=6), PAD)
    wide_ids = torch.cat([torch.full((2, 2), PAD), ids], dim=1)
    wide_mask = torch.cat([torch.zeros((2, 2), dtype=torch.long), mask], dim=1)
    got = decode_batch(llama, wide_ids, wide_mask, max_new_tokens=5, stop_ids=[NEVER], pad_id=PAD, engine="loop")
    with torch.no_grad():
        want = repeated_generate(llama, ids, mask, 1, [NEVER], 5, do_sample=False)
    assert torch.equal(got.ids, want) and got.truncated.all() and got.lengths.tolist() == [5, 5]


class BatchSizes:
    """A forward hook on the model: per forward call, (rows fed, rows of every cache layer after it)."""

    def __init__(self, model):
        self.calls: list[tuple[int, set]] = []
        self.handle = model.register_forward_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs, out):
        cache = getattr(out, "cache", None)
        if cache is None:
            cache = getattr(out, "past_key_values", None)
        self.calls.append((kwargs["input_ids"].shape[0], {layer.keys.shape[0] for layer in cache.layers}))

    def remove(self):
        self.handle.remove()


@pytest.mark.parametrize("share", [True, False], ids=["shared", "repeated"])
@pytest.mark.parametrize("name", MODELS)
def test_the_loop_drops_rows_from_the_batch_and_the_cache_once_they_stop(request, name, share):
    model = request.getfixturevalue(name)
    ids, mask = left_pad(random_prompts(model.config.vocab_size, [12, 7, 20], seed=1), PAD)
    max_new, g = 14, 2
    stops = stop_set_with_early_ends(model, ids, mask, max_new)
    runs = {}
    for engine in ENGINES:
        sizes = BatchSizes(model)
        try:
            runs[engine] = decode_batch(model, ids, mask, max_new_tokens=max_new, stop_ids=stops, pad_id=PAD, num_samples=g,
                                        share_prefix=share, engine=engine), sizes.calls
        finally:
            sizes.remove()
    (loop, calls), (gen, gen_calls) = runs["loop"], runs["generate"]
    assert torch.equal(loop.ids, gen.ids)
    lengths = loop.lengths
    # forward k runs exactly the rows still going at step k: those whose completion is longer than k tokens
    want = [int((lengths > k).sum()) for k in range(int(lengths.max()))]
    assert [rows for rows, _ in calls] == want
    assert all(cached == {rows} for rows, cached in calls)  # every cache layer (sliding ones too) has those rows only
    assert want[0] == 3 * g and want[-1] < want[0]
    # generate feeds every row at every step
    assert [rows for rows, _ in gen_calls] == [3 * g] * len(want)


def next_token_distributions(model, prompt: list[int], tokens: list[int], sampling: Sampling) -> torch.Tensor:
    """``[len(tokens), V]``: what ``generate`` samples from after ``prompt + [t]``, for each ``t``."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    with torch.no_grad():
        logits = model(torch.tensor([prompt + [t] for t in tokens])).logits[:, -1].float()
    scores = TopPLogitsWarper(sampling.top_p)(None, TemperatureLogitsWarper(sampling.temperature)(None, logits))
    return torch.softmax(scores, dim=-1).double()


def test_the_loop_samples_from_generates_distribution_after_rows_have_left(llama):
    """1,500 samples of each of two prompts (temperature 0.3, top-p 0.9, shared prefill); the most likely first
    tokens, about 40 % of the mass of each prompt, are stop ids, so those rows leave the batch after step 1.  The
    second tokens of the rows that go on fit what ``generate`` samples from after each row's first token (expected
    counts: the sum of those distributions over the rows)."""
    sampling = Sampling(temperature=0.3, top_p=0.9)
    prompts = random_prompts(llama.config.vocab_size, [24, 15], seed=0)
    ids, mask = left_pad(prompts, PAD)
    g, vocab = 1500, llama.config.vocab_size
    stops: set[int] = set()
    for p in prompts:
        probs, order = torch.sort(first_token_distribution(llama, p, sampling), descending=True)
        stops |= set(order[:int((probs.cumsum(0) < 0.4).sum()) + 1].tolist())
    torch.manual_seed(13)
    got = decode_batch(llama, ids, mask, max_new_tokens=2, stop_ids=sorted(stops), pad_id=PAD, sampling=sampling,
                       num_samples=g, engine="loop")
    assert got.ids.shape == (2 * g, 2)
    for i, prompt in enumerate(prompts):
        rows = got.ids[i * g:(i + 1) * g]
        stopped = torch.isin(rows[:, 0], torch.tensor(sorted(stops)))
        assert 300 < int(stopped.sum()) < 1200 and (rows[stopped, 1] == PAD).all()  # they left after one token
        going = rows[~stopped]
        firsts = sorted(set(going[:, 0].tolist()))
        after = next_token_distributions(llama, prompt, firsts, sampling)
        expected = after[torch.tensor([firsts.index(t) for t in going[:, 0].tolist()])].sum(dim=0)
        counts = torch.bincount(going[:, 1], minlength=vocab).double()
        assert counts[expected == 0].sum() == 0, "sampled a token top-p removes"
        assert chi_square_p(counts, expected) > 1e-3


def test_draw_tokens_samples_each_rows_distribution_and_never_a_zero():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0], [1e-3, 0.0, 0.0, 0.999, 0.0]])
    torch.manual_seed(0)
    draws = torch.stack([draw_tokens(probs) for _ in range(20_000)])  # [draws, rows]
    counts = torch.stack([torch.bincount(draws[:, r], minlength=5) for r in range(3)]).double()
    assert (counts[probs == 0] == 0).all()
    assert (draws[:, 1] == 4).all()
    assert chi_square_p(counts[0], probs[0].double() * 20_000) > 1e-3
    assert 5 <= counts[2, 0] <= 40  # 1e-3 of 20,000: 20 expected; the rare token still comes up
    torch.manual_seed(1)
    first = draw_tokens(probs)
    torch.manual_seed(1)
    assert torch.equal(first, draw_tokens(probs))  # the global generator decides, as for torch.multinomial


def test_under_a_logits_processor_every_row_stays_to_the_end(llama):
    from transformers import LogitsProcessor, LogitsProcessorList

    class Shapes(LogitsProcessor):
        def __init__(self):
            self.seen: list[tuple[int, int]] = []

        def __call__(self, input_ids, scores):
            self.seen.append(tuple(input_ids.shape))
            return scores

    ids, mask = left_pad(random_prompts(llama.config.vocab_size, [12, 7, 20], seed=1), PAD)
    max_new = 14
    stops = stop_set_with_early_ends(llama, ids, mask, max_new)
    shapes = Shapes()
    got = decode_batch(llama, ids, mask, max_new_tokens=max_new, stop_ids=stops, pad_id=PAD,
                       logits_processor=LogitsProcessorList([shapes]))  # the default engine, "loop"
    free = decode_batch(llama, ids, mask, max_new_tokens=max_new, stop_ids=stops, pad_id=PAD, engine="loop")
    assert torch.equal(got.ids, free.ids) and len(set(got.lengths.tolist())) > 1
    # the full rows, prompts included, at every step until the last row stops
    assert shapes.seen == [(3, ids.shape[1] + k) for k in range(got.ids.shape[1])]


def test_engines_are_checked():
    from prouie_pl.grpo import RolloutSettings

    ids, mask = left_pad([[5, 6]], PAD)
    with pytest.raises(ValueError, match="engine"):
        decode_batch(None, ids, mask, max_new_tokens=2, stop_ids=[1], pad_id=PAD, engine="beam")
    with pytest.raises(ValueError, match="model.rollout.engine"):
        RolloutSettings(engine="vllm")
    assert RolloutSettings().engine == "loop"


# ------------------------------------------------------------------------------------------ the loop guard


def test_loop_guard_finds_the_shortest_period_that_repeats_over_the_span():
    guard = LoopGuard(repeats=3, max_period=8, min_span=12)
    assert guard.windows()[:4] == [(1, 12), (2, 12), (3, 12), (4, 12)] and guard.windows()[-1] == (8, 24)
    cycle = [5, 6, 7, 8, 9]  # period 5: three copies (15 tokens) cover the 12-token span
    rows = torch.tensor([
        [1, 2] + cycle * 3,                      # a loop of period 5: drop the last copy, keep two
        [1, 2] + cycle * 2 + [5, 6, 7, 8, 4],    # two copies and a different ending: no loop
        [3] * 17,                                # one token 17 times: period 1 (not 5), keep 2 of the 12-token span
        [1, 2, 3] + [4, 4, 5, 5] * 3 + [4, 4],   # period 4 over 14 tokens: 12 suffice, keep 8 of them
    ])
    assert guard.repeated_tail(rows).tolist() == [5, 0, 10, 4]
    assert guard.repeated_tail(rows[:, :5]).tolist() == [0, 0, 0, 0]  # shorter than every span
    # two copies of a long unit are not a loop: gold answers repeat a unit now and then
    assert LoopGuard().repeated_tail(torch.tensor([list(range(10, 30)) * 2])).tolist() == [0]
    with pytest.raises(ValueError, match="repeats >= 2"):
        LoopGuard(repeats=1)
    # first_loop replays decoding: the step the guard fires at and what the answer keeps, for every row
    for row in rows.tolist():
        fired = [t for t in range(1, len(row) + 1) if guard.repeated_tail(torch.tensor([row[:t]])).item()]
        want = None if not fired else (fired[0], fired[0] - guard.repeated_tail(torch.tensor([row[:fired[0]]])).item())
        assert guard.first_loop(row) == want
    assert guard.first_loop([3] * 17) == (12, 2) and guard.first_loop([1, 2] + cycle * 3) == (17, 12)


class MarkovHook:
    """Forces each next token to ``table.get(last token, default)``: the model follows that chain from its
    prompt's last token, so a cycle in the table is an answer that loops, whatever rows are left in the batch.
    Counts the forward calls."""

    def __init__(self, model, table: dict[int, int], default: int):
        self.table, self.default, self.calls = table, default, 0
        self.handle = model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, out):
        self.calls += 1
        last = kwargs["input_ids"][:, -1].tolist()
        forced = torch.full_like(out.logits[:, -1, :], -1e4)
        for i, tok in enumerate(last):
            forced[i, self.table.get(tok, self.default)] = 1e4
        out.logits[:, -1, :] = forced
        return out

    def remove(self) -> None:
        self.handle.remove()


@pytest.mark.parametrize("engine", ENGINES)
def test_the_loop_guard_ends_a_looping_answer_and_keeps_one_copy(llama, engine):
    stop = 2
    # prompt 0 ends in 40 and loops 10 11 12 10 11 12 ...; prompt 1 ends in 41 and writes 20 .. 39, then stops
    table = {40: 10, 10: 11, 11: 12, 12: 10, 41: 20, **{t: t + 1 for t in range(20, 39)}, 39: stop}
    ids, mask = left_pad([[5, 6, 7, 40], [8, 41]], PAD)
    runs = {}
    for guard in (None, LoopGuard()):
        hook = MarkovHook(llama, table, default=stop)
        try:
            out = decode_batch(llama, ids, mask, max_new_tokens=60, stop_ids=[stop], pad_id=PAD, engine=engine,
                               with_logprobs=True, loop_guard=guard)
        finally:
            hook.remove()
        runs[guard is not None] = out, hook.calls
    (plain, plain_calls), (guarded, guarded_calls) = runs[False], runs[True]
    assert plain.looped is None and plain.truncated.tolist() == [True, False] and plain.lengths.tolist() == [60, 21]
    # period 3 needs 33 tokens (the 32-token span rounded up to whole copies); the answer keeps two copies
    assert guarded.looped.tolist() == [True, False] and guarded.truncated.tolist() == [True, False]
    assert guarded.lengths.tolist() == [6, 21]
    assert guarded.ids[0, :6].tolist() == [10, 11, 12] * 2 and (guarded.ids[0, 6:] == PAD).all()
    assert (guarded.logprobs[0, 6:] == 0).all() and guarded.logprobs[0, :6].abs().max() < 1e-3
    assert torch.equal(guarded.ids[1, :21], plain.ids[1, :21])  # the answer that ends on its own is untouched
    assert guarded_calls == 33 and plain_calls == 60  # decoding stopped when the loop showed, not at the cap
    text = greedy_output(_Tok(), guarded)
    assert text.looped == [True, False] and text.truncated == [True, False] and text.new_tokens == [6, 21]


class _Tok:
    def batch_decode(self, rows, **kwargs):
        return [" ".join(map(str, r)) for r in rows]


def test_decode_prompts_keeps_each_rows_loop_flag_across_batches(llama):
    stop = 2
    table = {40: 10, 10: 11, 11: 12, 12: 10, 41: 20, 20: stop}
    hook = MarkovHook(llama, table, default=stop)
    try:  # batches of one prompt each, longest prompt first: the results come back in prompt order
        out = decode_prompts(llama, [[41], [5, 6, 40], [7, 41]], batch_size=1, max_new_tokens=50, stop_ids=[stop], pad_id=PAD,
                             loop_guard=LoopGuard())
    finally:
        hook.remove()
    assert out.looped.tolist() == [False, True, False] and out.lengths.tolist() == [2, 6, 2]
