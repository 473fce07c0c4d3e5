"""The report stage: RUN/report.md, the same numbers in RUN/report.json, and PNG plots in RUN/report/.

Everything is read from this run's files (stage.json, metrics.jsonl, eval.json): no number is typed in here.
The three claims the notes make for DPO against PPO are tested on those numbers:
  1. performs as well or better:   DPO's gold score (greedy) ≥ PPO's;
  2. 5–8× less compute, about half the memory:   (RM + PPO CPU s) / DPO CPU s ≥ 5 (PPO needs the reward model, DPO
     does not; PPO alone is shown too);  DPO peak RSS / PPO peak RSS ≤ 0.6;
  3. less sensitive to the sampling temperature:   range of the gold score over eval.temperatures smaller for DPO.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from alignkit import atomic
from alignkit.pipeline.recipe import STAGES, Recipe

LOSS_KEYS = {"sft": ("loss", "eval_loss"), "rm": ("loss", "eval_loss"), "dpo": ("loss", "eval_loss"), "ppo": ("policy_loss", "value_loss")}


def metrics(run: Path, stage: str) -> list[dict]:
    path = run / stage / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return ([p[0] for p in points], [p[1] for p in points]) if points else ([], [])


def _savefig(fig, path: Path) -> None:
    with atomic.atomic_path(path) as tmp:  # a temporary name, then renamed: a failed run keeps the previous plot
        fig.savefig(tmp, dpi=100, format="png")


def plot_losses(run: Path, out: Path) -> str | None:
    stages = [s for s in LOSS_KEYS if metrics(run, s)]
    if not stages:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(stages), figsize=(3.6 * len(stages), 3.2), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        for key in LOSS_KEYS[stage]:
            x, y = _series(metrics(run, stage), key)
            if x:
                ax.plot(x, y, marker="o" if len(x) < 25 else None, markersize=3, label=key)
        ax.set_title(stage), ax.set_xlabel("iteration" if stage == "ppo" else "step"), ax.legend(fontsize=7), ax.grid(alpha=0.3)
    fig.tight_layout()
    _savefig(fig, out / "losses.png")
    plt.close(fig)
    return "losses.png"


def plot_ppo(rows: list[dict], out: Path) -> list[str]:
    """Proxy (reward model) and gold score per iteration with KL; gold and proxy against √KL (Gao et al. 2022)."""
    if not rows:
        return []
    plt = _pyplot()
    fig, (ax, ax_kl) = plt.subplots(1, 2, figsize=(8, 3.2))
    for key in ("score", "gold_score"):
        x, y = _series(rows, key)
        ax.plot(x, y, marker="o", markersize=3, label="proxy (reward model)" if key == "score" else "gold (judge)")
    ax.set_xlabel("iteration"), ax.set_ylabel("score"), ax.legend(fontsize=7), ax.grid(alpha=0.3)
    x, y = _series(rows, "kl")
    ax_kl.plot(x, y, marker="o", markersize=3, color="tab:red")
    ax_kl.set_xlabel("iteration"), ax_kl.set_ylabel("KL to SFT per response (nats)"), ax_kl.grid(alpha=0.3)
    fig.tight_layout()
    _savefig(fig, out / "ppo.png")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    root_kl = [math.sqrt(max(r["kl"], 0.0)) for r in rows]
    ax.plot(root_kl, [r["score"] for r in rows], "o-", markersize=3, label="proxy (reward model)")
    if all("gold_score" in r for r in rows):
        ax.plot(root_kl, [r["gold_score"] for r in rows], "s-", markersize=3, label="gold (judge)")
    ax.set_xlabel("√KL(π ‖ π_SFT)"), ax.set_ylabel("score"), ax.legend(fontsize=7), ax.grid(alpha=0.3)
    fig.tight_layout()
    _savefig(fig, out / "gold_vs_proxy.png")
    plt.close(fig)
    return ["ppo.png", "gold_vs_proxy.png"]


def plot_dpo(rows: list[dict], out: Path) -> str | None:
    """DPO's implicit-reward margin and accuracy per step (train) and at the end (held out)."""
    if not any("rewards/margins" in r for r in rows):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for key, label in (("rewards/margins", "margin"), ("rewards/accuracies", "accuracy")):
        x, y = _series(rows, key)
        ax.plot(x, y, "o-", markersize=3, label=f"train {label}")
        x, y = _series(rows, "eval_" + key)
        ax.plot(x, y, "s", markersize=6, label=f"held-out {label}")
    ax.set_xlabel("step"), ax.set_ylabel("implicit reward β·log π/π_ref"), ax.legend(fontsize=7), ax.grid(alpha=0.3)
    fig.tight_layout()
    _savefig(fig, out / "dpo.png")
    plt.close(fig)
    return "dpo.png"


