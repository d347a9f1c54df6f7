"""The stages on the toy world's tiny model: templating, log-prob masks, sampling, bad input, end to end."""
import contextlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from generate import generate_responses
from machinery.lm import collate, cpu_lm_head, load_model, load_tokenizer, prompt_token_ids, response_token_ids, sequence_logps
from machinery.records import InputError, read_records, write_records
from worlds import toy

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok_model(toy_world):
    return load_tokenizer(toy_world["model"]), load_model(toy_world["model"]).eval()


def test_chat_template_keeps_none_and_one_bos(tok_model):
    tok, _ = tok_model
    prompt = "None of the fruits? Say None if None fits. None"
    ids = prompt_token_ids(tok, prompt)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    text = tok.decode(ids, skip_special_tokens=False)
    assert prompt in text and text.endswith("<|assistant|>")
    # a chat-format prompt goes through the same template
    chat = [{"role": "system", "content": "None"}, {"role": "user", "content": prompt}]
    chat_ids = prompt_token_ids(tok, chat)
    assert chat_ids.count(tok.bos_token_id) == 1 and prompt in tok.decode(chat_ids)


def unpadded_logps(model, prompt_ids, response_ids):
    """Reference: one sequence, no padding, no mask, response tokens scored one by one."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return sum(logp[len(prompt_ids) + t - 1, tok].item() for t, tok in enumerate(response_ids))


def test_logps_with_left_right_and_split_padding_match_unpadded(tok_model):
    tok, model = tok_model
    pairs = [(prompt_token_ids(tok, p), response_token_ids(tok, r, truncated=t)) for p, r, t in [
        ("Which fruit suits the picnic?", "apple", False),
        ("Pick a colour for the wedding, a long prompt to force padding of the others.", "blue", False),
        ("Name a tool.", "hammer drill saw", True),
    ]]
    expected = torch.tensor([unpadded_logps(model, p, r) for p, r in pairs], dtype=torch.float64)
    for side in ("left", "right", "split"):
        with torch.no_grad():
            got = sequence_logps(model, collate(pairs, tok.pad_token_id, padding_side=side)).double()
        assert torch.allclose(got, expected, atol=1e-4), (side, got, expected)
    # scoring from a pad (mask = response tokens only, position t predicted from a pad) would be off
    batch = collate(pairs, tok.pad_token_id, padding_side="left")
    batch["response_mask"][:, :] = batch["attention_mask"]  # prompt tokens counted too: a wrong mask
    with torch.no_grad():
        wrong = sequence_logps(model, batch).double()
    assert not torch.allclose(wrong, expected, atol=1e-2)


def test_split_padding_runs_the_lm_head_on_response_positions_only(tok_model):
    """Prompts of different lengths: with "split" padding the LM head sees the longest response's
    positions (+1), with right padding also the prompt positions of the shorter prompts."""
    tok, model = tok_model
    pairs = [(prompt_token_ids(tok, p), response_token_ids(tok, r, truncated=False))
             for p, r in [("Name a tool.", "saw"), ("Pick a colour for the wedding, a much longer prompt than the first.", "red")]]
    seen = []
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[1]))
    try:
        with torch.no_grad():
            for side in ("split", "right"):
                sequence_logps(model, collate(pairs, tok.pad_token_id, padding_side=side))
    finally:
        hook.remove()
    longest_response = max(len(r) for _, r in pairs)
    assert seen[0] == longest_response + 1
    assert seen[1] > seen[0] + 5  # right padding: the short prompt's row starts predicting much earlier


def test_logps_gradient_and_full_logits_path_match_reference(tok_model, monkeypatch):
    """The LM head on fewer positions (logits_to_keep) and fused cross_entropy give the same values
    and gradients as the plain full-logits log_softmax + gather; so does a model without logits_to_keep."""
    tok, model = tok_model
    pairs = [(prompt_token_ids(tok, p), response_token_ids(tok, r, truncated=False))
             for p, r in [("Which fruit suits the picnic?", "apple pie"), ("Name a tool for the long weekend job.", "saw")]]
    batch = collate(pairs, tok.pad_token_id)

    def reference():  # every position, then the mask
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits[:, :-1]
        logp = torch.gather(F.log_softmax(logits, -1), 2, batch["input_ids"][:, 1:, None])[..., 0]
        return (logp * batch["response_mask"][:, 1:] * batch["attention_mask"][:, :-1]).sum(-1)

    class NoKeep(torch.nn.Module):  # a causal LM whose forward has no logits_to_keep
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, position_ids, use_cache):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    results, head_outputs = [], []
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: head_outputs.append(tuple(out.shape)))
    for fn in (reference, lambda: sequence_logps(model, batch), lambda: sequence_logps(NoKeep(model), batch)):
        for head in (contextlib.nullcontext, lambda: cpu_lm_head(model)):  # train.py's layout on a large vocabulary
            model.zero_grad()
            with head():
                values = fn()
            (values * torch.tensor([1.0, -2.0])).sum().backward()
            results.append((values.detach(), [p.grad.clone() for p in model.parameters()]))
    hook.remove()
    model.zero_grad()
    # logits_to_keep: the head ran on fewer positions than the full-logits paths
    assert head_outputs[2][1] < head_outputs[0][1] == head_outputs[4][1] and "forward" not in vars(model.lm_head)
    for values, grads in results[1:]:
        assert torch.allclose(values, results[0][0], atol=1e-4)
        assert all(torch.allclose(g, g0, atol=1e-5) for g, g0 in zip(grads, results[0][1]))
    assert max(g.abs().max() for g in results[0][1]) > 1e-3  # the gradients compared are not all zero


def few_prompts(n, start=0):
    train, _ = toy.make_prompts()
    return train[start:start + n]


def test_sampling_is_deterministic_per_prompt_and_seed(tok_model):
    tok, model = tok_model
    records = few_prompts(5)
    a = generate_responses(model, tok, records, K=3, max_new_tokens=8, seed=7, batch_size=1)
    b = generate_responses(model, tok, records, K=3, max_new_tokens=8, seed=7, batch_size=4)
    c = generate_responses(model, tok, records[2:], K=3, max_new_tokens=8, seed=7, batch_size=2)
    assert a == b
    assert a[2:] == c  # a prompt's samples do not depend on which prompts share its batch
    d = generate_responses(model, tok, records, K=3, max_new_tokens=8, seed=8, batch_size=4)
    assert [r["responses"] for r in d] != [r["responses"] for r in a]
    assert all(r["family"] == s["family"] for r, s in zip(a, records))  # unknown fields pass through


def test_truncation_is_flagged(tok_model):
    tok, model = tok_model
    cut = generate_responses(model, tok, few_prompts(3), K=2, max_new_tokens=1, seed=0)
    full = generate_responses(model, tok, few_prompts(3), K=2, max_new_tokens=16, seed=0)
    assert all(all(r["truncated"]) for r in cut)
    assert not any(any(r["truncated"]) for r in full)  # the base model stops after one word


def test_exact_evaluator_matches_monte_carlo_frequencies(toy_world, tok_model):
    tok, model = tok_model
    world = json.loads(Path(toy_world["world"]).read_text())
    records = [json.loads(line) for line in Path(toy_world["eval_prompts"]).read_text().splitlines()][::37][:4]
    exact = toy.policy_distributions(toy_world["model"], records, world)  # [4, 6]: A..E, invalid
    n = 600
    sampled = generate_responses(model, tok, records, K=n, temperature=1.0, max_new_tokens=8, seed=3, batch_size=1)
    for rec, p in zip(sampled, exact):
        answers = world["families"][rec["family"]]["answers"]
        freq = np.array([sum(r == a for r in rec["responses"]) for a in answers] + [0]) / n
        freq[5] = 1.0 - freq[:5].sum()
        sigma = np.sqrt(p * (1 - p) / n)
        assert np.all(np.abs(freq - p) <= 4.5 * sigma + 0.01), (rec["id"], freq.round(3), p.round(3))


def run_stage(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True)


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))


@pytest.mark.parametrize("lines,line_no,field", [
    (['{"id": 1, "prompt": "a", "responses": ["x", "y"]}', '{"id": 2, "prompt": "b", "responses": ["x", '], 2, None),
    (['{"id": 1, "prompt": "a", "responses": ["x", "y"]}', '{"id": 2, "responses": ["x", "y"]}'], 2, "prompt"),
    (['{"id": 1, "prompt": "a", "responses": ["x", "y"]}', '{"id": 2, "prompt": "b", "responses": ["x", "y", "z"]}'],
     2, "responses"),
    (['{"id": 1, "prompt": "a", "responses": ["x", "y"]}', '{"id": 1, "prompt": "b", "responses": ["x", "y"]}'], 2, "id"),
])
def test_rank_rejects_bad_responses_file(tmp_path, toy_world, lines, line_no, field):
    src, out = tmp_path / "responses.jsonl", tmp_path / "ranked.jsonl"
    write_lines(src, lines)
    res = run_stage("rank.py", "--responses", src, "--out", out, "--judge", "toy:ToyJudge", "--judge_path", toy_world["world"])
    assert res.returncode == 2
    assert f"{src}:{line_no}" in res.stderr and (field is None or repr(field) in res.stderr), res.stderr
    assert not out.exists() and not list(tmp_path.glob(".ranked*"))


RANKED_OK = {"id": "a", "prompt": "Which fruit suits the picnic?", "responses": ["apple", "pear"],
             "P": [[0.5, 0.7], [0.3, 0.5]], "win_rate": [0.6, 0.4]}


@pytest.mark.parametrize("bad,field", [
    ({"P": [[0.5, 0.7, 0.1], [0.3, 0.5, 0.2]]}, "P"),          # not K x K
    ({"P": [[0.5, 1.7], [-0.7, 0.5]]}, "P"),                     # not in [0, 1]
    ({"win_rate": [0.6]}, "win_rate"),
    ({"responses": ["apple"], "P": [[0.5]], "win_rate": [0.5]}, "responses"),  # K < 2
])
def test_train_rejects_bad_ranked_file(tmp_path, toy_world, bad, field):
    src, out = tmp_path / "ranked.jsonl", tmp_path / "model"
    write_lines(src, [json.dumps(RANKED_OK), json.dumps(dict(RANKED_OK, id="b", **bad))])
    res = run_stage("train.py", "--model", toy_world["model"], "--ranked", src, "--out", out)
    assert res.returncode == 2
    assert f"{src}:2" in res.stderr and repr(field) in res.stderr, res.stderr
    assert not out.exists()


def test_read_records_and_atomic_write(tmp_path):
    path = tmp_path / "x.jsonl"
    write_records(path, [RANKED_OK])
    assert read_records(path, "ranked") == [RANKED_OK]
    with pytest.raises(InputError, match="K mismatch"):
        read_records(path, "ranked", K=3)
    # a write that fails half way leaves the old file and no temporary behind
    with pytest.raises(TypeError):
        write_records(path, [dict(RANKED_OK, id="b"), {"id": object()}])
    assert read_records(path, "ranked") == [RANKED_OK]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.jsonl"]


def test_end_to_end_one_iteration_reloads_and_resumes(tmp_path, toy_world):
    from transformers import AutoModelForCausalLM
    prompts = tmp_path / "prompts.jsonl"
    write_records(prompts, few_prompts(12) + [{"id": "none", "prompt": "Which fruit suits None?", "family": "fruit"}])
    run_dir = tmp_path / "run"
    cmd = ["iterate.py", "--model", toy_world["model"], "--prompts", prompts, "--judge", "toy:ToyJudge",
           "--judge_path", toy_world["world"], "--preset", "toy", "--iterations", "1", "--K", "3",
           "--epochs", "2", "--global_batch", "4", "--run_dir", run_dir]
    res = run_stage(*cmd)
    assert res.returncode == 0, res.stderr[-3000:]
    ranked = read_records(run_dir / "iter1/ranked.jsonl", "ranked", K=3)
    assert len(ranked) == 13 and ranked[-1]["prompt"] == "Which fruit suits None?" and ranked[0]["family"]
    info = json.loads((run_dir / "config.json").read_text())
    assert info["config"]["seed"] == 0 and info["config"]["K"] == 3 and "torch" in info["versions"]
    metrics = [json.loads(line) for line in (run_dir / "iter1/model/metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 * 4 and abs(metrics[0]["logratio_chosen"]) < 1e-4  # pi_theta = pi_t at step 1
    model = AutoModelForCausalLM.from_pretrained(run_dir / "iter1/model")
    base = AutoModelForCausalLM.from_pretrained(toy_world["model"])
    moved = max((a - b).abs().max().item() for a, b in zip(model.parameters(), base.parameters()))
    assert moved > 1e-4
    # a second run finds every stage done and redoes nothing
    stamp = (run_dir / "iter1/model/model.safetensors").stat().st_mtime_ns
    res = run_stage(*cmd)
    assert res.returncode == 0 and "generate.py" not in res.stdout and "train.py" not in res.stdout
    assert (run_dir / "iter1/model/model.safetensors").stat().st_mtime_ns == stamp
    # other settings are refused, naming them, before anything is rewritten
    config = (run_dir / "config.json").read_bytes()
    res = run_stage(*cmd, "--K", "4", "--eta", "1")
    assert res.returncode == 2, res.stderr[-2000:]
    assert "--K: 3 in the run, 4 now" in res.stderr and "--eta: 10.0 in the run, 1.0 now" in res.stderr, res.stderr
    assert (run_dir / "config.json").read_bytes() == config
    assert (run_dir / "iter1/model/model.safetensors").stat().st_mtime_ns == stamp


def test_cpu_lm_head_layout_gives_the_same_logits(tok_model):
    tok, model = tok_model
    ids = torch.tensor([prompt_token_ids(tok, "Which fruit suits the picnic?")] * 3)
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with cpu_lm_head(model):
            assert "forward" in vars(model.lm_head)  # the swapped layout is what runs here
            swapped = model(input_ids=ids).logits
    assert "forward" not in vars(model.lm_head)  # restored
    assert torch.allclose(plain, swapped, atol=1e-5) and plain.abs().max() > 1


def test_tokenizer_is_loaded_once_per_directory_and_contents(toy_world, tmp_path):
    """A directory's tokenizer is loaded once and then shared; a changed file (here the chat
    template) is loaded anew, never served from the cache; another directory gets its own (its
    name_or_path is its own path)."""
    import shutil
    src = Path(toy_world["model"])
    copies = [tmp_path / name for name in ("a", "b")]
    for d in copies:
        d.mkdir()
        for f in src.iterdir():
            if f.is_file() and not f.name.endswith(".safetensors"):
                shutil.copy(f, d / f.name)
    a, again, b = load_tokenizer(copies[0]), load_tokenizer(copies[0]), load_tokenizer(copies[1])
    assert a is again and b is not a and Path(b.name_or_path) == copies[1]
    config = json.loads((copies[0] / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ messages[0]['content'] }} changed"
    (copies[0] / "tokenizer_config.json").write_text(json.dumps(config))
    for f in copies[0].glob("chat_template*"):
        f.unlink()
    changed = load_tokenizer(copies[0])
    assert changed is not a and changed.chat_template.endswith("changed") and not a.chat_template.endswith("changed")
