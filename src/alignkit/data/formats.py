"""Read rows from files and datasets; detect their format; validate them into conversations.

Every row keeps where it came from (`file:line`), so every error names the file, the line and the
field, and says what to do. Invalid rows stop the run unless `skip_invalid`, in which case they are
counted per reason and reported.

SFT formats (detected per file from the keys of its first row that fits one; in .csv, message lists are JSON):
  text               {"text"}                                   plain LM: loss on every token
  prompt_completion  {"prompt","completion"}                    strings or message lists
  alpaca             {"instruction","input"?,"output"}
  messages           {"messages":[{"role","content"},...]}      optional leading system message
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

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
    where: str  # "path:line" (jsonl, csv), "path item N" (json), "path row N" (parquet, datasets, hub, builtin)


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
    return [item for item in _read(source, split) if isinstance(item, Row) or invalid.report(item)]  # report: raise, or count


def _read(source: str, split: str) -> list[Row | DataError]:
    """Rows and unreadable rows, in file order (so the first bad row reported is the first in the file)."""
    if source.startswith(("builtin:", "builtin_pref:")):
        return _read_builtin(source, split)
    path = Path(source)
    suffix = path.suffix.lower()
    if path.is_dir():
        return _read_datasets_dir(path, split)
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    if suffix in readers:
        if not path.exists():
            raise FileNotFoundError(f"{source}: no such file")
        try:
            return list(readers[suffix](path))
        except UnicodeDecodeError as error:
            raise DataError(source, f"not UTF-8 text ({error.reason}); save it as UTF-8") from None
    if os.path.exists(source):
        raise DataError(source, f"unsupported file type {suffix!r}; use .jsonl, .json, .csv, .parquet or a datasets directory")
    return _read_hub(source, split)


def _read_builtin(source: str, split: str) -> list[Row]:
    """`builtin:TASK[,TASK...][:N]`: N rows per built-in task (default 500 train / 100 test);
    `builtin_pref:TASK[...][:N]`: preference pairs made from them."""
    from alignkit.data import tasks

    kind, _, spec = source.partition(":")
    names, _, count = spec.partition(":")
    if count and not count.isdigit():
        raise DataError(source, f"N must be a whole number, got {count!r}: use builtin:TASK[,TASK...][:N]")
    n = int(count) if count else (500 if split == "train" else 100)
    try:
        names = [name.strip() for name in names.split(",")]
        if kind == "builtin_pref":  # preference pairs: the right answer over a wrong one
            rows = [row for name in names for row in tasks.make_preferences(name, split, n, seed=0)]
        else:
            rows = tasks.make_mixture(names, split, n, seed=0)
    except ValueError as error:  # unknown task (lists the valid names), split or N too large
        raise DataError(source, str(error)) from None
    return [Row(r, f"{source} ({split}) row {i + 1}") for i, r in enumerate(rows)]


def _refuse_utf16(path: Path, head: bytes) -> None:
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):  # Windows editors' "Unicode": every line would be a bad row
        raise DataError(str(path), "is UTF-16 text; save it as UTF-8")


def _loads(text: str, where: str, whole_file: bool = False) -> Any:
    """json.loads, with every way a text fails to be one JSON value turned into a DataError naming `where`
    (and the line, for a whole file)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}:{error.lineno}" if whole_file else where,
                        f"malformed JSON ({error.msg} at column {error.colno})", reason="malformed JSON") from None
    except ValueError as error:  # an integer of more than 4300 digits (int_max_str_digits)
        raise DataError(where, f"malformed JSON ({error})", reason="malformed JSON") from None
    except RecursionError:
        raise DataError(where, "malformed JSON (lists or objects nested too deeply)", reason="malformed JSON") from None


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _lone_surrogate(value: Any, name: str = "") -> str | None:
    """The field holding a lone UTF-16 surrogate (JSON allows the escape "\\ud800"; no tokenizer or UTF-8 file takes it)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return name or "(value)"
    elif isinstance(value, dict):
        for key, item in value.items():
            found = _lone_surrogate(key, name or "(key)") or _lone_surrogate(item, f"{name}.{key}" if name else str(key))
            if found:
                return found
    elif isinstance(value, list):
        return next(filter(None, (_lone_surrogate(item, f"{name}[{i}]") for i, item in enumerate(value))), None)
    return None


def _json_row(data: Any, escaped: bool, where: str, kind: str = "a JSON object") -> Row | DataError:
    """`escaped`: its text has a surrogate escape (rare), so the row is searched for a lone one."""
    if not isinstance(data, dict):
        return DataError(where, f"expected {kind}, got {type(data).__name__}", reason="not a JSON object")
    found = escaped and _lone_surrogate(data)
    if found:
        return DataError(where, "holds a lone surrogate escape (\\ud800-\\udfff without its pair), which is not text",
                         field=found.encode("utf-8", "backslashreplace").decode(), reason="not Unicode text")
    return Row(data, where)


def _read_jsonl(path: Path) -> Iterator[Row | DataError]:
    with open(path, "rb") as handle:  # bytes, so that one line that is not UTF-8 is one bad row
        _refuse_utf16(path, handle.read(2))
        handle.seek(0)
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue  # a blank line holds no row, but counts: errors name physical lines
            where = f"{path}:{number}"
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                yield _json_row(_loads(text, where), bool(_SURROGATE_ESCAPE.search(text)), where)
            except UnicodeDecodeError as error:
                yield DataError(where, f"not UTF-8 text ({error.reason} at byte {error.start + 1})", reason="not UTF-8")
            except DataError as error:
                yield error


def _utf8_text(path: Path) -> str:
    """The whole file as text; a byte that is not UTF-8 is named by its line."""
    data = path.read_bytes()
    _refuse_utf16(path, data)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError(f"{path}:{line}", f"not UTF-8 text ({error.reason}); save it as UTF-8") from None


def _read_json(path: Path) -> Iterator[Row | DataError]:
    text = _utf8_text(path)
    try:
        data = _loads(text, str(path), whole_file=True)
    except DataError as error:
        error.args = (f"{error}; a .json file holds one list of objects, for one object per line use .jsonl",)
        raise
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(str(path), "a .json file must hold a list of objects (or {\"data\": [...]}); for one object per line use .jsonl")
    escaped = bool(_SURROGATE_ESCAPE.search(text))  # once: searching the whole text per item would be quadratic
    for i, item in enumerate(data):
        yield _json_row(item, escaped, f"{path} item {i + 1}", kind="an object")


def _cell(key: str, value: str | None) -> Any:
    """A CSV cell of messages/prompt/completion that holds a JSON list of messages -> that list."""
    if key in ("messages", "prompt", "completion") and re.match(r"\s*\[\s*\{", value or ""):
        try:
            return json.loads(value)
        except (ValueError, RecursionError):
            pass  # stays a string: reported as the wrong type where a list is needed
    return value


# a cell may hold a whole document; the csv module's default cap (128 KiB) would fail the file at it
csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))


def _read_csv(path: Path) -> Iterator[Row | DataError]:
    reader = csv.DictReader(io.StringIO(_utf8_text(path), newline=""))  # line_num counts physical lines; the header is line 1
    try:
        for record in reader:  # a quoted cell may span lines: name the line where the row starts
            start = reader.line_num - sum(v.count("\n") for v in record.values() if isinstance(v, str))
            where = f"{path}:{start}"
            if None in record:
                yield DataError(where, f"{len(record[None])} more value(s) than the header has columns", reason="malformed CSV row")
            else:
                cells = {key: _cell(key, value) for key, value in record.items()}
                escaped = any(_SURROGATE_ESCAPE.search(v) for v in record.values() if isinstance(v, str))
                yield _json_row(cells, escaped, where)
    except csv.Error as error:
        raise DataError(f"{path}:{reader.line_num}", f"malformed CSV ({error})") from None


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pyarrow.ArrowException, OSError) as error:
        raise DataError(str(path), f"not a readable Parquet file ({error})") from None
    return [Row(r, f"{path} row {i + 1}") for i, r in enumerate(table.to_pylist())]


def _read_datasets_dir(path: Path, split: str) -> list[Row]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(str(path), f"no split {split!r}; it has {list(loaded)}: pass --dataset_split")
        loaded = loaded[split]
    return [Row(r, f"{path} row {i + 1}") for i, r in enumerate(loaded)]


def _read_hub(dataset_id: str, split: str) -> list[Row]:
    """A hub data set, `ID` or `ID:CONFIG` (e.g. `nyu-mll/glue:sst2`; hub ids never contain a colon)."""
    import datasets

    from huggingface_hub import constants

    from alignkit.models import hub_unavailable

    name, _, config = dataset_id.partition(":")
    why = hub_unavailable()  # unreachable: read the local cache only, as HF_HUB_OFFLINE does, not ~40 s of retries
    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = saved[0] or why is not None
    try:
        loaded = datasets.load_dataset(name, config or None, split=split)
    except Exception as error:  # offline, unknown id, gated: all end here with the cause
        cause = f"; the hub cannot be used ({why})" if why else ""
        raise DataError(dataset_id, f"not a file or directory, and loading it from the hub failed: {error}{cause}") from None
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved
    return [Row(r, f"{dataset_id} ({split}) row {i + 1}") for i, r in enumerate(loaded)]


# ---------------------------------------------------------------------------------------------
# SFT formats


def _format_of(row: Row) -> str | None:
    keys = set(row.data)
    if "messages" in keys:
        return "messages"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    return "text" if "text" in keys else None


def detect_sft_format(row: Row) -> str:
    fmt = _format_of(row)
    if fmt:
        return fmt
    raise DataError(
        row.where,
        f"cannot tell the format from its fields {sorted(map(str, row.data))}; expected one of: "
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


def _message(message: Any, where: str, name: str) -> dict:
    if not isinstance(message, dict):
        raise DataError(where, f"must be a {{role, content}} object, got {type(message).__name__}", field=name, reason="bad message")
    for key in ("role", "content"):
        if message.get(key) is None:
            raise DataError(where, "missing", field=f"{name}.{key}", reason=f"message without '{key}'")
    role, content = message["role"], message["content"]
    if role not in ROLES:
        raise DataError(where, f"role {role!r} is not one of {ROLES}", field=f"{name}.role", reason="unknown role")
    if not isinstance(content, str):
        raise DataError(where, f"must be a string, got {type(content).__name__}", field=f"{name}.content", reason="wrong type in content")
    if role == "assistant" and not content.strip():
        raise DataError(where, "assistant message is empty", field=f"{name}.content", reason="empty response")
    return {"role": role, "content": content}


def _message_list(value: Any, where: str, field: str) -> list[tuple[str, dict]]:
    """(field name, clean message) for each message of a list."""
    if value is None:
        raise DataError(where, "missing", field=field, reason=f"missing field '{field}'")
    if not isinstance(value, list) or not value:
        got = "an empty list" if isinstance(value, list) else type(value).__name__
        raise DataError(where, f"must be a non-empty list of {{role, content}} objects, got {got}", field=field, reason=f"bad '{field}'")
    return [(f"{field}[{i}]", _message(m, where, f"{field}[{i}]")) for i, m in enumerate(value)]


def _check_turns(named: list[tuple[str, dict]], where: str, need_final_assistant: bool) -> list[dict]:
    """Optional system first, then user/assistant alternating, starting with user."""
    start = 1 if named[0][1]["role"] == "system" else 0
    for i, (name, message) in enumerate(named[start:]):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            rule = "a system message may only come first" if message["role"] == "system" else "turns alternate user, assistant, ..."
            got = f"role sequence makes no sense: expected {expected!r} here, got {message['role']!r} ({rule})"
            raise DataError(where, got, field=f"{name}.role", reason="bad role sequence")
    name, last = named[-1]
    if need_final_assistant and last["role"] != "assistant":
        message = f"the conversation ends with {last['role']!r}: it must end with an assistant message (nothing to learn otherwise)"
        raise DataError(where, message, field=f"{name}.role", reason="no final assistant turn")
    return [message for _, message in named]


def validate_messages(messages: Any, where: str, field: str = "messages", need_final_assistant: bool = True) -> list[dict]:
    """Check a chat: optional system first, then user/assistant alternating, starting with user."""
    return _check_turns(_message_list(messages, where, field), where, need_final_assistant)


def _part(row: Row, name: str, role: str) -> list[tuple[str, dict]]:
    """The prompt or completion of a conversational row as messages; a plain string is one message."""
    value = row.data.get(name)
    if isinstance(value, str):
        return [(name, {"role": role, "content": _string(row, name)})]
    if value is not None and not isinstance(value, list):
        raise DataError(row.where, f"must be a string or a list of {{role, content}} objects, got {type(value).__name__}",
                        field=name, reason=f"wrong type in '{name}'")
    return _message_list(value, row.where, name)


def sft_example(row: Row, fmt: str) -> dict:
    """Validate one row of format `fmt` -> {"text": str} or {"messages": [...]}."""
    data = row.data
    if fmt == "text":
        return {"text": _string(row, "text")}
    if fmt == "alpaca":
        instruction = _string(row, "instruction")
        extra = "" if data.get("input") is None else data["input"]
        if not isinstance(extra, str):
            raise DataError(row.where, f"must be a string, got {type(extra).__name__}", field="input", reason="wrong type in 'input'")
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": _string(row, "output")}]}
    if fmt == "prompt_completion":
        prompt, completion = data.get("prompt"), data.get("completion")
        if isinstance(prompt, list) or isinstance(completion, list):  # conversational (TRL): message lists
            return {"messages": _check_turns(_part(row, "prompt", "user") + _part(row, "completion", "assistant"), row.where, True)}
        return {"messages": [{"role": "user", "content": _string(row, "prompt")}, {"role": "assistant", "content": _string(row, "completion")}]}
    if fmt == "messages":
        return {"messages": validate_messages(data.get("messages"), row.where)}
    raise ValueError(f"unknown SFT format {fmt!r}")


def load_sft_examples(source: str, split: str = "train", invalid: InvalidRows | None = None) -> tuple[list[dict], str]:
    """Read, detect the format of, and validate an SFT data source -> (examples, format name)."""
    invalid = invalid or InvalidRows()
    items = _read(source, split)
    rows = [item for item in items if isinstance(item, Row)]
    if not rows:
        unreadable = len(items) - len(rows)
        raise DataError(source, f"no readable rows ({unreadable} unreadable, the first: {items[0]})" if items else "no rows found (empty file?)")
    # the first row whose fields fit a format decides the file's format; rows that do not fit it are invalid
    fmt = next(filter(None, map(_format_of, rows)), None) or detect_sft_format(rows[0])
    examples = []
    for item in items:
        try:
            if isinstance(item, DataError):
                raise item
            examples.append(sft_example(item, fmt))
        except DataError as error:
            invalid.report(error)
    return examples, fmt


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    """One JSON object per line, written to a temporary name and renamed: a failure leaves the old file intact."""
    from alignkit import atomic

    atomic.write_jsonl(path, rows)
