"""The sampler against HF generate, against a teacher-forced forward pass, and its controls."""

import pytest
import torch

from alignkit.generation import GenerationOutput, SamplingParams, generate, generate_text
from alignkit.models import LoraSettings, apply_lora, load_causal_lm, load_tokenizer
from alignkit.testing import make_tiny_model

# different lengths so the batch is left-padded
PROMPTS = ["Hello there, how are you today?", "Hi", "The quick brown fox jumps over the lazy dog and then"]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-gen"))


@pytest.fixture(scope="module")
def tiny(tiny_path):
    path = tiny_path
    tokenizer = load_tokenizer(str(path))
    model = load_causal_lm(str(path))
    # At the default init (std 0.02) the residual stream dominates and greedy decoding repeats one
    # token forever, which would make the comparisons below weak. Larger random weights give
    # varied continuations.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2 and "embed" not in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    model.train()  # generate must switch to eval and back
    return model, tokenizer


@pytest.fixture(scope="module")
def prompt_ids(tiny):
    _, tokenizer = tiny
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    assert len({len(i) for i in ids}) == len(ids)
    return ids


def _valid(out: GenerationOutput, row: int) -> list[int]:
    return out.response_ids[row][out.response_mask[row].bool()].tolist()


def test_greedy_matches_hf_generate_per_row(tiny, prompt_ids):
    model, tokenizer = tiny
    n = 12
    out = generate(model, tokenizer, prompt_ids, SamplingParams(max_new_tokens=n, temperature=0))
    assert model.training  # mode restored
    assert out.prompt_ids.shape == out.prompt_mask.shape == (3, max(len(p) for p in prompt_ids))
    assert out.prompt_mask[:, 0].tolist() == [0, 0, 1]  # left padding
    model.eval()
    try:
        for row, ids in enumerate(prompt_ids):
            ref = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False,
                max_new_tokens=n,
                pad_token_id=tokenizer.pad_token_id,
            )[0, len(ids) :].tolist()
            eos = tokenizer.eos_token_id
            if eos in ref:  # HF pads after eos; ours masks: compare up to and including the eos
                ref = ref[: ref.index(eos) + 1]
            assert _valid(out, row) == ref
    finally:
        model.train()


def test_logprobs_match_teacher_forced_forward(tiny, prompt_ids):
    model, tokenizer = tiny
    temperature = 0.7
    params = SamplingParams(max_new_tokens=10, temperature=temperature, top_p=0.9, top_k=50, seed=3)
    out = generate(model, tokenizer, prompt_ids, params)
    seq = out.sequences()
    model.eval()
    try:
        with torch.no_grad():
            logits = model(
                input_ids=seq.input_ids, attention_mask=seq.attention_mask, position_ids=seq.position_ids
            ).logits
    finally:
        model.train()
    prompt_len, steps = out.prompt_ids.shape[1], out.response_ids.shape[1]
    step_logits = logits[:, prompt_len - 1 : prompt_len - 1 + steps].float() / temperature
    recomputed = step_logits.log_softmax(-1).gather(-1, out.response_ids[..., None]).squeeze(-1)
    mask = out.response_mask.bool()
    assert mask.sum() > 0
    torch.testing.assert_close(recomputed[mask], out.logprobs[mask], atol=1e-5, rtol=0)
    assert (out.logprobs[~mask] == 0).all()
    assert (out.logprobs[mask] < 0).all()
    # positions continue from the real prompt tokens: a left-padded row starts at 0
    for row, ids in enumerate(prompt_ids):
        real = seq.position_ids[row][seq.attention_mask[row].bool()]
        assert real.tolist() == list(range(len(ids) + int(out.response_mask[row].sum())))


def test_seed_controls_sampling(tiny, prompt_ids):
    model, tokenizer = tiny
    stop = (-1,)  # never produced: every row runs the full length
    a = generate(model, tokenizer, prompt_ids, SamplingParams(max_new_tokens=8, seed=1, stop_token_ids=stop))
    b = generate(model, tokenizer, prompt_ids, SamplingParams(max_new_tokens=8, seed=1, stop_token_ids=stop))
    c = generate(model, tokenizer, prompt_ids, SamplingParams(max_new_tokens=8, seed=2, stop_token_ids=stop))
    assert torch.equal(a.response_ids, b.response_ids)
    assert torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.response_ids, c.response_ids)


@pytest.mark.parametrize("filters", [{"top_p": 1e-6}, {"top_k": 1}])
def test_tiny_nucleus_and_top1_are_greedy(tiny, prompt_ids, filters):
    model, tokenizer = tiny
    stop = (-1,)
    greedy = generate(model, tokenizer, prompt_ids, SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=stop))
    sampled = generate(
        model, tokenizer, prompt_ids, SamplingParams(max_new_tokens=12, temperature=1.0, seed=0, stop_token_ids=stop, **filters)
    )
    assert torch.equal(greedy.response_ids, sampled.response_ids)


def test_stop_token_ends_row(tiny, prompt_ids):
    model, tokenizer = tiny
    free = generate(model, tokenizer, prompt_ids, SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=(-1,)))
    stop_token = int(free.response_ids[0, 3])
    first = free.response_ids[0].tolist().index(stop_token)
    assert first == 3  # the fixture's weights give varied tokens
    out = generate(model, tokenizer, prompt_ids, SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=(stop_token,)))
    pad = tokenizer.pad_token_id
    assert out.finished[0]
    assert out.response_mask[0].tolist() == [1] * (first + 1) + [0] * (out.response_mask.shape[1] - first - 1)
    assert out.response_ids[0, first] == stop_token
    assert (out.response_ids[0, first + 1 :] == pad).all()
    assert (out.logprobs[0, first + 1 :] == 0).all()
    assert torch.equal(out.response_ids[0, : first + 1], free.response_ids[0, : first + 1])
    for row in range(1, len(prompt_ids)):  # rows that never hit the stop token are unaffected
        if stop_token not in free.response_ids[row].tolist():
            assert not out.finished[row]
            assert torch.equal(out.response_ids[row], free.response_ids[row])
    # the loop ends early once every row is finished
    everyone = generate(model, tokenizer, [prompt_ids[0]] * 2, SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=(stop_token,)))
    assert everyone.response_ids.shape[1] == first + 1
    assert everyone.finished.all()


def test_generate_text_keeps_input_order(tiny):
    model, tokenizer = tiny
    prompts = PROMPTS + ["A", "One two three four five six"]
    params = SamplingParams(max_new_tokens=6, temperature=0)
    batched = generate_text(model, tokenizer, prompts, params, batch_size=2)
    single = [generate_text(model, tokenizer, [p], params)[0] for p in prompts]
    assert batched == single
    assert len(set(batched)) > 1


def test_on_token_called_every_step(tiny, prompt_ids):
    model, tokenizer = tiny
    calls = []

    def on_token(step, token_ids, finished):
        calls.append((step, token_ids.clone(), finished.clone()))

    out = generate(model, tokenizer, prompt_ids, SamplingParams(max_new_tokens=7, seed=0, stop_token_ids=(-1,)), on_token=on_token)
    assert [c[0] for c in calls] == list(range(7)) == list(range(out.response_ids.shape[1]))
    assert torch.equal(torch.stack([c[1] for c in calls], dim=1), out.response_ids)
    assert not any(c[2].any() for c in calls)


def test_position_ids_count_real_tokens(tiny, prompt_ids):
    # RoPE only sees position differences, so a constant per-row offset from left padding does not
    # change a Llama's outputs and the tests above cannot catch wrong positions. Check them directly.
    model, tokenizer = tiny
    seen = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["position_ids"].clone()), with_kwargs=True
    )
    try:
        out = generate(model, tokenizer, prompt_ids, SamplingParams(max_new_tokens=3, temperature=0, stop_token_ids=(-1,)))
    finally:
        handle.remove()
    lengths = torch.tensor([len(p) for p in prompt_ids])
    width = out.prompt_ids.shape[1]
    assert len(seen) == 3
    for row, n in enumerate(lengths.tolist()):
        assert seen[0][row, width - n :].tolist() == list(range(n))
        assert (seen[0][row, : width - n] == 0).all()
    for step in (1, 2):
        assert seen[step].shape == (3, 1)
        assert seen[step][:, 0].tolist() == (lengths + step - 1).tolist()
    assert torch.equal(out.sequences().position_ids[:, width:], torch.stack([lengths + t for t in range(3)], dim=1))


