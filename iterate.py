"""The SPPO loop: for t = 1..T, generate from pi_{t-1}, rank, train pi_t with reference pi_{t-1}.

    python iterate.py                                   # the embedded toy world, 3 iterations, CPU
    python iterate.py --model DIR --prompts FILE.jsonl --judge module:factory --judge_path X --run_dir runs/me
    python iterate.py --model DIR ... --nproc_per_node 8                # every stage on the 8 GPUs of one node

Iteration t works on the t-th of T equal slices of the prompts (each prompt used once) and
starts from the model the previous iteration trained. Each stage runs as its own process (on
GPUs; under torchrun) or, with one process and no GPU, in this one (`--in_process`: its
main(argv), without another ~3-5 s of imports). It writes its output atomically; a stage whose
output exists is skipped, so a killed run resumes where it stopped when the same command is run
again (training itself continues from its last checkpoint, see train.py). The run directory
keeps the full config, seeds and library versions (config.json), every stage's JSONL and every
iteration's model.

Every flag of generate.py, rank.py and train.py is a flag of iterate.py too, with the stage's
own type, choices and default (flags.py), and reaches that stage; all of them are checked before
anything runs. The defaults below are the stages' own; a preset (toy without --model, paper with
one) changes some: --dry-run prints the values a run gets and every command.
"""
import argparse
import gc
import hashlib
import importlib
import importlib.metadata
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

import flags
from common import (InputError, atomic_write, cache_root, check_model_path, checked_prompt_ids, fail_with, load_prompts, load_tokenizer,
                    model_context, nonneg_float, nonneg_int, positive_int, probability, prompt_text, read_records, run_info,
                    write_json, write_records)

HERE = Path(__file__).resolve().parent

# The stage flags iterate.py sets itself, per iteration (paths, the iteration's model, the seed);
# every other stage flag is a flag of iterate.py too (stage_flags).
PLUMBING = {"generate": ("model", "prompts", "out", "seed"), "rank": ("responses", "out", "template_model"),
            "train": ("model", "ranked", "out", "seed")}
# Two stages' flags of one name and two meanings get the stage's name here; a flag of one name
# and one meaning in two stages (--prompt_format, --dtype) is one flag that goes to both.
RENAMED = {("generate", "batch_size"): "generate_batch_size", ("rank", "batch_size"): "rank_batch_size"}

# Each default is declared once: a stage flag's in its stage's parser (flags.py: the paper's
# values), iterate.py's own flags' in parse_args. A preset lists only what it changes from those
# (tests/test_flags.py checks that none restates a default); a flag given on the command line wins.
PRESETS = {
    # The official scripts' values where they differ from the paper's (the stage defaults):
    # generation at T 0.7, top_p 0.9 with 2048 new tokens (scripts/generate.py), training cut to
    # max_length 1024 (train.py counts the cuts); gradient checkpointing as
    # recipes/uclaml-sppo/config_full.yaml; AlpacaEval outputs decoded as models_configs/*/configs.yaml
    # (iterate.py's --eval_* defaults).
    "paper": dict(temperature=0.7, top_p=0.9, max_new_tokens=2048, grad_checkpointing=True),
    # The toy world: see NOTES.md for why eta=10, lr=1e-4, 4 epochs and 8 new tokens.
    "toy": dict(max_new_tokens=8, eta=10.0, lr=1e-4, lr_schedule="constant", epochs=4, global_batch=32, micro_batch=32,
                max_prompt_length=64, max_length=96, eval_temperature=0.0, eval_top_p=1.0, eval_max_new_tokens=8),
    # The real-LM world (Gemma-3-270M, VADER): see NOTES.md for the search behind these values.
    "sentiment": dict(K=4, max_new_tokens=20, eta=10.0, lr=2e-6, lr_schedule="constant", global_batch=8,
                      micro_batch=4, max_prompt_length=64, max_length=96, freeze_embeddings=True,
                      eval_temperature=0.0, eval_top_p=1.0, eval_max_new_tokens=20),
}
# Presets that bring their own model, prompts, judge and evaluator (a module with build_world and
# evaluate); used when no --model is given.
WORLDS = ("toy", "sentiment")
# The official runs (uclaml/SPPO run_sppo_*.sh): all three models use the same three UltraFeedback
# prompt sets, one per iteration, PairRM with its aggregated scores reading the chat-templated
# prompt (scripts/rank.py), and the paper's training values.
OFFICIAL_PROMPTS = ",".join(f"UCLA-AGI/data-mistral-7b-instruct-sppo-iter{i}" for i in (1, 2, 3))
for _name, _model, _own in [("mistral-7b", "mistralai/Mistral-7B-Instruct-v0.2", {}),
                            ("llama-3-8b", "meta-llama/Meta-Llama-3-8B-Instruct", {}),
                            ("gemma-2-9b", "google/gemma-2-9b-it", {"micro_batch": 4})]:
    PRESETS[_name] = dict(PRESETS["paper"], model=_model, prompts=OFFICIAL_PROMPTS, judge="pairrm", p_mode="scores",
                          judge_prompt="template", backend="vllm", **_own)
