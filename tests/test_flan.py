"""Tests for alignkit.data.flan: template library, {options} rendering, few-shot, readers, mixing, the command."""

import json
import random
import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from alignkit.data.flan import (
    DEFAULT_OPTIONS_STYLE,
    OPTION_HEADERS,
    OPTION_MARKERS,
    TEMPLATE_SETS,
    choose_exemplars,
    few_shot,
    load_template_set,
    read_task_examples,
    render,
    render_options,
)
from alignkit.data.flan_mixture import MixtureEntry, build_mixture, flan_command, mixing_rates, mixture_counts
from alignkit.data.formats import DataError, InvalidRows, load_sft_examples

REAL = {  # built-in set -> (native directory, a labeled split)
    "sst2": ("sst2", "validation"),
    "ag_news": ("agnews", "test"),
    "rte": ("rte", "validation"),
    "cb": ("cb", "validation"),
    "trec": ("trec", "test"),
}
DOCS = Path(__file__).resolve().parents[1] / "docs" / "flan.md"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def cli():
    app = typer.Typer()
    app.command("flan")(flan_command)
    app.command("noop")(lambda: None)  # two commands, so `flan` stays a subcommand as under `alignkit data`
    return app


# ---------------------------------------------------------------------------------------------
# the template library


@pytest.mark.parametrize("name", TEMPLATE_SETS)
def test_every_set_has_about_ten_templates_at_most_three_inverted(name):
    ts = load_template_set(name)
    assert ts.name == name
    assert 8 <= len(ts.templates) <= 12
    assert 1 <= sum(t.inverted for t in ts.templates) <= 3
    assert len({t.id for t in ts.templates}) == len(ts.templates)
    if ts.is_classification:  # every direct template offers the options or names them in its wording
        assert all("{answer}" in t.completion for t in ts.templates if not t.inverted)


def test_the_five_real_sets_and_their_option_order():
    assert TEMPLATE_SETS[:5] == ("sst2", "ag_news", "rte", "cb", "trec")
    assert load_template_set("sst2").options == ["negative", "positive"]
    assert load_template_set("ag_news").options == ["World", "Sports", "Business", "Science/Tech"]
    assert load_template_set("cb").options[:2] == ["yes", "no"]  # super_glue cb: 0 entailment, 1 contradiction, 2 neutral
    assert load_template_set("trec").task_type == "multiclass_classification"


@pytest.mark.parametrize("name", list(REAL))
def test_every_template_renders_every_field_on_real_rows(shared_data, name):
    directory, split = REAL[name]
    ts = load_template_set(name)
    examples = read_task_examples(ts, str(shared_data / "classification" / directory), split, limit=25)
    assert len(examples) == 25
    inputs = [f for f in ts.fields if f != "label"]
    for example in examples:
        assert example["label"] in ts.options and ts.options.index(example["label"]) == example["label_index"]
        for template in ts.templates:
            out = render(template, example, ts, random.Random(0))
            text = out["prompt"] + "\n" + out["completion"]
            leftover = set(re.findall(r"\{(\w+)\}", text)) & (set(ts.fields) | {"answer", "options"})
            assert not leftover, (template.id, leftover)
            for field in inputs:  # each input field is used by every template
                assert example[field] in text, (template.id, field)
            words = template.answers or ts.options
            answer = words[example["label_index"]]
            if template.inverted:  # the label goes into the prompt, an input comes out
                assert answer in out["prompt"] and out["options"] is None
                assert out["completion"] in [example[f] for f in inputs]
            else:
                assert out["completion"] == out["options"][example["label_index"]]
                assert len(out["options"]) == len(ts.options) and answer in out["completion"]
            assert out["template_id"] == template.id


GENERIC_ROWS = {  # one constructed row per generic set, in the set's first column layout
    "binary_classification": [{"text": "alpha one", "label": "spam"}, {"text": "beta two", "label": "ham"}],
    "multiclass_classification": [{"text": "alpha one", "label": "x"}, {"text": "beta two", "label": "y"}, {"text": "c3", "label": "z"}],
    "nli": [{"premise": "A dog runs.", "hypothesis": "An animal moves.", "label": 0}],
    "qa": [{"question": "Capital of Peru?", "answer": "Lima"}],
    "qa_context": [{"context": "Lima is the capital of Peru.", "question": "Capital of Peru?", "answer": "Lima"}],
    "translation": [{"source": "Guten Morgen", "target": "Good morning", "source_language": "German", "target_language": "English"}],
    "summarization": [{"text": "A long story about a cat and a hat.", "summary": "Cat, hat."}],
}


