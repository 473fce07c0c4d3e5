"""Text generators for synthetic data: a local model, or any OpenAI-compatible HTTP endpoint.

Both take a batch of prompts and return one `Completion` per prompt, cut at the first stop string, with
`finished` telling whether the text ended on its own (a stop string or end-of-sequence) rather than at the
token limit: a caller parsing a numbered list drops the last item of an unfinished completion.

HTTP (vLLM, `alignkit serve`, a hosted API): `mode="chat"` posts each prompt as one user message to
`{api_base}/chat/completions`, `mode="completions"` posts it raw to `{api_base}/completions`. At most
`max_concurrency` requests are in flight; a request that times out, cannot connect, or gets 429/5xx is
retried up to `max_retries` times with exponential backoff (`Retry-After` honored, capped at 30 s). Other
4xx answers are the caller's mistake (model name, key) and fail at once.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class Completion:
    text: str
    finished: bool  # ended on a stop string / end-of-sequence, not on max_tokens


class Generator(Protocol):
    chat: bool  # prompts go in as a user turn (the model answers instead of continuing the text)

    def complete(
        self, prompts: list[str], max_tokens: int, temperature: float, top_p: float = 1.0,
        stop: tuple[str, ...] = (), seed: int | None = None,
    ) -> list[Completion]: ...


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """The text before the earliest stop string, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


class _AllStopped(Exception):
    """Raised from the streaming callback to end a batch once every row has written a stop string."""


@dataclass
class LocalGenerator:
    """A model loaded in this process (HF dir, hub id or a built-in name), sampled in batches.

    Stop strings end a row as they would on a server: the streaming callback of `alignkit.generation.generate`
    watches the decoded text and ends the batch once every row has stopped, instead of sampling all rows to
    `max_tokens` (most of the time of a long Self-Instruct run on a CPU, otherwise).
    """

    model_name_or_path: str
    batch_size: int = 8
    use_chat_template: str = "no"  # "no": the prompt is continued as raw text, which suits Self-Instruct's list prompts
    check_every: int = 8  # decode and look for stop strings every this many tokens
    chat: bool = field(init=False)

    def __post_init__(self):
        from alignkit.data.tokenize import wants_chat_template
        from alignkit.models import load_causal_lm, load_tokenizer

        self.tokenizer = load_tokenizer(self.model_name_or_path)
        self.model = load_causal_lm(self.model_name_or_path)
        self.chat = wants_chat_template(self.tokenizer, self.use_chat_template)

    def complete(self, prompts, max_tokens, temperature, top_p=1.0, stop=(), seed=None) -> list[Completion]:
        from alignkit.data.tokenize import Formatting, prompt_text

        fmt = Formatting(use_chat_template="yes" if self.chat else "no")
        texts = [prompt_text(self.tokenizer, [{"role": "user", "content": p}], fmt) if self.chat else p for p in prompts]
        encoded = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]), reverse=True)  # less padding per batch
        results: list[Completion | None] = [None] * len(prompts)
        for batch_index, start in enumerate(range(0, len(order), self.batch_size)):
            chunk = order[start : start + self.batch_size]
            batch_seed = None if seed is None else seed + batch_index
            for i, completion in zip(chunk, self._batch([encoded[i] for i in chunk], max_tokens, temperature, top_p, stop, batch_seed)):
                results[i] = completion
        return results

    def _batch(self, prompt_ids, max_tokens, temperature, top_p, stop, seed) -> list[Completion]:
        from alignkit.generation import SamplingParams, generate

        rows = len(prompt_ids)
        tokens: list[list[int]] = [[] for _ in range(rows)]
        ended = [False] * rows  # end-of-sequence sampled
        stopped = [False] * rows  # a stop string written

        def on_token(step, token_ids, finished):
            for row, token in enumerate(token_ids.tolist()):
                if not ended[row] and not stopped[row]:
                    tokens[row].append(token)
            for row, done in enumerate(finished.tolist()):
                ended[row] = ended[row] or done
            if stop and (step + 1) % self.check_every == 0:
                for row in range(rows):
                    stopped[row] = stopped[row] or cut_at_stop(self._decode(tokens[row]), stop)[1]
            if all(e or s for e, s in zip(ended, stopped)):
                raise _AllStopped

        params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
        try:
            generate(self.model, self.tokenizer, prompt_ids, params, on_token=on_token)
        except _AllStopped:
            pass
        completions = []
        for row in range(rows):
            text, found = cut_at_stop(self._decode(tokens[row]), stop)
            completions.append(Completion(text, found or ended[row]))
        return completions

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class RequestFailed(RuntimeError):
    pass


