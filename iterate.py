"""The SPPO loop: for t = 1..T, generate from pi_{t-1}, rank, train pi_t with reference pi_{t-1}.

    python iterate.py                                   # the embedded toy world, 3 iterations, CPU
    python iterate.py --model DIR --prompts FILE.jsonl --judge module:factory --judge_path X --run_dir runs/me

Iteration t works on the t-th of T equal slices of the prompts (each prompt used once) and
starts from the model the previous iteration trained. Every stage runs as its own process and
writes its output atomically; a stage whose output exists is skipped, so a killed run resumes
where it stopped when the same command is run again. The run directory keeps the full config,
seeds and library versions (config.json), every stage's JSONL and every iteration's model.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common import InputError, fail_with, read_records, run_info, write_json, write_records

HERE = Path(__file__).resolve().parent

# Settings that differ between the embedded toy world and a real model; a flag overrides them.
PRESETS = {
    # The paper's and official code's values (section 5; official scripts).
    "paper": dict(K=5, temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=512, eta=1000.0, lr=5e-7,
                  lr_schedule="linear", epochs=1, global_batch=64, micro_batch=8, max_prompt_length=512,
                  max_length=1024),
    # The toy world: see NOTES.md for why eta=10, lr=1e-4 and 5 epochs.
    "toy": dict(K=5, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=16, eta=10.0, lr=1e-4,
                lr_schedule="constant", epochs=5, global_batch=32, micro_batch=32, max_prompt_length=64,
                max_length=96),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="base model pi_0 (HF dir or hub name); default: the toy world")
    ap.add_argument("--prompts", help="JSONL with id and prompt")
    ap.add_argument("--judge", help="module:factory for rank.py")
    ap.add_argument("--judge_path", help="what the judge loads")
    ap.add_argument("--run_dir", help="default runs/toy-seed{seed} for the toy world")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", choices=sorted(PRESETS), help="default: toy without --model, else paper")
    ap.add_argument("--loss_type", default="sppo")
    ap.add_argument("--optimizer", default="rmsprop")
    ap.add_argument("--nproc_per_node", type=int, default=1, help="processes for training (torchrun)")
    ap.add_argument("--dry-run", dest="dry_run", action="store_true", help="print config and commands only")
    for key, value in PRESETS["paper"].items():
        ap.add_argument(f"--{key}", type=type(value), default=None, help=f"preset default (paper: {value})")
    args = ap.parse_args(argv)
    toy = args.model is None
    args.preset = args.preset or ("toy" if toy else "paper")
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not toy and not (args.prompts and args.judge):
        ap.error("with --model, give --prompts and --judge too")
    args.run_dir = Path(args.run_dir or f"runs/toy-seed{args.seed}")
    return args


def run(cmd, dry_run):
    print("+ " + " ".join(str(c) for c in cmd), flush=True)
    if not dry_run:
        subprocess.run([str(c) for c in cmd], check=True, cwd=HERE)


def launcher(nproc):
    """How a stage is started: plain python, or torchrun for several processes."""
    if nproc <= 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def split_prompts(records, parts):
    """Slice t of `parts` near-equal contiguous slices; every prompt lands in exactly one."""
    bounds = [round(i * len(records) / parts) for i in range(parts + 1)]
    return [records[bounds[i]:bounds[i + 1]] for i in range(parts)]


def main(argv=None):
    args = parse_args(argv)
    run_dir = args.run_dir.resolve()
    world = None
    if args.model is None:  # the embedded default: a tiny model, prompts and a judge built here
        import toy
        world = toy.build_world(run_dir / "world", seed=args.seed) if not args.dry_run else None
        paths = world or {"model": run_dir / "world/base_model", "train_prompts": run_dir / "world/train_prompts.jsonl",
                          "world": run_dir / "world/world.json"}
        args.model, args.prompts = str(paths["model"]), str(paths["train_prompts"])
        args.judge, args.judge_path = "toy:ToyJudge", str(paths["world"])
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    print(json.dumps(config, indent=2))
    if not args.dry_run:
        write_json(run_dir / "config.json", run_info(config))
        try:
            slices = split_prompts(read_records(args.prompts, stage="prompts"), args.iterations)
        except InputError as e:
            fail_with(e)

    models = [args.model]
    for t in range(1, args.iterations + 1):
        it = run_dir / f"iter{t}"
        prompts, responses, ranked, model = it / "prompts.jsonl", it / "responses.jsonl", it / "ranked.jsonl", it / "model"
        print(f"\n=== iteration {t}: pi_{t - 1} -> pi_{t} ===", flush=True)
        if not args.dry_run and not prompts.exists():
            write_records(prompts, slices[t - 1])
        if args.dry_run or not responses.exists():
            run(launcher(1) + [HERE / "generate.py", "--model", models[-1], "--prompts", prompts, "--out", responses,
                               "--K", args.K, "--temperature", args.temperature, "--top_p", args.top_p,
                               "--top_k", args.top_k, "--max_new_tokens", args.max_new_tokens,
                               "--seed", args.seed * 1000 + t], args.dry_run)
        if args.dry_run or not ranked.exists():
            run(launcher(1) + [HERE / "rank.py", "--responses", responses, "--out", ranked, "--judge", args.judge]
                + (["--judge_path", args.judge_path] if args.judge_path else []), args.dry_run)
        if args.dry_run or not (model / "train_info.json").exists():
            run(launcher(args.nproc_per_node) + [
                HERE / "train.py", "--model", models[-1], "--ranked", ranked, "--out", model,
                "--loss_type", args.loss_type, "--eta", args.eta, "--optimizer", args.optimizer, "--lr", args.lr,
                "--lr_schedule", args.lr_schedule, "--epochs", args.epochs, "--global_batch", args.global_batch,
                "--micro_batch", args.micro_batch, "--max_prompt_length", args.max_prompt_length,
                "--max_length", args.max_length, "--seed", args.seed], args.dry_run)
        models.append(str(model))
        if world is not None:
            import toy
            rows = toy.evaluate(models, world["eval_prompts"], world["world"])
            print("\nexact evaluation on the held-out prompts:\n" + toy.format_table(rows), flush=True)
            write_json(run_dir / "eval.json", rows)
            toy.plot(rows, run_dir / "eval.png")
    if not args.dry_run:
        print(f"\nrun directory: {run_dir}")


if __name__ == "__main__":
    main()
