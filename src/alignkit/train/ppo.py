"""PPO for language models (and the critic-free RLOO/GRPO estimators in the same loop).

One iteration (= one --max_steps step):
  1. rollout: sample k responses to each of --rollout_batch_size prompts (`alignkit.rollout`). The sampler
     keeps log π_old of each action and, from a hook on the LM head, the entropy and V_old (value head) of
     each state: no second pass of the policy (--recompute_old_logprobs asks for one);
  2. score them (`alignkit.rl.rewards.build_reward`), apply the missing-EOS penalty, normalization, clipping;
  3. log π_ref with teacher forcing (and V_old from a separate critic, if any: with one minibatch per
     iteration that pass keeps its graph and serves as the first update's critic forward); per-token
     reward r_t = −β·KL_t (+ the score at the last token);
  4. advantages: GAE on the value head (gae), or a per-response leave-one-out / group-normalized
     baseline on R = score − β·Σ_t KL_t (rloo / grpo);
  5. --num_ppo_epochs passes of minibatches: clipped policy loss + vf_coef · clipped value loss
     (+ ptx_coef · LM loss on --ptx_dataset), stopping early when the approximate KL to π_old > kl_early_stop;
  6. adaptive β (when --kl_target > 0), one metrics.jsonl row, an optional checkpoint.

Dropout is off throughout (the policy stays in eval mode), so the ratio π/π_old is 1 before the first
update (up to float rounding between the sampler's KV-cache decode and the training forward). The sampling
seed of iteration i is a function of (--seed, i, process), so resuming from a checkpoint replays the same
rollouts. Under torchrun, each process samples, scores and trains on its share of the prompts; batch
statistics, loss normalizers and gradients span all processes (`Processes`).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from alignkit.config import PPOConfig
from alignkit.data.formats import InvalidRows
from alignkit.data.prompts import PromptExample, load_prompts
from alignkit.data.tokenize import Formatting
from alignkit.generation import SamplingParams
from alignkit.losses import (
    KL_ESTIMATORS, gae, grpo_advantages, kl_controller, kl_penalty, kl_shaped_rewards, masked_mean_var, ppo_policy_loss_sum,
    ppo_value_loss_sum, rloo_advantages, whiten,
)
from alignkit.models import LoraSettings, apply_lora, load_causal_lm, load_tokenizer, save_model, unwrap_base
from alignkit.rollout import Episodes, critic_values, policy_forward, rollout
from alignkit.train.checkpoint import advance_schedule, drop_later_checkpoints, kill_point, nonfinite_step, prepare_output_dir
from alignkit.train.loop import (
    MetricsLog, check_engine_flags, enable_gradient_checkpointing, find_checkpoint, forward_context, load_checkpoint,
    make_accelerator, make_optimizer, make_scheduler, micro_batches, progress_bar, save_checkpoint, save_final_model, write_config,
)

ESTIMATORS = ("gae", "rloo", "grpo")
logger = logging.getLogger(__name__)


class ActorCritic(torch.nn.Module):
    """The policy LM plus either a scalar value head on its last hidden state or a separate critic
    (`rewards.RewardModel`); neither for rloo/grpo."""

    def __init__(self, lm, value_head: torch.nn.Linear | None, critic=None):
        super().__init__()
        self.lm, self.value_head, self.critic = lm, value_head, critic

    def values(self, episodes: Episodes, from_policy: torch.Tensor | None, row_tokens: int) -> torch.Tensor | None:
        return critic_values(self.critic, episodes, row_tokens) if self.critic is not None else from_policy


def _one_minibatch(cfg: PPOConfig) -> bool:
    """Each iteration's responses form a single minibatch (the whole batch per optimizer step)."""
    return cfg.rollout_batch_size * cfg.num_samples_per_prompt <= cfg.mini_batch_size


def _check(cfg: PPOConfig) -> None:
    check_engine_flags(cfg)  # --mixed_precision (fp16 off CUDA is refused) and --report_to, before any model loads
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


