"""The OpenAI-compatible server on loopback with a tiny model: the official `openai` client, validation,
limits, auth, batching under load, disconnects, and feedback collection through a restart."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from typer.testing import CliRunner

from alignkit.chat.history import fit_history
from alignkit.data.tokenize import Formatting, prompt_text
from alignkit.generation import SamplingParams, generate, generate_text
from alignkit.serve.app import BackgroundServer, ServeConfig, check_bind, create_app, load_state
from alignkit.serve.feedback import FeedbackStore, export_preferences

MODEL = "tiny-chat"
CONTEXT = 192


def lively_model_dir(tiny_model_dir, target):
    """The tiny model with larger random weights: varied (not one repeated token) greedy text."""
    from alignkit.models import load_causal_lm, load_tokenizer, save_model

    model = load_causal_lm(str(tiny_model_dir))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2 and "embed" not in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    save_model(model, load_tokenizer(str(tiny_model_dir)), target)
    return target


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory):
    return lively_model_dir(tiny_model_dir, tmp_path_factory.mktemp("lively") / "model")


@pytest.fixture(scope="module")
def state(model_dir, tmp_path_factory):
    db = tmp_path_factory.mktemp("feedback") / "feedback.db"
    cfg = ServeConfig(str(model_dir), served_model_name=MODEL, context_length=CONTEXT, feedback_db=str(db),
                      max_tokens_limit=100, max_n=4, max_batch_rows=64, max_body_bytes=20_000)
    state = load_state(cfg)
    yield state
    state.engine.shutdown()


@pytest.fixture(scope="module")
def cli_process(model_dir, tmp_path_factory):
    """`serve` in its own process, started with the module so that its imports overlap the other tests."""
    with socket_port() as port:
        pass
    command = [sys.executable, "-m", "alignkit.serve.commands", "serve", "--model_name_or_path", str(model_dir), "--port", str(port),
               "--served_model_name", MODEL, "--context_length", "128", "--feedback_db", str(tmp_path_factory.mktemp("cli") / "fb.db")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield process, port
    if process.poll() is None:
        process.kill()
        process.communicate(timeout=30)


@pytest.fixture(scope="module")
def server(state, cli_process):
    with BackgroundServer(create_app(state)) as background:
        yield background


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def reference(state, messages, max_tokens, batch=None):
    """The greedy reply computed without the server: chat template + generate_text."""
    texts = [prompt_text(state.tokenizer, m, Formatting()) for m in (batch or [messages])]
    out = generate_text(state.engine.model, state.tokenizer, texts, SamplingParams(max_new_tokens=max_tokens, temperature=0), batch_size=64)
    return out if batch else out[0]


def user(text):
    return [{"role": "user", "content": text}]


# ------------------------------------------------------------------------------------------ openai client


def test_openai_client_non_streaming(state, client):
    result = client.chat.completions.create(model=MODEL, messages=user("Hello, who are you?"), max_tokens=10, temperature=0)
    expected = reference(state, user("Hello, who are you?"), 10)
    assert result.choices[0].message.content == expected and expected.strip()
    assert result.choices[0].message.role == "assistant" and result.choices[0].finish_reason == "length"
    prompt_ids = state.tokenizer(prompt_text(state.tokenizer, user("Hello, who are you?"), Formatting()), add_special_tokens=False)["input_ids"]
    assert result.usage.prompt_tokens == len(prompt_ids)
    assert result.usage.completion_tokens == 10 and result.usage.total_tokens == len(prompt_ids) + 10
    assert result.model == MODEL and result.object == "chat.completion"
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_openai_client_streaming(state, client):
    stream = client.chat.completions.create(model=MODEL, messages=user("Tell me a story"), max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 1  # streamed, not one piece
    assert "".join(deltas) == reference(state, user("Tell me a story"), 12)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_openai_client_multi_turn(state, client):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
    ]
    result = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert result.choices[0].message.content == reference(state, messages, 8)
    assert result.choices[0].message.content != reference(state, messages[-1:], 8)  # the history matters


def test_openai_client_errors(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4", messages=user("hi"))
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=user("hi"), temperature=3)
    assert error.value.status_code == 400 and error.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError, match="last message must be from the user"):
        client.chat.completions.create(model=MODEL, messages=user("hi") + [{"role": "assistant", "content": "yo"}])


def test_stop_strings_n_and_seed(state, client):
    full = reference(state, user("Count with me"), 20)
    stop = full[8:11]
    assert stop.strip() and full.find(stop) >= 0
    cut = client.chat.completions.create(model=MODEL, messages=user("Count with me"), max_tokens=20, temperature=0, stop=[stop, "@@never@@"])
    assert cut.choices[0].message.content == full[: full.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model=MODEL, messages=user("Count with me"), max_tokens=20, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == full[: full.find(stop)]

    kwargs = dict(model=MODEL, messages=user("Pick a word"), max_tokens=8, temperature=1.0, top_p=0.9, n=3, seed=1234)
    first, second = client.chat.completions.create(**kwargs), client.chat.completions.create(**kwargs)
    texts = [c.message.content for c in sorted(first.choices, key=lambda c: c.index)]
    assert len(texts) == 3 and [c.message.content for c in sorted(second.choices, key=lambda c: c.index)] == texts
    assert len(set(texts)) > 1  # n independent samples
    assert first.usage.completion_tokens == 3 * 8
    # the seed means the same as a direct call of the sampler: choice j draws from its own stream, choice_seed(seed, j)
    from alignkit.batching import choice_seed

    prompt = state.tokenizer(prompt_text(state.tokenizer, user("Pick a word"), Formatting()), add_special_tokens=False)["input_ids"]
    seeds = [choice_seed(1234, j) for j in range(3)]
    out = generate(state.engine.model, state.tokenizer, [prompt] * 3, SamplingParams(max_new_tokens=8, temperature=[1.0] * 3, top_p=0.9, seed=seeds))
    assert texts == [state.tokenizer.decode(row, skip_special_tokens=True) for row in out.response_ids]
    other = client.chat.completions.create(**{**kwargs, "seed": 99})
    assert [c.message.content for c in sorted(other.choices, key=lambda c: c.index)] != texts


def test_long_conversation_goes_through_the_history_strategy(state, client):
    messages = []
    for i in range(8):
        messages += [{"role": "user", "content": f"Question {i} about the weather in town {i}?"},
                     {"role": "assistant", "content": f"Answer {i}: it is sunny in town {i} today."}]
    messages.append({"role": "user", "content": "And tomorrow?"})
    result = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    fitted = fit_history(messages, state.tokenizer, Formatting(), CONTEXT - 16)
    assert fitted.dropped_turns > 0
    assert result.model_extra["history"] == {"strategy": "truncate", "dropped_turns": fitted.dropped_turns, "summarized": False}
    assert result.usage.prompt_tokens == len(fitted.prompt_ids) <= CONTEXT - 16
    assert result.choices[0].message.content == reference(state, fitted.messages, 16)


def test_summarize_strategy_in_the_server(state):
    summarizing = load_state_like(state, history_strategy="summarize", summary_max_tokens=16)
    messages = []
    for i in range(8):
        messages += [{"role": "user", "content": f"Question {i} about town {i}?"}, {"role": "assistant", "content": f"Town {i} is fine."}]
    messages.append({"role": "user", "content": "Summary please"})
    with BackgroundServer(create_app(summarizing)) as background:
        body = {"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0}
        first = httpx.post(background.url + "/v1/chat/completions", json=body, timeout=60).json()
        assert first["history"]["summarized"] and first["history"]["dropped_turns"] > 0
        assert first["usage"]["prompt_tokens"] <= CONTEXT - 8
        cached = len(summarizing.cache)
        again = httpx.post(background.url + "/v1/chat/completions", json=body, timeout=60).json()
        assert again["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
        assert len(summarizing.cache) == cached  # the summary came from the cache


def load_state_like(state, **changes):
    """Another server over the same model and engine, with different settings."""
    from dataclasses import replace

    from alignkit.chat.history import SummaryCache

    return replace(state, cfg=replace(state.cfg, **changes), cache=SummaryCache())


# ------------------------------------------------------------------------------------------ validation and safety


def post(server, body, headers=None, raw=None):
    return httpx.post(server.url + "/v1/chat/completions", json=None if raw is not None else body, content=raw,
                      headers={"content-type": "application/json", **(headers or {})}, timeout=60)


BAD_REQUESTS = [
    ("malformed JSON", None, '{"model": "tiny-chat", "messages": [', 400, None),
    ("not an object", None, "[1, 2]", 400, None),
    ("no messages", {"model": MODEL}, None, 400, "messages"),
    ("empty messages", {"model": MODEL, "messages": []}, None, 400, "messages"),
    ("unknown role", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, None, 400, "messages[0].role"),
    ("assistant first", {"model": MODEL, "messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]}, None, 400, "messages[0].role"),
    ("two users in a row", {"model": MODEL, "messages": user("a") + user("b")}, None, 400, "messages[1].role"),
    ("system in the middle", {"model": MODEL, "messages": user("a") + [{"role": "system", "content": "s"}]}, None, 400, "messages[1].role"),
    ("content not text", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, None, 400, "messages[0].content"),
    ("oversized prompt", {"model": MODEL, "messages": user("word " * 400)}, None, 400, "messages"),
    ("max_tokens over the limit", {"model": MODEL, "messages": user("hi"), "max_tokens": 101}, None, 400, "max_tokens"),
    ("max_tokens zero", {"model": MODEL, "messages": user("hi"), "max_tokens": 0}, None, 400, "max_tokens"),
    ("n over the limit", {"model": MODEL, "messages": user("hi"), "n": 5}, None, 400, "n"),
    ("negative temperature", {"model": MODEL, "messages": user("hi"), "temperature": -0.1}, None, 400, "temperature"),
    ("top_p zero", {"model": MODEL, "messages": user("hi"), "top_p": 0}, None, 400, "top_p"),
    ("five stop strings", {"model": MODEL, "messages": user("hi"), "stop": list("abcde")}, None, 400, "stop"),
    ("empty stop string", {"model": MODEL, "messages": user("hi"), "stop": [""]}, None, 400, "stop"),
    ("string n", {"model": MODEL, "messages": user("hi"), "n": "many"}, None, 400, "n"),
    ("unsupported penalty", {"model": MODEL, "messages": user("hi"), "presence_penalty": 1.0}, None, 400, "presence_penalty"),
    ("unknown model", {"model": "other", "messages": user("hi")}, None, 404, "model"),
    ("body over the limit", {"model": MODEL, "messages": user("x" * 30_000)}, None, 413, None),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_openai_style_4xx(server, case):
    _, body, raw, status, param = case
    response = post(server, body, raw=raw)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


def test_chunked_body_over_the_limit_gets_413(server):
    def chunks():
        for _ in range(30):
            yield b"x" * 1000

    response = httpx.post(server.url + "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"


def test_api_key_and_bind_policy(state):
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.5"):
        check_bind(host, "")
    for host in ("0.0.0.0", "192.168.1.10", "example.org", "::"):
        with pytest.raises(ValueError, match="--api_key"):
            check_bind(host, "")
        check_bind(host, "secret")
    from alignkit.serve.commands import app

    refused = CliRunner().invoke(app, ["serve", "--model_name_or_path", "does/not/matter", "--host", "0.0.0.0"])
    assert refused.exit_code == 2 and "error:" in refused.output and "refusing to bind 0.0.0.0" in refused.output

    keyed = load_state_like(state, api_key="s3cret")
    with BackgroundServer(create_app(keyed)) as background:
        assert httpx.get(background.url + "/health").status_code == 200  # liveness needs no key
        assert httpx.get(background.url + "/").status_code == 200  # the page holds no data
        missing = httpx.get(background.url + "/v1/models")
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(background.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.post(background.url + "/api/feedback", json={}).status_code == 401
        good = openai.OpenAI(base_url=background.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=2).usage.completion_tokens == 2
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=background.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_prefix_cache_and_prefill_chunk_flags_reach_the_engine(model_dir):
    """`--prefix_cache_mb` sizes the engine's prefix cache: two requests sharing a long system prompt, over HTTP. With 0
    the second prompt is prefilled whole (no hit); with 64 MiB it reuses the block-aligned prefix it shares with the
    first, counted independently from the two prompts' tokens; a third request repeating the second (streamed) reuses
    all of it but the block holding its last token. Each response's `usage.prompt_tokens_details.cached_tokens`, read
    through the official client, reports that reuse. A negative size is refused, naming the flag.
    `--prefill_chunk_tokens` reaches the engine too (what the engine does with it: test_serve_batching.py)."""
    from alignkit.config import load_config
    from alignkit.decode import BLOCK
    from alignkit.packing import common_prefix_length
    from alignkit.serve.commands import app

    refused = CliRunner().invoke(app, ["serve", "--model_name_or_path", "does/not/matter", "--prefix_cache_mb", "-1"])
    assert refused.exit_code == 2 and "--prefix_cache_mb" in refused.output and ">= 0" in refused.output, refused.output
    system = {"role": "system", "content": "You are a careful, patient and friendly assistant. Answer briefly and kindly."}
    conversations = [[system, *user("what is a lighthouse?")], [system, *user("why is the sea salty?")]]
    stats, prompt_tokens, cached = {}, {}, {}
    for megabytes in (0, 64):
        cfg = load_config(ServeConfig, overrides={"model_name_or_path": str(model_dir), "served_model_name": MODEL,
                                                  "context_length": CONTEXT, "prefix_cache_mb": megabytes,
                                                  "prefill_chunk_tokens": 8 + megabytes})
        served = load_state(cfg)
        try:
            assert served.engine.prefill_chunk == 8 + megabytes
            with BackgroundServer(create_app(served)) as background:
                api = openai.OpenAI(base_url=background.url + "/v1", api_key="unused", max_retries=0, timeout=60)
                usages = [api.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0).usage
                          for messages in conversations]
                # the streamed usage chunk reports the same count: the second prompt again, now all cached but its last block
                streamed = [c.usage for c in api.chat.completions.create(model=MODEL, messages=conversations[1], max_tokens=2, temperature=0,
                                                                           stream=True, stream_options={"include_usage": True}) if c.usage]
            prompt_tokens[megabytes] = [u.prompt_tokens for u in usages]
            cached[megabytes] = [u.prompt_tokens_details.cached_tokens for u in usages + streamed]
            stats[megabytes] = dict(served.engine.stats)
            prompts = [served.tokenizer(prompt_text(served.tokenizer, m, Formatting()), add_special_tokens=False)["input_ids"]
                       for m in conversations]
        finally:
            served.engine.shutdown()
    assert prompt_tokens[0] == prompt_tokens[64] == [len(p) for p in prompts]
    shared = min(common_prefix_length(prompts), len(prompts[1]) - 1) // BLOCK * BLOCK
    assert shared >= BLOCK
    # the third request repeats the second: all of it is cached but the last block holding its final token
    last_block = (prompt_tokens[64][1] - 1) // BLOCK * BLOCK
    sent = sum(prompt_tokens[0]) + prompt_tokens[0][1]
    assert stats[0]["prefix_hit_tokens"] == 0 and stats[0]["prefill_tokens"] == sent
    assert stats[64]["prefix_hit_tokens"] == shared + last_block and stats[64]["prefill_tokens"] == sent - shared - last_block
    # each response's usage.prompt_tokens_details.cached_tokens (OpenAI's field) says the same, per request
    assert cached[0] == [0, 0, 0] and cached[64] == [0, shared, last_block], (cached, shared)


def test_client_disconnect_mid_stream_frees_its_slot(state, server):
    engine = state.engine
    before = dict(engine.stats)
    body = {"model": MODEL, "messages": user("Go on forever"), "max_tokens": 100, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as response:
        for line in response.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                break  # one real token arrived; now hang up
    deadline = time.monotonic() + 20
    while (engine.running_rows or engine.waiting) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.running_rows == 0 and engine.waiting == 0
    assert engine.stats["cancelled"] == before["cancelled"] + 1
    assert engine.stats["tokens"] - before["tokens"] < 100  # stopped early: the slot is free


# ------------------------------------------------------------------------------------------ load


def test_fifty_concurrent_clients_all_answered_correctly(state, server):
    prompts = [f"Client {c} asks question {r}: what about {c * r}?" for c in range(50) for r in range(3)]
    expected = dict(zip(prompts, reference(state, None, 6, batch=[user(p) for p in prompts])))
    before = dict(state.engine.stats)

    def client_session(c):
        with httpx.Client(base_url=server.url, timeout=120) as http:
            answers = []
            for r in range(3):
                prompt = f"Client {c} asks question {r}: what about {c * r}?"
                body = http.post("/v1/chat/completions", json={"model": MODEL, "messages": user(prompt), "max_tokens": 6, "temperature": 0}).json()
                answers.append((prompt, body["choices"][0]["message"]["content"], body["usage"]["completion_tokens"]))
            return answers

    with ThreadPoolExecutor(50) as pool:
        results = [a for answers in pool.map(client_session, range(50)) for a in answers]
    assert len(results) == 150
    assert all(text == expected[prompt] and tokens == 6 for prompt, text, tokens in results)
    stats = state.engine.stats
    assert stats["requests"] - before["requests"] == 150
    assert stats["max_rows"] >= 8  # requests were decoded together, not one by one


def test_engine_mixes_greedy_and_sampled_requests(state):
    """Greedy and sampled requests decode in one batch and all finish; greedy ones stay exact."""
    from alignkit.batching import Request

    prompts = [user(f"Mixed request {i}") for i in range(12)]
    encoded = [state.tokenizer(prompt_text(state.tokenizer, m, Formatting()), add_special_tokens=False)["input_ids"] for m in prompts]
    expected = reference(state, None, 5, batch=prompts)
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda i: state.engine.complete(Request(encoded[i], 5, temperature=0.0 if i % 2 else 0.9), timeout=60), range(12)))
    assert all(len(r) == 1 and r[0][2] == 5 and r[0][1] == "length" for r in results)
    assert [results[i][0][0] for i in range(1, 12, 2)] == expected[1::2]


# ------------------------------------------------------------------------------------------ feedback


def judgment(annotator, i):
    k = 3 if i % 5 == 0 else 2
    ranks = [[1, 2], [2, 1], [1, 1]][i % 3] if k == 2 else [2, 3, 1]
    return {"id": f"{annotator}-{i:04d}-0000", "annotator": annotator, "prompt": f"Prompt {i} from {annotator}",
            "responses": [f"response {j} to {i}" for j in range(k)], "ranks": ranks, "sampling": {"temperature": 0.7, "n": k}}


def test_twenty_annotators_500_judgments_through_a_restart(state, tmp_path):
    db = tmp_path / "judgments.db"
    collecting = load_state_like(state, feedback_db=str(db))
    collecting.feedback = FeedbackStore(db)
    first = BackgroundServer(create_app(collecting)).start()
    port, stored, retries = first.port, threading.Semaphore(0), []

    def annotator(a):
        name = f"annotator{a:02d}"
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            for i in range(25):
                body = judgment(name, i)
                while True:  # like the page: keep the judgment until the server confirms it (same id on retries)
                    try:
                        if http.post("/api/feedback", json=body).status_code == 200:
                            stored.release()
                            break
                    except httpx.TransportError:
                        pass
                    retries.append(name)
                    time.sleep(0.05)

    threads = [threading.Thread(target=annotator, args=(a,)) for a in range(20)]
    for thread in threads:
        thread.start()
    for _ in range(200):
        stored.acquire(timeout=60)
    first.stop()  # a restart mid-session: a new process would see exactly this file
    time.sleep(0.3)
    again = load_state_like(state, feedback_db=str(db))
    again.feedback = FeedbackStore(db)
    second = BackgroundServer(create_app(again), port=port).start()
    try:
        for thread in threads:
            thread.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
        assert retries  # the restart was felt by the clients ...
        rows = sqlite3.connect(db).execute("SELECT annotator, COUNT(*) FROM judgments GROUP BY annotator").fetchall()
        assert rows == [(f"annotator{a:02d}", 25) for a in range(20)]  # ... and nothing was lost or doubled
        assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        stats = httpx.get(second.url + "/api/feedback/stats").json()
        assert stats["total"] == 500
    finally:
        second.stop()

    out = tmp_path / "prefs.jsonl"
    counts = export_preferences(db, out)
    kinds = [judgment("a", i) for i in range(25)]
    ties = sum(1 for j in kinds if len(set(j["ranks"])) == 1) * 20
    rankings = sum(1 for j in kinds if len(j["ranks"]) == 3) * 20
    assert counts == {"pairs": 500 - ties - rankings, "rankings": rankings, "skipped_all_tie": ties}

    from alignkit.data.preferences import load_preferences

    examples = load_preferences(str(out))
    assert len(examples) == 500 - ties
    rows = {json.loads(line)["id"]: json.loads(line) for line in out.read_text().splitlines()}
    pair = rows["annotator03-0001-0000"]  # i=1: ranks [2, 1], B won
    assert pair["chosen"] == "response 1 to 1" and pair["rejected"] == "response 0 to 1" and pair["prompt"] == "Prompt 1 from annotator03"
    ranking = rows["annotator03-0005-0000"]  # ranks [2, 3, 1]: C > A > B
    assert ranking["responses"] == ["response 2 to 5", "response 0 to 5", "response 1 to 5"] and ranking["ranks"] == [1, 2, 3]
    by_prompt = {e.responses[0] + "|" + e.responses[1]: e for e in examples}
    assert by_prompt["response 2 to 5|response 0 to 5"].pairs == [(0, 1), (0, 2), (1, 2)]


def test_feedback_validation_and_idempotence(server):
    good = judgment("checker", 1)
    assert httpx.post(server.url + "/api/feedback", json=good).json()["stored"] is True
    assert httpx.post(server.url + "/api/feedback", json=good).json()["stored"] is False  # a retry: stored once
    for change, param in [({"ranks": [1]}, "ranks"), ({"responses": ["only one"], "ranks": [1]}, "responses"),
                          ({"annotator": " "}, "annotator"), ({"prompt": [{"role": "assistant", "content": "x"}]}, "prompt[0].role"),
                          ({"ranks": [0, 1]}, "ranks"), ({"responses": ["a", " "]}, "responses")]:
        response = httpx.post(server.url + "/api/feedback", json={**good, "id": "checker-new-0000", **change})
        assert response.status_code == 400 and response.json()["error"]["param"] == param, (change, response.text)


def test_feedback_export_command(tmp_path):
    from alignkit.serve.commands import app
    from alignkit.serve.feedback import Judgment

    db = tmp_path / "f.db"
    store = FeedbackStore(db)
    conversation = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi"}]
    store.add(Judgment("id-00000001", "ann", "m", conversation, ["Hello!", "Go away."], [1, 2], {"temperature": 0.7}))
    store.add(Judgment("id-00000002", "bob", "m", conversation[1:], ["a", "b", "c", "d"], [2, 1, 2, 3]))
    store.add(Judgment("id-00000003", "bob", "m", conversation[1:], ["same", "same too"], [1, 1]))
    out = tmp_path / "out" / "prefs.jsonl"
    result = CliRunner().invoke(app, ["feedback", "export", "--feedback_db", str(db), "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote 2 row(s)" in result.output and "1 pair(s), 1 ranking(s)" in result.output and "skipped 1" in result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["prompt"] == conversation and rows[0]["chosen"] == "Hello!" and rows[0]["rejected"] == "Go away."
    assert rows[1]["prompt"] == "Hi" and rows[1]["responses"] == ["b", "a", "c", "d"] and rows[1]["ranks"] == [1, 2, 2, 3]

    from alignkit.data.preferences import load_preferences

    pair, ranking = load_preferences(str(out))
    assert pair.prompt == conversation and pair.responses == ["Hello!", "Go away."] and pair.pairs == [(0, 1)]
    # ties (a, c at rank 2) give no pair between them
    assert sorted(ranking.pairs) == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]

    only_bob = tmp_path / "bob.jsonl"
    CliRunner().invoke(app, ["feedback", "export", "--feedback_db", str(db), "--output", str(only_bob), "--annotator", "bob"])
    assert [json.loads(line)["annotator"] for line in only_bob.read_text().splitlines()] == ["bob"]
    missing = CliRunner().invoke(app, ["feedback", "export", "--feedback_db", str(tmp_path / "none.db"), "--output", str(out)])
    assert missing.exit_code == 2 and "error:" in missing.output and "no such feedback database" in missing.output


def test_serve_command_runs_uvicorn(cli_process):
    """The real command in its own process: starts, answers, stops on SIGTERM."""
    process, port = cli_process
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read() if process.poll() is not None else "timeout"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        assert client.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=3).usage.completion_tokens == 3
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert process.returncode in (0, -15), output  # uvicorn re-raises SIGTERM after a clean shutdown
    assert f"serving {MODEL} on http://127.0.0.1:{port}" in output and "Finished server process" in output


class socket_port:
    """A free loopback port (closed again before use)."""

    def __enter__(self):
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc):
        self.sock.close()
