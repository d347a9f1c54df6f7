"""How far apart 1 and 2 training processes end, as a function of the number of steps (toy world).

    python bench/parity_steps.py --out_dir runs/parity          # ~5 min on 2 cores

Iteration 1 of the toy run (its world, its first prompt slice, generate + rank with the toy
preset), then train.py with the toy preset for 1, 2, 5 and 10 epochs (9, 18, 45, 90 steps), once
as one process and once under torchrun with 2; prints the largest parameter difference between
the two (largest and median), how far training moved the parameters, and the exact evaluation
of both models (largest difference in pi(answer | prompt), win rate over pi_0, exploitability).
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import _util  # sets HF_HUB_OFFLINE, sys.path: before torch and the stages
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from worlds import toy  # noqa: E402
from machinery.flags import PRESETS  # noqa: E402
from machinery.records import read_records, write_records  # noqa: E402
from iterate import split_prompts  # noqa: E402


def run(cmd, nproc=1):
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  f"--nproc_per_node={nproc}"]
    subprocess.run(launch + [str(c) for c in cmd], check=True, cwd=_util.ROOT, env=dict(__import__("os").environ, OMP_NUM_THREADS="1"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out_dir", default="runs/parity")
    ap.add_argument("--epochs", default="1,2,5,10")
    args = ap.parse_args()
    out = Path(args.out_dir).resolve()
    world = toy.build_world(out / "world", seed=0)
    p = PRESETS["toy"]
    prompts, responses, ranked = out / "prompts.jsonl", out / "responses.jsonl", out / "ranked.jsonl"
    if not ranked.exists():
        write_records(prompts, split_prompts(read_records(world["train_prompts"]), 3)[0])
        run(["generate.py", "--model", world["model"], "--prompts", prompts, "--out", responses, "--K", p["K"],
             "--temperature", p["temperature"], "--top_p", p["top_p"], "--top_k", p["top_k"],
             "--max_new_tokens", p["max_new_tokens"], "--seed", 1])
        run(["rank.py", "--responses", responses, "--out", ranked, "--judge", "toy:ToyJudge", "--judge_path", world["world"]])
    base = load_file(str(world["model"] / "model.safetensors"))
    rows = []
    for epochs in map(int, args.epochs.split(",")):
        params = {}
        for nproc in (1, 2):
            model = out / f"model-e{epochs}-n{nproc}"
            if not (model / "train_info.json").exists():
                run(["train.py", "--model", world["model"], "--ranked", ranked, "--out", model, "--eta", p["eta"],
                     "--lr", p["lr"], "--lr_schedule", p["lr_schedule"], "--epochs", epochs,
                     "--global_batch", p["global_batch"], "--micro_batch", p["micro_batch"],
                     "--max_prompt_length", p["max_prompt_length"], "--max_length", p["max_length"]], nproc)
            params[nproc] = load_file(str(model / "model.safetensors"))
        steps = json.loads((out / f"model-e{epochs}-n1" / "train_info.json").read_text())["steps"]
        diff = torch.cat([(params[1][k] - params[2][k]).abs().flatten() for k in base])
        moved = max((params[1][k] - base[k]).abs().max().item() for k in base)
        # the exact evaluation of both models on the held-out prompts: per-answer probabilities, win rate
        models = [out / f"model-e{epochs}-n{n}" for n in (1, 2)]
        evals = [toy.evaluate([world["model"], m], world)[1] for m in models]
        records = read_records(world["eval_prompts"])
        world_json = json.loads(Path(world["world"]).read_text())
        pi = [toy.policy_distributions(m, records, world_json) for m in models]
        rows.append({"epochs": epochs, "steps": steps, "max_abs_diff_1_vs_2": diff.max().item(),
                     "median_abs_diff": diff.median().item(), "max_abs_update": moved,
                     "max_abs_diff_pi": float(abs(pi[0] - pi[1]).max()),
                     "win_vs_pi0_1_and_2": [e["win_vs_pi0"] for e in evals],
                     "exploit_1_and_2": [e["exploit"] for e in evals]})
        print(json.dumps(rows[-1]), flush=True)
    (out / "parity.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
