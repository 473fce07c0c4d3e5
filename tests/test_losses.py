import math

import torch

from alignkit.losses import weighted_cross_entropy_sum


def test_weighted_cross_entropy_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0], [1.0, 3.0, 0.5]])
    targets = torch.tensor([0, 2, 1])
    weights = torch.tensor([1.0, 0.5, 0.0])
    expected = 0.0
    for row, target, weight in zip(logits.tolist(), targets.tolist(), weights.tolist()):
        log_z = math.log(sum(math.exp(v) for v in row))
        expected += weight * (log_z - row[target])
    assert math.isclose(weighted_cross_entropy_sum(logits, targets, weights).item(), expected, rel_tol=1e-6)


def test_weighted_cross_entropy_gradient_ignores_zero_weights():
    logits = torch.randn(4, 7, requires_grad=True)
    weights = torch.tensor([1.0, 0.0, 1.0, 0.0])
    weighted_cross_entropy_sum(logits, torch.tensor([1, 2, 3, 4]), weights).backward()
    assert torch.all(logits.grad[1] == 0) and torch.all(logits.grad[3] == 0)
    assert logits.grad[0].abs().sum() > 0
