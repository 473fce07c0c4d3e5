"""The `alignkit` command. Each command's flags come from one config dataclass (`config.knob` declares a field's
help, default, allowed values and aliases once; `flags.command_from` turns the fields into typer options), every
value is checked before any model or data loads, and the command calls one function with the config."""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Callable

import typer

from alignkit.config import DPOConfig, PPOConfig, RMConfig, SFTConfig, knob, refuse
from alignkit.flags import APP_SETTINGS, command_from, fail

log = logging.getLogger("alignkit")

app = typer.Typer(add_completion=False, no_args_is_help=True, **APP_SETTINGS,
                  help="From a pretrained LM to an aligned assistant.")
data_app = typer.Typer(no_args_is_help=True, **APP_SETTINGS, help="Build instruction data sets.")
app.add_typer(data_app, name="data")

# kept for callers that import them from here
_fail = fail


def _show_version(value: bool) -> None:
    if value:
        from alignkit import __version__

        print(f"alignkit {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(version: bool = typer.Option(False, "--version", is_eager=True, callback=_show_version,
                                              help="print alignkit's version and exit")) -> None:
    """From a pretrained LM to an aligned assistant."""


def config_command(name: str, cls: type, run: Callable, help: str, typer_app: typer.Typer = app) -> None:
    """Register `alignkit NAME` with one --flag per field of `cls` plus --config FILE.yaml and --verbose."""
    typer_app.command(name, help=help)(command_from(cls, run, help))


def print_result(row: dict) -> None:
    """The final metrics as exactly one JSON line on stdout, from the main process only."""
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps({k: v for k, v in row.items() if v is not None}, default=str), flush=True)


def _trainer(module: str, function: str) -> Callable:
    def run(cfg) -> None:
        import importlib

        row = getattr(importlib.import_module(module), function)(cfg)
        print_result(row)
        if os.environ.get("RANK", "0") == "0":
            log.info(f"saved to {cfg.output_dir}")

    return run


config_command("sft", SFTConfig, _trainer("alignkit.train.sft", "run_sft"),
               "Supervised fine-tuning (teacher-forced cross-entropy, weighted prompt loss).")
config_command("rm", RMConfig, _trainer("alignkit.train.rm", "run_rm"),
               "Train a reward model on comparisons: −log σ(r_better − r_worse).")
config_command("dpo", DPOConfig, _trainer("alignkit.train.dpo", "run_dpo"),
               "Direct preference optimization (and IPO, SLiC, robust, SimPO, RPO).")
config_command("ppo", PPOConfig, _trainer("alignkit.rl.ppo", "run_ppo"),
               "RL from a reward: PPO (value head + GAE), or critic-free RLOO/GRPO, with a KL penalty to the reference.")


# ---------------------------------------------------------------------------------------------- generate, merge, score


@dataclass
class GenerateConfig:
    model_name_or_path: str = knob("smollm2-135m-instruct", "HF model dir, hub id, built-in name, or a pipeline stage RUN/sft|ppo|dpo",
                                   positional="MODEL")
    prompt: list[str] = knob([], "a prompt; repeat the flag for a batch", required=True)
    chat: bool = knob(False, "wrap the prompt as a user turn (chat template or separator)")
    system: str = knob("", "system message (with --chat)")
    max_new_tokens: int = knob(128, "response length limit (tokens)", min=1)
    temperature: float = knob(0.7, "sampling temperature; 0 = greedy", min=0)
    top_p: float = knob(0.95, "nucleus sampling: keep the smallest set of tokens with this much probability", min=0, max=1, min_exclusive=True)
    seed: int | None = knob(None, "random seed of the sampler", min=0)
    use_chat_template: str = knob("auto", "format with the tokenizer's chat template", choices=("auto", "yes", "no"))
    separator: str = knob(SFTConfig.separator, "joins prompt and response when no chat template is used")
    torch_dtype: str = knob("float32", "dtype the weights are loaded in", choices=("float32", "bfloat16", "float16", "auto"))


