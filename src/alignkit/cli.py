"""The `alignkit` command. Each command parses flags (or a YAML --config) into a config dataclass and
calls one function; the flags of a training command are generated from its dataclass fields."""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
import typing
from typing import Callable, Optional

import typer

from alignkit.config import DPOConfig, PPOConfig, RMConfig, SFTConfig, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="From a pretrained LM to an aligned assistant.")
data_app = typer.Typer(no_args_is_help=True, help="Build instruction data sets.")
app.add_typer(data_app, name="data")


def _fail(error: Exception) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


USER_ERRORS = (ValueError, FileNotFoundError, KeyError, RuntimeError)


def config_command(name: str, cls: type, run: Callable, help: str) -> None:
    """Register `alignkit NAME` with one --flag per field of `cls` plus --config FILE.yaml."""
    hints = typing.get_type_hints(cls)
    params = [
        inspect.Parameter(
            "config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
            default=typer.Option(None, "--config", help="YAML file whose keys are these flag names; flags override it"),
        )
    ]
    repeatable = [f.name for f in dataclasses.fields(cls) if f.metadata.get("repeatable")]
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        decls = [f"--{f.name}/--no_{f.name}"] if kind is bool else [f"--{f.name}"]
        option = typer.Option(None, *decls, help=f"{f.metadata.get('help', '')} \\[default: {f.default!r}]", show_default=False)
        # a repeatable field is a comma-separated string; its flag may also be given several times
        annotation = Optional[list[kind]] if f.name in repeatable else Optional[kind]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=option))

    def command(**kwargs):
        config_file = kwargs.pop("config")
        for name in repeatable:
            kwargs[name] = ",".join(kwargs[name]) if kwargs[name] else None
        try:
            run(load_config(cls, config_file, kwargs))
        except USER_ERRORS as error:
            _fail(error)

    command.__signature__ = inspect.Signature(params)
    command.__doc__ = help
    app.command(name, help=help)(command)


def _run_sft(cfg: SFTConfig) -> None:
    from alignkit.train.sft import run_sft

    _summarize(run_sft(cfg), cfg)


def _summarize(row: dict, cfg) -> None:
    if os.environ.get("RANK", "0") == "0":  # one summary, not one per torchrun process
        print({k: v for k, v in row.items() if v is not None})
        print(f"saved to {cfg.output_dir}")


def _run_rm(cfg: RMConfig) -> None:
    from alignkit.train.rm import run_rm

    _summarize(run_rm(cfg), cfg)


def _run_dpo(cfg: DPOConfig) -> None:
    from alignkit.train.dpo import run_dpo

    _summarize(run_dpo(cfg), cfg)


def _run_ppo(cfg: PPOConfig) -> None:
    from alignkit.train.ppo import run_ppo

    _summarize(run_ppo(cfg), cfg)


config_command("sft", SFTConfig, _run_sft, "Supervised fine-tuning (teacher-forced cross-entropy, weighted prompt loss).")
config_command("rm", RMConfig, _run_rm, "Train a reward model on comparisons: −log σ(r_better − r_worse).")
config_command("dpo", DPOConfig, _run_dpo, "Direct preference optimization (and IPO, SLiC, robust, SimPO, RPO).")
config_command("ppo", PPOConfig, _run_ppo, "RL from a reward: PPO (value head + GAE), or critic-free RLOO/GRPO, with a KL penalty to the reference.")


