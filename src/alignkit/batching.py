"""A batching scheduler: one background thread runs every generation, many requests share each batch.

Requests that can share a batch (same temperature and top_p, no seed) are decoded together through
`alignkit.generation.generate`, so throughput grows with the number of concurrent clients. The batch
is re-formed between rounds ("chunked continuous batching"): `on_token` ends a round early when rows
have finished (max_tokens, a stop string, a client gone) or compatible requests are waiting, once the
round has run `min_round_steps` steps; the rows still going continue in the next round with their
generated tokens appended to the prompt (one prefill, no lost tokens). So a short request does not
wait for a long one, and a client that disconnects frees its row within `min_round_steps` steps.

A request with a seed runs alone (its n samples batched together) in one uninterrupted round: its
random draws then depend only on the request, which makes the seed reproducible.

Each request reports through `emit(event)` from the engine thread:
  Delta(index, text)                       new text of choice `index` (stop strings held back until safe)
  Finished(index, reason, tokens)          reason "stop" (end-of-turn token or stop string) or "length"
  Failed(message)                          the batch raised; the request is over
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from alignkit.generation import SamplingParams, default_stop_token_ids, generate


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Delta:
    index: int
    text: str


@dataclass
class Finished:
    index: int
    reason: str
    tokens: int


@dataclass
class Failed:
    message: str


Event = Delta | Finished | Failed


@dataclass
class Job:
    request: Request
    emit: Callable[[Event], None]
    id: int = 0
    cancelled: bool = False  # set from any thread; read by the engine between steps
    submitted: float = field(default_factory=time.monotonic)

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def key(self) -> tuple:
        """Jobs with equal keys may share a batch."""
        r = self.request
        if r.seed is not None:
            return ("seed", self.id)
        return (0.0, 1.0) if r.temperature <= 0 else (r.temperature, r.top_p)  # greedy ignores top_p


class Choice:
    """One sampled row: its tokens, and the text already sent (incremental detokenization)."""

    def __init__(self, job: Job, index: int, tokenizer):
        self.job, self.index, self.tokenizer = job, index, tokenizer
        self.ids: list[int] = []
        self.sent = ""
        self.done = False
        self.holdback = max((len(s) for s in job.request.stop), default=1) - 1

    def prompt(self) -> list[int]:
        return self.job.request.prompt_ids + self.ids

    @property
    def remaining(self) -> int:
        return self.job.request.max_tokens - len(self.ids)

    def feed(self, token: int, hit_stop_token: bool) -> None:
        """Take one sampled token; emit the text that is now certain; finish on stop / length."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.job.request.stop) if i >= 0), default=-1)
        if cut >= 0:
            return self._finish(text[:cut], "stop")
        if hit_stop_token:
            return self._finish(text, "stop")
        if self.remaining <= 0:
            return self._finish(text, "length")
        # hold back a partial UTF-8 character and anything that could still become a stop string
        safe = text.rstrip("\ufffd")
        safe = safe[: len(safe) - self.holdback] if self.holdback else safe
        if len(safe) > len(self.sent) and safe.startswith(self.sent):
            self.job.emit(Delta(self.index, safe[len(self.sent) :]))
            self.sent = safe

    def _finish(self, text: str, reason: str) -> None:
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.job.emit(Delta(self.index, text[len(self.sent) :]))
        self.done = True
        self.job.emit(Finished(self.index, reason, len(self.ids)))


class _EndRound(Exception):
    """Raised from on_token to stop `generate` so the batch can be re-formed."""


