"""Supervised fine-tuning: batches of (token ids, per-token weights) and the weighted cross-entropy."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from alignkit.config import SFTConfig
from alignkit.data.formats import InvalidRows, load_sft_examples
from alignkit.data.tokenize import Formatting, pack, tokenize_all
from alignkit.losses import weighted_cross_entropy_sum
from alignkit.models import LoraSettings, apply_lora, load_causal_lm, load_tokenizer, save_model, selected_logits
from alignkit.train.loop import Stage, check_engine_flags, load_datasets, train, write_data_report

logger = logging.getLogger(__name__)


@dataclass
class SFTExample:
    input_ids: list[int]
    weights: list[float]  # weight of predicting each token; 0 for the first token of every packed piece
    position_ids: list[int] | None = None  # set for packed rows: positions restart per piece


def formatting(cfg: SFTConfig) -> Formatting:
    return Formatting(cfg.use_chat_template, cfg.separator, cfg.prompt_loss_weight)


def pack_examples(examples: list[SFTExample], max_length: int) -> list[SFTExample]:
    """Several examples per row; each keeps its own positions, so attention stays inside it."""
    packed = []
    for group in pack([len(e.input_ids) for e in examples], max_length):
        ids, weights, positions = [], [], []
        for index in group:
            ids += examples[index].input_ids
            weights += examples[index].weights
            positions += list(range(len(examples[index].input_ids)))
        packed.append(SFTExample(ids, weights, positions))
    return packed


def collate(examples: list[SFTExample], pad_id: int) -> dict:
    """Right-pad to the longest row. Packed rows carry position_ids and no attention mask: the model
    derives the block-diagonal causal mask from where the positions restart (padding is one more block)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    weights = torch.zeros((len(examples), width))
    packed = any(e.position_ids is not None for e in examples)
    attention_or_positions = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        weights[row, :n] = torch.tensor(e.weights)
        if packed:
            positions = e.position_ids or list(range(n))
            attention_or_positions[row] = torch.tensor(positions + list(range(width - n)))
        else:
            attention_or_positions[row, :n] = 1
    key = "position_ids" if packed else "attention_mask"
    return {"input_ids": input_ids, "weights": weights, key: attention_or_positions}


def sft_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """Σ w·CE over the batch's predicted tokens (the loop divides by the step's Σ w)."""
    weights = batch["weights"][:, 1:]
    select = torch.nn.functional.pad(weights != 0, (1, 0))
    logits = selected_logits(model, batch, select)
    targets = batch["input_ids"][:, 1:][weights != 0]
    return weighted_cross_entropy_sum(logits, targets, weights[weights != 0]), {}


def build_examples(source: str, split: str, tokenizer, cfg: SFTConfig, name: str, report: dict) -> list[SFTExample]:
    invalid = InvalidRows(skip=cfg.skip_invalid)
    rows, fmt = load_sft_examples(source, split, invalid)
    tokenized = tokenize_all(rows, tokenizer, formatting(cfg), cfg.max_length, cfg.truncation)
    logger.info(f"{name} ({source}): format {fmt}; {tokenized.summary('kept')}")
    if invalid.total:
        logger.info(invalid.summary())
    report[name] = {
        "source": source, "format": fmt, "examples": len(tokenized.input_ids), "truncated": tokenized.truncated,
        "dropped": dict(tokenized.dropped), "invalid_skipped": dict(invalid.counts),
    }
    return [SFTExample(i, w) for i, w in zip(tokenized.input_ids, tokenized.weights)]


def run_sft(cfg: SFTConfig) -> dict:
    """Fine-tune cfg.model_name_or_path on cfg.dataset; returns the last logged metrics."""
    if not cfg.dataset:
        raise ValueError("--dataset is required (a file, a datasets dir, a hub id, or builtin:TASK[,TASK])")
    check_engine_flags(cfg)  # --mixed_precision, --report_to: bad values fail before any model loads
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    build = lambda source, split, name, report: build_examples(source, split, tokenizer, cfg, name, report)  # noqa: E731
    train_examples, eval_examples, report = load_datasets(cfg, build, "training examples")
    if cfg.packing:
        train_examples = pack_examples(train_examples, cfg.max_length)
        report["train"]["packed_rows"] = len(train_examples)
        logger.info(f"packed into {len(train_examples)} rows of at most {cfg.max_length} tokens")
    write_data_report(cfg, report)

    model = load_causal_lm(cfg.model_name_or_path)
    if cfg.use_peft and not hasattr(model, "peft_config"):
        model = apply_lora(model, LoraSettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules))
    pad_id = tokenizer.pad_token_id
    stage = Stage(
        model=model,
        train_examples=train_examples,
        eval_examples=eval_examples,
        collate=lambda examples: collate(examples, pad_id),
        loss=sft_loss,
        weight=lambda e: sum(e.weights),
        num_tokens=lambda e: len(e.input_ids),
        save=lambda m, d: save_model(m, tokenizer, d),
    )
    return train(stage, cfg)
