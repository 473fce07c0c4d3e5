"""A pipeline run's directory: what each stage recorded (RUN/<stage>/stage.json) and which model it made.

`alignkit serve RUN/ppo` (and chat, generate): a pipeline run's stage directory names the model that stage made.
This sits below serve/, chat/ and pipeline/ so each of them can read a run without importing the others.

Each policy stage (sft, ppo, dpo) saves its model straight into RUN/<stage>/ (a plain Hugging Face directory, or
a LoRA adapter directory with `use_peft`); RUN/base stands for the recipe's pretrained model. Other stages make no
chat model (rm scores answers; data, compare, eval and report write files), and an unfinished stage has no model
yet: both are refused with what to give instead, before any model loads.
"""

from __future__ import annotations

import json
from pathlib import Path

POLICY_STAGES = ("sft", "ppo", "dpo")
MODEL_FILES = ("config.json", "adapter_config.json")


def stage_file(run_dir: Path, stage: str) -> Path:
    return run_dir / stage / "stage.json"


def read_stage(run_dir: Path, stage: str) -> dict | None:
    """What `stage` of the run recorded (fingerprint, status, times), or None when it never finished writing it."""
    path = stage_file(run_dir, stage)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # cut off mid-write by a kill: treat as never run


def resolve_model(name: str) -> str:
    """The model directory (or hub id / built-in name) that `name` stands for; ValueError when it names none."""
    path = Path(name).expanduser()
    if (path / "pipeline.json").is_file():
        raise ValueError(f"{name} is a pipeline run, not a model: name one of its models, e.g. {Path(name) / 'ppo'} "
                         f"(models: base, {', '.join(POLICY_STAGES)})")
    run, stage = path.parent, path.name
    if (run / "pipeline.json").is_file():
        if stage == "base":
            model = json.loads((run / "recipe.json").read_text())["model"]
            return str(run / "quick-model") if model == "tiny" else model
        if stage == "rm":
            raise ValueError(f"{name} is the run's reward model: it scores answers and writes none; serve "
                             f"{', '.join(str(run / s) for s in POLICY_STAGES)} or {run / 'base'}")
        if stage not in POLICY_STAGES:
            raise ValueError(f"{name}: the {stage!r} stage of pipeline run {run} makes no model; its models: "
                             f"base, {', '.join(POLICY_STAGES)}")
        if not any((path / f).is_file() for f in MODEL_FILES):
            status = (read_stage(run, stage) or {}).get("status", "not run")
            raise ValueError(f"{name}: stage {stage} of pipeline run {run} has no model yet (status: {status}); "
                             f"finish it with `alignkit pipeline RECIPE --output_dir {run}`")
        return str(path)
    # a hub id is ORG/NAME; anything else with a path's shape must exist here
    if not path.exists() and (path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1):
        raise ValueError(f"model {name}: no such directory")
    return name
