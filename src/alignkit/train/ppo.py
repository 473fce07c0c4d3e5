"""PPO for language models (and the critic-free RLOO/GRPO estimators in the same loop).

One iteration (= one --max_steps step):
  1. rollout: sample k responses to each of --rollout_batch_size prompts (`alignkit.rollout`);
  2. score them (`alignkit.rewards.build_reward`), apply the missing-EOS penalty, normalization, clipping;
  3. recompute log π_old, V_old and log π_ref with teacher forcing; per-token reward
     r_t = −β·KL_t (+ the score at the last token);
  4. advantages: GAE on the value head (gae), or a per-response leave-one-out / group-normalized
     baseline on R = score − β·Σ_t KL_t (rloo / grpo);
  5. --num_ppo_epochs passes of minibatches: clipped policy loss + vf_coef · clipped value loss
     (+ ptx_coef · LM loss on --ptx_dataset), stopping early when the approximate KL to π_old > target_kl;
  6. adaptive β (when --kl_target > 0), one metrics.jsonl row, an optional checkpoint.

Dropout is off throughout (the policy stays in eval mode), so the ratio π/π_old is exactly 1 before
the first update. The sampling seed of iteration i is a function of (--seed, i), so resuming from a
checkpoint replays the same rollouts. Runs on one process (one device).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignkit.config import PPOConfig, save_config
from alignkit.data.formats import DataError, InvalidRows, read_rows, sft_example, validate_messages, _format_of
from alignkit.data.tokenize import Formatting, prompt_text
from alignkit.generation import SamplingParams
from alignkit.losses import (
    KL_ESTIMATORS, gae, grpo_advantages, kl_penalty, masked_mean, ppo_policy_loss_sum, ppo_value_loss_sum,
    rloo_advantages, whiten,
)
from alignkit.models import LoraSettings, apply_lora, load_causal_lm, load_tokenizer, save_model, unwrap_base
from alignkit.rollout import Episodes, TextGenerationEnv, critic_values, policy_forward, rollout
from alignkit.train.loop import (
    MetricsLog, find_checkpoint, load_checkpoint, make_accelerator, make_optimizer, make_scheduler, micro_batches,
    progress_bar, save_checkpoint,
)

ESTIMATORS = ("gae", "rloo", "grpo")


@dataclass
class PromptExample:
    ids: list[int]
    columns: dict = field(default_factory=dict)  # the row's other fields, handed to reward functions


def _prompt_messages(row) -> tuple[list[dict] | None, str | None, str | None]:
    """(messages ending with a user turn, or None for raw text; raw text; reference completion)."""
    data = row.data
    if "messages" in data:
        messages = validate_messages(data["messages"], row.where, need_final_assistant=False)
        if messages[-1]["role"] == "assistant":
            return messages[:-1], None, messages[-1]["content"]
        return messages, None, None
    if "prompt" in data and "completion" not in data:
        if isinstance(data["prompt"], list):
            return validate_messages(data["prompt"], row.where, "prompt", need_final_assistant=False), None, None
        if not isinstance(data["prompt"], str) or not data["prompt"].strip():
            raise DataError(row.where, "must be a non-empty string or a list of messages", field="prompt", reason="bad 'prompt'")
        return [{"role": "user", "content": data["prompt"]}], None, None
    fmt = _format_of(row)
    if fmt is None or fmt == "text":
        if "text" in data and isinstance(data["text"], str):
            return None, data["text"], None
        raise DataError(row.where, f"no prompt in fields {sorted(data)}: expected {{'prompt'}} or {{'messages'}}", reason="no prompt")
    messages = sft_example(row, fmt)["messages"]
    return messages[:-1], None, messages[-1]["content"]


def load_prompts(source: str, split: str, tokenizer, cfg: PPOConfig) -> list[PromptExample]:
    """Prompt-only rows ({"prompt"}, {"messages"} ending with a user turn) or any SFT format (the final
    assistant turn becomes the `completion` column). Prompts over --max_prompt_length are dropped."""
    invalid = InvalidRows(skip=cfg.skip_invalid)
    fmt = Formatting(cfg.use_chat_template, cfg.separator)
    examples, too_long = [], 0
    for row in read_rows(source, split, invalid):
        try:
            messages, raw, completion = _prompt_messages(row)
        except DataError as error:
            invalid.report(error)
            continue
        text = raw if messages is None else prompt_text(tokenizer, messages, fmt)
        ids = tokenizer(text, add_special_tokens=messages is None)["input_ids"]
        if len(ids) > cfg.max_prompt_length or not ids:
            too_long += 1
            continue
        columns = {k: v for k, v in row.data.items() if k not in ("prompt", "messages")}
        if completion is not None:
            columns["completion"] = completion
        examples.append(PromptExample(ids, columns))
    print(f"prompts ({source}): {len(examples)} kept, {too_long} over --max_prompt_length {cfg.max_prompt_length} dropped")
    if invalid.total:
        print(invalid.summary())
    if not examples:
        raise ValueError(f"{source}: no usable prompts")
    return examples


class ActorCritic(torch.nn.Module):
    """The policy LM plus either a scalar value head on its last hidden state or a separate critic
    (`rewards.RewardModel`); neither for rloo/grpo."""

    def __init__(self, lm, value_head: torch.nn.Linear | None, critic=None):
        super().__init__()
        self.lm, self.value_head, self.critic = lm, value_head, critic

    def values(self, episodes: Episodes, from_policy: torch.Tensor | None) -> torch.Tensor | None:
        return critic_values(self.critic, episodes) if self.critic is not None else from_policy


class AdaptiveKLController:
    """Ziegler et al. (2019): e = clip(KL / KL_target − 1, −0.2, 0.2);  β ← β · (1 + e · n / horizon),
    with KL the mean per-response KL of the batch and n its number of responses."""

    @staticmethod
    def update(beta: float, kl: float, target: float, n: int, horizon: float) -> float:
        error = min(max(kl / target - 1.0, -0.2), 0.2)
        return beta * (1.0 + error * n / horizon)


def _check(cfg: PPOConfig) -> None:
    if not cfg.dataset:
        raise ValueError("--dataset is required (prompts: {'prompt'} or {'messages'} rows, or builtin:TASK)")
    if cfg.advantage_estimator not in ESTIMATORS:
        raise ValueError(f"--advantage_estimator must be one of {ESTIMATORS}, got {cfg.advantage_estimator!r}")
    if cfg.kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"--kl_estimator must be one of {KL_ESTIMATORS}, got {cfg.kl_estimator!r}")
    if cfg.advantage_estimator != "gae" and cfg.num_samples_per_prompt < 2:
        raise ValueError(f"--advantage_estimator {cfg.advantage_estimator} needs --num_samples_per_prompt ≥ 2")
    if min(cfg.max_steps, cfg.mini_batch_size, cfg.rollout_batch_size, cfg.num_ppo_epochs) <= 0:
        raise ValueError("--max_steps, --rollout_batch_size, --mini_batch_size and --num_ppo_epochs must be positive")
    if cfg.ptx_coef > 0 and not cfg.ptx_dataset:
        raise ValueError("--ptx_coef needs --ptx_dataset")


def _ptx_examples(cfg: PPOConfig, tokenizer) -> list:
    from alignkit.data.formats import load_sft_examples
    from alignkit.data.tokenize import tokenize_all
    from alignkit.train.sft import SFTExample

    rows, _ = load_sft_examples(cfg.ptx_dataset, cfg.dataset_split, InvalidRows(skip=cfg.skip_invalid))
    tokenized = tokenize_all(rows, tokenizer, Formatting(cfg.use_chat_template, cfg.separator, 1.0), cfg.max_length, cfg.truncation)
    return [SFTExample(i, w) for i, w in zip(tokenized.input_ids, tokenized.weights)]


@torch.no_grad()
def _score(reward, episodes: Episodes, batch: list[PromptExample], cfg: PPOConfig, device) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(raw scores, shaped scores, per-source means)."""
    keys = sorted({k for p in batch for k in p.columns})
    columns = {k: [p.columns.get(k) for p in batch] for k in keys}
    columns["finished"] = episodes.finished.tolist()
    columns["response_ids"] = [r[m.bool()].tolist() for r, m in zip(episodes.response_ids, episodes.response_mask)]
    raw = torch.tensor(reward(episodes.prompts, episodes.responses, **columns), dtype=torch.float32, device=device)
    scores = raw - cfg.missing_eos_penalty * (~episodes.finished.to(device)).float()
    if cfg.normalize_scores and len(scores) > 1:
        scores = (scores - scores.mean()) / (scores.std() + 1e-8)
    if cfg.score_clip > 0:
        scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
    parts = {f"score/{name}": sum(v) / len(v) for name, v in getattr(reward, "last_components", {}).items()} if len(getattr(reward, "sources", [])) > 1 else {}
    return raw, scores, parts


