"""The math of SPPO (Wu et al. 2024, arXiv 2405.00675 v5, section 4), as pure tensor functions.

Notation. For a prompt x the policy pi_t draws K responses y_1..y_K. A judge gives
P[i, j] = P(y_i > y_j | x). The SPPO update (Eq. 4.1) is the multiplicative-weights step

    pi_{t+1}(y|x) = pi_t(y|x) * exp(eta * P(y > pi_t | x)) / Z_t(x)

and SPPO fits it by square loss (Eq. 4.4), replacing log Z_t(x) by eta/2 (Eq. 4.6), the value
it takes when E_{y~pi_t} P(y > pi_t) = 1/2 is used for the whole exponent (section 4.2):

    loss(y) = (log pi_theta(y|x) - log pi_t(y|x) - eta * (P(y > pi_t|x) - 1/2)) ** 2

A "logratio" below is always log pi_theta(y|x) - log pi_t(y|x), each term summed over the
response tokens. Shapes: B prompts, K responses per prompt. Nothing here reduces over the batch:
the caller decides how to average.
"""
import torch
import torch.nn.functional as F


def prob_matrix_from_scores(scores: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry view of per-response scores: [..., K] -> [..., K, K].

    P[..., i, j] = sigmoid(s_i - s_j); the diagonal is exactly 0.5 and P + P^T = 1.
    This is how the official code turns PairRM's aggregated scores into probabilities.
    """
    return torch.sigmoid(scores.unsqueeze(-1) - scores.unsqueeze(-2))


def win_rates(P: torch.Tensor) -> torch.Tensor:
    """Estimate of P(y_i > pi_t | x) from K samples of pi_t: [..., K, K] -> [..., K].

    The row mean (1/K) sum_k P(y_i > y_k), the self term P[i, i] = 1/2 included (Eq. 4.5):
    every y_k is a draw from pi_t, including y_i itself.
    """
    return P.mean(dim=-1)


def sppo_target(win_rate: torch.Tensor, eta: float) -> torch.Tensor:
    """The logratio SPPO fits to (Eq. 4.6), elementwise: eta * (P(y > pi_t | x) - 1/2).

    Eq. 4.1's log pi_{t+1}/pi_t = eta * P(y > pi_t | x) - log Z_t(x), with log Z_t = eta/2.
    """
    return eta * (win_rate - 0.5)


def sppo_loss(logratio: torch.Tensor, win_rate: torch.Tensor, eta: float) -> torch.Tensor:
    """Square-loss fit of the multiplicative-weights update (Eq. 4.6), elementwise.

    logratio = log pi_theta(y|x) - log pi_t(y|x) and win_rate = P(y > pi_t | x), same shape,
    e.g. [B] or [B, K]; returns that shape: (logratio - eta * (win_rate - 1/2))^2.
    """
    return (logratio - sppo_target(win_rate, eta)) ** 2


def best_and_worst(win_rate: torch.Tensor):
    """Indices of the best and worst of K by win rate: [B, K] -> ([B], [B]).

    Ties go to the lowest index (torch.argmax/argmin), so when all K win rates are equal
    best == worst, as in the official code; the square loss then pulls that logratio to 0.
    """
    return win_rate.argmax(dim=-1), win_rate.argmin(dim=-1)


def magnet_target(win_rate, magnet_gap, eta: float, tau: float):
    """`magnet`: the logratio the step toward the magnet pi_0 fits to, over the K samples: [B, K] -> [B, K].

    win_rate = P(y_k > pi_t | x); magnet_gap = d(y_k) = log pi_t(y_k|x) - log pi_0(y_k|x). The step is
    multiplicative weights regularised toward the magnet with strength tau (magnetic mirror descent,
    Sokota et al. 2022, arXiv 2206.05825, its update with magnet rho = pi_0; the step of MPO, Wang et al.
    2024, arXiv 2410.16714, with its magnet held at pi_0):

        log pi_{t+1}(y) = [log pi_t(y) + eta tau log pi_0(y) + eta P(y > pi_t)] / (1 + eta tau) - log Z_t,

    i.e. log pi_{t+1}(y) - log pi_t(y) = c (P(y > pi_t) - tau d(y)) - log Z_t with c = eta / (1 + eta tau).
    log Z_t is replaced by its first-order value, the mean of the exponent over the K samples of pi_t,
    c (1/2 - tau mean_k d(y_k)), as Eq. 4.6's eta/2 is the mean of eta P(y_k > pi_t) (the K win rates
    average exactly 1/2). Target: c ((P(y > pi_t) - 1/2) - tau (d(y) - mean_k d(y_k))); tau = 0 is `sppo_all`'s.
    """
    c = eta / (1.0 + eta * tau)
    return c * ((win_rate - 0.5) - tau * (magnet_gap - magnet_gap.mean(dim=-1, keepdim=True)))


def responses_used(loss_type: str, win_rate: torch.Tensor) -> torch.Tensor:
    """Which of the K responses a loss type trains on: [B, K] -> [B, R] indices.

    R = K for `sppo_all` and `magnet`; otherwise R = 2, (best, worst): Algorithm 1's y_w and y_l.
    """
    if loss_type in ("sppo_all", "magnet"):
        return torch.arange(win_rate.shape[-1]).expand(win_rate.shape)
    best, worst = best_and_worst(win_rate)
    return torch.stack([best, worst], dim=-1)


# ---- the loss of each --loss_type: Eq. 4.6 and the baselines --------------------------------------


def preference_loss(loss_type: str, *, logratios, win_rate, P, used, eta, beta, tau=0.0, magnet_gap=None):
    """Per-prompt loss of a loss type: [B].

    logratios: [B, R] log pi_theta(y|x) - log pi_t(y|x) of the responses `used` ([B, R] indices
    into K, from `responses_used`: y_w and y_l for the pair losses, all K for `sppo_all`);
    win_rate: [B, K]; P: [B, K, K]. eta is SPPO's step size, beta DPO's and IPO's; `magnet` also takes
    tau and magnet_gap [B, K] = log pi_t(y|x) - log pi_0(y|x). A loss type reads only what it needs.
    """
    if loss_type == "sppo_all":  # Eq. 4.6 on every one of the K samples, averaged: the expectation over pi_t
        return sppo_loss(logratios, win_rate.gather(-1, used), eta).mean(dim=-1)
    if loss_type == "magnet":  # the step regularised toward pi_0 (magnet_target: MMD / MPO), on every sample
        return ((logratios - magnet_target(win_rate.gather(-1, used), magnet_gap, eta, tau)) ** 2).mean(dim=-1)
    logratio_w, logratio_l = logratios[:, 0], logratios[:, 1]
    if loss_type == "sppo":  # Eq. 4.6 on y_w and on y_l, averaged: the official trainer's loss
        win_w, win_l = win_rate.gather(-1, used).unbind(-1)
        return 0.5 * (sppo_loss(logratio_w, win_w, eta) + sppo_loss(logratio_l, win_l, eta))
    if loss_type == "sppo_single":  # Eq. 4.6 with pi_t reduced to the pair: win rates P(y_w > y_l), P(y_l > y_w)
        p_wl = P[torch.arange(len(P), device=P.device), used[:, 0], used[:, 1]]
        return 0.5 * (sppo_loss(logratio_w, p_wl, eta) + sppo_loss(logratio_l, 1.0 - p_wl, eta))
    if loss_type == "sppo_hard":  # Eq. 4.6 with hard labels P(y_w > y_l) = 1, the terms summed: TRL's
        return sppo_loss(logratio_w, 1.0, eta) + sppo_loss(logratio_l, 0.0, eta)  # sppo_hard, its beta = 1/eta
    if loss_type == "dpo":  # DPO (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7)
        return -F.logsigmoid(beta * (logratio_w - logratio_l))
    if loss_type == "ipo":  # IPO (Azar et al. 2023, arXiv 2310.12036): the difference pulled to 1/(2 beta)
        return (logratio_w - logratio_l - 0.5 / beta) ** 2
    raise ValueError(f"unknown loss_type {loss_type!r}")


@torch.no_grad()
def preference_stats(loss_type: str, *, logratios, win_rate, P, used, eta, tau=0.0, magnet_gap=None):
    """What a loss type pulls the trained responses towards, for the log (no gradient).

    Arguments as preference_loss's. Returns a dict of [B] tensors about the chosen and rejected
    response: y_w and y_l for the pair losses, the best and worst of the K by win rate for
    `sppo_all` and `magnet` (ties to the lowest index: with all win rates equal, one response twice):
      logratio_chosen, logratio_rejected  their logratios;
      target_chosen, target_rejected      the logratio each one's loss term is smallest at,
                                          eta * (p - 1/2) (Eq. 4.6), p = its win rate (`sppo`,
                                          `sppo_all`), P(y_w > y_l) for y_w and 1 - P(y_w > y_l)
                                          for y_l (`sppo_single`), 1 and 0 (`sppo_hard`), magnet_target's
                                          (`magnet`); NaN for
                                          `dpo` and `ipo`: they set only the difference of the two
                                          (ipo pulls it to 1/(2 beta), dpo pushes it up unbounded);
      preferred                           1 if the chosen has the higher win rate, 0 for a tie;
      ordered                             1 if preferred and its logratio is the higher too.
    """
    rows = torch.arange(logratios.shape[0], device=logratios.device)
    wins = win_rate.gather(-1, used)  # [B, R]: P(y > pi_t | x) of the trained responses
    if loss_type in ("sppo_all", "magnet"):
        chosen, rejected = best_and_worst(wins)  # positions in R (here R = K)
    else:  # (y_w, y_l) = (best, worst): positions 0 and 1
        chosen, rejected = torch.zeros_like(rows), torch.ones_like(rows)
    if loss_type in ("sppo", "sppo_all"):
        targets = sppo_target(wins, eta)
    elif loss_type == "sppo_single":
        p_wl = P[rows, used[:, 0], used[:, 1]]
        targets = sppo_target(torch.stack([p_wl, 1.0 - p_wl], dim=-1), eta)
    elif loss_type == "sppo_hard":
        targets = sppo_target(wins.new_tensor([1.0, 0.0]).expand_as(wins), eta)
    elif loss_type == "magnet":
        targets = magnet_target(wins, magnet_gap, eta, tau)
    else:  # dpo, ipo
        targets = torch.full_like(logratios, float("nan"))
    preferred = wins[rows, chosen] > wins[rows, rejected]
    logratio_chosen, logratio_rejected = logratios[rows, chosen], logratios[rows, rejected]
    return {"logratio_chosen": logratio_chosen, "logratio_rejected": logratio_rejected,
            "target_chosen": targets[rows, chosen], "target_rejected": targets[rows, rejected],
            "preferred": preferred, "ordered": preferred & (logratio_chosen > logratio_rejected)}
