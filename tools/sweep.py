"""A grid of iterate.py runs over flags and seeds, and one table and one plot of their eval.json.

    python -m tools.sweep --out runs/sweep-x --grid loss_type=sppo,dpo,ipo --grid eta=3,10 --seeds 0,1,2 -- --preset toy
    python -m tools.sweep --out runs/sweep-x --aggregate-only --metric exploit      # table and plot again, nothing run
    python -m tools.sweep --out runs/sweep-y --combo 'loss_type=sppo eta=10' --combo 'loss_type=dpo beta=0.3' --seeds 1,2,3

--grid gives the cartesian product of its flags' values; --combo gives one combination of flag
values each (flag=value pairs separated by spaces), for settings that go together, such as each
loss with its own step size. With both, every --combo is combined with every --grid combination.

Each cell (one combination of flag values x one seed) is an ordinary iterate.py run directory,
OUT/loss_type=sppo__eta=3__seed=0, run as `python iterate.py ARGS_AFTER_-- --loss_type sppo --eta 3
--seed 0 --run_dir CELL` with its output in CELL/sweep.log. When the run exits 0, the sweep writes
CELL/sweep_done.json (atomically, with the cell's arguments); a cell that has it is skipped, so a
killed sweep resumes when the same command is run again (and iterate.py resumes inside the cell
that was running). Ctrl-C or `kill PID` stops the running cell's processes too (each cell
runs in a process group of its own), and so does `kill -9 PID` (the cell dies with the sweep:
lifetime.py); two sweeps cannot run in one OUT at the same time. A value
containing commas is written as a JSON list: --grid 'prompts=["a,b","c"]'; an on/off flag takes
true and false: --grid freeze_embeddings=true,false gives --freeze_embeddings / --no-freeze_embeddings.
Every cell's arguments are checked as iterate.py checks them before the first cell runs.

OUT/sweep.json records the grid, the combos, the seeds, the arguments after -- and the command line.
OUT/results.md and OUT/results.csv hold one table: per combination and iteration, the number of
seeds n and the mean and sample standard deviation (ddof=1; empty for n=1) over seeds of every
numeric field of the cells' eval.json rows (results.md, also printed: the --columns fields, if
given). OUT/results.png plots --metric against iteration, one line per combination (the mean)
with a band of +- one standard deviation.
"""
import argparse
import contextlib
import csv
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from iterate import check_settings
from machinery.flags import iterate_args, iterate_parser, run_seed
from machinery.lifetime import dies_with_this_process
from machinery.records import (InputError, atomic_write, check_not_input, check_output, exclusive_lock, fail_with,
                               make_work_dir, one_line_errors, write_json)

HERE = Path(__file__).resolve().parent.parent  # the project root
# How a cell is run; the tests put a fake iterate.py here.
ITERATE = [sys.executable, str(HERE / "iterate.py")]
DONE = "sweep_done.json"
# Flags the sweep sets itself for every cell, or that would mark a cell done without running it.
RESERVED = ("seed", "run_dir", "dry-run", "dry_run")
# iterate.py's on/off flags: a grid gives them true or false, a cell gets --flag or --no-flag
BOOLEANS = {a.dest for a in iterate_parser()._actions if isinstance(a, argparse.BooleanOptionalAction)}


