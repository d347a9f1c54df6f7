"""train.py on 1 and 2 CPU processes (FSDP2, gloo): step time and peak RSS per rank. Not a test.

    python bench/bench_fsdp.py [--steps 6]

The ~20.6M-parameter Llama of the benches (_util.model_20m: hidden 256, 4 layers, vocab 32000,
untied head; 16.4M of it embeddings), synthetic ranked data of ~256-token sequences, and
train.py itself, run in this script's process (`--worker`) so each rank can report its own
peak RSS: as one process, and under `torchrun --standalone --nproc_per_node=2`. Same global
batch either way: 8 prompts x (chosen, rejected) = 16 sequences per optimizer step. One process
runs with 1 thread and with both cores (2 threads); torchrun gives each rank 1 thread
(OMP_NUM_THREADS=1). Run it on an otherwise idle machine: with 2 OpenMP threads, any other busy
process makes every parallel op wait for a descheduled thread (10x slower steps seen). Step time
is the median of the logged step-to-step times, the first step not counted. Prints a table and
appends one line per run to bench/results.jsonl.

    python bench/bench_fsdp.py --load [--model gemma] [--steps 2]

Host memory of loading (train.py's --model under torchrun, 2 ranks, 1 thread each): every rank
loading the whole fp32 model before sharding (what train.py did, kept here as `--every_rank_loads`
of the worker) against rank 0 loading it and the others building it on the meta device and
receiving a broadcast (fsdp.load_for_sharding, fsdp.shard_model). Peak RSS per rank; the 20.6M
bench model, or with --model gemma Gemma-3-270M (worlds/gemma.py, 268M parameters, 1.07 GB fp32).
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _util  # sets HF_HUB_OFFLINE, sys.path: before torch and the stages

BENCH = "fsdp"


def ranked_data(path, n_prompts, seed=0):
    """Prompts of 6 words and 4 responses of 56 words (~4 toy tokens a word): ~256-token sequences."""
    from machinery.records import write_records
    rng = random.Random(seed)

    def preferences():  # P[a][b] + P[b][a] = 1, win rates its row means (as rank.py writes them)
        P = [[0.5] * 4 for _ in range(4)]
        for a in range(4):
            for b in range(a + 1, 4):
                P[a][b] = rng.random()
                P[b][a] = 1 - P[a][b]
        return {"P": P, "win_rate": [sum(row) / 4 for row in P]}
    write_records(path, [{"id": i, "prompt": _util.random_text(rng, 6),
                          "responses": [" " + _util.random_text(rng, 56) for _ in range(4)], **preferences()}
                         for i in range(n_prompts)])


def worker(argv):
    """One rank: train.py's main, then this process's peak RSS to OUT.rss<rank>. With
    --every_rank_loads, each rank loads the whole model before sharding (shard_model then fills
    the other ranks' shards from rank 0's, the same values)."""
    import torch

    import train
    from machinery.lm import load_model
    if "--every_rank_loads" in argv:
        argv.remove("--every_rank_loads")
        train.load_for_sharding = lambda model_dir, rank: load_model(model_dir, dtype=torch.float32, device="cpu")
    train.main(argv)
    out = argv[argv.index("--out") + 1]
    Path(f"{out}.rss{os.environ.get('RANK', 0)}").write_text(str(_util.peak_rss_mib()))


def main():
    if "--worker" in sys.argv:
        return worker(sys.argv[sys.argv.index("--worker") + 1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps; the first is not timed")
    ap.add_argument("--load", action="store_true", help="peak RSS per rank: every rank loads vs rank 0 loads")
    ap.add_argument("--model", choices=["20m", "gemma"], default="20m", help="--load: the model")
    args = ap.parse_args()
    if args.load:
        return load_rss(args)
    _util.header("train.py under torchrun: FSDP2 on CPU processes")
    model = _util.model_20m(_util.toy_world()["model"])
    root = Path(tempfile.mkdtemp(prefix="bench_fsdp_"))
    ranked_data(root / "ranked.jsonl", 8 * args.steps)
    import train
    from machinery.lm import load_tokenizer
    from machinery.records import read_records
    examples, _ = train.build_examples(read_records(root / "ranked.jsonl", "ranked"), load_tokenizer(model), "sppo", 64, 320)
    tokens_per_step = sum(len(ex["prompt_ids"]) + len(r) for ex in examples for r in ex["response_ids"]) / args.steps
    rows = []
    for world, threads in ((1, 1), (1, 2), (2, 1)):
        out = root / f"out{world}"
        train_args = ["--model", str(model), "--ranked", str(root / "ranked.jsonl"), "--out", str(out),
                      "--global_batch", "8", "--micro_batch", "8", "--lr", "1e-5", "--max_length", "320",
                      "--max_prompt_length", "64", "--dtype", "float32"]
        launch = [sys.executable] if world == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                      f"--nproc_per_node={world}"]
        load_before = _util.load_avg()
        t0 = time.time()
        subprocess.run(launch + [__file__, "--worker"] + train_args, check=True, cwd=_util.ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS=str(threads)), stdout=subprocess.DEVNULL)
        wall = time.time() - t0
        elapsed = [json.loads(line)["elapsed"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        steps = [b - a for a, b in zip(elapsed, elapsed[1:])]
        rss = [float(Path(f"{out}.rss{r}").read_text()) for r in range(world)]
        step_s = statistics.median(steps)
        rows.append([world, threads, step_s, min(steps), tokens_per_step / step_s, " / ".join(f"{r:.0f}" for r in rss), wall])
        _util.record(BENCH, "train_step", processes=world, threads_per_rank=threads, step_s=step_s,
                     step_s_min=min(steps), steps_timed=len(steps), peak_rss_mib_per_rank=rss, run_wall_s=wall,
                     sequences_per_step=16, tokens_per_step=tokens_per_step, load_avg_before=load_before)
    print(f"{tokens_per_step:.0f} tokens per step (16 sequences)")
    print(_util.table(["processes", "threads/rank", "step s (median)", "step s (min)", "tokens/s",
                       "peak RSS MiB per rank", "run wall s"], rows))


def load_rss(args):
    """2 ranks, each way of loading: the peak RSS of each rank over the whole run (load, shard, train, save)."""
    _util.header("train.py under torchrun, 2 CPU ranks: host memory of loading the model")
    if args.model == "gemma":
        from worlds import gemma
        model = gemma.converted_model_dir()
    else:
        model = _util.model_20m(_util.toy_world()["model"])
    root = Path(tempfile.mkdtemp(prefix="bench_fsdp_load_"))
    ranked_data(root / "ranked.jsonl", 2 * args.steps)
    fp32_mib = sum(p.stat().st_size for p in Path(model).glob("*.safetensors")) / 2**20
    rows = []
    for way, extra in (("every rank loads", ["--every_rank_loads"]), ("rank 0 loads, broadcast", [])):
        out = root / f"out-{len(rows)}"
        train_args = ["--model", str(model), "--ranked", str(root / "ranked.jsonl"), "--out", str(out),
                      "--global_batch", "2", "--micro_batch", "1", "--lr", "1e-5", "--max_length", "64",
                      "--max_prompt_length", "16", "--dtype", "float32"]
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
                        "--worker", *train_args, *extra], check=True, cwd=_util.ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL)
        wall = time.time() - t0
        rss = [float(Path(f"{out}.rss{r}").read_text()) for r in range(2)]
        rows.append([way, f"{rss[0]:.0f}", f"{rss[1]:.0f}", f"{sum(rss):.0f}", f"{wall:.0f}"])
        _util.record(BENCH, "load_rss", model=args.model, way=way, peak_rss_mib_per_rank=rss, weights_mib=fp32_mib,
                     steps=args.steps, run_wall_s=wall)
    print(f"model {args.model}: {fp32_mib:.0f} MiB of safetensors; {args.steps} steps of 2 sequences x 2 responses")
    print(_util.table(["loading", "rank 0 peak RSS MiB", "rank 1 peak RSS MiB", "sum MiB", "run wall s"], rows))


if __name__ == "__main__":
    main()
