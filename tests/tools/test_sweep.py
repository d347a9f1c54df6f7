"""The sweep tool (tools/sweep.py) without a model: grid expansion, bad specs, skipping, resume after a kill, aggregation."""
import csv
import fcntl
import json
import math
import os
import re
import subprocess
import signal
import sys
import time
from pathlib import Path

import pytest

from tools import sweep

ROOT = Path(__file__).resolve().parents[2]

# Stands in for iterate.py: parses the flags a cell gets, logs its call, writes eval.json rows
# 0..iterations with numbers that depend on the flags and the seed. FAKE_FAIL=<cell name> makes
# that cell exit 1; FAKE_KILL=<cell name> writes part of eval.json and SIGKILLs the sweep (its parent);
# FAKE_HANG=<cell name> starts a long child process and waits.
FAKE_ITERATE = r'''
import argparse, json, os, signal, sys
from pathlib import Path
ap = argparse.ArgumentParser()
ap.add_argument("--run_dir", type=Path, required=True)
ap.add_argument("--seed", type=int, required=True)
ap.add_argument("--iterations", type=int, default=3)
ap.add_argument("--preset")
ap.add_argument("--loss_type", default="sppo")
ap.add_argument("--eta", type=float, default=10.0)
ap.add_argument("--prompts")
args = ap.parse_args()
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({"cell": args.run_dir.name, "argv": sys.argv[1:]}) + "\n")
shift = {"sppo": 0.0, "dpo": 0.5, "ipo": 1.0}[args.loss_type]
rows = [{"iteration": t, "score": shift + args.eta * t + 0.1 * args.seed, "flag": True, "note": "x"}
        for t in range(args.iterations + 1)]
args.run_dir.mkdir(parents=True, exist_ok=True)
if os.environ.get("FAKE_KILL") == args.run_dir.name:
    (args.run_dir / "eval.json").write_text(json.dumps(rows[:2]))
    os.kill(os.getppid(), signal.SIGKILL)
    sys.exit(1)
if os.environ.get("FAKE_FAIL") == args.run_dir.name:
    sys.exit(1)
if os.environ.get("FAKE_HANG") == args.run_dir.name:  # a stage that runs long, in a process of its own
    import subprocess, time
    stage = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    (args.run_dir / "pids").write_text(f"{os.getpid()} {stage.pid}")
    time.sleep(120)
(args.run_dir / "eval.json").write_text(json.dumps(rows))
'''


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """Point the sweep at the fake iterate.py; returns a function giving the logged calls so far."""
    script = tmp_path / "fake_iterate.py"
    script.write_text(FAKE_ITERATE)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setattr(sweep, "ITERATE", [sys.executable, str(script)])
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.delenv("FAKE_FAIL", raising=False)
    monkeypatch.delenv("FAKE_KILL", raising=False)
    monkeypatch.delenv("FAKE_HANG", raising=False)
    return lambda: [json.loads(line)["cell"] for line in log.read_text().splitlines()] if log.exists() else []


GRID = ["--grid", "loss_type=sppo,dpo", "--grid", "eta=3,10", "--seeds", "0,1"]
PASS = ["--", "--preset", "toy", "--iterations", "2"]


def test_grid_expansion_order_names_and_args():
    grid = sweep.parse_grid(["loss_type=sppo,dpo,ipo", "eta=3,10"])
    assert grid == {"loss_type": ["sppo", "dpo", "ipo"], "eta": ["3", "10"]}
    got = sweep.cells(grid, [0, 7], ["--preset", "toy"])
    expected = []
    for seed in (0, 7):  # seed-major, then the product with the last flag fastest
        for loss in ("sppo", "dpo", "ipo"):
            for eta in ("3", "10"):
                expected.append({"name": f"loss_type={loss}__eta={eta}__seed={seed}",
                                 "settings": {"loss_type": loss, "eta": eta}, "seed": seed,
                                 "args": ["--preset", "toy", "--loss_type", loss, "--eta", eta, "--seed", str(seed)]})
    assert got == expected
    # no grid at all: one cell per seed
    assert [c["name"] for c in sweep.cells({}, [0, 1], [])] == ["seed=0", "seed=1"]