# settings a run directory can be resumed with when they change: how the work runs, not what it computes
RESUME_FREE = ("dry_run", "nproc_per_node", "run_dir", "save_every", "in_process")


def stage_flags():
    """{stage: [(iterate.py's name or None for plumbing, the stage parser's action)]}, in the stage's order."""
    out = {}
    for stage, parser in flags.STAGE_PARSERS.items():
        actions = [a for a in parser()._actions if a.option_strings and a.dest != "help"]
        out[stage] = [(None if a.dest in PLUMBING[stage] else RENAMED.get((stage, a.dest), a.dest), a) for a in actions]
    return out


STAGE_FLAGS = stage_flags()


def add_stage_flags(ap):
    """Each stage flag (but plumbing) as a flag of iterate.py, once, with the stage's type, choices,
    default and help. None is required here: the built-in worlds bring their own --judge."""
    users = {}
    for stage, pairs in STAGE_FLAGS.items():
        for name, action in pairs:
            if name is not None:
                users.setdefault(name, ([], action))[0].append(f"{stage}.py")
    for name, (stages, action) in users.items():
        help_text = ", ".join(stages) + (f": {action.help}" if action.help else "") + " (default: %(default)s)"
        if isinstance(action, argparse.BooleanOptionalAction):
            ap.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=action.default, help=help_text)
        else:
            ap.add_argument(f"--{name}", type=action.type, choices=action.choices, default=action.default,
                            metavar=action.metavar, help=help_text)


def stage_argv(stage, args, **given):
    """The stage's arguments in the stage's order: the flags `given` (paths, model, seed, and any
    value set here), every other flag as resolved in `args`; a value None leaves its flag out."""
    argv = []
    for name, action in STAGE_FLAGS[stage]:
        value = given[action.dest] if action.dest in given else getattr(args, name) if name else None
        if value is None:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(f"--{action.dest}" if value else f"--no-{action.dest}")
        else:
            argv += [f"--{action.dest}", value]
    return argv