@pytest.mark.parametrize("name", [n for n in TEMPLATE_SETS if n in GENERIC_ROWS or n == "builtin_tasks"])
def test_every_generic_template_renders_every_field(tmp_path, name):
    ts = load_template_set(name)
    source = "builtin:spelling:4" if name == "builtin_tasks" else write_jsonl(tmp_path / "rows.jsonl", GENERIC_ROWS[name])
    for example in read_task_examples(ts, source):
        for template in ts.templates:
            out = render(template, example, ts, random.Random(1))
            text = out["prompt"] + "\n" + out["completion"]
            assert not re.search(r"\{(" + "|".join(ts.fields + ["answer", "options"]) + r")\}", text), template.id
            metadata = {"source_language", "task"}  # may stay implicit ("Translate this to English.")
            assert all(example[f] in text for f in ts.fields if f not in metadata | {"label"}), template.id
            if not ts.is_classification:
                assert out["options"] is None
            elif not template.inverted:
                assert out["completion"] == out["options"][example["label_index"]]


def test_native_files_are_read_completely(shared_data):
    data = shared_data / "classification"
    for name, path, split in [("sst2", "sst2/train.txt", "train"), ("trec", "trec/train.txt", "train"),
                              ("rte", "rte/train.jsonl", "train"), ("ag_news", "agnews/test.csv", "test")]:
        lines = [l for l in (data / path).read_text(encoding="utf-8").splitlines() if l.strip()]
        expected = len(lines) - (1 if path.endswith(".csv") else 0)  # the csv header
        assert len(read_task_examples(load_template_set(name), str(data / Path(path).parent), split)) == expected


def test_ag_news_labels_agree_with_classes_txt(shared_data):
    # classes.txt: "1-World, 2-Sports, 3-Business, 4-Science/Tech"
    text = (shared_data / "classification" / "agnews" / "classes.txt").read_text().strip()
    names = [item.split("-", 1)[1].strip() for item in text.split(",")]
    ts = load_template_set("ag_news")
    examples = read_task_examples(ts, str(shared_data / "classification" / "agnews" / "test.csv"), limit=200)
    rows = (shared_data / "classification" / "agnews" / "test.csv").read_text(encoding="utf-8").splitlines()[1:]
    import csv

    for example, row in zip(examples, csv.reader(rows)):
        assert example["label"] == names[int(row[0]) - 1]
        assert example["text"] == f"{row[1]} {row[2]}"


def _as_hub(name, example):
    """The row as the Hugging Face hub stores it (column names and label ids from the dataset cards)."""
    hub_ids = {
        "sst2": ["negative", "positive"],
        "ag_news": ["World", "Sports", "Business", "Science/Tech"],
        "rte": ["yes", "no"],  # entailment, not_entailment
        "cb": ["yes", "no", "it's impossible to say"],  # entailment, contradiction, neutral
        "trec": ["abbreviation", "entity", "description", "human", "location", "number"],  # ABBR ENTY DESC HUM LOC NUM
    }[name]
    label = hub_ids.index(example["label"])
    return {"sst2": lambda e: {"sentence": e["sentence"], "label": label, "idx": 0},
            "ag_news": lambda e: {"text": e["text"], "label": label},
            "rte": lambda e: {"premise": e["premise"], "hypothesis": e["hypothesis"], "label": label, "idx": 0},
            "cb": lambda e: {"premise": e["premise"], "hypothesis": e["hypothesis"], "label": label, "idx": 0},
            "trec": lambda e: {"text": e["question"], "coarse_label": label, "fine_label": 0}}[name](example)


