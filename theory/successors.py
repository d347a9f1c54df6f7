"""The last iterate: SPPO's exact step against the steps published since, on games solved exactly.

SPPO's Theorem 4.1 is about the average of its iterates; the last one, which users keep, can
circle an intransitive game's von Neumann winner for ever (theory/lab.py shows it on
rock-paper-scissors). The successors change the step so that the last iterate converges:

    mw             SPPO, Eq. 4.1: pi' ~ pi exp(eta P(y > pi))                       (games.multiplicative_weights_step)
    magnet         MW regularised toward a fixed magnet mu = pi_0 with strength tau (games.magnetic_step):
                   converges to the regularised winner pi*_tau, not to the winner
    mpo            the same step, its magnet moved to the current iterate every `period` steps (MPO,
                   arXiv 2410.16714): a proximal-point outer loop whose limit is a von Neumann winner
    optimistic     OMWU, pi' ~ pi exp(eta (2 P(y > pi) - P(y > pi_prev)))              (games.optimistic_step)
    extragradient  mirror prox: the MW step with the gradient at a look-ahead MW step  (games.extragradient_step)
    nash_md        Nash-MD: the MW step from and against pi^(1 - eta tau) mu^(eta tau) (games.nash_md_step)

pi*_tau is the equilibrium of the game P(pi > pi') - tau KL(pi, mu) + tau KL(pi', mu), the fixed
point of pi ~ mu exp(P(y > pi) / tau); regularised_winner computes it by minimising that game's
duality gap with scipy, a different algorithm from every step above.

Run: python -m theory.successors [--T 2000] [--tau 0.1] [--period 100] [--out_dir runs/successors]
Writes successors.png (exploitability of the last iterate and of the average against the
iteration, per game and step size), regularised_winner.png (pi*_tau's exploitability against
tau), summary.txt and config.json.
"""
import argparse
import json
import time
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from theory.games import (exploitability, extragradient_step, magnetic_step, multiplicative_weights_step,  # noqa: E402
                          nash_md_step, optimistic_step, regularised_exploitability, von_neumann_winner)
from theory.lab import curves, initial_policy, make_games, random_intransitive  # noqa: E402

METHODS = ("mw", "magnet", "mpo", "optimistic", "extragradient", "nash_md")
LABELS = {"mw": "MW (SPPO)", "magnet": "magnet pi_0 (MMD)", "mpo": "MPO (magnet moved)",
          "optimistic": "optimistic MW", "extragradient": "extragradient MW", "nash_md": "Nash-MD"}
REGULARISED = ("magnet", "nash_md")  # converge (at best) to pi*_tau, not to the winner


# ---- games and starting points --------------------------------------------------------------


def successor_games(seed: int = 0) -> dict:
    """{name: (P, pi_0)}: rock-paper-scissors, the toy world's cyclic and transitive families (with
    invalid answers, pi_0 its base policy with 2% invalid mass, as the built world measures), the
    lab's mixed game and random intransitive games of 3, 5 and 10 responses."""
    from worlds.toy import BASE_POLICY, family_matrix
    lab = make_games(seed)
    toy_pi0 = np.append(0.98 * np.array(BASE_POLICY), 0.02)
    out = {"rps": (lab["rps"], initial_policy(3)),
           "toy_cyclic": (family_matrix("cyclic"), toy_pi0), "toy_transitive": (family_matrix("transitive"), toy_pi0),
           "mixed": (lab["mixed"], initial_policy(5))}
    rng = np.random.default_rng(seed + 1)
    for n in (3, 5, 10):
        out[f"intransitive{n}"] = (random_intransitive(rng, n), initial_policy(n))
    return out


# ---- the runs ---------------------------------------------------------------------------------


def run(method: str, P: np.ndarray, pi0: np.ndarray, eta: float, T: int, tau: float = 0.1, period: int = 100):
    """pi_0 .. pi_T of one method, [T+1, n]; the magnet (and Nash-MD's mu) is pi_0."""
    pis = np.empty((T + 1, len(pi0)))
    pis[0] = magnet = pi0
    for t in range(T):
        pi = pis[t]
        if method == "mw":
            pis[t + 1] = multiplicative_weights_step(P, pi, eta)
        elif method in ("magnet", "mpo"):
            if method == "mpo" and t > 0 and t % period == 0:
                magnet = pi  # MPO: the magnet moves to the current iterate
            pis[t + 1] = magnetic_step(P, pi, eta, tau, magnet)
        elif method == "optimistic":
            pis[t + 1] = optimistic_step(P, pi, pis[max(t - 1, 0)], eta)  # the first step is plain MW
        elif method == "extragradient":
            pis[t + 1] = extragradient_step(P, pi, eta)
        elif method == "nash_md":
            pis[t + 1] = nash_md_step(P, pi, eta, tau, pi0)
        else:
            raise ValueError(f"unknown method {method!r}")
    return pis


