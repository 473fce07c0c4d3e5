"""Reward model training: the LM with a scalar head, trained so the better response scores higher.

Loss per prompt: the mean over its pairs (better w, worse l) of −log σ(r_w − r_l − margin), plus the
optional c·(r_w + r_l)² (--center_rewards_coefficient); see `losses.reward_model_loss_sum`. A pair is
one pair; a K-way ranking gives C(K,2) pairs (ties give none) and still counts once (InstructGPT).
Each prompt has weight 1, so the loop's normalizer is the number of prompts in the step.

Batches (`collate`): a decoder reads every response after the *same* prompt, so each example is one
row, prompt once, then its K responses, each attending to the prompt and to itself only, with the
positions it would have alone. That is exactly the K separate sequences, computed with the prompt
once and with less padding. Encoders (bidirectional) get one padded row per response instead.

Logged metrics (train and eval; per prompt means over its pairs/responses, then averaged over prompts):
loss, accuracy (share of pairs with r_w > r_l), margin (mean r_w − r_l), reward_mean, reward_std
(sqrt(E[(r − c)²] − (E[r] − c)²) around a fixed reference c near the mean, see `RewardShift`; added to
metrics.jsonl when training ends).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignkit import atomic
from alignkit.config import RMConfig
from alignkit.data.formats import InvalidRows
from alignkit.data.preferences import TokenizedPreference, load_preferences, tokenize_preferences
from alignkit.data.tokenize import Formatting, pad_right
from alignkit.losses import reward_model_loss_sum
from alignkit.models import LoraSettings, apply_lora, load_tokenizer, save_model
from alignkit.packing import supports_custom_masks, tree_mask
from alignkit.precision import autocast
from alignkit.reward_model import RewardModel, init_head, load_reward_model, score_sequences, write_normalization
from alignkit.train.loop import Stage, check_engine_flags, load_datasets, train, write_data_report

logger = logging.getLogger(__name__)


def formatting(cfg: RMConfig) -> Formatting:
    return Formatting(cfg.use_chat_template, cfg.separator)


def collate(examples: list[TokenizedPreference], pad_id: int, shared: bool) -> dict:
    """Every response of every example in one forward pass; rewards come out in (example, response)
    order, and better/worse/group index them: pair p of example g compares rewards[better[p]] with
    rewards[worse[p]]."""
    better, worse, group, margin, start = [], [], [], [], 0
    for g, e in enumerate(examples):
        better += [start + b for b, _ in e.pairs]
        worse += [start + w for _, w in e.pairs]
        group += [g] * len(e.pairs)
        margin += [e.margin] * len(e.pairs)
        start += len(e.response_ids)
    batch = {
        "better": torch.tensor(better), "worse": torch.tensor(worse), "group": torch.tensor(group),
        "margin": torch.tensor(margin), "num_prompts": len(examples), "response_group": torch.tensor([g for g, e in enumerate(examples) for _ in e.response_ids]),
    }
    if not shared:
        batch["input_ids"], batch["attention_mask"] = pad_right([e.sequence(k) for e in examples for k in range(len(e.response_ids))], pad_id)
        return batch
    rows = [e.prompt_ids + [t for r in e.response_ids for t in r] for e in examples]
    input_ids, _ = pad_right(rows, pad_id)
    width = input_ids.shape[1]
    segment = torch.full((len(rows), width), -1)  # -1 padding, 0 prompt, k + 1 response k
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    last = []
    for b, e in enumerate(examples):
        p = len(e.prompt_ids)
        segment[b, :p], position_ids[b, :p] = 0, torch.arange(p)
        cursor = p
        for k, r in enumerate(e.response_ids):
            segment[b, cursor : cursor + len(r)] = k + 1
            position_ids[b, cursor : cursor + len(r)] = torch.arange(p, p + len(r))
            cursor += len(r)
            last.append(b * width + cursor - 1)
    parent = torch.tensor([-1] + [0] * max(len(e.response_ids) for e in examples)).repeat(len(rows), 1)  # responses see the prompt
    batch.update(input_ids=input_ids, attention_mask=tree_mask(segment, parent), position_ids=position_ids, last=torch.tensor(last))
    return batch


def per_prompt_sum(values: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Σ over prompts of the mean of `values` within each prompt (so metrics share the loss's normalizer)."""
    sums = torch.zeros(num_groups, device=values.device).index_add_(0, group, values.float())
    counts = torch.zeros(num_groups, device=values.device).index_add_(0, group, torch.ones_like(values, dtype=torch.float))
    return (sums / counts).sum()


