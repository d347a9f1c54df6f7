"""Theory lab: SPPO's self-play update on small preference games, no language model.

A game is a preference matrix P over n responses (P[i, j] = P(y_i > y_j), P + P^T = 1).
Theorem 4.1 of the SPPO paper: the multiplicative-weights (MW) update

    pi_{t+1}(y) = pi_t(y) exp(eta P(y > pi_t)) / Z_t

with eta ~ 1/sqrt(T) drives the *average* policy pi_bar_T = mean(pi_0 .. pi_{T-1}) to a von
Neumann winner, duality gap O(1/sqrt T). This script shows it, and what changes when the same
update is *learned* by minimising sppo_loss.py's square loss over a softmax policy, with exact
or sampled win-rate targets, and when it is replaced by pair losses (DPO, IPO, sppo_hard) on the
best and worst of K samples.

Exploitability = max_y P(y > pi) - 1/2 (games.exploitability); the paper's duality gap is twice
it. For the average of the played policies it equals the MW regret divided by T, because
P(pi_t > pi_t) = 1/2 for every t.

Run: python -m theory.lab [--T 2000] [--K 8] [--seeds 8] [--out_dir runs/lab] [--seed 0]
Writes exploitability.png, simplex_rps.png, logz_bias.png, summary.txt, config.json.
"""
import argparse
import json
import time
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from theory.games import exploitability, multiplicative_weights_step, von_neumann_winner  # noqa: E402
from sppo_loss import best_and_worst, preference_loss, sppo_loss, win_rates  # noqa: E402

DTYPE = torch.float64   # the fits are compared to the exact update at 1e-9; float32 can't
PAD = -1e6              # logit of a padding response: probability exactly 0 in float64

# Learned methods. fit_*: sppo_loss over a softmax policy; the rest: pair losses on best/worst.
FITS = ("fit_eta2", "fit_logz", "fit_sampled")
PAIRS = ("sppo_hard", "ipo", "dpo")
METHODS = ("mw",) + FITS + PAIRS
SAMPLED = ("fit_sampled",) + PAIRS
LABELS = {
    "mw": "exact MW (Eq. 4.1)",
    "fit_eta2": "fit, exact targets, log Z = eta/2",
    "fit_logz": "fit, exact targets, true log Z",
    "fit_sampled": "fit, K samples, log Z = eta/2",
    "sppo_hard": "sppo_hard on best/worst",
    "ipo": "IPO on best/worst",
    "dpo": "DPO on best/worst",
}


# ---- games --------------------------------------------------------------------------------


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def make_games(seed: int = 0, n: int = 5) -> dict:
    """Four games: rock-paper-scissors, random intransitive, Bradley-Terry, and a mix of the last two."""
    rng = np.random.default_rng(seed)
    rps = np.array([[0.5, 0.0, 1.0],     # rock loses to paper, beats scissors
                    [1.0, 0.5, 0.0],
                    [0.0, 1.0, 0.5]])
    intransitive = random_intransitive(rng, n)
    # Transitive: scores increase with the index, so the best response starts least likely.
    s = np.linspace(-1.0, 1.0, n)
    transitive = sigmoid(s[:, None] - s[None, :])
    # Mixed: the same ranking, plus a rock-paper-scissors cycle of strength 2 (in logits)
    # among the top three; the bottom two stay dominated, the winner mixes the top three.
    cycle = np.zeros((n, n))
    for a, b in ((n - 3, n - 2), (n - 2, n - 1), (n - 1, n - 3)):   # a beats b
        cycle[a, b], cycle[b, a] = 1.0, -1.0
    mixed = sigmoid(s[:, None] - s[None, :] + 2.0 * cycle)
    return {"rps": rps, "intransitive": intransitive, "transitive": transitive, "mixed": mixed}


