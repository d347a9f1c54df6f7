"""The SPPO loop: for t = 1..T, generate from pi_{t-1}, rank, train pi_t with reference pi_{t-1}.

    python iterate.py                                   # the embedded toy world, 3 iterations, CPU
    python iterate.py --model DIR --prompts FILE.jsonl --judge module:factory --judge_path X --run_dir runs/me
    python iterate.py --model DIR ... --nproc_per_node 8                # every stage on the 8 GPUs of one node

Iteration t works on the t-th of T equal slices of the prompts (each prompt used once) and
starts from the model the previous iteration trained. Every stage runs as its own process and
writes its output atomically; a stage whose output exists is skipped, so a killed run resumes
where it stopped when the same command is run again (training itself continues from its last
checkpoint, see train.py). The run directory keeps the full config, seeds and library versions
(config.json), every stage's JSONL and every iteration's model.
"""
import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# CPU threads wait for work by sleeping, not spinning: on a machine shared with other jobs,
# spinning threads fight them for the cores (a toy iteration 2-3x slower than PASSIVE, 1.1-1.3x
# with libgomp's default); on an idle one the settings are within noise (BENCHMARKS.md, section
# 5). Set before torch loads libgomp; every stage process inherits it; a user's setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from common import (PROMPT_FORMATS, InputError, atomic_write, check_model_path, checked_prompt_ids, fail_with, finite_float,
                    load_prompts, load_tokenizer, model_context, nonneg_float, nonneg_int, positive_int, probability,
                    prompt_text, read_records, run_info, write_json, write_records)

HERE = Path(__file__).resolve().parent

# Settings that differ between the embedded toy world and a real model; a flag overrides them.
PRESETS = {
    # The paper's and official code's values (section 5; official scripts).
    # Generation allows 2048 new tokens (scripts/generate.py), training cuts to max_length 1024
    # (train.py counts the cuts); gradient checkpointing as recipes/uclaml-sppo/config_full.yaml;
    # the AlpacaEval outputs decoded as models_configs/*/configs.yaml (T 0.7, top_p 0.9, 2048).
    "paper": dict(K=5, temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=2048, eta=1000.0, lr=5e-7,
                  lr_schedule="linear", epochs=1, global_batch=64, micro_batch=8, max_prompt_length=512,
                  max_length=1024, prompts_per_iteration=0, grad_checkpointing=True, freeze_embeddings=False, judge_prompt="plain",
                  eval_temperature=0.7, eval_top_p=0.9, eval_max_new_tokens=2048),
    # The toy world: see NOTES.md for why eta=10, lr=1e-4 and 5 epochs.
    "toy": dict(K=5, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=16, eta=10.0, lr=1e-4,
                lr_schedule="constant", epochs=5, global_batch=32, micro_batch=8, max_prompt_length=64,
                max_length=96, grad_checkpointing=False, judge_prompt="plain",
                eval_temperature=0.0, eval_top_p=1.0, eval_max_new_tokens=16),
    # The real-LM world (Gemma-3-270M, VADER): see NOTES.md for the search behind these values.
    "sentiment": dict(K=4, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=20, eta=10.0, lr=2e-6,
                      lr_schedule="constant", epochs=1, global_batch=8, micro_batch=4, max_prompt_length=64,
                      max_length=96, prompts_per_iteration=0, grad_checkpointing=False, freeze_embeddings=True,
                      judge_prompt="plain",
                      eval_temperature=0.0, eval_top_p=1.0, eval_max_new_tokens=20),
}
# Presets that bring their own model, prompts, judge and evaluator (a module with build_world and
# evaluate); used when no --model is given.
WORLDS = ("toy", "sentiment")
# The official runs (uclaml/SPPO run_sppo_*.sh): all three models use the same three UltraFeedback
# prompt sets, one per iteration, PairRM with its aggregated scores reading the chat-templated
# prompt (scripts/rank.py), and the paper's training values.
OFFICIAL_PROMPTS = ",".join(f"UCLA-AGI/data-mistral-7b-instruct-sppo-iter{i}" for i in (1, 2, 3))
for _name, _model, _micro in [("mistral-7b", "mistralai/Mistral-7B-Instruct-v0.2", 8),
                              ("llama-3-8b", "meta-llama/Meta-Llama-3-8B-Instruct", 8),
                              ("gemma-2-9b", "google/gemma-2-9b-it", 4)]:
    PRESETS[_name] = dict(PRESETS["paper"], model=_model, prompts=OFFICIAL_PROMPTS, judge="pairrm", p_mode="scores",
                          judge_prompt="template", backend="vllm", micro_batch=_micro)
