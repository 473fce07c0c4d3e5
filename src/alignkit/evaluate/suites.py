"""Task names -> evaluation suites: which examples, which exemplar pool, how a k-shot item is built, how it is scored.

  built-in task (`arithmetic`, `reversal`, ...)   exact match of a generated answer; exemplars from the train split
  Flan template set (`sst2`, `rte`, a .yaml)      classification: accuracy (option log-likelihoods, or generation);
                                                  other task types: generation scored by exact match, BLEU/chrF or ROUGE-L
  instruction file (a .jsonl/.json/.csv path)     instructions with reference outputs (Self-Instruct's user-oriented
                                                  {"instruction","instances":[{"input","output"}]}, or any SFT format):
                                                  ROUGE-L, BLEU, chrF of a generated answer

Flan sets read their data from `--dataset`: a file, a directory of the set's native files, or a root holding one
such directory per set (`ROOT/sst2`, `ROOT/rte`; `ag_news` also finds `ROOT/agnews`); `NAME=SOURCE` in `--tasks`
names a source for one task. The evaluated examples are the validation split (else test) shuffled by the seed,
the first `--limit` of them; exemplars come from the train split (else the other evaluated-split rows, never the
query itself).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from alignkit.evaluate.prompts import KShotItem, Shot, builtin_item, exemplar_order

GENERATION_METRICS = {"qa": ("exact_match",), "qa_context": ("exact_match",), "builtin": ("exact_match",), "translation": ("bleu", "chrf"),
                      "text_to_text": ("rouge_l",), "instructions": ("rouge_l", "bleu", "chrf")}
BUILTIN_EVAL_ROWS = 100  # per built-in task without --limit
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass
class Suite:
    name: str
    kind: str  # exact_match | classification | generation
    examples: list[dict]  # evaluated examples, in evaluation order
    pool: list[dict]  # exemplar pool
    build: Callable[[list[dict], dict], KShotItem]  # (exemplars, example) -> k-shot item
    reference: Callable[[dict], str | list[str]]  # the reference answer(s) of an example
    options: Callable[[dict], list[str]] | None = None  # candidate completions in label order (classification)
    words: Callable[[dict], list[str]] | None = None  # the bare option words, also accepted from a generation
    label: Callable[[dict], int] | None = None
    metrics: tuple[str, ...] = ()
    max_new_tokens: int = 32
    info: dict = field(default_factory=dict)
    text_fields: list[str] = field(default_factory=list)  # the input fields a content-free input replaces (calibration)

    def exemplars(self, example: dict, k: int, seed: int) -> list[dict]:
        """The first k of the seeded pool order that are not the query: one fixed set for every query (unless a
        query is in the pool itself), nested across k."""
        if k == 0:
            return []
        chosen = []
        for index in exemplar_order(len(self.pool), seed):
            candidate = self.pool[index]
            if not _same(candidate, example):
                chosen.append(candidate)
                if len(chosen) == k:
                    return chosen
        raise ValueError(f"{self.name}: {k}-shot prompts need {k} exemplars; the pool has only {len(chosen)} rows besides the query")


def _same(a: dict, b: dict) -> bool:
    strip = lambda d: {k: v for k, v in d.items() if k not in ("where", "label_index", "task")}
    return strip(a) == strip(b)


def parse_tasks(spec: str) -> list[tuple[str, str | None]]:
    """"sst2,rte=path/rte,builtin_task" -> [(name, source or None), ...]."""
    out = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        name, sep, source = part.partition("=")
        out.append((name.strip(), source.strip() if sep else None))
    if not out:
        raise ValueError("--tasks is empty: give built-in task names, Flan template sets (e.g. sst2) or instruction files")
    return out


def _shuffled(rows: list, seed: int, limit: int | None) -> list:
    order = list(range(len(rows)))
    random.Random(f"eval-order:{seed}").shuffle(order)
    return [rows[i] for i in order[: limit if limit is not None else len(rows)]]


def parse_columns(spec: str) -> dict[str, str] | None:
    """"text=review,label=stars" -> {"text": "review", "label": "stars"} (Flan sets: where each field is read)."""
    if not spec:
        return None
    pairs = [p.partition("=") for p in spec.split(",") if p.strip()]
    if any(not sep or not a.strip() or not b.strip() for a, sep, b in pairs):
        raise ValueError(f"--columns takes FIELD=COLUMN,...; got {spec!r}")
    return {a.strip(): b.strip() for a, _, b in pairs}


def build_suite(name: str, source: str | None, dataset: str | None, seed: int = 0, limit: int | None = None,
                template: str = "", split: str = "auto", columns: dict[str, str] | None = None, invalid=None) -> Suite:
    from alignkit.data.tasks import TASK_NAMES

    if name in TASK_NAMES:
        return builtin_suite(name, seed, limit)
    if Path(name).suffix.lower() in FILE_SUFFIXES:
        return instruction_suite(name, seed, limit)
    from alignkit.data import flan

    if name in flan.TEMPLATE_SETS or Path(name).suffix.lower() in (".yaml", ".yml"):
        return flan_suite(name, resolve_source(name, source, dataset), seed, limit, template, split, columns, invalid)
    raise ValueError(f"unknown task {name!r}: use a built-in task ({', '.join(TASK_NAMES)}), a Flan template set "
                     f"({', '.join(flan.TEMPLATE_SETS)}), a template .yaml, or an instruction file (.jsonl/.json/.csv)")


# ---------------------------------------------------------------------------------------------
# built-in tasks


def builtin_suite(name: str, seed: int, limit: int | None) -> Suite:
    from alignkit.data.tasks import make_task

    examples = make_task(name, "test", limit if limit is not None else BUILTIN_EVAL_ROWS, seed)
    pool = make_task(name, "train", 64, seed)  # exemplars: a fixed slice of the train split
    return Suite(name, "exact_match", examples, pool, builtin_item, lambda row: row["completion"], metrics=("exact_match",),
                 max_new_tokens=32, info={"source": "builtin", "split": "test"})


# ---------------------------------------------------------------------------------------------
# Flan template sets


def resolve_source(name: str, source: str | None, dataset: str | None) -> str:
    """Where a Flan set's rows live: NAME=SOURCE, else --dataset (or its NAME subdirectory)."""
    if source:
        return source
    if not dataset:
        raise ValueError(f"task {name!r} is a Flan template set: say where its data is with --dataset FILE_OR_DIR "
                         f"(a directory of native files, or a root holding {name}/), or --tasks {name}=SOURCE")
    root = Path(dataset)
    stem = Path(name).stem
    for candidate in (stem, stem.replace("_", ""), stem.replace("_", "-")):
        if (root / candidate).is_dir():
            return str(root / candidate)
    return dataset


def _read_split(ts, source: str, split: str, columns=None, invalid=None) -> list[dict]:
    from alignkit.data import flan

    return flan.read_task_examples(ts, source, split, columns=columns, invalid=invalid)


def _eval_split(ts, source: str, split: str, columns=None, invalid=None) -> tuple[str, list[dict]]:
    from alignkit.data.formats import DataError

    if split != "auto":
        return split, _read_split(ts, source, split, columns, invalid)
    if Path(source).is_file():
        return "train", _read_split(ts, source, "train", columns, invalid)
    errors = []
    for candidate in ("validation", "test"):
        try:
            rows = _read_split(ts, source, candidate, columns, invalid)
        except (DataError, FileNotFoundError) as error:
            errors.append(str(error))
            continue
        if not ts.is_classification or rows:
            return candidate, rows
    raise ValueError(f"{source}: no labelled validation or test split found ({'; '.join(errors)}); pass --split")


def flan_suite(name: str, source: str, seed: int, limit: int | None, template_id: str = "", split: str = "auto",
               columns: dict[str, str] | None = None, invalid=None) -> Suite:
    from alignkit.data import flan
    from alignkit.data.formats import DataError

    ts = flan.load_template_set(name)
    direct = [t for t in ts.templates if not t.inverted]  # inverted templates ask for the input: not an evaluation
    if not direct:
        raise ValueError(f"template set {ts.name!r} has only inverted templates; nothing to evaluate")
    template = ts.template(template_id) if template_id else direct[0]
    if template.inverted:
        raise ValueError(f"template {template.id!r} of {ts.name!r} is inverted (it asks for the input); pick another --template")
    split_name, rows = _eval_split(ts, source, split, columns, invalid)
    examples = _shuffled(rows, seed, limit)
    pool, pool_split = rows, split_name
    if split_name != "train" and not Path(source).is_file():
        try:
            pool, pool_split = _read_split(ts, source, "train", columns, invalid), "train"
        except (DataError, FileNotFoundError):
            pass  # no training split (AG News ships test only): exemplars from the other evaluated-split rows
    return flan_suite_from(ts, template, examples, pool, source=source, split=split_name, pool_split=pool_split)


def flan_item(template, ts, exemplars: list[dict], example: dict, options_style: str | None = None) -> KShotItem:
    """A k-shot item in the rendering of `flan.few_shot`: its text equals few_shot(...)["prompt"]."""
    from alignkit.data import flan

    style = options_style or flan.DEFAULT_OPTIONS_STYLE
    shots = [flan.render(template, e, ts, options_style=style) for e in exemplars]
    query = flan.render(template, example, ts, options_style=style)
    return KShotItem([Shot(s["prompt"], s["completion"]) for s in shots], query["prompt"], joiner="\n", delimiter="\n\n")


def flan_suite_from(ts, template, examples: list[dict], pool: list[dict], options_style: str | None = None, **info) -> Suite:
    from alignkit.data import flan

    build = lambda exemplars, example: flan_item(template, ts, exemplars, example, options_style)
    info = {"template_set": ts.name, "template": template.id, **info}
    if ts.is_classification:
        options = lambda example: flan.render(template, example, ts, options_style=options_style or flan.DEFAULT_OPTIONS_STYLE)["options"]
        words = lambda example: list(template.answers or ts.options or example["options"])
        reference = lambda example: options(example)[example["label_index"]]
        return Suite(ts.name, "classification", examples, pool, build, reference, options=options, words=words,
                     label=lambda example: example["label_index"], metrics=("accuracy",), max_new_tokens=16, info=info,
                     text_fields=[f for f in ts.fields if f != "label"])
    reference = lambda example: flan.render(template, example, ts)["completion"]
    metrics = GENERATION_METRICS.get(ts.task_type, ("rouge_l",))
    return Suite(ts.name, "generation", examples, pool, build, reference, metrics=metrics, max_new_tokens=128, info=info)


# ---------------------------------------------------------------------------------------------
# instructions with reference outputs


def read_instructions(path: str) -> list[dict]:
    """{"prompt", "references", "where"} rows. Self-Instruct's user-oriented rows give one row per instance
    (prompt = instruction, plus "\\n\\n" + input when there is one); other rows are read as SFT data, the prompt
    being the single user turn and the reference the answer."""
    from alignkit.data.formats import DataError, InvalidRows, load_sft_examples, read_rows

    rows = read_rows(path, "train")
    if not rows:
        raise DataError(path, "no rows found (empty file?)")
    if "instances" not in rows[0].data:
        examples, _ = load_sft_examples(path, "train", InvalidRows())
        out = []
        for example, row in zip(examples, rows):
            messages = example.get("messages")
            if not messages or len(messages) != 2 or messages[0]["role"] != "user":
                raise DataError(row.where, "an instruction row needs one user turn and one reference answer", field="messages")
            out.append({"prompt": messages[0]["content"], "references": [messages[1]["content"]], "where": row.where})
        return out
    out = []
    for row in rows:
        instruction = row.data.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            raise DataError(row.where, "missing or empty", field="instruction")
        instances = row.data.get("instances")
        if not isinstance(instances, list) or not instances:
            raise DataError(row.where, "must be a non-empty list of {input, output}", field="instances")
        for i, instance in enumerate(instances):
            output = instance.get("output") if isinstance(instance, dict) else None
            if not isinstance(output, str) or not output.strip():
                raise DataError(row.where, "missing or empty reference output", field=f"instances[{i}].output")
            extra = instance.get("input") or ""
            if not isinstance(extra, str):
                raise DataError(row.where, "must be a string ('' for no input)", field=f"instances[{i}].input")
            prompt = f"{instruction.strip()}\n\n{extra.strip()}" if str(extra).strip() else instruction.strip()
            out.append({"prompt": prompt, "references": [output], "where": f"{row.where} instance {i}", "id": row.data.get("id")})
    return out


def instruction_suite(path: str, seed: int, limit: int | None) -> Suite:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    rows = read_instructions(path)
    build = lambda exemplars, row: KShotItem([Shot(e["prompt"], e["references"][0]) for e in exemplars], row["prompt"], joiner="\n\n")
    return Suite(Path(path).stem, "generation", _shuffled(rows, seed, limit), rows, build, lambda row: row["references"],
                 metrics=GENERATION_METRICS["instructions"], max_new_tokens=256, info={"source": path})
