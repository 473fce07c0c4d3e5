"""`alignkit pipeline RECIPE.yaml --output_dir RUN` and `alignkit demo` (the demo recipe)."""

from __future__ import annotations

from pathlib import Path

import typer

from alignkit.pipeline.recipe import STAGES

RECIPES = Path(__file__).resolve().parents[3] / "recipes"


def pipeline(
    recipe: str = typer.Argument(..., help="a recipe YAML (see recipes/ and docs/pipeline.md)"),
    output_dir: str = typer.Option(..., "--output_dir", help="the run directory: one subdirectory per stage, report.md"),
    quick: bool = typer.Option(False, "--quick", help="a tiny random model and a few steps per stage (minutes): a smoke run"),
    start: str = typer.Option("", "--from", help=f"rerun this stage and every later one ({', '.join(STAGES)})"),
    only: str = typer.Option("", "--only", help="run this stage alone (its inputs must be done)"),
    force: bool = typer.Option(False, "--force", help="rerun the selected stages even when their recipe is unchanged"),
):
    """Take a pretrained model through data → SFT → comparisons → reward model → PPO / DPO → evaluation → report."""
    from alignkit.flags import USER_ERRORS, fail as _fail
    from alignkit.pipeline.runner import StageFailed, run_pipeline

    try:
        run_pipeline(recipe, output_dir, quick, only, start, force)
    except StageFailed as error:
        from rich.console import Console

        Console(stderr=True).print(f"[bold red]error:[/] {error}", highlight=False)
        raise typer.Exit(code=1) from None
    except USER_ERRORS as error:
        _fail(error)


def demo(
    output_dir: str = typer.Option("outputs/demo", "--output_dir", help="the run directory"),
    quick: bool = typer.Option(False, "--quick", help="a tiny random model: a smoke run in minutes"),
):
    """The main job: recipes/demo.yaml, the built-in model from SFT to PPO and DPO, with its report."""
    pipeline(str(RECIPES / "demo.yaml"), output_dir, quick, "", "", False)