def test_peft_wrapped_model(tiny_path, prompt_ids):
    tokenizer = load_tokenizer(str(tiny_path))
    model = load_causal_lm(str(tiny_path))
    params = SamplingParams(max_new_tokens=4, temperature=0.8, seed=5)
    plain = generate(model, tokenizer, prompt_ids, params)
    wrapped = apply_lora(model, LoraSettings(r=4, dropout=0.1))  # fresh LoRA B = 0: same function
    wrapped.train()
    out = generate(wrapped, tokenizer, prompt_ids, params)
    assert torch.equal(out.response_ids, plain.response_ids)
    torch.testing.assert_close(out.logprobs, plain.logprobs, atol=1e-5, rtol=0)
    assert all(m.training for m in wrapped.modules())  # dropout back on after sampling


def _nucleus_by_full_sort(logits, top_p):
    """The definition, on the whole vocabulary: stable descending sort, keep while the mass before < top_p.
    The masses are exp(logit - logsumexp), the sampler's formula: a mask compared bit for bit needs the
    same rounding where a token's mass-before lands within an ulp of top_p (softmax's differs there)."""
    values, order = logits.sort(dim=-1, descending=True, stable=True)
    probs = (values - logits.logsumexp(-1, keepdim=True)).exp()
    keep_sorted = (probs.cumsum(-1) - probs) < top_p
    keep_sorted[..., 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


@pytest.mark.parametrize("top_p", [1e-6, 0.3, 0.9, 0.999])
def test_nucleus_filter_equals_the_full_sort_definition(top_p):
    from alignkit.generation import _filter_logits

    g = torch.Generator().manual_seed(0)
    peaked = torch.randn(4, 5000, generator=g) * 4  # nucleus inside the candidates
    flat = torch.randn(3, 5000, generator=g) * 0.01  # nucleus far beyond them: the fallback path
    ties = torch.zeros(2, 5000)  # all equal: the lowest ids must win
    ties[1, 4000:4010] = 5.0
    for logits in (peaked, flat, ties, torch.cat([peaked[:2], flat[:1]])):
        got, expected = _filter_logits(logits, 0, top_p), _nucleus_by_full_sort(logits, top_p)
        assert torch.equal(torch.isinf(got), torch.isinf(expected))


def test_nucleus_of_a_row_does_not_depend_on_the_other_rows(monkeypatch):
    """Only the rows whose top candidates hold < top_p are sorted in full: each row's nucleus equals the one it
    gets alone and the one a full sort of every row gives (NUCLEUS_CANDIDATES = the vocabulary)."""
    import alignkit.generation as generation

    g = torch.Generator().manual_seed(1)
    logits = torch.cat([torch.randn(3, 5000, generator=g) * 4, torch.randn(2, 5000, generator=g) * 0.01])[[0, 3, 1, 4, 2]]
    for top_p in (0.5, 0.9, 0.999):
        mixed = generation._filter_logits(logits, 0, top_p)
        alone = torch.cat([generation._filter_logits(row[None], 0, top_p) for row in logits])
        monkeypatch.setattr(generation, "NUCLEUS_CANDIDATES", logits.shape[-1])
        everything_sorted = generation._filter_logits(logits, 0, top_p)
        monkeypatch.undo()
        assert torch.equal(mixed, alone) and torch.equal(mixed, everything_sorted)
        assert torch.isinf(mixed[[1, 3]]).sum() < torch.isinf(mixed[[0, 2, 4]]).sum()  # the flat rows keep more


def test_sample_categorical_draws_the_distribution_and_never_a_zero_mass_token():
    from alignkit.generation import sample_categorical

    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3, 0.0]]).expand(100_000, -1).contiguous()
    draws = sample_categorical(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=5).double() / len(draws)
    assert freq[1] == 0 and freq[4] == 0
    assert torch.allclose(freq, probs[0].double(), atol=0.005)  # the largest standard error is 0.0015 (p = 0.6)
    again = sample_categorical(probs[:50], torch.Generator().manual_seed(0))
    assert torch.equal(again, draws[:50])


def test_sample_categorical_when_u_rounds_up_to_the_total(monkeypatch):
    """u·total can round up to the total (about once in 2^24 draws): no cdf entry exceeds it, and the draw
    must fall back to the row's last token with mass, never the zero-mass tail or index V. Forced here."""
    import alignkit.generation as generation

    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0, 0.0, 0.0], [0.2, 0.2, 0.2, 0.2, 0.1, 0.1]])
    monkeypatch.setattr(generation.torch, "rand", lambda shape, **kwargs: torch.ones(shape, dtype=kwargs.get("dtype")))
    assert generation.sample_categorical(probs).tolist() == [3, 1, 5]


