"""A pipeline recipe: one YAML file, one section per stage, validated before any stage starts.

Every key is a field of the dataclasses below (the field's comment is its documentation; `recipes/custom.yaml`
lists them all). An unknown key or a value of the wrong type is refused with the file, the line (from the YAML
parser), the key and what is valid. `--quick` applies the recipe's `quick:` section (same keys, any subset) on
top of the built-in QUICK_DEFAULTS: a tiny random model and a few steps per stage, for tests and smoke runs.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkit.config import ConfigError, read_yaml
from alignkit.precision import MIXED_PRECISIONS

STAGES = ("data", "sft", "compare", "rm", "ppo", "dpo", "eval", "report")
JUDGES = ("gold", "llm", "human")
DATA_SOURCES = ("builtin", "files", "self_instruct")


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the file, line and key."""


@dataclass
class DataRecipe:
    source: str = "builtin"  # builtin | files | self_instruct
    tasks: list[str] = field(default_factory=lambda: ["arithmetic", "comparison", "word_length", "sorting"])  # builtin task names
    sft_per_task: int = 200  # builtin: SFT rows per task (train split)
    prompts_per_task: int = 40  # builtin: prompts per task held out from SFT (train split): comparisons and PPO
    eval_per_task: int = 10  # builtin: held-out test prompts per task for the eval stage
    train_file: str = ""  # files: SFT rows (any SFT format: prompt/completion, Alpaca, messages)
    prompts_file: str = ""  # files: prompts for comparisons and PPO ({"prompt"}, optionally "completion" = a reference)
    eval_file: str = ""  # files / self_instruct: held-out prompts with references (prompt/completion or an instruction file)
    eval_limit: int = 0  # use at most this many eval prompts (0 = all)
    num_instructions: int = 100  # self_instruct: instructions to generate
    generator_model: str = ""  # self_instruct: local generator (default: the recipe's model)
    api_base: str = ""  # self_instruct: an OpenAI-compatible endpoint instead of a local model
    api_model: str = ""  # self_instruct: the model name the endpoint serves
    seed_tasks: str = ""  # self_instruct: seed tasks file (default: the 175 built-in ones)


@dataclass
class SFTRecipe:
    max_steps: int = 60  # optimizer steps
    batch_size: int = 8  # examples per step
    learning_rate: float = 5e-5  # peak learning rate (AdamW)
    lr_scheduler_type: str = "cosine"  # linear | cosine | constant | ...
    warmup_ratio: float = 0.1  # fraction of steps warming up
    max_length: int = 256  # tokens per example (longer ones are dropped)
    use_peft: bool = False  # LoRA adapters instead of all weights
    save_steps: int = 0  # checkpoint every N steps (an interrupted stage resumes from the last one)


@dataclass
class CompareRecipe:
    judge: str = "gold"  # gold (the recipe's gold_judge function) | llm (OpenAI-compatible endpoint) | human (the web page)
    num_prompts: int = 0  # prompts to sample for (0 = all held-out prompts)
    samples_per_prompt: int = 4  # K responses sampled per prompt from the SFT model
    temperature: float = 1.0  # sampling temperature of the K responses
    max_new_tokens: int = 24  # response length limit (tokens)
    heldout_fraction: float = 0.2  # share of prompts whose comparisons are held out (RM accuracy, DPO eval)
    llm_base_url: str = ""  # judge llm: the endpoint, e.g. http://localhost:8000/v1
    llm_model: str = ""  # judge llm: the model name it serves
    llm_api_key_env: str = "OPENAI_API_KEY"  # judge llm: environment variable holding the key
    human_needed: int = 50  # judge human: judgments to collect before continuing
    human_port: int = 0  # judge human: port of the comparison page (0 = any free port)


@dataclass
class RMRecipe:
    max_steps: int = 40  # optimizer steps
    batch_size: int = 8  # prompts per step
    learning_rate: float = 2e-5  # peak learning rate (AdamW)
    save_steps: int = 0  # checkpoint every N steps


