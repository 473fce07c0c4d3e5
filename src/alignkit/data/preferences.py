"""Preference data for reward models and DPO: pairs and K-way rankings, validated and tokenized.

Row formats (any of them, per row):
  {"prompt", "chosen", "rejected"}          strings, or message lists (prompt: conversation so far;
                                             chosen/rejected: the assistant reply, string or [message])
  {"chosen", "rejected"}                    implicit prompt: two full conversations sharing a prefix
  {"prompt", "responses": [best, ..., worst]}            a ranking (InstructGPT's K-way comparisons)
  {"prompt", "responses": [...], "ranks": [1, 2, 2, 3]}  ranks, lower is better, ties allowed
Optional "margin" (number): how much better chosen is; the RM loss becomes -log σ(r_w - r_l - margin).

Every example becomes one prompt, K >= 2 responses and the pairs (better, worse) between them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations

from alignkit.data.formats import (DataError, InvalidRows, Row, _check_turns, _message_list, _string, detect_sft_format, read_rows,
                                   sft_example)
from alignkit.data.tokenize import Formatting, tokenize_example


@dataclass
class Preference:
    prompt: list[dict]  # messages, ending with a user turn
    responses: list[str]  # K candidate assistant replies
    pairs: list[tuple[int, int]]  # (better index, worse index)
    margin: float = 0.0


def _prompt_messages(row: Row) -> list[dict]:
    value = row.data.get("prompt")
    named = [("prompt", {"role": "user", "content": _string(row, "prompt")})] if not isinstance(value, list) else _message_list(value, row.where, "prompt")
    messages = _check_turns(named, row.where, need_final_assistant=False)
    if messages[-1]["role"] != "user":
        raise DataError(row.where, "the prompt must end with a user turn", field="prompt", reason="prompt not ending with user")
    return messages


def _reply(row: Row, name: str, value) -> str:
    """A reply given as a string or as a one-message assistant list."""
    if isinstance(value, list):
        named = _message_list(value, row.where, name)
        if len(named) != 1 or named[0][1]["role"] != "assistant":
            raise DataError(row.where, "must be one assistant message (or a string)", field=name, reason=f"bad '{name}'")
        return named[0][1]["content"]
    if not isinstance(value, str):
        raise DataError(row.where, f"must be a string or a message list, got {type(value).__name__}", field=name, reason=f"wrong type in '{name}'")
    if not value.strip():
        raise DataError(row.where, "is empty", field=name, reason="empty response")
    return value


def _implicit(row: Row) -> tuple[list[dict], str, str]:
    """Split two full conversations into their shared prompt and the two final replies."""
    chosen = _check_turns(_message_list(row.data.get("chosen"), row.where, "chosen"), row.where, True)
    rejected = _check_turns(_message_list(row.data.get("rejected"), row.where, "rejected"), row.where, True)
    if chosen[:-1] != rejected[:-1]:
        raise DataError(row.where, "chosen and rejected must share every message but the last (the implicit prompt)", field="rejected", reason="no shared prompt")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def _ranking_pairs(row: Row, count: int) -> list[tuple[int, int]]:
    ranks = row.data.get("ranks")
    if ranks is None:
        return list(combinations(range(count), 2))  # listed best first
    if not isinstance(ranks, list) or len(ranks) != count or not all(map(_is_number, ranks)):
        raise DataError(row.where, f"must be a list of {count} finite numbers (one rank per response, lower is better)", field="ranks", reason="bad 'ranks'")
    pairs = [(i, j) if ranks[i] < ranks[j] else (j, i) for i, j in combinations(range(count), 2) if ranks[i] != ranks[j]]
    if not pairs:
        raise DataError(row.where, "all responses tie: no comparison to learn from", field="ranks", reason="all ties")
    return pairs


def _is_number(value) -> bool:
    """A finite int or float (JSON's NaN, Infinity and 1e999 are not; neither is true/false)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < float("inf")


def _margin(row: Row) -> float:
    margin = row.data.get("margin")
    if margin is None:
        return 0.0
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        problem = f"must be a number, got {type(margin).__name__}"
    elif not abs(margin) <= 1e6:  # NaN, ±Infinity, 1e999, or an int too large for a float
        problem = "must be a finite number of at most 1e6 in size"
    else:
        return float(margin)
    raise DataError(row.where, f"{problem} (how much better chosen is)", field="margin", reason="bad 'margin'")


def preference_example(row: Row) -> Preference:
    data = row.data
    margin = _margin(row)
    if "responses" in data:
        responses = data["responses"]
        if not isinstance(responses, list) or len(responses) < 2:
            raise DataError(row.where, "must be a list of at least 2 responses, best first", field="responses", reason="bad 'responses'")
        replies = [_reply(row, f"responses[{i}]", r) for i, r in enumerate(responses)]
        return Preference(_prompt_messages(row), replies, _ranking_pairs(row, len(replies)), margin)
    for name in ("chosen", "rejected"):
        if data.get(name) is None:
            raise DataError(row.where, "missing", field=name, reason=f"missing field '{name}'")
    if "prompt" not in data:
        if not isinstance(data["chosen"], list):
            raise DataError(row.where, "missing: without a prompt, chosen and rejected must be full conversations", field="prompt", reason="missing field 'prompt'")
        prompt, chosen, rejected = _implicit(row)
    else:
        prompt, chosen, rejected = _prompt_messages(row), _reply(row, "chosen", data["chosen"]), _reply(row, "rejected", data["rejected"])
    return Preference(prompt, [chosen, rejected], [(0, 1)], margin)


def load_preferences(source: str, split: str = "train", invalid: InvalidRows | None = None) -> list[Preference]:
    invalid = invalid or InvalidRows()
    rows = read_rows(source, split, invalid)
    if not rows:
        raise DataError(source, "no rows found (empty file?)")
    examples = []
    for row in rows:
        try:
            examples.append(preference_example(row))
        except DataError as error:
            invalid.report(error)
    return examples


@dataclass
class TokenizedPreference:
    prompt_ids: list[int]
    response_ids: list[list[int]]  # each ends with the end-of-turn / eos token
    pairs: list[tuple[int, int]]
    margin: float = 0.0

    def sequence(self, k: int) -> list[int]:
        return self.prompt_ids + self.response_ids[k]


@dataclass
class TokenizedPreferences:
    examples: list[TokenizedPreference] = field(default_factory=list)
    truncated: int = 0
    dropped: int = 0


def tokenize_preference(example: Preference, tokenizer, fmt: Formatting) -> TokenizedPreference:
    """Prompt tokens once, then each response's tokens: exactly the split SFT training and inference use."""
    prompt_ids, responses = None, []
    for reply in example.responses:
        ids, weights = tokenize_example({"messages": example.prompt + [{"role": "assistant", "content": reply}]}, tokenizer, Formatting(fmt.use_chat_template, fmt.separator, 0.0))
        start = weights.index(1.0)
        prompt_ids = ids[:start] if prompt_ids is None else prompt_ids
        responses.append(ids[start:])
    return TokenizedPreference(prompt_ids, responses, list(example.pairs), example.margin)


def tokenize_preferences(examples: list[Preference], tokenizer, fmt: Formatting, max_length: int, truncation: str) -> TokenizedPreferences:
    """--truncation for pairs: drop the example, or cut the prompt from the left; a cut response would
    compare texts nobody wrote, so `right` cuts the prompt too and drops what still does not fit."""
    if truncation not in ("drop", "left", "right"):
        raise ValueError(f"--truncation must be drop, left or right, got {truncation!r}")
    out = TokenizedPreferences()
    for example in examples:
        tokenized = tokenize_preference(example, tokenizer, fmt)
        longest = max(len(r) for r in tokenized.response_ids)
        if len(tokenized.prompt_ids) + longest > max_length:
            room = max_length - longest
            if truncation == "drop" or room < 1:
                out.dropped += 1
                continue
            tokenized.prompt_ids = tokenized.prompt_ids[-room:]
            out.truncated += 1
        out.examples.append(tokenized)
    return out


@dataclass
class ScoringItem:
    row: dict  # the input row, echoed in the output
    sequences: list[list[int]]  # prompt + response token ids, one per response
    pairs: list[tuple[int, int]]  # (better, worse) for preference rows; empty for a single response


def read_for_scoring(source: str, split: str, tokenizer, fmt: Formatting, invalid: InvalidRows) -> list[ScoringItem]:
    """Preference rows (chosen/rejected or responses) or single responses (any SFT format), tokenized as `fmt`
    formats them: what `alignkit score` and reward normalization feed a reward model."""
    rows = read_rows(source, split, invalid)
    if not rows:
        raise DataError(source, "no rows found (empty file?)")
    preference = "chosen" in rows[0].data or "responses" in rows[0].data
    sft_format = None if preference else detect_sft_format(rows[0])
    items = []
    for row in rows:
        try:
            if preference:
                tokenized = tokenize_preference(preference_example(row), tokenizer, fmt)
                items.append(ScoringItem(row.data, [tokenized.sequence(k) for k in range(len(tokenized.response_ids))], tokenized.pairs))
            else:
                items.append(ScoringItem(row.data, [tokenize_example(sft_example(row, sft_format), tokenizer, fmt)[0]], []))
        except DataError as error:
            invalid.report(error)
    return items
