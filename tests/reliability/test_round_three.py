"""A hostile user's inputs, round three: no checkpoint taken on trust, every check before the first
write, a resumed run that never mixes settings.

- A model directory whose files are valid but lack a tensor the architecture needs (or hold one it
  does not have) is refused by every load path, naming the tensor and the directory: generate.py,
  train.py (its --model is also the reference), lm.load_model (a world's evaluation), a fresh vLLM
  engine and the kept engine's weight reload. Tied weights (an LM head tied to the embedding, as
  Gemma-3 and SmolLM2 save them: not in the file) are not missing.
- iterate.py and a sweep refuse, before writing anything, what would fail or go wrong later: engine
  limits, a KV cache larger than the RAM, a built-in world whose files were deleted or cut, and
  --eval_best_of beyond the samples the world's evaluation draws.
- A run directory that holds anything a stage or pi_0's evaluation wrote is resumed only with the
  settings that made it (--backend included).
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import generate
import iterate
import train
from machinery.lm import check_model_files, load_model
from machinery.records import InputError, read_records

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
        generate.main(["--model", str(model), "--prompts", str(prompts), "--out", str(tmp_path / "r.jsonl"),
                       "--K", "2", "--max_new_tokens", "4"])
    one_error(capsys, exit_, f"--model {model}", DROPPED)
    assert not (tmp_path / "r.jsonl").exists()
    ranked = tmp_path / "k.jsonl"
    ranked.write_text(json.dumps({"id": "a", "prompt": "Which fruit suits the picnic?", "responses": ["A", "B"],
                                  "truncated": [False, False], "P": [[0.5, 0.7], [0.3, 0.5]],
                                  "win_rate": [0.6, 0.4]}) + "\n")
    with pytest.raises(SystemExit) as exit_:  # train.py's --model is the start and the reference
        train.main(["--model", str(model), "--ranked", str(ranked), "--out", str(tmp_path / "m"), "--lr", "1e-4"])
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