def random_intransitive(rng, n: int) -> np.ndarray:
    """Sigmoid of a random skew matrix, redrawn until its von Neumann winner mixes at least three
    responses (a Condorcet winner would make the game effectively transitive)."""
    while True:
        a = np.triu(rng.normal(size=(n, n)), 1)
        P = sigmoid(2.0 * (a - a.T))
        if (von_neumann_winner(P) > 1e-6).sum() >= 3:
            return P


def initial_policy(n: int) -> np.ndarray:
    """Non-uniform start, pi_0(y) proportional to 2^-y: (4/7, 2/7, 1/7) for rock-paper-scissors."""
    pi = 0.5 ** np.arange(n)
    return pi / pi.sum()


def curves(P: np.ndarray, pis: np.ndarray):
    """Exploitability of the last iterate pi_T and of the average mean(pi_0..pi_{T-1}), T = 1..len-1.

    games.exploitability applied to a whole path at once (one einsum instead of T*R calls).

    P: [n, n] or [R, n, n]; pis: [T+1, n] or [T+1, R, n]. Returns two arrays [T] or [T, R].
    """
    P = np.broadcast_to(P, pis.shape[1:-1] + P.shape[-2:])
    avg = np.cumsum(pis[:-1], axis=0) / np.arange(1, len(pis)).reshape((-1,) + (1,) * (pis.ndim - 1))
    expl = lambda x: np.einsum("...ij,t...j->t...i", P, x).max(-1) - 0.5  # noqa: E731
    return expl(pis[1:]), expl(avg)


# ---- exact multiplicative weights -----------------------------------------------------------


def run_mw(P: np.ndarray, pi0: np.ndarray, eta: float, T: int) -> np.ndarray:
    """The exact SPPO update iterated T times: returns pi_0..pi_T, [T+1, n]."""
    pis = np.empty((T + 1, len(pi0)))
    pis[0] = pi0
    for t in range(T):
        pis[t + 1] = multiplicative_weights_step(P, pis[t], eta)
    return pis


# ---- the update learned by minimising a loss over a softmax policy ------------------------


def fit_step(theta_ref, loss_of_logp, precond, lr, steps: int):
    """Preconditioned gradient descent on the logits, started at the reference policy.

    loss_of_logp maps log_softmax(theta) [R, n] to a scalar (a sum over independent rows).
    Each row's loss is a pi_t-weighted sum, so its curvature in logit y is ~ 2 pi_t(y);
    dividing the gradient by `precond` (that curvature) makes the step Newton-like on every
    response however unlikely, i.e. natural-gradient descent. Plain GD is precond = 1.
    """
    theta = theta_ref.clone().requires_grad_(True)
    for _ in range(steps):
        loss = loss_of_logp(torch.log_softmax(theta, dim=-1))
        (grad,) = torch.autograd.grad(loss, theta)
        with torch.no_grad():
            theta -= lr * grad / precond
    return theta.detach()


