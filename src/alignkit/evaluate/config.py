"""The config dataclasses of `alignkit eval` and its subcommands, one knob per flag (see `alignkit.config.knob`).

Stdlib only (plus alignkit.config), so building the commands and checking their flags loads nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass

from alignkit.config import knob, refuse

DEVICES = ("auto", "cpu", "cuda")
FRAMINGS = ("auto", "chat", "multiturn", "plain")
MODEL_HELP = "HF directory, hub id or built-in model name"
FRAMING_HELP = "auto | chat (k-shot text in one user turn) | multiturn (exemplars as turns) | plain (raw text)"
SYSTEM_HELP = "system message (chat framings) or text before the prompt (plain)"
DEVICE_HELP = "auto (cuda if available) | cpu | cuda"


def _check_device(device: str) -> None:
    if device not in DEVICES and not device.startswith("cuda:"):
        refuse("device", f"{device!r} is not allowed; one of: auto | cpu | cuda | cuda:N")


@dataclass
class EvalConfig:
    """Few-shot evaluation: one record per (task, shots, metric) with its value and n."""

    model_name_or_path: str = knob("smollm2-135m-instruct", MODEL_HELP)
    tasks: str = knob("", "comma-separated: built-in tasks, Flan template sets (sst2, rte, ...; NAME=SOURCE), .yaml template files, "
                      "instruction files", required=True, aliases=("--task",))
    shots: str = knob("0", "comma-separated shot counts, e.g. 0,1,5")
    limit: int | None = knob(None, "evaluate the first N examples (after a seeded shuffle) of each task", min=1)
    output: str = knob("eval.json", "results JSON; OUT.md, OUT.png and OUT.predictions.jsonl go beside it", path="output_file")
    dataset: str | None = knob(None, "data of the Flan sets: a file, a directory of native files, or a root holding NAME/ per set",
                               aliases=("--dataset_name",))
    template: str = knob("", "Flan sets: template id (default: the first non-inverted one)")
    columns: str = knob("", "Flan sets: FIELD=COLUMN,... where your data's column names differ")
    skip_invalid: bool = knob(False, "skip (and count) unreadable rows instead of stopping")
    split: str = knob("auto", "Flan sets: split to evaluate (auto: validation, else test)", aliases=("--dataset_split",))
    method: str = knob("auto", "classification: auto/loglik (rank the options' log-likelihoods) | generate (match the generated answer)",
                       choices=("auto", "loglik", "generate"))
    framing: str = knob("auto", FRAMING_HELP, choices=FRAMINGS)
    system: str = knob("", SYSTEM_HELP)
    batch_size: int = knob(16, "sequences per forward pass", min=1, aliases=("--per_device_eval_batch_size",))
    max_new_tokens: int = knob(0, "0: the task's default (32 exact match, 16 classification, 128-256 generation)", min=0)
    seed: int = knob(0, "exemplar choice and example order", min=0)
    calibrate: bool = knob(True, "classification by log-likelihood: also report accuracy after contextual calibration")
    resume: bool = knob(False, "keep the (task, shots) units already in --output and run the rest")
    progress: bool = knob(True, "show a progress bar")
    device: str = knob("auto", DEVICE_HELP)

    def validate(self) -> None:
        from alignkit.evaluate.runner import parse_shots

        parse_shots(self.shots)
        _check_device(self.device)


@dataclass
class SensitivityConfig:
    """Accuracy across templates, exemplar sets and exemplar orders: mean, std, min, max, range per factor."""

    model_name_or_path: str = knob("smollm2-135m-instruct", MODEL_HELP)
    task: str = knob("sst2", "a classification Flan template set (or NAME=SOURCE)", aliases=("--tasks",))
    dataset: str | None = knob(None, "its data: a file, a directory of native files, or a root holding NAME/", aliases=("--dataset_name",))
    output: str = knob("sensitivity.json", "results JSON; .md and .png go beside it", path="output_file")
    shots: int = knob(4, "k exemplars in every prompt", min=0)
    limit: int | None = knob(100, "evaluated examples (the same for every condition)", min=1)
    n_seeds: int = knob(5, "exemplar sets drawn (factor 'exemplars')", min=1)
    n_orders: int = knob(5, "orders of the base exemplars (factor 'order')", min=1)
    templates: str = knob("all", "all (every non-inverted template) or ID,ID,...")
    calibrate: bool = knob(True, "also report contextual calibration (Zhao et al., 2021)")
    content_free: str = knob("N/A||[MASK]", "content-free inputs separated by | (an empty one included)")
    split: str = knob("auto", "split to evaluate (auto: validation, else test)", aliases=("--dataset_split",))
    framing: str = knob("auto", FRAMING_HELP, choices=FRAMINGS)
    system: str = knob("", SYSTEM_HELP)
    batch_size: int = knob(16, "sequences per forward pass", min=1, aliases=("--per_device_eval_batch_size",))
    seed: int = knob(0, "random seed", min=0)
    progress: bool = knob(True, "show a progress bar")
    device: str = knob("auto", DEVICE_HELP)

    def validate(self) -> None:
        if "," in self.task:
            refuse("task", f"{self.task!r}: sensitivity studies one task; give one name")
        _check_device(self.device)


@dataclass
class WinRateConfig:
    """Win rate of --model_name_or_path (A) over --ref_model (B), judged in both orders; KL(A ‖ B)."""

    model_name_or_path: str = knob("smollm2-135m-instruct", "model A, the policy: " + MODEL_HELP)
    ref_model: str = knob("", "model B, compared with and the KL reference", required=True)
    dataset: str = knob("", "prompts: any SFT format, builtin:TASK[:N], or an instruction file", required=True, aliases=("--dataset_name",))
    judge: str = knob("", "reward_model:DIR | builtin:exact_match|sentiment|rouge_l | module:fn | pairwise:module:fn | llm:BASE_URL",
                      required=True)
    judge_model: str = knob("", "llm judge: model name at the endpoint")
    judge_api_key_env: str = knob("OPENAI_API_KEY", "environment variable holding the llm judge's API key")
    output: str = knob("winrate.json", "results JSON; .md goes beside it", path="output_file")
    limit: int | None = knob(None, "the first N prompts", min=1)
    max_new_tokens: int = knob(128, "response length limit (tokens)", min=1)
    temperature: float = knob(0.0, "of the judged responses (0 = greedy)", min=0)
    kl: bool = knob(True, "estimate KL(A ‖ B) from samples of A at temperature 1")
    kl_samples: int = knob(1, "samples per prompt for the KL estimate", min=1)
    batch_size: int = knob(16, "sequences per forward pass", min=1, aliases=("--per_device_eval_batch_size",))
    seed: int = knob(0, "random seed", min=0)
    progress: bool = knob(True, "show a progress bar")
    device: str = knob("auto", DEVICE_HELP)

    def validate(self) -> None:
        if self.judge.startswith("llm:") and not self.judge_model:
            refuse("judge_model", f"--judge {self.judge} needs --judge_model (the model name the endpoint serves)")
        _check_device(self.device)


@dataclass
class HHHConfig:
    """Helpful / honest / harmless probes: task success, abstention and stated-confidence calibration, refusals."""

    model_name_or_path: str = knob("smollm2-135m-instruct", MODEL_HELP)
    output: str = knob("hhh.json", "results JSON; .md and .png go beside it", path="output_file")
    helpfulness_tasks: str = knob("arithmetic,comparison,word_length,reversal", "built-in tasks for task success")
    # exemplars show the answer format, so exact match measures the task, not the wording
    helpfulness_shots: int = knob(3, "exemplars in the helpfulness prompts (they show the answer format)", min=0)
    limit: int | None = knob(20, "rows per helpfulness task", min=1)
    system: str = knob("", SYSTEM_HELP)
    max_new_tokens: int = knob(96, "response length limit (tokens)", min=1)
    batch_size: int = knob(16, "sequences per forward pass", min=1, aliases=("--per_device_eval_batch_size",))
    seed: int = knob(0, "random seed", min=0)
    progress: bool = knob(True, "show a progress bar")
    device: str = knob("auto", DEVICE_HELP)

    def validate(self) -> None:
        from alignkit.data.tasks import TASK_NAMES

        unknown = [t for t in self.helpfulness_tasks.split(",") if t.strip() and t.strip() not in TASK_NAMES]
        if unknown:
            refuse("helpfulness_tasks", f"unknown task(s) {', '.join(unknown)}; allowed: {', '.join(TASK_NAMES)}")
        _check_device(self.device)