@pytest.mark.parametrize("name", list(REAL))
def test_hub_columns_give_the_same_examples_as_native_files(shared_data, tmp_path, name):
    import datasets

    directory, split = REAL[name]
    ts = load_template_set(name)
    native = read_task_examples(ts, str(shared_data / "classification" / directory), split, limit=40)
    saved = tmp_path / name
    datasets.DatasetDict({"validation": datasets.Dataset.from_list([_as_hub(name, e) for e in native])}).save_to_disk(str(saved))
    hub = read_task_examples(ts, str(saved), "validation")
    strip = lambda e: {k: v for k, v in e.items() if k != "where"}  # noqa: E731
    assert [strip(e) for e in hub] == [strip(e) for e in native]
    assert hub[0]["where"] == f"{saved} row 1"


def test_glue_rte_column_names(tmp_path):
    source = write_jsonl(tmp_path / "glue_rte.jsonl", [{"sentence1": "A cat sat.", "sentence2": "A cat exists.", "label": 0, "idx": 0}])
    (example,) = read_task_examples(load_template_set("rte"), source)
    assert (example["premise"], example["hypothesis"], example["label"], example["label_index"]) == ("A cat sat.", "A cat exists.", "yes", 0)


# ---------------------------------------------------------------------------------------------
# {options} and few-shot


SST2_EXAMPLE = {"sentence": "a gorgeous film .", "label": "positive", "label_index": 1}


def test_options_block_rendering_by_style():
    assert render_options(["a", "b", "c"]) == "OPTIONS:\n- a\n- b\n- c"
    assert render_options(["a", "b", "c"], "Choices:|(A)") == "Choices:\n(A) a\n(B) b\n(C) c"
    assert render_options(["a", "b", "c", "d"], "Pick from:|(i)") == "Pick from:\n(i) a\n(ii) b\n(iii) c\n(iv) d"
    assert render_options(["x", "y"], "Select from the following.|1.") == "Select from the following.\n1. x\n2. y"
    with pytest.raises(ValueError, match="marker"):
        render_options(["x", "y"], "Options:|@")


def test_options_style_varies_with_the_rng_but_is_fixed_by_the_seed():
    ts = load_template_set("sst2")
    template = ts.template("sst2-01")
    fixed = render(template, SST2_EXAMPLE, ts)  # rng=None: the default style, byte for byte
    assert fixed["prompt"] == ('Review sentence: "a gorgeous film ."\nIs the sentiment of this sentence negative or positive?\n'
                               "OPTIONS:\n- negative\n- positive")
    assert DEFAULT_OPTIONS_STYLE == "OPTIONS:|-"
    by_seed = {seed: render(template, SST2_EXAMPLE, ts, random.Random(seed))["prompt"] for seed in range(30)}
    assert len(set(by_seed.values())) >= 10  # 10 headers x 9 markers
    assert {p.split("\n")[2] for p in by_seed.values()} <= set(OPTION_HEADERS)
    assert all(render(template, SST2_EXAMPLE, ts, random.Random(s))["prompt"] == p for s, p in by_seed.items())
    assert all(r == fixed["completion"] for r in [render(template, SST2_EXAMPLE, ts, random.Random(s))["completion"] for s in range(5)])


def test_template_answers_replace_the_option_words():
    ts = load_template_set("sst2")
    out = render(ts.template("sst2-05"), SST2_EXAMPLE, ts)
    assert out["options"] == ["no", "yes"] and out["completion"] == "yes"
    assert out["prompt"].endswith("OPTIONS:\n- no\n- yes")
    out = render(ts.template("sst2-04"), SST2_EXAMPLE, ts)
    assert out["options"] == ["It is negative.", "It is positive."] and out["completion"] == "It is positive."