def run_learned(*args, **kwargs):
    """_run_learned on one thread: the tensors are tiny, a second thread only adds sync cost."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_learned(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


def _run_learned(games: dict, etas, T: int, K: int = 8, seeds: int = 8, seed: int = 0,
                 inner_steps: int = 6, methods=METHODS[1:], pi0s: dict = None):
    """Every learned method on every game and eta, batched as rows of one logit tensor.

    Returns (rows, pis, bias): rows is a list of (game, eta, method, seed); pis [T+1, R, n_max]
    the policies (padding responses have probability 0); bias a dict of per-step diagnostics
    [T, rows] for the fit_eta2 rows: log Z_t - eta/2, Var_{pi_t} P(y > pi_t), the total
    variation between the fitted step and the exact MW step from the same pi_t, and the fitted
    step's effective eta (slope of logratio on win rate, under pi_t) over eta.
    pi0s: optional {game: starting policy}; default initial_policy(n).
    """
    names = list(games)
    n_max = max(P.shape[0] for P in games.values())
    # Rows grouped by family so that each family is a contiguous slice of the logits.
    order = [m for m in ("fit_eta2", "fit_logz", "fit_sampled") + PAIRS if m in methods]
    rows = [(g, eta, m, s) for m in order for g in names for eta in etas
            for s in range(seeds if m in SAMPLED else 1)]
    R = len(rows)
    fam = [r[2] for r in rows]
    n_ex = sum(m in ("fit_eta2", "fit_logz") for m in fam)
    n_sa = fam.count("fit_sampled")
    ex, sa, pr, smp = slice(0, n_ex), slice(n_ex, n_ex + n_sa), slice(n_ex + n_sa, R), slice(n_ex, R)

    P_pad = np.zeros((len(names), n_max, n_max))
    theta0 = np.full((len(names), n_max), PAD)
    for i, g in enumerate(names):
        n = games[g].shape[0]
        P_pad[i, :n, :n] = games[g]    # padding rows/columns are 0: never the max, never sampled
        pi0 = initial_policy(n) if pi0s is None else pi0s[g]
        theta0[i, :n] = np.where(pi0 > 0, np.log(np.maximum(pi0, 1e-300)), PAD)
    gi = torch.tensor([names.index(r[0]) for r in rows])
    P = torch.tensor(P_pad, dtype=DTYPE)[gi]                          # [R, n, n]
    theta = torch.tensor(theta0, dtype=DTYPE)[gi]                     # [R, n]
    eta = torch.tensor([r[1] for r in rows], dtype=DTYPE)[:, None]    # [R, 1]
    mask = lambda m: torch.tensor([f == m for f in fam])[:, None]     # noqa: E731
    is_logz, is_fe = mask("fit_logz")[ex], mask("fit_eta2")[ex, 0]
    beta = 1.0 / eta[pr]   # TRL's coupling beta = 1/eta, used for all three pair losses
    m_hard, m_ipo, m_dpo = (mask(m)[pr].to(DTYPE) for m in PAIRS)
    # Step sizes. The pi_t-weighted square losses get natural-gradient steps of 1 (Newton-like,
    # see fit_step). Pair losses get plain GD: 0.2 is below 2/curvature of the square losses;
    # DPO's curvature in each logit is beta^2/4, so it gets 1/(2 beta^2).
    lr = torch.ones(R, 1, dtype=DTYPE)
    lr[pr] = 0.2 * (1 - m_dpo) + m_dpo / (2 * beta ** 2)
    precond = torch.ones(R, n_max, dtype=DTYPE)
    gen = torch.Generator().manual_seed(seed)
    pis = torch.empty(T + 1, R, n_max, dtype=DTYPE)
    bias = {"logz_minus_eta2": [], "var_w": [], "tv_to_mw": [], "eta_eff_ratio": []}

    for t in range(T + 1):
        logp_ref = torch.log_softmax(theta, dim=-1)   # pads stay at ~PAD
        pi_ref = logp_ref.exp()
        pis[t] = pi_ref
        if t == T:
            break
        parts = []

        if n_ex:   # exact targets: w = P(y > pi_t) for every y, each y weighted by pi_t(y)
            pw, lref_e, eta_e = pi_ref[ex], logp_ref[ex], eta[ex]
            w = (P[ex] @ pw[:, :, None]).squeeze(-1)
            log_z = torch.logsumexp(lref_e + eta_e * w, dim=-1, keepdim=True)
            # Normalised targets eta*w - log Z_t, given to sppo_loss as a shifted win rate.
            w_target = torch.where(is_logz, w - (log_z - eta_e / 2) / eta_e, w)
            precond[ex] = torch.clamp(2 * pw, min=1e-300)
            parts.append(lambda lp: (pw * sppo_loss(lp[ex] - lref_e, w_target, eta_e)).sum())

        if n_ex < R:   # K samples from pi_t; win rates estimated from the K x K sub-matrix
            idx = torch.multinomial(pi_ref[smp], K, replacement=True, generator=gen)   # [S, K]
            ar = torch.arange(R - n_ex)[:, None, None]
            w_hat = win_rates(P[smp][ar, idx[:, :, None], idx[:, None, :]])              # [S, K]
        if n_sa:   # the square loss on the K samples (duplicates count twice)
            i_s, w_s, eta_s = idx[:n_sa], w_hat[:n_sa], eta[sa]
            lref_s = logp_ref[sa].gather(1, i_s)
            q = torch.zeros(n_sa, n_max, dtype=DTYPE).scatter_add_(
                1, i_s, torch.full(i_s.shape, 1.0 / K, dtype=DTYPE))
            precond[sa] = torch.clamp(2 * (q + pi_ref[sa]), min=1e-300)
            parts.append(lambda lp: sppo_loss(lp[sa].gather(1, i_s) - lref_s, w_s, eta_s).mean(-1).sum())
        if n_ex + n_sa < R:   # pair losses on the best and worst of the K by estimated win rate
            best, worst = best_and_worst(w_hat[n_sa:])
            i_p = idx[n_sa:]
            yw, yl = i_p.gather(1, best[:, None])[:, 0], i_p.gather(1, worst[:, None])[:, 0]
            ar_p = torch.arange(R - n_ex - n_sa)
            lw_ref, ll_ref = logp_ref[pr][ar_p, yw], logp_ref[pr][ar_p, yl]
            e = eta[pr, 0]

            def pair_loss(lp):
                logratios = torch.stack([lp[pr][ar_p, yw] - lw_ref, lp[pr][ar_p, yl] - ll_ref], dim=-1)

                def loss(loss_type, eta=None, beta=None):  # the pair losses read no win rates
                    return preference_loss(loss_type, logratios=logratios, win_rate=None, P=None, used=None,
                                           eta=eta, beta=beta)
                return (m_hard[:, 0] * loss("sppo_hard", eta=e) + m_ipo[:, 0] * loss("ipo", beta=beta[:, 0])
                        + m_dpo[:, 0] * loss("dpo", beta=beta[:, 0])).sum()
            parts.append(pair_loss)

        theta = fit_step(theta, lambda lp: sum(f(lp) for f in parts), precond, lr, inner_steps)

        if is_fe.any():   # how far the eta/2 fit lands from the exact MW step from the same pi_t
            p, wf, ef = pw[is_fe], w[is_fe], eta_e[is_fe, 0]
            mw_logp = torch.log_softmax(lref_e[is_fe] + ef[:, None] * wf, dim=-1)
            l_fit = torch.log_softmax(theta[ex][is_fe], dim=-1) - lref_e[is_fe]
            var_w = (p * (wf - 0.5) ** 2).sum(-1)              # E_pi w = 1/2 exactly
            cov = (p * (l_fit - (p * l_fit).sum(-1, keepdim=True)) * (wf - 0.5)).sum(-1)
            bias["logz_minus_eta2"].append((log_z[is_fe, 0] - ef / 2).numpy())
            bias["var_w"].append(var_w.numpy())
            bias["tv_to_mw"].append(0.5 * ((l_fit + lref_e[is_fe]).exp() - mw_logp.exp()).abs().sum(-1).numpy())
            bias["eta_eff_ratio"].append((cov / var_w.clamp(min=1e-300) / ef).numpy())
    bias = {k: np.array(v) for k, v in bias.items()}
    bias["rows"] = [r for r in rows if r[2] == "fit_eta2"]
    return rows, pis.numpy(), bias


# ---- experiment, plots, summary -------------------------------------------------------------


def theorem_points(P, pi0, Ts):
    """Theorem 4.1 as stated: for each horizon T, run MW with eta = 1/sqrt(T), report avg gap."""
    return np.array([curves(P, run_mw(P, pi0, 1 / np.sqrt(T), T))[1][-1] for T in Ts])


def drift_at_winner(games: dict, eta: float, K: int = 8, seeds: int = 2000, seed: int = 0,
                    inner_steps: int = 6) -> dict:
    """One step from the von Neumann winner pi*: does each method leave it in place (in expectation)?

    Returns {(game, method): (spread, s.e.)}: the max minus the min over the support of pi* of
    E[log pi_1(y) - log pi*(y)] / eta, the mean over `seeds` sampling seeds, and a Monte Carlo
    standard error for it (sqrt 2 times the largest per-response s.e.). A common
    shift of log pi is no change at all, so spread 0 means pi* is a rest point. The exact update
    has spread 0 because P(y > pi*) = 1/2 on the support; a hard-label update need not.
    """
    nash = {g: von_neumann_winner(P) for g, P in games.items()}
    rows, pis, _ = run_learned(games, (eta,), 1, K, seeds, seed, inner_steps, pi0s=nash)
    out = {}
    for g, P in games.items():
        n, supp = len(P), nash[g] > 1e-6
        d = np.log(multiplicative_weights_step(P, nash[g], eta)[supp] / nash[g][supp])
        out[g, "mw"] = ((d.max() - d.min()) / eta, 0.0)
        for m in METHODS[1:]:
            ri = [i for i, r in enumerate(rows) if r[0] == g and r[2] == m]
            d = np.log(pis[1][ri][:, :n][:, supp] / pis[0][ri][:, :n][:, supp]) / eta   # [seeds, |supp|]
            se = np.sqrt(2) * d.std(0).max() / np.sqrt(len(d)) if len(d) > 1 else 0.0
            out[g, m] = (np.ptp(d.mean(0)), se)
    return out


def simplex_xy(pi):
    """Barycentric -> 2D: rock at bottom-left, paper bottom-right, scissors on top."""
    corners = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, np.sqrt(3) / 2]])
    return pi @ corners


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--T", type=int, default=2000, help="SPPO iterations")
    ap.add_argument("--K", type=int, default=8, help="responses sampled per iteration")
    ap.add_argument("--seeds", type=int, default=8, help="sampling seeds averaged per sampled method")
    ap.add_argument("--inner_steps", type=int, default=6, help="gradient steps per SPPO iteration")
    ap.add_argument("--drift_seeds", type=int, default=4000, help="seeds for the one-step drift at the winner")
    ap.add_argument("--eta_const", type=float, default=1.0, help="the large constant step size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out_dir", default="runs/lab")
    args = ap.parse_args(argv)
    start = time.time()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    games = make_games(args.seed)
    eta_th = 1 / np.sqrt(args.T)
    etas = (eta_th, args.eta_const)
    nash = {g: von_neumann_winner(P) for g, P in games.items()}
    (out / "config.json").write_text(json.dumps(
        {**vars(args), "etas": etas, "pi0": "proportional to 2^-y",
         "games": {g: P.round(6).tolist() for g, P in games.items()},
         "von_neumann_winner": {g: v.round(6).tolist() for g, v in nash.items()}}, indent=1))

    # Exact MW, and every learned method, for both step sizes.
    res = {}   # (game, eta, method) -> (last [T], avg [T], pis [T+1, n] of seed 0)
    for g, P in games.items():
        for eta in etas:
            pis = run_mw(P, initial_policy(len(P)), eta, args.T)
            res[g, eta, "mw"] = (*curves(P, pis), pis)
            assert abs(res[g, eta, "mw"][0][-1] - exploitability(P, pis[-1])) < 1e-12
    rows, pis_l, bias = run_learned(games, etas, args.T, args.K, args.seeds, args.seed, args.inner_steps)
    for g, P in games.items():
        n = len(P)
        for eta in etas:
            for m in METHODS[1:]:
                ri = [i for i, r in enumerate(rows) if r[:3] == (g, eta, m)]
                last, avg = curves(P, pis_l[:, ri, :n])
                res[g, eta, m] = (last.mean(-1), avg.mean(-1), pis_l[:, ri[0], :n])
    Ts = np.unique(np.geomspace(10, args.T, 8).astype(int))
    thm = {g: theorem_points(P, initial_policy(len(P)), Ts) for g, P in games.items()}

    # Plot 1: exploitability vs T, log-log, one row per eta, one column per game.
    colors = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    t_axis = np.arange(1, args.T + 1)
    fig, axes = plt.subplots(2, len(games), figsize=(4.2 * len(games), 7.5), sharex=True)
    for r, eta in enumerate(etas):
        for c, g in enumerate(games):
            ax = axes[r, c]
            for m in METHODS:   # exact MW wide and pale underneath, the fits dashed on top of it
                last, avg, _ = res[g, eta, m]
                style = dict(lw=4, alpha=0.35) if m == "mw" else dict(lw=1.4, ls="--" if "fit" in m else "-")
                ax.loglog(t_axis, np.maximum(avg, 1e-6), color=colors[m], label=LABELS[m], **style)
                ax.loglog(t_axis, np.maximum(last, 1e-6), color=colors[m], lw=0.6, alpha=0.5, ls=":")
            ax.loglog(t_axis, 0.5 / np.sqrt(t_axis), "k--", lw=1, label="0.5/sqrt(T)")
            if r == 0:
                ax.loglog(Ts, np.maximum(thm[g], 1e-6), "ko", ms=4, label="MW avg, eta=1/sqrt(T) at horizon T")
            ax.set_title(f"{g}, eta = {eta:.3g}" + (" = 1/sqrt(T)" if r == 0 else ""))
            ax.set_ylim(1e-5, 0.7)
            if c == 0:
                ax.set_ylabel("exploitability  max_y P(y > pi) - 1/2")
            if r == 1:
                ax.set_xlabel("T (iterations)")
    axes[0, 0].legend(fontsize=7, loc="lower left")
    fig.suptitle("solid: average policy mean(pi_0..pi_{T-1});  dotted: last iterate pi_T;  "
                 f"sampled methods: K={args.K}, mean over {args.seeds} seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "exploitability.png", dpi=110)
    plt.close(fig)

    # Plot 2: the path on the rock-paper-scissors simplex.
    fig, axes = plt.subplots(1, 2, figsize=(11, 6))
    tri = simplex_xy(np.vstack([np.eye(3), [1, 0, 0]]))
    for ax, eta in zip(axes, etas):
        ax.plot(tri[:, 0], tri[:, 1], "k-", lw=0.8)
        for m, ls in (("mw", "-"), ("fit_sampled", "-"), ("sppo_hard", "-")):
            pis = res["rps", eta, m][2]
            xy = simplex_xy(pis)
            ax.plot(xy[:, 0], xy[:, 1], ls, color=colors[m], lw=0.5, alpha=0.6,
                    label=f"{LABELS[m]}: last iterate" + (" (seed 0)" if m in SAMPLED else ""))
            avg = simplex_xy(np.cumsum(pis[:-1], 0) / t_axis[:, None])
            ax.plot(avg[:, 0], avg[:, 1], color=colors[m], lw=2.2, label=f"{LABELS[m]}: average")
        p0 = simplex_xy(initial_policy(3))
        ax.plot(*p0, "ks", ms=6, label="pi_0")
        ax.plot(*simplex_xy(nash["rps"]), "k*", ms=12, label="von Neumann winner")
        for name, xy in zip("RPS", simplex_xy(np.eye(3))):
            ax.annotate(name, xy, textcoords="offset points", xytext=(-4, -14 if xy[1] < 0.1 else 5))
        ax.set_aspect("equal")
        ax.axis("off")
        ax.set_title(f"rock-paper-scissors, eta = {eta:.3g}, T = {args.T}")
    fig.legend(*axes[0].get_legend_handles_labels(), fontsize=8, loc="lower center", ncol=4)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(out / "simplex_rps.png", dpi=110)
    plt.close(fig)

    # Plot 3: the log Z = eta/2 approximation along the fit_eta2 runs.
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for j, (g, eta, _, _) in enumerate(bias["rows"]):
        ls = "-" if eta == args.eta_const else "--"
        d = bias["logz_minus_eta2"][:, j]
        axes[0].loglog(t_axis, np.maximum(d, 1e-12), ls, lw=1, label=f"{g}, eta={eta:.3g}")
        axes[1].loglog(np.maximum(bias["var_w"][:, j], 1e-12) * eta ** 2 / 2, np.maximum(d, 1e-12),
                       ".", ms=2, label=f"{g}, eta={eta:.3g}")
    x = np.geomspace(1e-12, 0.2, 10)
    axes[1].loglog(x, x, "k--", lw=1, label="y = x")
    axes[0].set(xlabel="T", ylabel="log Z_t - eta/2", title="bias of the eta/2 approximation")
    axes[1].set(xlabel="eta^2 Var_pi(P(y > pi_t)) / 2", ylabel="log Z_t - eta/2",
                title="second-order prediction")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "logz_bias.png", dpi=110)
    plt.close(fig)

    # Summary table.
    lines = [f"SPPO theory lab: T={args.T}, K={args.K}, {args.seeds} seeds for sampled methods, "
             f"pi_0 ~ 2^-y, seed={args.seed}",
             "von Neumann winners: " + "; ".join(
                 f"{g} ({np.count_nonzero(v > 1e-6)}/{len(v)} in support, max {v.max():.2f})"
                 for g, v in nash.items())]
    for eta in etas:
        lines += ["", f"exploitability at T={args.T}, last iterate / average, eta = {eta:.4g}"
                  + (" = 1/sqrt(T)" if eta == eta_th else ""),
                  f"{'method':34s}" + "".join(f"{g:>17s}" for g in games)]
        for m in METHODS:
            lines.append(f"{LABELS[m]:34s}" + "".join(
                f"{res[g, eta, m][0][-1]:8.4f} /{res[g, eta, m][1][-1]:7.4f}" for g in games))
    drift = drift_at_winner(games, eta_th, args.K, args.drift_seeds, args.seed, args.inner_steps)
    mixed_games = [g for g in games if np.count_nonzero(nash[g] > 1e-6) > 1]
    se = max(v[1] for v in drift.values())
    lines += ["", f"one step from the von Neumann winner pi*, eta = {eta_th:.4g}: spread over its support of "
              f"E[d log pi(y)]/eta", f"(0 = pi* is a rest point; {args.drift_seeds} seeds, MC s.e. <= {se:.3f})",
              f"{'method':34s}" + "".join(f"{g:>17s}" for g in mixed_games)]
    for m in METHODS:
        lines.append(f"{LABELS[m]:34s}" + "".join(f"{drift[g, m][0]:17.3f}" for g in mixed_games))
    dev = {eta: max(np.abs(res[g, eta, "fit_logz"][2] - res[g, eta, "mw"][2]).max() for g in games)
           for eta in etas}
    lines += ["", "fit with true log Z vs exact MW, max |pi_fit - pi_mw| over the whole path: "
              + ", ".join(f"{dev[eta]:.1e} (eta={eta:.3g})" for eta in etas)]
    for eta in etas:
        cols = [j for j, r in enumerate(bias["rows"]) if r[1] == eta]
        d, tv = bias["logz_minus_eta2"][:, cols], bias["tv_to_mw"][:, cols]
        ratio = bias["eta_eff_ratio"][:, cols]
        lines.append(f"log Z_t - eta/2 at eta={eta:.3g}: max {d.max():.2e} (bound eta^2/8 = {eta**2/8:.2e}),"
                     f" per-step TV(fit_eta2, MW) max {tv.max():.1e}, eta_eff/eta min {np.nanmin(ratio):.4f}")
    lines.append(f"wrote {out}/exploitability.png, simplex_rps.png, logz_bias.png, summary.txt, "
                 f"config.json in {time.time() - start:.1f} s")
    text = "\n".join(lines)
    (out / "summary.txt").write_text(text + "\n")
    print(text)
    return res, bias, drift


if __name__ == "__main__":
    main()