def test_shared_prefix_prefill_samples_what_the_full_prefill_samples(tiny, monkeypatch):
    """Prompts sharing a long prefix (a system prompt; the same prompt twice; a prompt that is the prefix plus
    one token): the prefix is prefilled once and its cache repeated, with the same tokens, log-probs and
    (through the LM-head hook PPO uses) per-step entropies as the whole left-padded prefill."""
    import alignkit.generation as generation
    from alignkit.rl.rollout import policy_forward, rollout

    model, tokenizer = tiny
    system = tokenizer("System: you are a careful and friendly assistant who answers briefly and kindly. User:", add_special_tokens=False)["input_ids"]
    assert len(system) >= generation.SHARED_PREFIX_MIN_TOKENS
    prompts = [system + tokenizer(" tell me a story", add_special_tokens=False)["input_ids"],
               system + tokenizer(" tell me a story", add_special_tokens=False)["input_ids"],
               system + tokenizer(" why?", add_special_tokens=False)["input_ids"], system + [42]]
    calls = []
    trunk_forward = type(model.model).forward
    monkeypatch.setattr(type(model.model), "forward", lambda self, *a, **kw: calls.append(kw["input_ids"].shape) or trunk_forward(self, *a, **kw))
    results = []
    for min_tokens in (generation.SHARED_PREFIX_MIN_TOKENS, 10**9):
        monkeypatch.setattr(generation, "SHARED_PREFIX_MIN_TOKENS", min_tokens)
        calls.clear()
        greedy = generate(model, tokenizer, prompts, SamplingParams(max_new_tokens=6, temperature=0))
        sampled = rollout(model, tokenizer, prompts, SamplingParams(max_new_tokens=6, temperature=1.0, seed=4), entropy=True)
        results.append((greedy, sampled, list(calls)))
    (greedy, sampled, calls_shared), (greedy_full, sampled_full, calls_full) = results
    assert calls_shared[0] == (1, len(system)) and calls_shared[1][0] == 4  # the prefix once, then the four remainders
    assert calls_full[0] == (4, max(map(len, prompts)))
    assert torch.equal(greedy.response_ids, greedy_full.response_ids) and torch.equal(sampled.response_ids, sampled_full.response_ids)
    assert torch.equal(sampled.prompt_ids, sampled_full.prompt_ids) and torch.equal(sampled.prompt_mask, sampled_full.prompt_mask)
    assert torch.allclose(greedy.logprobs, greedy_full.logprobs, atol=2e-5)
    assert torch.allclose(sampled.logprobs, sampled_full.logprobs, atol=2e-5)
    assert sampled.entropy is not None and torch.allclose(sampled.entropy, sampled_full.entropy, atol=5e-5)
    recomputed = policy_forward(model, sampled, 1.0).logprobs
    assert torch.allclose(recomputed, sampled.logprobs * sampled.response_mask, atol=2e-5)


# ------------------------------------------------------------------------------------------ per-row settings

ROW_SETTINGS = [  # (temperature, top_p, top_k, seed) of each row
    (0.0, 1.0, 0, None),  # greedy
    (0.7, 0.9, 0, 5),
    (1.3, 1.0, 20, 6),
    (1.0, 0.5, 5, 7),
    (0.0, 0.3, 0, None),  # greedy ignores top_p
]


def test_per_row_settings_sample_what_each_row_samples_alone(tiny, prompt_ids):
    """One batch with greedy rows, and rows of different temperature / top_p / top_k each with its own seed:
    every row's tokens equal those of the row sent alone with its setting as scalars (the one-setting path),
    and its log-probs use its own temperature. Ignoring any per-row field changes some row."""
    model, tokenizer = tiny
    prompts = [prompt_ids[i % len(prompt_ids)] for i in range(len(ROW_SETTINGS))]
    columns = list(zip(*ROW_SETTINGS))
    stop = (-1,)
    params = SamplingParams(max_new_tokens=10, temperature=list(columns[0]), top_p=list(columns[1]), top_k=list(columns[2]),
                            seed=list(columns[3]), stop_token_ids=stop)
    together = generate(model, tokenizer, prompts, params)
    for row, (temperature, top_p, top_k, seed) in enumerate(ROW_SETTINGS):
        alone = generate(model, tokenizer, [prompts[row]],
                         SamplingParams(max_new_tokens=10, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop_token_ids=stop))
        assert together.response_ids[row].tolist() == alone.response_ids[0].tolist(), row
        # logits of a row in a batch differ from alone by float rounding only (relative ~1e-6 of values ~|10|)
        torch.testing.assert_close(together.logprobs[row], alone.logprobs[0], atol=1e-4, rtol=0)
    assert together.response_ids[1].tolist() != together.response_ids[3].tolist()


