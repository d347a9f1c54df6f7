"""sppo_loss.py against brute force and hand computations."""
import math

import pytest
import torch

import sppo_loss as L


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
    # logratio 0.3 - (-0.2) = 0.5, target 2 * (0.75 - 0.5) = 0.5 -> 0; and (1 - 2 * (0.25 - 0.5))^2 = 2.25
    got = L.sppo_loss(torch.tensor([0.3, 1.0]), torch.tensor([-0.2, 0.0]), torch.tensor([0.75, 0.25]), eta=2.0)
    assert got.tolist() == pytest.approx([0.0, 2.25])


# one prompt, hand-computed: logratios w = 1.0, l = -0.5; win rates 0.7 / 0.4; P[w, l] = 0.8; eta = 2, beta = 0.5
LW, LL, WW, WL, PWL, ETA, BETA = 1.0, -0.5, 0.7, 0.4, 0.8, 2.0, 0.5


@pytest.mark.parametrize("name,fn,expected", [
    ("sppo", lambda: L.sppo_pair_loss(torch.tensor([LW]), torch.tensor([LL]), torch.tensor([WW]), torch.tensor([WL]), ETA),
     0.5 * ((1.0 - 2 * 0.2) ** 2 + (-0.5 - 2 * (-0.1)) ** 2)),
    ("sppo_single", lambda: L.sppo_single_loss(torch.tensor([LW]), torch.tensor([LL]), torch.tensor([PWL]), ETA),
     0.5 * ((1.0 - 2 * 0.3) ** 2 + (-0.5 + 2 * 0.3) ** 2)),
    ("sppo_hard", lambda: L.sppo_hard_loss(torch.tensor([LW]), torch.tensor([LL]), ETA),
     (1.0 - 1.0) ** 2 + (-0.5 + 1.0) ** 2),
    ("dpo", lambda: L.dpo_loss(torch.tensor([LW]), torch.tensor([LL]), BETA), -math.log(sigmoid(0.5 * 1.5))),
    ("ipo", lambda: L.ipo_loss(torch.tensor([LW]), torch.tensor([LL]), BETA), (1.5 - 1.0) ** 2),
])
def test_pair_losses_hand_computed(name, fn, expected):
    assert fn().item() == pytest.approx(expected, rel=1e-6), name


def test_sppo_all_hand_computed():
    logratios = torch.tensor([[0.5, -1.0, 0.0]])
    win = torch.tensor([[0.6, 0.3, 0.6]])
    expected = ((0.5 - 0.2) ** 2 + (-1.0 + 0.4) ** 2 + (0.0 - 0.2) ** 2) / 3  # eta = 2
    assert L.sppo_all_loss(logratios, win, 2.0).item() == pytest.approx(expected)


def test_preference_loss_selects_best_and_worst():
    # K = 4: best is index 2 (0.8), worst index 1 (0.1)
    win = torch.tensor([[0.5, 0.1, 0.8, 0.6]])
    P = torch.full((1, 4, 4), 0.5)
    P[0, 2, 1], P[0, 1, 2] = 0.9, 0.1
    used = L.responses_used("sppo", win)
    assert used.tolist() == [[2, 1]]
    logratios = torch.tensor([[0.4, -0.3]])
    got = L.preference_loss("sppo", logratios, P, win, used, eta=1.0, beta=0.1)
    assert got.item() == pytest.approx(0.5 * ((0.4 - 0.3) ** 2 + (-0.3 + 0.4) ** 2))
    got = L.preference_loss("sppo_single", logratios, P, win, used, eta=1.0, beta=0.1)
    assert got.item() == pytest.approx(0.5 * ((0.4 - 0.4) ** 2 + (-0.3 + 0.4) ** 2))
    all_used = L.responses_used("sppo_all", win)
    assert all_used.tolist() == [[0, 1, 2, 3]]
    lr_all = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    got = L.preference_loss("sppo_all", lr_all, P, win, all_used, eta=1.0, beta=0.1)
    assert got.item() == pytest.approx(sum((w - 0.5) ** 2 for w in [0.5, 0.1, 0.8, 0.6]) / 4)
    with pytest.raises(ValueError):
        L.preference_loss("nope", logratios, P, win, used, 1.0, 0.1)


def test_ties_give_best_equal_worst():
    best, worst = L.best_and_worst(torch.tensor([[0.5, 0.5, 0.5], [0.2, 0.9, 0.9]]))
    assert best.tolist() == [0, 1] and worst.tolist() == [0, 0]


def test_gradient_of_sppo_loss_pushes_towards_target():
    """d loss / d logratio = 2 (logratio - target): the winner is pushed up, the loser down."""
    lr = torch.zeros(2, requires_grad=True)
    L.sppo_loss(lr, torch.zeros(2), torch.tensor([0.9, 0.1]), eta=10.0).sum().backward()
    assert lr.grad.tolist() == pytest.approx([-8.0, 8.0])
