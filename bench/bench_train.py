"""Training step throughput and MFU: our step (train.py's building blocks) against TRL's
DPOTrainer(loss_type="sppo_hard"), same model, same pairs, same batches, one process, fp32.

    python bench/bench_train.py                      # both models, 5-8 minutes on the shared 2 cores
    python bench/bench_train.py --models toy --steps 30
    python bench/bench_train.py --models gemma        # Gemma-3-270M, the sentiment preset's batch (~10 min)
    python bench/bench_train.py --profile            # where our step's time goes (torch.profiler)
    python bench/bench_train.py --experiments        # before/after of the proposed optimisations

How the two are interleaved: TRL's Trainer runs as users run it (trainer.train()); a callback at
each of its on_step_end runs OUR step on exactly the batch TRL just trained on (a wrapper around
TRL's collator records the tokenised examples), timed on its own. TRL's step time is the time
between the end of our step and TRL's next on_step_end: its data collation, forward(s),
backward, clipping, optimizer and logging. So the runs alternate A B A B ... under the same
background load, on identical token lists. Both start from the same weights, use RMSprop at the
same lr, clip at 1.0, constant schedule, fp32, sdpa attention, no gradient checkpointing.

Reference log-probs. train.py computes them once per run, before the first step, with one
no-grad forward per example; TRL by default (precompute_ref_log_probs=False) runs a live
reference forward at every step. We report our step alone, and our step plus one reference
forward of the same batch (the cost per step of a 1-epoch run, the paper's setting, with the
precompute amortised); `--trl_mode precompute` times TRL with precompute_ref_log_probs=True.

Loss agreement: on one batch and identical parameters (ours loads TRL's trained weights), TRL's
loss against our `sppo_hard` (which sums the two terms, as TRL does: must be equal) and our
default `sppo` with hard labels win=(1, 0) (which averages them, as the official code: must be
exactly half), plus the gradients.
"""
import argparse
import copy
import random
import tempfile
import time

import _util  # sets HF_HUB_OFFLINE, sys.path: before torch and the stages

import torch  # noqa: E402

import train  # noqa: E402
from machinery.lm import collate, load_model, load_tokenizer  # noqa: E402
from sppo_loss import preference_loss  # noqa: E402

BENCH = "train"
SETTINGS = {  # model: batch pairs per step, response words min..max, timed steps, frozen input embedding
    "toy": dict(batch=16, words=(4, 40), steps=20, freeze=False),
    "20m": dict(batch=8, words=(6, 30), steps=6, freeze=False),
    # the sentiment preset's step: 8 prompts (best and worst), ~20-token responses, tied embedding frozen
    "gemma": dict(batch=8, words=(12, 24), steps=4, freeze=True),
}


# ---- data --------------------------------------------------------------------------------------


def make_records(n, words, seed=0):
    """n ranked records, K=2 (chosen first), prompts from the toy world, word-salad responses."""
    from worlds import toy
    rng = random.Random(seed)
    prompts = [r["prompt"] for r in toy.make_prompts()[0]]
    recs = []
    for i in range(n):
        c, r = (_util.random_text(rng, rng.randint(*words)) for _ in range(2))
        recs.append({"id": i, "prompt": prompts[i % len(prompts)], "responses": [c, r], "truncated": [False, False],
                     "P": [[0.5, 1.0], [0.0, 0.5]], "win_rate": [0.75, 0.25]})
    return recs


def trl_dataset(records, chat=True):
    """Conversational rows for a model with a chat template, plain text for a base model."""
    from datasets import Dataset
    if not chat:
        return Dataset.from_list([{"prompt": r["prompt"], "chosen": r["responses"][0], "rejected": r["responses"][1]}
                                  for r in records])
    return Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "chosen": [{"role": "assistant", "content": r["responses"][0]}],
                               "rejected": [{"role": "assistant", "content": r["responses"][1]}]} for r in records])


