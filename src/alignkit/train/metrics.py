"""metrics.jsonl, and the same rows as tensorboard scalars or a wandb run (--report_to): what every trainer logs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from alignkit import atomic
from alignkit.config import TrainConfig

logger = logging.getLogger(__name__)


def _scalars(row: dict) -> dict[str, float]:
    """The numeric fields of a metrics row as (tag, value): eval_x -> eval/x, anything else -> train/x."""
    scalars = {}
    for key, value in row.items():
        if key == "step" or isinstance(value, str) or value is None:
            continue
        tag = f"eval/{key[len('eval_'):]}" if key.startswith("eval_") else f"train/{key}"
        scalars[tag] = float(value)
    return scalars


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step, appended; on resume, rows past the checkpoint (and a line
    torn by a kill) are dropped, in an atomic rewrite.
    With --report_to tensorboard each row's numbers also go to OUTPUT/runs/ as scalars (events past the
    checkpoint are purged on resume); with wandb, to the wandb run."""

    def __init__(self, path: Path, enabled: bool, resume_step: int = 0, report_to: str = "none", run_dir: Path | None = None,
                 config: TrainConfig | None = None):
        self.path, self.enabled = path, enabled
        if enabled and path.exists() and resume_step:
            atomic.write_jsonl(path, [r for r in _json_rows(path) if r.get("step", 0) <= resume_step])
        elif enabled and path.exists():
            path.unlink()
        self.tensorboard = self.wandb = None
        if enabled and report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            run_dir = run_dir or path.parent / "runs"
            self.tensorboard = SummaryWriter(str(run_dir), purge_step=resume_step + 1 if resume_step else None)
        elif enabled and report_to == "wandb":
            import dataclasses

            import wandb

            self.wandb = wandb.init(project="alignkit", name=path.parent.name, dir=str(path.parent), resume="allow",
                                    config=dataclasses.asdict(config) if config is not None else None)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        step = int(row.get("step", 0))
        if self.tensorboard is not None:
            for tag, value in _scalars(row).items():
                self.tensorboard.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log(_scalars(row), step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _json_rows(path: Path) -> list[dict]:
    rows = []
    for line in filter(str.strip, path.read_text().splitlines()):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("%s: dropped a torn line (a killed run was writing it): %.60s", path, line)
    return rows
