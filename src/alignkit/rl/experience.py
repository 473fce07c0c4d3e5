"""Making PPO's experience: steps 1–4 of an iteration (see `alignkit.rl.ppo`), as named pieces.

  rollout (`rl.rollout`)  ->  score_responses, shape_scores  ->  old policy / critic / reference passes
  ->  KL-shaped per-token rewards (`losses.kl_shaped_rewards`)  ->  advantages (GAE, RLOO or GRPO)

Under torchrun, each process makes the experience of its share of the prompts (`Processes`); every batch
statistic (score normalization, whitening, the metrics) spans the global batch through the collectives
of `Processes`, so W processes compute what one process holding the whole batch would.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from alignkit.config import PPOConfig
from alignkit.data.prompts import PromptExample
from alignkit.generation import SamplingParams
from alignkit.losses import gae, grpo_advantages, kl_penalty, kl_shaped_rewards, masked_mean_var, rloo_advantages, whiten
from alignkit.rl.rollout import ActorCritic, Episodes, critic_values, policy_forward, rollout


class Processes:
    """This process's share of a PPO iteration under torchrun, and the collectives batch statistics need
    (no-ops alone). Gradients are not summed here: the policy is a DDP module (`accelerator.prepare`).

    The global batch of an iteration is its N = rollout_batch_size · k responses in prompt order: rows
    g·k … g·k + k − 1 answer prompt g. Process r of W owns the prompts g ≡ r (mod W): it samples, scores
    and trains on their rows, which it holds as local slots 0 … N/W − 1 (k-sample groups never straddle
    processes)."""

    def __init__(self, world: int, rank: int, k: int):
        self.world, self.rank, self.k = world, rank, k

    def owns(self, row: int) -> bool:
        return (row // self.k) % self.world == self.rank

    def local(self, row: int) -> int:
        """Index among this process's rows (its slot) of the global row `row` (which it owns)."""
        return (row // self.k) // self.world * self.k + row % self.k

    def global_rows(self, slots: list[int]) -> list[int]:
        """The global rows that slots `slots` hold on every process (rank-major): a minibatch's rows."""
        return [((s // self.k) * self.world + rank) * self.k + s % self.k for rank in range(self.world) for s in slots]

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


def one_minibatch(cfg: PPOConfig) -> bool:
    """Each iteration's responses form a single minibatch (the whole batch per optimizer step)."""
    return cfg.rollout_batch_size * cfg.num_samples_per_prompt <= cfg.mini_batch_size


@torch.no_grad()
def score_responses(reward, episodes: Episodes, batch: list[PromptExample], device) -> tuple[torch.Tensor, dict[str, float]]:
    """(raw scores of this process's responses, per-source score sums)."""
    keys = sorted({k for p in batch for k in p.columns})
    columns = {k: [p.columns.get(k) for p in batch] for k in keys}
    columns["finished"] = episodes.finished.tolist()
    columns["response_ids"] = [r[m.bool()].tolist() for r, m in zip(episodes.response_ids, episodes.response_mask)]
    raw = torch.tensor(reward(episodes.prompts, episodes.responses, **columns), dtype=torch.float32, device=device)
    several = len(getattr(reward, "sources", [])) > 1
    return raw, {f"score/{name}": sum(v) for name, v in getattr(reward, "last_components", {}).items()} if several else {}


def shape_scores(raw: torch.Tensor, finished: torch.Tensor, cfg: PPOConfig, procs: Processes) -> torch.Tensor:
    """Missing-EOS penalty, then standardization over the global batch (unbiased std), then clipping."""
    scores = raw - cfg.missing_eos_penalty * (~finished.to(raw.device)).float()
    if cfg.normalize_scores:
        everyone = procs.gather(scores)
        if len(everyone) > 1:
            scores = (scores - everyone.mean()) / (everyone.std() + 1e-8)
    if cfg.score_clip > 0:
        scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
    return scores


def _chunks(episodes: Episodes, size: int) -> list[Episodes]:
    n = len(episodes.prompts)
    return [episodes.select(list(range(s, min(s + size, n)))) for s in range(0, n, size)]


@torch.no_grad()
def forward_all(lm, episodes: Episodes, cfg: PPOConfig, value_head=None, entropy=False):
    """policy_forward in chunks of --mini_batch_size, concatenated: (log-probs, entropy, values)."""
    outs = [policy_forward(lm, chunk, cfg.temperature, value_head, entropy, cfg.shared_prefix_tokens) for chunk in _chunks(episodes, cfg.mini_batch_size)]
    cat = lambda name: None if getattr(outs[0], name) is None else torch.cat([getattr(o, name) for o in outs])
    return cat("logprobs"), cat("entropy"), cat("values")


@torch.no_grad()
def critic_all(critic, episodes: Episodes, cfg: PPOConfig) -> torch.Tensor:
    return torch.cat([critic_values(critic, chunk, cfg.shared_prefix_tokens) for chunk in _chunks(episodes, cfg.mini_batch_size)])


def critic_first_pass(critic, episodes: Episodes, cfg: PPOConfig) -> torch.Tensor:
    """V_old with the graph kept: the forward of the first (only) minibatch's value loss."""
    return critic_values(critic, episodes, cfg.shared_prefix_tokens)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, procs: Processes) -> float:
    """1 − Var(R − V) / Var(R) over the response tokens of the batch."""
    _, var = masked_mean_var(returns, mask, procs.sum)
    _, residual = masked_mean_var(returns - values, mask, procs.sum)
    return float(1 - residual / var) if var > 0 else float("nan")


@dataclass
class Experience:
    """One iteration's rollouts on this process, with what the update needs. Per-row tensors are this
    process's rows (slots); `lengths` and `tokens` are per global row (every process knows the whole batch's sizes)."""

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
    first_values: torch.Tensor | None = None  # [n, T] the critic's V_old with its graph, for the first update (see make_experience)


def make_experience(cfg: PPOConfig, procs: Processes, policy: ActorCritic, ref, reward, tokenizer, batch: list[PromptExample],
                    step: int, beta: float, device, critic_graph: bool = True) -> Experience:
    """Steps 1–4 of the iteration on this process's prompts (`policy` unwrapped: these passes need no gradient sync).
    `critic_graph`: a separate critic's pass may keep its graph for the first update (not when `policy` is a
    gathered copy of an FSDP-sharded policy: gradients must reach the shards, so the update reruns that forward)."""
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
    raw, parts = score_responses(reward, episodes, batch, device)
    scores = shape_scores(raw, episodes.finished, cfg, procs)
    lap("reward")

    # π_old, its entropy and V_old: kept by the sampler, else one teacher-forced pass
    recorded = episodes.entropy is not None and (policy.value_head is None or episodes.values is not None)
    if from_sampler and recorded:
        old_logp, entropy, old_values = episodes.logprobs.to(device) * mask, episodes.entropy.to(device), episodes.values
    else:
        old_logp, entropy, old_values = forward_all(lm, episodes, cfg, value_head=policy.value_head, entropy=True)
    first_values = None
    if policy.critic is not None and one_minibatch(cfg) and critic_graph:
        # the critic has not moved when the only minibatch's first update runs: this pass, graph kept, is its forward
        first_values = critic_first_pass(policy.critic, episodes, cfg)
        old_values = first_values.detach()
    elif policy.critic is not None:
        old_values = critic_all(policy.critic, episodes, cfg)
    lap("old_policy_and_values")
    if ref is not None:
        ref_logp, _, _ = forward_all(ref, episodes, cfg)
    else:
        with lm.disable_adapter():
            ref_logp, _, _ = forward_all(lm, episodes, cfg)
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
                     explained_variance=explained_variance(old_values, returns, mask, procs))
    tokens = procs.gather(episodes.prompt_mask.sum(1).to(device).float()) + lengths
    return Experience(episodes, mask, old_logp, old_values, advantages, returns, lengths, tokens, stats, seconds, first_values)