def check_flag(where, key, expected):
    """A flag a --grid or --combo sets: a flag name without dashes, not one the sweep sets itself."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", key):
        raise InputError(f"{where}: expected {expected}")
    if key in RESERVED:
        raise InputError(f"{where}: the sweep sets --{key} itself" + (" (use --seeds)" if key == "seed" else ""))


def parse_grid(specs):
    """['loss_type=sppo,dpo', 'eta=3,10'] -> {'loss_type': ['sppo', 'dpo'], 'eta': ['3', '10']}, in the given order."""
    grid = {}
    for spec in specs:
        key, eq, values = spec.partition("=")
        check_flag(f"--grid {spec!r}", key if eq else "", "flag=value1,value2,... (a flag name without dashes)")
        if key in grid:
            raise InputError(f"--grid {spec!r}: flag {key!r} given twice")
        if values.startswith("["):  # a JSON list, for values that contain commas
            try:
                values = json.loads(values)
            except json.JSONDecodeError as e:
                raise InputError(f"--grid {spec!r}: not a JSON list: {e}") from None
            if not isinstance(values, list) or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool)
                                                       for v in values):
                raise InputError(f"--grid {spec!r}: a JSON list must hold strings or numbers")
            values = [str(v) for v in values]
        else:
            values = values.split(",")
        if not values or any(v.strip() == "" for v in values):
            raise InputError(f"--grid {spec!r}: empty value")
        if len(set(values)) < len(values):
            raise InputError(f"--grid {spec!r}: a value is repeated")
        if key in BOOLEANS and not set(values) <= {"true", "false"}:
            raise InputError(f"--grid {spec!r}: --{key} is on or off: give true, false or both")
        grid[key] = values
    return grid


def parse_combos(specs, grid):
    """["loss_type=sppo eta=10", ...] -> [{'loss_type': 'sppo', 'eta': '10'}, ...]: each one combination,
    its flags in the given order; a value with spaces is quoted as in a shell."""
    combos = []
    for spec in specs:
        combo = {}
        try:
            pairs = shlex.split(spec)
        except ValueError as e:
            raise InputError(f"--combo {spec!r}: {e}") from None
        for pair in pairs or [""]:
            key, eq, value = pair.partition("=")
            check_flag(f"--combo {spec!r}", key if eq and value else "", "flag=value pairs separated by spaces")
            if key in combo:
                raise InputError(f"--combo {spec!r}: flag {key!r} given twice")
            if key in grid:
                raise InputError(f"--combo {spec!r}: flag {key!r} is a --grid flag too")
            if key in BOOLEANS and value not in ("true", "false"):
                raise InputError(f"--combo {spec!r}: --{key} is on or off: give true or false")
            combo[key] = value
        if combo in combos:
            raise InputError(f"--combo {spec!r}: given twice")
        combos.append(combo)
    return combos


def parse_seeds(text):
    """'0,1,2' -> [0, 1, 2]: each an iterate.py --seed (flags.run_seed), none empty or repeated."""
    try:
        seeds = [run_seed(s) for s in text.split(",")]
    except argparse.ArgumentTypeError:
        raise InputError(f"--seeds {text!r}: expected integers of magnitude < 2**32 separated by commas, e.g. 0,1,2") from None
    if len(set(seeds)) < len(seeds):
        raise InputError(f"--seeds {text!r}: a seed is repeated")
    return seeds


def check_iterate_args(iterate_args, grid, combos=()):
    """The arguments after -- go to every cell: they must not set what the grid, a combo or the sweep sets."""
    varied = set(grid).union(*combos)
    for arg in iterate_args:
        flag = arg[2:].split("=")[0] if arg.startswith("--") else None
        if flag in RESERVED or flag in varied:
            raise InputError(f"argument {arg!r} after --: the sweep sets --{flag} for each cell"
                             + (" (it is a --grid flag)" if flag in grid else " (a --combo sets it)" if flag in varied else ""))


def name_part(value):
    """A filesystem-safe, stable stand-in for a value; a hash keeps two values that map alike apart."""
    safe = re.sub(r"[^A-Za-z0-9.+-]", "-", value)
    if safe != value or len(safe) > 40:
        safe = safe[:32] + "-" + hashlib.sha1(value.encode()).hexdigest()[:6]
    return safe


def combinations(grid, combos=()):
    """The cartesian product of the grid in the order given (the last flag varies fastest); with
    combos, each combo (in order) with each of those."""
    product = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    return [dict(combo, **settings) for combo in combos for settings in product] if combos else product


def setting_keys(settings_list):
    """The flags the combinations set, in order of first appearance: the table's leading columns."""
    return list(dict.fromkeys(k for settings in settings_list for k in settings))


def cell_name(settings, seed):
    return "__".join([f"{k}={name_part(v)}" for k, v in settings.items()] + [f"seed={seed}"])


def flag_args(key, value):
    """A grid setting as iterate.py arguments: --key value, or --key / --no-key for an on/off flag."""
    if key in BOOLEANS:
        return [f"--{key}" if value == "true" else f"--no-{key}"]
    return [f"--{key}", value]


