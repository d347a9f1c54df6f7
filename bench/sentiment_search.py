"""One SPPO iteration of the sentiment world under different train.py settings, on the same data.

    python iterate.py --preset sentiment --iterations 1 --run_dir runs/sent-base     # pi_0's samples, ranked
    python bench/sentiment_search.py --base runs/sent-base --name lr3e-6 -- --lr 3e-6 --freeze_embeddings

The settings search behind the preset (NOTES.md, "The real-LM world"). Generation and ranking
are the slow, settings-independent half of an iteration, so every variant trains pi_1 from pi_0
on the same ranked file (BASE/iter1/ranked.jsonl, or --ranked) with the preset's train.py
values overridden by the flags after --, then evaluates pi_1 with sentiment.evaluate against
pi_0's cached held-out samples (BASE/iter0/eval_samples.json: the same samples, so P(pi_1 > pi_0)
is paired exactly as in a full run). Each variant is a run directory under BASE/search/NAME (a
variant already trained is only evaluated again); one JSON line per variant goes to
bench/results.jsonl and a table of all variants of BASE is printed.
"""
import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402  (sets HF_HUB_OFFLINE, sys.path)

from machinery import flags  # noqa: E402
from worlds import sentiment  # noqa: E402

BENCH = "sentiment_search"
# the preset's values that train.py takes
TRAIN_KEYS = ("eta", "lr", "lr_schedule", "epochs", "global_batch", "micro_batch", "max_prompt_length", "max_length",
              "freeze_embeddings")


def train_command(base_model, ranked, out, extra):
    preset = flags.PRESETS["sentiment"]
    cmd = [sys.executable, str(_util.ROOT / "train.py"), "--model", str(base_model), "--ranked", str(ranked), "--out", str(out),
           "--seed", "0"]
    for key in TRAIN_KEYS:
        value = preset.get(key)
        if isinstance(value, bool):
            cmd += [f"--{key}"] if value else []
        elif value is not None:
            cmd += [f"--{key}", str(value)]
    return cmd + list(extra)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="a sentiment run directory with iteration 1 ranked and pi_0 evaluated")
    ap.add_argument("--ranked", help="default BASE/iter1/ranked.jsonl")
    ap.add_argument("--name", required=True, help="the variant's name (its directory under BASE/search)")
    ap.add_argument("train_flags", nargs=argparse.REMAINDER, help="-- then train.py flags over the preset's")
    args = ap.parse_args()
    extra = args.train_flags[1:] if args.train_flags[:1] == ["--"] else args.train_flags
    base = Path(args.base)
    config = json.loads((base / "config.json").read_text())["config"]
    ranked = Path(args.ranked or base / "iter1" / "ranked.jsonl")
    run = base / "search" / args.name
    (run / "iter0").mkdir(parents=True, exist_ok=True)
    shutil.copy(base / "iter0" / "eval_samples.json", run / "iter0" / "eval_samples.json")
    model = run / "iter1" / "model"
    t0 = time.time()
    if not (model / "train_info.json").exists():
        cmd = train_command(config["model"], ranked, model, extra)
        print("+ " + " ".join(cmd), flush=True)
        with open(run / "train.log", "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    train_s = time.time() - t0
    t0 = time.time()
    rows = sentiment.evaluate([config["model"], str(model)], {"eval_prompts": base / "world" / "eval_prompts.jsonl"}, run)
    metrics = [json.loads(line) for line in (model / "metrics.jsonl").read_text().splitlines()]
    row = {k: rows[1][k] for k in ("vader", "P_vader", "P_afinn", "P_textblob", "distinct_2", "kl_estimate")}
    row.update(prompts=sum(1 for _ in ranked.open()), steps=len(metrics), train_s=train_s, eval_s=time.time() - t0,
               final_logratio_chosen=metrics[-1]["logratio_chosen"], final_logratio_rejected=metrics[-1]["logratio_rejected"])
    _util.record(BENCH, args.name, base=str(base), train_flags=extra, **row)
    print(f"  {args.name}: sample {rows[1]['samples'][0]!r}")
    done = [json.loads(line) for line in _util.RESULTS.read_text().splitlines()]
    done = {r["name"]: r for r in done if r.get("bench") == BENCH and r.get("base") == str(base)}
    print(_util.table(["variant", "train flags", "prompts", "steps", "P by VADER", "P by AFINN", "P by TextBlob", "mean VADER",
                 "distinct-2", "KL", "train s"],
                [[name, " ".join(r["train_flags"]), r["prompts"], r["steps"], r["P_vader"], r["P_afinn"], r["P_textblob"],
                  r["vader"], r["distinct_2"], r["kl_estimate"], r["train_s"]] for name, r in done.items()]))


if __name__ == "__main__":
    main()
