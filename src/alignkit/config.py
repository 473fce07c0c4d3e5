"""Config dataclasses: every knob of every stage, with the flag names transformers/TRL users know.

Precedence: dataclass default < `--config FILE.yaml` < explicit command-line flag. A field is declared once
with `knob(...)`: its help text, default, allowed values (choices, numeric range), path kind and aliases. The
CLI (`alignkit.flags`) builds the flags from these declarations and `load_config` checks every value against
them, then runs the config's `validate()` (the rules that involve several fields), before anything loads.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A flag or config key with a value that is not allowed; the message names it and what is allowed."""


def knob(default: Any, help: str, *, choices: tuple | None = None, min: float | None = None, max: float | None = None,
         min_exclusive: bool = False, max_exclusive: bool = False, aliases: tuple[str, ...] = (),
         flag_values: dict[str, Any] | None = None, path: str = "", required: bool = False, repeatable: bool = False, envvar: str = "",
         positional: str = "") -> Any:
    """Declare a config field.

    choices: the allowed values. min/max: numeric range, inclusive unless min_exclusive/max_exclusive.
    aliases: other flag names for the same field (`--split` for dataset_split), also accepted as YAML keys.
    flag_values: switches that set a value (`{"bf16": "bf16"}`: `--bf16` means `--mixed_precision bf16`).
    path: "output_dir" (a directory to write: must not be a file), "output_file" (a file to write: must not be a
    directory, nor under a file), "input_file" (must exist). required: must be given (flag or YAML).
    repeatable: a comma-separated string whose flag may also be given several times.
    envvar: an environment variable read when the flag is not given (secrets such as API keys).
    positional: the field may also be given as the command's positional argument, shown under this name
    (`alignkit serve RUN/ppo` for `--model_name_or_path RUN/ppo`); at most one per config.
    """
    metadata = dict(help=help, choices=choices, min=min, max=max, min_exclusive=min_exclusive, max_exclusive=max_exclusive,
                    aliases=tuple(aliases), flag_values=dict(flag_values or {}), path=path, required=required, repeatable=repeatable, envvar=envvar,
                    positional=positional)
    if isinstance(default, list):  # a flag given several times (--prompt A --prompt B)
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def allowed_text(f: dataclasses.Field) -> str:
    """What a field allows, in words: `one of: a | b`, `>= 1`, `in (0, 1]`; '' when anything of its type goes."""
    m = f.metadata
    if m.get("choices"):
        return "one of: " + " | ".join(str(c) for c in m["choices"])
    low, high = m.get("min"), m.get("max")
    if low is not None and high is not None:
        return f"in {'(' if m['min_exclusive'] else '['}{low:g}, {high:g}{')' if m['max_exclusive'] else ']'}"
    if low is not None:
        return f"{'>' if m['min_exclusive'] else '>='} {low:g}"
    if high is not None:
        return f"{'<' if m['max_exclusive'] else '<='} {high:g}"
    return ""


def _kind(annotation: Any) -> tuple[type, bool]:
    """(base type, whether None is allowed) of a field annotation such as `int | None` (`list[str]`: (list, False))."""
    if typing.get_origin(annotation) is list:
        return list, False
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if args:
        return args[0], len(args) < len(typing.get_args(annotation))
    return annotation, False


def coerce(name: str, value: Any, annotation: Any) -> Any:
    """A YAML (or programmatic) value as the field's type; ConfigError naming the type otherwise."""
    kind, optional = _kind(annotation)
    if value is None and optional:
        return None
    if typing.get_origin(annotation) is list:
        items = value if isinstance(value, (list, tuple)) else [value]
        return [coerce(name, item, typing.get_args(annotation)[0]) for item in items]
    words = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
            return ",".join(str(v) for v in value)  # a YAML list for a comma-separated field
    raise ConfigError(f"must be {words.get(kind, kind)}{' or null' if optional else ''}, got {value!r}")


