"""Finite preference games: the von Neumann winner, exploitability, the exact SPPO step.

A game is a preference matrix P over n responses, P[i, j] = P(y_i > y_j), P + P^T = 1.
A policy is a probability vector pi over the n responses. Used by the toy world's exact
evaluator and by the theory lab; numpy in, numpy out.
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