def test_few_shot_prompt_is_exactly_exemplars_then_query():
    ts = load_template_set("sst2")
    shots = [{"sentence": "dull .", "label": "negative", "label_index": 0}, {"sentence": "a joy .", "label": "positive", "label_index": 1}]
    out = few_shot(ts.template("sst2-03"), shots, SST2_EXAMPLE, ts, delimiter="\n###\n")
    head = "Decide whether this movie review is negative or positive.\n\n"
    assert out["prompt"] == f"{head}dull .\nnegative\n###\n{head}a joy .\npositive\n###\n{head}a gorgeous film ."
    assert (out["completion"], out["shots"], out["template_id"], out["options"]) == ("positive", 2, "sst2-03", ["negative", "positive"])
    # one options style for the whole prompt
    out = few_shot(ts.template("sst2-01"), shots, SST2_EXAMPLE, ts, rng=random.Random(3))
    styles = [f"{header}|{marker}" for header in OPTION_HEADERS for marker in OPTION_MARKERS]
    assert sum(out["prompt"].count(render_options(ts.options, style)) == 3 for style in styles) == 1
    with pytest.raises(ValueError, match="among its own exemplars"):
        few_shot(ts.template("sst2-03"), [dict(SST2_EXAMPLE, where="elsewhere")], SST2_EXAMPLE, ts)


def test_choose_exemplars_never_returns_the_query_or_its_duplicates():
    pool = [{"sentence": f"s{i}", "label": "negative", "label_index": 0, "where": f"f:{i}"} for i in range(6)]
    query = dict(pool[2], where="other:1")  # same content as pool[2]: a duplicate of the query
    for seed in range(50):
        chosen = choose_exemplars(pool, query, 5, random.Random(seed))
        assert len(chosen) == 5 and pool[2] not in chosen and len({c["sentence"] for c in chosen}) == 5
    with pytest.raises(ValueError, match="only 5 rows besides the query"):
        choose_exemplars(pool, query, 6, random.Random(0))


def test_few_shot_exemplars_come_from_the_training_split(shared_data):
    sst2 = shared_data / "classification" / "sst2"
    train = {line.split(" ", 1)[1] for line in (sst2 / "train.txt").read_text(encoding="utf-8").splitlines() if line.strip()}
    rows, summary = build_mixture([MixtureEntry("sst2", str(sst2), "validation", templates="sst2-01")],
                                  seed=1, total_rows=60, shots=(3,), log=lambda m: None)
    assert summary["datasets"][0]["shots"] == {3: 60}
    for row in rows:
        sentences = re.findall(r'^Review sentence: "(.*)"$', row["prompt"], flags=re.M)
        *exemplars, query = sentences
        assert len(exemplars) == 3 and all(s in train for s in exemplars) and query not in exemplars
        assert row["source"].startswith(str(sst2 / "dev.txt"))


# ---------------------------------------------------------------------------------------------
# mixing


def test_mixing_rates_and_counts_are_examples_proportional_with_a_cap():
    sizes = {"a": 100, "b": 10, "c": 5000}
    assert mixing_rates(sizes, cap=1000) == {"a": 100 / 1110, "b": 10 / 1110, "c": 1000 / 1110}
    assert mixing_rates(sizes) == {"a": 100 / 5110, "b": 10 / 5110, "c": 5000 / 5110}
    assert mixture_counts(sizes, cap=1000) == {"a": 100, "b": 10, "c": 1000}
    assert mixture_counts(sizes, cap=1000, total=111) == {"a": 10, "b": 1, "c": 100}
    # 7 rows at rates 3/6, 2/6, 1/6: 3.5, 2.33, 1.17 -> floors 3, 2, 1; the 7th row to the largest remainder (a)
    assert mixture_counts({"a": 30, "b": 20, "c": 10}, total=7) == {"a": 4, "b": 2, "c": 1}
    with pytest.raises(ValueError, match="exceeds"):
        mixture_counts(sizes, cap=10, total=31)


def _sets(tmp_path, sizes):
    entries = []
    for name, n in sizes.items():
        rows = [{"text": f"{name} text {i}", "label": "yes" if i % 2 else "no"} for i in range(n)]
        entries.append(MixtureEntry("binary_classification", write_jsonl(tmp_path / f"{name}.jsonl", rows), name=name))
    return entries