def regularised_winner(P: np.ndarray, tau: float, mu: np.ndarray) -> np.ndarray:
    """pi*_tau: the minimiser of the regularised game's duality gap (games.regularised_exploitability),
    convex in pi, found by L-BFGS over softmax logits started at mu (pi*_tau has mu's support).
    The gap's gradient in pi is P^T q + tau (log pi - log mu + 1), q the regularised best response
    proportional to mu exp(P pi / tau); through the softmax, pi * (g - pi.g)."""
    from scipy.optimize import minimize
    from scipy.special import softmax
    support = mu > 0
    Ps, log_mu = P[np.ix_(support, support)], np.log(mu[support])

    def gap_and_grad(logits):
        pi = softmax(logits)
        q = softmax(Ps @ pi / tau + log_mu)
        g = Ps.T @ q + tau * (np.log(pi) - log_mu + 1.0)
        return regularised_exploitability(Ps, pi, tau, np.exp(log_mu)), pi * (g - pi @ g)
    logits = log_mu
    for tau in np.geomspace(max(tau, 1.0), tau, 1 + max(0, int(np.ceil(np.log10(1.0 / tau) * 4)))):
        # down from tau = 1 in steps of 10^(1/4), each started at the last one's solution: a small tau
        # started at mu alone can stall
        logits = minimize(gap_and_grad, logits, jac=True, method="L-BFGS-B",
                          options={"ftol": 1e-16, "gtol": 1e-13, "maxiter": 10000}).x
    # finished by one smoothed best response: the gap hardly sees a tiny probability's relative error,
    # the best response gives it back (pi*_tau is its fixed point)
    z = Ps @ softmax(logits) / tau + log_mu
    pi = np.zeros(len(mu))
    pi[support] = softmax(z)
    return pi


def total_variation(p, q) -> float:
    return 0.5 * float(np.abs(p - q).sum())