def cells(grid, seeds, iterate_args, combos=()):
    """Every (combination, seed) with its directory name and the iterate.py arguments (without --run_dir).
    Seed-major: all combinations at the first seed run first, so a partial sweep already compares them."""
    out = []
    for seed in seeds:
        for settings in combinations(grid, combos):
            args = list(iterate_args) + [a for k, v in settings.items() for a in flag_args(k, v)] + ["--seed", str(seed)]
            out.append({"name": cell_name(settings, seed), "settings": settings, "seed": seed, "args": args})
    return out


def check_finished(todo, out):
    """A finished cell must have run with the arguments it would get now (checked before anything runs)."""
    for cell in todo:
        done = out / cell["name"] / DONE
        if done.exists() and json.loads(done.read_text())["args"] != cell["args"]:
            raise InputError(f"{done}: field 'args': this cell finished with "
                             f"{shlex.join(json.loads(done.read_text())['args'])}, not {shlex.join(cell['args'])}; "
                             f"use another --out or delete {out / cell['name']}")


def run_cell(cell, cell_dir):
    """Run one cell unless it is done; True when it is done afterwards."""
    done = cell_dir / DONE
    if done.exists():
        print("  done before: skipped", flush=True)
        return True
    make_work_dir(cell_dir, "tools.sweep")  # iterate.py takes a run directory a sweep made
    cmd = ITERATE + cell["args"] + ["--run_dir", str(cell_dir)]
    t0 = time.time()
    with open(cell_dir / "sweep.log", "a") as log:
        log.write(f"\n$ {shlex.join(cmd)}\n")
        log.flush()
        # Its own process group, so that stopping the sweep stops the cell's stages too: an orphaned
        # train.py would race the resumed sweep's run of the same cell. The cell dies with the sweep
        # (and its stages with it), also when the sweep is killed outright.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=HERE, start_new_session=True,
                                preexec_fn=dies_with_this_process())
        print(f"  process group {proc.pid}, output in {cell_dir / 'sweep.log'}", flush=True)
        try:
            code = proc.wait()
        except BaseException:  # Ctrl-C, or SIGTERM (see main)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    seconds = time.time() - t0
    if code != 0:
        tail = (cell_dir / "sweep.log").read_text().splitlines()[-5:]
        print(f"  FAILED (exit {code}) after {seconds:.0f} s; last lines of {cell_dir / 'sweep.log'}:\n    "
              + "\n    ".join(tail), flush=True)
        return False
    write_json(done, {"args": cell["args"], "seconds": round(seconds, 1), "time": time.strftime("%Y-%m-%d %H:%M:%S %z")})
    print(f"  done in {seconds:.0f} s", flush=True)
    return True


@contextlib.contextmanager
def sweep_lock(out):
    """Refuse to run next to another sweep in the same directory: both would run the same cell.
    The kernel drops the lock when the file closes, however this process ends."""
    out.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out / "sweep.lock", f"{out}: another sweep is running in this directory"):
        yield


def read_sweep_record(out):
    """OUT/sweep.json as sweep.py wrote it: grid [[flag, [values]]], seeds [int], combos, iterate_args."""
    path = out / "sweep.json"
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
        grid = dict(record["grid"])
        ok = (all(isinstance(k, str) and isinstance(v, list) and all(isinstance(x, str) for x in v) for k, v in grid.items())
              and isinstance(record["seeds"], list) and all(type(x) is int for x in record["seeds"])
              and isinstance(record.get("combos", []), list) and isinstance(record["iterate_args"], list))
        combos = [dict(pairs) for pairs in record.get("combos", [])]
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        ok, grid, combos = False, None, None
        why = f"{type(e).__name__}: {e}"
    else:
        why = "a field of another type"
    if not ok:
        raise InputError(f"{path}: not a sweep record of tools.sweep ({why}); give another --out")
    return grid, record["seeds"], combos, record["iterate_args"]


def check_sweep_dir(out, grid, combos, iterate_args):
    """--out is new, or empty, or the directory of this very sweep (same grid, combos and arguments
    after --; the seeds may differ): a user's directory or another sweep's is refused, not written into."""
    check_output(out, "--out", directory=True)
    if not out.exists() or not (set(os.listdir(out)) - {"sweep.lock"}):
        return
    if not (out / "sweep.json").exists():
        raise InputError(f"--out {out}: exists and holds no sweep.json of tools.sweep; give another --out")
    recorded = read_sweep_record(out)
    if (recorded[0], recorded[2], recorded[3]) != (grid, combos, list(iterate_args)):
        raise InputError(f"{out / 'sweep.json'}: this directory holds another sweep (grid "
                         f"{' '.join(k + '=' + ','.join(v) for k, v in recorded[0].items()) or '-'}, "
                         f"{len(recorded[2])} combos, arguments {shlex.join(recorded[3])!r}); use another --out")


