"""SPPO's successors in the lab (theory/games.py's steps, theory/successors.py) against hand
computations and independently computed fixed points."""
import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import logsumexp

from theory import successors as S
from theory.games import (exploitability, extragradient_step, magnetic_step, multiplicative_weights_step, nash_md_step,
                          optimistic_step, regularised_exploitability, von_neumann_winner)

GAMES = S.successor_games(0)
RPS = GAMES["rps"][0]
PI = np.array([0.5, 0.25, 0.25])  # P(y > PI) on rock-paper-scissors = (1/2, 5/8, 3/8)
LN2 = np.log(2.0)


def normalised(x):
    x = np.asarray(x, dtype=float)
    return x / x.sum()


def test_steps_by_hand_on_rock_paper_scissors():
    assert np.allclose(RPS @ PI, [0.5, 0.625, 0.375])
    # MW, eta = 8 ln 2: PI * 2^(8 P(y > PI)) = (8, 8, 2)
    assert np.allclose(multiplicative_weights_step(RPS, PI, 8 * LN2), normalised([4, 4, 1]), atol=1e-14)
    # magnet mu = (1/4, 1/4, 1/2), eta tau = 1: sqrt(PI * mu * 2^(8 P(y > PI))) = sqrt(2, 2, 1)
    mu = np.array([0.25, 0.25, 0.5])
    got = magnetic_step(RPS, PI, 8 * LN2, 1 / (8 * LN2), mu)
    assert np.allclose(got, normalised(np.sqrt([2, 2, 1])), atol=1e-14)
    # tau = 0: the SPPO step
    assert np.allclose(magnetic_step(RPS, PI, 0.7, 0.0, mu), multiplicative_weights_step(RPS, PI, 0.7), atol=1e-15)
    # optimistic, previous = uniform (P(y > uniform) = 1/2): 2 (1/2, 5/8, 3/8) - 1/2 = (1/2, 3/4, 1/4);
    # eta = 4 ln 2: PI * (4, 8, 2) = (2, 2, 1/2)
    got = optimistic_step(RPS, PI, np.full(3, 1 / 3), 4 * LN2)
    assert np.allclose(got, normalised([4, 4, 1]), atol=1e-14)
    # extragradient, eta = 8 ln 2: look-ahead (4, 4, 1)/9, P(y > it) = (1/3, 2/3, 1/2);
    # PI * 2^(8 (1/3, 2/3, 1/2)) = (2^(5/3), 2^(10/3), 2^2)
    got = extragradient_step(RPS, PI, 8 * LN2)
    assert np.allclose(got, normalised([2 ** (5 / 3), 2 ** (10 / 3), 4.0]), atol=1e-14)
    # Nash-MD, eta = 1, tau = 1/2: mixture sqrt(PI * mu) = (a, 1/4, a) with a = 1/(2 sqrt 2); then MW from it
    a = 1 / (2 * np.sqrt(2))
    s = 2 * a + 0.25
    mix = np.array([a, 0.25, a]) / s
    wins = np.array([1.5 * a, a + 0.125, 0.25 + 0.5 * a]) / s   # (m0/2 + m2, m0 + m1/2, m1 + m2/2)
    got = nash_md_step(RPS, PI, 1.0, 0.5, mu)
    assert np.allclose(got, normalised(mix * np.exp(wins)), atol=1e-14)


def regularised_winner_slsqp(P, tau, mu):
    """pi*_tau by SLSQP on the simplex itself (pi as the variables, sum pi = 1 a constraint), minimising
    the regularised duality gap written here from its definition: another algorithm, other code."""
    def gap(pi):
        pi = np.clip(pi, 1e-300, None)
        return tau * logsumexp(np.log(mu) + P @ pi / tau) + tau * np.sum(pi * np.log(pi / mu)) - 0.5

    def grad(pi):
        pi = np.clip(pi, 1e-300, None)
        z = np.log(mu) + P @ pi / tau
        return P.T @ np.exp(z - logsumexp(z)) + tau * (np.log(pi / mu) + 1)
    sol = minimize(gap, mu, jac=grad, method="SLSQP", bounds=[(1e-12, 1.0)] * len(mu), options={"ftol": 1e-16},
                   constraints=[{"type": "eq", "fun": lambda p: p.sum() - 1, "jac": lambda p: np.ones_like(p)}])
    return normalised(sol.x)