def test_build_mixture_takes_exact_counts_without_repeats_deterministically(tmp_path):
    entries = _sets(tmp_path, {"big": 50, "small": 7, "huge": 300})
    rows, summary = build_mixture(entries, seed=3, max_per_dataset=40, log=lambda m: None)
    per_set = {d["name"]: d["rows"] for d in summary["datasets"]}
    assert per_set == {"big": 40, "small": 7, "huge": 40}
    assert [d["rate"] for d in summary["datasets"]] == [40 / 87, 7 / 87, 40 / 87]
    assert {name: sum(r["dataset"] == name for r in rows) for name in per_set} == per_set
    assert len({r["source"] for r in rows}) == len(rows) == 87  # sampled without replacement
    for d in summary["datasets"]:  # the table counts what was written
        from collections import Counter

        assert d["templates"] == {**{t: 0 for t in d["templates"]}, **Counter(r["template_id"] for r in rows if r["dataset"] == d["name"])}
    again, _ = build_mixture(entries, seed=3, max_per_dataset=40, log=lambda m: None)
    other, _ = build_mixture(entries, seed=4, max_per_dataset=40, log=lambda m: None)
    assert again == rows and other != rows
    # adding a data set does not change which rows the others contribute
    more, _ = build_mixture(entries + _sets(tmp_path, {"extra": 5}), seed=3, max_per_dataset=40, log=lambda m: None)
    assert sorted(r["source"] for r in more if r["dataset"] == "big") == sorted(r["source"] for r in rows if r["dataset"] == "big")


# ---------------------------------------------------------------------------------------------
# column mapping, user template sets, builtin tasks


def test_column_mapping_and_options_from_the_data(tmp_path):
    rows = [{"review": "great", "stars": 10}, {"review": "bad", "stars": 2}, {"review": "ok", "stars": 5}, {"review": "fine", "stars": 5}]
    source = write_jsonl(tmp_path / "reviews.jsonl", rows)
    ts = load_template_set("multiclass_classification")
    examples = read_task_examples(ts, source, columns={"text": "review", "label": "stars"})
    assert [e["options"] for e in examples] == [["2", "5", "10"]] * 4  # numeric order, not "10" < "2"
    assert [(e["text"], e["label"], e["label_index"]) for e in examples] == [("great", "10", 2), ("bad", "2", 0), ("ok", "5", 1), ("fine", "5", 1)]
    out = render(ts.template("multiclass-02"), examples[0], ts)
    assert out["prompt"] == "Classify the following text.\n\nText: great\nOPTIONS:\n- 2\n- 5\n- 10" and out["options"] == ["2", "5", "10"]


def test_nested_columns_and_literals(tmp_path):
    source = write_jsonl(tmp_path / "wmt.jsonl", [{"translation": {"de": "Hallo Welt", "en": "Hello world"}}])
    ts = load_template_set("translation")
    columns = {"source": "translation.de", "target": "translation.en", "source_language": "'German'", "target_language": "'English'"}
    (example,) = read_task_examples(ts, source, columns=columns)
    assert render(ts.template("translation-01"), example, ts)["prompt"] == "Translate from German to English:\n\nHallo Welt"
    squad = write_jsonl(tmp_path / "squad.jsonl", [{"context": "Paris is in France.", "question": "Where is Paris?", "answers": {"text": ["France"], "answer_start": [12]}}])
    (example,) = read_task_examples(load_template_set("qa_context"), squad)
    assert example["answer"] == "France"


def test_a_user_template_set_from_the_docs_needs_no_python(tmp_path):
    """The YAML shown in docs/flan.md, for a data set with its own columns, loads and renders."""
    block = re.search(r"```yaml\n(# my_reviews\.yaml.*?)```", DOCS.read_text(encoding="utf-8"), flags=re.S).group(1)
    (tmp_path / "my_reviews.yaml").write_text(block, encoding="utf-8")
    source = write_jsonl(tmp_path / "reviews.jsonl", [{"body": "Loved it.", "stars": 5}, {"body": "Meh.", "stars": 1}])
    ts = load_template_set(str(tmp_path / "my_reviews.yaml"))
    examples = read_task_examples(ts, source)
    assert [e["label"] for e in examples] == ["good", "bad"]
    outs = [render(t, examples[0], ts) for t in ts.templates]
    assert all("Loved it." in o["prompt"] + o["completion"] for o in outs)


def test_builtin_tasks_through_templates():
    ts = load_template_set("builtin_tasks")
    examples = read_task_examples(ts, "builtin:reversal:3")
    assert len(examples) == 3 and examples[0]["task"] == "reversal"
    out = render(ts.template("builtin-02"), examples[0], ts)
    assert out == {"prompt": f"Question: {examples[0]['prompt']}\nAnswer:", "completion": examples[0]["completion"],
                   "template_id": "builtin-02", "options": None}


