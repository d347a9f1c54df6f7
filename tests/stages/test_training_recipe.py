"""The training recipe against the official one and the real libraries: the training
schedule, length cuts, selection precision, untrusted checkpoints and the step metrics."""
import json
import math
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train
from machinery.lm import load_model, load_tokenizer, prompt_token_ids, response_token_ids
from machinery.records import InputError, write_records
from machinery.train_metrics import step_metrics, step_tokens

WORDS = ["apple", "pear", "plum", "fig", "the", "a", "and", "with", "or", "fruit", "party"]


def ranked(n, K, seed=0):
    """n ranked records of toy-vocabulary words: random P (P + P^T = 1), win rates its row means."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        upper = np.triu(rng.random((K, K)), 1)
        P = upper + np.tril(1 - upper.T, -1) + 0.5 * np.eye(K)
        records.append({"id": i, "prompt": "Which fruit suits the " + " ".join(rng.choice(WORDS, rng.integers(1, 6))) + "?",
                        "responses": [" ".join(rng.choice(WORDS, rng.integers(1, 8))) for _ in range(K)],
                        "truncated": [bool(k == K - 1 and i % 3 == 0) for k in range(K)],
                        "P": P.tolist(), "win_rate": P.mean(1).tolist()})
    return records


@pytest.fixture(scope="module")
def tok_model(toy_world):
    return load_tokenizer(toy_world["model"]), load_model(toy_world["model"])


# ---- the schedule: HF's get_linear_schedule_with_warmup, as the official trainer ------------------


def hf_lrs(total, warmup, schedule):
    """The lr of each optimizer step under transformers' own scheduler (what HF Trainer builds)."""
    from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = (get_linear_schedule_with_warmup(opt, warmup, total) if schedule == "linear"
             else get_constant_schedule_with_warmup(opt, warmup))
    lrs = []
    for _ in range(total):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("schedule", ["linear", "constant"])
def test_lr_factor_is_hf_schedule(schedule):
    for total in (1, 2, 7, 45, 313):
        for ratio in (0.0, 0.1, 0.33, 1.0):
            warmup = math.ceil(ratio * total)  # transformers TrainingArguments.get_warmup_steps
            ours = [train.lr_factor(s, warmup, total, schedule) for s in range(total)]
            assert np.allclose(ours, hf_lrs(total, warmup, schedule), rtol=0, atol=1e-7), (total, ratio)


# ---- what a training run logs: the lr of every step, and the step metrics by name ----------------