def test_a_seeded_row_does_not_depend_on_its_neighbours(tiny, prompt_ids):
    """The same seeded row beside different neighbours (other prompts, unseeded samples, other seeds, greedy),
    at different positions of the batch, samples the same tokens each time."""
    model, tokenizer = tiny
    stop = (-1,)
    mine = (prompt_ids[0], 0.9, 1.0, 123)
    batches = [[mine],
               [(prompt_ids[1], 1.0, 1.0, None), mine, (prompt_ids[2], 0.0, 1.0, None)],
               [(prompt_ids[2], 1.2, 0.8, 99), (prompt_ids[1], 1.0, 1.0, None), (prompt_ids[0], 1.0, 1.0, None), mine]]
    seen = []
    for rows in batches:
        prompts, temperatures, top_ps, seeds = map(list, zip(*rows))
        out = generate(model, tokenizer, prompts, SamplingParams(max_new_tokens=12, temperature=temperatures, top_p=top_ps, seed=seeds,
                                                                 stop_token_ids=stop))
        seen.append(out.response_ids[rows.index(mine)].tolist())
    assert seen[0] == seen[1] == seen[2]
    other_seed = generate(model, tokenizer, [mine[0]], SamplingParams(max_new_tokens=12, temperature=[0.9], seed=[124], stop_token_ids=stop))
    assert other_seed.response_ids[0].tolist() != seen[0]


def test_a_generator_passed_as_seed_continues_its_stream(tiny, prompt_ids):
    """A torch.Generator in `seed` is advanced in place: two calls of 4 tokens draw what one stream of 8 draws
    (the engine keeps a request's generator across rounds)."""
    model, tokenizer = tiny
    stop = (-1,)
    draws = []
    for _ in range(2):
        generator = torch.Generator().manual_seed(11)
        draws.append([torch.rand((1,), generator=generator).item() for _ in range(8)])
    generator = torch.Generator().manual_seed(11)
    generate(model, tokenizer, [prompt_ids[0]], SamplingParams(max_new_tokens=4, temperature=[1.0], seed=[generator], stop_token_ids=stop))
    assert torch.rand((1,), generator=generator).item() == draws[0][4]


def test_per_row_top_k_and_top_p_equal_the_one_setting_filters():
    """The vectorised per-row filters equal the one-setting filter applied to each row alone."""
    from alignkit.generation import RowSampling, _filter_logits, _nucleus, _top_k_rows

    g = torch.Generator().manual_seed(2)
    logits = torch.cat([torch.randn(3, 3000, generator=g) * 4, torch.randn(2, 3000, generator=g) * 0.01])
    top_k = torch.tensor([0, 1, 7, 3000, 50])
    top_p = torch.tensor([0.3, 1.0, 0.9, 0.999, 0.5])
    by_k = _top_k_rows(logits, top_k)
    for row in range(5):
        assert torch.equal(torch.isinf(by_k[row]), torch.isinf(_filter_logits(logits[row : row + 1], int(top_k[row]), 1.0)[0]))
    nucleus = _nucleus(logits, top_p[:, None])
    for row in range(5):
        alone = _filter_logits(logits[row : row + 1], 0, float(top_p[row]))[0]
        assert torch.equal(torch.isinf(nucleus[row]), torch.isinf(alone)) or top_p[row] >= 1
    params = SamplingParams(temperature=[0.0, 1.0], top_p=[1.0, 0.5], seed=[None, 3])
    rows = RowSampling.build(params, 2, "cpu")
    assert rows.greedy.tolist() == [True, False] and rows.temperature.tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="temperature has 2 values for a batch of 3"):
        RowSampling.build(params, 3, "cpu")