@dataclass
class RewardShift:
    """The reference c of the logged reward spread. The loop can only sum metrics, so the std comes from
    the means of r and (r − c)²: var = E[(r − c)²] − (E[r] − c)², exact for any constant c. With c = 0
    that subtraction cancels: rewards of −2.7 ± 0.09 lose a factor (2.7 / 0.09)² ≈ 900 of float32's
    precision (std off by 1e-4 relative). c = the mean reward of the first training batch (averaged over
    processes, so every process sums around the same c) keeps E[r] − c within a few stds of zero. c lives
    in `state`, the stage's checkpointed state, so a resumed run sums around the c of the first run."""

    state: dict = field(default_factory=dict)

    def of(self, rewards: torch.Tensor) -> float:
        if "reward_shift" not in self.state:
            mean = rewards.detach().float().mean()
            if torch.distributed.is_available() and torch.distributed.is_initialized():  # first batch: every process is here
                torch.distributed.all_reduce(mean)
                mean /= torch.distributed.get_world_size()
            self.state["reward_shift"] = mean.item()  # a float32 value: r − c below subtracts exactly this c
        return self.state["reward_shift"]


def rm_loss(model, batch: dict, center_coefficient: float = 0.0, shift: RewardShift | None = None) -> tuple[torch.Tensor, dict]:
    """(Σ over prompts of the pairwise loss, metric sums); the loop divides both by the number of prompts.
    `reward_shift` is c itself (summed once per prompt, so it averages to c) for `add_reward_std`."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "last") if k in batch}
    rewards = model(**inputs)
    better, worse, group = batch["better"], batch["worse"], batch["group"]
    num_groups = batch["num_prompts"]
    loss = reward_model_loss_sum(rewards, better, worse, group, num_groups, batch["margin"], center_coefficient)
    with torch.no_grad():
        diff = rewards[better] - rewards[worse]
        c = (shift or RewardShift()).of(rewards)
        metrics = {
            "accuracy": per_prompt_sum((diff > 0).float(), group, num_groups),
            "margin": per_prompt_sum(diff, group, num_groups),
            "reward_mean": per_prompt_sum(rewards, batch["response_group"], num_groups),
            "reward_sq": per_prompt_sum((rewards.float() - c) ** 2, batch["response_group"], num_groups),
            "reward_shift": torch.tensor(c * num_groups, dtype=torch.float32, device=rewards.device),
        }
    return loss, metrics


def build_examples(source: str, split: str, tokenizer, cfg: RMConfig, name: str, report: dict) -> list[TokenizedPreference]:
    invalid = InvalidRows(skip=cfg.skip_invalid)
    tokenized = tokenize_preferences(load_preferences(source, split, invalid), tokenizer, formatting(cfg), cfg.max_length, cfg.truncation)
    pairs = sum(len(e.pairs) for e in tokenized.examples)
    notes = [f"{tokenized.truncated} prompts cut from the left to fit --max_length"] if tokenized.truncated else []
    notes += [f"{tokenized.dropped} dropped (longer than --max_length {cfg.max_length})"] if tokenized.dropped else []
    logger.info(f"{name} ({source}): {len(tokenized.examples)} prompts, {pairs} pairs" + "".join(f", {n}" for n in notes))
    if invalid.total:
        logger.info(invalid.summary())
    report[name] = {"source": source, "prompts": len(tokenized.examples), "pairs": pairs, "truncated": tokenized.truncated,
                    "dropped": tokenized.dropped, "invalid_skipped": dict(invalid.counts)}
    return tokenized.examples


def build_model(cfg: RMConfig, tokenizer) -> RewardModel:
    """The backbone with a fresh N(0, 1/√(d+1)) scalar head (kept if it is already a reward model); LoRA optional."""
    rm, head_is_new = load_reward_model(cfg.model_name_or_path)
    if head_is_new:
        init_head(rm.model, cfg.seed)
    rm.model.config.pad_token_id = tokenizer.pad_token_id  # for transformers' own forward; alignkit reads the mask
    if cfg.use_peft:  # SEQ_CLS: peft trains a copy of the head (modules_to_save) beside the adapters
        rm.model = apply_lora(rm.model, LoraSettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules), task_type="SEQ_CLS")
    return rm


def save_reward_model(rm: RewardModel, tokenizer, output_dir: Path) -> None:
    """A plain AutoModelForSequenceClassification dir; LoRA adapters are merged in so every tool loads it alone."""
    model = rm.model.merge_and_unload() if hasattr(rm.model, "merge_and_unload") else rm.model
    save_model(model, tokenizer, output_dir)


def normalize(cfg: RMConfig, tokenizer) -> dict:
    """Shift the saved model's rewards so the responses of --normalize_dataset average 0 (InstructGPT
    does this before RL). Prompt/completion rows: the completion; preference rows: the best responses."""
    from alignkit.data.preferences import read_for_scoring

    split = "train" if cfg.normalize_dataset.startswith(("builtin:", "builtin_pref:")) else cfg.dataset_split
    items = read_for_scoring(cfg.normalize_dataset, split, tokenizer, formatting(cfg), InvalidRows(skip=cfg.skip_invalid))
    worse = [{w for _, w in item.pairs} for item in items]
    sequences = [s for item, w in zip(items, worse) for k, s in enumerate(item.sequences) if k not in w]
    rm, _ = load_reward_model(cfg.output_dir)
    with autocast(cfg.mixed_precision, next(rm.parameters()).device):  # scored as training scored them
        scores = score_sequences(rm, sequences, tokenizer.pad_token_id, cfg.per_device_eval_batch_size)
    rewards = torch.tensor(scores, dtype=torch.float64)
    mean, std = rewards.mean().item(), rewards.std().item() if len(rewards) > 1 else 0.0
    publish_normalization(Path(cfg.output_dir), mean, std, cfg.normalize_dataset)
    logger.info(f"normalized on {len(sequences)} responses of {cfg.normalize_dataset}: mean {mean:.4f} -> 0 (std {std:.4f})")
    return {"normalize_mean": mean, "normalize_std": std}


def publish_normalization(output_dir: Path, mean: float, std: float, source: str) -> None:
    """write_normalization re-saves the model (its config; its weights when the head has a bias). It writes
    into a copy of those files, which then replace the originals one rename at a time, weights first, so a
    failure or a kill leaves every file whole: the old model, or the normalized one (a kill between two
    renames: normalized weights beside the old config, which only describes the normalization). The
    staging folder is named like the loop's final-model save, so a leftover is removed on resume."""
    import shutil

    staging = output_dir / f".tmp-model-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        for path in output_dir.iterdir():
            if path.name == "config.json" or (path.name.startswith("model") and ".safetensors" in path.name):
                shutil.copy2(path, staging / path.name)
        write_normalization(staging, mean, std, source)
        written = sorted(staging.iterdir(), key=lambda path: (path.suffix == ".json", path.name))  # weights, then metadata
        for path in written:
            with open(path, "rb") as handle:  # on disk before the rename, as atomic.atomic_path does
                os.fsync(handle.fileno())
            os.replace(path, output_dir / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def add_reward_std(row: dict) -> dict:
    """reward_sq (mean of (r − c)²) and reward_shift (c) -> reward_std = sqrt(E[(r − c)²] − (E[r] − c)²),
    for train and eval columns (see `RewardShift`)."""
    for prefix in ("", "eval_"):
        if f"{prefix}reward_sq" in row:
            shifted_mean = row[f"{prefix}reward_mean"] - row.pop(f"{prefix}reward_shift")
            row[f"{prefix}reward_std"] = math.sqrt(max(row.pop(f"{prefix}reward_sq") - shifted_mean**2, 0.0))
    return row


def run_rm(cfg: RMConfig) -> dict:
    """Train a reward model on cfg.dataset's comparisons; returns the last logged metrics."""
    if not cfg.dataset:
        raise ValueError("--dataset is required: preference rows (prompt/chosen/rejected, or prompt/responses) or builtin_pref:TASK")
    check_engine_flags(cfg)  # --mixed_precision, --report_to: bad values fail before any model loads
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    build = lambda source, split, name, report: build_examples(source, split, tokenizer, cfg, name, report)  # noqa: E731
    train_examples, eval_examples, report = load_datasets(cfg, build, "training examples")
    write_data_report(cfg, report)

    rm = build_model(cfg, tokenizer)
    shift = RewardShift()
    shared, pad_id = rm.decoder and supports_custom_masks(rm.model), tokenizer.pad_token_id
    stage = Stage(
        model=rm,
        train_examples=train_examples,
        eval_examples=eval_examples,
        collate=lambda examples: collate(examples, pad_id, shared),
        loss=lambda model, batch: rm_loss(model, batch, cfg.center_rewards_coefficient, shift),
        weight=lambda e: 1.0,
        num_tokens=lambda e: sum(len(e.prompt_ids) + len(r) for r in e.response_ids),
        save=lambda model, directory: save_reward_model(model, tokenizer, directory),
        state=shift.state,
    )
    row = add_reward_std(train(stage, cfg))
    if os.environ.get("RANK", "0") != "0":
        return row
    metrics = Path(cfg.output_dir, "metrics.jsonl")
    rows = [add_reward_std(json.loads(line)) for line in metrics.read_text().splitlines() if line.strip()]
    atomic.write_jsonl(metrics, rows)
    if cfg.normalize_dataset:
        row.update(normalize(cfg, tokenizer))
    return row