class Processes:
    """This process's share of a PPO iteration under torchrun, and the collectives PPO needs (no-ops alone).

    The global batch of an iteration is its N = rollout_batch_size · k responses in prompt order: rows
    g·k … g·k + k − 1 answer prompt g. Process r of W owns the prompts g ≡ r (mod W), samples, scores and
    trains on their rows (k-sample groups never straddle processes). Every batch statistic (whitening,
    score normalization, metrics) and every loss normalizer is taken over the global batch, and gradients
    are summed over processes, so W processes make the update that one process holding the whole batch
    would make (up to float rounding; the samples differ, each process drawing its own).
    """

    def __init__(self, world: int, rank: int, k: int):
        self.world, self.rank, self.k = world, rank, k

    def owns(self, row: int) -> bool:
        return (row // self.k) % self.world == self.rank

    def local(self, row: int) -> int:
        """Index among this process's rows of the global row `row` (which it owns)."""
        return (row // self.k) // self.world * self.k + row % self.k

    def sum(self, x: torch.Tensor, op: str = "SUM") -> torch.Tensor:
        if self.world == 1:
            return x
        x = x.detach().clone()
        torch.distributed.all_reduce(x, op=getattr(torch.distributed.ReduceOp, op))
        return x

    def max(self, x: torch.Tensor) -> torch.Tensor:
        return self.sum(x, "MAX")

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[n, ...] rows of this process -> [N, ...] rows of the global batch, in global order."""
        if self.world == 1:
            return x
        x = x.detach().float().contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world)]
        torch.distributed.all_gather(parts, x)
        # part r holds, per local prompt j, the k rows of global prompt j·W + r
        grouped = torch.stack(parts).view(self.world, -1, self.k, *x.shape[1:]).transpose(0, 1)
        return grouped.reshape(-1, *x.shape[1:])

    def broadcast(self, params: list[torch.Tensor]) -> None:
        """Start every process from rank 0's weights (fresh LoRA adapters and heads are random)."""
        for p in params if self.world > 1 else []:
            torch.distributed.broadcast(p.data, 0)

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """grad ← Σ_processes grad (a process without rows in the minibatch adds zeros)."""
        for p in params if self.world > 1 else []:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)


def _explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, procs: Processes) -> float:
    """1 − Var(R − V) / Var(R) over the response tokens of the batch."""
    _, var = masked_mean_var(returns, mask, procs.sum)
    _, residual = masked_mean_var(returns - values, mask, procs.sum)
    return float(1 - residual / var) if var > 0 else float("nan")


@torch.no_grad()
def _score(reward, episodes: Episodes, batch: list[PromptExample], device) -> tuple[torch.Tensor, dict[str, float]]:
    """(raw scores of this process's responses, per-source score sums)."""
    keys = sorted({k for p in batch for k in p.columns})
    columns = {k: [p.columns.get(k) for p in batch] for k in keys}
    columns["finished"] = episodes.finished.tolist()
    columns["response_ids"] = [r[m.bool()].tolist() for r, m in zip(episodes.response_ids, episodes.response_mask)]
    raw = torch.tensor(reward(episodes.prompts, episodes.responses, **columns), dtype=torch.float32, device=device)
    several = len(getattr(reward, "sources", [])) > 1
    return raw, {f"score/{name}": sum(v) for name, v in getattr(reward, "last_components", {}).items()} if several else {}


def _shape_scores(raw: torch.Tensor, finished: torch.Tensor, cfg: PPOConfig, procs: Processes) -> torch.Tensor:
    """Missing-EOS penalty, then standardization over the global batch (unbiased std), then clipping."""
    scores = raw - cfg.missing_eos_penalty * (~finished.to(raw.device)).float()
    if cfg.normalize_scores:
        everyone = procs.gather(scores)
        if len(everyone) > 1:
            scores = (scores - everyone.mean()) / (everyone.std() + 1e-8)
    if cfg.score_clip > 0:
        scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
    return scores


