"""Prompt sources, the vLLM call (a contract test against a fake module), presets and the dry run."""
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from machinery import flags
import generate
from machinery import vllm_backend
from machinery.launch import shard_of
from machinery.lm import load_tokenizer, prompt_token_ids
from machinery.records import InputError, load_prompts, read_records, write_records

ROOT = Path(__file__).resolve().parents[2]
CHAT = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Which fruit suits the picnic?"}]


def test_prompts_from_jsonl_and_from_a_saved_dataset(tmp_path):
    import datasets
    rows = [{"id": "a", "prompt": "Which fruit suits None?", "source": "x"}, {"id": "b", "prompt": CHAT, "source": "y"}]
    write_records(tmp_path / "p.jsonl", rows)
    assert load_prompts(tmp_path / "p.jsonl") == rows
    # a directory written by datasets.save_to_disk: the stand-in for a hub dataset
    ds = datasets.DatasetDict({"train": datasets.Dataset.from_list(
        [{"prompt_id": "p0", "prompt": "Pick a colour."}, {"prompt_id": "p1", "prompt": "Name a tool."}])})
    ds.save_to_disk(str(tmp_path / "ds"))
    got = load_prompts(tmp_path / "ds", split="train")
    assert [(r["id"], r["prompt"]) for r in got] == [("p0", "Pick a colour."), ("p1", "Name a tool.")]
    # another column, no ids: ids from the row number
    datasets.Dataset.from_list([{"question": "Q1"}, {"question": "Q2"}]).save_to_disk(str(tmp_path / "q"))
    got = load_prompts(tmp_path / "q", column="question")
    assert [(r["id"], r["prompt"]) for r in got] == [("q-0", "Q1"), ("q-1", "Q2")]
    with pytest.raises(InputError, match="'prompt': missing"):
        load_prompts(tmp_path / "q")
    with pytest.raises(InputError, match="no split 'test'"):
        load_prompts(tmp_path / "ds", split="test")


def test_chat_format_prompt_goes_through_the_template(toy_world):
    tok = load_tokenizer(toy_world["model"])
    ids = prompt_token_ids(tok, CHAT)
    text = tok.decode(ids)
    assert ids.count(tok.bos_token_id) == 1
    assert text.index("Answer in one word.") < text.index("Which fruit suits the picnic?")


def fake_vllm(calls, finish=("stop", "length")):
    """A stand-in for the `vllm` module that records what our code passes (vllm 0.33.0 API); the
    real engine's own tests are in tests/vllm_engine."""
    mod = types.ModuleType("vllm")

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class LLM:
        def __init__(self, **kw):
            calls["llm"] = kw

        def generate(self, prompts, sampling_params, use_tqdm=True):
            calls["prompts"], calls["params"] = prompts, sampling_params
            outs = []
            for p, sp in zip(prompts, sampling_params):
                n = sp.kw["n"]
                completions = [types.SimpleNamespace(text=f"r{k}", token_ids=[5, 6], finish_reason=finish[k % 2])
                               for k in range(n)]
                outs.append(types.SimpleNamespace(prompt_token_ids=p["prompt_token_ids"], outputs=completions))
            return outs

    mod.LLM, mod.SamplingParams, mod.TokensPrompt = LLM, SamplingParams, dict
    return mod


CUDA_CALLS = ("is_available", "device_count", "init", "_lazy_init", "is_initialized", "current_device",
              "get_device_name", "get_device_capability", "set_device", "mem_get_info")