def check_value(f: dataclasses.Field, value: Any) -> None:
    """Raise ConfigError (without the field's name: the caller adds where it came from) if `value` is not allowed."""
    if value is None:
        return
    if isinstance(value, list):
        for item in value:
            check_value(f, item)
        return
    m = f.metadata
    if m.get("choices") and value not in m["choices"]:
        raise ConfigError(f"{value!r} is not allowed; {allowed_text(f)}")
    low, high = m.get("min"), m.get("max")
    if low is not None and (value < low or (m["min_exclusive"] and value == low)):
        raise ConfigError(f"{value!r} is out of range; must be {allowed_text(f)}")
    if high is not None and (value > high or (m["max_exclusive"] and value == high)):
        raise ConfigError(f"{value!r} is out of range; must be {allowed_text(f)}")
    kind = m.get("path")
    if kind and value:
        target = Path(value)
        if kind == "input_file" and not target.is_file():
            raise ConfigError(f"{value}: no such file" if not target.exists() else f"{value} is a directory; a file is needed")
        if kind == "output_dir" and target.exists() and not target.is_dir():
            raise ConfigError(f"{value} is an existing file; a directory (new or existing) is needed")
        if kind == "output_file" and target.is_dir():
            raise ConfigError(f"{value} is a directory; give a file name (e.g. {target / 'out.jsonl'})")
        if kind in ("output_file", "output_dir"):
            for parent in target.absolute().parents:
                if parent.exists():
                    if not parent.is_dir():
                        raise ConfigError(f"{value}: {parent} is a file, so nothing can be written under it")
                    break


def field_map(cls: type) -> dict[str, dataclasses.Field]:
    """Every name a field answers to (its own and its aliases, without dashes) -> the field."""
    names = {}
    for f in dataclasses.fields(cls):
        names[f.name] = f
        for alias in f.metadata.get("aliases", ()):
            names[alias.lstrip("-")] = f
    return names


def value_switches(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    """Switches such as `bf16` -> (the mixed_precision field, "bf16")."""
    return {name.lstrip("-"): (f, value) for f in dataclasses.fields(cls) for name, value in f.metadata.get("flag_values", {}).items()}


def yaml_key_lines(node, prefix: str = "") -> dict[str, int]:
    """'key' and 'section.key' (any depth) -> 1-based line of that key in a composed YAML document."""
    lines = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            name = f"{prefix}{key.value}"
            lines[name] = key.start_mark.line + 1
            lines.update(yaml_key_lines(value, name + "."))
    return lines


def read_yaml(config_file: str, label: str = "--config", holds: str = "flag names to values (key: value lines)") -> tuple[dict, dict[str, int]]:
    """The mapping in `config_file` and the line of each key, nested ones as 'section.key' (`yaml_key_lines`);
    ConfigError naming file:line on bad YAML. `label` names the file's role in errors; `holds` says what it maps."""
    path = Path(config_file)
    if not path.is_file():
        raise ConfigError(f"{label} {config_file}: no such file")
    loader = yaml.SafeLoader(path.read_text(encoding="utf-8"))
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{config_file}:{mark.line + 1}" if mark else config_file
        raise ConfigError(f"{where}: not valid YAML: {getattr(error, 'problem', None) or error}") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError(f"{config_file}: must be a mapping of {holds}, got {type(data).__name__}")
    return data, yaml_key_lines(node)


def _checked(f, raw: Any, hint: Any, where: str) -> Any:
    """`raw` coerced to the field's type and checked against its declaration; errors name `where` (file:line: key, or --flag)."""
    try:
        value = coerce(f.name, raw, hint)
        check_value(f, value)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
    return value


def load_config(cls: type, config_file: str | None = None, overrides: dict[str, Any] | None = None):
    """Build `cls` from defaults, then the YAML file, then explicit overrides (None = not given); check every value
    against its declaration and run `cls.validate`. Errors are ConfigError naming the flag (or file:line: key)."""
    names = field_map(cls)
    switches = value_switches(cls)
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    if config_file:
        loaded, lines = read_yaml(config_file)
        for key, raw in loaded.items():
            where = f"{config_file}:{lines.get(str(key), '?')}: key '{key}'"
            if key in switches:
                f, value = switches[key]
                if not isinstance(raw, bool):
                    raise ConfigError(f"{where}: must be true or false (true means {f.name}: {value}), got {raw!r}")
                if raw:
                    values[f.name] = value
                continue
            f = names.get(key)
            if f is None:
                raise ConfigError(f"{config_file}:{lines.get(str(key), '?')}: unknown key '{key}'; valid keys are the flag names "
                                  f"without dashes: {', '.join(sorted(x.name for x in dataclasses.fields(cls)))}")
            values[f.name] = _checked(f, raw, hints[f.name], where)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        f = names[key]
        values[f.name] = _checked(f, value, hints[f.name], f"--{f.name}")
    for f in dataclasses.fields(cls):
        if f.metadata.get("required") and not values.get(f.name):
            raise ConfigError(f"--{f.name} is required: {f.metadata['help']}")
    config = cls(**values)
    if hasattr(config, "validate"):
        config.validate()
    return config


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (to a temporary name, then renamed: a crash leaves no half file)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False, allow_unicode=True))
    temporary.replace(path)