@torch.no_grad()
def _forward_all(lm, episodes: Episodes, cfg: PPOConfig, value_head=None, entropy=False):
    """policy_forward in chunks of --mini_batch_size, concatenated."""
    outs = [policy_forward(lm, episodes.select(list(range(s, min(s + cfg.mini_batch_size, len(episodes.prompts))))), cfg.temperature, value_head, entropy,
                           cfg.shared_prefix_tokens)
            for s in range(0, len(episodes.prompts), cfg.mini_batch_size)]
    cat = lambda name: None if getattr(outs[0], name) is None else torch.cat([getattr(o, name) for o in outs])
    return cat("logprobs"), cat("entropy"), cat("values")


@torch.no_grad()
def _critic_all(critic, episodes: Episodes, cfg: PPOConfig) -> torch.Tensor:
    n, size = len(episodes.prompts), cfg.mini_batch_size
    return torch.cat([critic_values(critic, episodes.select(list(range(s, min(s + size, n)))), cfg.shared_prefix_tokens) for s in range(0, n, size)])


def _critic_first_pass(critic, episodes: Episodes, cfg: PPOConfig) -> torch.Tensor:
    """V_old with the graph kept: the forward of the first (only) minibatch's value loss."""
    return critic_values(critic, episodes, cfg.shared_prefix_tokens)


@dataclass
class Experience:
    """One iteration's rollouts on this process, with what the update needs. Per-row tensors are this
    process's rows; `lengths` and `tokens` are per global row (every process knows the whole batch's sizes)."""

    episodes: Episodes
    mask: torch.Tensor  # [n, T] response tokens
    old_logp: torch.Tensor  # [n, T] log π_old(a_t | s_t)
    old_values: torch.Tensor | None  # [n, T] V_old(s_t) (gae)
    advantages: torch.Tensor  # [n, T]
    returns: torch.Tensor | None  # [n, T] (gae)
    lengths: torch.Tensor  # [N] response tokens per global row
    tokens: torch.Tensor  # [N] prompt + response tokens per global row
    stats: dict  # batch statistics for the metrics row
    seconds: dict  # time per phase
    first_values: torch.Tensor | None = None  # [n, T] the critic's V_old with its graph, for the first update (see _experience)