def freeze_input_embedding(model, freeze):
    """train.py --freeze_embeddings: the input embedding (and a head tied to it) gets no gradient."""
    if freeze:
        model.get_input_embeddings().weight.requires_grad_(False)
    return model


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def our_examples(trl_examples):
    """TRL's tokenised examples as train.py's example dicts (chosen = best, rejected = worst)."""
    return [{"prompt_ids": list(e["prompt_ids"]), "response_ids": [list(e["chosen_ids"]), list(e["rejected_ids"])],
             "used": torch.tensor([0, 1]), "P": torch.tensor([[0.5, 1.0], [0.0, 0.5]]),
             "win_rate": torch.tensor([1.0, 0.0])} for e in trl_examples]


def token_counts(examples):
    resp = sum(len(r) for ex in examples for r in ex["response_ids"])
    real = sum(len(ex["prompt_ids"]) + len(r) for ex in examples for r in ex["response_ids"])
    padded = 2 * len(examples) * max(len(ex["prompt_ids"]) + len(r) for ex in examples for r in ex["response_ids"])
    return resp, real, padded


# ---- our step: train.py's building blocks, in train.py's order ----------------------------------


def our_reference(ref_model, examples, pad_id, micro_batch=None):
    """train.py's reference pass over these examples (no grad, length-sorted micro-batches)."""
    return train.reference_logps(ref_model, examples, list(range(len(examples))), micro_batch or len(examples),
                                 pad_id, "cpu")


def our_step(model, optimizer, scheduler, examples, ref_logps, pad_id, loss_type, eta, beta=0.1, grad_clip=1.0,
             micro_batch=None):
    """One optimizer step of train.py's loop on one process, with train.py's own functions:
    micro_batches_of (sorted by length), accumulate_gradients (forward, loss, backward), optimizer_step."""
    n = len(examples)
    micro_batches = train.micro_batches_of(list(range(n)), [1.0] * n, examples, ref_logps, micro_batch or n)
    sums = train.accumulate_gradients(model, micro_batches, 1 / n, pad_id, "cpu", loss_type=loss_type, eta=eta, beta=beta)
    grad_norm, _ = train.optimizer_step(model, optimizer, scheduler, grad_clip, step=0)  # step: named in a non-finite error
    return sums["loss"] / n, grad_norm


