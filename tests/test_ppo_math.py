"""PPO / RLHF maths against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from palate.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    gae,
    kl_estimate,
    masked_mean,
    masked_var,
    masked_whiten,
    penalised_rewards,
    policy_loss,
    value_loss,
)

T = torch.tensor


def test_gae_four_tokens() -> None:
    # δ3 = 1 − 0.2 = 0.8            A3 = 0.8
    # δ2 = 0.2 − 0.3 = −0.1         A2 = −0.1 + 0.9·0.8   = 0.62
    # δ1 = 0.3 − 0.4 = −0.1         A1 = −0.1 + 0.9·0.62  = 0.458
    # δ0 = 0.4 − 0.5 = −0.1         A0 = −0.1 + 0.9·0.458 = 0.3122
    adv, ret = gae(
        T([[0.0, 0.0, 0.0, 1.0]]), T([[0.5, 0.4, 0.3, 0.2]]), T([[1, 1, 1, 1]]), gamma=1.0, lam=0.9
    )
    assert adv[0].tolist() == pytest.approx([0.3122, 0.458, 0.62, 0.8], abs=1e-6)
    assert ret[0].tolist() == pytest.approx([0.8122, 0.858, 0.92, 1.0], abs=1e-6)


def test_gae_masks_padding_and_treats_last_real_token_as_terminal() -> None:
    # mask ends after 3 tokens: the 4th reward (5) and value (9) must not leak in.
    adv, ret = gae(
        T([[0.0, 0.0, 1.0, 5.0]]), T([[0.5, 0.4, 0.3, 9.0]]), T([[1, 1, 1, 0]]), gamma=1.0, lam=0.9
    )
    # δ2 = 1 − 0.3 = 0.7; A1 = −0.1 + 0.9·0.7 = 0.53; A0 = −0.1 + 0.9·0.53 = 0.377
    assert adv[0].tolist() == pytest.approx([0.377, 0.53, 0.7, 0.0], abs=1e-6)
    assert ret[0, 3] == 0


def test_gae_discounting() -> None:
    adv, _ = gae(T([[0.0, 0.0, 0.0, 1.0]]), torch.zeros(1, 4), torch.ones(1, 4), gamma=0.5, lam=1.0)
    assert adv[0].tolist() == pytest.approx([0.125, 0.25, 0.5, 1.0])


def test_masked_mean_var_whiten() -> None:
    x, m = T([[1.0, 2.0, 3.0, 100.0]]), T([[1, 1, 1, 0]])
    assert masked_mean(x, m).item() == pytest.approx(2.0)
    assert masked_var(x, m).item() == pytest.approx(1.0)  # ((−1)² + 0 + 1²) / (3 − 1)
    assert masked_whiten(x, m)[0].tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-4)
    assert masked_whiten(x, m, shift_mean=False)[0, :3].tolist() == pytest.approx(
        [1.0, 2.0, 3.0], abs=1e-4
    )


def test_kl_penalty_every_token_and_score_only_at_eos() -> None:
    scores = T([2.0, 3.0])
    kl = T([[0.1, 0.2, 0.3], [0.5, 0.5, 0.7]])
    mask = T([[1, 1, 1], [1, 1, 0]])
    r = penalised_rewards(scores, kl, mask, beta=0.1)
    expected = [[-0.01, -0.02, -0.03 + 2.0], [-0.05, -0.05 + 3.0, 0.0]]
    assert r.tolist() == [pytest.approx(row, abs=1e-6) for row in expected]


def test_kl_estimators() -> None:
    lp, ref = T([-1.0, -2.0]), T([-2.0, -2.0])
    assert kl_estimate(lp, ref, "k1").tolist() == pytest.approx([1.0, 0.0])
    assert kl_estimate(lp, ref, "k2").tolist() == pytest.approx([0.5, 0.0])
    assert kl_estimate(lp, ref, "k3").tolist() == pytest.approx([math.exp(-1), 0.0], abs=1e-6)
    assert (kl_estimate(T([-3.0]), T([-1.0]), "k3") >= 0).all()  # k3 never negative
    with pytest.raises(ValueError):
        kl_estimate(lp, ref, "k9")


def test_clipped_policy_loss() -> None:
    # token 1: A = +1, ratio 1.5 → pessimistic min(1.5, 1.2)·A → loss −1.2 (clipped)
    # token 2: A = −1, ratio 0.5 → max(0.5, 0.8) → loss 0.8 (clipped)
    # token 3: A = +2, ratio 1.0 → loss −2 (not clipped); token 4 masked out
    old = T([[0.0, 0.0, 0.0, 0.0]])
    new = T([[math.log(1.5), math.log(0.5), 0.0, 5.0]])
    adv = T([[1.0, -1.0, 2.0, 9.0]])
    mask = T([[1, 1, 1, 0]])
    loss, clipfrac, approxkl = policy_loss(new, old, adv, mask, clip=0.2)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.0) / 3, abs=1e-6)
    assert clipfrac.item() == pytest.approx(2 / 3)
    assert approxkl.item() == pytest.approx(
        (0.5 * math.log(1.5) ** 2 + 0.5 * math.log(0.5) ** 2) / 3, abs=1e-6
    )


def test_clipped_value_loss() -> None:
    # V = 1.0, V_old = 0.5, R = 2: unclipped (1 − 2)² = 1; clipped V = 0.7 → 1.69; max → 1.69
    loss, frac = value_loss(T([[1.0]]), T([[0.5]]), T([[2.0]]), T([[1]]), clip=0.2)
    assert loss.item() == pytest.approx(0.5 * 1.69)
    assert frac.item() == 1.0
    loss, _ = value_loss(T([[1.0]]), T([[0.5]]), T([[2.0]]), T([[1]]), clip=None)
    assert loss.item() == pytest.approx(0.5)


def test_adaptive_kl_controller() -> None:
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, n_steps=8)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 8 / 10000))
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(6.6, n_steps=100)  # error 0.1
    assert ctl.value == pytest.approx(0.1 * (1 + 0.1 * 100 / 10000))
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(0.0, n_steps=100)  # error clipped to −0.2
    assert ctl.value == pytest.approx(0.1 * (1 - 0.2 * 100 / 10000))
    fixed = FixedKLController(0.3)
    fixed.update(100.0, 8)
    assert fixed.value == 0.3


def test_running_moments_match_numpy() -> None:
    rm = RunningMoments()
    a, b = torch.randn(50) * 3 + 1, torch.randn(70) * 2 - 1
    rm.update(a)
    rm.update(b)
    allx = torch.cat([a, b]).double()
    assert rm.mean == pytest.approx(allx.mean().item(), abs=1e-6)
    assert rm.std == pytest.approx(allx.std(unbiased=False).item(), abs=1e-6)