def test_values_with_commas_and_spaces_are_passed_whole_and_named_safely():
    grid = sweep.parse_grid(['prompts=["a.jsonl,b.jsonl", "my prompts/x.jsonl", "a.jsonl-b.jsonl"]', "eta=1e-3"])
    assert grid["prompts"] == ["a.jsonl,b.jsonl", "my prompts/x.jsonl", "a.jsonl-b.jsonl"]
    names = [c["name"] for c in sweep.cells(grid, [0], [])]
    assert len(set(names)) == 3  # "a.jsonl,b.jsonl" and "a.jsonl-b.jsonl" look alike once made safe
    assert all(re.fullmatch(r"[A-Za-z0-9._+=-]+", n) for n in names), names
    assert names == [c["name"] for c in sweep.cells(grid, [0], [])]  # stable
    assert names[2] == "prompts=a.jsonl-b.jsonl__eta=1e-3__seed=0"  # a safe value stays readable
    args = sweep.cells(grid, [0], [])[1]["args"]
    assert args[args.index("--prompts") + 1] == "my prompts/x.jsonl"


@pytest.mark.parametrize("argv, says", [
    (["--grid", "eta"], "expected flag=value1,value2"),
    (["--grid=--eta=3,10"], "expected flag=value1,value2"),
    (["--grid", "eta="], "empty value"),
    (["--grid", "eta=3,,10"], "empty value"),
    (["--grid", "eta=3,3"], "repeated"),
    (["--grid", "eta=3", "--grid", "eta=10"], "given twice"),
    (["--grid", "seed=0,1"], "use --seeds"),
    (["--grid", "run_dir=a,b"], "sets --run_dir itself"),
    (["--grid", "prompts=[\"a\","], "not a JSON list"),
    (["--grid", "prompts=[[1]]"], "strings or numbers"),
    (["--seeds", "0,x"], "expected integers"),
    (["--seeds", "1,1"], "repeated"),
    (["--grid", "eta=3,10", "--", "--eta", "5"], "it is a --grid flag"),
    (["--", "--run_dir", "elsewhere"], "sets --run_dir"),
    (["--", "--dry-run"], "sets --dry-run"),
    (["--combo", "eta"], "expected flag=value pairs"),
    (["--combo", ""], "expected flag=value pairs"),
    (["--combo", "eta=3 eta=4"], "given twice"),
    (["--combo", "loss_type=dpo", "--combo", "loss_type=dpo"], "given twice"),
    (["--combo", "seed=1"], "use --seeds"),
    (["--combo", "eta='3"], "No closing quotation"),
    (["--combo", "loss_type=dpo eta=3", "--grid", "eta=3,10"], "is a --grid flag too"),
    (["--combo", "loss_type=dpo beta=0.3", "--", "--beta", "1"], "a --combo sets it"),
])
def test_bad_specs_fail_with_one_line_and_exit_2(tmp_path, fake, capsys, argv, says):
    dash = argv.index("--") if "--" in argv else len(argv)
    argv = argv[:dash] + ["--out", str(tmp_path / "sw")] + argv[dash:]
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and says in err and "\n" not in err, err
    assert not (tmp_path / "sw").exists() and fake() == []  # nothing written, nothing run


def test_bad_spec_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tools.sweep", "--out", str(tmp_path / "sw"), "--grid", "eta=3,,10"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "--grid 'eta=3,,10': empty value" in proc.stderr and proc.stdout == ""


def test_finished_cells_are_skipped_and_failed_ones_retried(tmp_path, fake, monkeypatch):
    out = tmp_path / "sw"
    argv = ["--out", str(out)] + GRID + PASS
    monkeypatch.setenv("FAKE_FAIL", "loss_type=dpo__eta=3__seed=0")
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(argv)
    assert exit_info.value.code == 1
    names = [c["name"] for c in sweep.cells(sweep.parse_grid(["loss_type=sppo,dpo", "eta=3,10"]), [0, 1], [])]
    assert fake() == names  # every cell tried once, in order, despite the failure
    assert not (out / "loss_type=dpo__eta=3__seed=0" / sweep.DONE).exists()
    assert all((out / n / sweep.DONE).exists() for n in names if n != "loss_type=dpo__eta=3__seed=0")
    monkeypatch.delenv("FAKE_FAIL")
    sweep.main(argv)
    assert fake() == names + ["loss_type=dpo__eta=3__seed=0"]  # only the failed cell ran again
    sweep.main(argv)
    assert len(fake()) == len(names) + 1  # all done: nothing runs
    recorded = json.loads((out / "sweep.json").read_text())
    assert recorded["grid"] == [["loss_type", ["sppo", "dpo"]], ["eta", ["3", "10"]]] and recorded["seeds"] == [0, 1]
    assert recorded["iterate_args"] == ["--preset", "toy", "--iterations", "2"] and "--grid eta=3,10" in recorded["command"]