# ---------------------------------------------------------------------------------------------
# bad input


def test_missing_column_names_file_line_and_field(tmp_path):
    source = write_jsonl(tmp_path / "x.jsonl", [{"sentence": "fine .", "label": 1}, {"sentence": "ok", "label": 0}, {"label": 1}])
    with pytest.raises(DataError) as error:
        read_task_examples(load_template_set("sst2"), source)
    assert f"{source}:3: field 'sentence': missing" in str(error.value) and "--columns sentence=" in str(error.value)
    with pytest.raises(DataError, match=r"x2.jsonl:1: field 'sentence': missing; the row has columns \['label', 'review'\]"):
        read_task_examples(load_template_set("sst2"), write_jsonl(tmp_path / "x2.jsonl", [{"review": "a", "label": 1}]))


def test_unknown_label_and_unlabeled_rows(tmp_path):
    source = write_jsonl(tmp_path / "y.jsonl", [{"premise": "a", "hypothesis": "b", "label": "entailment"},
                                                {"premise": "a", "hypothesis": "b", "label": "maybe"}])
    with pytest.raises(DataError, match=r"y.jsonl:2: field 'label': unknown label 'maybe': expected one of"):
        read_task_examples(load_template_set("rte"), source)
    invalid = InvalidRows(skip=True)
    assert len(read_task_examples(load_template_set("rte"), source, invalid=invalid)) == 1
    assert invalid.counts == {"unknown label": 1}
    test_split = write_jsonl(tmp_path / "z.jsonl", [{"sentence": "x", "label": -1}])
    with pytest.raises(DataError, match="unlabeled row .* use the train or validation split"):
        read_task_examples(load_template_set("sst2"), test_split)
    with pytest.raises(DataError, match=r"train.txt:2: does not match the line format"):
        (tmp_path / "train.txt").write_text("1 good .\n7\n")
        read_task_examples(load_template_set("sst2"), str(tmp_path / "train.txt"))


def test_unknown_task_and_bad_template_files(tmp_path):
    with pytest.raises(DataError, match="unknown task .*built-in sets: sst2, ag_news"):
        load_template_set("imdb")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ntask_type: qa\nfields: [question, answer]\ntemplates:\n"
                   "  - {id: q1, prompt: 'Q: {question} {context}', completion: '{answer}'}\n")
    with pytest.raises(DataError, match=r"bad.yaml: field 'templates\[0\].prompt': template 'q1': unknown placeholder\(s\) \['context'\]"):
        load_template_set(str(bad))
    bad.write_text("name: bad\ntask_type: qa\nfields: [question, answer\n")
    with pytest.raises(DataError, match=r"bad.yaml:\d+: malformed YAML"):
        load_template_set(str(bad))
    with pytest.raises(DataError, match="no 'train' split here .* found splits \\['test'\\]"):
        (tmp_path / "agnews").mkdir()
        (tmp_path / "agnews" / "test.csv").write_text("Class Index,Title,Description\n1,a,b\n")
        read_task_examples(load_template_set("ag_news"), str(tmp_path / "agnews"), "train")


# ---------------------------------------------------------------------------------------------
# the command