def read_eval(path):
    """A cell's eval.json rows: a list of objects, each with an integer 'iteration'."""
    try:
        rows = json.loads(path.read_bytes().decode("utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not isinstance(rows, list):
        raise InputError(f"{path}: expected a list of rows, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("iteration"), int):
            raise InputError(f"{path}: row {i}: field 'iteration': missing or not an integer")
    return rows


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def mean_std(values):
    """Mean and sample standard deviation (ddof=1) of the finite values; None where undefined."""
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return mean, std


def aggregate(out, settings_list, seeds):
    """(metrics, table): per combination and iteration, n seeds and {metric: (mean, std)}."""
    metrics, table = [], []
    for settings in settings_list:
        by_iteration = {}  # iteration -> the rows of the seeds that reached it
        for seed in seeds:
            path = out / cell_name(settings, seed) / "eval.json"
            for row in read_eval(path) if path.exists() else []:
                by_iteration.setdefault(row["iteration"], []).append(row)
                metrics += [k for k, v in row.items() if k != "iteration" and is_number(v) and k not in metrics]
        for t in sorted(by_iteration):
            rows = by_iteration[t]
            stats = {m: mean_std([r[m] for r in rows if is_number(r.get(m))]) for m in metrics}
            table.append({"settings": settings, "iteration": t, "n": len(rows), "stats": stats})
    return metrics, table


def write_table(out, keys, metrics, table, columns=None):
    """results.csv (every metric at full precision, metric_mean and metric_std columns) and results.md
    (mean +- std of the `columns`, default every metric); returns the markdown."""
    def number(x, fmt=None):  # full precision (repr) without fmt
        return "" if x is None else repr(x) if fmt is None else format(x, fmt)

    columns = columns or metrics
    head = list(keys) + ["iteration", "n"]
    csv_rows = [head + [f"{m}_{s}" for m in metrics for s in ("mean", "std")]]
    md = ["| " + " | ".join(head + columns) + " |", "|" + "---|" * (len(head) + len(columns))]
    for entry in table:
        row = [entry["settings"].get(k, "") for k in keys] + [entry["iteration"], entry["n"]]
        stats = {m: entry["stats"].get(m, (None, None)) for m in metrics}
        csv_rows.append(row + [number(x) for m in metrics for x in stats[m]])
        cells = [number(mean, ".3f") + ("" if std is None else f" ± {std:.3f}") for mean, std in map(stats.get, columns)]
        md.append("| " + " | ".join([str(k) for k in row] + cells) + " |")
    md.append("\nmean ± sample standard deviation (ddof=1) over the n seeds that reached the iteration.")
    atomic_write(out / "results.csv", lambda f: csv.writer(f, lineterminator="\n").writerows(csv_rows))
    atomic_write(out / "results.md", lambda f: f.write("\n".join(md) + "\n"))
    return "\n".join(md)


def plot(out, metric, table):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines = {}  # combination label -> [(iteration, mean, std)]
    for entry in table:
        mean, std = entry["stats"].get(metric, (None, None))
        if mean is not None:
            label = " ".join(f"{k}={v}" for k, v in entry["settings"].items()) or "all"
            lines.setdefault(label, []).append((entry["iteration"], mean, std or 0.0))
    for label, points in lines.items():
        t, mean, std = zip(*points)
        (line,) = ax.plot(t, mean, "o-", label=label)
        ax.fill_between(t, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xticks(sorted({entry["iteration"] for entry in table}))
    ax.set_xlabel("iteration")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric}: mean over seeds, band = ± 1 std")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(out / "results.png", lambda f: fig.savefig(f, format="png", dpi=100), mode="wb")
    plt.close(fig)


def parse_args(argv):
    """Everything after the first -- goes to iterate.py unchanged."""
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="the sweep directory; one subdirectory per cell")
    ap.add_argument("--grid", action="append", default=[], metavar="FLAG=V1,V2",
                    help="an iterate.py flag and its values; repeat for a cartesian product")
    ap.add_argument("--combo", action="append", default=[], metavar="'FLAG=V FLAG2=V2'",
                    help="one combination of iterate.py flag values; repeat for several (times the --grid product)")
    ap.add_argument("--seeds", help="comma-separated seeds, each a cell of every combination (default 0)")
    ap.add_argument("--metric", help="the eval.json field plotted (default: the first numeric one)")
    ap.add_argument("--columns", help="comma-separated eval.json fields shown in results.md, in this order "
                    "(default: every numeric one; results.csv has all)")
    ap.add_argument("--aggregate-only", dest="aggregate_only", action="store_true",
                    help="rebuild table and plot from the cells; without --grid, --combo and --seeds: those of OUT/sweep.json")
    args = ap.parse_args(argv[:split])
    args.iterate_args = argv[split + 1:]
    args.command = shlex.join([Path(sys.executable).name, "-m", "tools.sweep"] + argv)  # what sweep.json records
    return args


def main(argv=None):
    args = parse_args(argv)
    # `kill PID` stops the sweep as Ctrl-C does: the running cell's process group goes with it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    out = args.out.resolve()
    try:
        if args.aggregate_only and not args.grid and not args.combo and args.seeds is None:
            if not (out / "sweep.json").exists():
                raise InputError(f"{out / 'sweep.json'}: missing; give --grid and --seeds, or run the sweep first")
            grid, seeds, combos, _ = read_sweep_record(out)
        else:
            grid, seeds = parse_grid(args.grid), parse_seeds("0" if args.seeds is None else args.seeds)
            combos = parse_combos(args.combo, grid)
            check_iterate_args(args.iterate_args, grid, combos)
        todo, failed = cells(grid, seeds, args.iterate_args, combos), []
        if not args.aggregate_only:
            for cell in todo:  # a bad flag, value or choice anywhere in the grid: one line now (exit 2), no cell run
                check_settings(iterate_args(cell["args"]))  # and what the flags decide: engine limits, a world's files
            check_finished(todo, out)
            check_sweep_dir(out, grid, combos, args.iterate_args)
            for arg in args.iterate_args:  # the cells' inputs (the paths after --) are not to be written over
                if "/" in arg or Path(arg).suffix:
                    check_not_input(out, {"an argument after --": arg}, "--out")
            if (out / "sweep.json").exists():  # the same sweep with more seeds: the record keeps them all
                seeds = list(dict.fromkeys(read_sweep_record(out)[1] + seeds))
            with sweep_lock(out):
                # the grid as [flag, values] pairs: write_json sorts an object's keys, and the order names the cells
                write_json(out / "sweep.json", {"grid": list(grid.items()), "seeds": seeds,
                                                "combos": [list(combo.items()) for combo in combos],
                                                "iterate_args": args.iterate_args, "iterate": ITERATE,
                                                "command": args.command,
                                                "cells": [c["name"] for c in cells(grid, seeds, args.iterate_args, combos)]})
                for i, cell in enumerate(todo):
                    print(f"[{i + 1}/{len(todo)}] {cell['name']}", flush=True)
                    if not run_cell(cell, out / cell["name"]):
                        failed.append(cell["name"])
        settings_list = combinations(grid, combos)
        metrics, table = aggregate(out, settings_list, seeds)
        columns = args.columns.split(",") if args.columns else None
        for name, wanted in (("--metric", [args.metric] if args.metric else []), ("--columns", columns or [])):
            unknown = [m for m in wanted if m not in metrics]
            if unknown:
                raise InputError(f"{name} {','.join(wanted)!r}: {', '.join(unknown)} not a numeric field of the cells' "
                                 f"eval.json (found: {', '.join(metrics) or 'none'})")
    except InputError as e:
        fail_with(e)
    if not table:
        print(f"no cell in {out} has an eval.json yet: no table", flush=True)
    else:
        print(write_table(out, setting_keys(settings_list), metrics, table, columns), flush=True)
        plot(out, args.metric or metrics[0], table)
        print(f"table: {out / 'results.md'}, {out / 'results.csv'}; plot of {args.metric or metrics[0]}: "
              f"{out / 'results.png'}", flush=True)
    if failed:
        print(f"{len(failed)} of {len(todo)} cells failed: {', '.join(failed)}; run the same command to retry them")
        sys.exit(1)


if __name__ == "__main__":
    one_line_errors(main)