def arg_parser():
    """iterate.py's own flags, then every stage flag; a preset's values are set on top in parse_args."""
    ap = flags.Parser(prog="iterate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="base model pi_0 (HF dir or hub name); default: the toy world")
    ap.add_argument("--prompts", help="JSONL file, saved dataset dir or hub dataset: split in --iterations "
                    "slices; or one comma-separated source per iteration")
    ap.add_argument("--prompt_split", default="train", help="dataset split of the prompt sources")
    ap.add_argument("--prompt_column", default="prompt", help="dataset column holding the prompt")
    ap.add_argument("--prompts_per_iteration", type=nonneg_int, default=0,
                    help="at most this many prompts of each iteration's slice (0: the whole slice)")
    ap.add_argument("--eval_prompts", help="held-out prompts (JSONL, or AlpacaEval's JSON list with 'instruction'): "
                    "one output per prompt and iteration in AlpacaEval format, decoded with --eval_temperature etc.")
    ap.add_argument("--eval_max", type=nonneg_int, default=805, help="at most this many eval prompts")
    # AlpacaEval's own decoding of the official models (models_configs/*/configs.yaml); the other
    # generation flags are the run's
    ap.add_argument("--eval_temperature", type=nonneg_float, default=0.7, help="of the --eval_prompts outputs")
    ap.add_argument("--eval_top_p", type=probability, default=0.9, help="of the --eval_prompts outputs")
    ap.add_argument("--eval_max_new_tokens", type=positive_int, default=2048, help="of the --eval_prompts outputs")
    ap.add_argument("--run_dir", help="default runs/{preset}-seed{seed}")
    ap.add_argument("--world_dir", help="a built-in world's directory, built there once and reused; default: "
                    "$SPPO_CACHE (else ~/.cache/sppo)/worlds/{preset}-seed{seed}-{hash of the world's code}, "
                    "shared by every run of that world and seed")
    ap.add_argument("--iterations", type=positive_int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", choices=sorted(PRESETS), help="default: toy without --model, else paper; "
                    "toy and sentiment without --model: that built-in world")
    ap.add_argument("--nproc_per_node", type=positive_int, default=1,
                    help="processes per stage, e.g. one per GPU; > 1: each stage runs under torchrun")
    ap.add_argument("--in_process", action=argparse.BooleanOptionalAction, default=None,
                    help="run each stage's main() in this process, not a process of its own (default: so with one "
                         "process and no GPU, where it saves each stage's ~3-5 s of imports; apart on GPUs, so "
                         "that vLLM's and training's memory are freed between stages, and under torchrun)")
    ap.add_argument("--dry-run", dest="dry_run", action="store_true", help="print config and commands only")
    add_stage_flags(ap)
    return ap


def parse_args(argv=None):
    ap = arg_parser()
    args = ap.parse_args(argv)
    preset = args.preset or ("paper" if args.model else "toy")
    ap.set_defaults(preset=preset, **PRESETS[preset])  # the preset's values where the command line gives none
    args = ap.parse_args(argv)
    if args.model is None and args.preset not in WORLDS:
        ap.error(f"--preset {args.preset} needs --model (only {', '.join(WORLDS)} bring their own)")
    if args.model is not None and not (args.prompts and args.judge):
        ap.error("with --model, give --prompts and --judge too")
    if args.in_process and (args.nproc_per_node > 1 or args.backend == "vllm"):
        ap.error("--in_process needs --nproc_per_node 1 and --backend hf")
    if args.model is not None and args.world_dir:
        ap.error("--world_dir is for the built-in worlds (no --model)")
    args.run_dir = Path(args.run_dir or f"runs/{args.preset}-seed{args.seed}")
    return args


def stages_in_process(args):
    """--in_process as given, else: with one process and no GPU (see its help)."""
    if args.in_process is not None:
        return args.in_process
    import torch
    return args.nproc_per_node == 1 and args.backend == "hf" and not torch.cuda.is_available()


def default_world_dir(preset, seed):
    """The cache directory of a built-in world: named by preset, seed and a hash of what builds it
    (the world's module, common.py, torch, transformers and tokenizers versions), so runs and sweep
    cells of one world and seed share it, and a change to that code builds a new one."""
    code = b"".join((HERE / name).read_bytes() for name in (f"{preset}.py", "common.py"))
    versions = [importlib.metadata.version(package) for package in ("torch", "transformers", "tokenizers")]
    version = hashlib.sha256(code + repr(versions).encode()).hexdigest()[:12]
    return cache_root() / "worlds" / f"{preset}-seed{seed}-{version}"


def run(cmd, dry_run, timings=None, in_process=False, **where):
    """Run one stage: as its own process, or `in_process` (its main(argv) called here). Its wall
    time and peak memory go to `timings` (a JSONL file) with `where`."""
    print("+ " + " ".join(str(c) for c in cmd), flush=True)
    if dry_run:
        return
    t0 = time.time()
    script = next(Path(str(c)) for c in cmd if str(c).endswith(".py"))
    code, peak = run_here(script, cmd[cmd.index(script) + 1:]) if in_process else run_process(cmd)
    if code:  # the stage said why; no traceback of ours on top
        print(f"error: iteration {where['iteration']}: {script.name} exited with code {code}", file=sys.stderr)
        sys.exit(code)
    if timings is not None:
        log_time(timings, t0, peak_rss_gb=round(peak / 2**20, 2) if peak else None, **where)


def run_process(cmd):
    """The stage as its own process (or torchrun's): (exit code, peak RSS in KiB)."""
    # the stage (and each torchrun rank) exits when this process is gone (common.watch_launcher)
    proc = subprocess.Popen([str(c) for c in cmd], env=dict(os.environ, SPPO_LAUNCHER_PID=str(os.getpid())))
    peak = 0
    while proc.poll() is None:  # (a child's ru_maxrss would include this process's RSS at fork)
        peak = max(peak, peak_rss_kib(proc.pid))
        time.sleep(0.5)
    return proc.returncode, peak


def run_here(script, argv):
    """The stage's main(argv) in this process: (exit code, peak RSS in KiB since it began). What a
    stage could leave behind is put back: sys.argv (run_info records the stage's own), and the
    global RNG states (train.py seeds them; the subprocess path starts each stage afresh)."""
    import random

    import torch
    module = importlib.import_module(script.stem)
    if not gc.get_freeze_count():  # once: what lives now (imports, this run's state) stays, so the
        gc.collect()               # collection after each stage scans only what stages made (~0.3 s less each)
        gc.freeze()
    saved = sys.argv, torch.get_rng_state(), random.getstate()
    sys.argv = [str(script)] + [str(a) for a in argv]
    try:
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS from here on (Linux)
    except OSError:
        pass
    try:
        module.main(sys.argv[1:])
        code = 0
    except SystemExit as e:  # fail_with's exit 2 after its one line, or sys.exit(message)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except InputError as e:  # a stage that left it uncaught: still one line
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = 2
    finally:
        sys.argv = saved[0]
        torch.set_rng_state(saved[1])
        random.setstate(saved[2])
        gc.collect()  # the stage's model is garbage now: free it before the next stage loads one
    return code, peak_rss_kib(os.getpid())


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
            for r in read_records(responses_path, stage="responses", K=1)]
    atomic_write(out_path, lambda f: json.dump(rows, f, indent=1, ensure_ascii=False))


