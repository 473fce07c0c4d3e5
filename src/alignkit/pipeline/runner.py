"""Run a recipe's stages in order, one process each, skipping what is done and resuming what was cut.

Each stage is a child process (`python -m alignkit.pipeline.stages`); `os.wait4` gives that child's own CPU time
(user + system, its children included) and peak resident memory, which go into RUN/<stage>/stage.json with the
wall time. RUN/pipeline.json records which stage was started with which fingerprint, so an interrupted stage is
recognized even if its directory was emptied when it started.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from alignkit.pipeline.fingerprint import fingerprints, plan, write_json_atomic, write_stage
from alignkit.runs import read_stage
from alignkit.pipeline.recipe import STAGES, load_recipe

log = logging.getLogger(__name__)


class StageFailed(RuntimeError):
    pass


def _check_run_dir(run: Path) -> None:
    """RUN must be new, empty, or a pipeline run: never another command's outputs."""
    if run.exists() and not run.is_dir():
        raise ValueError(f"--output_dir {run}: exists and is not a directory")
    if run.is_dir() and any(run.iterdir()) and not (run / "pipeline.json").exists():
        raise ValueError(f"--output_dir {run}: holds files that are not a pipeline run (no pipeline.json); choose a new or empty directory")


def _make_quick_model(run: Path) -> None:
    target = run / "quick-model"
    if not (target / "config.json").exists():
        from alignkit.testing import make_tiny_model

        make_tiny_model(run / ".quick-model.tmp", hidden_size=64, num_layers=2, seed=0)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(run / ".quick-model.tmp", target)


def _run_child(stage: str, run: Path, resume: bool) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak RSS in MiB) of the stage's process."""
    command = [sys.executable, "-m", "alignkit.pipeline.stages", stage, str(run)] + (["--resume"] if resume else [])
    start = time.perf_counter()
    child = subprocess.Popen(command)
    try:
        _, status, usage = os.wait4(child.pid, 0)
    except KeyboardInterrupt:
        child.kill()
        raise
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    wall = time.perf_counter() - start
    if child.returncode != 0:
        if child.returncode == 2:  # a user error, explained on stderr by the stage
            raise StageFailed(f"stage {stage} stopped on the error above; earlier stages are kept, a rerun starts from {stage}")
        how = f"was killed by signal {-child.returncode}" if child.returncode < 0 else f"failed (exit code {child.returncode})"
        raise StageFailed(f"stage {stage} {how}; rerun the same command to resume it")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def run_pipeline(recipe_file: str, output_dir: str, quick: bool = False, only: str = "", start: str = "", force: bool = False,
                 echo=print) -> dict:
    """Run the recipe into output_dir; returns {stage: its stage.json record}."""
    recipe = load_recipe(recipe_file, quick)  # refused here, before any stage starts
    run = Path(output_dir)
    _check_run_dir(run)
    run.mkdir(parents=True, exist_ok=True)
    state_file = run / "pipeline.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {"running": {}}
    decided = plan(recipe, run, only, start, force, state.get("running", {}))
    write_json_atomic(run / "recipe.json", dataclasses.asdict(recipe))
    state.update(recipe_file=str(recipe_file), quick=quick)
    write_json_atomic(state_file, state)
    if recipe.model == "tiny":
        _make_quick_model(run)

    prints = fingerprints(recipe)
    order = [s for s in STAGES if s in recipe.stages]
    records = {}
    for index, stage in enumerate(order, 1):
        action = decided.actions[stage]
        if action == "skip":
            echo(f"[{index}/{len(order)}] {stage}: skipped ({decided.reasons[stage]})")
            records[stage] = read_stage(run, stage)
            continue
        echo(f"[{index}/{len(order)}] {stage}: {'resuming' if action == 'resume' else 'running'} ({decided.reasons[stage]})")
        if action == "run":  # a stale or partial output of this stage: the recipe changed, so it is redone from scratch
            shutil.rmtree(run / stage, ignore_errors=True)
        started = time.strftime("%Y-%m-%dT%H:%M:%S")
        write_stage(run, stage, {"fingerprint": prints[stage], "status": "running", "started": started})
        state["running"][stage] = prints[stage]
        write_json_atomic(state_file, state)
        wall, cpu, rss = _run_child(stage, run, resume=action == "resume")
        result = json.loads((run / stage / "result.json").read_text())
        records[stage] = {"fingerprint": prints[stage], "status": "done", "started": started, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                          "resumed": action == "resume", "wall_seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
                          "peak_rss_mb": round(rss, 1), "result": result}
        write_stage(run, stage, records[stage])
        state["running"].pop(stage, None)
        write_json_atomic(state_file, state)
        echo(f"[{index}/{len(order)}] {stage}: done in {wall:.0f} s wall, {cpu:.0f} s CPU, peak {rss:.0f} MiB")
    if (run / "report.md").exists() and "report" in order:
        echo(f"report: {run / 'report.md'}")
    return records
