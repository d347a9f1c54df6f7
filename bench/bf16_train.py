"""train.py's steps in float32 and under CPU bfloat16 autocast (--dtype bfloat16), side by side:
time per step, the loss, and how far the two runs' log-ratios end apart.

    python bench/bf16_train.py                  # SmolLM2-135M-Instruct (the instruct world), 8 x 160 tokens, 6 steps
    python bench/bf16_train.py --steps 3 --tokens 96

Both runs start from the same weights and see the same batch (8 held-out prompts of the instruct
world, K = 2 answers of random words, P fixed) through train.py's own accumulate_gradients and
optimizer_step (the instruct preset's sppo loss, eta 10, RMSprop, lr 1e-5 so that the steps move
the policy visibly). Weights and optimizer stay float32 in both, as with train.py --dtype bfloat16.

bf16 pays only where the CPU computes it natively: AMX (amx_bf16) or AVX512-BF16 (avx512_bf16).
Elsewhere oneDNN converts to float32 and back, and bf16 is as slow or slower; the header says
which this host has.
"""
import argparse
import copy
import random
import time

import _util  # sets HF_HUB_OFFLINE, sys.path: before torch and the stages

import torch  # noqa: E402

from machinery.lm import load_model, load_tokenizer  # noqa: E402
from machinery.train_steps import optimizer_step  # noqa: E402
from train import accumulate_gradients, batch_logps, build_examples  # noqa: E402

BENCH = "bf16_train"


def native_bf16():
    """The CPU flags that make bf16 matrix products native ('' if none)."""
    flags = set(open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0].split())
    return " ".join(f for f in ("amx_bf16", "avx512_bf16") if f in flags)


def batch(model_dir, n_prompts, tokens, seed=0):
    """(tokenizer, examples): n_prompts instruct-world prompts, two answers each of random words,
    cut to `tokens` in all."""
    import json
    from worlds import instruct
    world = instruct.build_world(_util.CACHE / "instruct-world", seed=0)
    prompts = [json.loads(line) for line in open(world["eval_prompts"])][:n_prompts]
    rng = random.Random(seed)
    records = [dict(p, responses=[_util.random_text(rng, tokens) for _ in range(2)], P=[[0.5, 0.8], [0.2, 0.5]],
                    win_rate=[0.65, 0.35], truncated=[True, True]) for p in prompts]
    tokenizer = load_tokenizer(model_dir)
    examples, _ = build_examples(records, tokenizer, "sppo", max_prompt_length=tokens // 2, max_length=tokens)
    return tokenizer, examples


def train(model, examples, ref, steps, bf16, pad_id):
    """`steps` optimizer steps on the whole batch; (seconds per step, losses, final log-ratios)."""
    opt = torch.optim.RMSprop([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    w = torch.ones(len(examples))
    times, losses = [], []
    for step in range(steps):
        t0 = time.perf_counter()
        stats = accumulate_gradients(model, [(examples, ref, w)], 1.0 / len(examples), pad_id, "cpu", loss_type="sppo",
                                     eta=10.0, beta=0.1, autocast=autocast)
        optimizer_step(model, opt, sched, grad_clip=1.0, step=step)
        times.append(time.perf_counter() - t0)
        losses.append(stats["loss"] / len(examples))
    with torch.no_grad():
        logratios = batch_logps(model, examples, pad_id, "cpu") - ref
    return times, losses, logratios


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=160)
    args = ap.parse_args()
    _util.header("train.py's steps: float32 against CPU bfloat16 autocast")
    native = native_bf16()
    print(f"native bf16 on this CPU: {native or 'no (neither amx_bf16 nor avx512_bf16)'}\n", flush=True)
    from worlds import instruct
    model_dir = str(instruct.converted_model_dir())
    tokenizer, examples = batch(model_dir, args.prompts, args.tokens)
    base = load_model(model_dir).eval()  # dropout off, as train.py's model
    base.get_input_embeddings().weight.requires_grad_(False)  # the instruct preset freezes the embeddings
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        ref = batch_logps(base, examples, pad_id, "cpu")
    results = {}
    for name, bf16 in (("float32", False), ("bfloat16 autocast", True)):
        results[name] = train(copy.deepcopy(base), examples, ref, args.steps, bf16, pad_id)
    rows = []
    fp32_step = _util.median(results["float32"][0][1:] or results["float32"][0])  # the first step warms up
    fp32_lr = results["float32"][2]
    for name, (times, losses, logratios) in results.items():
        per_step = _util.median(times[1:] or times)
        rows.append([name, f"{per_step:.2f}", f"{fp32_step / per_step:.2f}x",
                     f"{losses[0]:.5f}", f"{losses[-1]:.5f}", f"{logratios.abs().mean():.4f}",
                     f"{(logratios - fp32_lr).abs().max():.4f}"])
        _util.record(BENCH, name, native_bf16=native, steps=args.steps, seconds_per_step=per_step, loss_first=losses[0],
                     loss_last=losses[-1], mean_abs_logratio=float(logratios.abs().mean()),
                     max_logratio_diff_vs_fp32=float((logratios - fp32_lr).abs().max()))
    print(_util.table(["compute", "s / step", "speed vs fp32", "loss step 1", f"loss step {args.steps}",
                       "mean |log-ratio| after", "max |log-ratio - fp32's|"], rows))


if __name__ == "__main__":
    main()