def plot_temperatures(temperatures: dict, out: Path) -> str | None:
    if not temperatures:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for name, by_t in temperatures.items():
        ax.plot([float(t) for t in by_t], list(by_t.values()), "o-", label=name)
    ax.set_xlabel("sampling temperature"), ax.set_ylabel("gold score"), ax.legend(fontsize=7), ax.grid(alpha=0.3)
    fig.tight_layout()
    _savefig(fig, out / "temperature.png")
    plt.close(fig)
    return "temperature.png"


def _fmt(value) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _verdict(ok: bool | None) -> str:
    return "not tested (a stage is missing)" if ok is None else "**confirmed**" if ok else "**refuted**"


def claims(evaluation: dict, records: dict) -> list[dict]:
    """The notes' three claims for DPO over PPO, decided on this run's numbers."""
    table, temps = evaluation.get("models", {}), evaluation.get("temperatures", {})
    ppo, dpo = table.get("ppo"), table.get("dpo")
    out = []
    if ppo and dpo:
        ok = dpo["gold_score"] >= ppo["gold_score"]
        out.append({"claim": "DPO performs as well as or better than PPO", "confirmed": ok,
                    "numbers": f"gold score DPO {dpo['gold_score']:.3f} (KL to SFT {dpo.get('kl_to_sft', 0):.3f}) vs PPO "
                               f"{ppo['gold_score']:.3f} (KL to SFT {ppo.get('kl_to_sft', 0):.3f})"})
    p, d, rm = records.get("ppo") or {}, records.get("dpo") or {}, records.get("rm") or {}
    if p.get("cpu_seconds") and d.get("cpu_seconds"):
        # PPO also needs the reward model it optimizes (DPO does not): its compute is rm + ppo
        compute, with_rm = p["cpu_seconds"] / d["cpu_seconds"], (p["cpu_seconds"] + rm.get("cpu_seconds", 0.0)) / d["cpu_seconds"]
        memory = d["peak_rss_mb"] / p["peak_rss_mb"]
        out.append({"claim": "DPO needs 5–8× less compute", "confirmed": with_rm >= 5, "ratio": compute, "ratio_with_rm": with_rm,
                    "numbers": f"CPU time PPO {p['cpu_seconds']:.0f} s / DPO {d['cpu_seconds']:.0f} s = {compute:.1f}×; "
                               f"with the reward model PPO needs, (RM {rm.get('cpu_seconds', 0.0):.0f} s + PPO) / DPO = {with_rm:.1f}×"})
        out.append({"claim": "DPO needs about half the memory", "confirmed": memory <= 0.6, "ratio": memory,
                    "numbers": f"peak RSS DPO {d['peak_rss_mb']:.0f} MiB / PPO {p['peak_rss_mb']:.0f} MiB = {memory:.2f} "
                               "(whole process: Python and torch included)"})
    if "ppo" in temps and "dpo" in temps:
        spread = {name: max(temps[name].values()) - min(temps[name].values()) for name in ("ppo", "dpo")}
        shown = lambda name: ", ".join(f"t={t}: {v:.3f}" for t, v in temps[name].items())  # noqa: E731
        out.append({"claim": "DPO is less sensitive to the sampling temperature", "confirmed": spread["dpo"] < spread["ppo"],
                    "numbers": f"gold score range DPO {spread['dpo']:.3f} ({shown('dpo')}) vs PPO {spread['ppo']:.3f} ({shown('ppo')})"})
    return out


