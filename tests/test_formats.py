"""SFT data formats: every loader gives the same examples; every bad row is named by file, line and field."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit.data import tasks
from alignkit.data.formats import DataError, InvalidRows, load_sft_examples, read_rows, write_jsonl

SKIP_HINT = "pass --skip_invalid"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


# the same rows in every file type -> (format name, the validated examples)
CASES = {
    "text": (
        [{"text": "The cat sat on the mat."}, {"text": "Dogs bark,\nbirds sing."}],
        "text",
        [{"text": "The cat sat on the mat."}, {"text": "Dogs bark,\nbirds sing."}],
    ),
    "prompt_completion": (
        [{"prompt": "2+2=?", "completion": "4"}, {"prompt": "Reverse 'abc'", "completion": "cba"}],
        "prompt_completion",
        [{"messages": [user("2+2=?"), assistant("4")]}, {"messages": [user("Reverse 'abc'"), assistant("cba")]}],
    ),
    "prompt_completion_conversational": (  # TRL style: message lists
        [
            {"prompt": [system("Be brief."), user("Hi")], "completion": [assistant("Hello")]},
            {"prompt": [user("Q1"), assistant("A1"), user("Q2")], "completion": [assistant("A2")]},
        ],
        "prompt_completion",
        [
            {"messages": [system("Be brief."), user("Hi"), assistant("Hello")]},
            {"messages": [user("Q1"), assistant("A1"), user("Q2"), assistant("A2")]},
        ],
    ),
    "alpaca": (
        [
            {"instruction": "Translate to English", "input": "chat", "output": "cat"},
            {"instruction": "Say hello", "input": "", "output": "Hello!"},
        ],
        "alpaca",
        [
            {"messages": [user("Translate to English\n\nchat"), assistant("cat")]},
            {"messages": [user("Say hello"), assistant("Hello!")]},
        ],
    ),
    "messages": (
        [
            {"messages": [system("You are terse."), user("Hi"), assistant("Hey.")]},
            {"messages": [user("Q1"), assistant("A1"), user("Q2"), assistant("A2")]},
        ],
        "messages",
        [
            {"messages": [system("You are terse."), user("Hi"), assistant("Hey.")]},
            {"messages": [user("Q1"), assistant("A1"), user("Q2"), assistant("A2")]},
        ],
    ),
}


def write_rows(rows, path: Path, encoding="utf-8") -> str:
    """Write rows as path's type: .jsonl, .json, .csv (lists as JSON cells), .parquet, or a datasets dir."""
    if path.suffix == ".jsonl":
        write_jsonl(rows, path)
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif path.suffix == ".csv":
        with open(path, "w", newline="", encoding=encoding) as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            for row in rows:
                writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


# ---------------------------------------------------------------------------------------------
# 1. every loader, every format: the same validated examples


@pytest.mark.parametrize("case", list(CASES))
def test_every_loader_gives_the_same_examples(tmp_path, case):
    rows, expected_format, expected = CASES[case]
    for name in ("data.jsonl", "data.json", "data.csv", "data.parquet", "saved_dataset"):
        source = write_rows(rows, tmp_path / name)
        examples, fmt = load_sft_examples(source)
        assert (name, fmt) == (name, expected_format)
        assert (name, examples) == (name, expected)


def test_row_locations_per_file_type(tmp_path):
    rows = CASES["prompt_completion"][0]
    wheres = {name: [r.where for r in read_rows(write_rows(rows, tmp_path / name))] for name in
              ("a.jsonl", "a.json", "a.csv", "a.parquet", "saved")}
    assert wheres == {
        "a.jsonl": [f"{tmp_path}/a.jsonl:1", f"{tmp_path}/a.jsonl:2"],
        "a.json": [f"{tmp_path}/a.json item 1", f"{tmp_path}/a.json item 2"],
        "a.csv": [f"{tmp_path}/a.csv:2", f"{tmp_path}/a.csv:3"],  # line 1 is the header
        "a.parquet": [f"{tmp_path}/a.parquet row 1", f"{tmp_path}/a.parquet row 2"],
        "saved": [f"{tmp_path}/saved row 1", f"{tmp_path}/saved row 2"],
    }