def refuse(flag: str, message: str) -> None:
    raise ConfigError(f"--{flag}: {message}")


SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def attention_kernel_knob():
    """--attention_kernel, declared once for the trainers whose rows share a prompt (reward model, DPO, PPO);
    SFT has no such rows, so it neither shows nor accepts the flag."""
    return knob("dense", "attention for prefix-shared rows (one prompt, several responses): the dense 4-D mask through "
                "SDPA, FlexAttention block masks (CUDA only), or auto: flex on a CUDA GPU, dense elsewhere",
                choices=("auto", "dense", "flex"))


@dataclass
class TrainConfig:
    """Knobs shared by every trainer (SFT, reward model, DPO, PPO)."""

    model_name_or_path: str = knob("smollm2-135m-instruct", "HF model dir, hub id, or built-in name")
    dataset: str = knob("", "training data: .jsonl/.json/.csv/.parquet, a saved datasets dir, a hub id, or builtin:TASK[,TASK]",
                        aliases=("--dataset_name",), required=True)
    dataset_split: str = knob("train", "split to read from a datasets dir or hub id", aliases=("--split",))
    output_dir: str = knob("outputs/run", "where the model, metrics.jsonl, config.yaml and checkpoints go", path="output_dir")
    max_steps: int = knob(-1, "optimizer steps; -1 = derive from --num_train_epochs", min=-1)
    learning_rate: float = knob(2e-5, "peak learning rate (AdamW)", min=0, min_exclusive=True)
    lr_scheduler_type: str = knob("linear", "learning-rate schedule after warmup", choices=SCHEDULERS)
    warmup_ratio: float = knob(0.0, "fraction of steps spent warming up the learning rate", min=0, max=1)
    weight_decay: float = knob(0.0, "AdamW weight decay (not applied to biases and norms)", min=0)
    adam_beta1: float = knob(0.9, "AdamW beta1", min=0, max=1, max_exclusive=True)
    adam_beta2: float = knob(0.999, "AdamW beta2", min=0, max=1, max_exclusive=True)
    max_grad_norm: float = knob(1.0, "gradient clipping norm; 0 disables", min=0)
    max_length: int = knob(1024, "maximum tokens per example (per packed row with --packing)", min=1)
    truncation: str = knob("drop", "examples longer than --max_length: dropped, or cut on the left or right (always counted)",
                           choices=("drop", "left", "right"))
    skip_invalid: bool = knob(False, "skip invalid rows (counted and reported) instead of stopping")
    seed: int = knob(42, "random seed (data order, initialisation, sampling)", min=0)
    mixed_precision: str = knob("no", "autocast dtype: auto picks bf16 where the device supports it; fp16 needs a GPU",
                                choices=("no", "bf16", "fp16", "auto"), flag_values={"--bf16": "bf16", "--fp16": "fp16"})
    logging_steps: int = knob(10, "log to metrics.jsonl every N steps", min=1)
    save_steps: int = knob(0, "save a resumable checkpoint every N steps (0: none)", min=0)
    save_total_limit: int = knob(2, "keep only the newest N checkpoints (0: keep all)", min=0)
    resume_from_checkpoint: str = knob("", "PATH to checkpoints/step-N, or 'latest'")
    use_peft: bool = knob(False, "train LoRA adapters instead of all weights")
    lora_r: int = knob(16, "LoRA rank", min=1)
    lora_alpha: int = knob(32, "LoRA alpha", min=1)
    lora_dropout: float = knob(0.05, "LoRA dropout", min=0, max=1, max_exclusive=True)
    lora_target_modules: str = knob("all-linear", "comma-separated module names, or all-linear")
    use_chat_template: str = knob("auto", "format with the tokenizer's chat template", choices=("auto", "yes", "no"))
    separator: str = knob("\n\n### Response:\n", "joins prompt and completion when no chat template is used")
    progress: bool = knob(True, "show a progress bar")
    overwrite_output_dir: bool = knob(False, "allow --output_dir to hold another run's outputs: they are removed first (checkpoints too)")
    skip_nonfinite: bool = knob(False, "skip (and count) optimizer steps whose loss or gradient is not finite instead of stopping")
    gradient_checkpointing: bool = knob(False, "recompute activations in the backward pass (less memory, ~30% more compute)")
    report_to: str = knob("none", "where metrics go besides metrics.jsonl", choices=("none", "tensorboard", "wandb"))
    torch_dtype: str = knob("float32", "dtype the weights are loaded in", choices=("float32", "bfloat16", "float16", "auto"))

    def validate(self) -> None:
        """Rules that involve several fields or the machine; every value already passed its own declaration."""
        if self.max_steps == 0:
            refuse("max_steps", "0 would train nothing; give a number >= 1, or -1 to derive it from the epochs")
        if self.mixed_precision == "fp16":
            import torch

            if not torch.cuda.is_available():
                refuse("mixed_precision", "fp16 needs a CUDA GPU (none is visible); use no, bf16 or auto on this machine")
        if self.report_to != "none" and not _installed(self.report_to):
            refuse("report_to", f"{self.report_to} is not installed (pip install {self.report_to}); allowed: none | tensorboard | wandb")


