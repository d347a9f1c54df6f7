"""train.py on the real LM (Gemma-3-270M): FSDP2 parity, bf16 vs fp32, frozen embeddings. Not a test.

    python bench/bench_gemma.py [--prompts 8] [--steps 2] [--runs fp32,fsdp2,frozen]

Ranked data: sentiment-world prompts with short real continuations, judged by VADER (rank.py's
`sentiment:VaderJudge`); K = 4, the `sppo` loss on best and worst, the sentiment preset's eta and lr.
Runs, each train.py as its own process (peak RSS from os.wait4):
  fp32          one process                                  the reference
  fsdp2         torchrun --nproc_per_node=2 (gloo, FSDP2)     max |param - fp32's| after the steps
  bf16          one process, --dtype bfloat16 (autocast)      its step-1 loss against fp32's
  frozen        one process, --freeze_embeddings              step time and peak RSS
Prints a table and appends one line per run to bench/results.jsonl.
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _util  # sets HF_HUB_OFFLINE, sys.path: before torch and the stages

BENCH = "gemma"
CONTINUATIONS = [" was wonderful, and the staff were kind to us.", " was a complete waste of money and time.",
                 " opened at nine and closed at five.", " felt cramped, noisy and a bit dirty.",
                 " is the best thing that happened to us this year!", " was fine, I guess, nothing special.",
                 " made my whole family smile all afternoon.", " broke after two days and nobody helped."]


def ranked_data(path, n_prompts, seed=0):
    import rank
    from worlds import sentiment
    from machinery.records import write_records
    rng = random.Random(seed)
    train, _ = sentiment.make_prompts()
    records = [dict(r, responses=rng.sample(CONTINUATIONS, 4), truncated=[False] * 4) for r in train[:n_prompts]]
    write_records(path, rank.rank_records(records, sentiment.VaderJudge(), desc="vader"))


def run(cmd, env=None):
    t0 = time.time()
    proc = subprocess.Popen([str(c) for c in cmd], cwd=_util.ROOT, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(map(str, cmd))}")
    return time.time() - t0, usage.ru_maxrss / 2**20


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--runs", default="fp32,fsdp2,bf16,frozen", help="which runs (fp32, the reference, always runs)")
    args = ap.parse_args()
    from worlds import gemma
    from transformers import AutoModelForCausalLM
    _util.header("train.py on Gemma-3-270M: FSDP2 parity, bf16, frozen embeddings")
    model_dir = gemma.converted_model_dir()
    root = Path(tempfile.mkdtemp(prefix="bench_gemma_"))
    ranked_data(root / "ranked.jsonl", args.prompts)
    batch = args.prompts // args.steps
    base = ["train.py", "--model", model_dir, "--ranked", root / "ranked.jsonl", "--eta", "10", "--lr", "5e-7",
            "--lr_schedule", "constant", "--warmup_ratio", "0", "--global_batch", batch, "--micro_batch", 2,
            "--max_length", 96]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    runs = {"fp32": [sys.executable] + base, "fsdp2": torchrun + base,
            "bf16": [sys.executable] + base + ["--dtype", "bfloat16"],
            "frozen": [sys.executable] + base + ["--freeze_embeddings"]}
    chosen = {"fp32", *args.runs.split(",")}
    if chosen - set(runs):
        raise SystemExit(f"--runs: unknown {sorted(chosen - set(runs))}; choose from {sorted(runs)}")
    runs = {name: cmd for name, cmd in runs.items() if name in chosen}
    results = {}
    for name, cmd in runs.items():
        out = root / name
        seconds, rss = run(cmd + ["--out", out], env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        step_times = [b["elapsed"] - a["elapsed"] for a, b in zip(metrics, metrics[1:])] or [metrics[0]["elapsed"]]
        results[name] = {"seconds": seconds, "peak_rss_gb": rss, "loss_step1": metrics[0]["loss"],
                         "step_seconds": _util.median(step_times)}
    reference = AutoModelForCausalLM.from_pretrained(root / "fp32").state_dict()
    for name in sorted(chosen - {"fp32"}):
        other = AutoModelForCausalLM.from_pretrained(root / name).state_dict()
        results[name]["max_param_diff_vs_fp32"] = max((reference[k] - other[k]).abs().max().item() for k in reference)
    start = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    results["fp32"]["max_param_move"] = max((reference[k] - start[k]).abs().max().item() for k in reference)
    rows = [[name, r["seconds"], r["step_seconds"], r["peak_rss_gb"], r["loss_step1"],
             r.get("max_param_diff_vs_fp32", r.get("max_param_move"))] for name, r in results.items()]
    print(_util.table(["run", "wall s", "step s", "peak RSS GB (max proc)", "loss step 1",
                       "max |dparam| vs fp32 (fp32: vs start)"], rows))
    for name, r in results.items():
        _util.record(BENCH, name, prompts=args.prompts, steps=args.steps, **r)


if __name__ == "__main__":
    main()
