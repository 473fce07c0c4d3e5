"""Config dataclasses: every knob of every stage, with the flag names transformers/TRL users know.

Precedence: dataclass default < `--config FILE.yaml` < explicit command-line flag. The CLI builds its
flags from these fields (help text from `metadata["help"]`), so a knob is declared exactly once.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


def knob(default: Any, help: str, **kwargs) -> Any:
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class TrainConfig:
    """Knobs shared by every trainer (SFT, reward model, DPO, PPO)."""

    model_name_or_path: str = knob("smollm2-135m-instruct", "HF model dir, hub id, or built-in name")
    dataset: str = knob("", "training data: .jsonl/.json/.csv/.parquet, a saved datasets dir, a hub id, or builtin:TASK[,TASK]")
    eval_dataset: str = knob("", "evaluation data, same forms as --dataset")
    dataset_split: str = knob("train", "split to read from a datasets dir or hub id")
    output_dir: str = knob("outputs/run", "where the model, metrics.jsonl, config.yaml and checkpoints go")
    max_steps: int = knob(-1, "optimizer steps; -1 = derive from --num_train_epochs")
    num_train_epochs: float = knob(1.0, "passes over the training data (fractions allowed)")
    per_device_train_batch_size: int = knob(8, "examples per micro-batch per process")
    per_device_eval_batch_size: int = knob(16, "examples per eval batch per process")
    gradient_accumulation_steps: int = knob(1, "micro-batches per optimizer step")
    learning_rate: float = knob(2e-5, "peak learning rate (AdamW)")
    lr_scheduler_type: str = knob("linear", "linear | cosine | constant | constant_with_warmup | ...")
    warmup_ratio: float = knob(0.0, "fraction of steps spent warming up the learning rate")
    weight_decay: float = knob(0.0, "AdamW weight decay (not applied to biases and norms)")
    adam_beta1: float = knob(0.9, "AdamW beta1")
    adam_beta2: float = knob(0.999, "AdamW beta2")
    max_grad_norm: float = knob(1.0, "gradient clipping norm; 0 disables")
    max_length: int = knob(1024, "maximum tokens per example (per packed row with --packing)")
    truncation: str = knob("drop", "examples longer than --max_length: drop | left | right (always counted)")
    skip_invalid: bool = knob(False, "skip invalid rows (counted and reported) instead of stopping")
    seed: int = knob(42, "random seed (data order, initialisation, sampling)")
    mixed_precision: str = knob("no", "no | bf16 | fp16 (where the device supports it)")
    logging_steps: int = knob(10, "log to metrics.jsonl every N steps")
    eval_steps: int = knob(0, "evaluate every N steps (0: only at the end, if --eval_dataset)")
    save_steps: int = knob(0, "save a resumable checkpoint every N steps (0: none)")
    save_total_limit: int = knob(2, "keep only the newest N checkpoints (0: keep all)")
    resume_from_checkpoint: str = knob("", "PATH to checkpoints/step-N, or 'latest'")
    use_peft: bool = knob(False, "train LoRA adapters instead of all weights")
    lora_r: int = knob(16, "LoRA rank")
    lora_alpha: int = knob(32, "LoRA alpha")
    lora_dropout: float = knob(0.05, "LoRA dropout")
    lora_target_modules: str = knob("all-linear", "comma-separated module names, or all-linear")
    use_chat_template: str = knob("auto", "auto | yes | no: format with the tokenizer's chat template")
    separator: str = knob("\n\n### Response:\n", "joins prompt and completion when no chat template is used")
    progress: bool = knob(True, "show a progress bar")
    overwrite_output_dir: bool = knob(False, "allow --output_dir to hold another run's outputs: they are removed first (checkpoints too)")
    skip_nonfinite: bool = knob(False, "skip (and count) optimizer steps whose loss or gradient is not finite instead of stopping")
    gradient_checkpointing: bool = knob(False, "recompute activations in the backward pass (less memory, ~30% more compute)")
    report_to: str = knob("none", "none | tensorboard | wandb: where metrics go besides metrics.jsonl")
    torch_dtype: str = knob("float32", "dtype the weights are loaded in: float32 | bfloat16 | float16 | auto")


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning: teacher-forced cross-entropy with per-token weights."""

    learning_rate: float = knob(2e-5, "peak learning rate (AdamW)")
    prompt_loss_weight: float = knob(0.0, "loss weight of instruction/system/user tokens (0 masks them)")
    packing: bool = knob(False, "pack several examples per row (attention stays within each example)")


def _coerce(value: Any, annotation: Any) -> Any:
    kind = annotation if isinstance(annotation, type) else eval(annotation, {}, {})  # "float" -> float
    if kind is bool and isinstance(value, str):
        return value.lower() in ("1", "true", "yes", "on")
    return kind(value)


def load_config(cls: type, config_file: str | None = None, overrides: dict[str, Any] | None = None):
    """Build `cls` from defaults, then the YAML file, then explicit overrides (None = not given)."""
    values: dict[str, Any] = {}
    names = {f.name: f for f in dataclasses.fields(cls)}
    if config_file:
        loaded = yaml.safe_load(Path(config_file).read_text()) or {}
        unknown = sorted(set(loaded) - set(names))
        if unknown:
            raise ValueError(f"{config_file}: unknown keys {unknown}; valid keys are the flag names, e.g. {sorted(names)[:5]}")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(v, hints[k]) for k, v in values.items()})


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False, allow_unicode=True))


