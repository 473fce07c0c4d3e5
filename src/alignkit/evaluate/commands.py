"""`alignkit eval` (few-shot task metrics) and its subcommands `sensitivity`, `winrate`, `hhh`.

Wired into the main CLI with `app.add_typer(eval_app, name="eval")`.
"""

from __future__ import annotations

from typing import Optional

import typer

eval_app = typer.Typer(add_completion=False, help="Evaluate a model: few-shot task metrics, prompt sensitivity, win rates, HHH probes.")

USER_ERRORS = (ValueError, FileNotFoundError, KeyError, RuntimeError)


def _fail(error: Exception) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def _done(output: str) -> None:
    from alignkit.evaluate.report import sidecar

    files = [str(p) for p in (sidecar(output, ".md"), sidecar(output, ".png"), sidecar(output, ".predictions.jsonl")) if p.exists()]
    print(f"wrote {output} ({', '.join(files)})")


MODEL = typer.Option("smollm2-135m-instruct", "--model_name_or_path", help="HF directory, hub id or built-in model name")
FRAMING = typer.Option("auto", "--framing", help="auto | chat (k-shot text in one user turn) | multiturn (exemplars as turns) | plain (raw text)")
SYSTEM = typer.Option("", "--system", help="system message (chat framings) or text before the prompt (plain)")
DEVICE = typer.Option("auto", "--device", help="auto (cuda if available) | cpu | cuda")


@eval_app.callback(invoke_without_command=True)
def evaluate(
    ctx: typer.Context,
    model_name_or_path: str = MODEL,
    tasks: str = typer.Option("", "--tasks", help="comma-separated: built-in tasks, Flan template sets (sst2, rte, ...; NAME=SOURCE), .yaml template files, instruction files"),
    shots: str = typer.Option("0", "--shots", help="comma-separated shot counts, e.g. 0,1,5"),
    limit: Optional[int] = typer.Option(None, "--limit", help="evaluate the first N examples (after a seeded shuffle) of each task"),
    output: str = typer.Option("eval.json", "--output", help="results JSON; OUT.md, OUT.png and OUT.predictions.jsonl go beside it"),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="data of the Flan sets: a file, a directory of native files, or a root holding NAME/ per set"),
    template: str = typer.Option("", "--template", help="Flan sets: template id (default: the first non-inverted one)"),
    columns: str = typer.Option("", "--columns", help="Flan sets: FIELD=COLUMN,... where your data's column names differ"),
    skip_invalid: bool = typer.Option(False, "--skip_invalid/--no_skip_invalid", help="skip (and count) unreadable rows"),
    split: str = typer.Option("auto", "--split", help="Flan sets: split to evaluate (auto: validation, else test)"),
    method: str = typer.Option("auto", "--method", help="classification: auto/loglik (rank the options' log-likelihoods) | generate (match the generated answer)"),
    framing: str = FRAMING,
    system: str = SYSTEM,
    batch_size: int = typer.Option(16, "--batch_size"),
    max_new_tokens: int = typer.Option(0, "--max_new_tokens", help="0: the task's default (32 exact match, 16 classification, 128-256 generation)"),
    seed: int = typer.Option(0, "--seed", help="exemplar choice and example order"),
    calibrate: bool = typer.Option(True, "--calibrate/--no_calibrate", help="classification by log-likelihood: also report accuracy after contextual calibration"),
    resume: bool = typer.Option(False, "--resume/--no_resume", help="keep the (task, shots) units already in --output and run the rest"),
    progress: bool = typer.Option(True, "--progress/--no_progress"),
    device: str = DEVICE,
):
    """Few-shot evaluation: one record per (task, shots, metric) with its value and n."""
    if ctx.invoked_subcommand is not None:
        return
    from alignkit.evaluate.runner import EvalConfig, run_eval

    try:
        if not tasks:
            raise ValueError("--tasks is required (or a subcommand: sensitivity, winrate, hhh); see alignkit eval --help")
        cfg = EvalConfig(model_name_or_path, tasks, shots, limit, output, dataset, template, columns, skip_invalid, split, method,
                         framing, system, batch_size, max_new_tokens, seed, calibrate, resume, progress, device)
        run_eval(cfg)
    except USER_ERRORS as error:
        _fail(error)
    _done(output)