class Engine:
    """Owns the model: only the engine thread runs it."""

    def __init__(self, model, tokenizer, max_batch_rows: int = 32, min_round_steps: int = 8, stop_token_ids=None):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_rows, self.min_round_steps = max_batch_rows, min_round_steps
        self.stop_token_ids = tuple(stop_token_ids or default_stop_token_ids(model, tokenizer))
        self._waiting: list[Job] = []
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.running_rows = 0
        self.stats = {"requests": 0, "tokens": 0, "rounds": 0, "batches": 0, "cancelled": 0, "max_rows": 0}

    # ------------------------------------------------------------------------------------ public

    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="alignkit-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, request: Request, emit: Callable[[Event], None]) -> Job:
        if request.n > self.max_batch_rows:
            raise ValueError(f"n={request.n} is more than the engine's batch ({self.max_batch_rows} rows)")
        if request.max_tokens < 1 or not request.prompt_ids:
            raise ValueError("a request needs a non-empty prompt and max_tokens >= 1")
        job = Job(request, emit, id=next(self._ids))
        with self._cond:
            self._waiting.append(job)
            self.stats["requests"] += 1
            self._cond.notify_all()
        return job

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    def complete(self, request: Request, timeout: float | None = None) -> list[tuple[str, str, int]]:
        """Blocking: [(text, finish_reason, completion_tokens)] for the request's n choices."""
        events: queue.Queue = queue.Queue()
        job = self.submit(request, events.put)
        texts, results = [""] * request.n, [None] * request.n
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while any(r is None for r in results):
                event = events.get(timeout=None if deadline is None else max(deadline - time.monotonic(), 0.001))
                if isinstance(event, Failed):
                    raise RuntimeError(f"generation failed: {event.message}")
                if isinstance(event, Delta):
                    texts[event.index] += event.text
                else:
                    results[event.index] = (texts[event.index], event.reason, event.tokens)
        except BaseException:
            job.cancel()  # Ctrl-C or a timeout: free the rows
            raise
        return results

    def complete_text(self, prompt_ids: list[int], max_tokens: int) -> str:
        """Greedy reply text (the summarizer's `complete`)."""
        return self.complete(Request(prompt_ids, max_tokens, temperature=0.0))[0][0]

    # ------------------------------------------------------------------------------------ engine thread

    def _take(self, key: tuple | None, room: int) -> list[Job]:
        """Waiting jobs, oldest first, as many whole jobs as fit `room`. Lock held.

        key None: a new batch, of the oldest job's key. Otherwise jobs joining a running batch of
        `key`, up to the first waiting job of another key: that one goes next, so it never starves.
        """
        taken, barrier = [], key is not None
        for job in list(self._waiting):
            if job.cancelled:  # its client left before it got a row
                self._waiting.remove(job)
                self.stats["cancelled"] += job.request.n
                continue
            key = job.key if key is None else key
            if job.key != key and barrier:
                break
            if job.key == key and job.request.n <= room:
                taken.append(job)
                room -= job.request.n
                self._waiting.remove(job)
        return taken

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    break
                jobs = self._take(None, self.max_batch_rows)
            if jobs:
                self.stats["batches"] += 1
                self._run_batch([Choice(job, i, self.tokenizer) for job in jobs for i in range(job.request.n)])

    def _run_batch(self, rows: list[Choice]) -> None:
        key = rows[0].job.key
        request = rows[0].job.request
        round_index = 0
        while rows:
            self.running_rows = len(rows)
            self.stats["max_rows"] = max(self.stats["max_rows"], len(rows))
            params = SamplingParams(
                max_new_tokens=max(row.remaining for row in rows),
                temperature=request.temperature,
                top_p=request.top_p,
                stop_token_ids=self.stop_token_ids,
                seed=None if request.seed is None else request.seed + round_index,
            )
            try:
                generate(self.model, self.tokenizer, [row.prompt() for row in rows], params, on_token=self._on_token(rows, key))
            except _EndRound:
                pass
            except Exception as error:  # a failing batch must not take the server down with it
                for job in {id(row.job): row.job for row in rows if not row.done}.values():
                    job.emit(Failed(f"{type(error).__name__}: {error}"))
                rows = []
            self.stats["rounds"] += 1
            round_index += 1
            rows = [row for row in rows if not row.done]
            if key[0] != "seed":
                with self._cond:
                    new = self._take(key, self.max_batch_rows - len(rows))
                rows += [Choice(job, i, self.tokenizer) for job in new for i in range(job.request.n)]
        self.running_rows = 0

    def _on_token(self, rows: list[Choice], key: tuple):
        seeded = key[0] == "seed"

        def on_token(step, tokens, finished) -> None:
            tokens, finished = tokens.tolist(), finished.tolist()
            freed = False
            for row, token, stopped in zip(rows, tokens, finished):
                if row.done:
                    continue
                if row.job.cancelled:
                    row.done, freed = True, True
                    self.stats["cancelled"] += 1
                    continue
                row.feed(token, stopped)
                self.stats["tokens"] += 1
                freed |= row.done
            if all(row.done for row in rows):
                raise _EndRound
            if seeded or step + 1 < self.min_round_steps:
                return
            # re-forming costs a prefill: worth it to admit waiting requests, or once half the rows are dead weight
            live = sum(not row.done for row in rows)
            if self._can_join(key, self.max_batch_rows - live) or (freed and 2 * live <= len(rows)):
                raise _EndRound

        return on_token

    def _can_join(self, key: tuple, room: int) -> bool:
        """Would `_take(key, room)` admit a job now?"""
        with self._cond:
            for job in self._waiting:
                if not job.cancelled:
                    return job.key == key and job.request.n <= room
        return False
