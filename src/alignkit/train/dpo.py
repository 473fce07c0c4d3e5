"""Direct preference optimization (and IPO, SLiC, robust DPO, SimPO, RPO) on the shared training loop.

One training example is one (chosen, rejected) pair; a K-way ranking becomes its C(K,2) pairs. The B
pairs of a micro-batch go through the policy in one forward pass: one row per pair, prompt + chosen +
rejected, each response attending to the prompt and itself only (so the prompt is computed once, and
identically for both), or, where attention cannot take such a mask, 2B right-padded rows, chosen then
rejected. Sequence log-probs are summed over response tokens only. Each pair weighs 1, so the logged loss
is the mean over the pairs of a step, and every metric (a sum here) is a mean over pairs.

The reference model, in order of preference:
  simpo                 none (reference-free; nothing is loaded)
  --ref_model PATH      that model, frozen
  fresh LoRA adapters   the policy itself with the adapters disabled (no second copy in memory)
  otherwise             a frozen copy of the starting policy
--precompute_ref_log_probs runs it once over all pairs before training, keeps two floats per pair and
drops the reference: every step then saves the reference forward pass.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from alignkit.attention import use_attention_kernel
from alignkit.config import DPOConfig
from alignkit.data.formats import InvalidRows
from alignkit.data.preferences import load_preferences, tokenize_preferences
from alignkit.data.tokenize import Formatting, pad_right
from alignkit.losses import DPO_LOSS_TYPES, chosen_nll, dpo_losses
from alignkit.models import LoraSettings, apply_lora, load_causal_lm, load_tokenizer, save_model, trunk_and_head
from alignkit.packing import for_attention, supports_custom_masks, tree_mask
from alignkit.precision import autocast, default_device
from alignkit.train.loop import Stage, check_engine_flags, load_datasets, train, write_data_report

logger = logging.getLogger(__name__)

# (model being trained, batch) -> reference log-probs [2B] (chosen rows, then rejected rows)
Reference = Callable[[torch.nn.Module, dict], torch.Tensor]


@dataclass
class DPOPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    ref_logps: tuple[float, float] | None = None  # (chosen, rejected), set by --precompute_ref_log_probs

    def num_tokens(self) -> int:
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


def validate(cfg: DPOConfig) -> None:
    """Bad flags fail before any model is loaded."""
    if not cfg.dataset:
        raise ValueError("--dataset is required (preference rows: prompt/chosen/rejected, chosen/rejected conversations, "
                         "prompt/responses rankings, or builtin_pref:TASK[:N])")
    if cfg.loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"--loss_type must be one of {', '.join(DPO_LOSS_TYPES)}, got {cfg.loss_type!r}")
    if cfg.beta <= 0:
        raise ValueError(f"--beta must be > 0, got {cfg.beta}")
    if not 0 <= cfg.label_smoothing < 0.5:
        raise ValueError(f"--label_smoothing must be in [0, 0.5), got {cfg.label_smoothing}")
    if cfg.sft_weight < 0:
        raise ValueError(f"--sft_weight must be >= 0, got {cfg.sft_weight}")
    check_engine_flags(cfg)  # --mixed_precision, --report_to: bad values fail before any model loads


def build_pairs(source: str, split: str, tokenizer, cfg: DPOConfig, name: str, report: dict) -> list[DPOPair]:
    invalid = InvalidRows(skip=cfg.skip_invalid)
    preferences = load_preferences(source, split, invalid)
    tokenized = tokenize_preferences(preferences, tokenizer, Formatting(cfg.use_chat_template, cfg.separator), cfg.max_length, cfg.truncation)
    pairs = [DPOPair(t.prompt_ids, t.response_ids[w], t.response_ids[l]) for t in tokenized.examples for w, l in t.pairs]
    logger.info(f"{name} ({source}): {len(tokenized.examples)} prompts -> {len(pairs)} pairs; "
          f"{tokenized.truncated} prompts cut from the left, {tokenized.dropped} dropped (longer than --max_length {cfg.max_length})")
    if invalid.total:
        logger.info(invalid.summary())
    report[name] = {"source": source, "prompts": len(tokenized.examples), "pairs": len(pairs), "truncated": tokenized.truncated,
                    "dropped": tokenized.dropped, "invalid_skipped": dict(invalid.counts)}
    return pairs


def collate(pairs: list[DPOPair], pad_id: int, shared: bool = True) -> dict:
    """The 2B sequences of B pairs (chosen 0..B-1, rejected B..2B-1) as one batch for one forward pass.

    shared: one row per pair, prompt + chosen + rejected, where each response attends to the prompt and to
    itself only and is positioned right after the prompt, exactly as if alone: the prompt is computed once
    per pair and the rows are half as many. Otherwise 2B right-padded rows, prompt + response each.
    Either way `predict_from` indexes (row · width + column) the hidden state that predicts each response
    token, `targets` holds that token and `sequence` its sequence number."""
    n = len(pairs)
    if shared:
        rows = [p.prompt_ids + p.chosen_ids + p.rejected_ids for p in pairs]
    else:
        rows = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    input_ids, attention_mask = pad_right(rows, pad_id)
    width = input_ids.shape[1]
    predict_from, targets, sequence = [], [], []

    def response(row: int, start: int, ids: list[int], number: int) -> None:
        before = torch.arange(start - 1, start + len(ids) - 1)
        before[0] = len(pairs[number % n].prompt_ids) - 1  # the first token is predicted from the prompt's end
        predict_from.append(row * width + before)
        targets.append(torch.tensor(ids))
        sequence.append(torch.full((len(ids),), number))

    for b, p in enumerate(pairs):
        start = len(p.prompt_ids)
        response(b, start, p.chosen_ids, b)
        response(b if shared else n + b, start + len(p.chosen_ids) if shared else start, p.rejected_ids, n + b)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "predict_from": torch.cat(predict_from),
             "targets": torch.cat(targets), "sequence": torch.cat(sequence),
             "lengths": torch.tensor([len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs])}
    if shared:
        segment = torch.full((n, width), -1)  # -1 padding, 0 prompt, 1 chosen, 2 rejected
        position_ids = torch.zeros((n, width), dtype=torch.long)
        for b, p in enumerate(pairs):
            start, c = len(p.prompt_ids), len(p.chosen_ids)
            segment[b, :start], segment[b, start : start + c], segment[b, start + c : len(rows[b])] = 0, 1, 2
            position_ids[b, : len(rows[b])] = torch.cat([torch.arange(start + c), torch.arange(start, start + len(p.rejected_ids))])
        parent = torch.tensor([[-1, 0, 0]]).repeat(n, 1)  # chosen and rejected both see the prompt only
        batch.update(attention_mask=tree_mask(segment, parent), position_ids=position_ids)
    if all(p.ref_logps is not None for p in pairs):
        batch["ref_logps"] = torch.tensor([p.ref_logps[0] for p in pairs] + [p.ref_logps[1] for p in pairs])
    return batch


def sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ log π(token) over each sequence's response tokens [2B] in float32, response lengths [2B]).

    Only the hidden states that predict a response token are unembedded: the prompt costs no vocabulary matmul."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    if inputs["attention_mask"].dim() == 4:
        inputs["attention_mask"] = for_attention(inputs["attention_mask"], model)
    trunk, head = trunk_and_head(model)
    if trunk is None:  # DDP, or logit soft-capping: the whole model, then pick the positions
        logits = model(**inputs, use_cache=False).logits.flatten(0, 1)[batch["predict_from"]]
    else:
        logits = head(trunk(**inputs, use_cache=False).last_hidden_state.flatten(0, 1)[batch["predict_from"]])
    token_logps = -F.cross_entropy(logits.float(), batch["targets"], reduction="none")
    lengths = batch["lengths"]
    sums = torch.zeros(lengths.shape[0], device=token_logps.device).index_add(0, batch["sequence"], token_logps)
    return sums, lengths.to(sums)


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """Dropout off for the reference pass (it is a fixed function), then the caller's mode back."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def frozen_reference(model: torch.nn.Module) -> Reference:
    """A separate reference model: no gradients, eval mode, moved to the batch's device on first use."""
    model.requires_grad_(False).eval()

    def logps(_policy, batch):
        device = batch["input_ids"].device
        if next(model.parameters()).device != device:
            model.to(device)
        with torch.no_grad():
            return sequence_logps(model, batch)[0]

    logps.model = model  # so that run_dpo can check it takes shared-prompt rows too
    return logps