# ---- the experiment ---------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--T", type=int, default=2000, help="iterations")
    ap.add_argument("--etas", default="0.1,0.5,2", help="step sizes, comma-separated")
    ap.add_argument("--tau", type=float, default=0.1, help="magnet strength of magnet, mpo and nash_md")
    ap.add_argument("--period", type=int, default=100, help="mpo: steps between magnet moves")
    ap.add_argument("--taus", default="0.01,0.03,0.1,0.3,1", help="the regularised winners' tau ladder")
    ap.add_argument("--toy_etas", default="10,30", help="step sizes of the toy-scale table")
    ap.add_argument("--toy_T", type=int, default=6, help="iterations of the toy-scale table")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out_dir", default="runs/successors")
    args = ap.parse_args(argv)
    start = time.time()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    etas = [float(e) for e in args.etas.split(",")]
    taus = [float(t) for t in args.taus.split(",")]
    games = successor_games(args.seed)
    nash = {g: von_neumann_winner(P) for g, (P, _) in games.items()}
    reg = {g: {tau: regularised_winner(P, tau, pi0) for tau in sorted(set(taus + [args.tau]))}
           for g, (P, pi0) in games.items()}
    (out / "config.json").write_text(json.dumps(
        {**vars(args), "games": {g: {"P": P.round(6).tolist(), "pi0": pi0.round(6).tolist()}
                                 for g, (P, pi0) in games.items()},
         "von_neumann_winner": {g: v.round(6).tolist() for g, v in nash.items()}}, indent=1))

    res = {}  # (game, eta, method) -> (last [T], avg [T], pi_T)
    for g, (P, pi0) in games.items():
        for eta in etas:
            for m in METHODS:
                pis = run(m, P, pi0, eta, args.T, args.tau, args.period)
                res[g, eta, m] = (*curves(P, pis), pis[-1])

    # Figure 1: rows = step sizes, columns = four of the games; solid last iterate, dashed average.
    shown = ["rps", "toy_cyclic", "mixed", "intransitive10"]
    colors = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    t_axis = np.arange(1, args.T + 1)
    fig, axes = plt.subplots(len(etas), len(shown), figsize=(3.3 * len(shown), 2.6 * len(etas)), sharex=True,
                             sharey=True, squeeze=False)
    for r, eta in enumerate(etas):
        for c, g in enumerate(shown):
            ax = axes[r, c]
            for m in METHODS:
                last, avg, _ = res[g, eta, m]
                ax.loglog(t_axis, np.maximum(last, 1e-6), color=colors[m], lw=1.2, label=f"{LABELS[m]}: last")
                ax.loglog(t_axis, np.maximum(avg, 1e-6), color=colors[m], lw=0.8, ls="--", label=f"{LABELS[m]}: average")
            ax.axhline(exploitability(games[g][0], reg[g][args.tau]), color="k", lw=0.6, ls=":")
            ax.set_title(f"{g}, eta = {eta:g}", fontsize=9)
            ax.set_ylim(1e-5, 0.6)
            if c == 0:
                ax.set_ylabel("exploitability")
            if r == len(etas) - 1:
                ax.set_xlabel("iteration t")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles[::2], [lb[:-6] for lb in labels[::2]], fontsize=8, loc="lower center", ncol=len(METHODS))
    fig.suptitle(f"solid: last iterate pi_t; dashed: average of pi_0..pi_(t-1); dotted: pi*_tau at tau = {args.tau:g}"
                 f" (magnet = pi_0; mpo moves it every {args.period})", fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    fig.savefig(out / "successors.png", dpi=60)
    plt.close(fig)

    # Figure 2: how far the regularised winner is from the winner, per tau.
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for g, (P, _) in games.items():
        ax.loglog(taus, [max(exploitability(P, reg[g][tau]), 1e-6) for tau in taus], "o-", ms=3, label=g)
    ax.set(xlabel="tau", ylabel="exploitability of pi*_tau", title="the regularised winner (magnet pi_0)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "regularised_winner.png", dpi=70)
    plt.close(fig)

    lines = [f"SPPO's successors: T={args.T}, tau={args.tau:g} (magnet = pi_0), mpo period {args.period}, "
             f"seed {args.seed}",
             "", "exploitability of the regularised winner pi*_tau (magnet pi_0) per tau",
             f"{'game':16s}" + "".join(f"{t:>9g}" for t in taus)]
    for g, (P, _) in games.items():
        lines.append(f"{g:16s}" + "".join(f"{exploitability(P, reg[g][t]):9.4f}" for t in taus))
    for eta in etas:
        lines += ["", f"eta = {eta:g}, at T = {args.T}: exploitability of the last iterate / of the average; "
                  "then TV(pi_T, nearest fixed point): w = von Neumann winner, r = pi*_tau",
                  f"{'method':18s}" + "".join(f"{g:>22s}" for g in games)]
        for m in METHODS:
            cells = []
            for g, (P, _) in games.items():
                last, avg, pi_T = res[g, eta, m]
                d_w, d_r = total_variation(pi_T, nash[g]), total_variation(pi_T, reg[g][args.tau])
                near = f"r{d_r:.0e}" if d_r < d_w else f"w{d_w:.0e}"
                cells.append(f"{last[-1]:6.4f}/{avg[-1]:6.4f} {near:>7s}")
            lines.append(f"{LABELS[m]:18s}" + "".join(f"{c:>22s}" for c in cells))
    # The toy world's scale: a few iterations at its large steps (its eta_eff is 3-18 at eta 30). Its
    # average is that of pi_1..pi_t (worlds/toy.py, exploit_avg), its held-out prompts 4/6 cyclic.
    lines += ["", f"the toy world's scale: exact steps from its pi_0, exploitability of pi_1 .. pi_{args.toy_T} and of "
              f"their average (4/6 cyclic + 2/6 transitive family, as its held-out prompts)"]
    for eta in [float(e) for e in args.toy_etas.split(",")]:
        for m, tau in [("mw", 0.0)] + [("magnet", t) for t in taus if t <= 0.1] + [("optimistic", 0.0),
                                                                                   ("extragradient", 0.0)]:
            last, avg = np.zeros(args.toy_T), 0.0
            for g, weight in (("toy_cyclic", 4 / 6), ("toy_transitive", 2 / 6)):
                P, pi0 = games[g]
                pis = run(m, P, pi0, eta, args.toy_T, tau)
                last += weight * np.array([exploitability(P, pi) for pi in pis[1:]])
                avg += weight * exploitability(P, pis[1:].mean(0))
            name = LABELS[m] + (f", tau {tau:g}" if m == "magnet" else "")
            lines.append(f"eta {eta:<3g} {name:30s}" + " ".join(f"{x:.3f}" for x in last) + f"   average {avg:.3f}")
    lines.append(f"wrote {out}/successors.png, regularised_winner.png, summary.txt, config.json "
                 f"in {time.time() - start:.1f} s")
    text = "\n".join(lines)
    (out / "summary.txt").write_text(text + "\n")
    print(text)
    return res, reg, nash


if __name__ == "__main__":
    main()