def _experience(cfg: PPOConfig, procs: Processes, policy: "ActorCritic", ref, reward, tokenizer, batch: list[PromptExample],
                step: int, beta: float, device) -> Experience:
    """Steps 1–4 of the iteration on this process's prompts."""
    seconds, clock = {}, [time.perf_counter()]

    def lap(name: str) -> None:
        clock.append(time.perf_counter())
        seconds[name] = clock[-1] - clock[-2]

    k, lm = cfg.num_samples_per_prompt, policy.lm
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p, seed=(cfg.seed * 1_000_003 + step) * procs.world + procs.rank)
    from_sampler = not cfg.recompute_old_logprobs
    episodes = rollout(lm, tokenizer, [p.ids for p in batch], params, policy.value_head if from_sampler else None, entropy=from_sampler)
    lap("generation")
    mask = episodes.response_mask.to(device).float()
    raw, parts = _score(reward, episodes, batch, device)
    scores = _shape_scores(raw, episodes.finished, cfg, procs)
    lap("reward")

    # π_old, its entropy and V_old: kept by the sampler, else one teacher-forced pass
    recorded = episodes.entropy is not None and (policy.value_head is None or episodes.values is not None)
    if from_sampler and recorded:
        old_logp, entropy, old_values = episodes.logprobs.to(device) * mask, episodes.entropy.to(device), episodes.values
    else:
        old_logp, entropy, old_values = _forward_all(lm, episodes, cfg, value_head=policy.value_head, entropy=True)
    first_values = None
    if policy.critic is not None and _one_minibatch(cfg):
        # the critic has not moved when the only minibatch's first update runs: this pass, graph kept, is its forward
        first_values = _critic_first_pass(policy.critic, episodes, cfg)
        old_values = first_values.detach()
    elif policy.critic is not None:
        old_values = _critic_all(policy.critic, episodes, cfg)
    lap("old_policy_and_values")
    if ref is not None:
        ref_logp, _, _ = _forward_all(ref, episodes, cfg)
    else:
        with lm.disable_adapter():
            ref_logp, _, _ = _forward_all(lm, episodes, cfg)
    lap("reference")

    kl = kl_penalty(old_logp, ref_logp, cfg.kl_estimator) * mask
    rewards = kl_shaped_rewards(scores, kl, mask, beta)
    if cfg.advantage_estimator == "gae":
        advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
    else:  # a per-response baseline on R = score − β·Σ_t KL_t
        estimate = rloo_advantages if cfg.advantage_estimator == "rloo" else grpo_advantages
        advantages, returns = estimate(rewards.sum(1), k)[:, None] * mask, None
    if cfg.whiten_advantages and cfg.advantage_estimator != "grpo":
        advantages = whiten(advantages, mask, total=procs.sum)

    lengths = procs.gather(mask.sum(1))
    n_all = len(lengths)
    stats = {
        "score": float(procs.gather(raw).mean()),
        **{name: float(procs.sum(torch.tensor(total))) / n_all for name, total in parts.items()},
        "score_shaped": float(procs.gather(scores).mean()),
        "reward": float(procs.gather(rewards.sum(1)).mean()),
        "kl": float(procs.gather(kl.sum(1)).mean()),
        "kl_coef": beta,
        "entropy": float(masked_mean_var(entropy, mask, procs.sum)[0]),
        "response_length": float(lengths.mean()),
        "eos_fraction": float(procs.gather(episodes.finished.float()).mean()),
    }
    if returns is not None:
        stats.update(returns=float(masked_mean_var(returns, mask, procs.sum)[0]), values=float(masked_mean_var(old_values, mask, procs.sum)[0]),
                     explained_variance=_explained_variance(old_values, returns, mask, procs))
    tokens = procs.gather(episodes.prompt_mask.sum(1).to(device).float()) + lengths
    return Experience(episodes, mask, old_logp, old_values, advantages, returns, lengths, tokens, stats, seconds, first_values)


