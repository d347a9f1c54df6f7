"""sppo_loss.py against brute force and hand computations."""
import math

import numpy as np
import pytest
import torch

import sppo_loss as L
from machinery.flags import LOSS_TYPES
from theory.games import multiplicative_weights_step


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_prob_matrix_from_scores_brute_force():
    scores = torch.randn(3, 5, dtype=torch.float64)
    P = L.prob_matrix_from_scores(scores)
    assert P.shape == (3, 5, 5)
    for b in range(3):
        for i in range(5):
            for j in range(5):
                assert P[b, i, j].item() == pytest.approx(sigmoid(scores[b, i].item() - scores[b, j].item()), abs=1e-12)
    assert torch.allclose(P + P.transpose(-1, -2), torch.ones_like(P))
    assert torch.all(P.diagonal(dim1=-2, dim2=-1) == 0.5)


def test_win_rates_brute_force_with_self_term():
    P = torch.rand(2, 4, 4, dtype=torch.float64)
    P = (P + 1 - P.transpose(-1, -2)) / 2  # a preference matrix: P + P^T = 1, diagonal 1/2
    w = L.win_rates(P)
    for b in range(2):
        for i in range(4):
            assert w[b, i].item() == pytest.approx(sum(P[b, i, k].item() for k in range(4)) / 4, abs=1e-12)
    # the self term counts: K=2 with P[0,1] = 1 gives (1/2 + 1)/2 = 0.75, not 1
    assert L.win_rates(torch.tensor([[0.5, 1.0], [0.0, 0.5]])).tolist() == [0.75, 0.25]
    # E_{y ~ uniform} P(y > uniform) = 1/2 for any preference matrix
    assert torch.allclose(w.mean(-1), torch.full((2,), 0.5, dtype=torch.float64))


def test_sppo_loss_hand_computed():
    # logratio 0.5, target 2 * (0.75 - 0.5) = 0.5 -> 0; and (1 - 2 * (0.25 - 0.5))^2 = 2.25
    got = L.sppo_loss(torch.tensor([0.5, 1.0]), torch.tensor([0.75, 0.25]), eta=2.0)
    assert got.tolist() == pytest.approx([0.0, 2.25])


def test_sppo_target_is_the_multiplicative_weights_step_up_to_a_constant():
    """Eq. 4.6's target eta (P(y > pi_t) - 1/2) is log pi_{t+1}(y)/pi_t(y) of the exact update
    (Eq. 4.1, games.multiplicative_weights_step in numpy) shifted by the same log Z_t - eta/2 for
    every y: the shift the eta/2 approximation makes, between 0 and eta^2/8."""
    rng = np.random.default_rng(0)
    for n, eta in ((3, 0.5), (6, 2.0)):
        A = rng.random((n, n))
        P = (A + 1 - A.T) / 2  # a preference matrix: P + P^T = 1
        pi = rng.dirichlet(np.ones(n))
        log_ratio = np.log(multiplicative_weights_step(P, pi, eta) / pi)
        target = L.sppo_target(torch.tensor(P @ pi), eta).numpy()
        shift = target - log_ratio
        assert np.allclose(shift, shift[0], atol=1e-12)
        log_z = np.log(np.sum(pi * np.exp(eta * (P @ pi))))
        assert shift[0] == pytest.approx(log_z - eta / 2, abs=1e-12)
        assert 0 <= shift[0] <= eta ** 2 / 8


# one prompt, hand-computed: logratios w = 1.0, l = -0.5; win rates 0.7 / 0.4; P[w, l] = 0.8; eta = 2, beta = 0.5
LW, LL, WW, WL, PWL, ETA, BETA = 1.0, -0.5, 0.7, 0.4, 0.8, 2.0, 0.5


def one_pair(loss_type):
    """preference_loss of the one prompt above: K = 2, y_w = 0 and y_l = 1 (win rates and P as given)."""
    P = torch.tensor([[[0.5, PWL], [1 - PWL, 0.5]]])
    return L.preference_loss(loss_type, logratios=torch.tensor([[LW, LL]]), win_rate=torch.tensor([[WW, WL]]), P=P,
                             used=torch.tensor([[0, 1]]), eta=ETA, beta=BETA)


