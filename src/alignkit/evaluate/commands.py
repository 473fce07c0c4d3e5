"""`alignkit eval` (few-shot task metrics) and its subcommands `sensitivity`, `winrate`, `hhh`.

Each command's flags come from its config dataclass in `evaluate/config.py` (one declaration per flag);
wired into the main CLI with `app.add_typer(eval_app, name="eval")`.
"""

from __future__ import annotations

import inspect
import logging

import typer

from alignkit.evaluate.config import EvalConfig, HHHConfig, SensitivityConfig, WinRateConfig
from alignkit.flags import APP_SETTINGS, command_from

log = logging.getLogger("alignkit")
eval_app = typer.Typer(add_completion=False, **APP_SETTINGS,
                       help="Evaluate a model: few-shot task metrics, prompt sensitivity, win rates, HHH probes.")


def _done(output: str) -> None:
    from alignkit.evaluate.report import sidecar

    files = [str(p) for p in (sidecar(output, ".md"), sidecar(output, ".png"), sidecar(output, ".predictions.jsonl")) if p.exists()]
    log.info(f"wrote {output} ({', '.join(files)})")


def _run_eval(cfg: EvalConfig) -> None:
    from alignkit.evaluate.runner import run_eval

    run_eval(cfg)
    _done(cfg.output)


def _run_sensitivity(cfg: SensitivityConfig) -> None:
    from alignkit.evaluate.sensitivity import run_sensitivity

    run_sensitivity(cfg)
    _done(cfg.output)


def _run_winrate(cfg: WinRateConfig) -> None:
    from alignkit.evaluate.winrate import run_winrate

    run_winrate(cfg)
    _done(cfg.output)


def _run_hhh(cfg: HHHConfig) -> None:
    from alignkit.evaluate.hhh import run_hhh

    run_hhh(cfg)
    _done(cfg.output)


def _with_subcommands(command):
    """The group's own command (`alignkit eval --tasks ...`) runs only when no subcommand was named."""

    def group(ctx: typer.Context, **kwargs):
        if ctx.invoked_subcommand is None:
            command(**kwargs)

    context = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
    group.__signature__ = inspect.Signature([context, *inspect.signature(command).parameters.values()])
    group.__doc__ = command.__doc__
    return group


evaluate = _with_subcommands(command_from(EvalConfig, _run_eval))
eval_app.callback(invoke_without_command=True)(evaluate)
eval_app.command("sensitivity")(command_from(SensitivityConfig, _run_sensitivity))
eval_app.command("winrate")(command_from(WinRateConfig, _run_winrate))
eval_app.command("hhh")(command_from(HHHConfig, _run_hhh))


if __name__ == "__main__":  # python -m alignkit.evaluate.commands ... (same as `alignkit eval ...`)
    eval_app()
