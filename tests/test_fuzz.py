"""Property-based fuzzing (hypothesis) of every reader of user data and of the server's request parser.

Loaders: random and malformed rows (wrong types, nesting where strings belong, missing and extra fields),
malformed lines (truncated JSON, invalid UTF-8, NUL bytes, a BOM, lone surrogates, huge numbers, deep
nesting, empty and huge lines), whole files in UTF-16, JSON arrays vs JSONL, ragged CSV. The property:
the loader returns rows with every input row accounted for (kept + skipped-and-counted == rows in the
file), or raises DataError (which the CLI prints as `error: file:line: field ...`, exit 2) naming the
file; never any other exception. Where the rows are built to be valid or invalid on purpose, the oracle
is exact: kept == the valid rows, and without --skip_invalid the error names the first invalid line.

Server: random and mutated JSON bodies for /v1/chat/completions, /api/feedback and /api/demonstrations get 200 or a 4xx with
an OpenAI-style JSON error naming the field, never a 500.

Settings are derandomized (the same cases on every machine) and bounded; docs/reliability.md has counts.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from alignkit.data.formats import DataError, InvalidRows, load_sft_examples

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
FEW = settings(FUZZ, max_examples=60)

# ------------------------------------------------------------------------------------------ strategies

ROLES = ["system", "user", "assistant"]
FIELDS = ["text", "prompt", "completion", "instruction", "input", "output", "messages", "chosen", "rejected",
          "responses", "ranks", "margin", "instances", "is_classification", "sentence", "label", "id"]

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                           max_leaves=8)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(ROLES + ["tool", ""]) | json_values},
                                          optional={"content": st.text(max_size=12) | json_values}), max_size=4)
good_messages = st.lists(st.tuples(st.text(min_size=1, max_size=8).filter(str.strip), st.text(min_size=1, max_size=8).filter(str.strip)),
                         min_size=1, max_size=2).map(lambda turns: [m for u, a in turns for m in ({"role": "user", "content": u},
                                                                                                    {"role": "assistant", "content": a})])
field_values = st.integers(0, 1).flatmap(lambda i: (st.text(max_size=12) | good_messages) if i else (json_values | messages))
rows = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), field_values, max_size=5)


def _line(row: dict, ensure_ascii: bool) -> bytes:
    return json.dumps(row, ensure_ascii=ensure_ascii).encode("utf-8")


def _insert(line: bytes, at: int, junk: bytes) -> bytes:
    return line[:at] + junk + line[at:]


# one physical line of a .jsonl file: a row, or one of the ways a line goes wrong
malformed_lines = st.one_of(
    st.builds(_line, rows, st.booleans()),
    st.builds(lambda row, cut: _line(row, False)[: max(1, cut)], rows, st.integers(0, 40)),  # truncated JSON
    st.builds(lambda row, at: _insert(_line(row, False), at, b"\xff\xfe"), rows, st.integers(0, 20)),  # invalid UTF-8
    st.builds(lambda row, at: _insert(_line(row, False), at, b"\x00"), rows, st.integers(0, 20)),  # a NUL byte
    st.builds(lambda row: b"\xef\xbb\xbf" + _line(row, False), rows),  # a BOM (only allowed at the start of a file)
    st.sampled_from([
        b'{"text": "\\ud800 lone surrogate"}', b'{"prompt": "x", "completion": "\\udfff"}', b'{"\\ud83d": "key"}',
        b'{"text": ' + b"1" * 5000 + b"}", b"[" * 5000 + b"]" * 5000, b'{"text": ' + b"[" * 3000 + b"]" * 3000 + b"}",
        b"[1, 2]", b'"just a string"', b"null", b"NaN", b'{"margin": NaN, "text": "x"}', b'{"margin": 1e999, "text": "y"}',
        b'{"text": "a"} {"text": "b"}', b"\x00\x00\x00", b"{}",
    ]),
    st.binary(max_size=30),
)
blank_lines = st.sampled_from([b"", b"   ", b"\t", b"\r"])


def huge_line(n: int) -> bytes:
    return json.dumps({"text": "word " * n, "prompt": "p" * n, "completion": "c", "chosen": "a", "rejected": "b"}).encode()


jsonl_files = st.lists(malformed_lines | blank_lines | st.integers(20_000, 60_000).map(huge_line), max_size=8)


def encode_file(lines: list[bytes], ending: bytes, utf16: bool) -> bytes:
    data = ending.join(lines) + (ending if lines else b"")
    if utf16:  # the whole file as UTF-16 (what some Windows editors save): lines of it are not UTF-8
        data = data.decode("utf-8", errors="replace").encode("utf-16")
    return data


def nonblank_lines(data: bytes) -> int:
    return sum(1 for line in data.split(b"\n") if line.strip())


# ------------------------------------------------------------------------------------------ the property


def check(load, path: Path, total: int | None, skip: bool):
    """Run a loader: rows with every row accounted for, or a DataError naming the file. Returns its rows or None."""
    invalid = InvalidRows(skip=skip)
    try:
        kept = load(str(path), invalid)
    except DataError as error:
        message = str(error)
        assert message.startswith((str(path), path.name)), message
        assert "Traceback" not in message
        line = re.match(re.escape(str(path)) + r":(\d+)", message)
        if line and total is not None:
            assert 1 <= int(line.group(1)) <= max(1, path.read_bytes().count(b"\n") + 1), message
        return None
    if not skip:
        assert invalid.total == 0
    if total is not None:
        assert len(kept) + invalid.total == total, (len(kept), dict(invalid.counts), total)
    return kept


def sft(path, invalid):
    return load_sft_examples(path, "train", invalid)[0]


def preferences(path, invalid):
    from alignkit.data.preferences import load_preferences

    return load_preferences(path, "train", invalid)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.parametrize("loader", [sft, preferences], ids=["sft", "preferences"])
@FUZZ
@given(lines=jsonl_files, ending=st.sampled_from([b"\n", b"\r\n"]), utf16=st.booleans() | st.just(False), skip=st.booleans())
def test_jsonl_loaders_account_for_every_line(workdir, loader, lines, ending, utf16, skip):
    path = workdir / "data.jsonl"
    data = encode_file(lines, ending, utf16)
    path.write_bytes(data)
    check(loader, path, None if utf16 else nonblank_lines(data), skip)


@pytest.mark.parametrize("loader", [sft, preferences], ids=["sft", "preferences"])
@FEW
@given(items=st.lists(rows | json_values, max_size=6), wrap=st.sampled_from(["list", "data", "bare", "bom", "broken", "jsonl"]), skip=st.booleans())
def test_json_array_files(workdir, loader, items, wrap, skip):
    """.json: a list, {"data": [...]}, a bare object, a BOM, cut in half, or JSONL saved as .json."""
    path = workdir / "data.json"
    body = {"list": items, "data": {"data": items}, "bare": items[0] if items else {}}.get(wrap, items)
    text = "\n".join(json.dumps(item) for item in items) if wrap == "jsonl" else json.dumps(body)
    data = {"bom": b"\xef\xbb\xbf" + text.encode(), "broken": text.encode()[: len(text) // 2]}.get(wrap, text.encode())
    path.write_bytes(data)
    check(loader, path, len(items) if wrap in ("list", "data", "bom") else None, skip)


csv_cells = st.text(max_size=10) | st.sampled_from(['[{"role": "user"', '[{"role": "user", "content": "hi"}]', "[" * 3000, "\x00", "a,b", '"q"'])


@pytest.mark.parametrize("loader", [sft, preferences], ids=["sft", "preferences"])
@FUZZ
@given(header=st.lists(st.sampled_from(FIELDS) | st.text(max_size=5), min_size=0, max_size=4),
       records=st.lists(st.lists(csv_cells, max_size=5), max_size=6), bom=st.booleans(), skip=st.booleans())
def test_csv_with_ragged_rows(workdir, loader, header, records, bom, skip):
    """Rows with fewer or more cells than the header, quotes, newlines and NULs in cells, JSON message lists in cells."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(records)
    text = buffer.getvalue()
    path = workdir / "data.csv"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8", errors="surrogatepass"))
    parsed = list(csv.reader(io.StringIO(text)))
    total = sum(1 for record in parsed[1:] if record)  # the csv module skips blank records
    check(loader, path, total, skip)