# the stages' own checks of these flags, applied here so a bad value stops the run before any work
FLAG_TYPES = dict(K=positive_int, temperature=nonneg_float, top_p=probability, top_k=nonneg_int,
                  max_new_tokens=positive_int, eta=finite_float, lr=nonneg_float, epochs=positive_int,
                  global_batch=positive_int, micro_batch=positive_int, max_prompt_length=positive_int,
                  max_length=positive_int, prompts_per_iteration=nonneg_int, eval_temperature=nonneg_float,
                  eval_top_p=probability, eval_max_new_tokens=positive_int)
# settings a run directory can be resumed with when they change: how the work runs, not what it computes
RESUME_FREE = ("dry_run", "nproc_per_node", "run_dir", "save_every")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="base model pi_0 (HF dir or hub name); default: the toy world")
    ap.add_argument("--prompts", help="JSONL file, saved dataset dir or hub dataset: split in --iterations "
                    "slices; or one comma-separated source per iteration")
    ap.add_argument("--prompt_split", default="train", help="dataset split of the prompt sources")
    ap.add_argument("--prompt_column", default="prompt", help="dataset column holding the prompt")
    ap.add_argument("--eval_prompts", help="held-out prompts (JSONL, or AlpacaEval's JSON list with 'instruction'): "
                    "one output per prompt and iteration in AlpacaEval format, decoded with --eval_temperature etc.")
    ap.add_argument("--eval_max", type=nonneg_int, default=805, help="at most this many eval prompts")
    ap.add_argument("--judge", help="pairrm, reward or module:factory for rank.py")
    ap.add_argument("--judge_path", help="what the judge loads")
    ap.add_argument("--p_mode", help="pairrm: pairwise (the paper's P) or scores (official)")
    ap.add_argument("--backend", help="generation: hf (default) or vllm")
    ap.add_argument("--prompt_format", default="auto", choices=PROMPT_FORMATS,
                    help="chat template, plain text (base models) or auto (chat if the tokenizer has a template)")
    ap.add_argument("--run_dir", help="default runs/toy-seed{seed} for the toy world")
    ap.add_argument("--iterations", type=positive_int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", choices=sorted(PRESETS), help="default: toy without --model, else paper; "
                    "toy and sentiment without --model: that built-in world")
    ap.add_argument("--loss_type", default="sppo")
    ap.add_argument("--optimizer", default="rmsprop")
    ap.add_argument("--nproc_per_node", type=positive_int, default=1,
                    help="processes per stage, e.g. one per GPU; > 1: each stage runs under torchrun")
    ap.add_argument("--save_every", type=nonneg_int, default=0, help="train.py: resumable checkpoint every N steps")
    ap.add_argument("--dry-run", dest="dry_run", action="store_true", help="print config and commands only")
    for key, value in PRESETS["paper"].items():
        help_text = f"preset default (paper: {value}" + ("; 0 = the whole slice)" if key == "prompts_per_iteration" else ")")
        if isinstance(value, bool):  # --grad_checkpointing / --no-grad_checkpointing
            ap.add_argument(f"--{key}", action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            ap.add_argument(f"--{key}", type=FLAG_TYPES.get(key, type(value)), default=None, help=help_text)
    args = ap.parse_args(argv)
    args.preset = args.preset or ("paper" if args.model else "toy")
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.model is None and args.preset not in WORLDS:
        ap.error(f"--preset {args.preset} needs --model (only {', '.join(WORLDS)} bring their own)")
    if args.model is not None and not (args.prompts and args.judge):
        ap.error("with --model, give --prompts and --judge too")
    args.run_dir = Path(args.run_dir or f"runs/{args.preset}-seed{args.seed}")
    return args


def run(cmd, dry_run, timings=None, **where):
    """Run one stage; its wall time and peak memory go to `timings` (a JSONL file) with `where`."""
    print("+ " + " ".join(str(c) for c in cmd), flush=True)
    if not dry_run:
        t0 = time.time()
        # the stage (and each torchrun rank) exits when this process is gone (common.watch_launcher)
        proc = subprocess.Popen([str(c) for c in cmd], cwd=HERE, env=dict(os.environ, SPPO_LAUNCHER_PID=str(os.getpid())))
        peak = 0
        while proc.poll() is None:  # (a child's ru_maxrss would include this process's RSS at fork)
            peak = max(peak, peak_rss_kib(proc.pid))
            time.sleep(0.5)
        if proc.returncode:  # the stage said why; no traceback of ours on top
            script = next(Path(str(c)).name for c in cmd if str(c).endswith(".py"))
            print(f"error: iteration {where['iteration']}: {script} exited with code {proc.returncode}", file=sys.stderr)
            sys.exit(proc.returncode)
        if timings is not None:
            log_time(timings, t0, peak_rss_gb=round(peak / 2**20, 2), **where)


def peak_rss_kib(pid) -> int:
    """Peak resident memory so far of process `pid` and its descendants (torchrun's ranks), summed (Linux)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:  # exited meanwhile, or not Linux
        return 0
    own = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)
    return own + sum(peak_rss_kib(int(child)) for child in children)


def log_time(timings, t0, peak_rss_gb=None, **where):
    """Append {where..., seconds, peak_rss_gb} to the run's timings.jsonl and say it."""
    entry = dict(where, seconds=round(time.time() - t0, 2))
    if peak_rss_gb is not None:  # of a stage process (Linux reports KiB); None for work done in this process
        entry["peak_rss_gb"] = peak_rss_gb
    print(f"[time] {' '.join(str(v) for v in where.values())}: {entry['seconds']:.1f} s"
          + (f", peak RSS {peak_rss_gb:.2f} GB" if peak_rss_gb is not None else ""), flush=True)
    with open(timings, "a") as f:
        f.write(json.dumps(entry) + "\n")


def launcher(nproc):
    """How a stage is started: plain python, or torchrun for several processes on this node
    (generate and rank shard the prompts over them, train shards the model with FSDP2)."""
    if nproc <= 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def prompt_slices(args):
    """One list of prompt records per iteration: a source per iteration, or one source split.
    Every slice is checked now: an empty one is an error before any work."""
    sources = args.prompts.split(",")
    if len(sources) not in (1, args.iterations):
        raise InputError(f"--prompts: {len(sources)} sources for {args.iterations} iterations "
                         f"(give 1 or {args.iterations})")
    loaded = [load_prompts(s, args.prompt_split, args.prompt_column) for s in sources]
    if len(loaded) == 1:
        loaded = split_prompts(loaded[0], args.iterations)
    if len(loaded) != args.iterations:
        raise InputError(f"--prompts: {len(loaded)} sources for {args.iterations} iterations (give 1 or {args.iterations})")
    slices = [part[:args.prompts_per_iteration or None] for part in loaded]  # --prompts_per_iteration (0: all)
    for t, records in enumerate(slices, 1):
        if not records:
            raise InputError(f"--prompts: iteration {t} of {args.iterations} gets no prompts "
                             f"({sum(map(len, loaded))} prompts in all)")
    return slices


def check_prompts_fit(args, slices):
    """Every prompt of every slice, checked now as generate.py and train.py will check it: the
    chat template takes it, it fits the model's context with the new tokens, and it leaves room
    for a response within --max_length. A bad prompt of the last iteration does not wait for it."""
    tokenizer, context = load_tokenizer(args.model), model_context(args.model)
    sources = args.prompts.split(",")
    per_source = slices if len(sources) == len(slices) else [sum(slices, [])]  # each in its file's order
    for source, records in zip(sources, per_source):
        ids = checked_prompt_ids(records, tokenizer, source, context and context - args.max_new_tokens,
                                 f"the model's context ({context}) minus --max_new_tokens ({args.max_new_tokens})",
                                 args.prompt_format)
        longest = max(min(len(p), args.max_prompt_length) for p in ids)
        if longest >= args.max_length:
            raise InputError(f"--max_length {args.max_length}: {source} has a prompt of {longest} tokens "
                             f"(after --max_prompt_length {args.max_prompt_length}), no room for a response")


def check_same_settings(config_path, config):
    """A run directory is resumed only with the settings that made it (RESUME_FREE aside):
    otherwise its finished stages would be kept as if made with the new ones."""
    if not config_path.exists():
        return
    saved = json.loads(config_path.read_text())["config"]
    diff = sorted(k for k in set(saved) | set(config) if k not in RESUME_FREE and saved.get(k) != config.get(k))
    if diff:
        details = "; ".join(f"--{k}: {saved.get(k)!r} in the run, {config.get(k)!r} now" for k in diff)
        raise InputError(f"{config_path}: this run directory was made with other settings ({details}). "
                         "Give the same flags to resume it, or another --run_dir")


def export_alpaca_eval(responses_path, out_path, generator):
    """AlpacaEval's model_outputs.json: instruction, output, generator (and dataset) per prompt."""
    rows = [{"instruction": prompt_text(r["prompt"]), "output": r["responses"][0], "generator": generator,
             **({"dataset": r["dataset"]} if "dataset" in r else {})}
            for r in read_records(responses_path, stage="prompts")]  # K = 1
    atomic_write(out_path, lambda f: json.dump(rows, f, indent=1, ensure_ascii=False))


def split_prompts(records, parts):
    """Slice t of `parts` near-equal contiguous slices; every prompt lands in exactly one."""
    bounds = [round(i * len(records) / parts) for i in range(parts + 1)]
    return [records[bounds[i]:bounds[i + 1]] for i in range(parts)]


def main(argv=None):
    args = parse_args(argv)
    run_dir = args.run_dir.resolve()
    timings = run_dir / "timings.jsonl"  # wall time of every stage run, appended (a resumed run adds its own)
    start = time.time()
    world, world_module = None, None
    if args.model is None:  # a built-in world: model, prompts, judge and evaluator built here
        world_module = importlib.import_module(args.preset)
        t0 = time.time()
        if not args.dry_run:
            run_dir.mkdir(parents=True, exist_ok=True)
        try:
            world = world_module.build_world(run_dir / "world", seed=args.seed, build=not args.dry_run)
        except InputError as e:
            fail_with(e)
        if not args.dry_run:
            log_time(timings, t0, iteration=0, stage="build_world")
        args.model, args.prompts = str(world["model"]), str(world["train_prompts"])
        args.judge, args.judge_path = world["judge"], world["judge_path"] and str(world["judge_path"])
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    print(json.dumps(config, indent=2))
    if not args.dry_run:
        try:  # everything checked before any work: the run directory's settings, model, every slice
            check_same_settings(run_dir / "config.json", config)
            check_model_path(args.model)
            slices = prompt_slices(args)
            check_prompts_fit(args, slices)
            eval_prompts = args.eval_prompts and load_prompts(args.eval_prompts, args.prompt_split, args.prompt_column)
        except InputError as e:
            fail_with(e)
        write_json(run_dir / "config.json", run_info(config))
        if eval_prompts and not (run_dir / "eval_prompts.jsonl").exists():
            write_records(run_dir / "eval_prompts.jsonl", eval_prompts[:args.eval_max])

    def export(t, model_dir):  # outputs of pi_t on the eval prompts, for alpaca_eval
        out = run_dir / f"iter{t}" / "eval_responses.jsonl"
        if args.dry_run or not out.exists():
            run(launcher(args.nproc_per_node) + [
                HERE / "generate.py", "--model", model_dir, "--prompts", run_dir / "eval_prompts.jsonl", "--out", out,
                "--K", 1, "--temperature", args.eval_temperature, "--top_p", args.eval_top_p,
                "--max_new_tokens", args.eval_max_new_tokens, "--seed", args.seed,
                "--prompt_format", args.prompt_format] + backend, args.dry_run,
                timings, iteration=t, stage="export")
        if not args.dry_run:
            export_alpaca_eval(out, run_dir / f"iter{t}" / "model_outputs.json", f"{run_dir.name}-iter{t}")
    backend = ["--backend", args.backend] if args.backend else []
    if args.eval_prompts:
        export(0, args.model)

    models = [args.model]
    for t in range(1, args.iterations + 1):
        it = run_dir / f"iter{t}"
        prompts, responses, ranked, model = it / "prompts.jsonl", it / "responses.jsonl", it / "ranked.jsonl", it / "model"
        print(f"\n=== iteration {t}: pi_{t - 1} -> pi_{t} ===", flush=True)
        if not args.dry_run and not prompts.exists():
            write_records(prompts, slices[t - 1])
        if args.dry_run or not responses.exists():
            run(launcher(args.nproc_per_node) + [
                HERE / "generate.py", "--model", models[-1], "--prompts", prompts, "--out", responses,
                "--K", args.K, "--temperature", args.temperature, "--top_p", args.top_p, "--top_k", args.top_k,
                "--max_new_tokens", args.max_new_tokens, "--seed", args.seed * 1000 + t,
                "--prompt_format", args.prompt_format] + backend, args.dry_run,
                timings, iteration=t, stage="generate")
        if args.dry_run or not ranked.exists():
            run(launcher(args.nproc_per_node) + [
                HERE / "rank.py", "--responses", responses, "--out", ranked, "--judge", args.judge,
                "--judge_prompt", args.judge_prompt] + (["--template_model", models[-1]] if args.judge_prompt == "template" else [])
                + (["--judge_path", args.judge_path] if args.judge_path else [])
                + (["--p_mode", args.p_mode] if args.p_mode else []), args.dry_run, timings, iteration=t, stage="rank")
        if args.dry_run or not (model / "train_info.json").exists():
            run(launcher(args.nproc_per_node) + [
                HERE / "train.py", "--model", models[-1], "--ranked", ranked, "--out", model,
                "--loss_type", args.loss_type, "--eta", args.eta, "--optimizer", args.optimizer, "--lr", args.lr,
                "--lr_schedule", args.lr_schedule, "--epochs", args.epochs, "--global_batch", args.global_batch,
                "--micro_batch", args.micro_batch, "--max_prompt_length", args.max_prompt_length,
                "--max_length", args.max_length, "--seed", args.seed, "--save_every", args.save_every,
                "--prompt_format", args.prompt_format]
                + (["--grad_checkpointing"] if args.grad_checkpointing else [])
                + (["--freeze_embeddings"] if args.freeze_embeddings else []), args.dry_run,
                timings, iteration=t, stage="train")
        models.append(str(model))
        if args.eval_prompts:
            export(t, model)
        if world is not None and not args.dry_run:
            t0 = time.time()
            rows = world_module.evaluate(models, world, run_dir)
            print("\nevaluation on the held-out prompts:\n" + world_module.format_table(rows), flush=True)
            write_json(run_dir / "eval.json", rows)
            world_module.plot(rows, run_dir / "eval.png")
            log_time(timings, t0, iteration=t, stage="evaluate")
    if not args.dry_run:
        print(f"\nrun directory: {run_dir}; wall time of this invocation {time.time() - start:.1f} s; "
              f"stage times in {timings.name}")


if __name__ == "__main__":
    main()
