"""Every loss of the pipeline as a pure function of tensors, with its formula.

Losses return *sums* (and the loop divides by the step's total weight), because the normalizer of
one optimizer step spans all its micro-batches and processes: dividing inside a micro-batch would
make gradient accumulation, batch composition and packing change the loss.
"""

from __future__ import annotations

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
) -> torch.Tensor:
    """Per-pair preference losses from sequence log-probs (summed over response tokens; for `simpo`,
    averaged per token). With h = [log π(y_w) − log π_ref(y_w)] − [log π(y_l) − log π_ref(y_l)]:

      sigmoid (DPO)       −(1−ε)·log σ(β·h) − ε·log σ(−β·h)      ε = label_smoothing (conservative DPO)
      robust  (rDPO)      [−(1−ε)·log σ(β·h) + ε·log σ(−β·h)] / (1 − 2ε)
      hinge   (SLiC)      max(0, 1 − β·h)
      ipo     (IPO)       (h − 1/(2β))²
      simpo   (SimPO)     −log σ(β·(ℓ_w − ℓ_l) − γ)   ℓ = mean log-prob per token, no reference
    """
    if loss_type == "simpo":
        logits = beta * (chosen_logps - rejected_logps) - simpo_gamma
        return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    h = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    if loss_type == "robust":
        return (-(1 - label_smoothing) * F.logsigmoid(beta * h) + label_smoothing * F.logsigmoid(-beta * h)) / (1 - 2 * label_smoothing)
    if loss_type == "hinge":
        return torch.relu(1 - beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    raise ValueError(f"--loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