def split_prompts(records, parts):
    """Slice t of `parts` near-equal contiguous slices; every prompt lands in exactly one."""
    bounds = [round(i * len(records) / parts) for i in range(parts + 1)]
    return [records[bounds[i]:bounds[i + 1]] for i in range(parts)]


def main(argv=None):
    args = parse_args(argv)  # every flag and choice checked here, before torch loads
    from judges import judge_factory
    args.in_process = stages_in_process(args)
    run_dir = args.run_dir.resolve()
    timings = run_dir / "timings.jsonl"  # wall time of every stage run, appended (a resumed run adds its own)
    start = time.time()
    world, world_module = None, None
    if args.model is None:  # a built-in world: model, prompts, judge and evaluator built here
        world_module = importlib.import_module(args.preset)
        args.world_dir = Path(args.world_dir or default_world_dir(args.preset, args.seed)).resolve()
        if args.dry_run:
            world = world_module.world_paths(args.world_dir)
        else:
            t0 = time.time()
            run_dir.mkdir(parents=True, exist_ok=True)
            try:
                world = world_module.build_world(args.world_dir, seed=args.seed)
            except InputError as e:
                fail_with(e)
            log_time(timings, t0, iteration=0, stage="build_world")
        args.model, args.prompts = str(world["model"]), str(world["train_prompts"])
        args.judge, args.judge_path = world["judge"], world["judge_path"] and str(world["judge_path"])
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    print(json.dumps(config, indent=2))
    if not args.dry_run:
        try:  # everything checked before any work: the run directory's settings, judge, model, every slice
            check_same_settings(run_dir / "config.json", config)
            judge_factory(args.judge)  # a module:factory judge that does not import fails now, not after generate
            check_model_path(args.model)
            slices = prompt_slices(args)
            check_prompts_fit(args, slices)
            eval_prompts = args.eval_prompts and load_prompts(args.eval_prompts, args.prompt_split, args.prompt_column)
        except InputError as e:
            fail_with(e)
        write_json(run_dir / "config.json", run_info(config))
        if eval_prompts and not (run_dir / "eval_prompts.jsonl").exists():
            write_records(run_dir / "eval_prompts.jsonl", eval_prompts[:args.eval_max])

    def stage(script, t, step=None, **given):  # a stage of iteration t: `given` flags, the others as resolved here
        run(launcher(args.nproc_per_node) + [HERE / f"{script}.py"] + stage_argv(script, args, **given), args.dry_run,
            timings, args.in_process, iteration=t, stage=step or script)

    def export(t, model_dir):  # outputs of pi_t on the eval prompts, for alpaca_eval
        out = run_dir / f"iter{t}" / "eval_responses.jsonl"
        if args.dry_run or not out.exists():
            stage("generate", t, "export", model=model_dir, prompts=run_dir / "eval_prompts.jsonl", out=out, seed=args.seed, K=1,
                  temperature=args.eval_temperature, top_p=args.eval_top_p, max_new_tokens=args.eval_max_new_tokens)
        if not args.dry_run:
            export_alpaca_eval(out, run_dir / f"iter{t}" / "model_outputs.json", f"{run_dir.name}-iter{t}")
    if args.eval_prompts:
        export(0, args.model)

    def evaluate(models, t):  # the built-in world's held-out metrics of pi_0 .. pi_t (each policy scored once)
        t0 = time.time()
        rows = world_module.evaluate(models, world, run_dir)
        print("\nevaluation on the held-out prompts:\n" + world_module.format_table(rows), flush=True)
        write_json(run_dir / "eval.json", rows)
        if t == args.iterations:  # the plot once, at the end (matplotlib and each drawing cost ~1 s on the toy)
            world_module.plot(rows, run_dir / "eval.png")
        log_time(timings, t0, iteration=t, stage="evaluate")

    models = [args.model]
    if world is not None and not args.dry_run:
        evaluate(models, 0)  # the baseline, before iteration 1 (its time is iteration 0's)
    for t in range(1, args.iterations + 1):
        it = run_dir / f"iter{t}"
        prompts, responses, ranked, model = it / "prompts.jsonl", it / "responses.jsonl", it / "ranked.jsonl", it / "model"
        print(f"\n=== iteration {t}: pi_{t - 1} -> pi_{t} ===", flush=True)
        if not args.dry_run and not prompts.exists():
            write_records(prompts, slices[t - 1])
        if args.dry_run or not responses.exists():
            stage("generate", t, model=models[-1], prompts=prompts, out=responses, seed=args.seed * 1000 + t)
        if args.dry_run or not ranked.exists():
            stage("rank", t, responses=responses, out=ranked,
                  template_model=models[-1] if args.judge_prompt == "template" else None)
        if args.dry_run or not (model / "train_info.json").exists():
            stage("train", t, model=models[-1], ranked=ranked, out=model, seed=args.seed)
        models.append(str(model))
        if args.eval_prompts:
            export(t, model)
        if world is not None and not args.dry_run:
            evaluate(models, t)
    if not args.dry_run:
        print(f"\nrun directory: {run_dir}; wall time of this invocation {time.time() - start:.1f} s; "
              f"stage times in {timings.name}")


if __name__ == "__main__":
    main()
