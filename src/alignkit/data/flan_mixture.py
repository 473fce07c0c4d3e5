"""Flan-style mixing and the `alignkit data flan` command.

Examples-proportional mixing with a cap K: data set i with n_i usable rows contributes c_i = min(n_i, K) rows
(rate r_i = min(n_i, K) / Σ_j min(n_j, K)); with a total T, c_i = T·r_i rounded by largest remainder. Every draw
is seeded by the seed and the data set's name, so a mixture is reproducible byte for byte and adding a data set
does not change what the others contribute. Templates, readers and rendering live in `alignkit.data.flan`.
"""

from __future__ import annotations

import logging
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from alignkit.config import knob, refuse
from alignkit.data.flan import (
    SPLIT_ALIASES, TEMPLATE_SETS, Template, TemplateSet, choose_exemplars, few_shot, load_template_set,
    read_task_examples,
)
from alignkit import atomic
from alignkit.data.formats import DataError, InvalidRows, write_jsonl
from alignkit.flags import command_from

logger = logging.getLogger(__name__)



def mixing_rates(sizes: dict[str, int], cap: Optional[int] = None) -> dict[str, float]:
    """Examples-proportional rates with a cap K: r_i = min(n_i, K) / Σ_j min(n_j, K)."""
    capped = {name: min(n, cap) if cap is not None else n for name, n in sizes.items()}
    total = sum(capped.values())
    return {name: (n / total if total else 0.0) for name, n in capped.items()}


def mixture_counts(sizes: dict[str, int], cap: Optional[int] = None, total: Optional[int] = None) -> dict[str, int]:
    """Rows taken from each data set: min(n_i, K), or T·r_i rounded by largest remainder so they sum to T."""
    capped = {name: min(n, cap) if cap is not None else n for name, n in sizes.items()}
    if total is None:
        return capped
    if total > sum(capped.values()):
        raise ValueError(f"total_rows={total} exceeds the {sum(capped.values())} rows available after the cap {capped}")
    rates = mixing_rates(sizes, cap)
    counts = {name: int(total * rate) for name, rate in rates.items()}
    by_remainder = sorted(rates, key=lambda name: (-(total * rates[name] - counts[name]), list(rates).index(name)))
    for name in by_remainder[: total - sum(counts.values())]:
        counts[name] += 1
    return counts


@dataclass
class MixtureEntry:
    task: str  # a template set name or YAML path
    dataset: str
    split: str = "train"
    columns: Optional[dict[str, str]] = None
    templates: str = "all"  # all | direct (no inverted) | ID,ID,...
    name: str = ""


def select_templates(template_set: TemplateSet, spec: str = "all") -> list[Template]:
    if spec in ("all", ""):
        return list(template_set.templates)
    if spec == "direct":
        return [t for t in template_set.templates if not t.inverted]
    return [template_set.template(i.strip()) for i in spec.split(",") if i.strip()]


def build_mixture(entries: list[MixtureEntry], seed: int = 0, max_per_dataset: Optional[int] = None,
                  total_rows: Optional[int] = None, shots: tuple[int, ...] = (0,), delimiter: str = "\n\n",
                  invalid: Optional[InvalidRows] = None, log: Callable[[str], None] = logger.info) -> tuple[list[dict], dict]:
    """Rows of every entry, mixed examples-proportionally with a cap, rendered and shuffled; plus a summary."""
    loaded, names = [], Counter()
    for entry in entries:
        names[entry.name or entry.task] += 1
        name = entry.name or (entry.task if names[entry.task] == 1 else f"{entry.task}#{names[entry.task]}")
        ts = load_template_set(entry.task)
        skipped_before = invalid.total if invalid else 0
        examples = read_task_examples(ts, entry.dataset, entry.split, columns=entry.columns, invalid=invalid)
        pool = examples
        if max(shots) > 0 and SPLIT_ALIASES.get(entry.split, entry.split) != "train" and not Path(entry.dataset).is_file():
            try:  # exemplars come from the training split when the source has one
                pool = read_task_examples(ts, entry.dataset, "train", columns=entry.columns, invalid=invalid)
            except DataError:
                log(f"{name}: {entry.dataset} has no train split; few-shot exemplars come from its {entry.split} rows (never the query)")
        log(f"{name}: {len(examples)} rows from {entry.dataset} ({entry.split}), template set {ts.name!r}")
        skipped = (invalid.total if invalid else 0) - skipped_before
        loaded.append((name, entry, ts, examples, pool, select_templates(ts, entry.templates), skipped))
    counts = mixture_counts({name: len(ex) for name, _, _, ex, _, _, _ in loaded}, max_per_dataset, total_rows)
    rates = mixing_rates({name: len(ex) for name, _, _, ex, _, _, _ in loaded}, max_per_dataset)
    rows, summary = [], {"seed": seed, "max_per_dataset": max_per_dataset, "total_rows": total_rows, "shots": list(shots), "datasets": []}
    for name, entry, ts, examples, pool, templates, skipped in loaded:
        rng = random.Random(f"flan:{seed}:{name}")
        per_template, per_shots = Counter({t.id: 0 for t in templates}), Counter()
        for index in rng.sample(range(len(examples)), counts[name]):
            example, template, k = examples[index], rng.choice(templates), rng.choice(shots)
            exemplars = choose_exemplars(pool, example, k, rng) if k else []
            out = few_shot(template, exemplars, example, ts, delimiter, rng=rng)
            rows.append({"prompt": out["prompt"], "completion": out["completion"], "task": ts.name, "dataset": name,
                         "template_id": template.id, "inverted": template.inverted, "shots": k, "options": out["options"],
                         "source": example["where"]})
            per_template[template.id] += 1
            per_shots[k] += 1
        summary["datasets"].append({"name": name, "task": ts.name, "source": entry.dataset, "split": entry.split,
                                    "available": len(examples), "skipped_invalid": skipped, "rows": counts[name],
                                    "rate": rates[name], "templates": dict(per_template), "shots": dict(sorted(per_shots.items()))})
    random.Random(f"flan-mix:{seed}").shuffle(rows)
    summary["rows"] = len(rows)
    return rows, summary


