"""The GPU check (tests/gpu/check.sh) on a machine without CUDA: its one line and exit code, and every
command it would run on a GPU read with the project's own parsers, so the script cannot rot here."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def load(name):
    sys.path.insert(0, str(HERE))
    try:
        spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(HERE))


def test_without_cuda_the_check_says_so_in_one_line_and_exits_3(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: run bash tests/gpu/check.sh itself")
    res = subprocess.run(["bash", "tests/gpu/check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "SPPO_PYTHON": sys.executable,
                              "SPPO_GPU_CHECK_DIR": str(tmp_path / "work")})
    assert res.returncode == load("check").NO_CUDA == 3, res.stderr[-2000:]
    assert res.stdout.splitlines() == ["no CUDA device (torch.cuda.is_available() is False): the GPU check needs an "
                                       "NVIDIA GPU; nothing was run"], res.stdout
    assert not (tmp_path / "work").exists()  # nothing made


@pytest.mark.parametrize("gpus", [1, 2])
def test_every_command_of_the_gpu_check_parses_with_the_projects_own_parsers(tmp_path, gpus):
    """Each stage command with its stage's parser (train.py's checked together, as train.py does),
    iterate.py's with iterate_args, torchrun's own flags with torchrun's parser, the check's steps
    with theirs; every path a command reads that the check does not make itself is a file the
    project ships or builds."""
    from torch.distributed.run import get_args_parser

    from machinery import flags
    check, steps = load("check"), load("gpu_steps")
    plan = check.checks(tmp_path, gpus)
    assert len(plan) == 8 + (gpus >= 2)
    parsed = {"generate.py": 0, "rank.py": 0, "train.py": 0, "gpu_steps.py": 0, "iterate.py": 0, "torchrun": 0}
    for c in plan:
        assert callable(c.verify) and c.commands
        for command in c.commands:
            argv = [str(a) for a in (command.argv if isinstance(command, check.Kill) else command)]
            assert argv[0] == sys.executable
            if argv[1:3] == ["-m", "torch.distributed.run"]:
                script = next(i for i, a in enumerate(argv) if a.endswith(".py"))
                torchrun = get_args_parser().parse_args(argv[3:script + 1])
                assert torchrun.standalone and torchrun.training_script == argv[script]
                parsed["torchrun"] += 1
                argv = [argv[0]] + argv[script:]
            script, args = Path(argv[1]).name, argv[2:]
            assert (ROOT / argv[1]).exists() or Path(argv[1]).exists(), argv[1]
            if script == "gpu_steps.py":
                step = steps.parser().parse_args(args)
                if step.step == "iterate":
                    assert step.argv[0] == "--"
                    flags.iterate_args(step.argv[1:])
                    parsed["iterate.py"] += 1
            elif script == "train.py":
                flags.train_args(args)
            else:
                flags.STAGE_PARSERS[script[:-3]]().parse_args(args)
            parsed[script] += 1
    assert all(parsed.values()), parsed  # every kind of command is in the plan, and was read
    assert parsed["torchrun"] == 4 + 2 * (gpus >= 2)  # train.py 4 times; with 2 GPUs train.py and generate.py once more


def test_the_checks_verdicts_fail_on_bad_results(tmp_path):
    """The verify side on made-up results: a sample that moved with the batch, an engine that kept the
    GPU, a resumed run far from the uninterrupted one, each is a failure."""
    import json

    import torch
    from safetensors.torch import save_file

    from machinery.records import write_records
    check = load("check")
    rows = [{"id": i, "prompt": "q", "responses": ["a", "b"], "truncated": [False, False]} for i in range(3)]
    write_records(tmp_path / "a.jsonl", rows)
    write_records(tmp_path / "b.jsonl", rows[:2] + [dict(rows[2], responses=["a", "c"])])
    assert check.agreement(tmp_path / "a.jsonl", tmp_path / "a.jsonl", 1.0) == "100.0% of 6 samples equal"
    assert check.agreement(tmp_path / "a.jsonl", tmp_path / "b.jsonl", 0.8).startswith("83.3% of 6")
    with pytest.raises(AssertionError):
        check.agreement(tmp_path / "a.jsonl", tmp_path / "b.jsonl", 0.9)
    for name, value in [("base", 0.0), ("ref", 1.0), ("near", 1.01), ("far", 2.0)]:
        (tmp_path / name).mkdir()
        save_file({"w": torch.full((4,), value)}, str(tmp_path / name / "model.safetensors"))
    assert check.close_to(tmp_path / "near", tmp_path / "ref", tmp_path / "base", 0.05).endswith("0.01 of the change")
    with pytest.raises(AssertionError, match="of the training step away"):
        check.close_to(tmp_path / "far", tmp_path / "ref", tmp_path / "base", 0.05)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "eval.json").write_text(json.dumps([{"exploit": 0.2}] * 4))
    for used, ok in [(5_000, True), (74_000, False)]:  # MiB of an 80 GB GPU as rank and train start
        (tmp_path / "memory.json").write_text(json.dumps({"memory_at_rank_and_train": [[[used, 81_559]]] * 6}))
        if ok:
            assert "at most 6% used" in check.iterated(tmp_path / "run", tmp_path / "memory.json")
        else:
            with pytest.raises(AssertionError, match="the engine was kept"):
                check.iterated(tmp_path / "run", tmp_path / "memory.json")