@pytest.mark.parametrize("tp,visible", [(1, "5"), (2, "6,7")])
def test_vllm_is_imported_before_cuda_is_touched(monkeypatch, tmp_path, toy_world, tp, visible):
    """Contract test of the start-up order (a GPU shows it; see README for the command on one).

    vLLM forks its workers unless CUDA is initialised, and a CUDA driver started before the fork
    (torch.cuda.is_available() without NVML) breaks them; CUDA_VISIBLE_DEVICES counts only if set
    before the driver starts. A fake `vllm` package on sys.path records, when it is imported,
    every torch.cuda call made so far and the environment vLLM reads; generate.main runs as rank 1
    of 2 under torchrun's variables."""
    probe = types.ModuleType("vllm_probe")
    probe.cuda_calls, probe.imports, calls = [], [], {}
    for name in CUDA_CALLS:  # record, then do what torch does (nothing on this CPU build)
        original = getattr(torch.cuda, name)
        monkeypatch.setattr(torch.cuda, name, lambda *a, _f=original, _n=name, **k: probe.cuda_calls.append(_n) or _f(*a, **k))
    probe.on_import = lambda: probe.imports.append({
        "cuda_calls": list(probe.cuda_calls), **{k: os.environ.get(k) for k in (
            "CUDA_VISIBLE_DEVICES", "VLLM_WORKER_MULTIPROC_METHOD", "PYTORCH_NVML_BASED_CUDA_CHECK")}})
    fake = fake_vllm(calls)
    probe.LLM, probe.SamplingParams, probe.TokensPrompt = fake.LLM, fake.SamplingParams, fake.TokensPrompt
    monkeypatch.setitem(sys.modules, "vllm_probe", probe)
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text(
        "import vllm_probe\nvllm_probe.on_import()\nfrom vllm_probe import LLM, SamplingParams, TokensPrompt\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    for key, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "4,5,6,7",
                       "VLLM_WORKER_MULTIPROC_METHOD": None, "PYTORCH_NVML_BASED_CUDA_CHECK": None}.items():
        monkeypatch.setenv(key, value or "x")  # so that monkeypatch restores what the code sets
        if value is None:
            monkeypatch.delenv(key)
    monkeypatch.setattr(vllm_backend, "on_cpu", lambda: False)  # the GPU path, wherever this runs
    monkeypatch.setattr(vllm_backend, "KEPT", {})  # no engine kept from before: this one starts afresh
    # rank 1 of 2 without a rendezvous: do this rank's shard, as run_sharded would
    monkeypatch.setattr(generate, "run_sharded", lambda records, out, work, config: write_records(
        out, work(shard_of(records, 1, 2))))
    write_records(tmp_path / "p.jsonl", [{"id": i, "prompt": f"Which fruit suits party {i}?"} for i in range(4)])
    generate.main(["--model", str(toy_world["model"]), "--prompts", str(tmp_path / "p.jsonl"), "--out",
                   str(tmp_path / "r.jsonl"), "--K", "2", "--max_new_tokens", "16", "--backend", "vllm",
                   "--tensor_parallel_size", str(tp)])  # 16: the toy model takes 128 tokens in all
    assert probe.imports == [{"cuda_calls": [], "CUDA_VISIBLE_DEVICES": visible, "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
                              "PYTORCH_NVML_BASED_CUDA_CHECK": "1"}]
    assert calls["llm"]["tensor_parallel_size"] == tp
    assert [r["id"] for r in read_records(tmp_path / "r.jsonl", "responses")] == [2, 3]  # rank 1's slice


