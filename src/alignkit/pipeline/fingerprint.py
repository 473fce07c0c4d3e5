"""Which stages must run: each stage's fingerprint, and its record in RUN/<stage>/stage.json.

fingerprint(stage) = SHA-256 of (its recipe section, the recipe's shared keys it reads, and the fingerprints of
the stages whose outputs it reads). A change anywhere upstream therefore changes every fingerprint after it, and
a change in one section (say dpo.beta) changes only that stage and those that read its output (eval, report).

stage.json: {"stage", "fingerprint", "status": "running" | "done", "wall_seconds", "cpu_seconds", "peak_rss_mb",
"started", "finished", ...}. A stage is skipped when its stage.json says done with the same fingerprint. A stage
whose stage.json says running with the same fingerprint was interrupted: it resumes from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from alignkit.pipeline.recipe import STAGES, Recipe
from alignkit.runs import read_stage, stage_file

# the stages whose outputs each stage reads
INPUTS = {
    "data": (),
    "sft": ("data",),
    "compare": ("data", "sft"),
    "rm": ("compare", "sft"),
    "ppo": ("data", "sft", "rm"),
    "dpo": ("compare", "sft"),
    "eval": ("data", "sft", "ppo", "dpo"),
    "report": ("data", "sft", "compare", "rm", "ppo", "dpo", "eval"),
}
# the recipe's shared keys each stage reads
SHARED = {
    "data": ("model", "seed"),  # self_instruct generates with the model
    "sft": ("model", "seed", "mixed_precision"),
    "compare": ("seed", "gold_judge"),
    "rm": ("seed", "mixed_precision"),
    "ppo": ("seed", "gold_judge", "mixed_precision"),
    "dpo": ("seed", "mixed_precision"),
    "eval": ("model", "seed", "gold_judge"),
    "report": (),
}
RESUMABLE = ("sft", "rm", "ppo", "dpo")  # training stages: checkpoints; the others are rerun when interrupted
FORMAT_VERSION = 1  # bump when a stage's outputs change meaning, so old runs rerun


def fingerprints(recipe: Recipe) -> dict[str, str]:
    """Fingerprint of every stage the recipe runs (a skipped upstream stage contributes nothing)."""
    prints: dict[str, str] = {}
    for stage in STAGES:
        if stage not in recipe.stages:
            continue
        section = getattr(recipe, stage, None)
        payload = {
            "version": FORMAT_VERSION, "stage": stage,
            "section": dataclasses.asdict(section) if dataclasses.is_dataclass(section) else None,
            "shared": {key: getattr(recipe, key) for key in SHARED[stage]},
            "inputs": {name: prints[name] for name in INPUTS[stage] if name in prints},
        }
        if stage == "eval":  # the models it compares depend on which stages ran
            payload["stages"] = list(recipe.stages)
        prints[stage] = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    return prints




def write_json_atomic(path: Path, payload: dict) -> None:
    """Write to a temporary name, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(temporary, path)


def write_stage(run_dir: Path, stage: str, record: dict) -> None:
    write_json_atomic(stage_file(run_dir, stage), {"stage": stage, **record})


@dataclasses.dataclass
class Plan:
    """What to do with each stage of the recipe: run (fresh), resume, or skip."""

    actions: dict[str, str]  # stage -> "run" | "resume" | "skip"
    reasons: dict[str, str]  # stage -> why


def plan(recipe: Recipe, run_dir: Path, only: str = "", start: str = "", force: bool = False, running: dict | None = None) -> Plan:
    """Decide each stage's action. `start` (--from) reruns that stage and every later one; `only` runs that
    stage alone (its inputs must be done); `force` reruns the selected stages even when up to date. `running`
    (from RUN/pipeline.json): stage -> fingerprint it was started with and has not finished."""
    prints = fingerprints(recipe)
    actions, reasons = {}, {}
    order = [s for s in STAGES if s in recipe.stages]
    for name, value in (("--only", only), ("--from", start)):
        if value and value not in order:
            raise ValueError(f"{name} {value}: not a stage of this recipe; its stages: {', '.join(order)}")
    records = {stage: read_stage(run_dir, stage) for stage in order}
    done = {s for s in order if records[s] and records[s].get("fingerprint") == prints[s] and records[s].get("status") == "done"}
    for stage in order:
        record = records[stage]
        same = record is not None and record.get("fingerprint") == prints[stage]
        selected = (not only or stage == only) and (not start or order.index(stage) >= order.index(start))
        if not selected:
            actions[stage], reasons[stage] = "skip", "not selected"
        elif stage in done and not force and not start:
            actions[stage], reasons[stage] = "skip", "done, recipe unchanged"
        elif not force and (same and record.get("status") == "running" or (running or {}).get(stage) == prints[stage]):
            if stage in RESUMABLE:
                actions[stage], reasons[stage] = "resume", "interrupted: resuming from its last checkpoint"
            else:
                actions[stage], reasons[stage] = "run", "interrupted: rerunning it"
        else:
            actions[stage] = "run"
            reasons[stage] = "forced" if force or start else "recipe or inputs changed" if record else "not run yet"
    for stage in order:  # a stage that runs reads its inputs: each must run too or be done with this recipe
        missing = [i for i in INPUTS[stage] if i in actions and actions[i] == "skip" and i not in done] if actions[stage] != "skip" else []
        if missing:
            raise ValueError(f"stage {stage} needs {', '.join(missing)}, which is not done with this recipe: run the pipeline "
                             f"without --only/--from first (or with --from {missing[0]})")
    return Plan(actions, reasons)