def independent_logp(model, prompt_ids, response_ids):
    """log pi(response | prompt): one unpadded sequence, full log-softmax in float64."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return sum(logp[len(prompt_ids) + t - 1, tok].item() for t, tok in enumerate(response_ids))


@pytest.mark.parametrize("loss_type", ["sppo", "sppo_all", "sppo_hard", "dpo"])
def test_step_sums_against_independent_computation(tok_model, loss_type):
    tok, model = tok_model
    records = ranked(6, 4, seed=1)
    examples, _ = train.build_examples(records, tok, loss_type, 64, 96)
    R = len(examples[0]["response_ids"])
    ref = torch.randn(len(examples), R, generator=torch.Generator().manual_seed(0))
    weights = [1.0, 0.0, 1.0, 1.0, 1.0, 1.0]  # example 1 is a weight-0 padding example
    micro = train.micro_batches_of(list(range(len(examples))), weights, examples, ref, 4)
    sums = train.accumulate_gradients(model, micro, 1.0, tok.pad_token_id, "cpu", loss_type=loss_type, eta=10.0, beta=0.1)
    model.zero_grad()
    sums.update(step_tokens(micro))  # train_loop adds the step's token counts to the sums
    expected = dict.fromkeys([*sums], 0.0)
    for i, (rec, ex, w) in enumerate(zip(records, examples, weights)):
        win = np.array(rec["win_rate"])
        best, worst = int(np.argmax(win)), int(np.argmin(win))  # of all K: sppo trains on exactly these
        used = ex["used"].tolist()
        lr = {k: independent_logp(model, ex["prompt_ids"], ex["response_ids"][n]) - ref[i, n].item()
              for n, k in enumerate(used)}
        if loss_type == "dpo":  # -log sigmoid(beta (lr_w - lr_l)); no target for either response
            target = dict.fromkeys(used, math.nan)
            expected["loss"] += w * math.log1p(math.exp(-0.1 * (lr[best] - lr[worst])))
        else:  # Eq. 4.6 on each trained response; sppo_hard: hard labels (win rates 1, 0), terms summed
            target = {k: 10 * (win[k] - 0.5) for k in used} if loss_type != "sppo_hard" else {best: 5.0, worst: -5.0}
            loss = [(lr[k] - target[k]) ** 2 for k in used]
            expected["loss"] += w * sum(loss) / (1 if loss_type == "sppo_hard" else len(loss))
        expected["logratio_chosen"] += w * lr[best]
        expected["logratio_rejected"] += w * lr[worst]
        expected["target_chosen"] += w * target[best]
        expected["target_rejected"] += w * target[worst]
        expected["preferred"] += w * (win[best] > win[worst])
        expected["ordered"] += w * (win[best] > win[worst] and lr[best] > lr[worst])
        expected["weight"] += w
        lengths = [len(ex["prompt_ids"]) + len(r) for r in ex["response_ids"]]
        expected["tokens"] += (w > 0) * sum(lengths)
        expected["tokens_sq"] += (w > 0) * sum(n * n for n in lengths)
    for key, value in expected.items():
        assert sums[key] == pytest.approx(value, rel=1e-5, abs=1e-3, nan_ok=True), key
    assert 0 < sums["ordered"] < sums["preferred"]  # both outcomes occur: the check can tell them apart
    m = step_metrics(sums, 1.0, (0, 0), 0)  # what metrics.jsonl gets: valid JSON, no NaN
    assert (m["target_chosen"] is None) == (loss_type == "dpo")
    json.loads(json.dumps(m, allow_nan=False))


def test_training_logs_hf_schedule_and_named_metrics(tmp_path, toy_world, tok_model, capsys):
    tok, model = tok_model
    records = ranked(13, 3)
    write_records(tmp_path / "ranked.jsonl", records)
    out = tmp_path / "model"
    train.main(["--model", str(toy_world["model"]), "--ranked", str(tmp_path / "ranked.jsonl"), "--out", str(out),
                "--eta", "10", "--lr", "1e-4", "--global_batch", "2", "--micro_batch", "2", "--epochs", "2",
                "--warmup_ratio", "0.3", "--max_length", "96", "--max_prompt_length", "64", "--peak_tflops", "1"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    total = 14  # 7 steps per epoch (13 prompts, batches of 2), 2 epochs; warmup ceil(0.3 * 14) = 5
    assert len(metrics) == total
    assert np.allclose([m["lr"] / 1e-4 for m in metrics], hf_lrs(total, 5, "linear"), rtol=0, atol=1e-7)
    assert metrics[0]["lr"] == 0.0  # HF and the official trainer start warmup at 0
    first = metrics[0]  # pi_theta = pi_t: every logratio is 0 up to rounding
    assert abs(first["logratio_chosen"]) < 1e-4 and abs(first["logratio_rejected"]) < 1e-4
    assert first["target_chosen"] > first["target_rejected"] and 0 <= first["ordered_fraction"] <= 1
    # the epoch's steps cover every prompt once: order-free totals, computed here from the records
    examples, _ = train.build_examples(records, tok, "sppo", 64, 96)
    epoch = metrics[:7]
    n_per_step = [2] * 6 + [1]
    wins = [np.array(r["win_rate"]) for r in records]
    assert sum(m["target_chosen"] * n for m, n in zip(epoch, n_per_step)) == pytest.approx(
        sum(10 * (w.max() - 0.5) for w in wins), abs=1e-4)
    lengths = [len(ex["prompt_ids"]) + len(r) for ex in examples for r in ex["response_ids"]]
    assert sum(m["tokens"] for m in epoch) == sum(lengths)
    n_params = sum(p.numel() for p in model.parameters())  # tied embeddings: the LM head's multiply
    a, b = 6 * n_params, 12 * model.config.num_hidden_layers * model.config.hidden_size
    flops = sum(m["mfu"] * 1e12 * m["tokens"] / m["tokens_per_s"] for m in epoch)  # mfu x peak x seconds
    assert flops == pytest.approx(sum(a * n + b * n * n for n in lengths), rel=1e-6)
    bar = capsys.readouterr().err.split("train: 100%")[-1]  # the progress bar's last refresh
    for name in ("loss=", "logratio_chosen=", "(target ", "logratio_rejected=", "ordered=", "tokens/s=", "mfu="):
        assert name in bar, bar


# ---- lengths: the prompt is cut only when prompt + response do not fit, as the official trainer ---


def test_prompt_cut_only_when_the_pair_does_not_fit(tok_model):
    tok, _ = tok_model
    prompt = "Which fruit suits the party with the apple and the pear and the plum or a fig and the party?"
    p_ids = prompt_token_ids(tok, prompt)
    short, long_ = "apple", " ".join(["pear"] * 60)
    s_ids, l_ids = response_token_ids(tok, short, False), response_token_ids(tok, long_, False)
    max_prompt, max_len = 10, len(p_ids) + len(s_ids) + 2
    assert len(p_ids) > max_prompt and len(p_ids) + len(l_ids) > max_len
    rec = {"id": 0, "prompt": prompt, "responses": [short, short], "P": [[0.5, 0.6], [0.4, 0.5]], "win_rate": [0.55, 0.45]}
    [ex], n_cut = train.build_examples([rec], tok, "sppo", max_prompt, max_len)
    assert ex["prompt_ids"] == p_ids and ex["response_ids"] == [s_ids, s_ids] and n_cut == 0  # fits: nothing cut
    [ex], n_cut = train.build_examples([dict(rec, responses=[long_, short])], tok, "sppo", max_prompt, max_len)
    assert ex["prompt_ids"] == p_ids[-max_prompt:]  # keep_end, as the official trainer
    assert ex["response_ids"] == [l_ids[:max_len - max_prompt], s_ids] and n_cut == 1


# ---- selection in the file's precision ------------------------------------------------------------


def test_best_and_worst_selected_in_float64(tok_model):
    tok, _ = tok_model
    win = [0.5, 0.5 + 2 ** -40, 0.3, 0.3 - 2 ** -45]  # near-ties that float32 rounds into ties
    assert np.float32(win[0]) == np.float32(win[1]) and np.float32(win[2]) == np.float32(win[3])
    P = [[0.5] * 4 for _ in range(4)]
    rec = {"id": 0, "prompt": "Which fruit?", "responses": ["apple", "pear", "plum", "fig"], "P": P, "win_rate": win}
    [ex], _ = train.build_examples([rec], tok, "sppo", 64, 96)
    assert ex["used"].tolist() == [int(np.argmax(win)), int(np.argmin(win))] == [1, 3]


# ---- untrusted checkpoints: loading runs no code ---------------------------------------------------


class Payload:
    def __reduce__(self):  # unpickling this runs the code
        return exec, ("import os; os.environ['SPPO_PAYLOAD_RAN'] = '1'",)


def test_resume_checkpoint_loads_without_running_code(tmp_path, tok_model, monkeypatch):
    tok, _ = tok_model
    monkeypatch.delenv("SPPO_PAYLOAD_RAN", raising=False)
    model = load_model(tok.name_or_path)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    train.save_checkpoint(tmp_path, 3, model, optimizer, scheduler, {"seed": 0}, rank=0)
    step_dir = train.latest_checkpoint(tmp_path)
    assert train.load_checkpoint(step_dir, model, optimizer, scheduler, 0) == 3  # our own files load
    (step_dir / "rng-0.pt").write_bytes(pickle.dumps(Payload()))  # a file someone swapped in
    with pytest.raises(InputError, match="damaged checkpoint") as refused:  # refused, as unpickling failed
        train.load_checkpoint(step_dir, model, optimizer, scheduler, 0)
    assert isinstance(refused.value.__cause__, pickle.UnpicklingError)
    assert "SPPO_PAYLOAD_RAN" not in os.environ