def make_ours(model_dir, lr, freeze=False):
    model = freeze_input_embedding(load_model(model_dir), freeze)
    model.config.use_cache = False
    model.train()
    opt = torch.optim.RMSprop([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, opt, sched


# ---- TRL ---------------------------------------------------------------------------------------


def make_trl(model_dir, records, batch, steps, lr, eta, out_dir, precompute=False, freeze=False):
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer
    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # _name_or_path = the reference
    freeze_input_embedding(model, freeze)  # the Trainer's optimizer takes only parameters that require grad
    args = DPOConfig(output_dir=str(out_dir), loss_type=["sppo_hard"], beta=1.0 / eta, learning_rate=lr,
                     optim="rmsprop", lr_scheduler_type="constant", max_grad_norm=1.0,
                     per_device_train_batch_size=batch, gradient_accumulation_steps=1, max_steps=steps,
                     bf16=False, fp16=False, gradient_checkpointing=False, precompute_ref_log_probs=precompute,
                     use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, seed=0,
                     dataloader_num_workers=0, max_length=None)
    from transformers.trainer_callback import PrinterCallback
    trainer = DPOTrainer(model=model, args=args, train_dataset=trl_dataset(records, chat=tok.chat_template is not None),
                         processing_class=tok)
    trainer.remove_callback(PrinterCallback)  # it only prints the logs (every 10 steps) to stdout
    return trainer


class RecordingCollator:
    """TRL's collator, unchanged, remembering each batch of tokenised examples it collates."""

    def __init__(self, inner):
        self.inner, self.batches = inner, []

    def __call__(self, examples):
        self.batches.append([{k: e[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for e in examples])
        return self.inner(examples)


def run_pair(model_dir, records, batch, steps, warmup, lr, eta, precompute, pad_id, micro_batch=None, freeze=False):
    """Interleaved TRL / ours; -> dict of per-step time lists, token counts, both trained models."""
    from transformers import TrainerCallback
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        trainer = make_trl(model_dir, records, batch, steps + warmup, lr, eta, tmp, precompute=precompute, freeze=freeze)
        trl_init = time.perf_counter() - t0
        rec = RecordingCollator(trainer.data_collator)
        trainer.data_collator = rec
        ours, opt, sched = make_ours(model_dir, lr, freeze)
        ref = load_model(model_dir).eval()
        out = {"trl": [], "ours_step": [], "ours_ref": [], "tokens": [], "ours_loss": [], "trl_init_s": trl_init}

        class Interleave(TrainerCallback):
            def on_train_begin(self, *a, **k):
                self.t = time.perf_counter()

            def on_step_end(self, args, state, control, **k):
                trl_dt = time.perf_counter() - self.t
                exs = our_examples(rec.batches[state.global_step - 1])
                t0 = time.perf_counter()
                ref_logps = our_reference(ref, exs, pad_id, micro_batch)
                t1 = time.perf_counter()
                loss, _ = our_step(ours, opt, sched, exs, ref_logps, pad_id, "sppo_hard", eta, micro_batch=micro_batch)
                t2 = time.perf_counter()
                if state.global_step > warmup:
                    out["trl"].append(trl_dt)
                    out["ours_ref"].append(t1 - t0)
                    out["ours_step"].append(t2 - t1)
                    out["tokens"].append(token_counts(exs))
                    out["ours_loss"].append(loss)
                self.t = time.perf_counter()

        trainer.add_callback(Interleave())
        trainer.train()
        out["trainer"], out["ours"], out["ref"], out["first_batch"] = trainer, ours, ref, rec.batches[0]
        return out


# ---- loss agreement ----------------------------------------------------------------------------


def loss_agreement(trainer, model_dir, ref, trl_examples, eta, pad_id, freeze=False):
    """TRL's loss and gradient vs ours on one batch with identical (trained, so policy != reference)
    parameters. Returns a dict of the values and their relative differences."""
    policy = freeze_input_embedding(load_model(model_dir), freeze)
    policy.load_state_dict(trainer.model.state_dict())
    policy.config.use_cache = False
    trainer.model.train()
    policy.train()
    inputs = trainer.data_collator.inner(copy.deepcopy(trl_examples)) if hasattr(trainer.data_collator, "inner") \
        else trainer.data_collator(copy.deepcopy(trl_examples))
    trainer.model.zero_grad()
    trl_loss = trainer.compute_loss(trainer.model, inputs)
    trl_loss.backward()
    trl_grads = grads(trainer.model)
    trainer.model.zero_grad()

    exs = our_examples(trl_examples)
    ref_logps = our_reference(ref, exs, pad_id)
    logratios = train.batch_logps(policy, exs, pad_id, "cpu") - ref_logps
    batch = dict(logratios=logratios, P=torch.stack([ex["P"] for ex in exs]), used=torch.stack([ex["used"] for ex in exs]),
                 win_rate=torch.stack([ex["win_rate"] for ex in exs]))  # win rates (1, 0): hard labels
    hard_loss = preference_loss("sppo_hard", **batch, eta=eta, beta=0.1).mean()
    sppo_loss = preference_loss("sppo", **batch, eta=eta, beta=0.1).mean()
    hard_loss.backward(retain_graph=True)
    our_grads = grads(policy)
    rel = lambda a, b: abs(a - b) / max(abs(b), 1e-12)  # noqa: E731
    return {"trl_loss": trl_loss.item(), "ours_sppo_hard": hard_loss.item(), "ours_sppo_hard_labels": sppo_loss.item(),
            "rel_diff_sppo_hard": rel(hard_loss.item(), trl_loss.item()),
            "rel_diff_2x_sppo": rel(2 * sppo_loss.item(), trl_loss.item()),
            "mean_logratio_chosen": logratios[:, 0].mean().item(), "mean_logratio_rejected": logratios[:, 1].mean().item(),
            "grad_rel_diff": ((our_grads - trl_grads).norm() / trl_grads.norm()).item()}


def check_tokenisation(records, trl_dataset, tok):
    """train.build_examples on the same records gives the token ids TRL tokenised, exactly."""
    trl_examples = [trl_dataset[i] for i in range(len(trl_dataset))]
    ours, _ = train.build_examples(records[:len(trl_examples)], tok, "sppo_hard", 512, 4096)
    for o, t in zip(ours, trl_examples):
        if o["prompt_ids"] != list(t["prompt_ids"]) or o["response_ids"] != [list(t["chosen_ids"]), list(t["rejected_ids"])]:
            return False
    return True


# ---- MFU ---------------------------------------------------------------------------------------


def sgemm_ceiling(n=1024, reps=20):
    """Achieved fp32 GFLOP/s of a square matmul: what this CPU really gives torch (practical peak)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / _util.median(times)


# ---- profiling and experiments ------------------------------------------------------------------


def profile_step(model_dir, records, batch, eta, pad_id, tok, steps=5):
    from torch.profiler import ProfilerActivity, profile
    ours, opt, sched = make_ours(model_dir, 1e-5)
    ref = load_model(model_dir).eval()
    exs_all, _ = train.build_examples(records, tok, "sppo_hard", 512, 4096)
    for ex in exs_all:
        ex["win_rate"] = torch.tensor([1.0, 0.0])
    batches = [exs_all[i * batch:(i + 1) * batch] for i in range(steps + 1)]
    refs = [our_reference(ref, b, pad_id) for b in batches]
    our_step(ours, opt, sched, batches[0], refs[0], pad_id, "sppo_hard", eta)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for b, r in zip(batches[1:], refs[1:]):
            our_step(ours, opt, sched, b, r, pad_id, "sppo_hard", eta)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


def sequence_logps_before(model, batch):
    """common.sequence_logps before optimisation P1 (commit 44a852b): the LM head and a full-vocabulary
    log_softmax at every position, then gather and mask."""
    import torch.nn.functional as F
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], use_cache=False).logits[:, :-1]
    mask = (batch["response_mask"][:, 1:] * batch["attention_mask"][:, :-1]).to(torch.float32)
    token_logps = torch.gather(F.log_softmax(logits.float(), dim=-1), 2, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1)


def batch_logps_before(model, examples, pad_id, device):
    """train.batch_logps with sequence_logps_before."""
    pairs = [(ex["prompt_ids"], r) for ex in examples for r in ex["response_ids"]]
    return sequence_logps_before(model, collate(pairs, pad_id, padding_side="right")).view(len(examples), -1)


# name: (train.batch_logps or the one before P1, micro_batch; None = the whole batch in one forward)
VARIANTS = {"before (44a852b)": (batch_logps_before, None), "now, micro_batch = batch": (train.batch_logps, None),
            "now, micro_batch 8": (train.batch_logps, 8), "now, micro_batch 4": (train.batch_logps, 4),
            "now, micro_batch 2": (train.batch_logps, 2)}


def padding_stats(batches, micro_batch):
    """Token slots per batch: real tokens, one padded forward, and train.py's length-sorted micro-batches."""
    real = one = sorted_micro = 0
    for b in batches:
        n = len(b)
        real += sum(len(ex["prompt_ids"]) + len(r) for ex in b for r in ex["response_ids"])
        one += 2 * n * max(map(train.longest, b))
        for micro, _, _ in train.micro_batches_of(list(range(n)), [1.0] * n, b, torch.zeros(n, 2), micro_batch):
            sorted_micro += 2 * len(micro) * max(map(train.longest, micro))
    return real, one, sorted_micro


def experiments(model_dir, records, batch, eta, pad_id, tok, reps):
    """Before/after of P1 (LM head and log-softmax only where they count) and P2 (length-sorted
    micro-batches), interleaved: a full training step (each variant trains its own copy from the
    same start on the same batches) and the no-grad reference pass. Outputs must agree."""
    from unittest import mock
    exs_all, _ = train.build_examples(records, tok, "sppo_hard", 512, 4096)
    for ex in exs_all:
        ex["win_rate"] = torch.tensor([1.0, 0.0])
    ref = load_model(model_dir).eval()
    batches = [exs_all[i * batch:(i + 1) * batch] for i in range(len(exs_all) // batch)]
    refs = [our_reference(ref, bb, pad_id) for bb in batches]

    def variant(name, fn):
        logps, micro = VARIANTS[name]
        with mock.patch.object(train, "batch_logps", logps):  # "before": train.py's loop with the old log-probs
            return fn(micro)
    base = variant("before (44a852b)", lambda m: our_reference(ref, batches[0], pad_id, m))
    agree = {name: (variant(name, lambda m: our_reference(ref, batches[0], pad_id, m)) - base).abs().max().item()
             for name in VARIANTS}
    models = {name: make_ours(model_dir, 1e-5) for name in VARIANTS}
    cur = {"i": -1}

    def step_fn(name, first=False):
        def run():
            if first:
                cur["i"] = (cur["i"] + 1) % len(batches)
            variant(name, lambda m: our_step(*models[name], batches[cur["i"]], refs[cur["i"]], pad_id, "sppo_hard", eta,
                                             micro_batch=m))
        return run

    def ref_fn(name):
        return lambda: variant(name, lambda m: our_reference(ref, batches[cur["i"]], pad_id, m))
    fns = {f"step:{n}": step_fn(n, first=(i == 0)) for i, n in enumerate(VARIANTS)}
    fns.update({f"ref:{n}": ref_fn(n) for n in VARIANTS})
    times = _util.interleave(fns, reps=reps, warmup=1)
    return {k: _util.median(v) for k, v in times.items()}, agree, padding_stats(batches, 4)


# ---- main --------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="toy,20m")
    ap.add_argument("--steps", type=int, default=0, help="timed steps per model (default: toy 20, 20m 6)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--eta", type=float, default=10.0, help="our eta; TRL beta = 1/eta")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--trl_mode", default="default", choices=["default", "precompute", "both"],
                    help="TRL as users run it by default (live reference forward each step), with "
                         "precompute_ref_log_probs=True, or both")
    ap.add_argument("--micro_batch", type=int, default=4, help="our pairs per forward (train.py --micro_batch); "
                    "TRL runs the whole batch in one forward")
    ap.add_argument("--profile", action="store_true", help="profile our step instead of comparing")
    ap.add_argument("--experiments", action="store_true", help="before/after of proposed optimisations")
    ap.add_argument("--reps", type=int, default=10, help="repetitions for --experiments")
    args = ap.parse_args()
    _util.header("bench_train: our training step vs TRL DPOTrainer(loss_type='sppo_hard')")
    world = _util.toy_world()
    dirs = {"toy": lambda: world["model"], "20m": lambda: _util.model_20m(world["model"]),
            "gemma": lambda: __import__("gemma").converted_model_dir()}  # converted once, into the cache
    cpu = _util.cpu_facts()
    rows, mfu_rows, agree_rows, exp_rows = [], [], [], []
    for name in args.models.split(","):
        model_dir = dirs[name]()
        tok = load_tokenizer(model_dir)
        pad_id = tok.pad_token_id
        s = SETTINGS[name]
        steps = args.steps or s["steps"]
        records = make_records((steps + args.warmup + 1) * s["batch"], s["words"], seed=0)
        counts = _util.param_counts(load_model(model_dir))
        if args.profile:
            print(f"### profile of our step, {name} model, batch {s['batch']} pairs\n```")
            print(profile_step(model_dir, records, s["batch"], args.eta, pad_id, tok))
            print("```")
            continue
        if args.experiments:
            med, agree, (real, one, sorted4) = experiments(model_dir, records, s["batch"], args.eta, pad_id, tok, args.reps)
            print(f"{name}: token slots over the batches: real {real}, one padded forward {one}, "
                  f"length-sorted micro-batches of 4 {sorted4}")
            for key, t in med.items():
                kind, variant = key.split(":")
                before = med[f"{kind}:before (44a852b)"]
                exp_rows.append([name, kind, variant, t, before / t, agree[variant]])
                _util.record(BENCH, f"experiment_{kind}_{variant}", model=name, seconds=t, before_s=before,
                             speedup=before / t, max_abs_logp_diff=agree[variant], batch=s["batch"], reps=args.reps,
                             real_tokens=real, slots_one_forward=one, slots_sorted_micro_4=sorted4)
            continue
        variants = {"default": [False], "precompute": [True], "both": [False, True]}[args.trl_mode]
        for precompute in variants:
            r = run_pair(model_dir, records, s["batch"], steps, args.warmup, args.lr, args.eta, precompute, pad_id,
                         args.micro_batch, s["freeze"])
            resp = _util.median([t[0] for t in r["tokens"]])
            real = _util.median([t[1] for t in r["tokens"]])
            padded = _util.median([t[2] for t in r["tokens"]])
            trl_t, ours_t = _util.median(r["trl"]), _util.median(r["ours_step"])
            ours_1ep = _util.median([a + b for a, b in zip(r["ours_step"], r["ours_ref"])])
            trl_label = "TRL precompute_ref" if precompute else "TRL (live ref, default)"
            ratios = [tt / ot for tt, ot in zip(r["trl"], r["ours_step"])]
            ratios_1ep = [tt / (a + b) for tt, a, b in zip(r["trl"], r["ours_step"], r["ours_ref"])]
            rows.append([name, trl_label, s["batch"], real, resp, trl_t, resp / trl_t, 1 / trl_t, "1.00"])
            rows.append([name, "ours: step (ref precomputed once)", s["batch"], real, resp, ours_t, resp / ours_t, 1 / ours_t,
                         f"{trl_t / ours_t:.2f} (per-step median {_util.median(ratios):.2f})"])
            rows.append([name, "ours: step + ref fwd of the batch", s["batch"], real, resp, ours_1ep, resp / ours_1ep,
                         1 / ours_1ep, f"{trl_t / ours_1ep:.2f} (per-step median {_util.median(ratios_1ep):.2f})"])
            common = dict(model=name, batch_pairs=s["batch"], steps=len(r["trl"]), real_tokens=real, response_tokens=resp,
                          padded_tokens=padded, eta=args.eta, trl_beta=1 / args.eta, trl_precompute_ref=precompute)
            _util.record(BENCH, "trl_step", **common, step_s=trl_t, step_times=r["trl"], trl_init_s=r["trl_init_s"],
                         response_tokens_per_s=resp / trl_t)
            _util.record(BENCH, "ours_step", **common, step_s=ours_t, step_times=r["ours_step"],
                         ref_times=r["ours_ref"], response_tokens_per_s=resp / ours_t, ratio_vs_trl=trl_t / ours_t,
                         ratio_vs_trl_per_step_median=_util.median(ratios))
            _util.record(BENCH, "ours_step_plus_ref", **common, step_s=ours_1ep, response_tokens_per_s=resp / ours_1ep,
                         ratio_vs_trl=trl_t / ours_1ep, ratio_vs_trl_per_step_median=_util.median(ratios_1ep))
            if precompute:
                continue
            # MFU: 6 N T for forward+backward, + 2 N T for a reference forward; N = matmul parameters.
            # "needed": the work the step cannot skip: the body (N - head) at every real token, the
            # head only where it predicts a response token, and no weight gradient for a frozen head
            N, head = counts["matmul_params"], counts["head_params"]
            head_train = (4 if s["freeze"] and counts["head_tied"] else 6) * head * resp
            needed_step = 6 * (N - head) * real + head_train
            needed_ref = 2 * (N - head) * real + 2 * head * resp
            for label, t, flops, needed in (("ours step", ours_t, 6 * N * real, needed_step),
                                            ("ours step + ref", ours_1ep, 8 * N * real, needed_step + needed_ref),
                                            ("TRL (live ref)", trl_t, 8 * N * real, needed_step + needed_ref)):
                mfu, mfu_needed = flops / t / cpu["peak_fp32_flops"], needed / t / cpu["peak_fp32_flops"]
                mfu_rows.append([name, label, counts["params"], N, real, resp, t, flops / t / 1e9, mfu, needed / t / 1e9,
                                 mfu_needed])
                _util.record(BENCH, "mfu", model=name, variant=label, params=counts["params"], matmul_params=N,
                             real_tokens=real, padded_tokens=padded, response_tokens=resp, step_s=t,
                             gflops=flops / t / 1e9, mfu=mfu, needed_gflops=needed / t / 1e9, mfu_needed=mfu_needed,
                             frozen_embedding=s["freeze"], peak=cpu["peak_formula"])
            # loss agreement, tokenisation check, drift of the two trained models
            a = loss_agreement(r["trainer"], model_dir, r["ref"], r["first_batch"], args.eta, pad_id, s["freeze"])
            a["tokenisation_identical"] = check_tokenisation(records, r["trainer"].train_dataset, tok)
            drift = max((p - q).abs().max().item() for p, q in zip(r["ours"].parameters(), r["trainer"].model.parameters()))
            init = load_model(model_dir)
            moved = max((p - q).abs().max().item() for p, q in zip(init.parameters(), r["trainer"].model.parameters()))
            a.update(param_max_abs_diff_after_training=drift, param_max_abs_change_from_init=moved)
            agree_rows.append([name, a["trl_loss"], a["ours_sppo_hard"], a["rel_diff_sppo_hard"], a["ours_sppo_hard_labels"],
                               a["rel_diff_2x_sppo"], a["grad_rel_diff"], a["tokenisation_identical"], drift, moved])
            _util.record(BENCH, "loss_agreement", model=name, **a)
            del r
    if rows:
        print(_util.table(["model", "implementation", "batch (pairs)", "real tokens/step", "response tokens/step",
                           "step s (median)", "response tok/s", "steps/s", "TRL time / ours"], rows))
    if agree_rows:
        print("\nloss agreement on one batch, identical parameters (trained, so logratios != 0):")
        print(_util.table(["model", "TRL sppo_hard", "ours sppo_hard", "rel diff", "ours sppo, hard labels",
                           "rel diff of 2x", "grad rel diff", "same token ids", "max |param diff| ours vs TRL after run",
                           "max |param change| from init"], agree_rows))
    if mfu_rows:
        print(f"\nMFU against the fp32 peak {cpu['peak_formula']}; measured 1024^3 sgemm: "
              f"{sgemm_ceiling() / 1e9:.1f} GFLOP/s")
        print(_util.table(["model", "variant", "params", "matmul params N", "real tokens", "response tokens", "step s",
                           "GFLOP/s (6NT)", "MFU (6NT)", "GFLOP/s (needed)", "MFU (needed)"], mfu_rows))
    if exp_rows:
        print(_util.table(["model", "what", "variant", "median s", "speedup vs before", "max |logp diff| vs before"],
                          exp_rows))


if __name__ == "__main__":
    main()
