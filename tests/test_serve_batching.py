"""The batching engine without HTTP: requests with different sampling settings in one batch, joining a running
batch without recomputing it, the prefix cache, against answers computed independently by `generate`."""

from __future__ import annotations

import functools
import queue

import pytest
import torch

from alignkit.batching import Delta, Engine, Finished, Request, choice_seed
from alignkit.decode import BLOCK, PrefixCache
from alignkit.generation import SamplingParams, generate
from alignkit.packing import common_prefix_length

NEVER = (-1,)  # a stop token never produced: every row decodes max_tokens


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The tiny model with larger random weights: varied greedy text rather than one repeated token."""
    from alignkit.models import load_causal_lm, load_tokenizer

    model = load_causal_lm(str(tiny_model_dir)).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2 and "embed" not in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model, load_tokenizer(str(tiny_model_dir))


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def alone(model, tokenizer, request: Request) -> list[list[int]]:
    """The tokens of each choice of `request` computed by `generate`, the request alone: greedy, or each choice
    with its own seed stream."""
    seeds = [None if request.seed is None else choice_seed(request.seed, j) for j in range(request.n)]
    out = generate(model, tokenizer, [request.prompt_ids] * request.n,
                   SamplingParams(max_new_tokens=request.max_tokens, temperature=[request.temperature] * request.n,
                                  top_p=[request.top_p] * request.n, seed=seeds, stop_token_ids=NEVER))
    return out.response_ids.tolist()


class Collector:
    """Each choice's tokens (from its Finished event) and which requests are done."""

    def __init__(self):
        self.tokens: dict = {}
        self.finished: queue.Queue = queue.Queue()

    def emit_for(self, name, n: int = 1, on_event=None):
        left = [n]

        def emit(event):
            if on_event is not None:
                on_event(event)
            if isinstance(event, Finished):
                self.tokens[(name, event.index)] = event.token_ids
                left[0] -= 1
                if left[0] == 0:
                    self.finished.put(name)

        return emit

    def wait(self, count: int) -> set:
        return {self.finished.get(timeout=120) for _ in range(count)}


def run(engine: Engine, requests: list[Request]) -> list[list[list[int]]]:
    """Submit every request before the engine thread starts (so they are admitted together); each choice's tokens."""
    collector = Collector()
    for i, request in enumerate(requests):
        engine.submit(request, collector.emit_for(i, request.n))
    engine.start()
    assert collector.wait(len(requests)) == set(range(len(requests)))
    return [[collector.tokens[(i, j)] for j in range(request.n)] for i, request in enumerate(requests)]


@pytest.fixture
def engine_factory(tiny):
    model, tokenizer = tiny
    engines = []

    def make(**kwargs):
        engine = Engine(model, tokenizer, stop_token_ids=NEVER, **kwargs)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.shutdown()


def test_requests_with_different_settings_share_one_batch_and_get_what_they_get_alone(tiny, engine_factory):
    """Greedy requests (with top_p, which greedy ignores), seeded samples of different temperature / top_p
    (n 1 and 2), and unseeded samples are decoded in one batch (max_rows = every row); each greedy and each
    seeded request gets the tokens `generate` gives it alone."""
    model, tokenizer = tiny
    requests = []
    for i in range(10):
        prompt = encode(tokenizer, f"Request {i}: " + "tell me more " * (i % 4))
        kind = i % 3
        if kind == 0:
            requests.append(Request(prompt, 6 + i, temperature=0.0, top_p=[1.0, 0.4][i % 2]))
        elif kind == 1:
            requests.append(Request(prompt, 8, temperature=[0.7, 1.3][i % 2], top_p=[1.0, 0.8][i % 2], n=1 + i % 2, seed=100 + i))
        else:
            requests.append(Request(prompt, 5, temperature=1.0, top_p=0.9))
    engine = engine_factory(max_batch_rows=64, prefix_cache_bytes=0)
    got = run(engine, requests)
    assert engine.stats["max_rows"] == sum(r.n for r in requests)
    for request, choices in zip(requests, got):
        assert [len(c) for c in choices] == [request.max_tokens] * request.n
        if request.temperature <= 0 or request.seed is not None:
            assert choices == alone(model, tokenizer, request), request
    seeded = [choices for request, choices in zip(requests, got) if request.n == 2]
    assert all(c[0] != c[1] for c in seeded)  # the n choices of a seeded request are different streams