def test_a_finished_cell_with_other_flags_is_refused(tmp_path, fake, capsys):
    out = tmp_path / "sw"
    sweep.main(["--out", str(out)] + GRID + PASS)
    (out / "loss_type=sppo__eta=3__seed=0" / sweep.DONE).unlink()  # the first cell would run again
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["--out", str(out)] + GRID + ["--", "--preset", "toy", "--iterations", "3"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and sweep.DONE in err and "field 'args'" in err
    assert len(fake()) == 8  # refused before any cell ran


def test_killed_sweep_resumes_and_ends_as_an_uninterrupted_one(tmp_path, fake):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    victim = "loss_type=sppo__eta=10__seed=1"
    code = ("import sys; from tools import sweep; sweep.ITERATE = [sys.executable, sys.argv[1]]; sweep.main(sys.argv[2:])")
    proc = subprocess.run([sys.executable, "-c", code, sweep.ITERATE[1], "--out", str(killed)] + GRID + PASS,
                          cwd=ROOT, env=dict(os.environ, FAKE_KILL=victim), capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    names = [c["name"] for c in sweep.cells(sweep.parse_grid(["loss_type=sppo,dpo", "eta=3,10"]), [0, 1], [])]
    before = names[:names.index(victim) + 1]
    assert fake() == before  # the kill came in the middle of the victim cell
    assert not (killed / victim / sweep.DONE).exists() and (killed / victim / "eval.json").exists()
    assert not (killed / "results.csv").exists()
    sweep.main(["--out", str(killed)] + GRID + PASS)
    assert fake() == before + names[len(before) - 1:]  # the victim and the cells after it, nothing else
    sweep.main(["--out", str(whole)] + GRID + PASS)
    for name in ("results.csv", "results.md"):
        assert (killed / name).read_text() == (whole / name).read_text()


def test_a_second_sweep_in_the_same_directory_is_refused(tmp_path, fake, capsys):
    out = tmp_path / "sw"
    out.mkdir()
    with open(out / "sweep.lock", "w") as held:  # a running sweep holds this lock
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SystemExit) as exit_info:
            sweep.main(["--out", str(out)] + GRID + PASS)
    assert exit_info.value.code == 2 and "another sweep is running" in capsys.readouterr().err and fake() == []
    sweep.main(["--out", str(out)] + GRID + PASS)  # the lock is free again
    assert len(fake()) == 8


def alive(pid):
    """A process that exists and is not a zombie (nobody may reap orphans in a container)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_sigterm_stops_the_running_cell_and_its_stages(tmp_path, fake):
    out, victim = tmp_path / "sw", "loss_type=sppo__eta=3__seed=0"
    code = ("import sys; from tools import sweep; sweep.ITERATE = [sys.executable, sys.argv[1]]; sweep.main(sys.argv[2:])")
    proc = subprocess.Popen([sys.executable, "-c", code, sweep.ITERATE[1], "--out", str(out)] + GRID + PASS,
                            cwd=ROOT, env=dict(os.environ, FAKE_HANG=victim), stdout=subprocess.DEVNULL)
    pids_file = out / victim / "pids"
    deadline = time.time() + 60
    while not pids_file.exists() and time.time() < deadline:
        time.sleep(0.1)
    pids = [int(p) for p in pids_file.read_text().split()]
    try:
        assert all(alive(p) for p in pids)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        deadline = time.time() + 10
        while any(alive(p) for p in pids) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(alive(p) for p in pids)  # the fake iterate.py and its stage are gone
    finally:  # leave nothing running when the test fails
        for pid in filter(alive, pids):
            os.kill(pid, signal.SIGKILL)
    assert not (out / victim / sweep.DONE).exists()
    sweep.main(["--out", str(out)] + GRID + PASS)
    assert fake()[-8:] == [c["name"] for c in sweep.cells(sweep.parse_grid(["loss_type=sppo,dpo", "eta=3,10"]), [0, 1], [])]


def test_aggregation_against_hand_computed_mean_and_std(tmp_path, capsys):
    out = tmp_path / "sw"
    nan = float("nan")
    data = {  # (loss_type, seed) -> rows; 'flag', 'note', 'mean_policy' are not numeric metrics
        ("sppo", 0): [{"iteration": 0, "win": 0.5, "exploit": 0.30, "eta_eff": nan, "flag": True, "note": "a",
                       "mean_policy": [0.2, 0.8]},
                      {"iteration": 1, "win": 0.61, "exploit": 0.21, "eta_eff": 4.0, "flag": False}],
        ("sppo", 1): [{"iteration": 0, "win": 0.5, "exploit": 0.34, "eta_eff": nan},
                      {"iteration": 1, "win": 0.55, "exploit": 0.25, "eta_eff": 6.0}],
        ("sppo", 2): [{"iteration": 0, "win": 0.5, "exploit": 0.35, "eta_eff": nan}],  # stopped after iteration 0
        ("dpo", 0): [{"iteration": 0, "win": 0.5, "exploit": 0.31}, {"iteration": 1, "win": 0.7, "exploit": 0.4}],
        # ("dpo", 1) and ("dpo", 2): never started
    }
    for (loss, seed), rows in data.items():
        cell = out / f"loss_type={loss}__seed={seed}"
        cell.mkdir(parents=True)
        (cell / "eval.json").write_text(json.dumps(rows))
    sweep.main(["--out", str(out), "--aggregate-only", "--grid", "loss_type=sppo,dpo", "--seeds", "0,1,2",
                "--metric", "exploit"])
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["loss_type", "iteration", "n", "win_mean", "win_std", "exploit_mean", "exploit_std",
                              "eta_eff_mean", "eta_eff_std"]
    assert [(r["loss_type"], r["iteration"], r["n"]) for r in table] == [
        ("sppo", "0", "3"), ("sppo", "1", "2"), ("dpo", "0", "1"), ("dpo", "1", "1")]

    def close(text, value):
        return (text == "" and value is None) or (text != "" and math.isclose(float(text), value, rel_tol=1e-12))

    m = (0.30 + 0.34 + 0.35) / 3
    s = math.sqrt(((0.30 - m) ** 2 + (0.34 - m) ** 2 + (0.35 - m) ** 2) / 2)
    assert close(table[0]["exploit_mean"], m) and close(table[0]["exploit_std"], s)
    m1 = (0.21 + 0.25) / 2
    assert close(table[1]["exploit_mean"], m1)
    assert close(table[1]["exploit_std"], math.sqrt(((0.21 - m1) ** 2 + (0.25 - m1) ** 2) / 1))
    assert close(table[1]["win_mean"], 0.58) and close(table[1]["eta_eff_mean"], 5.0)
    assert close(table[0]["eta_eff_mean"], None) and close(table[0]["win_std"], 0.0)  # NaN only: empty
    assert close(table[3]["exploit_mean"], 0.4) and close(table[3]["exploit_std"], None)  # one seed: no std
    assert close(table[2]["eta_eff_mean"], None)  # a metric a cell does not have
    md = (out / "results.md").read_text().splitlines()
    assert md[0] == "| loss_type | iteration | n | win | exploit | eta_eff |"
    assert md[2] == f"| sppo | 0 | 3 | 0.500 ± 0.000 | {m:.3f} ± {s:.3f} |  |"
    assert md[5] == "| dpo | 1 | 1 | 0.700 | 0.400 |  |"
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "sweep.json").exists()  # --aggregate-only records no sweep

    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["--out", str(out), "--aggregate-only", "--grid", "loss_type=sppo,dpo", "--metric", "note"])
    assert exit_info.value.code == 2 and "--metric 'note'" in capsys.readouterr().err


def test_aggregate_only_uses_the_recorded_grid(tmp_path, fake, monkeypatch):
    out = tmp_path / "sw"
    sweep.main(["--out", str(out)] + GRID + PASS)
    calls = fake()
    first = (out / "results.csv").read_text()
    for name in ("results.csv", "results.md", "results.png"):
        (out / name).unlink()
    sweep.main(["--out", str(out), "--aggregate-only", "--metric", "score"])
    assert fake() == calls and (out / "results.csv").read_text() == first and (out / "results.png").exists()
    # the fake's score: shift(loss) + eta * t + 0.1 * seed; mean over seeds 0, 1 adds 0.05, std = 0.1 / sqrt(2)
    row = next(r for r in csv.DictReader(first.splitlines()) if r["loss_type"] == "dpo" and r["eta"] == "10"
               and r["iteration"] == "2")
    assert math.isclose(float(row["score_mean"]), 0.5 + 10 * 2 + 0.05)
    assert math.isclose(float(row["score_std"]), 0.1 / math.sqrt(2))
    assert "flag_mean" not in row  # booleans are not metrics


def test_bad_eval_json_names_the_file(tmp_path, capsys):
    cell = tmp_path / "sw" / "seed=0"
    cell.mkdir(parents=True)
    (cell / "eval.json").write_text('[{"iteration": 0, "x": 1}, {"x": 2}]')
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["--out", str(tmp_path / "sw"), "--aggregate-only", "--seeds", "0"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"{cell / 'eval.json'}: row 1: field 'iteration'" in err


def test_combos_pair_each_setting_with_its_own_values_times_the_grid():
    combos = sweep.parse_combos(["loss_type=sppo eta=10", "loss_type=dpo beta=0.3", "loss_type=ipo 'prompts=a b.jsonl'"], {})
    assert combos == [{"loss_type": "sppo", "eta": "10"}, {"loss_type": "dpo", "beta": "0.3"},
                      {"loss_type": "ipo", "prompts": "a b.jsonl"}]
    got = sweep.cells({"K": ["3", "5"]}, [1], ["--preset", "toy"], combos)
    assert [c["name"] for c in got] == [
        "loss_type=sppo__eta=10__K=3__seed=1", "loss_type=sppo__eta=10__K=5__seed=1",
        "loss_type=dpo__beta=0.3__K=3__seed=1", "loss_type=dpo__beta=0.3__K=5__seed=1",
        "loss_type=ipo__prompts=a-b.jsonl-" + got[4]["name"].split("prompts=a-b.jsonl-")[1].split("__")[0] + "__K=3__seed=1",
        got[5]["name"]]
    assert got[3]["args"] == ["--preset", "toy", "--loss_type", "dpo", "--beta", "0.3", "--K", "5", "--seed", "1"]
    assert got[4]["args"][got[4]["args"].index("--prompts") + 1] == "a b.jsonl"
    assert sweep.setting_keys([c["settings"] for c in got]) == ["loss_type", "eta", "K", "beta", "prompts"]


def test_combo_sweep_runs_its_cells_and_tabulates_the_chosen_columns(tmp_path, fake, capsys):
    out = tmp_path / "sw"
    argv = ["--out", str(out), "--combo", "loss_type=sppo eta=3", "--combo", "loss_type=dpo", "--seeds", "0,1",
            "--columns", "score"] + PASS
    sweep.main(argv)
    names = ["loss_type=sppo__eta=3__seed=0", "loss_type=dpo__seed=0", "loss_type=sppo__eta=3__seed=1", "loss_type=dpo__seed=1"]
    assert fake() == names
    printed = capsys.readouterr().out
    md = (out / "results.md").read_text().splitlines()
    assert md[0] == "| loss_type | eta | iteration | n | score |" and md[0] in printed
    # the fake's score: shift(loss) + eta * t + 0.1 * seed (eta 10 when not given); seeds 0 and 1
    std = 0.1 / 2 ** 0.5
    assert md[2 + 2] == f"| sppo | 3 | 2 | 2 | {3 * 2 + 0.05:.3f} ± {std:.3f} |"
    assert md[2 + 3 + 1] == f"| dpo |  | 1 | 2 | {0.5 + 10 + 0.05:.3f} ± {std:.3f} |"
    rows = list(csv.DictReader((out / "results.csv").read_text().splitlines()))
    assert list(rows[0])[:4] == ["loss_type", "eta", "iteration", "n"] and "score_mean" in rows[0]
    assert [(r["loss_type"], r["eta"]) for r in rows] == [("sppo", "3")] * 3 + [("dpo", "")] * 3
    recorded = json.loads((out / "sweep.json").read_text())
    assert recorded["combos"] == [[["loss_type", "sppo"], ["eta", "3"]], [["loss_type", "dpo"]]]
    before = (out / "results.csv").read_text()
    (out / "results.csv").unlink()
    sweep.main(["--out", str(out), "--aggregate-only"])  # the recorded combos, nothing run
    assert fake() == names and (out / "results.csv").read_text() == before
    assert (out / "results.md").read_text().splitlines() == md  # score is the fake's only numeric field
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["--out", str(out), "--aggregate-only", "--columns", "score,nope"])
    assert exit_info.value.code == 2 and "nope not a numeric field" in capsys.readouterr().err
