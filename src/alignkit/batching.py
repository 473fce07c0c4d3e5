"""A batching scheduler: one background thread runs every generation, many requests share each batch.

Continuous batching: the engine thread keeps one running batch (`alignkit.decode.DecodeBatch`) and,
between any two decoding steps, admits waiting requests (their prompts are prefilled alone and their KV
cache merged into the batch's; the running rows are not recomputed) and drops rows that are done
(max_tokens, a stop string or token, a client gone). Requests with different sampling settings share the
batch: temperature, top_p and seed are per row (`alignkit.generation.RowSampling`). Choice j of a request
with a seed draws from its own torch.Generator seeded with `choice_seed(seed, j)`, so its samples depend
only on the request: the same tokens whether it ran alone or beside others. Prompt prefixes seen before (a
system prompt, the earlier turns of a chat) come from a `PrefixCache` instead of being recomputed.

Each request reports through `emit(event)` from the engine thread:
  Delta(index, text)                       new text of choice `index` (stop strings held back until safe)
  Finished(index, reason, tokens, ids)     reason "stop" (end-of-turn token or stop string) or "length"
  Failed(message)                          the batch raised; the request is over
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from alignkit.decode import DecodeBatch, Prefill, PrefixCache
from alignkit.generation import RowSampling, SamplingParams, _pad_id, default_stop_token_ids

log = logging.getLogger(__name__)


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
    token_ids: list[int] = field(default_factory=list)  # the sampled tokens (a stop string's tail included)
    cached_tokens: int = 0  # of the prompt's tokens, those whose KV came from the prefix cache


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


def choice_seed(seed: int, index: int) -> int:
    """The seed of choice `index` of a request with `seed`: the seed itself for the first choice (so n=1 samples
    what `generate(..., SamplingParams(seed=seed))` samples), a hash of both for the others (independent streams)."""
    if index == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "little") >> 1


class Choice:
    """One sampled row: its tokens, and the text already sent (incremental detokenization)."""

    def __init__(self, job: Job, index: int, tokenizer):
        self.job, self.index, self.tokenizer = job, index, tokenizer
        self.ids: list[int] = []
        self.sent = ""
        self.done = False
        self.cached_tokens = 0  # set when its prompt is prefilled
        self.holdback = max((len(s) for s in job.request.stop), default=1) - 1
        seed = job.request.seed
        self.generator = None if seed is None else torch.Generator().manual_seed(choice_seed(seed, index))

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
        self.job.emit(Finished(self.index, reason, len(self.ids), list(self.ids), self.cached_tokens))


class Engine:
    """Owns the model: only the engine thread runs it."""

    def __init__(self, model, tokenizer, max_batch_rows: int = 32, stop_token_ids=None, prefix_cache_bytes: int = 256 * 2**20,
                 prefill_chunk: int = 0):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_rows = max_batch_rows
        # prompt positions per newcomer fed between two decoding steps while other rows run (0: the whole prompt at once)
        self.prefill_chunk = prefill_chunk
        self.stop_token_ids = tuple(stop_token_ids or default_stop_token_ids(model, tokenizer))
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self._waiting: list[Job] = []
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._rows: list[Choice] = []  # the running batch's rows (the engine thread replaces the list, never edits it)
        self._admitting = 0  # rows of jobs taken from the queue and not yet in `_rows`
        # prefill_tokens: prompt tokens computed; prefix_hit_tokens: prompt tokens taken from the prefix cache
        self.stats = {"requests": 0, "tokens": 0, "steps": 0, "batches": 0, "cancelled": 0, "max_rows": 0,
                      "prefill_tokens": 0, "prefix_hit_tokens": 0}

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
    def running_rows(self) -> int:
        """Rows being decoded or about to be: a row counts until it is done, so a client that has its answer
        never sees its row still counted."""
        return self._admitting + sum(not row.done for row in self._rows)

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

    def _take(self, room: int) -> list[Job]:
        """Waiting jobs, oldest first, while their rows fit `room` (the first that does not fit waits for room,
        so a large n never starves). Lock held."""
        taken = []
        for job in list(self._waiting):
            if job.cancelled:  # its client left before it got a row
                self._waiting.remove(job)
                self.stats["cancelled"] += job.request.n
                continue
            if job.request.n > room:
                break
            taken.append(job)
            room -= job.request.n
            self._waiting.remove(job)
        return taken

    def _loop(self) -> None:
        with torch.no_grad():
            self.model.eval()
            batch, rows = DecodeBatch(self.model, _pad_id(self.tokenizer), self.prefix_cache), []
            staging: tuple[Prefill, list[Choice]] | None = None  # newcomers being prefilled, a chunk per step
            while True:
                with self._cond:
                    while not self._waiting and not rows and staging is None and not self._stopping:
                        self._cond.wait()
                    if self._stopping:
                        break
                    jobs = [] if staging else self._take(self.max_batch_rows - len(rows))  # one group of newcomers at a time
                    self._admitting = sum(job.request.n for job in jobs) + (len(staging[1]) if staging else 0)
                try:
                    if jobs:
                        staging = self._begin(batch, jobs)
                    if staging:
                        # a chunk while others are decoding (their streams go on between chunks); the rest at once otherwise
                        batch.advance(staging[0], self.prefill_chunk if rows and self.prefill_chunk else None)
                        if staging[0].left == 0:
                            rows = self._drop_done(batch, self._finish(batch, rows, *staging))
                            staging = None
                    if rows:
                        self._feed(rows, batch.step().tolist())
                        rows = self._drop_done(batch, rows)
                except Exception as error:  # a failing batch must not take the server down with it
                    log.exception("the batch failed; its %d request(s) get the error", len(rows))
                    failed = jobs + [row.job for row in rows + (staging[1] if staging else []) if not row.done]
                    for job in {id(job): job for job in failed}.values():
                        job.emit(Failed(f"{type(error).__name__}: {error}"))
                    batch, rows, staging = DecodeBatch(self.model, _pad_id(self.tokenizer), self.prefix_cache), [], None
                self._rows, self._admitting = rows, len(staging[1]) if staging else 0
                self._sync_stats(batch)

    def _begin(self, batch: DecodeBatch, jobs: list[Job]) -> tuple[Prefill, list[Choice]]:
        """The jobs' rows and their prompts' prefill, not yet run."""
        new = [Choice(job, i, self.tokenizer) for job in jobs for i in range(job.request.n)]
        params = SamplingParams(temperature=[row.job.request.temperature for row in new], top_p=[row.job.request.top_p for row in new],
                                seed=[row.generator for row in new])
        return batch.begin([row.job.request.prompt_ids for row in new], RowSampling.build(params, len(new), batch.device)), new

    def _finish(self, batch: DecodeBatch, rows: list[Choice], prefill: Prefill, new: list[Choice]) -> list[Choice]:
        """Append the prefilled newcomers to the running batch and feed each its first token."""
        for row in new:
            row.cached_tokens = prefill.cached_tokens(row.job.request.prompt_ids)
        first = batch.finish(prefill)
        self.stats["batches"] += rows == []
        rows = rows + new
        self._rows, self._admitting = rows, 0  # visible before any of them can finish
        self.stats["max_rows"] = max(self.stats["max_rows"], len(rows))
        self._feed(new, first.tolist())
        return rows

    def _feed(self, rows: list[Choice], tokens: list[int]) -> None:
        stop = self.stop_token_ids
        for row, token in zip(rows, tokens):
            if row.done:
                continue
            if row.job.cancelled:
                row.done = True
                self.stats["cancelled"] += 1
                continue
            row.feed(token, token in stop)
            self.stats["tokens"] += 1

    def _drop_done(self, batch: DecodeBatch, rows: list[Choice]) -> list[Choice]:
        """Rows whose client left are dropped too; a finished row's prompt + reply goes to the prefix cache (the
        next turn of its conversation starts with it)."""
        for row in rows:
            if row.job.cancelled and not row.done:
                row.done = True
                self.stats["cancelled"] += 1
        keep = [i for i, row in enumerate(rows) if not row.done]
        if len(keep) == len(rows):
            return rows
        if self.prefix_cache is not None:
            for i, row in enumerate(rows):
                if row.done and row.ids:  # the KV covers the prompt and the reply tokens fed so far (not the last)
                    self.prefix_cache.store(row.prompt()[:-1], batch.row_kv(i))
        batch.keep(keep)
        return [rows[i] for i in keep]

    def _sync_stats(self, batch: DecodeBatch) -> None:
        for name in ("prefill_tokens", "prefix_hit_tokens", "steps"):
            self.stats[name] += batch.stats[name]
            batch.stats[name] = 0