def _optimize(cfg: PPOConfig, procs: Processes, policy: "ActorCritic", optimizer, scheduler, exp: Experience, step: int,
              ptx: list, ptx_stream, pad_id: int, device, scaler: torch.amp.GradScaler | None = None) -> dict:
    """Step 5: epochs × minibatches of the global batch; each process computes its rows' share of the loss.
    `scaler`: fp16's loss scaler (a disabled one, i.e. plain backward and step, when None)."""
    from alignkit.train.sft import collate as sft_collate, sft_loss

    params = [p for p in policy.parameters() if p.requires_grad]
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    n_all, start = len(exp.lengths), time.perf_counter()
    totals, updates, trained_tokens, stopped, first_ratio_error = {}, 0, 0.0, False, float("nan")
    skipped = 0  # updates whose loss or gradient was not finite (--skip_nonfinite)
    for epoch in range(cfg.num_ppo_epochs):
        order = torch.randperm(n_all, generator=torch.Generator().manual_seed(cfg.seed * 7919 + step * 31 + epoch)).tolist()
        for first in range(0, n_all, cfg.mini_batch_size):
            rows = order[first : first + cfg.mini_batch_size]
            tokens = exp.lengths[rows].sum().clamp(min=1)  # the minibatch's response tokens, on all processes
            mine = [procs.local(r) for r in rows if procs.owns(r)]
            # sums over this process's rows: policy loss, clipped, value loss, value clipped, k3 KL to π_old
            sums, loss, ratio_error = torch.zeros(5, device=device), None, torch.zeros((), device=device)
            if mine:
                index = torch.tensor(mine, device=device)
                m = exp.mask[index]
                minibatch = exp.episodes.select(mine)
                with forward_context(cfg, device):
                    out = policy_forward(policy.lm, minibatch, cfg.temperature, policy.value_head, row_tokens=cfg.shared_prefix_tokens)
                old = exp.old_logp[index]
                ratio_error = ((out.logprobs.detach() - old).exp() - 1).abs().mul(m).max()
                sums[4] = (kl_penalty(out.logprobs.detach(), old, "k3") * m).sum()
                policy_sum, clipped = ppo_policy_loss_sum(out.logprobs, old, exp.advantages[index], m, cfg.cliprange)
                loss = policy_sum / tokens
                sums[0], sums[1] = policy_sum.detach(), clipped
                if exp.returns is not None:
                    with forward_context(cfg, device):
                        if exp.first_values is not None:  # epoch 0's only minibatch: V at θ_old is V_old, graph and all
                            values, exp.first_values = exp.first_values[index], None
                        else:
                            values = policy.values(minibatch, out.values, cfg.shared_prefix_tokens)
                    value_sum, value_clipped = ppo_value_loss_sum(values, exp.old_values[index], exp.returns[index], m, cfg.cliprange_value)
                    loss = loss + cfg.vf_coef * value_sum / tokens
                    sums[2], sums[3] = value_sum.detach(), value_clipped
            sums = procs.sum(sums) / tokens
            if epoch == 0 and first == 0:  # no update yet this iteration: π/π_old must be 1
                first_ratio_error = float(procs.max(ratio_error))
            if cfg.kl_early_stop > 0 and float(sums[4]) > cfg.kl_early_stop:
                stopped = True  # the updates so far moved π too far from π_old: skip the rest
                break
            metrics = {"policy_loss": sums[0], "clipfrac": sums[1], "approx_kl": sums[4]}
            if exp.returns is not None:
                metrics.update(value_loss=sums[2], value_clipfrac=sums[3])
            if ptx_stream is not None:  # every process draws the same rows and trains on its share of them
                ptx_rows = next(ptx_stream)
                normalizer = max(sum(sum(ptx[i].weights[1:]) for i in ptx_rows), 1e-12)
                ptx_sum = torch.zeros((), device=device)
                if ptx_rows[procs.rank :: procs.world]:
                    ptx_batch = {key: v.to(device) for key, v in sft_collate([ptx[i] for i in ptx_rows[procs.rank :: procs.world]], pad_id).items()}
                    with forward_context(cfg, device):
                        ptx_sum, _ = sft_loss(policy.lm, ptx_batch)
                    loss = cfg.ptx_coef * ptx_sum / normalizer + (loss if loss is not None else 0)
                metrics["ptx_loss"] = procs.sum(ptx_sum.detach()) / normalizer
            if loss is not None:
                scaler.scale(loss).backward()
            procs.sum_gradients(params)
            scaler.unscale_(optimizer)  # every process holds the same summed gradients: they agree on skipping a step
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
            if not scaler.is_enabled():  # fp16's scaler skips non-finite steps itself (and lowers its scale)
                step_loss = float(sums[0] + cfg.vf_coef * sums[2] + cfg.ptx_coef * metrics.get("ptx_loss", 0.0))
                if nonfinite_step(step_loss, float(grad_norm), step, cfg):
                    # weights and moments stay; the schedule advances so the LR stays a function of the update count
                    optimizer.zero_grad(set_to_none=True)
                    advance_schedule(scheduler)
                    skipped += 1
                    continue
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + float(value)
            updates += 1
            trained_tokens += float(exp.tokens[rows].sum())
        if stopped:
            break
    seconds = time.perf_counter() - start
    return {**{key: value / max(updates, 1) for key, value in totals.items()}, "ppo_updates": updates,
            "ratio_error_before_update": first_ratio_error, "early_stopped": stopped,
            **({"nonfinite_skipped": skipped} if cfg.skip_nonfinite else {}),
            "training_tokens_per_second": trained_tokens / max(seconds, 1e-9), "seconds": seconds}


OVEROPTIMIZATION_WINDOW = 4  # iterations


def _slope(values: list[float]) -> float:
    """Least-squares slope of values against 0, 1, 2, ..."""
    n = len(values)
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    return sum((x - mean_x) * (y - mean_y) for x, y in enumerate(values)) / sum((x - mean_x) ** 2 for x in range(n))