def test_json_object_with_data_list_and_csv_with_bom(tmp_path):
    rows, _, expected = CASES["alpaca"]
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": rows}))
    assert load_sft_examples(str(wrapped)) == (expected, "alpaca")
    excel = write_rows(rows, tmp_path / "excel.csv", encoding="utf-8-sig")  # Excel's BOM must not rename a column
    assert load_sft_examples(excel) == (expected, "alpaca")


def test_alpaca_without_input_key_equals_empty_input(tmp_path):
    path = tmp_path / "a.jsonl"
    write_jsonl([{"instruction": "Say hello", "output": "Hello!"}, {"instruction": "Name it", "input": None, "output": "x"}], path)
    examples, fmt = load_sft_examples(str(path))
    assert fmt == "alpaca"
    assert examples == [{"messages": [user("Say hello"), assistant("Hello!")]}, {"messages": [user("Name it"), assistant("x")]}]


def test_datasets_dict_dir_selects_the_split(tmp_path):
    import datasets

    train_rows, _, train_expected = CASES["prompt_completion"]
    test_rows = [{"prompt": "held out", "completion": "yes"}]
    path = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train_rows), "test": datasets.Dataset.from_list(test_rows)}).save_to_disk(str(path))
    assert load_sft_examples(str(path)) == (train_expected, "prompt_completion")
    assert load_sft_examples(str(path), split="test") == ([{"messages": [user("held out"), assistant("yes")]}], "prompt_completion")
    with pytest.raises(DataError) as error:
        load_sft_examples(str(path), split="validation")
    assert str(error.value) == f"{path}: no split 'validation'; it has ['train', 'test']: pass --dataset_split"


# ---------------------------------------------------------------------------------------------
# 2. bad input: file, line and field named, --skip_invalid suggested

PC = json.dumps({"prompt": "p", "completion": "c"})
ALPACA = json.dumps({"instruction": "i", "input": "", "output": "o"})
CHAT = json.dumps({"messages": [user("u"), assistant("a")]})


def chat(*messages):
    return json.dumps({"messages": list(messages)})