@torch.no_grad()
def _forward_all(lm, episodes: Episodes, cfg: PPOConfig, value_head=None, entropy=False):
    """policy_forward in chunks of --mini_batch_size, concatenated."""
    outs = [policy_forward(lm, episodes.select(list(range(s, min(s + cfg.mini_batch_size, len(episodes.prompts))))), cfg.temperature, value_head, entropy)
            for s in range(0, len(episodes.prompts), cfg.mini_batch_size)]
    cat = lambda name: None if getattr(outs[0], name) is None else torch.cat([getattr(o, name) for o in outs])
    return cat("logprobs"), cat("entropy"), cat("values")


def _explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    var = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    residual = returns - values
    return float(1 - masked_mean((residual - masked_mean(residual, mask)) ** 2, mask) / var) if var > 0 else float("nan")


def run_ppo(cfg: PPOConfig) -> dict:
    """Train cfg.model_name_or_path with PPO/RLOO/GRPO on the prompts of cfg.dataset; returns the last metrics row."""
    from accelerate.utils import set_seed

    from alignkit.rewards import build_reward
    from alignkit.train.sft import collate as sft_collate, sft_loss

    _check(cfg)
    accelerator = make_accelerator(cfg)
    if accelerator.num_processes > 1:
        raise RuntimeError("alignkit ppo runs on one process for now: launch it without torchrun/accelerate")
    set_seed(cfg.seed)
    device = accelerator.device
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, output_dir / "config.yaml")

    tokenizer = load_tokenizer(cfg.model_name_or_path)
    prompts = load_prompts(cfg.dataset, cfg.dataset_split, tokenizer, cfg)
    reward = build_reward(cfg.reward_model, cfg.reward_fn, cfg.reward_weights, device=device)
    ptx = _ptx_examples(cfg, tokenizer) if cfg.ptx_coef > 0 else []

    lm = load_causal_lm(cfg.model_name_or_path)
    fresh_lora = cfg.use_peft and not hasattr(lm, "peft_config")
    if fresh_lora:
        lm = apply_lora(lm, LoraSettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules))
    if cfg.ref_model:
        ref = load_causal_lm(cfg.ref_model).requires_grad_(False).eval()
    elif fresh_lora:
        ref = None  # the starting policy = the policy with its new adapter disabled
    else:  # (a LoRA SFT output is its own adapter: the reference is a frozen copy of it)
        ref = copy.deepcopy(lm).requires_grad_(False).eval()
    value_head, critic = None, None
    if cfg.advantage_estimator == "gae" and cfg.critic_model:
        from alignkit.rewards import load_reward_model, reward_head

        critic, head_is_new = load_reward_model(cfg.critic_model)
        if not critic.decoder:
            raise ValueError(f"--critic_model {cfg.critic_model}: needs a decoder (causal LM or decoder reward model), not an encoder")
        if head_is_new:
            torch.nn.init.zeros_(reward_head(critic.model).weight)
    elif cfg.advantage_estimator == "gae":
        value_head = torch.nn.Linear(unwrap_base(lm).config.hidden_size, 1)
        torch.nn.init.zeros_(value_head.weight), torch.nn.init.zeros_(value_head.bias)
    policy = ActorCritic(lm, value_head, critic)
    k = cfg.num_samples_per_prompt
    updates_per_iteration = cfg.num_ppo_epochs * math.ceil(cfg.rollout_batch_size * k / cfg.mini_batch_size)
    optimizer = make_optimizer(policy, cfg)
    scheduler = make_scheduler(optimizer, cfg, cfg.max_steps * updates_per_iteration)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    if ref is not None:
        ref.to(device)
    policy.eval()  # no dropout: rollout and training log-probs must agree

    state = {"step": 0, "kl_coef": cfg.kl_coef, "updates": 0}
    checkpoint = find_checkpoint(cfg.resume_from_checkpoint, cfg.output_dir)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, accelerator, policy, optimizer, scheduler)
        print(f"resumed from {checkpoint} at iteration {state['step']}")
    log = MetricsLog(output_dir / "metrics.jsonl", True, state["step"])
    stream = micro_batches(len(prompts), cfg.rollout_batch_size, cfg.seed, state["step"])
    ptx_stream = micro_batches(len(ptx), cfg.mini_batch_size, cfg.seed + 1, state["updates"]) if ptx else None
    last_row: dict = {}

    with progress_bar(cfg.progress) as progress:
        bar = progress.add_task("ppo", total=cfg.max_steps, completed=state["step"], status="")
        while state["step"] < cfg.max_steps:
            step, beta = state["step"] + 1, state["kl_coef"]
            batch = [prompts[i] for i in next(stream) for _ in range(k)]
            params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p, seed=cfg.seed * 1_000_003 + step)
            start = time.perf_counter()
            episodes = rollout(lm, tokenizer, [p.ids for p in batch], params)
            generation_time = time.perf_counter() - start
            mask = episodes.response_mask.to(device).float()
            raw_scores, scores, parts = _score(reward, episodes, batch, cfg, device)

            # π_old, V_old, π_ref on the sampled sequences
            old_logp, entropy, old_values = _forward_all(lm, episodes, cfg, value_head=policy.value_head, entropy=True)
            if policy.critic is not None:
                with torch.no_grad():
                    old_values = torch.cat([policy.values(episodes.select(list(range(s, min(s + cfg.mini_batch_size, len(batch))))), None)
                                            for s in range(0, len(batch), cfg.mini_batch_size)])
            if ref is not None:
                ref_logp, _, _ = _forward_all(ref, episodes, cfg)
            else:
                with lm.disable_adapter():
                    ref_logp, _, _ = _forward_all(lm, episodes, cfg)
            kl = kl_penalty(old_logp, ref_logp, cfg.kl_estimator) * mask
            sequence_kl = kl.sum(1)
            if cfg.advantage_estimator == "gae":
                rewards = -beta * kl + TextGenerationEnv.terminal_rewards(scores, mask)
                advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
            else:
                sequence_reward = scores - beta * sequence_kl
                estimate = rloo_advantages if cfg.advantage_estimator == "rloo" else grpo_advantages
                advantages, returns = estimate(sequence_reward, k)[:, None] * mask, None
            if cfg.whiten_advantages and cfg.advantage_estimator != "grpo":
                advantages = whiten(advantages, mask)

            # epochs × minibatches
            start, totals, updates, trained_tokens, stopped = time.perf_counter(), {}, 0, 0, False
            first_ratio_error = float("nan")
            seq_tokens = (episodes.prompt_mask.sum(1) + episodes.response_mask.sum(1)).tolist()
            for epoch in range(cfg.num_ppo_epochs):
                order = torch.randperm(len(batch), generator=torch.Generator().manual_seed(cfg.seed * 7919 + step * 31 + epoch)).tolist()
                for first in range(0, len(batch), cfg.mini_batch_size):
                    rows = order[first : first + cfg.mini_batch_size]
                    index = torch.tensor(rows, device=device)
                    m = mask[index]
                    tokens = m.sum().clamp(min=1)
                    minibatch = episodes.select(rows)
                    out = policy_forward(lm, minibatch, cfg.temperature, policy.value_head)
                    values = policy.values(minibatch, out.values)
                    if epoch == 0 and first == 0:  # no update yet this iteration: π/π_old must be 1
                        first_ratio_error = float(((out.logprobs.detach() - old_logp[index]).exp() - 1).abs().mul(m).max())
                    approx_kl = masked_mean(kl_penalty(out.logprobs.detach(), old_logp[index], "k3"), m)
                    if cfg.target_kl > 0 and float(approx_kl) > cfg.target_kl:
                        stopped = True  # the updates so far moved π too far from π_old: skip the rest
                        break
                    policy_sum, clipped = ppo_policy_loss_sum(out.logprobs, old_logp[index], advantages[index], m, cfg.cliprange)
                    loss = policy_sum / tokens
                    metrics = {"policy_loss": policy_sum / tokens, "clipfrac": clipped / tokens}
                    if returns is not None:
                        value_sum, value_clipped = ppo_value_loss_sum(values, old_values[index], returns[index], m, cfg.cliprange_value)
                        loss = loss + cfg.vf_coef * value_sum / tokens
                        metrics.update(value_loss=value_sum / tokens, value_clipfrac=value_clipped / tokens)
                    if ptx_stream is not None:
                        ptx_batch = {key: v.to(device) for key, v in sft_collate([ptx[i] for i in next(ptx_stream)], tokenizer.pad_token_id).items()}
                        ptx_sum, _ = sft_loss(lm, ptx_batch)
                        ptx_loss = ptx_sum / ptx_batch["weights"][:, 1:].sum().clamp(min=1)
                        loss = loss + cfg.ptx_coef * ptx_loss
                        metrics["ptx_loss"] = ptx_loss
                    accelerator.backward(loss)
                    if cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    metrics["approx_kl"] = approx_kl
                    for key, value in metrics.items():
                        totals[key] = totals.get(key, 0.0) + float(value.detach() if torch.is_tensor(value) else value)
                    updates += 1
                    trained_tokens += sum(seq_tokens[r] for r in rows)
                if stopped:
                    break
            training_time = time.perf_counter() - start
            state["updates"] += updates

            mean_kl = float(sequence_kl.mean())
            if cfg.kl_target > 0:
                state["kl_coef"] = AdaptiveKLController.update(beta, mean_kl, cfg.kl_target, len(batch), cfg.kl_horizon)
            state["step"] = step
            if step % cfg.logging_steps == 0 or step == cfg.max_steps:
                last_row = {
                    "step": step,
                    "score": float(raw_scores.mean()),
                    **parts,
                    "score_shaped": float(scores.mean()),
                    "reward": float((scores - beta * sequence_kl).mean()),
                    "kl": mean_kl,
                    "kl_coef": beta,
                    "entropy": float(masked_mean(entropy, mask)),
                    "response_length": float(mask.sum(1).mean()),
                    "eos_fraction": float(episodes.finished.float().mean()),
                    **{key: value / max(updates, 1) for key, value in totals.items()},
                    "ppo_updates": updates,
                    "ratio_error_before_update": first_ratio_error,
                    "early_stopped": stopped,
                    "learning_rate": scheduler.get_last_lr()[0],
                    "generation_tokens_per_second": float(mask.sum()) / max(generation_time, 1e-9),
                    "training_tokens_per_second": trained_tokens / max(training_time, 1e-9),
                }
                if returns is not None:
                    last_row.update(returns=float(masked_mean(returns, mask)), values=float(masked_mean(old_values, mask)),
                                    explained_variance=_explained_variance(old_values, returns, mask))
                log.write(last_row)
                progress.update(bar, status=f"score {last_row['score']:.3f}  kl {mean_kl:.3f}")
            if cfg.save_steps and step % cfg.save_steps == 0:
                save_checkpoint(output_dir / "checkpoints" / f"step-{step}", accelerator, policy, optimizer, scheduler, dict(state), cfg.save_total_limit)
            progress.update(bar, completed=step)

    final = accelerator.unwrap_model(policy)
    save_model(final.lm, tokenizer, output_dir)
    if final.value_head is not None:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous().cpu() for k, v in final.value_head.state_dict().items()}, str(output_dir / "value_head.safetensors"))
    if final.critic is not None:
        final.critic.model.save_pretrained(output_dir / "critic", safe_serialization=True)
    return last_row