def test_newcomers_join_a_running_batch_without_recomputing_it(tiny, engine_factory):
    """A request arrives while another is being decoded (submitted from the first's stream): it joins the running
    batch, and the engine computes each prompt token exactly once (prefill tokens = the sum of the prompt
    lengths; a re-formed round would recompute the first row's prompt and reply). Both answers equal
    `generate` alone."""
    model, tokenizer = tiny
    first = Request(encode(tokenizer, "The first request is a long one about ships"), 24, temperature=0.0)
    later = [Request(encode(tokenizer, "A second, shorter one"), 6, temperature=0.0),
             Request(encode(tokenizer, "Third, sampled with a seed and a somewhat longer prompt"), 6, temperature=0.9, seed=5)]
    engine = engine_factory(max_batch_rows=8, prefix_cache_bytes=0)
    collector = Collector()

    def on_first_event(event):
        if isinstance(event, Delta) and not collector.tokens.get("joined"):
            collector.tokens["joined"] = True
            for j, request in enumerate(later):  # from the engine thread, mid-decode of `first`
                engine.submit(request, collector.emit_for(f"later{j}"))

    engine.submit(first, collector.emit_for("first", on_event=on_first_event))
    engine.start()
    assert collector.wait(3) == {"first", "later0", "later1"}
    assert engine.stats["prefill_tokens"] == len(first.prompt_ids) + sum(len(r.prompt_ids) for r in later)
    assert engine.stats["max_rows"] == 3
    assert collector.tokens[("first", 0)] == alone(model, tokenizer, first)[0]
    for j, request in enumerate(later):
        assert collector.tokens[(f"later{j}", 0)] == alone(model, tokenizer, request)[0]


def test_prefix_cache_reuses_a_system_prompt_and_a_conversation(tiny, engine_factory):
    """Requests one after another: two sharing a long system prompt, then the next turn of the first one's
    conversation (its prompt + reply + a new message). With the prefix cache the greedy answers are identical,
    and the prefill computes fewer tokens: exactly the cached block-aligned prefixes fewer."""
    model, tokenizer = tiny
    system = encode(tokenizer, "System: you are a careful, patient and friendly assistant. Answer briefly, kindly and in plain words; when unsure, say so and ask a short question back. ")
    assert len(system) >= 2 * BLOCK
    one = system + encode(tokenizer, "User: what is a lighthouse?")
    two = system + encode(tokenizer, "User: why is the sea salty?")

    def ask(engine, prompt):
        [[tokens]] = run_one(engine, Request(prompt, 10, temperature=0.0))
        return tokens

    answers, stats = {}, {}
    for cached in (True, False):
        engine = engine_factory(prefix_cache_bytes=64 * 2**20 if cached else 0)
        reply = ask(engine, one)
        three = one + reply + encode(tokenizer, " User: and who keeps it?")
        answers[cached] = [reply, ask(engine, two), ask(engine, three)]
        stats[cached] = dict(engine.stats)
    assert answers[True] == answers[False]
    lengths = [len(one), len(two), len(three)]
    assert stats[False]["prefill_tokens"] == sum(lengths) and stats[False]["prefix_hit_tokens"] == 0
    # independently: request 2 reuses the common part with `one`; request 3 the common part with one + reply
    # (its KV stored when the row finished: every token but the last reply token was fed)
    expected_two = min(common_prefix_length([one, two]), len(two) - 1) // BLOCK * BLOCK
    expected_three = min(len(one) + len(reply) - 1, len(three) - 1) // BLOCK * BLOCK
    assert expected_two >= BLOCK and expected_three > expected_two
    assert stats[True]["prefix_hit_tokens"] == expected_two + expected_three
    assert stats[True]["prefill_tokens"] == sum(lengths) - expected_two - expected_three


def run_one(engine: Engine, request: Request):
    engine.start()
    collector = Collector()
    engine.submit(request, collector.emit_for("one"))
    collector.wait(1)
    return [[collector.tokens[("one", 0)]]]


