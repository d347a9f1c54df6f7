"""iterate.py running its stages in its own process (one CPU process): the same files as one
process per stage, also after a kill and a re-run; per-stage times kept; a failing stage still
one line and a non-zero exit."""
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
from machinery import launch
import rank
from machinery.records import InputError, write_records

ROOT = Path(__file__).resolve().parents[2]
RUN_RECORDS = {"responses.jsonl.info.json", "train_info.json", "metrics.jsonl", "timings.jsonl", "config.json"}  # times, argv


def small_run(world, run_dir, *extra):
    return [sys.executable, "iterate.py", "--world_dir", str(Path(world["world"]).parent), "--run_dir", str(run_dir),
            "--iterations", "2", "--prompts_per_iteration", "6", "--K", "3", "--epochs", "2", "--global_batch", "4",
            *extra]


def test_in_process_stages_killed_and_resumed_write_what_separate_processes_write(tmp_path, toy_world):
    one, apart = tmp_path / "one", tmp_path / "apart"
    res = subprocess.run(small_run(toy_world, apart, "--no-in_process"), cwd=ROOT, capture_output=True, text=True,
                         timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    # in one process, killed while iteration 1 trains, then the same command again
    proc = subprocess.Popen(small_run(toy_world, one, "--in_process"), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 1800
    while not (one / "iter1/model.tmp").exists():  # train.py's work dir: it is in its training loop
        # (a sleep after rank.py's output raced the stages: on an idle host iteration 2 had begun)
        assert proc.poll() is None and time.time() < deadline and not (one / "iter1/model").exists()
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (one / "iter2").exists()
    res = subprocess.run(small_run(toy_world, one, "--in_process"), cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    files = sorted(str(p.relative_to(one)) for p in one.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(apart)) for p in apart.rglob("*") if p.is_file())  # nothing stale
    assert {"iter2/model/model.safetensors", "eval.json", "eval.png"} <= set(files)
    for name in files:  # bit for bit: no state leaks from one stage into the next (RNG, argv, ...)
        if Path(name).name not in RUN_RECORDS:
            assert (one / name).read_bytes() == (apart / name).read_bytes(), name
    every = [(t, s) for t in (1, 2) for s in ("generate", "rank", "train")]
    for run in (one, apart):  # each stage that ran to the end has its time and peak memory, once
        times = [json.loads(line) for line in (run / "timings.jsonl").read_text().splitlines()]
        stages = [(t["iteration"], t["stage"]) for t in times if "peak_rss_gb" in t]
        # (the killed run lacks a stage that finished just before the kill, before its time was written)
        assert stages == every if run == apart else stages == [s for s in every if s in stages], times
        assert len(stages) >= 5 and all(t["seconds"] > 0 and t["peak_rss_gb"] > 0.05 for t in times if "peak_rss_gb" in t)
    # pi_0 is evaluated before iteration 1 (iteration 0's time), then each new policy after its training
    assert [t["iteration"] for t in map(json.loads, (apart / "timings.jsonl").read_text().splitlines())
            if t["stage"] == "evaluate"] == [0, 1, 2]
    assert [row["iteration"] for row in json.loads((apart / "eval.json").read_text())] == [0, 1, 2]
    argv = json.loads((one / "iter1/model/train_info.json").read_text())["argv"]
    assert Path(argv[0]).name == "train.py" and "--ranked" in argv  # the stage's own command line


def test_a_stage_that_fails_in_process_says_why_in_one_line(tmp_path, toy_world, capsys):
    prompts = tmp_path / "prompts.jsonl"
    write_records(prompts, [{"id": i, "prompt": f"Which fruit suits the picnic number {i}?"} for i in range(4)])
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        iterate.main(["--model", str(toy_world["model"]), "--prompts", str(prompts), "--judge",
                      "tiny_models:NotAPreferenceJudge", "--preset", "toy", "--iterations", "1", "--K", "2",
                      "--run_dir", str(run_dir), "--in_process"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 2 and "not a preference matrix" in errors[0], err
    assert errors[1] == "error: iteration 1: rank.py exited with code 2" and "Traceback" not in err
    assert (run_dir / "iter1/responses.jsonl").exists() and not (run_dir / "iter1/ranked.jsonl").exists()


@pytest.mark.parametrize("raised, code, says", [(InputError("x.jsonl:3: field 'P': bad"), 2, "error: x.jsonl:3: field 'P': bad"),
                                                (SystemExit("stopped"), 1, "stopped"), (SystemExit(3), 3, None),
                                                (SystemExit(0), 0, None)])
def test_run_here_turns_what_a_stage_raises_into_an_exit_code(monkeypatch, capsys, raised, code, says):
    argv_seen = []

    def main(argv):
        argv_seen.append((list(argv), list(sys.argv)))
        raise raised
    monkeypatch.setattr(rank, "main", main)
    before = list(sys.argv)
    got, _ = launch.run_here(ROOT / "rank.py", ["--out", Path("o.jsonl")])
    assert got == code and sys.argv == before
    assert argv_seen == [(["--out", "o.jsonl"], [str(ROOT / "rank.py"), "--out", "o.jsonl"])]
    err = capsys.readouterr().err
    assert (says in err) if says else err == ""


@pytest.mark.parametrize("traceback", ["1", None])
def test_run_here_shows_the_traceback_as_a_stage_process_does(monkeypatch, capsys, traceback):
    """SPPO_TRACEBACK=1 puts the traceback (with the error the InputError was raised from) before the
    one line, in process as in a stage's own process (records.fail_with); without it, the line alone."""
    def main(argv):
        try:
            int("x")
        except ValueError as e:
            raise InputError("judge my:judge failed") from e
    monkeypatch.setattr(rank, "main", main)
    if traceback:
        monkeypatch.setenv("SPPO_TRACEBACK", traceback)
    else:
        monkeypatch.delenv("SPPO_TRACEBACK", raising=False)
    code, _ = launch.run_here(ROOT / "rank.py", [])
    err = capsys.readouterr().err
    assert code == 2 and err.rstrip().splitlines()[-1] == "error: judge my:judge failed", err
    assert ("Traceback" in err and "invalid literal for int()" in err) == bool(traceback), err


def test_in_process_by_default_for_one_cpu_process_only(monkeypatch):
    import torch
    decide = lambda *argv: launch.stages_in_process(flags.iterate_args(list(argv)))  # noqa: E731
    assert decide() is True and decide("--no-in_process") is False
    assert decide("--nproc_per_node", "2") is False  # torchrun
    assert decide("--backend", "vllm") is True  # one vLLM engine kept for the whole run
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert decide() is False and decide("--in_process") is True  # GPUs: memory freed between stages
    with pytest.raises(SystemExit):
        flags.iterate_args(["--in_process", "--nproc_per_node", "2"])
