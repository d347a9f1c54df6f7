"""Nothing a stage or a driver starts outlives it (machinery/lifetime.py), and Ctrl-C ends a run: the
processes are listed from /proc after each kill. The real vLLM engine's are in
tests/vllm_engine/test_nothing_outlives_the_stage.py; here a stand-in `vllm` starts processes as the
real one does (multiprocessing spawn: an engine core, which starts a worker), so that generate.py's
own code is what is tested."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from processes import signal_when
from tools import sweep

ROOT = Path(__file__).resolve().parents[2]

FAKE_VLLM = '''
import multiprocessing, time

def worker():
    time.sleep(600)

def engine_core():
    multiprocessing.get_context("spawn").Process(target=worker, name="worker").start()
    time.sleep(600)

class LLM:  # an engine that takes its time to start, in processes of its own
    def __init__(self, **kwargs):
        multiprocessing.get_context("spawn").Process(target=engine_core, name="engine core").start()
        time.sleep(600)
'''


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_the_engine_processes_end_with_generate(toy_world, tmp_path, sig):
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text(FAKE_VLLM)
    cmd = [sys.executable, str(ROOT / "generate.py"), "--model", str(toy_world["model"]), "--prompts",
           str(toy_world["eval_prompts"]), "--out", str(tmp_path / "out.jsonl"), "--backend", "vllm", "--kv_cache_gib", "0.1", "--max_new_tokens", "8"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    code, _, left = signal_when(cmd, sig, lambda commands, log: sum("multiprocessing.spawn" in c for c in commands) == 2,
                                tmp_path / "log", cwd=ROOT, env=env)
    assert code == -sig
    assert not left, f"left running after generate.py got signal {sig}: {left}"


# A cell of a sweep: holds its run directory as iterate.py does, runs one stage as iterate.py runs
# it (launch.run_process), then writes eval.json.
FAKE_ITERATE = '''
import argparse, json, os, sys
from pathlib import Path
from machinery.launch import run_process
from machinery.records import exclusive_lock, fail_with, InputError
ap = argparse.ArgumentParser()
ap.add_argument("--run_dir", type=Path)
ap.add_argument("--seed", type=int)
args, _ = ap.parse_known_args()
try:
    with exclusive_lock(args.run_dir / ".lock", f"{args.run_dir}: another iterate.py is running in this directory"):
        run_process([sys.executable, "-c", f"import time; time.sleep({os.environ['STAGE_SECONDS']})"])
        (args.run_dir / "eval.json").write_text(json.dumps([{"iteration": 0, "score": 1.0}]))
except InputError as e:
    fail_with(e)
'''


def test_a_killed_sweep_takes_its_cell_and_stage_along(tmp_path, monkeypatch):
    fake = tmp_path / "fake_iterate.py"
    fake.write_text(FAKE_ITERATE)
    out = tmp_path / "sw"
    code = "import sys; from tools import sweep; sweep.ITERATE = [sys.executable, sys.argv[1]]; sweep.main(sys.argv[2:])"
    env = dict(os.environ, PYTHONPATH=str(ROOT), STAGE_SECONDS="120")
    args = ["--out", str(out), "--grid", "eta=3", "--", "--iterations", "1"]
    killed, _, left = signal_when([sys.executable, "-c", code, str(fake)] + args, signal.SIGKILL,
                                  lambda commands, log: any("time.sleep(120)" in c for c in commands),
                                  tmp_path / "log", cwd=ROOT, env=env)
    assert killed == -signal.SIGKILL
    assert not left, f"left running after the sweep was killed: {left}"
    # the same sweep again at once: the cell is free to run, its stage finishes, the table has its row
    monkeypatch.setattr(sweep, "ITERATE", [sys.executable, str(fake)])
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("STAGE_SECONDS", "0.1")
    sweep.main(args)
    assert (out / "eta=3__seed=0" / sweep.DONE).exists()


# A stage run in iterate.py's process (launch.run_here): its garbage holds a finalizer, and Ctrl-C
# lands while the collector runs it, where Python prints the KeyboardInterrupt and drops it.
FAKE_STAGE = '''
import os, signal, time

class Model:
    def __init__(self):
        self.cycle = self  # garbage only the collector frees

    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, now
        time.sleep(0.5)

def main(argv):
    Model()
'''


def test_ctrl_c_that_lands_in_a_finalizer_ends_the_run(tmp_path):
    (tmp_path / "stage.py").write_text(FAKE_STAGE)
    driver = ("import sys, time; from pathlib import Path; from machinery.launch import run_here; "
              "from machinery.records import one_line_errors\n"
              "def main():\n"
              "    run_here(Path(sys.argv[1]), [])\n"
              "    print('the next stage', flush=True); time.sleep(20)\n"
              "one_line_errors(main)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    t0 = time.time()
    run = subprocess.run([sys.executable, "-c", driver, str(tmp_path / "stage.py")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert "KeyboardInterrupt" in run.stderr  # it did land in the finalizer
    assert run.returncode == 130 and time.time() - t0 < 15, (run.returncode, run.stdout, run.stderr[-2000:])
    assert "interrupted" in run.stderr.splitlines()