def adapter_disabled_reference(_policy, batch) -> torch.Tensor:
    """The policy with its LoRA adapters switched off: exactly the base model, at no extra memory."""
    peft_model = getattr(_policy, "module", _policy)  # under DDP the peft model is inside
    with torch.no_grad(), peft_model.disable_adapter(), eval_mode(peft_model):
        return sequence_logps(peft_model, batch)[0]


def make_reference(cfg: DPOConfig, policy, starting_adapter: bool) -> Reference | None:
    """The reference for cfg (see the module docstring); None for the reference-free simpo."""
    if cfg.loss_type == "simpo":
        return None
    if cfg.ref_model:
        reference = load_causal_lm(cfg.ref_model)
        if reference.get_output_embeddings().weight.shape[0] != policy.get_output_embeddings().weight.shape[0]:
            raise ValueError(f"--ref_model {cfg.ref_model}: its vocabulary size differs from the policy's; it must share the tokenizer")
        return frozen_reference(reference)
    if hasattr(policy, "peft_config") and not starting_adapter:
        return adapter_disabled_reference
    # a full model, or adapters loaded from an adapter dir (disabling them would not give the starting policy)
    return frozen_reference(load_causal_lm(cfg.model_name_or_path))


def precompute_reference(reference: Reference, policy, pairs: list[DPOPair], pad_id: int, batch_size: int, shared: bool,
                         precision: str = "no") -> None:
    """Store each pair's reference log-probs on it, batch by batch, on the GPU when there is one."""
    device = default_device()
    policy.to(device)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id, shared).items()}
        with autocast(precision, device):  # the same forward as the reference pass inside the loop
            logps = reference(policy, batch).tolist()
        for i, pair in enumerate(chunk):
            pair.ref_logps = (logps[i], logps[len(chunk) + i])