def test_dry_run_of_a_paper_preset_prints_config_and_commands(tmp_path):
    res = subprocess.run([sys.executable, "iterate.py", "--preset", "mistral-7b", "--dry-run", "--run_dir", str(tmp_path / "r"),
                          "--eval_prompts", "alpaca_eval.json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    config = json.loads(res.stdout[:res.stdout.index("\n}\n") + 2])
    # the resolved config: the preset's values over the stage defaults, iterate.py's own defaults beside
    preset, parser = flags.PRESETS["mistral-7b"], flags.iterate_parser()
    expected = {a.dest: preset.get(a.dest, a.default) for a in parser._actions if a.dest in config and a.dest != "help"}
    import torch
    expected.update(eval_prompts="alpaca_eval.json", preset="mistral-7b", dry_run=True,
                    in_process=not torch.cuda.is_available())  # GPUs: apart; a CPU: one process, one engine kept
    assert {k: config[k] for k in expected if k != "run_dir"} == {k: v for k, v in expected.items() if k != "run_dir"}
    commands = [line for line in res.stdout.splitlines() if line.startswith("+ ")]
    train_cmds = [c for c in commands if "train.py" in c]
    rank_cmds = [c for c in commands if "rank.py" in c]
    samples = [c for c in commands if "generate.py" in c and "--K 5" in c]
    exports = [c for c in commands if "generate.py" in c and "--K 1" in c]
    assert len(train_cmds) == len(rank_cmds) == len(samples) == 3 and len(exports) == 4  # pi_0 .. pi_3
    assert all("--grad_checkpointing" in c.split() for c in train_cmds)
    assert all("--judge_prompt template --template_model" in c for c in rank_cmds)
    assert all(f"--max_new_tokens {preset['max_new_tokens']}" in c for c in samples)
    assert all(f" --{flag} {config['eval_' + flag]} " in f"{c} " for c in exports for flag in ("temperature", "top_p", "max_new_tokens"))
    assert not (tmp_path / "r").exists()  # nothing written, nothing downloaded


def test_prompt_slices_and_alpaca_eval_export(tmp_path):
    import argparse

    import iterate
    rows = [{"id": i, "prompt": f"q{i}"} for i in range(7)]
    for n in range(3):
        write_records(tmp_path / f"p{n}.jsonl", rows[n::3])
    args = argparse.Namespace(prompts=str(tmp_path / "p0.jsonl"), prompt_split="train", prompt_column="prompt", iterations=3,
                              prompts_per_iteration=None)
    whole = [{"id": i, "prompt": f"q{i}"} for i in (0, 3, 6)]
    assert iterate.prompt_slices(args) == [whole[:1], whole[1:2], whole[2:]]  # one source: split, none dropped
    args.prompts = ",".join(str(tmp_path / f"p{n}.jsonl") for n in range(3))
    assert iterate.prompt_slices(args) == [rows[0::3], rows[1::3], rows[2::3]]  # one source per iteration
    args.prompts_per_iteration = 2  # the first 2 of each slice
    assert iterate.prompt_slices(args) == [rows[0::3][:2], rows[1::3][:2], rows[2::3][:2]]
    args.prompts_per_iteration = None
    args.prompts = ",".join(str(tmp_path / f"p{n}.jsonl") for n in range(2))
    with pytest.raises(InputError, match="2 sources for 3 iterations"):
        iterate.prompt_slices(args)
    write_records(tmp_path / "r.jsonl", [{"id": "a", "prompt": CHAT, "responses": ["apple"], "truncated": [False]}])
    iterate.export_alpaca_eval(tmp_path / "r.jsonl", tmp_path / "model_outputs.json", "run-iter1")
    assert json.loads((tmp_path / "model_outputs.json").read_text()) == [
        {"instruction": "Which fruit suits the picnic?", "output": "apple", "generator": "run-iter1"}]
    # the eval's responses file is checked as one: one sample per prompt, each a string
    bad = {"no-responses": ({"id": "a", "prompt": "q"}, "field 'responses': missing or not a list of strings"),
           "two-samples": ({"id": "a", "prompt": "q", "responses": ["x", "y"]}, "field 'responses': K mismatch: 2 responses, expected K=1"),
           "not-text": ({"id": "a", "prompt": "q", "responses": [3]}, "field 'responses': missing or not a list of strings")}
    for name, (record, message) in bad.items():
        write_records(tmp_path / f"{name}.jsonl", [{"id": "z", "prompt": "p", "responses": ["ok"]}, record])
        with pytest.raises(InputError, match=rf"{name}.jsonl:2: {message}"):
            iterate.export_alpaca_eval(tmp_path / f"{name}.jsonl", tmp_path / f"{name}.json", "me")
        assert not (tmp_path / f"{name}.json").exists(), name


def test_alpaca_eval_json_list_as_eval_prompts(tmp_path):
    """AlpacaEval's own eval set is a JSON list with 'instruction' (plus the reference 'output',
    'generator' and 'dataset'); it loads as prompts, and the export keeps 'dataset'."""
    import iterate
    rows = [{"instruction": "Name a fruit.", "output": "Apple.", "generator": "gpt4", "dataset": "helpful_base"},
            {"instruction": "Pick a colour for None.", "output": "Red.", "generator": "gpt4", "dataset": "oasst"}]
    (tmp_path / "alpaca_eval.json").write_text(json.dumps(rows))
    got = load_prompts(tmp_path / "alpaca_eval.json")
    assert got == [{"id": "alpaca_eval-0", "prompt": "Name a fruit.", "instruction": "Name a fruit.", "dataset": "helpful_base"},
                   {"id": "alpaca_eval-1", "prompt": "Pick a colour for None.", "instruction": "Pick a colour for None.",
                    "dataset": "oasst"}]
    write_records(tmp_path / "r.jsonl", [dict(r, responses=[f"out{n}"]) for n, r in enumerate(got)])
    iterate.export_alpaca_eval(tmp_path / "r.jsonl", tmp_path / "model_outputs.json", "me")
    assert json.loads((tmp_path / "model_outputs.json").read_text()) == [
        {"instruction": r["instruction"], "output": f"out{n}", "generator": "me", "dataset": r["dataset"]}
        for n, r in enumerate(rows)]
    (tmp_path / "bad.json").write_text(json.dumps([rows[0], {"output": "x"}]))
    with pytest.raises(InputError, match=r"bad.json:item 1: field 'prompt': missing \(and no 'instruction'\)"):
        load_prompts(tmp_path / "bad.json")
    (tmp_path / "worse.json").write_text('[{"instruction": "a"},\n{"instruction": }]')
    with pytest.raises(InputError, match="worse.json:2: malformed JSON"):
        load_prompts(tmp_path / "worse.json")


def test_mixed_prompt_file_loads_with_the_datasets_we_require(tmp_path):
    """Stage files may mix string and chat-message prompts. datasets up to 4.6.1 cannot load such a
    JSONL (ArrowInvalid; measured with pyarrow 26: 3.6.0, 4.0.0, 4.4.2, 4.6.1 fail, 4.7.0, 4.8.5,
    5.0.0, 5.2.0 load it), so requirements.txt must not allow them; and the installed one loads it."""
    import re

    import datasets
    floor = re.search(r"^datasets>=([\d.]+)", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    assert tuple(map(int, floor.split("."))) >= (4, 7), floor
    write_records(tmp_path / "p.jsonl", [{"id": 1, "prompt": "Which fruit?"}, {"id": 2, "prompt": CHAT}])
    ds = datasets.load_dataset("json", data_files=str(tmp_path / "p.jsonl"), split="train",
                               cache_dir=str(tmp_path / "cache"))
    assert ds[0]["prompt"] == "Which fruit?" and ds[1]["prompt"] == CHAT


def test_best_of_n_exports_the_judges_best_sample(tmp_path, toy_world):
    """--eval_best_of N: N samples of every eval prompt from pi_0 and pi_1, ranked by the run's judge;
    the AlpacaEval file holds the sample with the highest win rate (the first of equals), and its
    judge-measured quality is at least the single samples'."""
    run_dir, n = tmp_path / "run", 4
    cmd = [sys.executable, "iterate.py", "--model", toy_world["model"], "--prompts", toy_world["train_prompts"],
           "--judge", "toy:ToyJudge", "--judge_path", toy_world["world"], "--preset", "toy", "--iterations", "1",
           "--K", "2", "--prompts_per_iteration", "8", "--global_batch", "4", "--epochs", "1",
           "--eval_prompts", toy_world["eval_prompts"], "--eval_max", "12", "--eval_best_of", str(n),
           "--eval_temperature", "1.0", "--run_dir", run_dir]
    res = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    for t in (0, 1):
        ranked = read_records(run_dir / f"iter{t}/eval_best_of_{n}_ranked.jsonl", "ranked", K=n)
        best = json.loads((run_dir / f"iter{t}/model_outputs_best_of_{n}.json").read_text())
        single = json.loads((run_dir / f"iter{t}/model_outputs.json").read_text())
        assert len(ranked) == len(best) == len(single) == 12
        wins = np.array([r["win_rate"] for r in ranked])
        assert [b["output"] for b in best] == [r["responses"][int(np.argmax(w))] for r, w in zip(ranked, wins)]
        assert all(b["instruction"] == s["instruction"] and b["generator"].endswith(f"best-of-{n}") for b, s in zip(best, single))
        # sample 0 of the N is the single sample (the same seed per prompt id and k)
        assert [r["responses"][0] for r in ranked] == [s["output"] for s in single]
        assert wins.max(-1).mean() >= wins[:, 0].mean()
    assert (wins.max(-1) > wins[:, 0]).any()  # the pick made a difference somewhere