@pytest.mark.parametrize("loss_type,expected", [
    ("sppo", 0.5 * ((1.0 - 2 * 0.2) ** 2 + (-0.5 - 2 * (-0.1)) ** 2)),
    ("sppo_single", 0.5 * ((1.0 - 2 * 0.3) ** 2 + (-0.5 + 2 * 0.3) ** 2)),
    ("sppo_hard", (1.0 - 1.0) ** 2 + (-0.5 + 1.0) ** 2),
    ("dpo", -math.log(sigmoid(0.5 * 1.5))),
    ("ipo", (1.5 - 1.0) ** 2),
])
def test_pair_losses_hand_computed(loss_type, expected):
    assert one_pair(loss_type).item() == pytest.approx(expected, rel=1e-6), loss_type


def test_sppo_all_hand_computed():
    logratios = torch.tensor([[0.5, -1.0, 0.0]])
    win = torch.tensor([[0.6, 0.3, 0.6]])
    expected = ((0.5 - 0.2) ** 2 + (-1.0 + 0.4) ** 2 + (0.0 - 0.2) ** 2) / 3  # eta = 2
    loss = L.preference_loss("sppo_all", logratios=logratios, win_rate=win, P=None, used=torch.tensor([[0, 1, 2]]),
                             eta=2.0, beta=None)
    assert loss.item() == pytest.approx(expected)


def brute_force(loss_type, logratios, P, eta, beta):
    """preference_loss of one prompt, from the formulas (NOTES.md's table) in plain floats.

    logratios: log pi_theta(y_k)/pi_t(y_k) of each of the K responses; P: K x K lists.
    -> (loss, logratio_chosen, logratio_rejected, target_chosen, target_rejected, preferred, ordered)
    """
    K = len(P)
    win = [sum(P[i]) / K for i in range(K)]  # the self term P[i][i] = 1/2 included
    w = max(range(K), key=lambda k: (win[k], -k))  # the first best, the first worst
    l = min(range(K), key=lambda k: (win[k], k))
    lw, ll = logratios[w], logratios[l]
    nan = float("nan")
    if loss_type == "sppo_all":
        loss = sum((logratios[k] - eta * (win[k] - 0.5)) ** 2 for k in range(K)) / K
        tw, tl = eta * (win[w] - 0.5), eta * (win[l] - 0.5)
    elif loss_type == "sppo":
        tw, tl = eta * (win[w] - 0.5), eta * (win[l] - 0.5)
        loss = ((lw - tw) ** 2 + (ll - tl) ** 2) / 2
    elif loss_type == "sppo_single":
        tw, tl = eta * (P[w][l] - 0.5), eta * (P[l][w] - 0.5)
        loss = ((lw - tw) ** 2 + (ll - tl) ** 2) / 2
    elif loss_type == "sppo_hard":
        tw, tl = eta / 2, -eta / 2
        loss = (lw - tw) ** 2 + (ll - tl) ** 2
    elif loss_type == "dpo":
        tw = tl = nan
        loss = math.log(1 + math.exp(-beta * (lw - ll)))
    elif loss_type == "ipo":
        tw = tl = nan
        loss = (lw - ll - 1 / (2 * beta)) ** 2
    preferred = win[w] > win[l]
    return loss, lw, ll, tw, tl, preferred, preferred and lw > ll


def random_preferences(B, K, gen):
    A = torch.rand(B, K, K, dtype=torch.float64, generator=gen)
    return (A + 1 - A.transpose(-1, -2)) / 2


