"""Fault injection: kill -9 each stage at a random point of its work (seeded), run it again, and
end byte-identical to an uninterrupted run with nothing stale left."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import generate
import rank
from worlds import toy
import train
from machinery.records import write_records
from processes import in_process, process_tree

ROOT = Path(__file__).resolve().parents[2]
SEED = 1234  # where the kills land
RUN_RECORDS = {"responses.jsonl.info.json", "train_info.json", "metrics.jsonl"}  # times, argv: not results
# each stage's progress bar shows when its work (not its imports) has begun
STARTED = {"generate": "generate:", "rank": "rank:", "train": "reference:"}


def stage_args(toy_world, d):
    return {
        "generate": ["--model", toy_world["model"], "--prompts", d / "prompts.jsonl", "--out", d / "responses.jsonl",
                     "--K", "3", "--max_new_tokens", "16", "--batch_size", "4", "--seed", "7"],
        "rank": ["--responses", d / "responses.jsonl", "--out", d / "ranked.jsonl", "--judge", "toy:ToyJudge",
                 "--judge_path", toy_world["world"], "--batch_size", "4"],
        "train": ["--model", toy_world["model"], "--ranked", d / "ranked.jsonl", "--out", d / "model", "--eta", "10",
                  "--lr", "1e-4", "--lr_schedule", "constant", "--epochs", "3", "--global_batch", "8",
                  "--micro_batch", "4", "--max_prompt_length", "64", "--max_length", "96", "--save_every", "1"],
    }


MAINS = {"generate": generate.main, "rank": rank.main, "train": train.main}


def files(d):
    return {str(p.relative_to(d)): p for p in sorted(d.rglob("*")) if p.is_file()}


def test_kill_each_stage_then_rerun_is_byte_identical(tmp_path, toy_world):
    ref, run = tmp_path / "ref", tmp_path / "killed"
    for d in (ref, run):
        d.mkdir()
        write_records(d / "prompts.jsonl", toy.make_prompts()[0][:48])
    work_seconds = {}
    for stage, args in stage_args(toy_world, ref).items():  # the uninterrupted run, one thread as below
        t0 = time.time()
        in_process(MAINS[stage], *args)
        work_seconds[stage] = time.time() - t0

    rng = random.Random(SEED)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    kills = []
    for stage, args in stage_args(toy_world, run).items():
        log = tmp_path / f"{stage}.log"
        with open(log, "w") as err:
            proc = subprocess.Popen([sys.executable, str(ROOT / f"{stage}.py"), *map(str, args)], cwd=ROOT, env=env,
                                    stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        deadline = time.time() + 300
        while STARTED[stage] not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text()[-2000:]
            assert time.time() < deadline
            time.sleep(0.01)
        delay = rng.uniform(0, work_seconds[stage])
        time.sleep(delay)
        for pid in process_tree(proc.pid):
            os.kill(pid, signal.SIGKILL)
        proc.wait()
        kills.append((stage, f"{delay:.2f} s of {work_seconds[stage]:.2f} s", "finished" if proc.returncode == 0 else "killed"))
        in_process(MAINS[stage], *args)  # the same command again
    print("kills:", kills)
    for log in tmp_path.glob("*.log"):
        log.unlink()
    want, got = files(ref), files(run)
    assert sorted(got) == sorted(want)  # nothing stale: no temporaries, shards, checkpoints or work dirs
    for name, path in want.items():
        if Path(name).name not in RUN_RECORDS:
            assert got[name].read_bytes() == path.read_bytes(), name