BAD_LINES = {  # id: (first good line, bad line, field or None, words the message must hold)
    "malformed JSON": (PC, '{"prompt": "p", "completion": ', None, "malformed JSON"),
    "not an object": (PC, '["p", "c"]', None, "expected a JSON object, got list"),
    "missing field": (PC, json.dumps({"prompt": "p"}), "completion", "missing"),
    "wrong type": (PC, json.dumps({"prompt": "p", "completion": 7}), "completion", "must be a string, got int"),
    "empty completion": (PC, json.dumps({"prompt": "p", "completion": ""}), "completion", "is empty"),
    "whitespace completion": (PC, json.dumps({"prompt": "p", "completion": " \n "}), "completion", "is empty"),
    "empty output": (ALPACA, json.dumps({"instruction": "i", "input": "x", "output": ""}), "output", "is empty"),
    "alpaca input wrong type": (ALPACA, json.dumps({"instruction": "i", "input": 0, "output": "o"}), "input", "must be a string, got int"),
    "empty assistant": (CHAT, chat(user("u"), assistant("  ")), "messages[1].content", "assistant message is empty"),
    "two user turns": (CHAT, chat(user("u"), user("again"), assistant("a")), "messages[1].role", "expected 'assistant' here, got 'user'"),
    "assistant first": (CHAT, chat(assistant("a"), user("u"), assistant("a")), "messages[0].role", "expected 'user' here, got 'assistant'"),
    "system not first": (CHAT, chat(user("u"), system("s"), assistant("a")), "messages[1].role", "a system message may only come first"),
    "unknown role": (CHAT, chat(user("u"), {"role": "bot", "content": "a"}), "messages[1].role", "role 'bot' is not one of"),
    "ends with user": (CHAT, chat(user("u"), assistant("a"), user("u2")), "messages[2].role", "must end with an assistant message"),
    "message without content": (CHAT, chat(user("u"), {"role": "assistant"}), "messages[1].content", "missing"),
    "messages not a list": (CHAT, json.dumps({"messages": "hi"}), "messages", "must be a non-empty list"),
    "conversational completion empty": (
        json.dumps({"prompt": [system("s"), user("u")], "completion": [assistant("c")]}),
        json.dumps({"prompt": [system("s"), user("u")], "completion": [assistant("")]}),
        "completion[0].content", "assistant message is empty",
    ),
    "conversational prompt ends with assistant": (
        json.dumps({"prompt": [user("u")], "completion": [assistant("a")]}),
        json.dumps({"prompt": [user("u"), assistant("a")], "completion": [assistant("b")]}),
        "completion[0].role", "expected 'user' here, got 'assistant'",
    ),
    "row of another format": (PC, json.dumps({"text": "t"}), "prompt", "missing"),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_bad_jsonl_line_names_file_physical_line_and_field(tmp_path, case):
    good, bad, field, words = BAD_LINES[case]
    path = tmp_path / "data.jsonl"
    path.write_text(f"{good}\n\n{bad}\n{good}\n")  # the blank line 2 counts: the bad row is on line 3
    with pytest.raises(DataError) as error:
        load_sft_examples(str(path))
    message = str(error.value)
    location = f"{path}:3: field '{field}': " if field else f"{path}:3: "
    assert message.startswith(location), message
    assert (error.value.where, error.value.field) == (f"{path}:3", field)
    assert words in message
    assert message.endswith(f"({'to skip such rows and count them instead, ' + SKIP_HINT})")
    # and with skip_invalid the two good rows remain, the bad one is counted once under its reason
    invalid = InvalidRows(skip=True)
    examples, _ = load_sft_examples(str(path), invalid=invalid)
    assert len(examples) == 2 and invalid.total == 1


def test_unknown_format_lists_the_fields(tmp_path):
    path = tmp_path / "qa.jsonl"
    write_jsonl([{"question": "q", "answer": "a"}], path)
    with pytest.raises(DataError) as error:
        load_sft_examples(str(path))
    assert str(error.value).startswith(f"{path}:1: cannot tell the format from its fields ['answer', 'question']; expected one of:")
    assert error.value.reason == "unknown format"


def test_format_is_detected_from_the_first_row_that_fits_one(tmp_path):
    path = tmp_path / "data.jsonl"
    write_jsonl([{"promt": "typo", "completion": "c"}, {"prompt": "p", "completion": "c"}], path)
    with pytest.raises(DataError) as error:  # the typo row is named, not taken for the file's format
        load_sft_examples(str(path))
    assert str(error.value).startswith(f"{path}:1: field 'prompt': missing")
    invalid = InvalidRows(skip=True)
    assert load_sft_examples(str(path), invalid=invalid) == ([{"messages": [user("p"), assistant("c")]}], "prompt_completion")
    assert invalid.counts == {"missing field 'prompt'": 1}


def test_bad_row_location_in_csv_json_parquet_and_datasets_dir(tmp_path):
    good = {"prompt": "p", "completion": "c"}
    bad = {"prompt": "p", "completion": "  "}
    rows = [good, good, bad]
    expected = {
        "d.json": f"{tmp_path}/d.json item 3",
        "d.parquet": f"{tmp_path}/d.parquet row 3",
        "saved": f"{tmp_path}/saved row 3",
    }
    for name, where in expected.items():
        with pytest.raises(DataError) as error:
            load_sft_examples(write_rows(rows, tmp_path / name))
        assert str(error.value).startswith(f"{where}: field 'completion': is empty"), name
    # csv: physical lines; a blank line and a quoted cell spanning two lines both count
    path = tmp_path / "d.csv"
    path.write_text('prompt,completion\np,c\n\n"two\nlines",c\n"p","  "\n')
    with pytest.raises(DataError) as error:
        load_sft_examples(str(path))
    assert str(error.value).startswith(f"{path}:6: field 'completion': is empty")
    path.write_text('prompt,completion\np,c\n"p","\n"\n')  # the bad row starts on line 3
    with pytest.raises(DataError) as error:
        load_sft_examples(str(path))
    assert str(error.value).startswith(f"{path}:3: field 'completion': is empty")


def test_malformed_csv_row_and_json_items(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\np,c\np,c,extra\n")
    with pytest.raises(DataError) as error:
        load_sft_examples(str(path))
    assert str(error.value).startswith(f"{path}:3: 1 more value(s) than the header has columns")
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"prompt": "p", "completion": "c"}, "oops"]))
    with pytest.raises(DataError) as error:
        load_sft_examples(str(path))
    assert str(error.value).startswith(f"{path} item 2: expected an object, got str") and SKIP_HINT in str(error.value)
    path.write_text('[{"prompt": "p",\n "completion": }]')
    with pytest.raises(DataError) as error:
        load_sft_examples(str(path))
    assert str(error.value).startswith(f"{path}:2: malformed JSON (Expecting value at column 16)")