def stage_report(recipe: Recipe, run: Path, resume: bool) -> dict:
    from alignkit.pipeline.fingerprint import write_json_atomic
    from alignkit.runs import read_stage

    out = run / "report"
    out.mkdir(exist_ok=True)
    records = {s: read_stage(run, s) for s in STAGES if s in recipe.stages and s != "report"}
    evaluation = json.loads((run / "eval" / "eval.json").read_text()) if (run / "eval" / "eval.json").exists() else {}
    ppo_rows = [r for r in metrics(run, "ppo") if "score" in r]
    rm_rows, dpo_rows = metrics(run, "rm"), metrics(run, "dpo")
    rm_eval = [r for r in rm_rows if "eval_accuracy" in r]
    dpo_train = [r for r in dpo_rows if "rewards/margins" in r]
    dpo_eval = [r for r in dpo_rows if "eval_rewards/accuracies" in r]
    figures = [plot_losses(run, out), *plot_ppo(ppo_rows, out), plot_dpo(dpo_rows, out), plot_temperatures(evaluation.get("temperatures", {}), out)]
    tested = claims(evaluation, records)
    summary = {
        "recipe": recipe.model, "stages": {s: {k: r.get(k) for k in ("wall_seconds", "cpu_seconds", "peak_rss_mb", "status")} for s, r in records.items() if r},
        "rm": {"heldout_accuracy": rm_eval[-1]["eval_accuracy"] if rm_eval else None,
               "normalization": (json.loads((run / "rm" / "reward_normalization.json").read_text()) if (run / "rm" / "reward_normalization.json").exists() else None)},
        "ppo": [{k: r.get(k) for k in ("step", "score", "gold_score", "kl", "response_length")} for r in ppo_rows],
        "dpo": {"train_margin": dpo_train[-1]["rewards/margins"] if dpo_train else None, "train_accuracy": dpo_train[-1]["rewards/accuracies"] if dpo_train else None,
                "heldout_margin": dpo_eval[-1]["eval_rewards/margins"] if dpo_eval else None,
                "heldout_accuracy": dpo_eval[-1]["eval_rewards/accuracies"] if dpo_eval else None},
        "data": (records.get("data") or {}).get("result"),
        "eval": evaluation.get("models", {}), "temperatures": evaluation.get("temperatures", {}), "claims": tested,
    }
    write_json_atomic(run / "report.json", summary)
    (run / ".report.md.tmp").write_text(markdown(recipe, run, summary, [f for f in figures if f]))
    (run / ".report.md.tmp").replace(run / "report.md")
    return {"claims_confirmed": sum(bool(c["confirmed"]) for c in tested), "claims_tested": len(tested)}