@app.command()
def generate(
    model_name_or_path: str = typer.Option("smollm2-135m-instruct", "--model_name_or_path"),
    prompt: list[str] = typer.Option(..., "--prompt", help="repeat for a batch"),
    chat: bool = typer.Option(False, "--chat", help="wrap the prompt as a user turn (chat template or separator)"),
    system: str = typer.Option("", "--system", help="system message (with --chat)"),
    max_new_tokens: int = typer.Option(128, "--max_new_tokens"),
    temperature: float = typer.Option(0.7, "--temperature", help="0 = greedy"),
    top_p: float = typer.Option(0.95, "--top_p"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    use_chat_template: str = typer.Option("auto", "--use_chat_template"),
    separator: str = typer.Option(SFTConfig.separator, "--separator"),
):
    """Sample from any model."""
    try:
        from alignkit.data.tokenize import Formatting, prompt_text
        from alignkit.generation import SamplingParams, generate_text
        from alignkit.models import load_causal_lm, load_tokenizer

        tokenizer = load_tokenizer(model_name_or_path)
        model = load_causal_lm(model_name_or_path)
        fmt = Formatting(use_chat_template, separator)
        head = [{"role": "system", "content": system}] if system else []
        texts = [prompt_text(tokenizer, head + [{"role": "user", "content": p}], fmt) if chat else p for p in prompt]
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        for text in generate_text(model, tokenizer, texts, params):
            print(text)
            print("-" * 40) if len(prompt) > 1 else None
    except USER_ERRORS as error:
        _fail(error)


@app.command()
def merge(
    adapter_dir: str = typer.Option(..., "--adapter_dir", help="a LoRA output directory"),
    output_dir: str = typer.Option(..., "--output_dir"),
):
    """Fold LoRA adapters into the base model and save a plain Hugging Face model."""
    from alignkit.models import merge_adapter

    try:
        merge_adapter(adapter_dir, output_dir)
    except USER_ERRORS as error:
        _fail(error)
    print(f"merged model saved to {output_dir}")


@app.command()
def score(
    reward_model: str = typer.Option(..., "--reward_model", help="a reward model directory (an `alignkit rm` output)"),
    dataset: str = typer.Option(..., "--dataset", help="prompt/response rows (any SFT format) or preference rows"),
    output: str = typer.Option(..., "--output", help="JSONL to write: each row plus its reward(s)"),
    dataset_split: str = typer.Option("train", "--dataset_split", help="split of a datasets dir or hub id"),
    batch_size: int = typer.Option(16, "--batch_size"),
    skip_invalid: bool = typer.Option(False, "--skip_invalid/--no_skip_invalid", help="skip (and count) invalid rows"),
    progress: bool = typer.Option(True, "--progress/--no_progress"),
):
    """Score responses with a reward model; for preference rows, also whether it agrees with the labels."""
    from alignkit.rewards import score_file

    try:
        summary = score_file(reward_model, dataset, output, dataset_split, batch_size, skip_invalid, progress)
    except USER_ERRORS as error:
        _fail(error)
    print(summary)
    if "accuracy" in summary:
        print(f"the reward model agrees with {summary['accuracy']:.1%} of the preferences")
    print(f"wrote {summary['rows']} rows to {output}")


@data_app.command("tasks")
def data_tasks(
    tasks: str = typer.Option("", "--tasks", help="comma-separated built-in task names (default: all)"),
    split: str = typer.Option("train", "--split", help="train | test"),
    n: int = typer.Option(200, "--n", help="rows per task"),
    seed: int = typer.Option(0, "--seed"),
    output: str = typer.Option(..., "--output", help="JSONL file to write"),
):
    """Write built-in supervised tasks (arithmetic, reversal, spelling, ...) as prompt/completion JSONL."""
    from alignkit.data import tasks as builtin
    from alignkit.data.formats import write_jsonl

    try:
        names = [t.strip() for t in tasks.split(",") if t.strip()] or list(builtin.TASK_NAMES)
        rows = builtin.make_mixture(names, split, n, seed)
    except USER_ERRORS as error:
        _fail(error)
    write_jsonl(rows, output)
    print(f"wrote {len(rows)} rows to {output}")


from alignkit.data.flan_mixture import flan_command  # noqa: E402
from alignkit.data.self_instruct import self_instruct_command  # noqa: E402

data_app.command("flan", help="Render data sets through Flan-style templates and mix them into SFT-ready JSONL.")(flan_command)
data_app.command("self-instruct")(self_instruct_command)


from alignkit.pipeline.command import demo, pipeline  # noqa: E402

app.command("pipeline")(pipeline)
app.command("demo")(demo)


from alignkit.evaluate.commands import eval_app  # noqa: E402

app.add_typer(eval_app, name="eval")

from alignkit.serve.commands import register as _register_serving  # noqa: E402  (chat, serve, feedback export)

_register_serving(app)


def main() -> None:
    app(sys.argv[1:])


if __name__ == "__main__":
    main()
