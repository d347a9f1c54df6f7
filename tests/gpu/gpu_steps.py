"""The GPU check's steps that need one process throughout (tests/gpu/check.py runs each as a command):

    python tests/gpu/gpu_steps.py prepare --dir W          # the toy world, SmolLM2 converted, prompt files in W
    python tests/gpu/gpu_steps.py samples --model M [--reload M2] --prompts P --out R.json [--enforce_eager]
    python tests/gpu/gpu_steps.py iterate --record R.json -- ...iterate.py's flags...

`samples` draws from the vLLM engine this process keeps (generate.sampler, as iterate.py's evaluations
do): the same requests in reverse order and a subset of them (seeded per (seed, id, k)), then, with
--reload, the kept engine reloaded with another checkpoint against a fresh engine started on it.
`iterate` runs iterate.py's main here and records the GPU memory in use whenever a stage other than
generate.py starts in the process (after vllm_backend.close_gpu_engine). Results go to a JSON file
the check reads.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def parser():
    ap = argparse.ArgumentParser(prog="tests/gpu/gpu_steps.py")
    steps = ap.add_subparsers(dest="step", required=True)
    prepare = steps.add_parser("prepare")
    prepare.add_argument("--dir", required=True)
    samples = steps.add_parser("samples")
    samples.add_argument("--model", required=True)
    samples.add_argument("--reload", help="a checkpoint of the same architecture: the kept engine reloaded against a fresh one")
    samples.add_argument("--prompts", required=True)
    samples.add_argument("--out", required=True)
    samples.add_argument("--K", type=int, default=4)
    samples.add_argument("--max_new_tokens", type=int, default=8)
    samples.add_argument("--temperature", type=float, default=1.0)
    samples.add_argument("--seed", type=int, default=5)
    samples.add_argument("--enforce_eager", action="store_true")
    run = steps.add_parser("iterate")
    run.add_argument("--record", required=True)
    run.add_argument("argv", nargs=argparse.REMAINDER, help="-- then iterate.py's flags")
    return ap


def gpu_memory_used():
    """(used, total) MiB of each GPU, from nvidia-smi: no CUDA context made in this process."""
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,memory.total", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return [tuple(int(x) for x in line.split(",")) for line in out.strip().splitlines()]


def prepare(out_dir):
    """The worlds' models (built or found in the cache) and the prompt files the check's commands read."""
    import iterate
    from machinery.records import read_records, write_records
    from worlds import instruct, toy
    out_dir = Path(out_dir)
    world = toy.build_world(iterate.default_world_dir("toy", 0), seed=0)
    instruct.converted_model_dir()
    write_records(out_dir / "toy_prompts.jsonl", read_records(world["train_prompts"], stage="prompts")[:64])
    _, held_out = instruct.make_prompts(seed=0)
    write_records(out_dir / "smol_prompts.jsonl", [{"id": r["id"], "prompt": r["prompt"]} for r in held_out[:8]])


def by_id(records):
    return {r["id"]: r["responses"] for r in records}


def samples(args):
    from generate import sampler
    from machinery import vllm_backend
    from machinery.records import read_records
    records = read_records(args.prompts, stage="prompts")
    sample = sampler("vllm", enforce_eager=args.enforce_eager)
    decoding = dict(temperature=args.temperature, top_p=1.0, top_k=0, max_new_tokens=args.max_new_tokens, seed=args.seed)
    first = by_id(sample(args.model, records, args.K, **decoding))
    backwards = by_id(sample(args.model, records[::-1], args.K, **decoding))  # the kept engine: same weights reloaded
    subset = by_id(sample(args.model, records[:3], args.K, **decoding))
    result = dict(dtype=vllm_backend.KEPT["kwargs"]["dtype"], requests=len(records) * args.K,
                  reversed_equal=first == backwards,
                  subset_agreement=sum(subset[i][k] == first[i][k] for i in subset for k in range(args.K)) / (3 * args.K),
                  distinct=len({y for ys in first.values() for y in ys}))
    if args.reload:
        reloaded = by_id(sample(args.reload, records, args.K, **decoding))  # weights reloaded into the kept engine
        vllm_backend.close_engine()
        fresh = by_id(sample(args.reload, records, args.K, **decoding))  # a new engine on the HF save
        result.update(reload_equal=reloaded == fresh, reload_differs_from_base=reloaded != first)
    vllm_backend.close_engine()
    Path(args.out).write_text(json.dumps(result, indent=1))


def run_iterate(args):
    import iterate
    from machinery import vllm_backend
    seen = []
    close = vllm_backend.close_gpu_engine

    def close_and_measure():  # launch.run_here calls it before every stage but generate.py
        close()
        seen.append(gpu_memory_used())
    vllm_backend.close_gpu_engine = close_and_measure
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    iterate.main(argv)
    Path(args.record).write_text(json.dumps({"memory_at_rank_and_train": seen}))


def main(argv=None):
    args = parser().parse_args(argv)
    if args.step == "prepare":
        prepare(args.dir)
    elif args.step == "samples":
        samples(args)
    else:
        run_iterate(args)


if __name__ == "__main__":
    main()