def test_line_that_is_not_utf8(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(f"{PC}\n".encode() + b'{"prompt": "\xff", "completion": "c"}\n' + f"{PC}\n".encode())
    with pytest.raises(DataError) as error:
        load_sft_examples(str(path))
    assert str(error.value).startswith(f"{path}:2: not UTF-8 text")
    invalid = InvalidRows(skip=True)
    assert len(load_sft_examples(str(path), invalid=invalid)[0]) == 2 and invalid.counts == {"not UTF-8": 1}


def test_empty_files(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="no rows found"):
        load_sft_examples(str(path))
    path.write_text("{oops\n[]\n")
    for invalid in (InvalidRows(), InvalidRows(skip=True)):  # skipping would leave nothing: say so either way
        with pytest.raises(DataError) as error:
            load_sft_examples(str(path), invalid=invalid)
        assert str(error.value) == (
            f"{path}: no readable rows (2 unreadable, the first: {path}:1: malformed JSON "
            "(Expecting property name enclosed in double quotes at column 2))")


# ---------------------------------------------------------------------------------------------
# 3. skip_invalid: good rows kept, bad rows counted per reason


def test_skip_invalid_counts_per_reason(tmp_path):
    good = [json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}) for i in range(5)]
    lines = [
        good[0], "{not json", good[1], json.dumps({"prompt": "p"}), "",
        good[2], json.dumps({"prompt": "p", "completion": ""}), good[3], "[1, 2", json.dumps({"prompt": "p", "completion": " "}),
        good[4], '{"prompt": "p", "completion": "c"', json.dumps({"prompt": "p", "completion": ""}),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    invalid = InvalidRows(skip=True)
    examples, fmt = load_sft_examples(str(path), invalid=invalid)
    assert fmt == "prompt_completion"
    assert examples == [{"messages": [user(f"p{i}"), assistant(f"c{i}")]} for i in range(5)]
    assert invalid.total == 7
    assert invalid.counts == {"malformed JSON": 3, "missing field 'completion'": 1, "empty 'completion'": 3}
    summary = invalid.summary()
    assert summary.splitlines()[0] == "skipped 7 invalid row(s):"
    assert f"  3 x malformed JSON  (e.g. {path}:2: malformed JSON" in summary
    assert f"  3 x empty 'completion'  (e.g. {path}:7: field 'completion': is empty)" in summary
    assert f"  1 x missing field 'completion'  (e.g. {path}:4: field 'completion': missing)" in summary


# ---------------------------------------------------------------------------------------------
# 4. the real command line


def sft_flags(model_dir, dataset, output_dir, *extra):
    return ["sft", "--model_name_or_path", str(model_dir), "--dataset", str(dataset), "--output_dir", str(output_dir),
            "--max_steps", "1", "--max_length", "64", "--no_progress", *extra]


def test_cli_bad_row_exits_2_and_skip_invalid_trains(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from alignkit.cli import app

    path = tmp_path / "train.jsonl"
    good = [json.dumps({"prompt": f"say {w}", "completion": w}) for w in ("one", "two", "three")]
    path.write_text("\n".join([good[0], good[1], json.dumps({"prompt": "p", "completion": 3}), "", "{broken", good[2]]) + "\n")

    # a real process: its exit status and stderr (wide, so that rich does not fold the long path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "1000"}
    command = [sys.executable, "-m", "alignkit.cli", *sft_flags(tiny_model_dir, path, tmp_path / "out1")]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"error: {path}:3: field 'completion': must be a string, got int" in result.stderr  # the first bad row
    assert SKIP_HINT in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out1" / "data_report.json").exists()

    # the same file with --skip_invalid trains (in this process: the imports are paid already), progress bar on
    out = tmp_path / "out2"
    result = CliRunner().invoke(app, [f for f in sft_flags(tiny_model_dir, path, out, "--skip_invalid") if f != "--no_progress"])
    assert result.exit_code == 0, result.output
    assert f"train ({path}): format prompt_completion; kept: 3 examples" in result.stderr
    assert "skipped 2 invalid row(s):" in result.stderr
    assert f"  1 x wrong type in 'completion'  (e.g. {path}:3: field 'completion': must be a string, got int)" in result.stderr
    assert f"  1 x malformed JSON  (e.g. {path}:5: malformed JSON" in result.stderr
    assert len(result.stdout.splitlines()) == 1 and "loss" in json.loads(result.stdout)  # diagnostics log to stderr; stdout: the result
    report = json.loads((out / "data_report.json").read_text())
    assert report["train"]["format"] == "prompt_completion"
    assert report["train"]["examples"] == 3
    assert report["train"]["invalid_skipped"] == {"wrong type in 'completion'": 1, "malformed JSON": 1}


# ---------------------------------------------------------------------------------------------
# 5. sources that cannot be read


def test_hub_id_that_cannot_be_fetched(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as error:
        load_sft_examples("nonexistent-org/nonexistent-dataset")
    assert error.value.where == "nonexistent-org/nonexistent-dataset"
    assert str(error.value).startswith(
        "nonexistent-org/nonexistent-dataset: not a file or directory, and loading it from the hub failed: ")


def test_unsupported_extension_and_missing_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello\n")
    with pytest.raises(DataError) as error:
        load_sft_examples(str(path))
    assert str(error.value) == f"{path}: unsupported file type '.txt'; use .jsonl, .json, .csv, .parquet or a datasets directory"
    with pytest.raises(FileNotFoundError) as missing:
        load_sft_examples(str(tmp_path / "missing.jsonl"))
    assert str(missing.value) == f"{tmp_path}/missing.jsonl: no such file"


# ---------------------------------------------------------------------------------------------
# 6. built-in tasks


def test_builtin_tasks():
    rows = read_rows("builtin:reversal,arithmetic:5")
    assert sorted(r.data["task"] for r in rows) == ["arithmetic"] * 5 + ["reversal"] * 5
    assert rows[0].where == "builtin:reversal,arithmetic:5 (train) row 1"
    examples, fmt = load_sft_examples("builtin:reversal,arithmetic:5")
    assert fmt == "prompt_completion" and len(examples) == 10
    assert examples == [{"messages": [user(r.data["prompt"]), assistant(r.data["completion"])]} for r in rows]
    assert len(load_sft_examples("builtin:reversal:3", split="test")[0]) == 3


def test_builtin_errors():
    with pytest.raises(DataError) as error:
        load_sft_examples("builtin:nonexistent")
    assert str(error.value).startswith("builtin:nonexistent: unknown task 'nonexistent'; valid names: ")
    assert all(name in str(error.value) for name in tasks.TASK_NAMES)
    with pytest.raises(DataError) as error:
        load_sft_examples("builtin:reversal:five")
    assert str(error.value) == "builtin:reversal:five: N must be a whole number, got 'five': use builtin:TASK[,TASK...][:N]"


def test_hub_id_with_a_config_name(monkeypatch):
    """`ID:CONFIG` picks a configuration (glue's sst2); plain ids pass no config."""
    import datasets

    from alignkit.data.formats import read_rows

    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return [{"sentence": "a fine film", "label": 1}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = read_rows("nyu-mll/glue:sst2", split="validation")
    assert calls == [("nyu-mll/glue", "sst2", "validation")] and rows[0].data["sentence"] == "a fine film"
    read_rows("stanfordnlp/sst2")
    assert calls[-1] == ("stanfordnlp/sst2", None, "train")
