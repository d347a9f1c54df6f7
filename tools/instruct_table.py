"""The instruct world's comparison of a sweep: per combination, the change from pi_0 to the last
policy pi_T with a paired bootstrap interval over the held-out prompts, and IFBench's bounds.

    python -m tools.instruct_table runs/instruct-methods          # a tools.sweep directory of instruct runs
    python -m tools.instruct_table runs/instruct-methods --reps 4000 --level 0.9

tools.sweep's results.md has the mean and sample sd over seeds of every metric per iteration; this
adds what needs each prompt's verdicts. A finished cell keeps, in iter0/ and iterT/eval_samples.json,
the held-out prompts' samples and the checkers' verdicts for pi_0 and pi_T: the same prompts and
sampling seeds for both, so pi_T - pi_0 is paired by prompt.

The interval: the held-out prompts are drawn with replacement, one draw per seed for both policies;
IFEval's accuracies (worlds/instruct.py: accuracies) of pi_0 and pi_T are computed on the draw and
their difference averaged over the combination's seeds; the percentile interval of `--reps` such
replicates. It measures how much the held-out prompts (and the samples drawn for them) move the
difference; the spread from one training run to the next is the sweep's sd over seeds.

Writes OUT/instruct_table.md (and prints it).
"""
import argparse
import json
import math
from pathlib import Path

import numpy as np

from machinery.records import InputError, atomic_write, one_line_errors
from tools.sweep import DONE, cell_name, combinations, read_eval, read_sweep_record
from worlds.instruct import accuracies

METRICS = ("inst_strict_all", "inst_strict_seen", "inst_strict_unseen",
           "prompt_strict_all", "prompt_strict_seen", "prompt_strict_unseen")
IFBENCH = ("inst_strict", "prompt_strict")  # IFBench's bounds shown: *_low, *_high and *_subset


def paired_bootstrap(pairs, reps, level, rng):
    """pairs: per seed, (pi_0's, pi_T's) eval_samples (records and checks of the same prompts).
    -> {metric: (mean over seeds of acc(pi_T) - acc(pi_0), interval low, interval high)}."""
    def difference(base, last, idx=None):
        pick = (lambda xs: xs) if idx is None else (lambda xs: [xs[i] for i in idx])
        a0 = accuracies(pick(base["records"]), pick(base["checks"]))
        aT = accuracies(pick(last["records"]), pick(last["checks"]))
        return {m: aT[m] - a0[m] for m in METRICS}

    point = [difference(base, last) for base, last in pairs]
    replicates = {m: [] for m in METRICS}
    for _ in range(reps):
        draws = [difference(base, last, rng.integers(0, len(base["records"]), len(base["records"])))
                 for base, last in pairs]  # each seed's prompts drawn on their own (their sets differ)
        for m in METRICS:
            replicates[m].append(np.mean([d[m] for d in draws]))  # NaN when a draw holds no prompt of a group
    tail = (1 - level) / 2 * 100
    return {m: (float(np.mean([p[m] for p in point])), *map(float, np.nanpercentile(replicates[m], [tail, 100 - tail])))
            for m in METRICS}


def read_cell(cell_dir):
    """A finished cell: (T, pi_0's eval_samples, pi_T's eval_samples, {0: IFBench of pi_0, T: of pi_T})."""
    rows = read_eval(cell_dir / "eval.json")
    if not rows or rows[0]["iteration"] != 0:
        raise InputError(f"{cell_dir / 'eval.json'}: row 0: field 'iteration': expected pi_0's row first")
    last = max(row["iteration"] for row in rows)
    samples = []
    for t in (0, last):
        path = cell_dir / f"iter{t}" / "eval_samples.json"
        try:
            stats = json.loads(path.read_text())
            if len(stats["records"]) != len(stats["checks"]) or not stats["records"]:
                raise ValueError("records and checks differ in number, or none")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"{path}: not the instruct world's evaluation samples ({type(e).__name__}: {e})") from None
        samples.append(stats)
    if [r["id"] for r in samples[0]["records"]] != [r["id"] for r in samples[1]["records"]]:
        raise InputError(f"{cell_dir}: iter0/ and iter{last}/eval_samples.json hold other prompts: field 'id' differs")
    ifbench = {row["iteration"]: row["ifbench"] for row in rows if isinstance(row.get("ifbench"), dict)}
    return last, samples[0], samples[1], ifbench


def table(out, reps=2000, level=0.95, seed=0):
    """The markdown of every combination with at least one finished cell."""
    grid, seeds, combos, _ = read_sweep_record(out)
    rng = np.random.default_rng(seed)
    head = ["| combination | seeds | T | " + " | ".join(METRICS) + " |", "|---" * (3 + len(METRICS)) + "|"]
    bench_head = ["| combination | seeds | policy | " + " | ".join(f"IFBench {k} (subset)" for k in IFBENCH) + " |",
                  "|---" * (3 + len(IFBENCH)) + "|"]
    lines, bench = [], []
    for settings in combinations(grid, combos):
        done = [s for s in seeds if (out / cell_name(settings, s) / DONE).exists()]
        if not done:
            continue
        cells = [read_cell(out / cell_name(settings, s)) for s in done]
        if len({c[0] for c in cells}) > 1:
            raise InputError(f"{out}: {cell_name(settings, '*')}: the seeds' cells ran different numbers of iterations")
        label, T = " ".join(f"{k}={v}" for k, v in settings.items()), cells[0][0]
        diffs = paired_bootstrap([(c[1], c[2]) for c in cells], reps, level, rng)
        lines.append(f"| {label} | {','.join(map(str, done))} | {T} | "
                     + " | ".join(f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for d, lo, hi in (diffs[m] for m in METRICS)) + " |")
        for t in (0, T):
            scored = [c[3][t] for c in cells if t in c[3]]
            if scored:
                mean = lambda key: np.mean([b[key] for b in scored])  # noqa: E731
                bench.append(f"| {label} | {len(scored)} | pi_{t} | " + " | ".join(
                    f"{mean(k + '_low'):.3f}-{mean(k + '_high'):.3f} ({mean(k + '_subset'):.3f})" for k in IFBENCH) + " |")
    if not lines:
        raise InputError(f"{out}: no finished cell ({DONE}) yet: no table")
    return "\n".join(
        [f"pi_T - pi_0 on the held-out prompts: the mean over seeds, [{level:.0%} paired bootstrap interval over "
         f"prompts, {reps} replicates]", ""] + head + lines
        + ["", "IFBench, all its prompts as bounds (unscorable verdicts failed - passed) and the checkable subset; "
           "mean over the seeds", ""] + bench_head + bench) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.instruct_table", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="the tools.sweep directory (--out) of instruct-world runs")
    ap.add_argument("--reps", type=int, default=2000, help="bootstrap replicates")
    ap.add_argument("--level", type=float, default=0.95, help="the interval's coverage")
    ap.add_argument("--seed", type=int, default=0, help="of the bootstrap's draws")
    args = ap.parse_args(argv)
    if args.reps < 1 or not 0 < args.level < 1 or not math.isfinite(args.level):
        ap.error("--reps must be >= 1 and --level in (0, 1)")
    markdown = table(args.out, args.reps, args.level, args.seed)
    atomic_write(args.out / "instruct_table.md", lambda f: f.write(markdown))
    print(markdown, end="")


if __name__ == "__main__":
    one_line_errors(main)