def test_command_writes_sft_ready_rows_and_a_summary(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"sentence": f"s{i} .", "label": i % 2} for i in range(30)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"premise": f"p{i}", "hypothesis": f"h{i}", "label": i % 3} for i in range(12)])
    out = tmp_path / "mix.jsonl"
    args = ["flan", "--dataset", a, "--task", "sst2", "--dataset", b, "--task", "cb", "--output", str(out),
            "--max_per_dataset", "20", "--shots", "0,1", "--seed", "7", "--templates", "direct"]
    result = CliRunner().invoke(cli(), args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 32 and {r["dataset"] for r in rows} == {"sst2", "cb"}
    assert all(not r["inverted"] and r["shots"] in (0, 1) and r["template_id"].startswith(r["task"] + "-") for r in rows)
    summary = json.loads((tmp_path / "mix.summary.json").read_text())
    assert [(d["name"], d["available"], d["rows"]) for d in summary["datasets"]] == [("sst2", 30, 20), ("cb", 12, 12)]
    assert "rows per template" in result.output
    examples, fmt = load_sft_examples(str(out))  # what `alignkit sft --dataset mix.jsonl` reads
    assert fmt == "prompt_completion" and len(examples) == 32
    assert CliRunner().invoke(cli(), args).exit_code == 0 and [json.loads(l) for l in out.read_text().splitlines()] == rows


def test_command_with_a_mixture_yaml(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"review": f"r{i}", "score": i % 2} for i in range(9)])
    (tmp_path / "mix.yaml").write_text("seed: 2\nmax_per_dataset: 5\ndatasets:\n"
                                       "  - {task: binary_classification, dataset: a.jsonl, columns: 'text=review,label=score'}\n")
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(cli(), ["flan", "--mixture", str(tmp_path / "mix.yaml"), "--output", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert (summary["seed"], summary["rows"], summary["datasets"][0]["available"]) == (2, 5, 9)


def test_command_user_errors_exit_2_with_one_line(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"sentence": "x", "label": 3}])
    for args, message in [
        (["--dataset", a, "--task", "imdb"], "unknown task"),
        (["--dataset", a], "give one --task per --dataset"),
        (["--dataset", a, "--task", "sst2"], "unknown label 3"),
        (["--dataset", str(tmp_path / "none.jsonl"), "--task", "sst2"], "no such file"),
        (["--dataset", a, "--task", "sst2", "--columns", "sentence"], "expected FIELD=COLUMN"),
    ]:
        result = CliRunner().invoke(cli(), ["flan", *args, "--output", str(tmp_path / "o.jsonl")])
        assert result.exit_code == 2 and "error:" in result.output and message in result.output, (args, result.output)
    result = CliRunner().invoke(cli(), ["flan", "--dataset", a, "--task", "sst2", "--skip_invalid", "--output", str(tmp_path / "o.jsonl")])
    assert result.exit_code == 2 and "no usable rows (1 skipped" in result.output
    assert not (tmp_path / "o.jsonl").exists()


def test_unlabeled_test_split_is_explained(shared_data):
    with pytest.raises(DataError, match=r"test.jsonl:1: field 'label': missing \(an unlabeled split"):
        read_task_examples(load_template_set("rte"), str(shared_data / "classification" / "rte"), "test")


def test_malformed_template_entries(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ntask_type: qa\nfields: [question, answer]\ntemplates:\n  - just a string\n")
    with pytest.raises(DataError, match=r"field 'templates\[0\]': must be a mapping, got str"):
        load_template_set(str(bad))
    bad.write_text("name: bad\ntask_type: binary_classification\nfields: [text, label]\noptions: [a, b]\n"
                   "templates:\n  - {id: 1, prompt: '{text} {options}', completion: 'label'}\n")
    with pytest.raises(DataError, match=r"field 'templates\[0\].completion': template '1': a classification completion must contain"):
        load_template_set(str(bad))
    bad.write_text("name: bad\ntask_type: binary_classification\nfields: [text, label]\noptions: [a, b]\n"
                   "templates:\n  - {id: 1, prompt: '{text}', completion: '{answer}', answers: [x]}\n")
    with pytest.raises(DataError, match=r"answers must list one text per option"):
        load_template_set(str(bad))


def test_command_delimiter_escapes(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"question": f"q{i}?", "answer": f"a{i}"} for i in range(4)])
    out = tmp_path / "o.jsonl"
    result = CliRunner().invoke(cli(), ["flan", "--dataset", a, "--task", "qa", "--templates", "qa-06", "--shots", "1",
                                        "--delimiter", "\\n---\\n", "--output", str(out)])
    assert result.exit_code == 0, result.output
    for row in map(json.loads, out.read_text().splitlines()):
        shot, query = row["prompt"].split("\n---\n")
        assert re.fullmatch(r"Q: q(\d)\?\nA:\na\1", shot) and re.fullmatch(r"Q: q\d\?\nA:", query) and shot[3:5] != query[3:5]
        assert row["completion"] == "a" + query[4]
