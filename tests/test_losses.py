import math

import numpy as np
import pytest
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
        got, chosen, rejected = dpo_losses(t(pc), t(pr), t(rc), t(rr), beta, loss_type)
        assert math.isclose(got.item(), expected, rel_tol=1e-6), loss_type
        # the implicit rewards β·(log π − log π_ref) the loss implies
        assert math.isclose(chosen.item(), beta * (pc - rc), rel_tol=1e-6) and math.isclose(rejected.item(), beta * (pr - rr), rel_tol=1e-6)
    conservative = dpo_losses(t(pc), t(pr), t(rc), t(rr), beta, "sigmoid", label_smoothing=eps)[0].item()
    assert math.isclose(conservative, -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h), rel_tol=1e-6)
    robust = dpo_losses(t(pc), t(pr), t(rc), t(rr), beta, "robust", label_smoothing=eps)[0].item()
    assert math.isclose(robust, (-(1 - eps) * log_sigmoid(beta * h) + eps * log_sigmoid(-beta * h)) / (1 - 2 * eps), rel_tol=1e-6)
    # SimPO: length-normalized log-probs, no reference, margin gamma
    simpo, chosen, rejected = dpo_losses(t(-0.8), t(-1.3), None, None, 2.0, "simpo", simpo_gamma=0.5)
    assert math.isclose(simpo.item(), -log_sigmoid(2.0 * (-0.8 + 1.3) - 0.5), rel_tol=1e-6)
    assert math.isclose(chosen.item(), 2.0 * -0.8, rel_tol=1e-6) and math.isclose(rejected.item(), 2.0 * -1.3, rel_tol=1e-6)
    with pytest.raises(ValueError, match="--loss_type"):
        dpo_losses(t(pc), t(pr), t(rc), t(rr), beta, "kto")


def test_dpo_invariants_when_policy_equals_reference():
    from alignkit.losses import dpo_losses

    logps = torch.tensor([-3.0, -7.0])
    beta = 0.1
    same = lambda loss_type: dpo_losses(logps, logps.flip(0), logps, logps.flip(0), beta, loss_type)  # noqa: E731
    assert torch.allclose(same("sigmoid")[0], torch.full((2,), math.log(2)))
    assert torch.allclose(same("ipo")[0], torch.full((2,), 1 / (4 * beta**2)))
    assert torch.allclose(same("hinge")[0], torch.ones(2))
    assert all((same(t)[1] == 0).all() and (same(t)[2] == 0).all() for t in ("sigmoid", "ipo", "hinge", "robust"))


# ---------------------------------------------------------------------------------------------
# RLHF reward shaping, KL controllers, masked statistics


def test_kl_shaped_rewards_match_a_per_token_loop():
    from alignkit.losses import kl_shaped_rewards

    g = torch.Generator().manual_seed(0)
    lengths = [5, 2, 0, 1]
    mask = torch.tensor([[1.0] * n + [0.0] * (5 - n) for n in lengths])
    kl = torch.randn(4, 5, generator=g, dtype=torch.float64)
    scores = torch.randn(4, generator=g, dtype=torch.float64)
    beta = 0.3
    got = kl_shaped_rewards(scores, kl, mask, beta)
    for b, n in enumerate(lengths):
        for t in range(5):
            expected = 0.0
            if t < n:
                expected = -beta * kl[b, t].item() + (scores[b].item() if t == n - 1 else 0.0)
            assert math.isclose(got[b, t].item(), expected, rel_tol=1e-12, abs_tol=1e-15), (b, t)
    # summed over tokens: the sequence reward R = score − β·Σ KL that RLOO/GRPO baseline (0 for an empty response)
    expected_sums = [scores[b].item() - beta * kl[b, :n].sum().item() if n else 0.0 for b, n in enumerate(lengths)]
    assert np.allclose(got.sum(1).numpy(), expected_sums, rtol=1e-12, atol=1e-15)


def test_fixed_kl_controller_never_moves():
    from alignkit.losses import FixedKLController, kl_controller

    control = kl_controller(0.05, target=0.0, horizon=100)
    assert isinstance(control, FixedKLController)
    control.update(kl=100.0, n=64)
    assert control.value == 0.05


def test_adaptive_kl_controller_follows_ziegler_et_al():
    """β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon), step by step against a plain-Python recurrence."""
    from alignkit.losses import AdaptiveKLController, kl_controller

    control = kl_controller(0.1, target=6.0, horizon=1000)
    assert isinstance(control, AdaptiveKLController)
    control.update(kl=12.0, n=100)
    assert math.isclose(control.value, 0.1 * (1 + 0.2 * 100 / 1000))  # error clipped at +0.2
    control = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    control.update(kl=5.4, n=100)
    assert math.isclose(control.value, 0.1 * (1 - 0.1 * 100 / 1000))
    # a sequence of batches: KL above target raises β, below lowers it
    control, beta = AdaptiveKLController(0.2, target=2.0, horizon=50), 0.2
    for kl in [4.0, 3.0, 2.2, 1.0, 0.1, 2.0]:
        control.update(kl, n=8)
        beta = beta * (1 + min(max(kl / 2.0 - 1, -0.2), 0.2) * 8 / 50)
        assert math.isclose(control.value, beta, rel_tol=1e-12)


def test_masked_mean_var_matches_numpy_and_is_stable_far_from_zero():
    from alignkit.losses import masked_mean_var

    g = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    picked = x.numpy()[mask.numpy().astype(bool)]
    mean, var = masked_mean_var(x, mask)
    assert math.isclose(mean.item(), picked.mean(), rel_tol=1e-12) and math.isclose(var.item(), picked.var(), rel_tol=1e-12)
    # float32 values near 1e4 with spread 1e-2: E[x²] − E[x]² would cancel to noise (1e8 · 2^-24 ≈ 6 ≫ var ≈ 1e-4); the
    # two-pass formula keeps it to the error of μ (a few ulp of 1e4, ~1e-3, so ≲ 1% of σ² here; 5% allowed)
    shifted = (1e4 + 1e-2 * x).float()
    reference = shifted.double().numpy()[mask.numpy().astype(bool)].var()
    assert math.isclose(masked_mean_var(shifted, mask)[1].item(), reference, rel_tol=0.05)
    naive = (shifted**2 * mask).sum() / mask.sum() - ((shifted * mask).sum() / mask.sum()) ** 2
    assert not math.isclose(naive.item(), reference, rel_tol=0.05)  # what the helper avoids
    empty_mean, empty_var = masked_mean_var(x, torch.zeros_like(mask))
    assert empty_mean.item() == 0 and empty_var.item() == 0