def run_generate(cfg: GenerateConfig) -> None:
    from alignkit.data.tokenize import Formatting, prompt_text
    from alignkit.generation import SamplingParams, generate_text
    from alignkit.models import load_causal_lm, load_tokenizer
    from alignkit.runs import resolve_model

    model_dir = resolve_model(cfg.model_name_or_path)
    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, dtype=cfg.torch_dtype)
    fmt = Formatting(cfg.use_chat_template, cfg.separator)
    head = [{"role": "system", "content": cfg.system}] if cfg.system else []
    texts = [prompt_text(tokenizer, head + [{"role": "user", "content": p}], fmt) if cfg.chat else p for p in cfg.prompt]
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed)
    for text in generate_text(model, tokenizer, texts, params):
        print(text)
        if len(cfg.prompt) > 1:
            print("-" * 40)


@dataclass
class MergeConfig:
    adapter_dir: str = knob("", "a LoRA output directory", required=True)
    output_dir: str = knob("", "where the merged plain Hugging Face model goes", required=True, path="output_dir")


def run_merge(cfg: MergeConfig) -> None:
    from alignkit.models import merge_adapter

    merge_adapter(cfg.adapter_dir, cfg.output_dir)
    log.info(f"merged model saved to {cfg.output_dir}")


@dataclass
class ScoreConfig:
    reward_model: str = knob("", "a reward model directory (an `alignkit rm` output)", required=True)
    dataset: str = knob("", "prompt/response rows (any SFT format) or preference rows", required=True, aliases=("--dataset_name",))
    output: str = knob("", "JSONL file to write: each row plus its reward(s)", required=True, path="output_file")
    dataset_split: str = knob("train", "split of a datasets dir or hub id", aliases=("--split",))
    per_device_eval_batch_size: int = knob(16, "sequences scored per forward pass", min=1, aliases=("--batch_size",))
    skip_invalid: bool = knob(False, "skip (and count) invalid rows")
    progress: bool = knob(True, "show a progress bar")


def run_score(cfg: ScoreConfig) -> None:
    from alignkit.evaluate.score import score_file

    summary = score_file(cfg.reward_model, cfg.dataset, cfg.output, cfg.dataset_split, cfg.per_device_eval_batch_size,
                         cfg.skip_invalid, cfg.progress)
    print_result(summary)
    if "accuracy" in summary:
        log.info(f"the reward model agrees with {summary['accuracy']:.1%} of the preferences")
    log.info(f"wrote {summary['rows']} rows to {cfg.output}")


config_command("generate", GenerateConfig, run_generate, "Sample from any model.")
config_command("merge", MergeConfig, run_merge, "Fold LoRA adapters into the base model and save a plain Hugging Face model.")
config_command("score", ScoreConfig, run_score,
               "Score responses with a reward model; for preference rows, also whether it agrees with the labels.")


# ---------------------------------------------------------------------------------------------- data


@dataclass
class TasksConfig:
    tasks: str = knob("", "comma-separated built-in task names (default: all)", aliases=("--task",))
    dataset_split: str = knob("train", "which items of each task", choices=("train", "test"), aliases=("--split",))
    n: int = knob(200, "rows per task", min=1)
    seed: int = knob(0, "random seed", min=0)
    output: str = knob("", "JSONL file to write", required=True, path="output_file")

    def validate(self) -> None:
        from alignkit.data.tasks import TASK_NAMES

        unknown = [t.strip() for t in self.tasks.split(",") if t.strip() and t.strip() not in TASK_NAMES]
        if unknown:
            refuse("tasks", f"unknown task(s) {', '.join(unknown)}; allowed: {', '.join(TASK_NAMES)}")


def run_data_tasks(cfg: TasksConfig) -> None:
    from alignkit.data import tasks as builtin
    from alignkit.data.formats import write_jsonl

    names = [t.strip() for t in cfg.tasks.split(",") if t.strip()] or list(builtin.TASK_NAMES)
    rows = builtin.make_mixture(names, cfg.dataset_split, cfg.n, cfg.seed)
    write_jsonl(rows, cfg.output)
    log.info(f"wrote {len(rows)} rows to {cfg.output}")


config_command("tasks", TasksConfig, run_data_tasks,
               "Write built-in supervised tasks (arithmetic, reversal, spelling, ...) as prompt/completion JSONL.", data_app)

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

# other command groups register here (e.g. `alignkit pipeline`)


def main() -> None:
    app(sys.argv[1:])


if __name__ == "__main__":
    main()