@FEW
@given(data=st.binary(max_size=200) | st.builds(lambda t: t.encode("utf-16"), st.text(max_size=40)), suffix=st.sampled_from([".csv", ".json", ".jsonl", ".parquet"]))
def test_random_bytes_in_every_file_type(workdir, data, suffix):
    path = workdir / f"random{suffix}"
    path.write_bytes(data)
    check(sft, path, None, skip=True)
    check(preferences, path, None, skip=False)


def test_parquet_with_wrong_types_and_nesting(workdir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = workdir / "typed.parquet"
    table = pa.table({"prompt": [1, 2, 3], "completion": [["a"], [], None]})
    pq.write_table(table, path)
    assert check(sft, path, 3, skip=True) == []
    with pytest.raises(DataError, match=re.escape(f"{path} row 1: field 'prompt': must be a string or a list of {{role, content}} objects, got int")):
        sft(str(path), InvalidRows())


# ------------------------------------------------------------------------------------------ exact oracle


def sft_row(kind: str, text: str):
    """A prompt-completion row that is valid, or invalid in one known way (the same keys, so the format stays)."""
    return {
        "valid": {"prompt": text, "completion": text, "extra": [1, {"x": None}]},
        "int prompt": {"prompt": 5, "completion": text},
        "nested completion": {"prompt": text, "completion": {"text": text}},
        "list of strings": {"prompt": [text], "completion": text},
        "empty completion": {"prompt": text, "completion": "  "},
        "missing completion": {"prompt": text},
        "null prompt": {"prompt": None, "completion": text},
        "lone surrogate": {"prompt": text + "\ud800", "completion": text},
    }[kind]


SFT_KINDS = ["valid", "int prompt", "nested completion", "list of strings", "empty completion", "missing completion", "null prompt", "lone surrogate"]
LINE_KINDS = ["truncated", "invalid utf-8", "nul byte", "array", "blank"]


def sft_line(kind: str, text: str) -> bytes:
    if kind in LINE_KINDS:
        good = json.dumps({"prompt": text, "completion": text}).encode()
        return {"truncated": good[:-2], "invalid utf-8": good[:3] + b"\xc3\x28" + good[3:], "nul byte": b"\x00" + good,
                "array": b"[" + good + b"]", "blank": b"  "}[kind]
    return json.dumps(sft_row(kind, text)).encode()


@FUZZ
@given(kinds=st.lists(st.tuples(st.sampled_from(SFT_KINDS + LINE_KINDS), st.text(min_size=1, max_size=10).filter(str.strip)), min_size=1, max_size=10))
def test_sft_jsonl_exact_accounting(workdir, kinds):
    """Valid rows all kept and in order; each invalid one counted; without --skip_invalid the error names its line."""
    path = workdir / "exact.jsonl"
    lines = [sft_line(kind, text) for kind, text in kinds]
    path.write_bytes(b"\n".join(lines) + b"\n")
    valid = [text for kind, text in kinds if kind == "valid"]
    bad = [i + 1 for i, (kind, _) in enumerate(kinds) if kind not in ("valid", "blank")]
    invalid = InvalidRows(skip=True)
    try:
        examples, fmt = load_sft_examples(str(path), "train", invalid)
    except DataError as error:  # no readable row whose fields tell the format
        assert not valid and str(error).startswith(str(path)), error
        return
    assert fmt == "prompt_completion"
    assert [e["messages"][0]["content"] for e in examples] == valid
    assert invalid.total == len(bad)
    if bad:
        with pytest.raises(DataError) as error:
            load_sft_examples(str(path), "train", InvalidRows())
        assert str(error.value).startswith(f"{path}:{bad[0]}:"), error.value


PREF_KINDS = {
    "pair": lambda t: {"prompt": t, "chosen": t + "a", "rejected": t + "b", "margin": 0.5},
    "ranking": lambda t: {"prompt": t, "responses": [t + "a", t + "b", t + "c"], "ranks": [1, 2, 2]},
    "implicit": lambda t: {"chosen": [{"role": "user", "content": t}, {"role": "assistant", "content": "a"}],
                           "rejected": [{"role": "user", "content": t}, {"role": "assistant", "content": "b"}]},
    "bad: margin string": lambda t: {"prompt": t, "chosen": "a", "rejected": "b", "margin": "big"},
    "bad: margin NaN": lambda t: {"prompt": t, "chosen": "a", "rejected": "b", "margin": float("nan")},
    "bad: margin huge": lambda t: {"prompt": t, "chosen": "a", "rejected": "b", "margin": 10**400},
    "bad: margin bool": lambda t: {"prompt": t, "chosen": "a", "rejected": "b", "margin": True},
    "bad: ranks NaN": lambda t: {"prompt": t, "responses": ["a", "b"], "ranks": [1, float("nan")]},
    "bad: ranks nested": lambda t: {"prompt": t, "responses": ["a", "b"], "ranks": [[1], 2]},
    "bad: responses dicts": lambda t: {"prompt": t, "responses": [{"a": 1}, {"b": 2}]},
    "bad: chosen nested": lambda t: {"prompt": t, "chosen": [[t]], "rejected": "b"},
    "bad: prompt dict": lambda t: {"prompt": {"role": "user"}, "chosen": "a", "rejected": "b"},
    "bad: no rejected": lambda t: {"prompt": t, "chosen": "a"},
    "bad: implicit differs": lambda t: {"chosen": [{"role": "user", "content": t}, {"role": "assistant", "content": "a"}],
                                        "rejected": [{"role": "user", "content": t + "!"}, {"role": "assistant", "content": "b"}]},
    "bad: all tie": lambda t: {"prompt": t, "responses": ["a", "b"], "ranks": [1, 1]},
}


@FUZZ
@given(kinds=st.lists(st.tuples(st.sampled_from(sorted(PREF_KINDS)), st.text(min_size=1, max_size=8).filter(str.strip)), min_size=1, max_size=8))
def test_preferences_exact_accounting(workdir, kinds):
    from alignkit.data.preferences import load_preferences

    path = workdir / "prefs.jsonl"
    path.write_text("".join(json.dumps(PREF_KINDS[kind](text)) + "\n" for kind, text in kinds))  # NaN and 1e400 written as such
    good = [kind for kind, _ in kinds if not kind.startswith("bad")]
    invalid = InvalidRows(skip=True)
    examples = load_preferences(str(path), "train", invalid)
    assert len(examples) == len(good) and invalid.total == len(kinds) - len(good), dict(invalid.counts)
    assert all(math.isfinite(e.margin) for e in examples)
    assert [len(e.responses) for e in examples] == [3 if kind == "ranking" else 2 for kind in good]
    first_bad = next((i + 1 for i, (kind, _) in enumerate(kinds) if kind.startswith("bad")), None)
    if first_bad:
        with pytest.raises(DataError, match=re.escape(f"{path}:{first_bad}: ")):
            load_preferences(str(path), "train", InvalidRows())


# ------------------------------------------------------------------------------------------ other readers


@pytest.fixture(scope="module")
def ppo_cfg():
    from alignkit.config import PPOConfig

    return PPOConfig(skip_invalid=True, max_prompt_length=64)


@FEW
@given(lines=jsonl_files)
def test_ppo_prompts(workdir, tokenizer, ppo_cfg, lines):
    """Prompts kept + skipped + over-length == rows; or a DataError naming the file."""
    from alignkit.data.prompts import load_prompts

    path = workdir / "prompts.jsonl"
    data = encode_file(lines, b"\n", False)
    path.write_bytes(data)
    counted = {}

    def load(source, invalid):
        return load_prompts(source, "train", tokenizer, max_prompt_length=ppo_cfg.max_prompt_length, skip_invalid=ppo_cfg.skip_invalid,
                            verbose=False, counts=counted)

    kept = check(load, path, None, skip=True)
    if kept is not None:
        assert len(kept) + counted["skipped"] + counted["too_long"] == nonblank_lines(data), counted


@FEW
@given(lines=jsonl_files, txt=st.lists(st.text(max_size=20) | st.sampled_from(["1 fine movie", "0 bad", "2 what", "1 ", "0 \udc80x"]), max_size=6),
       skip=st.booleans())
def test_flan_task_readers(workdir, lines, txt, skip):
    """A Flan template set reading .jsonl and native .txt rows (sst2: `LABEL SENTENCE` per line)."""
    from alignkit.data.flan import load_template_set, read_task_examples

    ts = load_template_set("sst2")
    path = workdir / "sst2.jsonl"
    path.write_bytes(encode_file(lines, b"\n", False))
    check(lambda source, invalid: read_task_examples(ts, source, "train", invalid=invalid), path, None, skip)
    native = workdir / "train.txt"
    native.write_bytes("\n".join(txt).encode("utf-8", errors="surrogateescape"))
    total = sum(1 for line in native.read_bytes().splitlines() if line.strip())
    check(lambda source, invalid: read_task_examples(ts, source, "train", invalid=invalid), native, total, skip)


@FEW
@given(lines=jsonl_files)
def test_self_instruct_seed_tasks_and_eval_instruction_files(workdir, lines):
    from alignkit.data.self_instruct_prompts import load_seed_tasks
    from alignkit.evaluate.suites import read_instructions
    from alignkit.evaluate.winrate import read_prompts

    path = workdir / "seeds.jsonl"
    data = encode_file(lines, b"\n", False)
    path.write_bytes(data)
    check(lambda source, invalid: load_seed_tasks(source), path, None, skip=False)
    check(lambda source, invalid: read_instructions(source), path, None, skip=False)
    check(lambda source, invalid: read_prompts(source, None, 0)[0], path, None, skip=False)


def mostly(good, bad):
    """`good` three times in four (a plain `good | bad` flattens into one_of's branches, and bad's many branches win)."""
    return st.integers(0, 3).flatmap(lambda i: bad if i == 0 else good)


good_text = st.text(min_size=1, max_size=8).filter(str.strip)
wrong_types = st.sampled_from([5, 1.5, True, ["a"], {"a": "b"}, [{"role": "user", "content": "x"}]]) | json_values
seed_instances = st.lists(st.fixed_dictionaries({"output": mostly(good_text, wrong_types)}, optional={"input": mostly(good_text, wrong_types)}),
                          min_size=1, max_size=3)


@FUZZ
@given(rows=st.lists(st.fixed_dictionaries({"instruction": mostly(good_text, wrong_types), "instances": mostly(seed_instances, wrong_types)},
                                           optional={"is_classification": mostly(st.booleans(), wrong_types), "id": json_values}),
                     min_size=1, max_size=4))
def test_instruction_rows_with_wrong_types(workdir, rows):
    """Self-Instruct seed / user-oriented eval rows whose fields hold the wrong types."""
    from alignkit.data.self_instruct_prompts import load_seed_tasks
    from alignkit.evaluate.suites import read_instructions

    path = workdir / "instructions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    check(lambda source, invalid: load_seed_tasks(source), path, None, skip=False)
    check(lambda source, invalid: read_instructions(source), path, None, skip=False)


yaml_texts = st.one_of(
    st.text(max_size=60),
    st.builds(lambda d: json.dumps(d), st.dictionaries(st.sampled_from(["name", "task_type", "fields", "templates", "options", "formats", "labels"]),
                                                       json_values, max_size=7)),
    st.sampled_from(["name: x\ntask_type: qa\nfields: [question, answer]\ntemplates: [{id: a, prompt: '{question}'}]",
                     "name: x\ntask_type: qa\nfields: [q]\ntemplates: [{id: a, prompt: '{nope}', completion: '{q}'}]",
                     "[1, 2", "a: b: c", "\t- x", "name: [", "!!python/object:os.system {}"]),
)


@FEW
@given(text=yaml_texts)
def test_flan_template_files(workdir, text):
    from alignkit.data.flan import load_template_set

    path = workdir / "set.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_template_set(str(path))
    except DataError as error:
        assert str(error).startswith(str(path)), error


# ------------------------------------------------------------------------------------------ the server's request parser

MODEL = "fuzz-model"


@pytest.fixture(scope="module")
def http(tiny_model_dir, tmp_path_factory):
    from fastapi.testclient import TestClient

    from alignkit.serve.app import ServeConfig, create_app, load_state

    db = tmp_path_factory.mktemp("fuzz-feedback") / "feedback.db"
    cfg = ServeConfig(str(tiny_model_dir), served_model_name=MODEL, context_length=96, feedback_db=str(db), max_tokens_limit=3,
                      default_max_tokens=3, max_n=2, max_batch_rows=8, max_body_bytes=200_000, device="cpu")
    state = load_state(cfg)
    with TestClient(create_app(state), raise_server_exceptions=True) as client:
        yield client
    state.engine.shutdown()


VALID_CHAT = {"model": MODEL, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
              "max_tokens": 2, "temperature": 0}
CHAT_FIELDS = ["model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "n", "stop", "seed", "stream",
               "stream_options", "presence_penalty", "frequency_penalty", "logprobs", "tools"]
VALID_FEEDBACK = {"id": "0123456789abcdef", "annotator": "fuzzer", "prompt": "Which is better?", "responses": ["one", "two"], "ranks": [1, 2],
                  "sampling": {"temperature": 0.7}}
FEEDBACK_FIELDS = ["id", "annotator", "prompt", "responses", "ranks", "model", "sampling"]
VALID_DEMONSTRATION = {"id": "fedcba9876543210", "annotator": "fuzzer", "prompt": [{"role": "user", "content": "Say hi"}], "completion": "Hi!"}
DEMONSTRATION_FIELDS = ["id", "annotator", "prompt", "completion", "model"]
EDGE = [2**64, 2**63, -(2**63) - 1, 10**30, -1, 0, 1e308, -0.0, 0.5, True, None, "", "\ud800", "x" * 300, [""] * 5, ["\udc00"],
        [{"type": "text", "text": "a"}], [{"type": "image_url"}], [{"type": "text", "text": "\ud83d"}], {"include_usage": "yes"}]
edge_values = st.integers(0, 2).flatmap(lambda i: st.sampled_from(EDGE) if i == 0 else (json_values if i == 1 else messages))


def mutate(base: dict, fields: list[str]):
    """The valid body with fields replaced by random values, deleted, or added, or its last message changed."""
    def apply(changes):
        body = json.loads(json.dumps(base))
        for op, name, value in changes:
            if op == "set":
                body[name] = value
            elif op == "drop":
                body.pop(name, None)
            elif isinstance(body.get("messages"), list) and body["messages"] and isinstance(body["messages"][-1], dict):
                body["messages"][-1][op] = value  # op: "role" or "content"
        return body

    name = mostly(st.sampled_from(fields), st.text(max_size=5))
    change = st.tuples(st.sampled_from(["set", "set", "drop", "role", "content"]), name, edge_values)
    return st.lists(change, min_size=1, max_size=3).map(apply)


def deep_nesting(key: str):
    return st.integers(50, 3000).map(lambda depth: {key: json.loads("[" * min(depth, 900) + "]" * min(depth, 900))})


def assert_clean_answer(response, body):
    assert response.status_code < 500, response.text
    if response.status_code == 200:
        return
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    if response.status_code == 400 and isinstance(body, dict):
        assert error["param"], error  # a field of an object body is named
        root = re.split(r"[.\[]", error["param"])[0]
        assert root in body or root in CHAT_FIELDS + FEEDBACK_FIELDS + DEMONSTRATION_FIELDS, error


@FUZZ
@given(body=mutate(VALID_CHAT, CHAT_FIELDS) | deep_nesting("tools") | deep_nesting("user") | rows)
@example(body={**VALID_CHAT, "seed": 2**64})  # crashed the sampler (torch's seed is 64-bit): 500
@example(body={**VALID_CHAT, "messages": [{"role": "user", "content": "\ud800"}]})  # crashed the tokenizer: 500
@example(body={**VALID_CHAT, "stop": ["\ud800"], "n": 2, "temperature": 1.0, "seed": -5})
def test_chat_request_parser(http, body):
    try:
        raw = json.dumps(body).encode()
    except (ValueError, RecursionError):
        return
    response = http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert_clean_answer(response, body)
    if response.status_code == 200:
        answer = response.json() if not body.get("stream") else None
        assert answer is None or len(answer["choices"]) == (body.get("n") or 1)


@FUZZ
@given(body=mutate(VALID_FEEDBACK, FEEDBACK_FIELDS) | deep_nesting("sampling") | rows)
@example(body={**VALID_FEEDBACK, "annotator": "\ud800"})  # SQLite refused the text: 400 naming "'utf-8' codec" as the field
@example(body={**VALID_FEEDBACK, "prompt": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]})
def test_feedback_request_parser(http, body):
    response = http.post("/api/feedback", content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    assert_clean_answer(response, body)
    if response.status_code == 200:
        assert response.json()["id"] == body["id"]


@FEW
@given(body=mutate(VALID_DEMONSTRATION, DEMONSTRATION_FIELDS) | rows)
@example(body={**VALID_DEMONSTRATION, "completion": "\ud800"})  # SQLite refused the text: 400 naming "'utf-8' codec" as the field
def test_demonstration_request_parser(http, body):
    response = http.post("/api/demonstrations", content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    assert_clean_answer(response, body)
    if response.status_code == 200:
        assert response.json()["id"] == body["id"]


@FEW
@given(raw=st.binary(max_size=80) | st.sampled_from([b"", b"[", b"{}", b"null", b"\xff\xfe{", b'{"model": "\\ud800"}', b"[" * 5000]),
       path=st.sampled_from(["/v1/chat/completions", "/api/feedback", "/api/demonstrations"]),
       content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", ""]))
def test_raw_bodies(http, raw, path, content_type):
    response = http.post(path, content=raw, headers={"content-type": content_type} if content_type else {})
    assert_clean_answer(response, None)


# ------------------------------------------------------------------------------------------ through the command line


@pytest.mark.parametrize("line", [b'{"prompt": "a", "completion": ' + b"1" * 5000 + b"}", b'{"prompt": "\\ud800", "completion": "b"}',
                                  b"[" * 5000], ids=["huge int", "lone surrogate", "deep nesting"])
def test_cli_names_file_and_line_exit_2(tmp_path, tiny_model_dir, line):
    """What a crash used to be is now one line `error: FILE:LINE: ...` and exit code 2 from `alignkit sft`."""
    from typer.testing import CliRunner

    from alignkit.cli import app

    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"prompt": "fine", "completion": "row"}\n' + line + b"\n")
    result = CliRunner().invoke(app, ["sft", "--model_name_or_path", str(tiny_model_dir), "--dataset", str(path),
                                      "--output_dir", str(tmp_path / "out"), "--max_steps", "1"])
    assert result.exit_code == 2, result.output
    assert f"error: {path}:2" in " ".join(result.output.split()) and "Traceback" not in result.output, result.output