@eval_app.command("sensitivity")
def sensitivity(
    model_name_or_path: str = MODEL,
    task: str = typer.Option("sst2", "--task", help="a classification Flan template set (or NAME=SOURCE)"),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="its data: a file, a directory of native files, or a root holding NAME/"),
    output: str = typer.Option("sensitivity.json", "--output"),
    shots: int = typer.Option(4, "--shots", help="k exemplars in every prompt"),
    limit: Optional[int] = typer.Option(100, "--limit", help="evaluated examples (the same for every condition)"),
    n_seeds: int = typer.Option(5, "--n_seeds", help="exemplar sets drawn (factor 'exemplars')"),
    n_orders: int = typer.Option(5, "--n_orders", help="orders of the base exemplars (factor 'order')"),
    templates: str = typer.Option("all", "--templates", help="all (every non-inverted template) or ID,ID,..."),
    calibrate: bool = typer.Option(True, "--calibrate/--no_calibrate", help="also report contextual calibration (Zhao et al., 2021)"),
    content_free: str = typer.Option("N/A||[MASK]", "--content_free", help="content-free inputs separated by | (an empty one included)"),
    split: str = typer.Option("auto", "--split"),
    framing: str = FRAMING,
    system: str = SYSTEM,
    batch_size: int = typer.Option(16, "--batch_size"),
    seed: int = typer.Option(0, "--seed"),
    progress: bool = typer.Option(True, "--progress/--no_progress"),
    device: str = DEVICE,
):
    """Accuracy across templates, exemplar sets and exemplar orders: mean, std, min, max, range per factor."""
    from alignkit.evaluate.sensitivity import SensitivityConfig, run_sensitivity

    try:
        run_sensitivity(SensitivityConfig(model_name_or_path, task, dataset, output, shots, limit, n_seeds, n_orders, templates,
                                          calibrate, content_free, split, framing, system, batch_size, seed, progress, device))
    except USER_ERRORS as error:
        _fail(error)
    _done(output)


@eval_app.command("winrate")
def winrate(
    model_name_or_path: str = MODEL,
    ref_model: str = typer.Option(..., "--ref_model", help="model B, compared with and the KL reference"),
    dataset: str = typer.Option(..., "--dataset", help="prompts: any SFT format, builtin:TASK[:N], or an instruction file"),
    judge: str = typer.Option(..., "--judge", help="reward_model:DIR | builtin:exact_match|sentiment|rouge_l | module:fn | pairwise:module:fn | llm:BASE_URL"),
    judge_model: str = typer.Option("", "--judge_model", help="llm judge: model name at the endpoint"),
    judge_api_key_env: str = typer.Option("OPENAI_API_KEY", "--judge_api_key_env", help="environment variable holding the llm judge's API key"),
    output: str = typer.Option("winrate.json", "--output"),
    limit: Optional[int] = typer.Option(None, "--limit"),
    max_new_tokens: int = typer.Option(128, "--max_new_tokens"),
    temperature: float = typer.Option(0.0, "--temperature", help="of the judged responses (0 = greedy)"),
    kl: bool = typer.Option(True, "--kl/--no_kl", help="estimate KL(A ‖ B) from samples of A at temperature 1"),
    kl_samples: int = typer.Option(1, "--kl_samples", help="samples per prompt for the KL estimate"),
    batch_size: int = typer.Option(16, "--batch_size"),
    seed: int = typer.Option(0, "--seed"),
    progress: bool = typer.Option(True, "--progress/--no_progress"),
    device: str = DEVICE,
):
    """Win rate of --model_name_or_path (A) over --ref_model (B), judged in both orders; KL(A ‖ B)."""
    from alignkit.evaluate.winrate import WinRateConfig, run_winrate

    try:
        run_winrate(WinRateConfig(model_name_or_path, ref_model, dataset, judge, judge_model, judge_api_key_env, output, limit,
                                  max_new_tokens, temperature, kl, kl_samples, batch_size, seed, progress, device))
    except USER_ERRORS as error:
        _fail(error)
    _done(output)


@eval_app.command("hhh")
def hhh(
    model_name_or_path: str = MODEL,
    output: str = typer.Option("hhh.json", "--output"),
    helpfulness_tasks: str = typer.Option("arithmetic,comparison,word_length,reversal", "--helpfulness_tasks", help="built-in tasks for task success"),
    helpfulness_shots: int = typer.Option(3, "--helpfulness_shots", help="exemplars in the helpfulness prompts (they show the answer format)"),
    limit: Optional[int] = typer.Option(20, "--limit", help="rows per helpfulness task"),
    system: str = SYSTEM,
    max_new_tokens: int = typer.Option(96, "--max_new_tokens"),
    batch_size: int = typer.Option(16, "--batch_size"),
    seed: int = typer.Option(0, "--seed"),
    progress: bool = typer.Option(True, "--progress/--no_progress"),
    device: str = DEVICE,
):
    """Helpful / honest / harmless probes: task success, abstention and stated-confidence calibration, refusals."""
    from alignkit.evaluate.hhh import HHHConfig, run_hhh

    try:
        run_hhh(HHHConfig(model_name_or_path, output, helpfulness_tasks, helpfulness_shots, limit, system, max_new_tokens, batch_size, seed, progress, device))
    except USER_ERRORS as error:
        _fail(error)
    _done(output)


if __name__ == "__main__":  # python -m alignkit.evaluate.commands ... (same as `alignkit eval ...`)
    eval_app()
