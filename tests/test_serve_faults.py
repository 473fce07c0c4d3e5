"""The server under faults, on loopback with a tiny model and real uvicorn: clients that hang up mid-request,
64 concurrent clients with different sampling settings, and SIGKILL during a burst of feedback writes."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from test_serve import lively_model_dir, socket_port

from alignkit.serve.app import BackgroundServer, ServeConfig, create_app, load_state

MODEL = "tiny-faults"
CONTEXT = 256


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory):
    return lively_model_dir(tiny_model_dir, tmp_path_factory.mktemp("lively-faults") / "model")


@pytest.fixture(scope="module")
def state(model_dir):
    cfg = ServeConfig(str(model_dir), served_model_name=MODEL, context_length=CONTEXT, max_tokens_limit=200, max_n=4, max_batch_rows=64,
                      device="cpu")
    state = load_state(cfg)
    yield state
    state.engine.shutdown()


@pytest.fixture(scope="module")
def feedback_process(model_dir, tmp_path_factory):
    """`alignkit serve` in its own process for the SIGKILL test, started with the module so that its
    start-up (imports, model load) overlaps the other tests."""
    with socket_port() as port:
        pass
    db = tmp_path_factory.mktemp("kill") / "feedback.db"
    process = launch(model_dir, port, db)
    yield process, port, db
    if process.poll() is None:
        process.kill()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(state, feedback_process):
    with BackgroundServer(create_app(state)) as background:
        yield background


def user(text):
    return [{"role": "user", "content": text}]


def chat(http, **request):
    response = http.post("/v1/chat/completions", json={"model": MODEL, **request})
    assert response.status_code == 200, response.text
    return response.json()


def wait_idle(engine, seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while (engine.running_rows or engine.waiting) and time.monotonic() < deadline:
        time.sleep(0.02)
    return engine.running_rows == 0 and engine.waiting == 0


# ------------------------------------------------------------------------------------------ (a) disconnects


def test_clients_that_hang_up_free_their_slots(state, server):
    """Four streaming and four non-streaming clients hang up early while sharing a batch: every row is freed
    (cancelled, not decoded to max_tokens), and the next request is answered right away and correctly."""
    engine, max_tokens, clients = state.engine, 150, 8
    slow = engine.model.register_forward_pre_hook(lambda module, args: time.sleep(0.03))  # ~30 ms a step: the hang-ups come mid-request
    before = dict(engine.stats)

    def hang_up(i):
        body = {"model": MODEL, "messages": user(f"Client {i} goes on and on"), "max_tokens": max_tokens, "temperature": 0, "stream": i % 2 == 0}
        if body["stream"]:
            with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as response:
                for line in response.iter_lines():
                    if '"content": "' in line and '"content": ""' not in line:
                        return  # one real token arrived: hang up
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(server.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=0.5))

    try:
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(hang_up, range(clients)))
        assert wait_idle(engine), (engine.running_rows, engine.waiting)
    finally:
        slow.remove()
    assert engine.stats["cancelled"] - before["cancelled"] == clients
    generated = engine.stats["tokens"] - before["tokens"]
    assert generated < clients * max_tokens / 2, generated  # the rows stopped when their clients left

    started = time.monotonic()
    with httpx.Client(base_url=server.url, timeout=30) as http:
        answer = chat(http, messages=user("And now?"), max_tokens=5, temperature=0)
    assert time.monotonic() - started < 10 and answer["usage"]["completion_tokens"] == 5
    assert engine.running_rows == 0 and engine.waiting == 0


# ------------------------------------------------------------------------------------------ (b) 64 mixed clients


def mixed_requests(full_answers: dict[str, str]) -> list[dict]:
    """64 requests: greedy (some with top_p, which greedy ignores), greedy with a stop string that occurs in the
    answer, seeded samples (n 1 or 2, various temperature / top_p), unseeded samples."""
    requests = []
    for i in range(64):
        prompt = f"Request {i}: tell me about number {i * 7}"
        kind = ["greedy", "greedy_stop", "seeded", "sampled"][i % 4]
        request = {"messages": user(prompt), "max_tokens": 4 + i % 13}
        if kind == "greedy":
            request.update(temperature=0, top_p=[1.0, 0.5][i % 2])
        elif kind == "greedy_stop":  # a stop string that occurs in the answer: three visible characters from the 5th on
            full = full_answers[prompt]
            stop = next(full[k : k + 3] for k in range(4, len(full) - 3) if full[k : k + 3].strip())
            request.update(temperature=0, max_tokens=20, stop=[stop, "@@never@@"])
        elif kind == "seeded":
            request.update(temperature=[0.7, 1.0, 1.3][i % 3], top_p=[1.0, 0.9][i % 2], n=1 + i % 2, seed=1000 + i)
        else:
            request.update(temperature=1.0, top_p=0.95)
        requests.append({"kind": kind, "prompt": prompt, "request": request})
    return requests


def test_64_concurrent_clients_with_different_sampling_settings(state, server):
    """Each answer under load equals the answer of the same request sent alone (greedy, and seeded samples);
    stop strings cut the text where the alone-sent full answer has them; max_tokens is never exceeded."""
    with httpx.Client(base_url=server.url, timeout=120) as http:
        full = {f"Request {i}: tell me about number {i * 7}": chat(http, messages=user(f"Request {i}: tell me about number {i * 7}"),
                                                                max_tokens=20, temperature=0)["choices"][0]["message"]["content"]
                for i in range(1, 64, 4)}
        cases = mixed_requests(full)
        alone = [chat(http, **case["request"]) if case["kind"] != "sampled" else None for case in cases]
    before = dict(state.engine.stats)
    state.engine.stats["max_rows"] = 0
    barrier = threading.Barrier(64)

    def client(case):
        with httpx.Client(base_url=server.url, timeout=300) as http:
            barrier.wait(timeout=60)
            return chat(http, **case["request"])

    with ThreadPoolExecutor(64) as pool:
        together = list(pool.map(client, cases))

    for case, single, answer in zip(cases, alone, together):
        request, choices = case["request"], sorted(answer["choices"], key=lambda c: c["index"])
        texts = [c["message"]["content"] for c in choices]
        assert len(choices) == request.get("n", 1)
        assert answer["usage"]["completion_tokens"] <= request["max_tokens"] * len(choices)
        if case["kind"] == "greedy_stop":
            stop, text = request["stop"][0], full[case["prompt"]]
            assert texts == [text[: text.find(stop)]] and choices[0]["finish_reason"] == "stop", (stop, text, texts)
        if single is not None:
            assert texts == [c["message"]["content"] for c in sorted(single["choices"], key=lambda c: c["index"])], case
            counts = ("prompt_tokens", "completion_tokens", "total_tokens")  # cached_tokens depends on what came before
            assert [answer["usage"][k] for k in counts] == [single["usage"][k] for k in counts]
            assert 0 <= answer["usage"]["prompt_tokens_details"]["cached_tokens"] < answer["usage"]["prompt_tokens"]
    stats = state.engine.stats
    assert stats["requests"] - before["requests"] == 64
    assert stats["max_rows"] >= 8  # requests with different settings were decoded together


# ------------------------------------------------------------------------------------------ (c) SIGKILL during feedback


def judgment(client: int, i: int) -> dict:
    return {"id": f"c{client:02d}-{i:05d}-kill", "annotator": f"client{client}", "prompt": f"Prompt {i} of client {client}",
            "responses": [f"first {i}", f"second {i}"], "ranks": [1 + i % 2, 2 - i % 2], "sampling": {"temperature": 0.7}}


def launch(model_dir, port: int, db) -> subprocess.Popen:
    command = [sys.executable, "-m", "alignkit.serve.commands", "serve", "--model_name_or_path", str(model_dir), "--port", str(port),
               "--served_model_name", MODEL, "--feedback_db", str(db), "--device", "cpu"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_ready(process: subprocess.Popen, port: int) -> subprocess.Popen:
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        assert process.poll() is None and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.1)


KILLS = int(os.environ.get("ALIGNKIT_FAULT_KILLS", "1"))  # docs/reliability.md reports a run with more


def test_sigkill_during_a_burst_of_feedback_loses_no_acknowledged_judgment(model_dir, feedback_process):
    """Six clients post judgments as fast as they can; the server is SIGKILLed mid-burst and restarted.
    Every judgment whose 200 a client received is in the database afterwards, and none is stored twice
    (the clients retry the unacknowledged ones with the same id)."""
    process, port, db = feedback_process
    acked: set[str] = set()
    lock, done = threading.Lock(), threading.Event()
    per_client = 10_000

    def client(c):
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            for i in range(per_client):
                body = judgment(c, i)
                while not done.is_set():
                    try:
                        if http.post("/api/feedback", json=body).status_code == 200:
                            with lock:
                                acked.add(body["id"])
                            break
                    except httpx.TransportError:
                        time.sleep(0.05)  # the server is down: retry the same judgment (same id) once it is back
                if done.is_set():
                    return

    wait_ready(process, port)
    threads = [threading.Thread(target=client, args=(c,)) for c in range(6)]
    for thread in threads:
        thread.start()
    kills, at_kill = 0, []
    try:
        for _ in range(KILLS):
            target = len(acked) + 150
            deadline = time.monotonic() + 120
            while len(acked) < target and time.monotonic() < deadline:
                time.sleep(0.01)
            process.send_signal(signal.SIGKILL)  # mid-burst: writes in flight
            process.wait(timeout=30)
            kills += 1
            with lock:
                at_kill.append(set(acked))
            rows = {row[0] for row in sqlite3.connect(db).execute("SELECT id FROM judgments")}
            assert at_kill[-1] <= rows, f"{len(at_kill[-1] - rows)} acknowledged judgment(s) lost"
            process = wait_ready(launch(model_dir, port, db), port)
        target = len(acked) + 50  # the restarted server takes the retries and new judgments
        deadline = time.monotonic() + 120
        while len(acked) < target and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        done.set()
        for thread in threads:
            thread.join(timeout=30)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    connection = sqlite3.connect(db)
    rows = [row[0] for row in connection.execute("SELECT id FROM judgments")]
    assert kills == KILLS and len(acked) >= 150 * KILLS + 50
    assert acked <= set(rows) and len(rows) == len(set(rows))
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    print(f"\n{kills} SIGKILL(s), {len(acked)} acknowledged judgments, {len(rows)} stored, lost 0")


def test_feedback_store_commits_durably(tmp_path):
    """WAL and synchronous=FULL on every connection: a judgment is on disk (fsynced) before add() returns."""
    from alignkit.serve.feedback import FeedbackStore

    store = FeedbackStore(tmp_path / "f.db")
    connection = store._connect()
    try:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert connection.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        connection.close()