def overoptimized(proxy: list[float], gold: list[float], window: int = OVEROPTIMIZATION_WINDOW) -> bool:
    """Reward over-optimization (Gao et al. 2022): over the last `window` iterations the trained-on score rose
    (positive least-squares slope) while the gold score of the same samples fell (negative slope)."""
    if len(proxy) < window or len(gold) < window:
        return False
    return _slope(proxy[-window:]) > 0 and _slope(gold[-window:]) < 0


def _build_models(cfg: PPOConfig, device) -> tuple[ActorCritic, torch.nn.Module | None]:
    """(policy with its value head or critic, frozen reference or None = the policy with its adapters disabled)."""
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
        from alignkit.reward_model import load_reward_model, reward_head

        critic, head_is_new = load_reward_model(cfg.critic_model)
        if not critic.decoder:
            raise ValueError(f"--critic_model {cfg.critic_model}: needs a decoder (causal LM or decoder reward model), not an encoder")
        if head_is_new:
            torch.nn.init.zeros_(reward_head(critic.model).weight)
    elif cfg.advantage_estimator == "gae":
        value_head = torch.nn.Linear(unwrap_base(lm).config.hidden_size, 1)
        torch.nn.init.zeros_(value_head.weight), torch.nn.init.zeros_(value_head.bias)
    policy = ActorCritic(lm, value_head, critic).to(device)
    return policy, ref.to(device) if ref is not None else None


def _save_policy(policy: ActorCritic, tokenizer, folder: Path) -> None:
    """The policy in HF format, plus value_head.safetensors or critic/."""
    save_model(policy.lm, tokenizer, folder)
    if policy.value_head is not None:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous().cpu() for k, v in policy.value_head.state_dict().items()}, str(folder / "value_head.safetensors"))
    if policy.critic is not None:
        policy.critic.model.save_pretrained(folder / "critic", safe_serialization=True)