@dataclass
class PPORecipe:
    algorithm: str = "ppo"  # ppo (value head + GAE) | rloo | grpo
    max_steps: int = 20  # rollout-and-update iterations
    rollout_batch_size: int = 16  # prompts per iteration
    samples_per_prompt: int = 1  # responses per prompt (≥ 2 for rloo/grpo)
    mini_batch_size: int = 16  # responses per optimizer step
    num_ppo_epochs: int = 2  # passes over each rollout batch
    learning_rate: float = 1e-5  # peak learning rate (AdamW)
    kl_coef: float = 0.05  # β of the per-token KL penalty to the SFT model
    temperature: float = 1.0  # sampling temperature during rollouts
    max_new_tokens: int = 24  # response length limit (tokens)
    kl_early_stop: float = 0.0  # stop an iteration's updates once a minibatch's KL to the rollout policy exceeds it (0 = never)
    use_peft: bool = False  # LoRA adapters (the reference is the SFT model with them disabled: no second copy in memory)
    save_steps: int = 5  # checkpoint every N iterations (an interrupted stage resumes from the last one)


@dataclass
class DPORecipe:
    max_steps: int = 40  # optimizer steps
    batch_size: int = 8  # pairs per step
    learning_rate: float = 5e-6  # peak learning rate (AdamW)
    beta: float = 0.1  # β: strength of the implicit KL constraint to the SFT model
    loss_type: str = "sigmoid"  # sigmoid (DPO) | ipo | hinge | robust | simpo
    save_steps: int = 0  # checkpoint every N steps


@dataclass
class EvalRecipe:
    models: list[str] = field(default_factory=lambda: ["base", "sft", "ppo", "dpo"])  # which models to evaluate (those the run made)
    max_new_tokens: int = 24  # answer length limit (tokens)
    temperatures: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])  # gold score of PPO and DPO at each
    kl_samples: int = 1  # sampled responses per prompt for KL to the SFT model
    hhh_probes: int = 10  # harmful probes for the refusal rate (0 = skip)
    samples_shown: int = 4  # prompts shown side by side in the report


@dataclass
class Recipe:
    model: str = "smollm2-135m-instruct"  # the pretrained model: HF dir, hub id or built-in name
    seed: int = 0  # every stage's seed
    gold_judge: str = "alignkit.pipeline.judges:task_gold"  # programmatic judge (reward function spec); the gold in the report
    mixed_precision: str = "auto"  # no | bf16 | fp16 | auto: every training stage's autocast (auto: bf16 where the CPU/GPU has it, else fp32)
    stages: list[str] = field(default_factory=lambda: list(STAGES))  # stages this recipe runs, in pipeline order
    data: DataRecipe = field(default_factory=DataRecipe)
    sft: SFTRecipe = field(default_factory=SFTRecipe)
    compare: CompareRecipe = field(default_factory=CompareRecipe)
    rm: RMRecipe = field(default_factory=RMRecipe)
    ppo: PPORecipe = field(default_factory=PPORecipe)
    dpo: DPORecipe = field(default_factory=DPORecipe)
    eval: EvalRecipe = field(default_factory=EvalRecipe)
    quick: dict = field(default_factory=dict)  # overrides applied by --quick (same keys as above)


# --quick: a tiny random model (built in RUN/quick-model) and a few steps per stage; the recipe's `quick:` goes on top
QUICK_DEFAULTS = {
    "model": "tiny",
    "data": {"sft_per_task": 16, "prompts_per_task": 8, "eval_per_task": 3, "num_instructions": 4, "eval_limit": 8},
    "sft": {"max_steps": 4, "batch_size": 4, "save_steps": 0},
    "compare": {"samples_per_prompt": 3, "max_new_tokens": 8, "human_needed": 4},
    "rm": {"max_steps": 4, "batch_size": 4},
    "ppo": {"max_steps": 4, "rollout_batch_size": 4, "mini_batch_size": 4, "max_new_tokens": 8, "save_steps": 1, "learning_rate": 1e-4},
    "dpo": {"max_steps": 4, "batch_size": 4},
    "eval": {"max_new_tokens": 8, "hhh_probes": 3, "samples_shown": 2},
}


# ---------------------------------------------------------------------------------------------
# loading and validation


def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", str(kind).replace("typing.", ""))


