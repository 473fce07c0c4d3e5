"""Fit a dialogue [system?, u1, a1, u2, ..., a(N-1), uN] into a token budget.

The model sees the whole dialogue rendered as one prompt. When that prompt has more tokens than
`budget` (the context length minus the tokens reserved for the reply), the oldest part goes:

  truncate    drop the oldest whole turns (a turn = a user message and the assistant reply to it;
              never half a turn); the system message and the last user message always stay.
  summarize   replace the dropped turns by a summary written by a summarizer (the model itself, or
              a configured one), appended to the system message. The summary is built incrementally:
              summary(turns[:k]) = summarizer(summary(turns[:j]), turns[j:k]) for the longest prefix j
              already summarized, and cached per conversation, keyed by a hash chain over its turns
              (so a conversation that grows by a turn per request only pays for the newly dropped turns).

Token counts are exact: every candidate prompt is rendered (chat template or separator format, as at
inference) and tokenized.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from alignkit.data.tokenize import Formatting, prompt_text

STRATEGIES = ("truncate", "summarize")
SUMMARY_HEADER = "Summary of the earlier conversation:"

# summarizer(previous_summary, newly_dropped_messages, max_tokens) -> new summary text
Summarizer = Callable[[str, list[dict], int], str]


class PromptTooLong(ValueError):
    """Even the system message plus the last user turn do not fit the budget."""


@dataclass
class FittedPrompt:
    messages: list[dict]  # what the model sees
    prompt_ids: list[int]
    dropped_turns: int = 0  # whole turns removed from the front
    summary: str | None = None  # the summary standing in for them (summarize strategy)


def encode_messages(tokenizer, messages: list[dict], fmt: Formatting) -> list[int]:
    """The prompt's token ids exactly as generation sees them."""
    return tokenizer(prompt_text(tokenizer, messages, fmt), add_special_tokens=False)["input_ids"]


def split_turns(messages: list[dict]) -> tuple[dict | None, list[list[dict]]]:
    """(system message or None, turns): each turn a user message and its reply; the last turn is [uN]."""
    system = messages[0] if messages and messages[0]["role"] == "system" else None
    rest = messages[1:] if system else messages
    if not rest or rest[-1]["role"] != "user":
        raise ValueError("the conversation must end with a user message")
    return system, [rest[i : i + 2] for i in range(0, len(rest), 2)]


def with_summary(system: dict | None, summary: str) -> dict:
    """The system message carrying the summary (templates allow one system message, first)."""
    head = f"{system['content']}\n\n" if system and system["content"] else ""
    return {"role": "system", "content": f"{head}{SUMMARY_HEADER}\n{summary}"}


def _assemble(system: dict | None, turns: list[list[dict]]) -> list[dict]:
    return ([system] if system else []) + [message for turn in turns for message in turn]


def fit_history(
    messages: list[dict],
    tokenizer,
    fmt: Formatting,
    budget: int,
    strategy: str = "truncate",
    summarizer: Summarizer | None = None,
    cache: SummaryCache | None = None,
    summary_max_tokens: int = 128,
) -> FittedPrompt:
    """The longest suffix of whole turns (plus system message, plus summary) whose prompt has <= budget tokens."""
    if strategy not in STRATEGIES:
        raise ValueError(f"history strategy must be one of {STRATEGIES}, got {strategy!r}")
    system, turns = split_turns(messages)
    ids = encode_messages(tokenizer, messages, fmt)
    if len(ids) <= budget:
        return FittedPrompt(list(messages), ids)
    if strategy == "truncate":
        for k in range(1, len(turns)):
            ids = encode_messages(tokenizer, _assemble(system, turns[k:]), fmt)
            if len(ids) <= budget:
                return FittedPrompt(_assemble(system, turns[k:]), ids, dropped_turns=k)
    else:
        if summarizer is None:
            raise ValueError("the summarize strategy needs a summarizer")
        cache = cache if cache is not None else SummaryCache()
        keys = turn_keys(system, turns)
        empty_summary = with_summary(system, "")
        for k in range(1, len(turns)):
            # room for the summary: the prompt with an empty one plus summary_max_tokens must fit
            kept = turns[k:]
            if len(encode_messages(tokenizer, [empty_summary] + _assemble(None, kept), fmt)) + summary_max_tokens > budget:
                continue
            summary = summarize_prefix(turns, k, keys, summarizer, cache, tokenizer, summary_max_tokens)
            fitted = [with_summary(system, summary)] + _assemble(None, kept)
            ids = encode_messages(tokenizer, fitted, fmt)
            if len(ids) <= budget:  # a token merge at the summary's edges can add one; then drop one more turn
                return FittedPrompt(fitted, ids, dropped_turns=k, summary=summary)
    last = encode_messages(tokenizer, _assemble(system, turns[-1:]), fmt)
    raise PromptTooLong(
        f"the prompt needs {len(last)} tokens even with only the system message and the last user message "
        f"(budget {budget}: the context length minus max_tokens); shorten the message or ask for fewer max_tokens"
    )