@pytest.mark.parametrize("game", ["rps", "toy_cyclic", "toy_transitive", "intransitive5", "mixed"])
@pytest.mark.parametrize("tau", [0.03, 0.3])
def test_regularised_winner_three_ways(game, tau):
    """The magnet step's last iterate, regularised_winner and SLSQP on the simplex agree on pi*_tau,
    a fixed point of the smoothed best response; its regularised gap is 0, the winner's is not."""
    P, pi0 = GAMES[game]
    by_slsqp = regularised_winner_slsqp(P, tau, pi0)
    by_gap = S.regularised_winner(P, tau, pi0)
    by_steps = S.run("magnet", P, pi0, 0.5, 4000, tau)[-1]
    assert np.abs(by_gap - by_slsqp).max() < 1e-7                                       # measured <= 5e-10
    assert np.abs(by_steps - by_slsqp).max() < 1e-7
    assert np.abs(by_slsqp - normalised(pi0 * np.exp(P @ by_slsqp / tau))).max() < 1e-7
    assert abs(regularised_exploitability(P, by_slsqp, tau, pi0)) < 1e-10
    assert regularised_exploitability(P, von_neumann_winner(P), tau, pi0) > 1e-5   # a different point (min 4.8e-5)
    assert exploitability(P, by_slsqp) > exploitability(P, S.regularised_winner(P, tau / 10, pi0))  # nearer as tau falls


@pytest.mark.parametrize("game", ["rps", "toy_cyclic", "intransitive5", "mixed"])
def test_last_iterate_fixed_points(game):
    """What each paper claims for the last iterate, at eta = 0.5 (tau = 0.1, magnet pi_0):
    MPO's moving magnet, optimistic and extragradient MW reach the von Neumann winner (LP); the fixed
    magnet reaches pi*_tau; Nash-MD with a constant step rests O(eta) from pi*_tau; SPPO's MW does not settle."""
    P, pi0 = GAMES[game]
    winner, reg = von_neumann_winner(P), regularised_winner_slsqp(P, 0.1, pi0)
    tv = S.total_variation
    assert tv(S.run("mpo", P, pi0, 0.5, 3000, 0.1, 100)[-1], winner) < 1e-3            # measured <= 2.6e-4
    for m in ("optimistic", "extragradient"):
        assert tv(S.run(m, P, pi0, 1.0, 3000)[-1], winner) < 2e-3, m                   # measured <= 8e-4
    assert tv(S.run("magnet", P, pi0, 0.5, 3000, 0.1)[-1], reg) < 1e-6
    # Nash-MD: a fixed point, at a distance from pi*_tau proportional to eta
    dist = []
    for eta in (0.4, 0.2):
        pis = S.run("nash_md", P, pi0, eta, 6000, 0.1)
        assert np.abs(pis[-1] - pis[-2]).max() < 1e-12
        dist.append(tv(pis[-1], reg))
    assert 1e-5 < dist[1] < dist[0] and 1.8 < dist[0] / dist[1] < 2.2                  # measured 2.0
    # SPPO's MW at the same step: the last iterate keeps moving, far from the winner, while its average converges
    last, avg = S.curves(P, S.run("mw", P, pi0, 0.5, 3000))
    if game != "intransitive5":   # there MW's last iterate happens to settle (measured exploitability 0.006)
        assert last[-500:].max() > 0.05 and avg[-1] < last[-500:].max() / 2


def test_main_writes_the_figures_and_the_recomputed_numbers(tmp_path, capsys):
    """python -m theory.successors: its figures, and its table's rps cells against a recomputation here
    (MW's path from the closed form pi_T ~ pi_0 exp(eta sum_t P pi_t); pi*_tau by SLSQP)."""
    S.main(["--T", "30", "--etas", "0.5", "--taus", "0.3", "--tau", "0.3", "--toy_T", "2", "--out_dir", str(tmp_path)])
    text = (tmp_path / "summary.txt").read_text()
    assert capsys.readouterr().out == text
    lines = text.splitlines()
    P, pi0 = GAMES["rps"]
    reg_row = next(line for line in lines if line.startswith("rps "))
    assert float(reg_row.split()[1]) == pytest.approx(exploitability(P, regularised_winner_slsqp(P, 0.3, pi0)), abs=1e-4)
    pis, played = [pi0], np.zeros(3)
    for _ in range(30):
        played += P @ pis[-1]
        pis.append(normalised(pi0 * np.exp(0.5 * played)))
    mw_row = next(line for line in lines if line.startswith("MW (SPPO)") and "/" in line)
    last, avg = (float(x) for x in mw_row[18:].split()[0].split("/"))
    assert [last, avg] == pytest.approx([exploitability(P, pis[-1]), exploitability(P, np.mean(pis[:-1], 0))], abs=1e-4)
    for name in ("successors.png", "regularised_winner.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