def _check_value(value: Any, kind: Any, where: str) -> Any:
    """`value` as `kind` (int → float is allowed), or a RecipeError."""
    origin = typing.get_origin(kind)
    if origin is list:
        (item,) = typing.get_args(kind)
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list of {_type_name(item)}, got {value!r}")
        return [_check_value(v, item, where) for v in value]
    if kind is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {value!r}")
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RecipeError(f"{where}: expected {_type_name(kind)}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, values: dict, path: str, where) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = f"{path}{key}"
        if key not in names:
            raise RecipeError(f"{where(name)}: unknown key '{name}'; valid keys{' in ' + path[:-1] if path else ''}: {', '.join(sorted(names))}")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                raise RecipeError(f"{where(name)}: '{name}' must be a mapping of {kind.__name__} keys, got {value!r}")
            kwargs[key] = _build(kind, value, name + ".", where)
        else:
            kwargs[key] = _check_value(value, kind, f"{where(name)}: '{name}'")
    return cls(**kwargs)


def _merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _check_choices(recipe: Recipe, where) -> None:
    choices = [
        ("data.source", recipe.data.source, DATA_SOURCES), ("compare.judge", recipe.compare.judge, JUDGES),
        ("ppo.algorithm", recipe.ppo.algorithm, ("ppo", "rloo", "grpo")),
        ("mixed_precision", recipe.mixed_precision, MIXED_PRECISIONS),
    ]
    for name, value, allowed in choices:
        if value not in allowed:
            raise RecipeError(f"{where(name)}: '{name}' is {value!r}; valid: {', '.join(allowed)}")
    unknown = [s for s in recipe.stages if s not in STAGES]
    if unknown:
        raise RecipeError(f"{where('stages')}: 'stages' has {unknown}; valid stages, in order: {', '.join(STAGES)}")
    models = [m for m in recipe.eval.models if m not in ("base", "sft", "ppo", "dpo")]
    if models:
        raise RecipeError(f"{where('eval.models')}: 'eval.models' has {models}; valid: base, sft, ppo, dpo")
    if recipe.data.source == "builtin":
        from alignkit.data.tasks import TASK_NAMES

        bad = [t for t in recipe.data.tasks if t not in TASK_NAMES]
        if bad:
            raise RecipeError(f"{where('data.tasks')}: 'data.tasks' has unknown tasks {bad}; valid: {', '.join(TASK_NAMES)}")
    if recipe.data.source == "files" and not recipe.data.train_file:
        raise RecipeError(f"{where('data.source')}: data.source files needs data.train_file (and data.prompts_file, data.eval_file)")
    if recipe.ppo.algorithm != "ppo" and recipe.ppo.samples_per_prompt < 2:
        raise RecipeError(f"{where('ppo.samples_per_prompt')}: ppo.algorithm {recipe.ppo.algorithm} needs ppo.samples_per_prompt ≥ 2")
    if recipe.compare.samples_per_prompt < 2:
        raise RecipeError(f"{where('compare.samples_per_prompt')}: 'compare.samples_per_prompt' must be ≥ 2 to compare responses")
    if recipe.compare.judge == "llm" and not (recipe.compare.llm_base_url and recipe.compare.llm_model):
        raise RecipeError(f"{where('compare.judge')}: compare.judge llm needs compare.llm_base_url and compare.llm_model")


def load_recipe(path: str | Path, quick: bool = False) -> Recipe:
    """Parse and validate a recipe file; with `quick`, apply QUICK_DEFAULTS and the recipe's `quick:` section."""
    path = Path(path)
    try:  # the same reader as --config files: errors name file:line alike
        raw, lines = read_yaml(str(path), "recipe", "keys (model, data, sft, ...): a recipe")
    except ConfigError as error:
        raise RecipeError(str(error)) from None

    def where(key: str) -> str:
        head = key.split(".")[0]
        line = lines.get(key, lines.get(head))
        return f"{path}:{line}" if line else str(path)

    recipe = _build(Recipe, raw, "", where)
    # the quick section is validated whether or not --quick is given
    quick_values = _merge(QUICK_DEFAULTS, recipe.quick)
    quick_recipe = _build(Recipe, {**_merge(raw, quick_values), "quick": {}}, "", lambda key: where("quick." + key) if "quick." + key in lines else where(key))
    chosen = quick_recipe if quick else recipe
    _check_choices(chosen, where)
    return chosen


def recipe_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def recipe_from_dict(values: dict) -> Recipe:
    """A resolved recipe back from RUN/recipe.json (already validated)."""
    return _build(Recipe, values, "", lambda key: "RUN/recipe.json")
