"""Results as JSON (one record per task, shots and metric), a markdown table and PNG plots.

Files written next to OUT.json: OUT.md (the tables), OUT.png (the plot), OUT.predictions.jsonl (every
prompt, answer and verdict, to read what the numbers count).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from alignkit import atomic


def record(task: str, shots: int | None, metric: str, value: float, n: int, **extra) -> dict:
    """One measured number: which task, how many shots (None where it does not apply), which metric, the
    value and the number of examples it averages over; extra fields (stderr, method, framing) follow."""
    return {"task": task, "shots": shots, "metric": metric, "value": value, "n": n, **extra}


def sidecar(output: str | Path, suffix: str) -> Path:
    """OUT.json -> OUT<suffix> (e.g. OUT.md)."""
    path = Path(output)
    return path.with_name(path.stem + suffix) if path.suffix == ".json" else path.with_name(path.name + suffix)


def read_results(output: str | Path) -> dict | None:
    path = Path(output)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not a results JSON file ({error}); pass another --output or delete it") from None


def write_json(payload: dict, output: str | Path) -> Path:
    # atomic: a crash mid-write never leaves a half file (for --resume to read, or instead of the last good one)
    return atomic.write_json(output, payload)


def write_predictions(rows: Sequence[dict], output: str | Path) -> Path:
    """OUT.predictions.jsonl, replaced atomically."""
    return atomic.write_jsonl(sidecar(output, ".predictions.jsonl"), rows)


def write_markdown(output: str | Path, text: str) -> Path:
    """OUT.md, replaced atomically."""
    return atomic.write_text(sidecar(output, ".md"), text)


def save_figure(fig, out_png: str | Path) -> None:
    with atomic.atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def _fmt(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.3f}" if abs(value) < 1.5 else f"{value:.2f}"
    return "–" if value is None else str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def records_markdown(records: Sequence[dict], title: str) -> str:
    """Records as one table: a row per (task, metric), a column per shot count."""
    shots = sorted({r["shots"] for r in records if r["shots"] is not None})
    keyed: dict[tuple[str, str], dict] = {}
    for r in records:
        row = keyed.setdefault((r["task"], r["metric"]), {"task": r["task"], "metric": r["metric"], "n": r["n"]})
        row["value" if r["shots"] is None else f"{r['shots']}-shot"] = r["value"]
        row["n"] = min(row["n"], r["n"])
    columns = ["task", "metric", *[f"{k}-shot" for k in shots]]
    if any(r["shots"] is None for r in records):
        columns.append("value")
    return f"## {title}\n\n" + markdown_table(list(keyed.values()), [*columns, "n"]) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_shots(records: Sequence[dict], out_png: str | Path) -> Path | None:
    """One line per (task, metric) over the shot counts; metrics on [0, 100] get their own axis."""
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in records:
        if r["shots"] is not None and r["metric"] != "unparsed_rate":
            series.setdefault((r["task"], r["metric"]), []).append((r["shots"], r["value"]))
    if not series:
        return None
    plt = _pyplot()
    wide = {k: v for k, v in series.items() if max(y for _, y in v) > 1.0}
    unit = {k: v for k, v in series.items() if k not in wide}
    panels = [(name, group) for name, group in (("[0, 1]", unit), ("[0, 100]", wide)) if group]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.8), squeeze=False)
    for ax, (scale, group) in zip(axes[0], panels):
        for (task, metric), points in sorted(group.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{task} {metric}")
        ax.set_xlabel("shots")
        ax.set_ylabel(f"score {scale}")
        ax.set_xticks(sorted({p[0] for v in group.values() for p in v}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out_png)
    plt.close(fig)
    return Path(out_png)


def plot_sensitivity(rows: Sequence[dict], out_png: str | Path, metric_keys: Sequence[str] = ("accuracy", "accuracy_calibrated"),
                     baseline: float | None = None) -> Path:
    """Accuracy of every condition, one column of points per factor; calibrated points beside the raw ones; a dashed
    line at `baseline` (the share of the most frequent label: what always answering it scores)."""
    plt = _pyplot()
    factors = list(dict.fromkeys(r["factor"] for r in rows))
    keys = [k for k in metric_keys if any(r.get(k) is not None for r in rows)]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(factors), 3.8))
    width = 0.35 if len(keys) > 1 else 0.0
    for j, key in enumerate(keys):
        xs, ys = [], []
        for i, factor in enumerate(factors):
            values = [r[key] for r in rows if r["factor"] == factor and r.get(key) is not None]
            xs += [i + (j - (len(keys) - 1) / 2) * width] * len(values)
            ys += values
        ax.scatter(xs, ys, alpha=0.7, label=key.replace("_", " "))
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle="--", linewidth=1, label="most frequent label")
    ax.set_xticks(range(len(factors)))
    ax.set_xticklabels(factors)
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out_png)
    plt.close(fig)
    return Path(out_png)


def plot_bars(values: dict[str, float], out_png: str | Path, ylabel: str = "rate") -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.5 + 0.9 * len(values), 3.8))
    ax.bar(range(len(values)), list(values.values()))
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(list(values), rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    save_figure(fig, out_png)
    plt.close(fig)
    return Path(out_png)