@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t != "magnet"])  # magnet: test_magnet_loss.py
def test_preference_loss_and_stats_brute_force(loss_type):
    """Loss and statistics of every loss type against `brute_force`, on random preferences plus
    two hand-made prompts: all win rates tied (best = worst), and a best y_w that y_l beats
    head-on (P[w][l] < 1/2: sppo_single's targets then point the other way)."""
    gen = torch.Generator().manual_seed(0)
    K, eta, beta = 4, 3.0, 0.7
    P = torch.cat([random_preferences(6, K, gen), torch.full((1, K, K), 0.5, dtype=torch.float64),
                   torch.tensor([[[0.5, 0.4, 1.0, 1.0], [0.6, 0.5, 0.0, 0.0], [0.0, 1.0, 0.5, 0.5],
                                  [0.0, 1.0, 0.5, 0.5]]], dtype=torch.float64)])
    win_rate = P.mean(-1)  # rank.py's win rates (win_rates is checked above against a loop)
    used = L.responses_used(loss_type, win_rate)
    per_response = torch.randn(len(P), K, dtype=torch.float64, generator=gen)  # log pi_theta/pi_t of each y_k
    logratios = per_response.gather(-1, used)
    loss = L.preference_loss(loss_type, logratios=logratios, win_rate=win_rate, P=P, used=used, eta=eta, beta=beta)
    stats = L.preference_stats(loss_type, logratios=logratios, win_rate=win_rate, P=P, used=used, eta=eta)
    assert set(stats) == {"logratio_chosen", "logratio_rejected", "target_chosen", "target_rejected", "preferred", "ordered"}
    for b in range(len(P)):
        want = brute_force(loss_type, per_response[b].tolist(), P[b].tolist(), eta, beta)
        got = (loss[b], *(stats[k][b] for k in ("logratio_chosen", "logratio_rejected", "target_chosen",
                                                 "target_rejected", "preferred", "ordered")))
        assert [float(g) for g in got] == pytest.approx([float(x) for x in want], rel=1e-12, abs=1e-12, nan_ok=True), b
    assert not stats["preferred"][6] and stats["preferred"][7]  # the tie, and y_w = 0 over y_l = 1 at P = 0.4
    if loss_type == "sppo_single":
        assert stats["target_chosen"][7] < 0 < stats["target_rejected"][7]


@pytest.mark.parametrize("loss_type", ["sppo", "sppo_single", "sppo_hard", "sppo_all", "ipo"])
def test_targets_are_where_the_loss_is_smallest(loss_type):
    """The stats' targets are the loss's minimiser: at logratios = targets the loss is 0 and its
    gradient vanishes (ipo: at any pair whose difference is 1/(2 beta))."""
    gen = torch.Generator().manual_seed(1)
    P = random_preferences(5, 4, gen)
    win_rate = P.mean(-1)
    used = L.responses_used(loss_type, win_rate)
    kw = dict(win_rate=win_rate, P=P, used=used, eta=2.0)
    stats = L.preference_stats(loss_type, logratios=torch.zeros(used.shape, dtype=torch.float64), **kw)
    if loss_type == "sppo_all":
        at_target = 2.0 * (win_rate - 0.5)  # every response its own target; chosen / rejected are two of them
        assert torch.equal(stats["target_chosen"], at_target.max(-1).values)
        assert torch.equal(stats["target_rejected"], at_target.min(-1).values)
    elif loss_type == "ipo":
        at_target = torch.tensor([[1.7, 1.7 - 1 / (2 * 0.25)]] * 5, dtype=torch.float64)
        assert stats["target_chosen"].isnan().all()
    else:
        at_target = torch.stack([stats["target_chosen"], stats["target_rejected"]], -1)
    at_target.requires_grad_(True)
    loss = L.preference_loss(loss_type, logratios=at_target, **kw, beta=0.25)
    loss.sum().backward()
    assert loss.abs().max() < 1e-12 and at_target.grad.abs().max() < 1e-12
    with pytest.raises(ValueError):
        L.preference_loss("nope", logratios=at_target, **kw, beta=0.25)


def test_ties_give_best_equal_worst():
    best, worst = L.best_and_worst(torch.tensor([[0.5, 0.5, 0.5], [0.2, 0.9, 0.9]]))
    assert best.tolist() == [0, 1] and worst.tolist() == [0, 0]


def test_gradient_of_sppo_loss_pushes_towards_target():
    """d loss / d logratio = 2 (logratio - target): the winner is pushed up, the loser down."""
    lr = torch.zeros(2, requires_grad=True)
    L.sppo_loss(lr, torch.tensor([0.9, 0.1]), eta=10.0).sum().backward()
    assert lr.grad.tolist() == pytest.approx([-8.0, 8.0])