def test_prefix_cache_is_least_recently_used_within_its_memory_bound():
    """Entries are cut to whole blocks; a lookup returns the longest cached block-aligned prefix within the
    limit; once the tensors exceed the bound, the least recently used entry goes."""
    def kv(length):  # 2 layers, one head of width 4 -> 2·2·4·4 bytes per token
        return [(torch.full((1, 1, length, 4), float(layer)), torch.full((1, 1, length, 4), -float(layer))) for layer in range(2)]

    per_token = 2 * 2 * 4 * 4
    cache = PrefixCache(max_bytes=3 * BLOCK * per_token)
    a = list(range(2 * BLOCK + 5))
    cache.store(a, kv(len(a)))
    assert cache.nbytes == 2 * BLOCK * per_token  # cut to 2 blocks
    assert cache.lookup(a[: BLOCK + 3] + [999] * 40, 100)[0] == BLOCK
    assert cache.lookup(a + [7], 2 * BLOCK - 1)[0] == BLOCK  # the limit
    length, stored = cache.lookup(a + [7], 100)
    assert length == 2 * BLOCK and stored[1][0].shape == (1, 1, 2 * BLOCK, 4) and (stored[1][1] == -1).all()
    assert cache.lookup([5] + a, 100)[0] == 0
    b = [1000 + i for i in range(BLOCK)]
    cache.store(b, kv(BLOCK))  # 3 blocks in all: at the bound
    assert len(cache) == 2
    cache.lookup(a, 100)  # a is now the most recently used
    c = [2000 + i for i in range(BLOCK)]
    cache.store(c, kv(BLOCK))  # over the bound: b goes
    assert cache.lookup(b, 100)[0] == 0 and cache.lookup(a, 100)[0] == 2 * BLOCK and cache.lookup(c, 100)[0] == BLOCK
    assert cache.nbytes == 3 * BLOCK * per_token


@pytest.mark.parametrize("chunk", [0, 8])
def test_a_long_prompt_is_prefilled_in_chunks_between_the_running_rows_steps(tiny, chunk):
    """A long prompt arrives while a request is decoding. With prefill_chunk=8 its prefill runs 8 positions at a
    time, and between two chunks the running row takes one decoding step (its stream goes on); with 0 it is
    prefilled in one call and the running row waits. The model's calls are recorded in order (the long request
    is submitted from inside the third decoding step, so the interleaving does not depend on timing). Both
    requests' greedy tokens are what each gets alone, so the chunks build the same KV as one call."""
    model, tokenizer = tiny
    running = Request(encode(tokenizer, "User: tell me a story."), 30, temperature=0.0)
    long = Request(encode(tokenizer, "System: you are a careful, patient and friendly assistant. Answer briefly, kindly and "
                                     "in plain words; when unsure, say so and ask a short question back. User: hello there"), 4,
                   temperature=0.0)
    assert len(long.prompt_ids) > 4 * 8
    engine = Engine(model, tokenizer, stop_token_ids=NEVER, prefix_cache_bytes=0, prefill_chunk=chunk)
    collector, calls, submitted = Collector(), [], []
    forward = model.forward

    @functools.wraps(forward)  # the same signature: the engine picks its cache argument from it
    def recording(*args, **kwargs):  # the engine thread's calls, in order: (rows, positions fed)
        calls.append(tuple(kwargs["input_ids"].shape))
        if len(calls) == 3 and not submitted:
            submitted.append(len(calls))
            engine.submit(long, collector.emit_for("long"))
        return forward(*args, **kwargs)

    model.forward = recording
    try:
        engine.submit(running, collector.emit_for("running"))
        engine.start()
        assert collector.wait(2) == {"running", "long"}
    finally:
        del model.forward
        engine.shutdown()
    assert collector.tokens[("running", 0)] == alone(model, tokenizer, running)[0]
    assert collector.tokens[("long", 0)] == alone(model, tokenizer, long)[0]
    length = len(long.prompt_ids)
    if chunk:
        full = (length - 1) // chunk  # chunks of 8, then the last (1..8 positions)
        expected = [(1, chunk), (1, 1)] * full + [(1, length - full * chunk), (2, 1)]
    else:
        expected = [(1, length), (2, 1)]
    after = calls[submitted[0] : submitted[0] + len(expected)]
    assert after == expected, calls
