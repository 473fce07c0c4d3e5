"""Every loss of the pipeline as a pure function of tensors, with its formula.

Losses return *sums* (and the loop divides by the step's total weight), because the normalizer of
one optimizer step spans all its micro-batches and processes: dividing inside a micro-batch would
make gradient accumulation, batch composition and packing change the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


def weighted_cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σᵢ wᵢ · CEᵢ  with  CEᵢ = −log softmax(logitsᵢ)[targetᵢ].

    The SFT loss of a step is this sum over all its tokens divided by Σᵢ wᵢ (the loop does the
    division): response tokens have w = 1, prompt tokens w = prompt_loss_weight (0 = masked).
    Shapes: logits [N, V], targets [N], weights [N]; computed in float32.
    """
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    return (ce * weights.to(ce.dtype)).sum()


# ---------------------------------------------------------------------------------------------
# reward model


def reward_model_loss_sum(
    rewards: torch.Tensor,
    better: torch.Tensor,
    worse: torch.Tensor,
    group: torch.Tensor,
    num_groups: int,
    margin: torch.Tensor | None = None,
    center_coefficient: float = 0.0,
) -> torch.Tensor:
    """Σ over prompts of the mean over that prompt's pairs of  −log σ(r_w − r_l − m)  [+ c·(r_w + r_l)²].

    `rewards` [R] holds every response's scalar reward; pair p compares rewards[better[p]] (preferred)
    with rewards[worse[p]] and belongs to prompt group[p]. A K-way ranking gives C(K,2) pairs of one
    prompt, averaged so each prompt counts once (InstructGPT). m is the optional per-pair margin; the
    c-term (--center_rewards_coefficient) keeps rewards centred at 0. Divide by the number of prompts.
    """
    diff = rewards[better] - rewards[worse]
    if margin is not None:
        diff = diff - margin
    per_pair = F.softplus(-diff)  # = −log σ(diff), stable for large |diff|
    if center_coefficient:
        per_pair = per_pair + center_coefficient * (rewards[better] + rewards[worse]) ** 2
    pairs_per_group = torch.zeros(num_groups, device=rewards.device).index_add_(0, group, torch.ones_like(per_pair))
    return (per_pair / pairs_per_group[group]).sum()


# ---------------------------------------------------------------------------------------------
# direct preference optimization

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "simpo")


def dpo_losses(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference losses and the implicit rewards they imply -> (losses, chosen_rewards, rejected_rewards), each [B].

    Log-probs are summed over response tokens (for `simpo`, averaged per token). The implicit reward of a
    response is r = β·(log π(y) − log π_ref(y)) (Rafailov et al., 2023, eq. 5; simpo: r = β·ℓ, no
    reference, Meng et al., 2024); with h = r_w/β − r_l/β = [log π(y_w) − log π_ref(y_w)] − [log π(y_l) − log π_ref(y_l)]:

      sigmoid (DPO, Rafailov et al. 2023)        −(1−ε)·log σ(β·h) − ε·log σ(−β·h)   ε = label_smoothing (cDPO)
      robust  (rDPO, Chowdhury et al. 2024)      [−(1−ε)·log σ(β·h) + ε·log σ(−β·h)] / (1 − 2ε)
      hinge   (SLiC, Zhao et al. 2023)           max(0, 1 − β·h)
      ipo     (IPO, Azar et al. 2023)            (h − 1/(2β))²
      simpo   (SimPO, Meng et al. 2024)          −(1−ε)·log σ(β·(ℓ_w − ℓ_l) − γ) − ε·log σ(−β·(ℓ_w − ℓ_l) + γ)
                                                 ℓ = mean log-prob per token

    The rewards are detached: they are metrics (accuracy = share of pairs with r_w > r_l), not part of the graph.
    """
    if loss_type == "simpo":
        logits = beta * (chosen_logps - rejected_logps) - simpo_gamma
        losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
        return losses, beta * chosen_logps.detach(), beta * rejected_logps.detach()
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"--loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    chosen_ratio, rejected_ratio = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * h) + label_smoothing * F.logsigmoid(-beta * h)) / (1 - 2 * label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:  # ipo
        losses = (h - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def chosen_nll(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """Per-pair NLL of the chosen response, per token:  −log π(y_w | x) / |y_w|.

    RPO (Pang et al., 2024) trains on  L_DPO + α · this  (--sft_weight α): it keeps the chosen
    responses likely, where plain DPO may lower both log-probs while widening their gap. Averaging per
    token makes α independent of response length. Shapes: [B] summed log-probs, [B] token counts.
    """
    return -chosen_logps / chosen_lengths.to(chosen_logps.dtype)


# ---------------------------------------------------------------------------------------------
# PPO and its critic-free variants (RLOO, GRPO)
#
# Shapes: per-token tensors are [B, T] over right-padded responses; `mask` [B, T] is 1 on response
# tokens (up to and including the stop token) and 0 on padding. Every formula below is applied only
# where mask = 1; padded positions come out as 0.

KL_ESTIMATORS = ("k1", "k3")


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π‖π_ref) from the log-probs of the sampled token y ~ π (Schulman, 2020):

      k1 = log π(y) − log π_ref(y)                       unbiased; single samples can be negative
      k3 = (r − 1) − log r,   r = π_ref(y) / π(y)          unbiased, always ≥ 0, lower variance

    Both are exactly 0 where π = π_ref (e.g. before the first PPO update).
    """
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        log_ratio = ref_logp - logp
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"--kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def kl_shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token RLHF reward (Ziegler et al., 2019; Stiennon et al., 2020; Ouyang et al., 2022) -> [B, T]:

      r_t = −β·KL_t + [t = T_b]·score_b

    with KL_t the per-token estimate of KL(π‖π_ref) (`kl_penalty`), score_b the sequence's score and T_b
    its last response token (the last position where mask = 1; rows are right-padded). Summed over t it is
    the sequence reward R_b = score_b − β·Σ_t KL_t that RLOO/GRPO baseline. `scores` [B], `kl` and `mask` [B, T].
    """
    mask = mask.to(kl.dtype)
    terminal = torch.zeros_like(kl)
    last = (mask.sum(1) - 1).clamp(min=0).long()
    terminal[torch.arange(len(scores), device=kl.device), last] = scores.to(kl.dtype)
    return (terminal - beta * kl) * mask  # a row without response tokens gets no reward at all


@dataclass
class FixedKLController:
    """β stays at its initial value: `update` is a no-op."""

    value: float

    def update(self, kl: float, n: int) -> None:
        pass


@dataclass
class AdaptiveKLController:
    """Proportional controller of β towards a target KL (Ziegler et al., 2019, section 2.2):

      e = clip(KL / KL_target − 1, −0.2, 0.2)
      β ← β · (1 + e · n / horizon)

    with KL the mean per-response KL of the batch just made and n its number of responses."""

    value: float
    target: float
    horizon: float

    def update(self, kl: float, n: int) -> None:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n / self.horizon


def kl_controller(initial: float, target: float, horizon: float) -> FixedKLController | AdaptiveKLController:
    """Adaptive when a target is set (> 0), else fixed."""
    return AdaptiveKLController(initial, target, horizon) if target > 0 else FixedKLController(initial)


def masked_mean_var(x: torch.Tensor, mask: torch.Tensor, total: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ, σ²) over the entries where mask = 1, two-pass (the variance sums squared deviations from μ, stable
    where μ² ≫ σ²):

      μ = Σ m·x / Σ m        σ² = Σ m·(x − μ)² / Σ m   (population variance)

    `total` (e.g. an all-reduce) turns each local sum into the sum over all processes, so μ and σ² are those
    of the whole batch; None: this tensor alone. An empty mask gives μ = σ² = 0."""
    total = total or (lambda t: t)
    mask = mask.to(x.dtype)
    count = total(mask.sum()).clamp(min=1)
    mean = total((x * mask).sum()) / count
    return mean, total(((x - mean) ** 2 * mask).sum()) / count


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8, total=None) -> torch.Tensor:
    """(x − μ) / √(σ² + eps) with μ, σ² = `masked_mean_var(x, mask, total)`. With shift_mean=False the mean is
    added back: x is only rescaled. Masked entries are returned as 0."""
    mean, var = masked_mean_var(x, mask, total)
    out = (x - mean) / torch.sqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al., 2016) over right-padded responses -> (A, returns).

      δ_t = r_t + γ·V_{t+1} − V_t
      A_t = δ_t + γ·λ·A_{t+1}
      returns_t = A_t + V_t

    where V_{t+1} and A_{t+1} are 0 after a response's last token (the episode ends there: nothing is
    bootstrapped from padding). `rewards` and `values` [B, T]; everything is 0 where mask = 0.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
        # a padded position t passes zeros to t − 1 (mask = 0 there, so its V and A are 0)
        next_value, next_advantage = values[:, t], advantages[:, t]
    return advantages, (advantages + values) * mask