def markdown(recipe: Recipe, run: Path, summary: dict, figures: list[str]) -> str:
    lines = ["# alignkit pipeline report", "", f"Model `{recipe.model}`, stages {', '.join(recipe.stages)}, seed {recipe.seed}; "
             f"gold judge `{recipe.gold_judge}`, comparisons labelled by `{recipe.compare.judge}`.", ""]
    table, columns = summary["eval"], ("exact_match", "gold_score", "win_rate_vs_sft", "kl_to_sft", "response_tokens", "refusal_rate", "rouge_l")
    if table:
        n = next(iter(table.values()))["n"]
        lines += [f"## Evaluation on {n} held-out prompts (greedy answers)", "", "| model | " + " | ".join(columns) + " |",
                  "|---" * (len(columns) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for name, row in table.items()]
        lines += ["", "exact_match: task answers right; gold_score: the gold judge's mean; win_rate_vs_sft: gold-judged, both orders, "
                  "ties ½; kl_to_sft: KL(model ‖ SFT) per sampled response, nats (k1); response_tokens: mean answer length; "
                  "refusal_rate: on the HHH harmful probes.", ""]
    if summary["claims"]:
        lines += ["## DPO against PPO: the notes' claims, tested on this run", "", "| claim | verdict | this run's numbers |", "|---|---|---|"]
        lines += [f"| {c['claim']} | {_verdict(c['confirmed'])} | {c['numbers']} |" for c in summary["claims"]]
        lines.append("")
    rm, dpo, ppo, data = summary["rm"], summary["dpo"], summary["ppo"], summary.get("data") or {}
    lines += ["## Stages", ""]
    if data.get("accepted_instructions") is not None:
        reasons = ", ".join(f"{k.split('/', 1)[1]} {v}" for k, v in data.items() if k.startswith("rejected/"))
        lines.append(f"- Self-Instruct: accepted {data['accepted_instructions']} of {data['candidate_instructions']} candidate instructions "
                     f"in {data['rounds']} rounds (rejected {data['rejected_instructions']}: {reasons or 'none'}); {data['sft_rows']} SFT rows, "
                     f"{data['prompts']} held out")
    if table.get("base", {}).get("rouge_l") is not None and table.get("sft", {}).get("rouge_l") is not None:
        lines.append(f"- ROUGE-L against the references of the {table['sft']['n']} eval prompts: base {table['base']['rouge_l']:.3f} → "
                     f"SFT {table['sft']['rouge_l']:.3f}")
    if rm["heldout_accuracy"] is not None:
        lines.append(f"- reward model: accuracy on held-out comparisons {rm['heldout_accuracy']:.3f}; normalized on the SFT model's "
                     f"responses (mean {rm['normalization']['mean']:.3f} → 0)" if rm["normalization"] else "")
    if dpo["heldout_accuracy"] is not None or dpo["train_margin"] is not None:
        lines.append(f"- DPO: last step margin {_fmt(dpo['train_margin'])}, implicit-reward accuracy {_fmt(dpo['train_accuracy'])}; "
                     f"held out: margin {_fmt(dpo['heldout_margin'])}, accuracy {_fmt(dpo['heldout_accuracy'])}")
    if ppo:
        first, last = ppo[0], ppo[-1]
        lines.append(f"- PPO: proxy score {_fmt(first['score'])} → {_fmt(last['score'])}, gold score {_fmt(first.get('gold_score'))} → "
                     f"{_fmt(last.get('gold_score'))}, KL to SFT {_fmt(first['kl'])} → {_fmt(last['kl'])} over {len(ppo)} iterations")
    lines += ["", "| stage | wall s | CPU s | peak RSS MiB |", "|---|---|---|---|"]
    lines += [f"| {s} | {_fmt(r['wall_seconds'])} | {_fmt(r['cpu_seconds'])} | {_fmt(r['peak_rss_mb'])} |" for s, r in summary["stages"].items()
              if r.get("wall_seconds") is not None]
    lines += ["", *[f"![{f}](report/{f})" for f in figures], ""]
    answers_file = run / "eval" / "answers.jsonl"
    if answers_file.exists():
        answers = [json.loads(line) for line in answers_file.read_text().splitlines()][: recipe.eval.samples_shown]
        lines += ["## Sample answers (greedy)", ""]
        for row in answers:
            lines.append(f"- **{row['prompt']}**" + (f" (reference `{row['reference']}`)" if row.get("reference") else ""))
            lines += [f"  - {name}: `{row[name][:160]!r}`" for name in table if name in row]
        lines.append("")
    return "\n".join(lines)
