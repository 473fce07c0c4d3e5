"""Read rows from files and datasets; detect their format; validate them into conversations.

Every row keeps where it came from (`file:line`), so every error names the file, the line and the
field, and says what to do. Invalid rows stop the run unless `skip_invalid`, in which case they are
counted per reason and reported.

SFT formats (detected per file from the first row's keys):
  text               {"text"}                                   plain LM: loss on every token
  prompt_completion  {"prompt","completion"}                    strings or message lists
  alpaca             {"instruction","input"?,"output"}
  messages           {"messages":[{"role","content"},...]}      optional leading system message
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A bad row: says where (file:line), which field, what is wrong and what to do."""

    def __init__(self, where: str, message: str, field: str | None = None, reason: str | None = None):
        self.where, self.field, self.reason = where, field, reason or message
        location = f"{where}: field '{field}'" if field else where
        super().__init__(f"{location}: {message}")


@dataclass
class Row:
    data: dict
    where: str  # "path:line" (jsonl, csv), "path item N" (json), "path row N" (parquet, datasets)


@dataclass
class InvalidRows:
    """Collects skipped rows when skip_invalid is on; raises at the first one otherwise."""

    skip: bool = False
    counts: Counter = field(default_factory=Counter)
    first_example: dict = field(default_factory=dict)

    def report(self, error: DataError) -> None:
        if not self.skip:
            error.args = (f"{error} (to skip such rows and count them instead, pass --skip_invalid)",)
            raise error
        self.counts[error.reason] += 1
        self.first_example.setdefault(error.reason, str(error))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        lines = [f"skipped {self.total} invalid row(s):"]
        lines += [f"  {n} x {reason}  (e.g. {self.first_example[reason]})" for reason, n in self.counts.most_common()]
        return "\n".join(lines)


def read_rows(source: str, split: str = "train", invalid: InvalidRows | None = None) -> list[Row]:
    """Rows of a .jsonl/.json/.csv/.parquet file, a saved `datasets` directory, or a hub dataset id."""
    invalid = invalid or InvalidRows()
    if source.startswith("builtin:"):
        return _read_builtin(source, split)
    path = Path(source)
    suffix = path.suffix.lower()
    if path.is_dir():
        return _read_datasets_dir(path, split)
    if suffix in (".jsonl", ".json", ".csv", ".parquet") and not path.exists():
        raise FileNotFoundError(f"{source}: no such file")
    if suffix == ".jsonl":
        return _read_jsonl(path, invalid)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            # DictReader's line_num counts physical lines; the header is line 1
            reader = csv.DictReader(handle)
            return [Row(dict(r), f"{source}:{reader.line_num}") for r in reader]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return [Row(r, f"{source} row {i + 1}") for i, r in enumerate(pq.read_table(path).to_pylist())]
    if os.path.exists(source):
        raise DataError(source, f"unsupported file type {suffix!r}; use .jsonl, .json, .csv, .parquet or a datasets directory")
    return _read_hub(source, split)


def _read_builtin(source: str, split: str) -> list[Row]:
    """`builtin:TASK[,TASK...][:N]`: N rows per built-in task (default 500 train / 100 test)."""
    from alignkit.data import tasks

    spec = source[len("builtin:"):]
    names, _, count = spec.partition(":")
    n = int(count) if count else (500 if split == "train" else 100)
    rows = tasks.make_mixture([name.strip() for name in names.split(",")], split, n, seed=0)
    return [Row(r, f"{source}[{split}] row {i + 1}") for i, r in enumerate(rows)]


def _read_jsonl(path: Path, invalid: InvalidRows) -> list[Row]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                data = json.loads(line)
            except json.JSONDecodeError as error:
                invalid.report(DataError(where, f"malformed JSON ({error.msg} at column {error.colno})", reason="malformed JSON"))
                continue
            if not isinstance(data, dict):
                invalid.report(DataError(where, f"expected a JSON object, got {type(data).__name__}", reason="not a JSON object"))
                continue
            rows.append(Row(data, where))
    return rows