@dataclass
class RMConfig(TrainConfig):
    """Reward model: the LM with a scalar head, trained on comparisons with −log σ(r_w − r_l − margin)."""

    learning_rate: float = knob(1e-5, "peak learning rate (AdamW)")
    center_rewards_coefficient: float = knob(0.0, "adds c·(r_w + r_l)² to keep rewards centred at 0")
    normalize_dataset: str = knob("", "after training, shift the head's bias so these responses (prompt/completion rows) score 0 on average")


@dataclass
class DPOConfig(TrainConfig):
    """Direct preference optimization and its variants: no reward model, no sampling."""

    learning_rate: float = knob(1e-6, "peak learning rate (AdamW)")
    beta: float = knob(0.1, "β: strength of the implicit KL constraint to the reference")
    loss_type: str = knob("sigmoid", "sigmoid (DPO) | ipo | hinge (SLiC) | robust | simpo (reference-free)")
    label_smoothing: float = knob(0.0, "ε: assumed fraction of flipped labels (conservative DPO, robust)")
    simpo_gamma: float = knob(0.5, "γ: target reward margin of simpo")
    sft_weight: float = knob(0.0, "adds this weight × NLL of the chosen response (RPO)")
    ref_model: str = knob("", "reference model (default: the starting policy; with LoRA, the adapter disabled)")
    precompute_ref_log_probs: bool = knob(False, "compute reference log-probs once before training, then free the reference")


@dataclass
class PPOConfig(TrainConfig):
    """PPO (and critic-free RLOO/GRPO): maximize a reward while penalising KL from the reference model.

    --max_steps counts rollout-and-update iterations; --dataset holds prompts ({"prompt"}, messages, or
    any SFT format, whose completion is kept as a `completion` column for rewards such as exact match)."""

    learning_rate: float = knob(1e-6, "peak learning rate (AdamW)")
    max_steps: int = knob(100, "rollout-and-update iterations")
    logging_steps: int = knob(1, "log to metrics.jsonl every N iterations")
    reward_model: str = knob("", "reward model directory (an `alignkit rm` output) scoring prompt + response")
    # `repeatable`: the CLI may take the flag several times and join the values with commas
    reward_fn: str = knob("", "reward functions, comma-separated: module:function | path/file.py:function | builtin:exact_match | builtin:sentiment",
                          repeatable=True)
    reward_weights: str = knob("", "one weight per reward source, comma-separated: the reward model first (if any), then each --reward_fn "
                               "in order (default: all 1)", repeatable=True)
    ref_model: str = knob("", "reference model for the KL penalty (default: a frozen copy of the starting policy; with fresh --use_peft adapters, the adapters disabled)")
    advantage_estimator: str = knob("gae", "gae (PPO with a value head) | rloo | grpo (critic-free, k samples per prompt)")
    num_samples_per_prompt: int = knob(1, "k: responses sampled per prompt (≥ 2 for rloo/grpo)")
    rollout_batch_size: int = knob(16, "prompts per iteration (× num_samples_per_prompt responses), over all processes")
    num_ppo_epochs: int = knob(4, "passes over each rollout batch")
    mini_batch_size: int = knob(8, "responses per optimizer step")
    max_prompt_length: int = knob(512, "prompts longer than this (tokens) are dropped")
    max_new_tokens: int = knob(64, "response length limit (tokens)")
    temperature: float = knob(1.0, "sampling temperature (log-probs use the same)")
    top_p: float = knob(1.0, "nucleus sampling")
    recompute_old_logprobs: bool = knob(False, "recompute log π_old, the entropy and V_old with a teacher-forced pass after sampling instead of "
                                        "keeping the sampler's (equal up to float rounding; costs one forward pass of the policy per iteration)")
    shared_prefix_tokens: int = knob(-1, "teacher-forced passes (update, reference, critic) lay episodes out in rows of about this many tokens, "
                                      "computing the prompts' common prefix and each repeated prompt once (-1 = the model's hidden size, "
                                      "0 = one padded row per episode)")
    kl_coef: float = knob(0.05, "β: weight of the per-token KL penalty (initial value when adaptive)")
    kl_estimator: str = knob("k1", "k1 (log π − log π_ref) | k3 ((r − 1) − log r)")
    kl_target: float = knob(0.0, "adaptive β: target KL per response (0 = fixed β)")
    kl_horizon: float = knob(10000.0, "adaptive β: horizon (in responses) of the proportional controller")
    kl_early_stop: float = knob(0.0, "stop this iteration's updates once a minibatch's approximate KL to the rollout policy exceeds it (0 = never)")
    gamma: float = knob(1.0, "GAE discount γ")
    lam: float = knob(0.95, "GAE λ")
    cliprange: float = knob(0.2, "ε: policy ratio clip range")
    cliprange_value: float = knob(0.2, "value clip range around the rollout values")
    vf_coef: float = knob(0.1, "weight of the value loss")
    critic_model: str = knob("", "gae: a separate critic (a reward model dir, or a causal LM with a new zero head) instead of a value head on the policy")
    whiten_advantages: bool = knob(True, "normalize advantages to mean 0, std 1 per rollout batch")
    missing_eos_penalty: float = knob(0.0, "subtracted from the score of responses that hit max_new_tokens without EOS")
    normalize_scores: bool = knob(False, "standardize scores per rollout batch (mean 0, std 1) before the KL penalty")
    score_clip: float = knob(0.0, "clip scores to [−c, c] (0 = off)")
    ptx_coef: float = knob(0.0, "PPO-ptx: weight of the LM loss on --ptx_dataset mixed into each update")
    ptx_dataset: str = knob("", "PPO-ptx: pretraining text (any SFT format; all tokens are predicted)")
    gold_reward_fn: str = knob("", "log only: a reward function (--reward_fn spec) that scores the same samples each iteration, logged as "
                               "gold_score and never trained on; warns when the score rises while the gold falls (over-optimization)")
