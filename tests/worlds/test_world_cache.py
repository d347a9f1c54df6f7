"""Runs and sweep cells of one built-in world and seed share one world directory, built once:
atomically, one builder at a time, and again after a builder was killed."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from machinery import flags
import iterate
from machinery.records import InputError, build_once
from tools import sweep

ROOT = Path(__file__).resolve().parents[2]

# Builds DIR with records.build_once: notes its pid in DIR.log, writes a file, sleeps SLEEP seconds, writes another.
BUILDER = r'''
import sys, time
from pathlib import Path
from machinery.records import build_once
out, sleep = Path(sys.argv[1]), float(sys.argv[2])
with build_once(out) as tmp:
    if tmp is not None:
        with open(f"{out}.log", "a") as log:
            log.write(f"{__import__('os').getpid()}\n")
        (tmp / "first").write_text("1")
        time.sleep(sleep)
        (tmp / "second").write_text("2")
print(sorted(p.name for p in out.iterdir()))
'''


def start_builder(tmp_path, out, sleep):
    script = tmp_path / "builder.py"
    script.write_text(BUILDER)
    return subprocess.Popen([sys.executable, str(script), str(out), str(sleep)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))


def builds(out):
    return Path(f"{out}.log").read_text().split()


def test_two_builders_at_once_build_once(tmp_path):
    out = tmp_path / "world"
    procs = [start_builder(tmp_path, out, 2.0) for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert len(builds(out)) == 1  # the second waited for the first and found the world built
    assert all(stdout.strip() == "['done', 'first', 'second']" for stdout, _ in results), results
    assert sorted(p.name for p in tmp_path.iterdir()) == ["builder.py", "world", "world.log"]


def test_a_killed_build_leaves_nothing_and_the_next_one_builds(tmp_path):
    out = tmp_path / "world"
    proc = start_builder(tmp_path, out, 120.0)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".world.tmp*/first")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not out.exists()  # half a world is never in place
    proc = start_builder(tmp_path, out, 0.0)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert len(builds(out)) == 2 and stdout.strip() == "['done', 'first', 'second']"
    assert not list(tmp_path.glob(".world.tmp*"))  # the killed builder's directory is gone


def test_a_directory_that_is_not_a_finished_build_is_refused(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not a world")
    with pytest.raises(InputError, match="no finished build"):
        with build_once(mine):
            pass
    assert (mine / "notes.txt").read_text() == "not a world"
    empty = tmp_path / "empty"
    empty.mkdir()
    with build_once(empty) as tmp:  # an empty directory (e.g. made by mkdir) is built into
        (tmp / "x").write_text("x")
    assert sorted(p.name for p in empty.iterdir()) == ["done", "x"]
    with build_once(empty) as tmp:
        assert tmp is None


def test_a_failed_build_leaves_nothing(tmp_path):
    out = tmp_path / "world"
    with pytest.raises(RuntimeError):
        with build_once(out) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("the build failed")
    assert not any(tmp_path.iterdir())  # no half-built directory, no lock file


def test_sweep_cells_of_one_seed_share_the_world_and_other_code_gets_another(tmp_path, monkeypatch):
    grid = sweep.parse_grid(["loss_type=sppo,dpo", "eta=3,10"])
    dirs = {}
    for cell in sweep.cells(grid, [0, 1], ["--preset", "toy"]):
        args = flags.iterate_args(cell["args"] + ["--run_dir", str(tmp_path / cell["name"])])
        dirs.setdefault(cell["seed"], set()).add(iterate.default_world_dir(args.preset, args.seed))
    assert len(dirs[0]) == len(dirs[1]) == 1 and dirs[0] != dirs[1]
    # another version of the world's code (or of a shared module it is built with) is another world
    for name in ("worlds/toy.py", *iterate.WORLD_CODE):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes((ROOT / name).read_bytes())
    monkeypatch.setattr(iterate, "HERE", tmp_path)
    assert iterate.default_world_dir("toy", 0) in dirs[0]
    for name in ("worlds/toy.py", *iterate.WORLD_CODE):
        original = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(original + b"\n# edited\n")
        assert iterate.default_world_dir("toy", 0) not in dirs[0], name
        (tmp_path / name).write_bytes(original)
    monkeypatch.setenv("SPPO_CACHE", str(tmp_path / "cache"))
    assert iterate.default_world_dir("toy", 0).parent == tmp_path / "cache" / "worlds"


def test_runs_reuse_a_built_world(tmp_path, toy_world):
    """Two runs on one --world_dir (the test session's toy world): neither builds or touches it."""
    world_dir = Path(toy_world["world"]).parent
    before = {p: p.stat().st_mtime_ns for p in world_dir.rglob("*")}
    for run in ("a", "b"):
        res = subprocess.run([sys.executable, "iterate.py", "--world_dir", str(world_dir), "--run_dir", str(tmp_path / run),
                              "--iterations", "1", "--prompts_per_iteration", "4", "--K", "2", "--epochs", "1",
                              "--global_batch", "2"], cwd=ROOT, capture_output=True, text=True, timeout=1800)
        assert res.returncode == 0, res.stderr[-3000:]
        config = json.loads((tmp_path / run / "config.json").read_text())["config"]
        assert config["model"] == str(toy_world["model"]) and config["world_dir"] == str(world_dir)
    assert {p: p.stat().st_mtime_ns for p in world_dir.rglob("*")} == before