@dataclass
class SupervisedConfig(TrainConfig):
    """Knobs of the trainers that step through a fixed data set in micro-batches (SFT, reward model, DPO)."""

    eval_dataset: str = knob("", "evaluation data, same forms as --dataset")
    num_train_epochs: float = knob(1.0, "passes over the training data (fractions allowed)", min=0, min_exclusive=True)
    per_device_train_batch_size: int = knob(8, "examples per micro-batch per process", min=1, aliases=("--batch_size",))
    per_device_eval_batch_size: int = knob(16, "examples per eval batch per process", min=1)
    gradient_accumulation_steps: int = knob(1, "micro-batches per optimizer step", min=1)
    eval_steps: int = knob(0, "evaluate every N steps (0: only at the end, if --eval_dataset)", min=0)

    def validate(self) -> None:
        super().validate()
        if self.eval_steps and not self.eval_dataset:
            refuse("eval_steps", f"{self.eval_steps} needs --eval_dataset (there is nothing to evaluate on)")


@dataclass
class SFTConfig(SupervisedConfig):
    """Supervised fine-tuning: teacher-forced cross-entropy with per-token weights."""

    learning_rate: float = knob(2e-5, "peak learning rate (AdamW)", min=0, min_exclusive=True)
    prompt_loss_weight: float = knob(0.0, "loss weight of instruction/system/user tokens (0 masks them)", min=0)
    packing: bool = knob(False, "pack several examples per row (attention stays within each example)")