def ppo_policy_loss_sum(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, cliprange: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate (Schulman et al., 2017) summed over tokens -> (loss sum, number of clipped tokens).

      ρ_t = exp(log π(a_t|s_t) − log π_old(a_t|s_t))
      L_t = max(−A_t·ρ_t, −A_t·clip(ρ_t, 1 − ε, 1 + ε))

    A token counts as clipped where the clipped term is the larger one (strictly): its gradient is 0.
    Divide both by the number of tokens (Σ m) for the mean loss and clipfrac.
    """
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = torch.maximum(unclipped, clipped)
    return (loss * mask).sum(), ((clipped > unclipped).to(logp.dtype) * mask).sum()


def ppo_value_loss_sum(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange_value: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss summed over tokens -> (loss sum, number of clipped tokens).

      V^clip_t = V_old,t + clip(V_t − V_old,t, −ε_v, ε_v)
      L_t = ½ · max((V_t − R_t)², (V^clip_t − R_t)²)

    A token counts as clipped where the clipped error is the larger one (strictly).
    """
    mask = mask.to(values.dtype)
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    error, clipped_error = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * torch.maximum(error, clipped_error)
    return (loss * mask).sum(), ((clipped_error > error).to(values.dtype) * mask).sum()


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al., 2024): k samples per prompt, rows grouped contiguously
    (rows g·k … g·k + k − 1 answer prompt g). The baseline of sample i is the mean of the other k − 1:

      A_i = R_i − (1 / (k − 1)) · Σ_{j ≠ i} R_j

    `rewards` [N] with N divisible by k ≥ 2.
    """
    if k < 2 or rewards.numel() % k:
        raise ValueError(f"rloo needs k ≥ 2 samples per prompt and a batch divisible by k (k={k}, batch={rewards.numel()})")
    grouped = rewards.view(-1, k)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).view(-1)


def grpo_advantages(rewards: torch.Tensor, k: int, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages (GRPO, Shao et al., 2024): k samples per prompt, grouped as in rloo:

      A_i = (R_i − mean_g(R)) / (std_g(R) + eps)

    with std_g the unbiased standard deviation of the k rewards of sample i's group g (k ≥ 2).
    """
    if k < 2 or rewards.numel() % k:
        raise ValueError(f"grpo needs k ≥ 2 samples per prompt and a batch divisible by k (k={k}, batch={rewards.numel()})")
    grouped = rewards.view(-1, k)
    return ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + eps)).view(-1)
