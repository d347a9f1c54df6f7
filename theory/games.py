"""Finite preference games: the von Neumann winner, exploitability, the exact SPPO step and its successors.

A game is a preference matrix P over n responses, P[i, j] = P(y_i > y_j), P + P^T = 1.
A policy is a probability vector pi over the n responses. Used by the toy world's exact
evaluator and by the theory lab (theory.lab, theory.successors); numpy in, numpy out.
"""
import numpy as np


def win_rate(P: np.ndarray, pi: np.ndarray, mu: np.ndarray) -> float:
    """P(pi > mu) = sum_ij pi_i mu_j P[i, j]."""
    return float(pi @ P @ mu)


def exploitability(P: np.ndarray, pi: np.ndarray) -> float:
    """max_y P(y > pi) - 1/2: zero exactly at a von Neumann winner, at most 1/2."""
    return float(np.max(P @ pi) - 0.5)


def von_neumann_winner(P: np.ndarray) -> np.ndarray:
    """A policy no response beats: argmin_pi max_y P(y > pi), by linear programming.

    Variables (pi_1..pi_n, t): minimise t subject to P pi <= t, sum pi = 1, pi >= 0.
    The game is symmetric and constant-sum, so the optimum is t = 1/2.
    """
    from scipy.optimize import linprog  # here: the toy evaluator never needs it, and scipy is slow to import
    n = P.shape[0]
    cost = np.zeros(n + 1)
    cost[-1] = 1.0
    a_ub = np.hstack([P, -np.ones((n, 1))])
    a_eq = np.hstack([np.ones((1, n)), np.zeros((1, 1))])
    res = linprog(cost, A_ub=a_ub, b_ub=np.zeros(n), A_eq=a_eq, b_eq=[1.0],
                  bounds=[(0, None)] * n + [(None, None)], method="highs")
    if not res.success:
        raise RuntimeError(f"von Neumann winner LP failed: {res.message}")
    pi = np.clip(res.x[:n], 0.0, None)
    return pi / pi.sum()


def multiplicative_weights_step(P: np.ndarray, pi: np.ndarray, eta: float) -> np.ndarray:
    """The exact SPPO update (paper Eq. 4.1): pi' proportional to pi * exp(eta * P(y > pi))."""
    logits = np.log(np.clip(pi, 1e-300, None)) + eta * (P @ pi)
    logits -= logits.max()
    new = np.exp(logits)
    return new / new.sum()


# ---- SPPO's successors: exact steps that aim at the last iterate ----------------------------------
# Each takes log-space care as multiplicative_weights_step does; pi's zeros stay zeros.


def _normalised(logits: np.ndarray) -> np.ndarray:
    logits = logits - logits.max()
    new = np.exp(logits)
    return new / new.sum()


def _log(pi: np.ndarray) -> np.ndarray:
    return np.log(np.clip(pi, 1e-300, None))


def magnetic_step(P: np.ndarray, pi: np.ndarray, eta: float, tau: float, magnet: np.ndarray) -> np.ndarray:
    """MW regularised toward a magnet mu with strength tau (magnetic mirror descent, Sokota et al. 2022,
    arXiv 2206.05825, the MMD update with entropy mirror map; MPO, arXiv 2410.16714, takes this step):
    argmax_p eta [P(p > pi) - tau KL(p, mu)] - KL(p, pi), i.e.
    pi' proportional to (pi * mu^(eta tau) * exp(eta P(y > pi)))^(1 / (1 + eta tau)). tau = 0 is the SPPO step."""
    return _normalised((_log(pi) + eta * tau * _log(magnet) + eta * (P @ pi)) / (1.0 + eta * tau))


def optimistic_step(P: np.ndarray, pi: np.ndarray, pi_prev: np.ndarray, eta: float) -> np.ndarray:
    """Optimistic MW (OMWU; Daskalakis & Panageas 2019, arXiv 1807.04252, their OMWU update): the
    gradient of this step extrapolated by the last change, pi' proportional to
    pi * exp(eta (2 P(y > pi) - P(y > pi_prev))): the step ONPO (optimistic online mirror descent for
    NLHF) builds on."""
    return _normalised(_log(pi) + eta * (2.0 * (P @ pi) - P @ pi_prev))


def extragradient_step(P: np.ndarray, pi: np.ndarray, eta: float) -> np.ndarray:
    """Extragradient MW (mirror prox, Nemirovski 2004; the step EGPO builds on): a look-ahead MW step
    pi_half = MW(pi), then the MW step from pi with the gradient at pi_half:
    pi' proportional to pi * exp(eta P(y > pi_half))."""
    half = multiplicative_weights_step(P, pi, eta)
    return _normalised(_log(pi) + eta * (P @ half))


def nash_md_step(P: np.ndarray, pi: np.ndarray, eta: float, tau: float, mu: np.ndarray) -> np.ndarray:
    """Nash-MD (Munos et al. 2023, arXiv 2312.00886, the Nash-MD update): the MW step taken from, and
    against, the geometric mixture pi_mu proportional to pi^(1 - eta tau) mu^(eta tau):
    pi' proportional to pi_mu * exp(eta P(y > pi_mu)). Needs eta tau <= 1."""
    mix = _normalised((1.0 - eta * tau) * _log(pi) + eta * tau * _log(mu))
    return _normalised(_log(mix) + eta * (P @ mix))


def regularised_exploitability(P: np.ndarray, pi: np.ndarray, tau: float, mu: np.ndarray) -> float:
    """The duality gap of the tau-regularised game, max_p [P(p > pi) - tau KL(p, mu)] + tau KL(pi, mu) - 1/2,
    >= 0 and zero only at its equilibrium; the max is tau log sum_y mu(y) exp(P(y > pi) / tau)."""
    support = pi > 0
    kl = float(np.sum(pi[support] * (np.log(pi[support]) - _log(mu)[support])))
    z = (P @ pi) / tau + _log(mu)
    return float(tau * (z.max() + np.log(np.sum(np.exp(z - z.max())))) + tau * kl - 0.5)
