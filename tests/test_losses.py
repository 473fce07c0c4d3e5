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


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def test_pairwise_reward_loss_matches_formula():
    from alignkit.losses import reward_model_loss_sum

    rewards = torch.tensor([1.5, -0.5, 0.2, 0.9])  # two prompts, one pair each
    loss = reward_model_loss_sum(rewards, torch.tensor([0, 3]), torch.tensor([1, 2]), torch.tensor([0, 1]), 2)
    expected = -log_sigmoid(1.5 - -0.5) - log_sigmoid(0.9 - 0.2)
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    with_margin = reward_model_loss_sum(rewards, torch.tensor([0, 3]), torch.tensor([1, 2]), torch.tensor([0, 1]), 2, margin=torch.tensor([1.0, 0.0]))
    assert math.isclose(with_margin.item(), -log_sigmoid(2.0 - 1.0) - log_sigmoid(0.7), rel_tol=1e-6)
    centred = reward_model_loss_sum(rewards, torch.tensor([0, 3]), torch.tensor([1, 2]), torch.tensor([0, 1]), 2, center_coefficient=0.1)
    assert math.isclose(centred.item(), expected + 0.1 * ((1.5 - 0.5) ** 2 + (0.9 + 0.2) ** 2), rel_tol=1e-6)


def test_k_way_ranking_loss_is_the_mean_over_all_pairs_of_a_prompt():
    from itertools import combinations

    from alignkit.losses import reward_model_loss_sum

    r = [2.0, 0.5, 1.0, -1.0]  # prompt 0: a ranking of 4 (best first); prompt 1: one pair
    rewards = torch.tensor(r + [0.3, 0.1])
    pairs = list(combinations(range(4), 2)) + [(4, 5)]
    better, worse = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
    group = torch.tensor([0] * 6 + [1])
    expected = sum(-log_sigmoid(r[i] - r[j]) for i, j in combinations(range(4), 2)) / 6 - log_sigmoid(0.3 - 0.1)
    assert math.isclose(reward_model_loss_sum(rewards, better, worse, group, 2).item(), expected, rel_tol=1e-6)


def test_dpo_loss_variants_match_their_formulas():
    from alignkit.losses import dpo_losses

    pc, pr, rc, rr = -4.0, -6.5, -5.0, -6.0
    beta, eps = 0.2, 0.1
    h = (pc - rc) - (pr - rr)
    t = lambda *v: torch.tensor([float(x) for x in v])
    cases = {
        "sigmoid": -log_sigmoid(beta * h),
        "ipo": (h - 1 / (2 * beta)) ** 2,
        "hinge": max(0.0, 1 - beta * h),
    }
    for loss_type, expected in cases.items():
        got = dpo_losses(t(pc), t(pr), t(rc), t(rr), beta, loss_type).item()
        assert math.isclose(got, expected, rel_tol=1e-6), loss_type
    conservative = dpo_losses(t(pc), t(pr), t(rc), t(rr), beta, "sigmoid", label_smoothing=eps).item()
    assert math.isclose(conservative, -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h), rel_tol=1e-6)
    robust = dpo_losses(t(pc), t(pr), t(rc), t(rr), beta, "robust", label_smoothing=eps).item()
    assert math.isclose(robust, (-(1 - eps) * log_sigmoid(beta * h) + eps * log_sigmoid(-beta * h)) / (1 - 2 * eps), rel_tol=1e-6)
    # SimPO: length-normalized log-probs, no reference, margin gamma
    simpo = dpo_losses(t(-0.8), t(-1.3), None, None, 2.0, "simpo", simpo_gamma=0.5).item()
    assert math.isclose(simpo, -log_sigmoid(2.0 * (-0.8 + 1.3) - 0.5), rel_tol=1e-6)


def test_dpo_invariants_when_policy_equals_reference():
    from alignkit.losses import dpo_losses

    logps = torch.tensor([-3.0, -7.0])
    beta = 0.1
    assert torch.allclose(dpo_losses(logps, logps.flip(0), logps, logps.flip(0), beta, "sigmoid"), torch.full((2,), math.log(2)))
    assert torch.allclose(dpo_losses(logps, logps.flip(0), logps, logps.flip(0), beta, "ipo"), torch.full((2,), 1 / (4 * beta**2)))
    assert torch.allclose(dpo_losses(logps, logps.flip(0), logps, logps.flip(0), beta, "hinge"), torch.ones(2))
