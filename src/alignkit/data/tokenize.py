"""Conversations -> token ids with a loss weight per token; truncation; packing.

A token's weight is the weight of *predicting* it: response (assistant) tokens 1, everything else
`prompt_loss_weight`, and the first token of every example 0 (nothing precedes it; with packing it
must not be predicted from the previous example).

Two ways to turn a conversation into text:
  chat template   the tokenizer's own template; assistant spans found by rendering prefixes
  separator       prompt + separator + completion + eos (for models without a chat template)
Each segment (prompt part, response part) is tokenized on its own, exactly as the prompt will be
tokenized at inference time, so training never sees a token merge across the boundary.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Formatting:
    use_chat_template: str = "auto"  # auto | yes | no
    separator: str = "\n\n### Response:\n"
    prompt_loss_weight: float = 0.0


def wants_chat_template(tokenizer, mode: str) -> bool:
    if mode == "yes" and not tokenizer.chat_template:
        raise ValueError("--use_chat_template yes, but the tokenizer has no chat template")
    return mode == "yes" or (mode == "auto" and bool(tokenizer.chat_template))


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def chat_segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """Split the rendered chat into (text, is_assistant) pieces by rendering growing prefixes."""
    full = _render(tokenizer, messages, add_generation_prompt=False)
    segments, cursor = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], add_generation_prompt=True))
        end = len(_render(tokenizer, messages[: i + 1], add_generation_prompt=False))
        prefix = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not full.startswith(prefix) or start > end:
            raise ValueError(
                "this chat template does not render conversations prefix-consistently, so assistant turns "
                "cannot be located; pass --use_chat_template no to use the separator format"
            )
        segments += [(full[cursor:start], False), (full[start:end], True)]
        cursor = end
    if cursor < len(full):
        segments.append((full[cursor:], False))
    return segments


def separator_segments(messages: list[dict], separator: str, eos_token: str | None = None) -> list[tuple[str, bool]]:
    """prompt + separator | completion (+ eos added by the caller); a system message prefixes the first prompt."""
    segments, system = [], ""
    for message in messages:
        if message["role"] == "system":
            system = message["content"] + "\n\n"
        elif message["role"] == "user":
            segments.append((system + message["content"] + separator, False))
            system = ""
        else:
            segments.append((message["content"], True))
    return segments


def prompt_text(tokenizer, messages: list[dict], fmt: Formatting) -> str:
    """The exact text a model sees before it answers the last user turn (as used in training)."""
    if wants_chat_template(tokenizer, fmt.use_chat_template):
        return _render(tokenizer, messages, add_generation_prompt=True)
    parts = separator_segments(messages, fmt.separator)
    eos = tokenizer.eos_token or ""
    return "".join(text + (eos if is_response else "") for text, is_response in parts)


def tokenize_example(example: dict, tokenizer, fmt: Formatting) -> tuple[list[int], list[float]]:
    """One validated example ({"text"} or {"messages"}) -> (input_ids, weights)."""
    eos_id = tokenizer.eos_token_id
    if "text" in example:
        ids = tokenizer(example["text"], add_special_tokens=True)["input_ids"]
        ids = ids + [eos_id] if eos_id is not None and (not ids or ids[-1] != eos_id) else ids
        weights = [1.0] * len(ids)
    else:
        chat = wants_chat_template(tokenizer, fmt.use_chat_template)
        segments = chat_segments(tokenizer, example["messages"]) if chat else separator_segments(example["messages"], fmt.separator)
        ids, weights = [], []
        for text, is_response in segments:
            piece = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            if is_response and not chat and eos_id is not None:
                piece = piece + [eos_id]  # the model must learn to stop
            ids += piece
            weights += [1.0 if is_response else fmt.prompt_loss_weight] * len(piece)
        if chat and eos_id is not None and eos_id not in _last_response_tokens(ids, weights):
            ids.append(eos_id)  # templates that end turns without the eos token still teach stopping
            weights.append(1.0)
    if weights:
        weights[0] = 0.0
    return ids, weights


def tokenize_reply(prompt: str, response: str, tokenizer, fmt: Formatting) -> list[int]:
    """input_ids of `response` answering `prompt` (the text `prompt_text` renders for the conversation so far), exactly
    as `tokenize_example` tokenizes that conversation with the response as its last assistant turn: the prompt and the
    closed assistant turn are separate segments (the template's end of turn, or the eos token in the separator format).
    What a reward model trained on such examples was trained and normalized on (RL scores through this)."""
    eos_id = tokenizer.eos_token_id
    chat = wants_chat_template(tokenizer, fmt.use_chat_template)
    if chat:  # the assistant turn as the template renders it after any conversation (a stand-in user turn here)
        user = [{"role": "user", "content": "x"}]
        turn = _render(tokenizer, user + [{"role": "assistant", "content": response}], False)[len(_render(tokenizer, user, True)):]
    else:
        turn = response
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    piece = tokenizer(turn, add_special_tokens=False)["input_ids"] if turn else []
    if eos_id is not None and (not chat or eos_id not in piece):
        piece = piece + [eos_id]
    return ids + piece


def _last_response_tokens(ids: list[int], weights: list[float]) -> list[int]:
    last = [i for i, w in enumerate(weights) if w == 1.0]
    return ids[last[-1] - 2 : last[-1] + 1] if last else []


@dataclass
class TokenizedSet:
    input_ids: list[list[int]] = field(default_factory=list)
    weights: list[list[float]] = field(default_factory=list)
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)

    def summary(self, name: str) -> str:
        parts = [f"{name}: {len(self.input_ids)} examples"]
        if self.truncated:
            parts.append(f"{self.truncated} truncated to --max_length")
        parts += [f"{n} dropped ({reason})" for reason, n in self.dropped.items()]
        return ", ".join(parts)


def tokenize_all(examples: list[dict], tokenizer, fmt: Formatting, max_length: int, truncation: str) -> TokenizedSet:
    """Tokenize every example; apply --truncation drop|left|right to those over max_length, counting each."""
    if truncation not in ("drop", "left", "right"):
        raise ValueError(f"--truncation must be drop, left or right, got {truncation!r}")
    out = TokenizedSet()
    for example in examples:
        ids, weights = tokenize_example(example, tokenizer, fmt)
        if len(ids) > max_length:
            if truncation == "drop":
                out.dropped[f"longer than --max_length {max_length}"] += 1
                continue
            out.truncated += 1
            keep = slice(len(ids) - max_length, None) if truncation == "left" else slice(0, max_length)
            ids, weights = ids[keep], weights[keep]
            weights[0] = 0.0
        if not any(w > 0 for w in weights):
            out.dropped["no tokens with loss weight left"] += 1
            continue
        out.input_ids.append(ids)
        out.weights.append(weights)
    return out


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: indices grouped into bins of total length <= capacity (O(n log n) lookups)."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), kept sorted so the tightest fit is a bisect away
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        size = lengths[index]
        position = bisect.bisect_left(free, (size, -1))
        if position == len(free):
            bins.append([index])
            room, number = capacity - size, len(bins) - 1
        else:
            room, number = free.pop(position)
            bins[number].append(index)
            room -= size
        bisect.insort(free, (room, number))
    return bins


def pad_right(rows: list[list[int]], pad_id: int):
    """Right-pad token rows into (input_ids [B, T], attention_mask [B, T]) tensors."""
    import torch

    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask
