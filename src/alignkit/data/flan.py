"""Flan-style instruction data: supervised data sets -> (prompt, completion) rows through hand-written templates.

A *template set* is a YAML file (built-in ones in `alignkit/data/templates/`, or your own path): the canonical
fields of the task, for classification the options in label order, the column layouts ("formats") it can read,
and about ten templates. A template is a prompt and a completion with `{field}` placeholders; classification
templates also use `{answer}` (the label's text) and `{options}` (the option list, header and markers varied as
Flan does). An *inverted* template turns the task around (give the label, ask for the input).

Mixing several data sets and the `alignkit data flan` command: `alignkit.data.flan_mixture`.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from alignkit.data.formats import DataError, InvalidRows, Row, read_rows

TEMPLATE_SETS: tuple[str, ...] = (
    "sst2", "ag_news", "rte", "cb", "trec",  # real data sets: read the hub's columns and the native files
    "binary_classification", "multiclass_classification", "nli", "qa", "qa_context",
    "translation", "summarization", "builtin_tasks",  # generic: map your columns onto their fields
)
CLASSIFICATION_TYPES = ("binary_classification", "multiclass_classification", "nli")
TASK_TYPES = CLASSIFICATION_TYPES + ("qa", "qa_context", "translation", "text_to_text", "builtin")
SPLIT_ALIASES = {"dev": "validation", "val": "validation", "valid": "validation"}

# Flan varies how the options are introduced and marked; a style is "HEADER|MARKER", e.g. "Choices:|(A)".
OPTION_HEADERS = ("OPTIONS:", "Options:", "Choices:", "Choose from:", "Pick from:", "Select from the following.",
                  "Possible answers:", "Available choices:", "Choose your answer from:", "Pick your answer from:")


def _letters(i: int, base: str) -> str:
    return base[i % 26] * (i // 26 + 1)


def _roman(n: int) -> str:
    out = ""
    for value, numeral in ((1000, "m"), (900, "cm"), (500, "d"), (400, "cd"), (100, "c"), (90, "xc"), (50, "l"),
                           (40, "xl"), (10, "x"), (9, "ix"), (5, "v"), (4, "iv"), (1, "i")):
        count, n = divmod(n, value)
        out += numeral * count
    return out


OPTION_MARKERS: dict[str, Callable[[int], str]] = {  # the key is how the first option is marked
    "-": lambda i: "- ",
    "*": lambda i: "* ",
    "+": lambda i: "+ ",
    "(A)": lambda i: f"({_letters(i, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ')}) ",
    "A.": lambda i: f"{_letters(i, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ')}. ",
    "a)": lambda i: f"{_letters(i, 'abcdefghijklmnopqrstuvwxyz')}) ",
    "(i)": lambda i: f"({_roman(i + 1)}) ",
    "1.": lambda i: f"{i + 1}. ",
    "[1]": lambda i: f"[{i + 1}] ",
}
DEFAULT_OPTIONS_STYLE = "OPTIONS:|-"
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


@dataclass
class Template:
    id: str
    prompt: str
    completion: str
    inverted: bool = False
    answers: Optional[list[str]] = None  # this template's words for the options, in label order


@dataclass
class Format:
    """One column layout a set can read: canonical field -> column ("col", "a.b.0", "{A} {B}" or 'literal')."""

    name: str
    columns: dict[str, str]
    labels: dict[str, str] = field(default_factory=dict)  # raw label value (as text) -> option text
    line_pattern: Optional[str] = None  # for .txt files: a regex whose named groups are the columns


@dataclass
class TemplateSet:
    name: str
    task_type: str
    options: Optional[list[str]]  # label order; None for generation tasks, or taken from the data (generic sets)
    templates: list[Template]
    fields: list[str] = field(default_factory=list)  # canonical fields; "label" for classification
    formats: list[Format] = field(default_factory=list)
    native_files: dict[str, str] = field(default_factory=dict)  # split -> file name in a native directory
    labels: dict[str, str] = field(default_factory=dict)  # raw label -> option text, for formats without their own
    description: str = ""
    path: str = ""

    @property
    def is_classification(self) -> bool:
        return self.task_type in CLASSIFICATION_TYPES

    def template(self, template_id: str) -> Template:
        for template in self.templates:
            if template.id == template_id:
                return template
        raise DataError(self.path, f"no template {template_id!r}; it has {[t.id for t in self.templates]}", field="templates")


# ---------------------------------------------------------------------------------------------
# loading and validating template sets


def load_template_set(name_or_yaml_path: str) -> TemplateSet:
    """A built-in set by name (see TEMPLATE_SETS) or a .yaml/.json file of your own."""
    if name_or_yaml_path in TEMPLATE_SETS:
        where = f"alignkit/data/templates/{name_or_yaml_path}.yaml"
        text = resources.files("alignkit.data").joinpath(f"templates/{name_or_yaml_path}.yaml").read_text(encoding="utf-8")
    elif Path(name_or_yaml_path).suffix.lower() in (".yaml", ".yml", ".json"):
        if not Path(name_or_yaml_path).is_file():
            raise FileNotFoundError(f"{name_or_yaml_path}: no such template file")
        where, text = name_or_yaml_path, Path(name_or_yaml_path).read_text(encoding="utf-8")
    else:
        raise DataError(name_or_yaml_path, f"unknown task (template set); built-in sets: {', '.join(TEMPLATE_SETS)}; "
                        "or give the path of a .yaml template file", field="task")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        raise DataError(f"{where}:{mark.line + 1}" if mark else where, f"malformed YAML ({getattr(error, 'problem', error)})") from None
    return _template_set(data, where)


def _need(data: Any, key: str, kind: type | tuple, where: str, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise DataError(where, f"must be a mapping, got {type(data).__name__}", field=prefix.rstrip(".") or None)
    if key not in data or data[key] is None:
        raise DataError(where, "missing", field=prefix + key)
    if not isinstance(data[key], kind):
        expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise DataError(where, f"must be a {expected}, got {type(data[key]).__name__}", field=prefix + key)
    return data[key]


def _template_set(data: Any, where: str) -> TemplateSet:
    if not isinstance(data, dict):
        raise DataError(where, "a template set is a mapping with name, task_type, fields, templates")
    task_type = _need(data, "task_type", str, where)
    if task_type not in TASK_TYPES:
        raise DataError(where, f"unknown task_type {task_type!r}; one of {TASK_TYPES}", field="task_type")
    fields = [str(f) for f in _need(data, "fields", list, where)]
    classification = task_type in CLASSIFICATION_TYPES
    if classification and "label" not in fields:
        raise DataError(where, "a classification set needs a 'label' field", field="fields")
    options = data.get("options")
    if options is not None and (not classification or not isinstance(options, list) or len(options) < 2):
        raise DataError(where, "options: a list of at least 2 answer texts in label order, for classification sets only", field="options")
    options = [str(o) for o in options] if options is not None else None
    default_labels = {str(k): str(v) for k, v in (data.get("labels") or {}).items()}
    formats = []
    for i, spec in enumerate(data.get("formats") or [{"name": "columns as named", "columns": {f: f for f in fields}}]):
        columns = {str(k): str(v) for k, v in _need(spec, "columns", dict, where, f"formats[{i}].").items()}
        if set(fields) - set(columns):
            raise DataError(where, f"does not say where to read {sorted(set(fields) - set(columns))}", field=f"formats[{i}].columns")
        labels = {str(k): str(v) for k, v in (spec.get("labels") or {}).items()} or default_labels
        for raw, text in labels.items():
            if options is not None and text not in options:
                raise DataError(where, f"label {raw!r} maps to {text!r}, which is not one of the options {options}", field=f"formats[{i}].labels")
        formats.append(Format(str(spec.get("name", f"format {i + 1}")), columns, labels, spec.get("line_pattern")))
    allowed = ({f for f in fields if f != "label"} | {"answer", "options"}) if classification else set(fields)
    templates, seen = [], set()
    for i, spec in enumerate(_need(data, "templates", list, where)):
        prefix = f"templates[{i}]."
        template = Template(str(_need(spec, "id", (str, int), where, prefix)), _need(spec, "prompt", str, where, prefix),
                            _need(spec, "completion", str, where, prefix), bool(spec.get("inverted", False)), spec.get("answers"))
        name = f"template {template.id!r}"
        if template.id in seen:
            raise DataError(where, f"{name}: the id is used twice; ids must be unique", field=prefix + "id")
        seen.add(template.id)
        for part in ("prompt", "completion"):
            unknown = set(_PLACEHOLDER.findall(getattr(template, part))) - allowed
            if unknown:
                raise DataError(where, f"{name}: unknown placeholder(s) {sorted(unknown)}; allowed: {sorted(allowed)}", field=prefix + part)
        if "{options}" in template.completion:
            raise DataError(where, f"{name}: {{options}} belongs in the prompt", field=prefix + "completion")
        if classification and not template.inverted and "{answer}" not in template.completion:
            raise DataError(where, f"{name}: a classification completion must contain {{answer}}", field=prefix + "completion")
        if template.answers is not None:
            if not classification or not isinstance(template.answers, list) or (options and len(template.answers) != len(options)):
                raise DataError(where, f"{name}: answers must list one text per option ({options})", field=prefix + "answers")
            template.answers = [str(a) for a in template.answers]
        templates.append(template)
    if not templates:
        raise DataError(where, "no templates", field="templates")
    native = {SPLIT_ALIASES.get(str(k), str(k)): str(v) for k, v in (data.get("native_files") or {}).items()}
    return TemplateSet(str(data.get("name", Path(where).stem)), task_type, options, templates, fields, formats, native,
                       default_labels, str(data.get("description", "")).strip(), where)


# ---------------------------------------------------------------------------------------------
# reading examples


def _is_datasets_dir(path: Path) -> bool:
    return any((path / name).exists() for name in ("dataset_dict.json", "dataset_info.json", "state.json"))


def _read_txt(path: Path, pattern: Optional[str]) -> list[Row | DataError]:
    if pattern is None:
        raise DataError(str(path), "this template set reads no .txt files (no format with a line_pattern); use .jsonl/.csv")
    regex, items = re.compile(pattern), []
    with open(path, "rb") as handle:  # bytes, so that a line that is not UTF-8 is one bad row
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                items.append(DataError(where, f"not UTF-8 text ({error.reason} at byte {error.start + 1})", reason="not UTF-8"))
                continue
            match = regex.match(line.rstrip("\r\n"))
            bad = DataError(where, f"does not match the line format {pattern!r}", reason="malformed line")
            items.append(Row(match.groupdict(), where) if match else bad)
    return items


def _source_rows(ts: TemplateSet, source: str, split: str, invalid: InvalidRows) -> list[Row]:
    path = Path(source)
    if path.is_dir() and not _is_datasets_dir(path):  # a directory of native files, one per split
        split = SPLIT_ALIASES.get(split, split)
        present = {s: f for s, f in ts.native_files.items() if (path / f).exists()}
        if split not in present:
            raise DataError(source, f"no {split!r} split here for template set {ts.name!r} (expects {ts.native_files or 'no native files'}; "
                            f"found splits {sorted(present)}): pass --split one of those")
        path = path / present[split]
    if path.suffix.lower() == ".txt":
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file")
        pattern = next((f.line_pattern for f in ts.formats if f.line_pattern), None)
        return [item for item in _read_txt(path, pattern) if isinstance(item, Row) or invalid.report(item)]
    return read_rows(str(path), split, invalid)


def _lookup(data: Any, column: str) -> Any:
    """A column; "a.b.0" walks into dicts and lists (the hub's nested fields, e.g. answers.text.0)."""
    value = data
    for part in column.split(".") if column not in data else [column]:
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def _column_value(row: Row, spec: str, canonical: str, ts_name: str) -> Any:
    if len(spec) >= 2 and spec[0] == spec[-1] and spec[0] in "'\"":
        return spec[1:-1]  # a literal, e.g. source_language='German'
    columns = _PLACEHOLDER.findall(spec) or [spec]
    values = {}
    for column in columns:
        value = _lookup(row.data, column)
        if value is None or (isinstance(value, str) and not value.strip()):
            problem = "missing" if value is None else "is empty"
            raise DataError(row.where, f"{problem} (template set {ts_name!r} reads its field '{canonical}' from it; "
                            f"to read another column pass --columns {canonical}=YOUR_COLUMN)", field=column, reason=f"{problem} column '{column}'")
        values[column] = value
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), spec) if _PLACEHOLDER.search(spec) else values[spec]


def _pick_format(ts: TemplateSet, row: Row, columns: Optional[dict[str, str]]) -> Format:
    if columns:
        unknown = set(columns) - set(ts.fields)
        if unknown:
            message = f"--columns names {sorted(unknown)}, which template set {ts.name!r} does not have; its fields: {ts.fields}"
            raise DataError(row.where, message, field="columns")
        return Format("--columns", {**{f: f for f in ts.fields}, **columns}, ts.labels)
    from_txt = row.where.split(":")[0].lower().endswith(".txt")
    candidates = [f for f in ts.formats if bool(f.line_pattern) == from_txt] or ts.formats

    def missing(fmt: Format) -> list[str]:
        needed = [c for spec in fmt.columns.values() if not spec.startswith(("'", '"')) for c in (_PLACEHOLDER.findall(spec) or [spec])]
        return [c for c in needed if _lookup(row.data, c) is None]

    for fmt in candidates:
        if not missing(fmt):
            return fmt
    closest = min(candidates, key=lambda f: len(missing(f)))
    layouts = "; ".join(f"{f.name}: {sorted(set(f.columns.values()))}" for f in candidates)
    unlabeled = " (an unlabeled split, e.g. a test set without labels, cannot be rendered: use train or validation)" \
        if ts.is_classification and missing(closest) == [closest.columns["label"]] else ""
    raise DataError(row.where, f"missing{unlabeled}; the row has columns {sorted(map(str, row.data))}, template set {ts.name!r} reads {layouts}; "
                    f"map yours with --columns FIELD=COLUMN,... (fields: {ts.fields})", field=missing(closest)[0], reason="missing column")


def _label_text(ts: TemplateSet, fmt: Format, row: Row, raw: Any) -> str:
    key = str(raw).strip()
    if key in fmt.labels:
        return fmt.labels[key]
    by_lower = {o.lower(): o for o in ts.options or []}
    if key.lower() in by_lower:
        return by_lower[key.lower()]
    if ts.options is None and not fmt.labels:
        return key  # generic set: the options are the distinct labels of the data
    hint = ("-1 marks an unlabeled row (GLUE/SuperGLUE test splits): use the train or validation split"
            if key == "-1" else f"expected one of {sorted(set(fmt.labels) | set(ts.options or []))}")
    raise DataError(row.where, f"unknown label {raw!r}: {hint}", field=fmt.columns.get("label", "label"), reason="unknown label")


def _label_order(label: str) -> tuple:
    """Numbers in numeric order ("2" before "10"), then text in alphabetical order."""
    number = label.lstrip("-").isdigit()
    return (not number, int(label) if number else 0, label)


def read_task_examples(template_set: TemplateSet, source: str, split: str = "train", limit: Optional[int] = None,
                       columns: Optional[dict[str, str]] = None, invalid: Optional[InvalidRows] = None) -> list[dict]:
    """Canonical examples {field: text, ..., "where": "file:line"} from a file, a directory of native files, a saved
    `datasets` directory or a hub id. Classification examples carry "label" (the answer text, one of the options)
    and "label_index"; for sets whose options come from the data, also "options" (sorted distinct labels)."""
    invalid = invalid or InvalidRows()
    skipped_before = invalid.total
    rows = _source_rows(template_set, source, split, invalid)
    if not rows:
        raise DataError(source, f"no usable rows ({invalid.total - skipped_before} skipped: {dict(invalid.counts)})"
                        if invalid.total > skipped_before else "no rows found (empty file?)")
    fmt = _pick_format(template_set, rows[0], columns)
    examples = []
    for row in rows:
        try:
            example = {f: _column_value(row, spec, f, template_set.name) for f, spec in fmt.columns.items()}
            if template_set.is_classification:
                example["label"] = _label_text(template_set, fmt, row, example["label"])
            examples.append({k: v if k == "label" or isinstance(v, str) else str(v) for k, v in example.items()} | {"where": row.where})
        except DataError as error:
            invalid.report(error)
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise DataError(source, f"no usable rows ({invalid.total - skipped_before} skipped: {dict(invalid.counts)})")
    if template_set.is_classification:
        options = template_set.options or sorted({e["label"] for e in examples}, key=_label_order)
        for example in examples:
            example["label_index"] = options.index(example["label"])
            if template_set.options is None:
                example["options"] = options
    return examples


# ---------------------------------------------------------------------------------------------
# rendering


def random_options_style(rng: random.Random) -> str:
    return f"{rng.choice(OPTION_HEADERS)}|{rng.choice(list(OPTION_MARKERS))}"


def render_options(options: list[str], style: str = DEFAULT_OPTIONS_STYLE) -> str:
    """The {options} block: a header line, then one marked option per line ("OPTIONS:\\n- negative\\n- positive")."""
    header, _, marker = style.rpartition("|")
    if marker not in OPTION_MARKERS:
        raise ValueError(f"options style {style!r}: marker {marker!r} is not one of {list(OPTION_MARKERS)}")
    return "\n".join([header] + [OPTION_MARKERS[marker](i) + option for i, option in enumerate(options)])


def _fill(text: str, values: dict, template: Template) -> str:
    def value(match: re.Match) -> str:
        name = match.group(1)
        if values.get(name) is None:
            raise DataError(str(values.get("where", "example")), f"template {template.id!r} needs it", field=name, reason=f"missing field '{name}'")
        return str(values[name])

    return _PLACEHOLDER.sub(value, text)  # values are inserted once, never re-scanned for braces


def _options_of(template_set: TemplateSet, example: dict) -> Optional[list[str]]:
    return (template_set.options or example.get("options")) if template_set.is_classification else None


def render(template: Template, example: dict, template_set: TemplateSet, rng: Optional[random.Random] = None,
           options_style: Optional[str] = None) -> dict:
    """-> {"prompt", "completion", "template_id", "options"}; "options" are the candidate completions in label order
    for a (non-inverted) classification template, None otherwise. The options style is `options_style`, else drawn
    from `rng` (one draw, only for templates with {options}), else DEFAULT_OPTIONS_STYLE."""
    options, values, candidates = _options_of(template_set, example), dict(example), None
    if options is not None:
        words = template.answers or options
        if len(words) != len(options):
            raise DataError(template_set.path, f"template {template.id!r} has {len(words)} answers for {len(options)} options", field="answers")
        if "label_index" in example:
            values["answer"] = words[example["label_index"]]
        if "{options}" in template.prompt:
            style = options_style or (random_options_style(rng) if rng is not None else DEFAULT_OPTIONS_STYLE)
            values["options"] = render_options(words, style)
        if not template.inverted:
            candidates = [_fill(template.completion, {**values, "answer": word}, template) for word in words]
    return {"prompt": _fill(template.prompt, values, template), "completion": _fill(template.completion, values, template),
            "template_id": template.id, "options": candidates}


def _content(example: dict) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in example.items() if k != "where"))


def choose_exemplars(pool: list[dict], example: dict, k: int, rng: random.Random) -> list[dict]:
    """k exemplars drawn from `pool` without replacement, never the query itself (nor a duplicate of it)."""
    query = _content(example)
    for attempt in range(2):  # a small draw nearly always suffices; scan the whole pool only if it does not
        indices = rng.sample(range(len(pool)), min(len(pool), k + 4)) if attempt == 0 else list(range(len(pool)))
        chosen = [pool[i] for i in indices if _content(pool[i]) != query][:k]
        if len(chosen) == k:
            return chosen
    raise ValueError(f"asked for {k} exemplars, but the pool has only {len(chosen)} rows besides the query")


def few_shot(template: Template, exemplars: list[dict], example: dict, template_set: TemplateSet, delimiter: str = "\n\n",
             rng: Optional[random.Random] = None, options_style: Optional[str] = None, answer_separator: str = "\n") -> dict:
    """k solved exemplars, then the query, all with the same template and option style:
    prompt = ex_1.prompt + answer_separator + ex_1.completion + delimiter + ... + delimiter + query.prompt."""
    if any(_content(e) == _content(example) for e in exemplars):
        raise ValueError(f"the query ({example.get('where', 'example')}) is among its own exemplars")
    style = options_style or (random_options_style(rng) if rng is not None else DEFAULT_OPTIONS_STYLE)
    shots = [render(template, e, template_set, options_style=style) for e in exemplars]
    query = render(template, example, template_set, options_style=style)
    parts = [s["prompt"] + answer_separator + s["completion"] for s in shots] + [query["prompt"]]
    return {**query, "prompt": delimiter.join(parts), "shots": len(exemplars)}