@dataclass
class RMConfig(SupervisedConfig):
    """Reward model: the LM with a scalar head, trained on comparisons with −log σ(r_w − r_l − margin)."""

    learning_rate: float = knob(1e-5, "peak learning rate (AdamW)", min=0, min_exclusive=True)
    center_rewards_coefficient: float = knob(0.0, "adds c·(r_w + r_l)² to keep rewards centred at 0", min=0)
    normalize_dataset: str = knob("", "after training, shift the head's bias so these responses (prompt/completion rows) score 0 on average")
    attention_kernel: str = attention_kernel_knob()


@dataclass
class DPOConfig(SupervisedConfig):
    """Direct preference optimization and its variants: no reward model, no sampling."""

    learning_rate: float = knob(1e-6, "peak learning rate (AdamW)", min=0, min_exclusive=True)
    beta: float = knob(0.1, "β: strength of the implicit KL constraint to the reference", min=0, min_exclusive=True)
    loss_type: str = knob("sigmoid", "sigmoid (DPO) | ipo | hinge (SLiC) | robust | simpo (reference-free)",
                          choices=("sigmoid", "ipo", "hinge", "robust", "simpo"))
    label_smoothing: float = knob(0.0, "ε: assumed fraction of flipped labels (conservative DPO, robust)", min=0, max=0.5, max_exclusive=True)
    simpo_gamma: float = knob(0.5, "γ: target reward margin of simpo", min=0)
    sft_weight: float = knob(0.0, "adds this weight × NLL of the chosen response (RPO)", min=0)
    ref_model: str = knob("", "reference model (default: the starting policy; with LoRA, the adapter disabled)")
    precompute_ref_log_probs: bool = knob(False, "compute reference log-probs once before training, then free the reference")
    attention_kernel: str = attention_kernel_knob()