# ------------------------------------------------------------------------------------------ summaries


def turn_keys(system: dict | None, turns: list[list[dict]]) -> list[str]:
    """keys[k] identifies the conversation prefix turns[:k] (with its system message): a hash chain."""
    digest = hashlib.sha256(json.dumps(system, sort_keys=True).encode()).hexdigest()
    keys = [digest]
    for turn in turns:
        digest = hashlib.sha256((digest + json.dumps(turn, sort_keys=True)).encode()).hexdigest()
        keys.append(digest)
    return keys


class SummaryCache:
    """Summaries of conversation prefixes, least recently used evicted first; thread-safe (server)."""

    def __init__(self, max_entries: int = 4096):
        self.max_entries = max_entries
        self._items: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> str | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            return None

    def put(self, key: str, summary: str) -> None:
        with self._lock:
            self._items[key] = summary
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


def summarize_prefix(turns, k, keys, summarizer: Summarizer, cache: SummaryCache, tokenizer, max_tokens: int) -> str:
    """summary(turns[:k]) from the longest cached prefix summary(turns[:j]), j <= k, plus turns[j:k]."""
    cached = cache.get(keys[k])
    if cached is not None:
        return cached
    j = next((j for j in range(k - 1, 0, -1) if cache.get(keys[j]) is not None), 0)
    previous = cache.get(keys[j]) if j else ""
    summary = summarizer(previous, _assemble(None, turns[j:k]), max_tokens).strip()
    ids = tokenizer(summary, add_special_tokens=False)["input_ids"]
    if len(ids) > max_tokens:  # a configured summarizer may ignore the limit
        summary = tokenizer.decode(ids[:max_tokens], skip_special_tokens=True).strip()
    cache.put(keys[k], summary)
    return summary


SUMMARY_INSTRUCTION = (
    "Summarize the conversation below in a few sentences. Keep the names, facts, numbers, requests and "
    "decisions the assistant will need to continue it. Write only the summary."
)


def transcript(messages: list[dict]) -> str:
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def summary_request(tokenizer, fmt: Formatting, previous: str, dropped: list[dict], max_prompt_tokens: int) -> list[int]:
    """The summarizer's prompt ids: instruction, the previous summary, the newly dropped turns.

    When the new turns alone overflow `max_prompt_tokens`, their oldest tokens are cut: the summary
    must fit the summarizer's context, and the previous summary already covers what came before.
    """
    def render(text: str) -> list[int]:
        parts = [SUMMARY_INSTRUCTION]
        if previous:
            parts.append(f"Summary so far:\n{previous}")
        parts.append(f"New messages:\n{text}")
        return encode_messages(tokenizer, [{"role": "user", "content": "\n\n".join(parts)}], fmt)

    text = transcript(dropped)
    ids = render(text)
    if len(ids) > max_prompt_tokens:
        text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        keep = max(len(text_ids) - (len(ids) - max_prompt_tokens) - 2, 1)  # -2: merges at the cut
        ids = render(tokenizer.decode(text_ids[-keep:], skip_special_tokens=True))
    return ids[-max_prompt_tokens:]


def model_summarizer(tokenizer, fmt: Formatting, complete: Callable[[list[int], int], str], context_length: int) -> Summarizer:
    """A summarizer that asks a model: `complete(prompt_ids, max_new_tokens)` returns its greedy reply."""

    def summarize(previous: str, dropped: list[dict], max_tokens: int) -> str:
        return complete(summary_request(tokenizer, fmt, previous, dropped, context_length - max_tokens), max_tokens)

    return summarize
