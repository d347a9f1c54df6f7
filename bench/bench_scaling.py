"""Scaling of one toy SPPO iteration (generate -> rank -> train) as prompts, K and response
length double: wall time per stage and peak memory, plus PairRM ranking cost, which grows with
K(K-1).

    python bench/bench_scaling.py                    # 7 configurations, ~3 minutes on 2 cores
    python bench/bench_scaling.py --configs 64,4,16 128,4,16

Each configuration (prompts N, K, max_new_tokens L) runs in its own child process, which calls
the stages' real entry points in-process (generate.main, rank.main, train.main with the toy
preset's flags when BENCHMARKS.md section 5 was measured: T=1, eta=10, lr 1e-4, 5 epochs, batch
32, loss sppo; kept so its rows stay comparable) so that peak RSS belongs
to that configuration alone; the import time of torch/transformers (paid once per child) is
reported separately. The model is the toy world's tiny Llama after a single SFT step, so it
rarely emits EOS and responses really grow with L. The toy judge is exact and nearly free;
the PairRM column ranks the same responses with the tiny PairRM ranker (tests/tiny_models.py)
through rank.py's PairRMJudge: N K(K-1) ordered-pair forwards.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

T_START = time.perf_counter()
import _util  # noqa: E402  (sets HF_HUB_OFFLINE, sys.path: before torch and the stages)

BENCH = "scaling"
DEFAULT = ["64,4,16", "128,4,16", "256,4,16", "64,8,16", "64,16,16", "64,4,32", "64,4,64"]


def rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(n, K, L, out_dir):
    import warnings
    warnings.filterwarnings("ignore")
    import generate
    from machinery import judges
    import rank
    import train
    from machinery.records import read_records, write_records
    import bench_rank
    imports = time.perf_counter() - T_START
    world = _util.toy_world(sft_steps=1)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = read_records(world["train_prompts"])[:n]
    write_records(out / "prompts.jsonl", prompts)
    res = {"N": n, "K": K, "L": L, "imports_s": imports}
    t = time.perf_counter()
    generate.main(["--model", str(world["model"]), "--prompts", str(out / "prompts.jsonl"), "--out",
                   str(out / "responses.jsonl"), "--K", str(K), "--temperature", "1.0", "--top_p", "1.0", "--top_k", "0",
                   "--max_new_tokens", str(L), "--seed", "1"])
    res["generate_s"], res["rss_after_generate_mib"] = time.perf_counter() - t, rss_mib()
    t = time.perf_counter()
    rank.main(["--responses", str(out / "responses.jsonl"), "--out", str(out / "ranked.jsonl"), "--judge", "toy:ToyJudge",
               "--judge_path", str(world["world"])])
    res["rank_toy_s"], res["rss_after_rank_mib"] = time.perf_counter() - t, rss_mib()
    t = time.perf_counter()
    train.main(["--model", str(world["model"]), "--ranked", str(out / "ranked.jsonl"), "--out", str(out / "model"),
                "--loss_type", "sppo", "--eta", "10", "--optimizer", "rmsprop", "--lr", "1e-4", "--lr_schedule", "constant",
                "--epochs", "5", "--global_batch", "32", "--micro_batch", "32", "--max_prompt_length", "64",
                "--max_length", str(64 + L + 1), "--seed", "0"])
    res["train_s"], res["rss_after_train_mib"] = time.perf_counter() - t, rss_mib()
    res["iteration_s"] = res["generate_s"] + res["rank_toy_s"] + res["train_s"]
    recs = read_records(out / "responses.jsonl", stage="responses")
    tok_counts = []
    from machinery.lm import load_tokenizer
    tok = load_tokenizer(world["model"])
    for r in recs:
        tok_counts += [len(tok(y, add_special_tokens=False)["input_ids"]) for y in r["responses"]]
    res["mean_response_tokens"] = sum(tok_counts) / len(tok_counts)
    judge = judges.PairRMJudge(bench_rank.tiny_ranker(), p_mode="scores")
    t = time.perf_counter()
    rank.rank_records(recs, judge)
    res["rank_pairrm_s"] = time.perf_counter() - t
    res["pairrm_comparisons"] = n * K * (K - 1)
    res["peak_rss_mib"] = rss_mib()
    print("RESULT " + json.dumps(res))


def run_child(n, K, L, env=None):
    out = _util.CACHE / "scaling" / f"n{n}-k{K}-l{L}-{os.getpid()}"
    proc = subprocess.run([sys.executable, __file__, "--child", str(n), str(K), str(L), str(out)],
                          capture_output=True, text=True, cwd=_util.ROOT, env=env)
    subprocess.run(["rm", "-rf", str(out)])
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        print(proc.stdout[-2000:], proc.stderr[-4000:])
        raise SystemExit(f"config {n},{K},{L} failed")
    return json.loads(line[7:])


OMP_SETTINGS = {  # label: environment overrides (unset: libgomp's default, a bounded spin then sleep)
    "OMP_WAIT_POLICY=ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"},
    "unset (libgomp default)": {"OMP_WAIT_POLICY": None},
    "GOMP_SPINCOUNT=10000": {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "10000"},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
}


def omp_experiment(cfg, reps, load):
    """One toy iteration under each OpenMP wait setting, alternating; `load` busy processes
    (pure Python loops, one core each) compete for the cores, as other jobs on a shared machine."""
    n, K, L = (int(x) for x in cfg.split(","))
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
    res = {label: [] for label in OMP_SETTINGS}
    try:
        for _ in range(reps):
            for label, over in OMP_SETTINGS.items():
                env = dict(os.environ, **{k: v for k, v in over.items() if v is not None})
                for k in (k for k, v in over.items() if v is None):
                    env.pop(k, None)
                res[label].append(run_child(n, K, L, env=env))
    finally:
        for b in busy:
            b.kill()
    rows = []
    for label, rs in res.items():
        med = {k: _util.median([r[k] for r in rs]) for k in ("generate_s", "rank_toy_s", "train_s", "iteration_s",
                                                                "rank_pairrm_s")}
        rows.append([label, med["generate_s"], med["rank_toy_s"], med["train_s"], med["iteration_s"], med["rank_pairrm_s"],
                     [round(r["iteration_s"], 1) for r in rs]])
        _util.record(BENCH, f"omp {label}", config=cfg, reps=reps, busy_processes=load, **med,
                     iteration_times=[r["iteration_s"] for r in rs])
    print(f"config N,K,L = {cfg}; {reps} alternating rounds; {load} competing busy processes; medians")
    print(_util.table(["OpenMP wait setting", "generate s", "rank (toy) s", "train s", "iteration s", "rank (tiny PairRM) s",
                       "iteration s, each round"], rows))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="*", default=DEFAULT, help="N,K,L triples")
    ap.add_argument("--omp_experiment", type=int, default=0, metavar="REPS",
                    help="instead: the first config REPS times under each OpenMP wait setting, alternating")
    ap.add_argument("--load", type=int, default=0, help="--omp_experiment: competing busy processes")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        n, K, L, out = args.child
        return child(int(n), int(K), int(L), out)
    _util.header("bench_scaling: one toy iteration as N, K, L double")
    _util.toy_world(sft_steps=1)  # build once, outside the timed children
    import bench_rank
    bench_rank.tiny_ranker()
    if args.omp_experiment:
        return omp_experiment(args.configs[0], args.omp_experiment, args.load)
    rows = []
    for cfg in args.configs:
        n, K, L = (int(x) for x in cfg.split(","))
        r = run_child(n, K, L)
        rows.append([n, K, L, r["mean_response_tokens"], r["generate_s"], r["rank_toy_s"], r["train_s"], r["iteration_s"],
                     r["peak_rss_mib"], r["pairrm_comparisons"], r["rank_pairrm_s"], r["imports_s"]])
        _util.record(BENCH, f"n{n}-k{K}-l{L}", **r)
        print(f"  done {cfg}: iteration {r['iteration_s']:.1f} s", flush=True)
    print(_util.table(["prompts N", "K", "max new tokens L", "mean response tokens", "generate s", "rank (toy judge) s",
                       "train s", "iteration s", "peak RSS MiB", "PairRM comparisons N K(K-1)", "rank (tiny PairRM) s",
                       "imports s"], rows))


if __name__ == "__main__":
    main()
