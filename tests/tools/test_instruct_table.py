"""tools/instruct_table.py: pi_T - pi_0 per combination with a paired bootstrap interval over the held-out
prompts, checked against closed forms (the difference of two accuracies, the standard error of a mean of
paired differences); the held-out prompts are the instruct world's, the checkers' verdicts drawn here."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tools import instruct_table
from worlds import instruct

ROOT = Path(__file__).resolve().parents[2]


def policy(held, p, samples, rng):
    """eval_samples of a policy that follows each instruction with probability p[type] (default .5)."""
    records, checks = [], []
    for r in held:
        flags = [[bool(rng.random() < p.get(t, 0.5)) for t in r["instruction_id_list"]] for _ in range(samples)]
        records.append(dict(r, responses=["..."] * samples))
        checks.append({"strict": flags, "loose": flags})
    return {"records": records, "checks": checks}


@pytest.fixture(scope="module")
def held():
    return instruct.make_prompts(seed=0)[1]


def test_the_difference_and_its_interval_are_the_closed_forms(held):
    rng = np.random.default_rng(1)
    base = policy(held, {}, 1, rng)
    last = policy(held, {t: 0.8 for r in held for t in r["instruction_id_list"]}, 1, rng)
    got = instruct_table.paired_bootstrap([(base, last)], reps=3000, level=0.95, rng=np.random.default_rng(0))
    # instruction level: followed instructions over all instructions, by numpy on the flags
    flags = lambda s: np.concatenate([c["strict"][0] for c in s["checks"]])  # noqa: E731
    assert got["inst_strict_all"][0] == pytest.approx(flags(last).mean() - flags(base).mean(), abs=1e-12)
    # prompt level, one sample a prompt: the mean of the paired differences d_i, and its bootstrap
    # spread is their standard error sd(d) / sqrt(n) (the plug-in one, ddof=0)
    d = np.array([all(a["strict"][0]) - all(b["strict"][0]) for a, b in zip(last["checks"], base["checks"])], float)
    point, low, high = got["prompt_strict_all"]
    assert point == pytest.approx(d.mean(), abs=1e-12)
    se = d.std() / np.sqrt(len(d))
    assert low < point < high
    assert (high - low) / (2 * 1.96 * se) == pytest.approx(1, abs=0.15)


def test_a_policy_against_itself_has_a_zero_interval(held):
    base = policy(held, {}, 4, np.random.default_rng(2))
    got = instruct_table.paired_bootstrap([(base, base), (base, base)], reps=50, level=0.9, rng=np.random.default_rng(0))
    assert all(v == (0.0, 0.0, 0.0) for v in got.values()), got


def write_cell(out, name, held, p_last, seed, T=3, ifbench=True):
    rng = np.random.default_rng(seed)
    cell = out / name
    stats = {0: policy(held, {}, 4, rng), T: policy(held, p_last, 4, rng)}
    rows = []
    for t, s in stats.items():
        (cell / f"iter{t}").mkdir(parents=True)
        (cell / f"iter{t}" / "eval_samples.json").write_text(json.dumps(s))
        row = {"iteration": t, **instruct.accuracies(s["records"], s["checks"])}
        if ifbench:
            row["ifbench"] = {f"{k}_{b}": v for k in instruct_table.IFBENCH
                              for b, v in (("low", 0.1 * (t + 1)), ("high", 0.2 * (t + 1)), ("subset", 0.15 * (t + 1)))}
        rows.append(row)
    (cell / "eval.json").write_text(json.dumps(rows))
    (cell / "sweep_done.json").write_text(json.dumps({"args": []}))
    return stats


def sweep_dir(out, combos, seeds):
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps({"grid": [], "seeds": seeds, "iterate_args": ["--preset", "instruct"],
                                                "combos": [list(c.items()) for c in combos]}))


def test_the_table_of_a_sweep(tmp_path, held):
    out = tmp_path / "sweep"
    sppo, dpo = {"loss_type": "sppo", "eta": "10"}, {"loss_type": "dpo", "beta": "0.1"}
    sweep_dir(out, [sppo, dpo], [0, 1])
    better = {t: 0.9 for r in held for t in r["instruction_id_list"]}
    cells = [write_cell(out, "loss_type=sppo__eta=10__seed=0", held, better, 0),
             write_cell(out, "loss_type=sppo__eta=10__seed=1", held, better, 1)]
    write_cell(out, "loss_type=dpo__beta=0.1__seed=0", held, {}, 2, ifbench=False)
    (out / "loss_type=dpo__beta=0.1__seed=1").mkdir()  # a cell still running: not in the table
    res = subprocess.run([sys.executable, "-m", "tools.instruct_table", str(out), "--reps", "40"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    md = (out / "instruct_table.md").read_text()
    assert md == res.stdout
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in md.splitlines() if line.startswith("| loss") and "[" in line}
    assert rows["loss_type=sppo eta=10"][1:3] == ["0,1", "3"] and rows["loss_type=dpo beta=0.1"][1] == "0"
    # the mean over the two seeds of each seed's difference of accuracies
    want = np.mean([instruct.accuracies(c[3]["records"], c[3]["checks"])["inst_strict_all"]
                    - instruct.accuracies(c[0]["records"], c[0]["checks"])["inst_strict_all"] for c in cells])
    assert float(rows["loss_type=sppo eta=10"][3].split()[0]) == pytest.approx(want, abs=5e-4)
    bench = [line for line in md.splitlines() if line.startswith("| loss_type=sppo") and "pi_" in line]
    assert [line.split(" | ")[2] for line in bench] == ["pi_0", "pi_3"]
    assert "0.400-0.800 (0.600)" in bench[1]  # pi_3's bounds as the cells' eval.json give them
    assert not any(line.startswith("| loss_type=dpo") and "pi_" in line for line in md.splitlines())


def test_a_damaged_cell_stops_in_one_line_naming_its_file(tmp_path, held):
    out = tmp_path / "sweep"
    sweep_dir(out, [{"loss_type": "sppo"}], [0])
    write_cell(out, "loss_type=sppo__seed=0", held, {}, 0)
    (out / "loss_type=sppo__seed=0" / "iter3" / "eval_samples.json").write_text('{"records": [')
    res = subprocess.run([sys.executable, "-m", "tools.instruct_table", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2 and "iter3/eval_samples.json" in res.stderr and len(res.stderr.splitlines()) == 1
    assert not (out / "instruct_table.md").exists()