def _read_json(path: Path) -> list[Row]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}", f"malformed JSON ({error.msg}); a .json file holds one list of objects") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(str(path), "a .json file must hold a list of objects (or {\"data\": [...]}); for one object per line use .jsonl")
    rows = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise DataError(f"{path} item {i + 1}", f"expected an object, got {type(item).__name__}")
        rows.append(Row(item, f"{path} item {i + 1}"))
    return rows


def _read_datasets_dir(path: Path, split: str) -> list[Row]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(str(path), f"no split {split!r}; it has {list(loaded)}: pass --dataset_split")
        loaded = loaded[split]
    return [Row(r, f"{path} row {i + 1}") for i, r in enumerate(loaded)]


def _read_hub(dataset_id: str, split: str) -> list[Row]:
    import datasets

    try:
        loaded = datasets.load_dataset(dataset_id, split=split)
    except Exception as error:  # offline, unknown id, gated: all end here with the cause
        raise DataError(dataset_id, f"not a file or directory, and loading it from the hub failed: {error}") from None
    return [Row(r, f"{dataset_id}[{split}] row {i + 1}") for i, r in enumerate(loaded)]


# ---------------------------------------------------------------------------------------------
# SFT formats


def detect_sft_format(row: Row) -> str:
    keys = set(row.data)
    if "messages" in keys:
        return "messages"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    raise DataError(
        row.where,
        f"cannot tell the format from its fields {sorted(keys)}; expected one of: "
        '{"text"}, {"prompt","completion"}, {"instruction","input","output"}, {"messages":[...]}',
        reason="unknown format",
    )


def _string(row: Row, name: str, allow_empty: bool = False) -> str:
    if name not in row.data or row.data[name] is None:
        raise DataError(row.where, "missing", field=name, reason=f"missing field '{name}'")
    value = row.data[name]
    if not isinstance(value, str):
        raise DataError(row.where, f"must be a string, got {type(value).__name__}", field=name, reason=f"wrong type in '{name}'")
    if not allow_empty and not value.strip():
        raise DataError(row.where, "is empty", field=name, reason=f"empty '{name}'")
    return value


def validate_messages(messages: Any, where: str, field: str = "messages", need_final_assistant: bool = True) -> list[dict]:
    """Check a chat: optional system first, then user/assistant alternating, starting with user."""
    if not isinstance(messages, list) or not messages:
        raise DataError(where, "must be a non-empty list of {role, content} objects", field=field, reason=f"bad '{field}'")
    clean = []
    for i, message in enumerate(messages):
        name = f"{field}[{i}]"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(where, "must be an object with 'role' and 'content'", field=name, reason="bad message")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise DataError(where, f"role {role!r} is not one of {ROLES}", field=f"{name}.role", reason="unknown role")
        if not isinstance(content, str):
            raise DataError(where, f"content must be a string, got {type(content).__name__}", field=f"{name}.content", reason="wrong type in content")
        if role == "assistant" and not content.strip():
            raise DataError(where, "assistant message is empty", field=f"{name}.content", reason="empty response")
        clean.append({"role": role, "content": content})
    turns = clean[1:] if clean[0]["role"] == "system" else clean
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            index = i + (len(clean) - len(turns))
            raise DataError(
                where,
                f"role sequence makes no sense: expected {expected!r} here, got {message['role']!r} "
                "(after an optional system message, turns alternate user, assistant, user, ...)",
                field=f"{field}[{index}].role",
                reason="bad role sequence",
            )
    if need_final_assistant and (not turns or turns[-1]["role"] != "assistant"):
        raise DataError(where, "the conversation must end with an assistant message (nothing to learn otherwise)", field=field, reason="no final assistant turn")
    return clean


def sft_example(row: Row, fmt: str) -> dict:
    """Validate one row of format `fmt` -> {"text": str} or {"messages": [...]}."""
    data = row.data
    if fmt == "text":
        return {"text": _string(row, "text")}
    if fmt == "alpaca":
        instruction = _string(row, "instruction")
        extra = data.get("input") or ""
        if not isinstance(extra, str):
            raise DataError(row.where, f"must be a string, got {type(extra).__name__}", field="input", reason="wrong type in 'input'")
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": _string(row, "output")}]}
    if fmt == "prompt_completion":
        prompt, completion = data.get("prompt"), data.get("completion")
        if isinstance(prompt, list) or isinstance(completion, list):  # conversational prompt-completion
            prompt_msgs = validate_messages(prompt, row.where, "prompt", need_final_assistant=False)
            completion_msgs = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
            return {"messages": validate_messages(prompt_msgs + completion_msgs, row.where, "completion")}
        return {"messages": [{"role": "user", "content": _string(row, "prompt")}, {"role": "assistant", "content": _string(row, "completion")}]}
    if fmt == "messages":
        return {"messages": validate_messages(data.get("messages"), row.where)}
    raise ValueError(f"unknown SFT format {fmt!r}")


def load_sft_examples(source: str, split: str = "train", invalid: InvalidRows | None = None) -> tuple[list[dict], str]:
    """Read, detect the format of, and validate an SFT data source -> (examples, format name)."""
    invalid = invalid or InvalidRows()
    rows = read_rows(source, split, invalid)
    if not rows:
        raise DataError(source, "no rows found (empty file?)")
    fmt = detect_sft_format(rows[0])
    examples = []
    for row in rows:
        try:
            examples.append(sft_example(row, fmt))
        except DataError as error:
            invalid.report(error)
    return examples, fmt


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