# ---------------------------------------------------------------------------------------------
# command line: `alignkit data flan`


def parse_columns(text: Optional[str]) -> Optional[dict[str, str]]:
    """"sentence=review,label=stars" -> {"sentence": "review", "label": "stars"}."""
    if not text:
        return None
    pairs = [part.split("=", 1) for part in text.split(",") if part.strip()]
    if any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
        raise ValueError(f"--columns {text!r}: expected FIELD=COLUMN[,FIELD=COLUMN...], e.g. sentence=review,label=stars")
    return {field.strip(): column.strip() for field, column in pairs}


def _per_dataset(values: list[str], n: int, flag: str, default: Any) -> list[Any]:
    if not values:
        return [default] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise ValueError(f"{flag} given {len(values)} times for {n} --dataset(s): give it once (for all) or once per --dataset")
    return list(values)


def load_mixture(path: str) -> tuple[list[MixtureEntry], dict]:
    """A mixture YAML: top-level defaults (seed, max_per_dataset, total_rows, shots, delimiter, templates, split)
    and `datasets: [{task, dataset, split?, columns?, templates?, name?}, ...]`; relative dataset paths are taken
    relative to the YAML file when they exist there."""
    where = Path(path)
    if not where.is_file():
        raise FileNotFoundError(f"{path}: no such mixture file")
    try:
        data = yaml.safe_load(where.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise DataError(path, f"malformed YAML ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("datasets"), list) or not data["datasets"]:
        raise DataError(path, "a mixture YAML needs `datasets:`, a list of {task, dataset, split?, columns?, templates?}", field="datasets")
    entries = []
    for i, spec in enumerate(data["datasets"]):
        for key in ("task", "dataset"):
            if not isinstance(spec, dict) or not isinstance(spec.get(key), str):
                raise DataError(path, "missing (a string)", field=f"datasets[{i}].{key}")
        dataset = spec["dataset"]
        if not Path(dataset).is_absolute() and (where.parent / dataset).exists():
            dataset = str(where.parent / dataset)
        task = spec["task"]
        if task not in TEMPLATE_SETS and not Path(task).is_absolute() and (where.parent / task).exists():
            task = str(where.parent / task)
        columns = spec.get("columns")
        columns = parse_columns(columns) if isinstance(columns, str) else ({str(k): str(v) for k, v in columns.items()} if columns else None)
        entries.append(MixtureEntry(task, dataset, str(spec.get("split", data.get("split", "train"))), columns,
                                    str(spec.get("templates", data.get("templates", "all"))), str(spec.get("name", ""))))
    return entries, data


def _unescape(text: str) -> str:
    """Backslash escapes typed on a command line: \\n, \\t and \\\\ (other text, non-ASCII included, stays as is)."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def summary_path(output: str) -> Path:
    path = Path(output)
    return path.with_name((path.name[: -len(path.suffix)] if path.suffix else path.name) + ".summary.json")


def print_summary(summary: dict, console=None) -> None:
    """Two rich tables: per data set (rows available, rate, rows taken) and rows per template x data set."""
    from rich.console import Console
    from rich.table import Table

    console, sets = console or Console(), summary["datasets"]
    head = Table(title=f"Flan mixture: {summary['rows']} rows (seed {summary['seed']}, cap {summary['max_per_dataset']}, shots {summary['shots']})")
    for column in ("data set", "split", "available", "rate", "rows"):
        head.add_column(column, justify="left" if column in ("data set", "split") else "right")
    for d in sets:
        head.add_row(d["name"], d["split"], str(d["available"]), f"{d['rate']:.4f}", str(d["rows"]))
    grid = Table(title="rows per template (k = the k-th template of the set; ids in the summary JSON)")
    grid.add_column("k", justify="right")
    for d in sets:
        grid.add_column(d["name"], justify="right")
    counts = [list(d["templates"].values()) for d in sets]
    for k in range(max(map(len, counts))):
        grid.add_row(str(k + 1), *[str(c[k]) if k < len(c) else "" for c in counts])
    console.print(head)
    console.print(grid)


@dataclass
class FlanConfig:
    """Render supervised data sets through Flan-style templates and mix them into SFT-ready JSONL."""

    dataset: list[str] = knob([], "file, native directory, datasets dir or hub id; repeat for several", aliases=("--dataset_name",))
    task: list[str] = knob([], "template set (sst2, ag_news, rte, cb, trec, nli, ...) or YAML; one per --dataset", aliases=("--tasks",))
    output: str = knob("", "JSONL to write (SFT-ready prompt/completion rows)", required=True, path="output_file")
    shots: Optional[str] = knob(None, "exemplars per prompt: K, or K1,K2 to mix zero- and few-shot (default 0)")
    seed: Optional[int] = knob(None, "random seed (default 0)", min=0)
    split: list[str] = knob([], "split to read (train, validation, test); once or per --dataset", aliases=("--dataset_split",))
    columns: list[str] = knob([], "FIELD=COLUMN,... to read other data sets; once or per --dataset")
    max_per_dataset: Optional[int] = knob(None, "cap K of examples-proportional mixing (Flan: 3000/30000)", min=1)
    total_rows: Optional[int] = knob(None, "draw this many rows in total at the mixing rates", min=1)
    mixture: Optional[str] = knob(None, "mixture YAML (datasets and defaults); flags override its defaults")
    templates: Optional[str] = knob(None, "all | direct (no inverted) | ID,ID,...")
    delimiter: Optional[str] = knob(None, "between few-shot exemplars; backslash escapes allowed (default \\n\\n, a blank line)")
    skip_invalid: bool = knob(False, "skip (and count) bad rows instead of stopping")

    def validate(self) -> None:
        if len(self.dataset) != len(self.task):
            refuse("task", f"give one --task per --dataset (got {len(self.dataset)} --dataset, {len(self.task)} --task)")
        if not self.dataset and not self.mixture:
            refuse("dataset", "nothing to render: give --dataset FILE_OR_ID --task NAME (repeatable) or --mixture mix.yaml")


def run_flan(cfg: FlanConfig) -> None:
    """The `alignkit data flan` command: FlanConfig's flags over the --mixture file's defaults."""
    entries, defaults = load_mixture(cfg.mixture) if cfg.mixture else ([], {})
    if not cfg.dataset and not entries:
        raise ValueError(f"{cfg.mixture}: lists no datasets; add a `datasets:` list or give --dataset FILE_OR_ID --task NAME")
    splits = _per_dataset(cfg.split, len(cfg.dataset), "--split", str(defaults.get("split", "train")))
    column_maps = _per_dataset(cfg.columns, len(cfg.dataset), "--columns", None)
    for d, t, s, c in zip(cfg.dataset, cfg.task, splits, column_maps):
        entries.append(MixtureEntry(t, d, s, parse_columns(c), "all"))
    if cfg.templates is not None:
        for entry in entries:
            entry.templates = cfg.templates
    shots_text = str(cfg.shots if cfg.shots is not None else defaults.get("shots", 0))
    try:
        shot_counts = tuple(int(k) for k in shots_text.split(","))
    except ValueError:
        raise ValueError(f"--shots {shots_text!r}: expected K or K1,K2,... (whole numbers)") from None
    if min(shot_counts) < 0:
        raise ValueError(f"--shots {shots_text!r}: must be >= 0")
    delimiter_text = cfg.delimiter if cfg.delimiter is not None else str(defaults.get("delimiter", "\\n\\n"))
    invalid = InvalidRows(skip=cfg.skip_invalid)
    rows, summary = build_mixture(
        entries, cfg.seed if cfg.seed is not None else int(defaults.get("seed", 0)),
        cfg.max_per_dataset if cfg.max_per_dataset is not None else defaults.get("max_per_dataset"),
        cfg.total_rows if cfg.total_rows is not None else defaults.get("total_rows"), shot_counts,
        _unescape(delimiter_text), invalid, log=logger.info)
    if invalid.total:
        logger.info(invalid.summary())
        summary["skipped_invalid"] = dict(invalid.counts)
    write_jsonl(rows, cfg.output)
    summary["output"] = cfg.output
    atomic.write_json(summary_path(cfg.output), summary, indent=2)
    print_summary(summary)  # the command's output: the mixture's table, on stdout
    logger.info(f"wrote {len(rows)} rows to {cfg.output} and the summary to {summary_path(cfg.output)}")


flan_command = command_from(FlanConfig, run_flan)
