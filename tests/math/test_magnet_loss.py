"""`--loss_type magnet` (sppo_loss.magnet_target): its target by hand, against the exact regularised
multiplicative-weights step, and its rest point against the regularised winner solved independently."""
import numpy as np
import pytest
import torch
from scipy.special import logsumexp

import sppo_loss as L
from theory.successors import regularised_winner
from worlds.toy import BASE_POLICY, family_matrix


def test_magnet_target_by_hand():
    w = torch.tensor([[0.75, 0.5, 0.25], [0.6, 0.3, 0.6]], dtype=torch.float64)   # each row averages 1/2
    gap = torch.tensor([[1.0, 0.0, -1.0], [3.0, 2.0, 1.0]], dtype=torch.float64)  # row 2: mean 2, centred (1, 0, -1)
    # eta = 2, tau = 1/2: c = 2 / (1 + 1) = 1; target = (w - 1/2) - (d - mean d) / 2
    got = L.magnet_target(w, gap, 2.0, 0.5)
    assert torch.allclose(got, torch.tensor([[-0.25, 0.0, 0.25], [-0.4, -0.2, 0.6]], dtype=torch.float64), atol=1e-15)
    # tau = 0: sppo_all's target, eta (w - 1/2)
    assert torch.equal(L.magnet_target(w, gap, 2.0, 0.0), L.sppo_target(w, 2.0))
    # the loss: mean over the K samples of (logratio - target)^2; its stats name the best and worst
    logratios = torch.tensor([[0.0, 0.0, 0.0], [0.1, 0.0, 0.0]], dtype=torch.float64)
    used = torch.arange(3).expand(2, 3)
    loss = L.preference_loss("magnet", logratios=logratios, win_rate=w, P=None, used=used, eta=2.0, beta=0.1,
                             tau=0.5, magnet_gap=gap)
    stats = L.preference_stats("magnet", logratios=logratios, win_rate=w, P=None, used=used, eta=2.0, tau=0.5,
                               magnet_gap=gap)
    assert loss.tolist() == pytest.approx([(0.0625 + 0 + 0.0625) / 3, (0.25 + 0.04 + 0.36) / 3], abs=1e-15)
    assert stats["target_chosen"].tolist() == pytest.approx([-0.25, -0.4])      # best by win rate: index 0, 0
    assert stats["target_rejected"].tolist() == pytest.approx([0.25, -0.2])     # worst: 2, 1
    assert L.responses_used("magnet", w).tolist() == used.tolist()


def regularised_mw_log_step(P, pi, pi0, eta, tau):
    """log pi_{t+1} - log pi_t of the exact regularised MW step, from its formula:
    [log pi + eta tau log pi0 + eta P pi] / (1 + eta tau), normalised."""
    logits = (np.log(pi) + eta * tau * np.log(pi0) + eta * (P @ pi)) / (1 + eta * tau)
    return logits - logsumexp(logits) - np.log(pi)


@pytest.mark.parametrize("kind", ["cyclic", "transitive"])
def test_target_is_the_exact_step_up_to_the_log_z_error(kind):
    """On the toy world's 6 x 6 family game, with pi_t's samples in exact proportion to pi_t (K = 20
    samples of a pi_t in twentieths), the sample win rates are P(y > pi_t) exactly and the sample mean
    of d is KL(pi_t || pi_0): the target differs from the exact regularised MW log-step by one constant
    over y, log Z_t minus its first-order value, within [0, c^2 range^2 / 8] (Jensen, Hoeffding)."""
    P = family_matrix(kind)
    counts = np.array([6, 3, 4, 4, 2, 1])
    pi_t = counts / counts.sum()
    pi0 = np.append(0.98 * np.array(BASE_POLICY), 0.02)
    idx = np.repeat(np.arange(6), counts)                                          # the K = 20 samples
    P_samples = torch.tensor(P[np.ix_(idx, idx)])
    w = L.win_rates(P_samples)                                                     # [K]
    assert np.allclose(w.numpy(), (P @ pi_t)[idx], atol=1e-14)
    d = torch.tensor(np.log(pi_t[idx]) - np.log(pi0[idx]))
    for eta, tau in ((2.0, 0.1), (10.0, 0.03), (30.0, 0.01)):
        c = eta / (1 + eta * tau)
        target = L.magnet_target(w, d, eta, tau).numpy()
        diff = regularised_mw_log_step(P, pi_t, pi0, eta, tau)[idx] - target       # = -(log Z_t - first order)
        assert np.ptp(diff) < 1e-12
        exponent = c * ((P @ pi_t) - tau * np.log(pi_t / pi0))
        first_order = np.sum(pi_t * exponent)
        log_z = logsumexp(exponent, b=pi_t)
        assert -diff[0] == pytest.approx(log_z - first_order, abs=1e-12)
        assert 0 <= log_z - first_order <= np.ptp(exponent) ** 2 / 8


@pytest.mark.parametrize("kind", ["cyclic", "transitive"])
def test_rest_point_is_the_regularised_winner(kind):
    """At pi_t = pi*_tau (solved by theory.successors.regularised_winner, minimising the regularised
    duality gap), every target is 0 for any set of samples whose win rates are P(y > pi*_tau) up to a
    common offset (sample win rates average 1/2 over the samples; the offset is set so here): the loss
    is smallest at pi_theta = pi_t, so pi*_tau is the fitted update's rest point. Not so at the von
    Neumann winner."""
    P, tau, eta = family_matrix(kind), 0.03, 30.0
    pi0 = np.append(0.98 * np.array(BASE_POLICY), 0.02)
    star = regularised_winner(P, tau, pi0)
    for samples in ([0, 1, 2, 3, 4, 5], [0, 0, 2, 3, 5], [1, 4]):
        w = torch.tensor((P @ star)[samples])
        d = torch.tensor(np.log(star[samples]) - np.log(pi0[samples]))
        assert torch.abs(L.magnet_target(w - w.mean() + 0.5, d, eta, tau)).max() < 1e-6
    vn = np.array([1 / 3, 1 / 3, 1 / 3, 0, 0, 0]) if kind == "cyclic" else np.eye(6)[0]
    vn = np.clip(vn, 1e-9, None) / np.clip(vn, 1e-9, None).sum()
    w = torch.tensor(P @ vn)
    d = torch.tensor(np.log(vn) - np.log(pi0))
    assert np.ptp(L.magnet_target(w - (vn * P @ vn).sum() + 0.5, d, eta, tau).numpy()[:3]) > 0.1