@dataclass
class PPOConfig(TrainConfig):
    """PPO (and critic-free RLOO/GRPO): maximize a reward while penalising KL from the reference model.

    --max_steps counts rollout-and-update iterations; --dataset holds prompts ({"prompt"}, messages, or
    any SFT format, whose completion is kept as a `completion` column for rewards such as exact match).
    Batches are set by --rollout_batch_size and --mini_batch_size: the supervised trainers' epoch, micro-batch,
    accumulation and eval knobs do not exist here."""

    learning_rate: float = knob(1e-6, "peak learning rate (AdamW)", min=0, min_exclusive=True)
    max_steps: int = knob(100, "rollout-and-update iterations", min=1)
    attention_kernel: str = attention_kernel_knob()
    logging_steps: int = knob(1, "log to metrics.jsonl every N iterations", min=1)
    reward_model: str = knob("", "reward model directory (an `alignkit rm` output) scoring prompt + response")
    reward_fn: str = knob("", "reward functions, comma-separated: module:function | path/file.py:function | builtin:exact_match | builtin:sentiment",
                          repeatable=True)
    reward_weights: str = knob("", "one weight per reward source, comma-separated: the reward model first (if any), then each --reward_fn "
                               "in order (default: all 1)", repeatable=True)
    ref_model: str = knob("", "reference model for the KL penalty (default: a frozen copy of the starting policy; with fresh --use_peft adapters, the adapters disabled)")
    advantage_estimator: str = knob("gae", "gae (PPO with a value head) | rloo | grpo (critic-free, k samples per prompt)",
                                    choices=("gae", "rloo", "grpo"))
    num_samples_per_prompt: int = knob(1, "k: responses sampled per prompt (≥ 2 for rloo/grpo)", min=1)
    rollout_batch_size: int = knob(16, "prompts per iteration (× num_samples_per_prompt responses), over all processes", min=1)
    num_ppo_epochs: int = knob(4, "passes over each rollout batch", min=1)
    mini_batch_size: int = knob(8, "responses per optimizer step", min=1)
    max_prompt_length: int = knob(512, "prompts longer than this (tokens) are dropped", min=1)
    max_new_tokens: int = knob(64, "response length limit (tokens)", min=1)
    temperature: float = knob(1.0, "sampling temperature (log-probs use the same)", min=0, min_exclusive=True)
    top_p: float = knob(1.0, "nucleus sampling", min=0, max=1, min_exclusive=True)
    recompute_old_logprobs: bool = knob(False, "recompute log π_old, the entropy and V_old with a teacher-forced pass after sampling instead of "
                                        "keeping the sampler's (equal up to float rounding; costs one forward pass of the policy per iteration)")
    shared_prefix_tokens: int = knob(-1, "teacher-forced passes (update, reference, critic) lay episodes out in rows of about this many tokens, "
                                      "computing the prompts' common prefix and each repeated prompt once (-1 = the model's hidden size, "
                                      "0 = one padded row per episode)", min=-1)
    kl_coef: float = knob(0.05, "β: weight of the per-token KL penalty (initial value when adaptive)", min=0)
    kl_estimator: str = knob("k1", "k1 (log π − log π_ref) | k3 ((r − 1) − log r)", choices=("k1", "k3"))
    kl_target: float = knob(0.0, "adaptive β: target KL per response (0 = fixed β)", min=0)
    kl_horizon: float = knob(10000.0, "adaptive β: horizon (in responses) of the proportional controller", min=0, min_exclusive=True)
    kl_early_stop: float = knob(0.0, "stop this iteration's updates once a minibatch's approximate KL to the rollout policy exceeds it (0 = never)", min=0)
    gamma: float = knob(1.0, "GAE discount γ", min=0, max=1)
    lam: float = knob(0.95, "GAE λ", min=0, max=1)
    cliprange: float = knob(0.2, "ε: policy ratio clip range", min=0, min_exclusive=True)
    cliprange_value: float = knob(0.2, "value clip range around the rollout values", min=0, min_exclusive=True)
    vf_coef: float = knob(0.1, "weight of the value loss", min=0)
    critic_model: str = knob("", "gae: a separate critic (a reward model dir, or a causal LM with a new zero head) instead of a value head on the policy")
    whiten_advantages: bool = knob(True, "normalize advantages to mean 0, std 1 per rollout batch")
    missing_eos_penalty: float = knob(0.0, "subtracted from the score of responses that hit max_new_tokens without EOS", min=0)
    normalize_scores: bool = knob(False, "standardize scores per rollout batch (mean 0, std 1) before the KL penalty")
    score_clip: float = knob(0.0, "clip scores to [−c, c] (0 = off)", min=0)
    ptx_coef: float = knob(0.0, "PPO-ptx: weight of the LM loss on --ptx_dataset mixed into each update", min=0)
    ptx_dataset: str = knob("", "PPO-ptx: pretraining text (any SFT format; all tokens are predicted)")
    gold_reward_fn: str = knob("", "log only: a reward function (--reward_fn spec) that scores the same samples each iteration, logged as "
                               "gold_score and never trained on; warns when the score rises while the gold falls (over-optimization)")

    def validate(self) -> None:
        super().validate()
        if self.advantage_estimator != "gae" and self.num_samples_per_prompt < 2:
            refuse("num_samples_per_prompt", f"{self.num_samples_per_prompt}: --advantage_estimator {self.advantage_estimator} "
                   "compares responses to the same prompt, so it needs >= 2")
        if self.ptx_coef > 0 and not self.ptx_dataset:
            refuse("ptx_coef", f"{self.ptx_coef:g} > 0 needs --ptx_dataset (the text whose LM loss is mixed in)")
        if not self.reward_model and not self.reward_fn:
            refuse("reward_fn", "give --reward_model DIR and/or --reward_fn SPEC: PPO needs a reward")
        if self.critic_model and self.advantage_estimator != "gae":
            refuse("critic_model", f"only --advantage_estimator gae has a critic, not {self.advantage_estimator}")
