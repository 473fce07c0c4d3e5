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
