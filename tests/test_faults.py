"""Fault injection: kill -9 each stage of an iteration at a random point (seeded), re-run, and end
byte-identical to an uninterrupted run with nothing stale left."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import toy
from common import write_records
from test_distributed import process_tree

ROOT = Path(__file__).resolve().parents[1]
SEED = 1234  # where the kills land
# files whose content records when or how the run went (times, argv, resumed step), not its results
RUN_RECORDS = {"config.json", "timings.jsonl", "train_info.json", "metrics.jsonl", "responses.jsonl.info.json"}


def iterate_cmd(toy_world, prompts, run_dir):
    return [sys.executable, str(ROOT / "iterate.py"), "--model", str(toy_world["model"]), "--prompts", str(prompts),
            "--judge", "toy:ToyJudge", "--judge_path", str(toy_world["world"]), "--preset", "toy", "--iterations", "1",
            "--K", "3", "--epochs", "3", "--global_batch", "4", "--save_every", "1", "--run_dir", str(run_dir)]


def stage_running(pid, script):
    for p in process_tree(pid):
        try:
            if script in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace"):
                return True
        except OSError:
            pass
    return False


def files(run_dir):
    return {str(p.relative_to(run_dir)): p for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_kill_each_stage_then_rerun_is_byte_identical(tmp_path, toy_world):
    prompts = tmp_path / "prompts.jsonl"
    write_records(prompts, toy.make_prompts()[0][:16])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ref = tmp_path / "ref"
    res = subprocess.run(iterate_cmd(toy_world, prompts, ref), cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    seconds = {t["stage"]: t["seconds"] for t in map(json.loads, (ref / "timings.jsonl").read_text().splitlines())}

    rng = random.Random(SEED)
    run_dir = tmp_path / "killed"
    killed = []
    for stage in ("generate", "rank", "train"):
        proc = subprocess.Popen(iterate_cmd(toy_world, prompts, run_dir), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 300
        while not stage_running(proc.pid, f"{stage}.py"):
            assert proc.poll() is None and time.time() < deadline, f"{stage} never started"
            time.sleep(0.02)
        delay = rng.uniform(0, seconds[stage])
        time.sleep(delay)
        for pid in process_tree(proc.pid):  # iterate.py and its stage, at once, no clean-up
            os.kill(pid, signal.SIGKILL)
        proc.wait()
        killed.append((stage, round(delay, 2), round(seconds[stage], 2)))
    print("kills (stage, seconds into it, its uninterrupted duration):", killed)

    res = subprocess.run(iterate_cmd(toy_world, prompts, run_dir), cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    want, got = files(ref), files(run_dir)
    assert sorted(got) == sorted(want)  # nothing stale left: no temporaries, shards or checkpoints
    for name, path in want.items():
        if Path(name).name not in RUN_RECORDS:
            assert got[name].read_bytes() == path.read_bytes(), name