@dataclass
class OpenAIGenerator:
    """Any OpenAI-compatible endpoint; `api_base` includes the version, e.g. http://127.0.0.1:8000/v1."""

    api_base: str
    model: str
    api_key: str | None = None
    mode: str = "chat"  # chat | completions
    max_concurrency: int = 8
    max_retries: int = 3
    timeout: float = 60.0  # seconds per request attempt
    backoff: float = 1.0  # first retry waits this long, then 2x, 4x, ... (plus up to 10% jitter)
    stats: Counter = field(default_factory=Counter)  # requests, retries, timeouts, server_errors

    def __post_init__(self):
        if self.mode not in ("chat", "completions"):
            raise ValueError(f"--api_mode must be 'chat' or 'completions', not {self.mode!r}")
        if not self.api_base.startswith(("http://", "https://")):
            raise ValueError(f"--api_base must be an http(s) URL such as http://127.0.0.1:8000/v1, not {self.api_base!r}")
        if self.max_concurrency < 1:
            raise ValueError("--max_concurrency must be at least 1")

    @property
    def chat(self) -> bool:
        return self.mode == "chat"

    def complete(self, prompts, max_tokens, temperature, top_p=1.0, stop=(), seed=None) -> list[Completion]:
        if not prompts:
            return []
        return asyncio.run(self._complete_all(prompts, max_tokens, temperature, top_p, tuple(stop), seed))

    async def _complete_all(self, prompts, max_tokens, temperature, top_p, stop, seed) -> list[Completion]:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        limits = httpx.Limits(max_connections=self.max_concurrency)
        semaphore = asyncio.Semaphore(self.max_concurrency)
        async with httpx.AsyncClient(headers=headers, timeout=self.timeout, limits=limits) as client:
            jobs = []
            for i, prompt in enumerate(prompts):
                body = self._body(prompt, max_tokens, temperature, top_p, stop, None if seed is None else seed + i)
                jobs.append(self._request(client, semaphore, body))
            results = await asyncio.gather(*jobs)
        completions = []
        for text, finished in results:
            cut, stopped = cut_at_stop(text, stop)  # the server may not know every stop string (or may ignore them)
            completions.append(Completion(cut, finished or stopped))
        return completions

    def _body(self, prompt, max_tokens, temperature, top_p, stop, seed) -> dict:
        body = {"model": self.model, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p}
        if stop:
            body["stop"] = list(stop[:4])  # the API takes at most 4; the rest are applied on our side
        if seed is not None:
            body["seed"] = seed
        if self.chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        return body

    @property
    def url(self) -> str:
        return self.api_base.rstrip("/") + ("/chat/completions" if self.chat else "/completions")

    async def _request(self, client, semaphore, body) -> tuple[str, bool]:
        import httpx

        last_error = ""
        for attempt in range(self.max_retries + 1):
            wait = self.backoff * 2**attempt * (1 + 0.1 * random.random())
            async with semaphore:  # held only while the request is in flight, not while backing off
                self.stats["requests"] += 1
                try:
                    response = await client.post(self.url, json=body)
                except httpx.TimeoutException:
                    self.stats["timeouts"] += 1
                    last_error = f"no answer within --request_timeout {self.timeout:g} s"
                    response = None
                except httpx.TransportError as error:
                    self.stats["connection_errors"] += 1
                    last_error = f"cannot connect ({type(error).__name__}: {error})"
                    response = None
            if response is not None:
                if response.status_code == 200:
                    return self._parse(response)
                last_error = f"HTTP {response.status_code}: {response.text[:300]}"
                if response.status_code != 429 and response.status_code < 500:
                    raise RequestFailed(f"{self.url} answered {last_error} (check --model and --api_key)")
                self.stats["server_errors"] += 1
                wait = max(wait, _retry_after(response))
            if attempt < self.max_retries:
                self.stats["retries"] += 1
                await asyncio.sleep(wait)
        raise RequestFailed(f"{self.url}: gave up after {self.max_retries + 1} attempts; last: {last_error}")

    def _parse(self, response) -> tuple[str, bool]:
        try:
            choice = response.json()["choices"][0]
            text = choice["message"]["content"] if self.chat else choice["text"]
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise RequestFailed(
                f"{self.url} answered 200 but not in the OpenAI format (choices[0].{'message.content' if self.chat else 'text'} "
                f"missing: {error!r}); is --api_mode right?"
            ) from None
        return text or "", choice.get("finish_reason") != "length"


def _retry_after(response) -> float:
    try:
        return min(float(response.headers.get("retry-after", 0)), 30.0)
    except ValueError:
        return 0.0
