"""Stages in order, with a report. For now the demo: SFT of the built-in model on built-in tasks,
exact match and sample answers before and after."""

from __future__ import annotations

import json
from pathlib import Path

DEMO_TASKS = ("arithmetic", "comparison", "word_length", "spelling", "sorting", "reversal")


def plot_curve(metrics_file: Path, out_png: Path, keys: tuple[str, ...] = ("loss", "eval_loss")) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in keys:
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), marker="o" if len(points) < 20 else None, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def run_demo(model_name_or_path: str, output_dir: str, max_steps: int, eval_per_task: int, train_per_task: int = 300) -> dict:
    from rich.console import Console
    from rich.table import Table

    from alignkit import atomic
    from alignkit.config import SFTConfig
    from alignkit.data import tasks
    from alignkit.evaluate.tasks import exact_match_eval
    from alignkit.models import load_causal_lm, load_tokenizer
    from alignkit.train.sft import formatting, run_sft

    console = Console()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = ",".join(DEMO_TASKS)
    cfg = SFTConfig(
        model_name_or_path=model_name_or_path, dataset=f"builtin:{names}:{train_per_task}",
        eval_dataset=f"builtin:{names}:{eval_per_task}", output_dir=str(out / "sft"), max_steps=max_steps,
        per_device_train_batch_size=8, learning_rate=5e-5, lr_scheduler_type="cosine", warmup_ratio=0.1,
        logging_steps=5, max_length=256, seed=0,
        overwrite_output_dir=True,  # running the demo again replaces its own previous SFT run
    )
    test_rows = tasks.make_mixture(list(DEMO_TASKS), "test", eval_per_task, seed=0)
    tokenizer = load_tokenizer(model_name_or_path)

    console.rule("[bold]1/3 the built-in model before fine-tuning")
    before = exact_match_eval(load_causal_lm(model_name_or_path), tokenizer, test_rows, formatting(cfg), progress="answering")
    console.rule("[bold]2/3 supervised fine-tuning")
    run_sft(cfg)
    console.rule("[bold]3/3 the fine-tuned model")
    after = exact_match_eval(load_causal_lm(cfg.output_dir), tokenizer, test_rows, formatting(cfg), progress="answering")

    table = Table(title=f"exact match on held-out built-in tasks ({eval_per_task} per task)")
    for column in ("task", "before", "after"):
        table.add_column(column)
    lines = ["| task | before | after |", "|---|---|---|"]
    for task in DEMO_TASKS:
        b, a = before["per_task"][task], after["per_task"][task]
        table.add_row(task, f"{b:.2f}", f"{a:.2f}")
        lines.append(f"| {task} | {b:.2f} | {a:.2f} |")
    table.add_row("all", f"{before['exact_match']:.2f}", f"{after['exact_match']:.2f}", style="bold")
    lines.append(f"| **all** | **{before['exact_match']:.2f}** | **{after['exact_match']:.2f}** |")
    console.print(table)

    samples = ["", "## Samples (greedy)", ""]
    for index in range(0, len(test_rows), max(1, len(test_rows) // 6))[:6]:
        b, a = before["predictions"][index], after["predictions"][index]
        samples += [f"- **{b['prompt']}** (reference `{b['completion']}`)", f"  - before: `{b['prediction'][:120]!r}`", f"  - after: `{a['prediction'][:120]!r}`"]
        console.print(f"[bold]{b['prompt']}[/]  (reference {b['completion']!r})\n  before: {b['prediction'][:80]!r}\n  after:  {a['prediction'][:80]!r}")
    plot_curve(out / "sft" / "metrics.jsonl", out / "sft_loss.png")
    report = [
        "# alignkit demo report", "",
        f"Model `{model_name_or_path}`, SFT for {max_steps} steps on built-in tasks ({', '.join(DEMO_TASKS)}), "
        f"batch 8, lr {cfg.learning_rate}. Held-out exact match:", "", *lines, *samples, "", "![SFT loss](sft_loss.png)", "",
    ]
    atomic.write_text(out / "report.md", "\n".join(report))
    result = {"before": {k: v for k, v in before.items() if k != "predictions"}, "after": {k: v for k, v in after.items() if k != "predictions"}}
    atomic.write_json(out / "results.json", result)
    console.print(f"report: {out / 'report.md'}")
    return result