def run_ppo(cfg: PPOConfig) -> dict:
    """Train cfg.model_name_or_path with PPO/RLOO/GRPO on the prompts of cfg.dataset; returns the last metrics row."""
    from accelerate.utils import set_seed

    from alignkit.rl.rewards import build_reward

    _check(cfg)
    prepare_output_dir(cfg)  # before anything loads: refuse to mix runs
    accelerator = make_accelerator(cfg)
    k = cfg.num_samples_per_prompt
    procs = Processes(accelerator.num_processes, accelerator.process_index, k)
    if cfg.rollout_batch_size % procs.world:
        raise ValueError(f"--rollout_batch_size {cfg.rollout_batch_size} must be a multiple of the number of processes ({procs.world})")
    set_seed(cfg.seed)
    device, main = accelerator.device, accelerator.is_main_process
    output_dir = Path(cfg.output_dir)
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_config(cfg, output_dir)

    tokenizer = load_tokenizer(cfg.model_name_or_path)
    prompts = load_prompts(cfg.dataset, cfg.dataset_split, tokenizer, Formatting(cfg.use_chat_template, cfg.separator),
                           cfg.max_prompt_length, cfg.skip_invalid, verbose=main)
    reward = build_reward(cfg.reward_model, cfg.reward_fn, cfg.reward_weights, device=device)
    gold = build_reward("", cfg.gold_reward_fn) if cfg.gold_reward_fn else None  # log only, never trained on
    history: dict[str, list[float]] = {"score": [], "gold_score": []}
    ptx = _ptx_examples(cfg, tokenizer) if cfg.ptx_coef > 0 else []
    policy, ref = _build_models(cfg, device)
    procs.broadcast([p for p in policy.parameters() if p.requires_grad])
    updates_per_iteration = cfg.num_ppo_epochs * math.ceil(cfg.rollout_batch_size * k / cfg.mini_batch_size)
    optimizer = make_optimizer(policy, cfg)
    scheduler = make_scheduler(optimizer, cfg, cfg.max_steps * updates_per_iteration)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16")  # fp16 (CUDA only): loss scaling
    policy.eval()  # no dropout: rollout and training log-probs must agree
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(policy, in_eval_mode=True)

    state = {"step": 0, "kl_coef": cfg.kl_coef, "updates": 0}
    checkpoint = find_checkpoint(cfg.resume_from_checkpoint, cfg.output_dir)
    if checkpoint is not None:
        state, _ = load_checkpoint(checkpoint, accelerator, policy, optimizer, scheduler)
        if main:
            drop_later_checkpoints(output_dir, state["step"])
        accelerator.print(f"resumed from {checkpoint} at iteration {state['step']}")
    # β: fixed, or adapted towards --kl_target; its value lives in the checkpoint state as "kl_coef"
    kl_control = kl_controller(state["kl_coef"], cfg.kl_target, cfg.kl_horizon)
    log = MetricsLog(output_dir / "metrics.jsonl", main, state["step"], cfg.report_to, config=cfg)
    stream = micro_batches(len(prompts), cfg.rollout_batch_size, cfg.seed, state["step"])
    ptx_stream = micro_batches(len(ptx), cfg.mini_batch_size, cfg.seed + 1, state["updates"]) if ptx else None
    last_row: dict = {}

    with progress_bar(cfg.progress and main) as progress:
        bar = progress.add_task("ppo", total=cfg.max_steps, completed=state["step"], status="")
        while state["step"] < cfg.max_steps:
            step, beta = state["step"] + 1, kl_control.value
            mine = [prompts[i] for i in next(stream)][procs.rank :: procs.world]
            with forward_context(cfg, device):  # sampling, scoring, reference and critic passes
                exp = _experience(cfg, procs, policy, ref, reward, tokenizer, [p for p in mine for _ in range(k)], step, beta, device)
            if gold is not None:  # the same samples, scored by the gold function
                gold_raw, _ = _score(gold, exp.episodes, [p for p in mine for _ in range(k)], device)
                exp.stats["gold_score"] = float(procs.gather(gold_raw).mean())
                for key in history:
                    history[key].append(exp.stats[key])
                if overoptimized(history["score"], history["gold_score"]) and main:
                    logger.warning("iteration %d: over-optimization? over the last %d iterations the score rose (%.3f -> %.3f) while the "
                                   "gold score fell (%.3f -> %.3f)", step, OVEROPTIMIZATION_WINDOW, history["score"][-OVEROPTIMIZATION_WINDOW],
                                   history["score"][-1], history["gold_score"][-OVEROPTIMIZATION_WINDOW], history["gold_score"][-1])
            update = _optimize(cfg, procs, policy, optimizer, scheduler, exp, step, ptx, ptx_stream, tokenizer.pad_token_id, device, scaler)
            state["updates"] += update["ppo_updates"]
            kl_control.update(exp.stats["kl"], len(exp.lengths))
            state["kl_coef"] = kl_control.value
            state["step"] = step
            if step % cfg.logging_steps == 0 or step == cfg.max_steps:
                # the slowest process sets the pace of each phase
                names = [*exp.seconds, "update"]
                seconds = procs.max(torch.tensor([*exp.seconds.values(), update.pop("seconds")], device=device)).tolist()
                last_row = {
                    "step": step, **exp.stats, **update, "learning_rate": scheduler.get_last_lr()[0],
                    "generation_tokens_per_second": float(exp.lengths.sum()) / max(seconds[0], 1e-9),
                    **{f"seconds/{name}": round(s, 4) for name, s in zip(names, seconds)},
                }
                log.write(last_row)
                progress.update(bar, status=f"score {last_row['score']:.3f}  kl {last_row['kl']:.3f}")
            kill_point("ALIGNKIT_KILL_AT_STEP", step)
            if cfg.save_steps and step % cfg.save_steps == 0:
                save_checkpoint(output_dir / "checkpoints" / f"step-{step}", accelerator, policy, optimizer, scheduler, dict(state),
                                cfg.save_total_limit, cfg)
            progress.update(bar, completed=step)

    log.close()
    accelerator.wait_for_everyone()
    if main:
        save_final_model(lambda folder: _save_policy(policy, tokenizer, folder), output_dir)
    accelerator.wait_for_everyone()
    return last_row