def dpo_loss(model, batch: dict, cfg: DPOConfig, reference: Reference | None) -> tuple[torch.Tensor, dict]:
    """Σ over the batch's pairs of the cfg.loss_type loss (+ sft_weight · NLL of chosen), and metric sums.

    Implicit rewards (metrics) come from `losses.dpo_losses`: β·(log π − log π_ref) of each response (simpo: β · mean log π per token)."""
    n = batch["lengths"].shape[0] // 2
    beta = cfg.beta
    ref = None
    if cfg.loss_type != "simpo":  # reference first: its activations are gone before the policy's are built
        ref = batch["ref_logps"].float() if "ref_logps" in batch else reference(model, batch)
    logps, lengths = sequence_logps(model, batch)
    if cfg.loss_type == "simpo":
        average = logps / lengths
        losses, chosen, rejected = dpo_losses(average[:n], average[n:], None, None, beta, "simpo", cfg.label_smoothing, cfg.simpo_gamma)
    else:
        losses, chosen, rejected = dpo_losses(logps[:n], logps[n:], ref[:n], ref[n:], beta, cfg.loss_type, cfg.label_smoothing)
    metrics = {}
    if cfg.sft_weight:
        nll = chosen_nll(logps[:n], lengths[:n])
        losses = losses + cfg.sft_weight * nll
        metrics["nll"] = nll.detach().sum()
    metrics.update({
        "rewards/chosen": chosen.sum(), "rewards/rejected": rejected.sum(), "rewards/margins": (chosen - rejected).sum(),
        "rewards/accuracies": (chosen > rejected).float().sum(),
        "logps/chosen": logps[:n].detach().sum(), "logps/rejected": logps[n:].detach().sum(),
    })
    return losses.sum(), metrics


def run_dpo(cfg: DPOConfig) -> dict:
    """Train cfg.model_name_or_path on the preference pairs of cfg.dataset; returns the last logged metrics."""
    validate(cfg)
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    build = lambda source, split, name, report: build_pairs(source, split, tokenizer, cfg, name, report)  # noqa: E731
    train_pairs, eval_pairs, report = load_datasets(cfg, build, "preference pairs")
    write_data_report(cfg, report)

    model = load_causal_lm(cfg.model_name_or_path)
    starting_adapter = hasattr(model, "peft_config")
    if cfg.use_peft and not starting_adapter:
        model = apply_lora(model, LoraSettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules))
    if cfg.loss_type == "simpo" and (cfg.ref_model or cfg.precompute_ref_log_probs):
        logger.warning("simpo is reference-free: --ref_model / --precompute_ref_log_probs are ignored")
    reference = make_reference(cfg, model, starting_adapter)
    use_attention_kernel(model, cfg.attention_kernel)  # here, not only in train(): precompute_reference runs first
    if hasattr(reference, "model"):
        use_attention_kernel(reference.model, cfg.attention_kernel)
    pad_id = tokenizer.pad_token_id
    shared = supports_custom_masks(model) and (not hasattr(reference, "model") or supports_custom_masks(reference.model))
    if reference is not None and cfg.precompute_ref_log_probs:
        precompute_reference(reference, model, train_pairs + (eval_pairs or []), pad_id, cfg.per_device_eval_batch_size, shared,
                             cfg.mixed_precision)
        reference = None  # the last reference to a separate model: it is freed here
        gc.collect()
    stage = Stage(
        model=model,
        train_examples=train_pairs,
        eval_examples=eval_pairs,
        collate=lambda pairs: collate(pairs, pad_id, shared),
        loss=lambda m, batch: dpo_loss(m, batch, cfg, reference),
        weight=lambda pair: 1.0,
        num_tokens=DPOPair.num_tokens,
        save=lambda m, d: save_model(m, tokenizer, d),
    )
    return train(stage, cfg)
