"""Prompt-only data for RL: the prompts PPO/RLOO/GRPO sample responses to.

Rows are {"prompt": text or messages}, {"messages"} ending with a user turn, raw {"text"}, or any SFT
format, whose final assistant turn is kept as a `completion` column (for rewards such as exact match).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from alignkit.data.formats import DataError, InvalidRows, _format_of, read_rows, sft_example, validate_messages
from alignkit.data.tokenize import Formatting, prompt_text

logger = logging.getLogger(__name__)


@dataclass
class PromptExample:
    ids: list[int]
    columns: dict = field(default_factory=dict)  # the row's other fields, handed to reward functions


def _prompt_messages(row) -> tuple[list[dict] | None, str | None, str | None]:
    """(messages ending with a user turn, or None for raw text; raw text; reference completion)."""
    data = row.data
    if "messages" in data:
        messages = validate_messages(data["messages"], row.where, need_final_assistant=False)
        if messages[-1]["role"] == "assistant":
            return _ending_with_user(messages[:-1], row, "messages"), None, messages[-1]["content"]
        return _ending_with_user(messages, row, "messages"), None, None
    if "prompt" in data and "completion" not in data:
        if isinstance(data["prompt"], list):
            return _ending_with_user(validate_messages(data["prompt"], row.where, "prompt", need_final_assistant=False), row, "prompt"), None, None
        if not isinstance(data["prompt"], str) or not data["prompt"].strip():
            raise DataError(row.where, "must be a non-empty string or a list of messages", field="prompt", reason="bad 'prompt'")
        return [{"role": "user", "content": data["prompt"]}], None, None
    fmt = _format_of(row)
    if fmt is None or fmt == "text":
        if "text" in data and isinstance(data["text"], str) and data["text"].strip():
            return None, data["text"], None
        raise DataError(row.where, f"no prompt in fields {sorted(data)}: expected {{'prompt'}} or {{'messages'}}", reason="no prompt")
    messages = sft_example(row, fmt)["messages"]
    return messages[:-1], None, messages[-1]["content"]


def _ending_with_user(messages: list[dict], row, field: str) -> list[dict]:
    """A prompt must end with a user turn (a system message alone gives the model nothing to answer)."""
    if not messages or messages[-1]["role"] != "user":
        raise DataError(row.where, "holds no user turn to answer (a prompt ends with a user message)", field=field, reason="no user turn")
    return messages


def load_prompts(source: str, split: str, tokenizer, fmt: Formatting | None = None, max_prompt_length: int = 512,
                 skip_invalid: bool = False, verbose: bool = True, counts: dict | None = None) -> list[PromptExample]:
    """Prompt-only rows ({"prompt"}, {"messages"} ending with a user turn) or any SFT format (the final
    assistant turn becomes the `completion` column), formatted as `fmt` says (default: `Formatting()`).
    Prompts over `max_prompt_length` tokens (--max_prompt_length) are dropped; with `skip_invalid`
    (--skip_invalid) invalid rows are counted and skipped instead of stopping.
    `counts`, when given, receives how many rows were kept, skipped as invalid and dropped as too long."""
    invalid = InvalidRows(skip=skip_invalid)
    fmt = fmt or Formatting()
    examples, too_long = [], 0
    for row in read_rows(source, split, invalid):
        try:
            messages, raw, completion = _prompt_messages(row)
        except DataError as error:
            invalid.report(error)
            continue
        text = raw if messages is None else prompt_text(tokenizer, messages, fmt)
        ids = tokenizer(text, add_special_tokens=messages is None)["input_ids"]
        if len(ids) > max_prompt_length or not ids:
            too_long += 1
            continue
        columns = {k: v for k, v in row.data.items() if k not in ("prompt", "messages")}
        if completion is not None:
            columns["completion"] = completion
        examples.append(PromptExample(ids, columns))
    if verbose:
        logger.info(f"prompts ({source}): {len(examples)} kept, {too_long} over --max_prompt_length {max_prompt_length} dropped")
    if invalid.total and verbose:
        logger.info(invalid.summary())
    if counts is not None:
        counts.update(kept=len(examples), skipped=invalid.total, too_long=too_long)
    if not examples:
        raise DataError(source, f"no usable prompts ({invalid.total} invalid, {too_long} over --max_prompt_length {max_prompt_length})")
    return examples
