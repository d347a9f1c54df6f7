"""The SPPO loop: for t = 1..T, generate from pi_{t-1}, rank, train pi_t with reference pi_{t-1}.

    python iterate.py                                   # the embedded toy world, 3 iterations, CPU
    python iterate.py --preset sentiment                # Gemma-3-270M and a sentiment judge, CPU
    python iterate.py --model DIR --prompts FILE.jsonl --judge module:factory --judge_path X --run_dir runs/me
    python iterate.py --model DIR ... --nproc_per_node 8                # every stage on the 8 GPUs of one node

Iteration t works on the t-th of T equal slices of the prompts (each prompt used once) and
starts from the model the previous iteration trained (Algorithm 1). Each stage writes its output
atomically, and a stage whose output exists is skipped: a killed run resumes where it stopped
when the same command is run again (training itself continues from its last checkpoint). The run
directory keeps the full config, seeds and library versions (config.json), every stage's JSONL,
every iteration's model and timings.jsonl (each stage's wall time and peak memory).

Every flag of generate.py, rank.py and train.py is a flag of iterate.py too and reaches its stage
(flags.py); all are checked before anything runs. A preset (toy without --model, paper with one,
or --preset) changes some defaults: --dry-run prints the values a run gets and every command.
"""
import contextlib
import fnmatch
import hashlib
import importlib
import importlib.metadata
import json
import os
import time
from pathlib import Path

# CPU threads wait for work by sleeping, not spinning: on a machine shared with other jobs,
# spinning threads fight them for the cores. Set before torch loads libgomp; every stage process
# inherits it; a user's setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from machinery.flags import changed_settings, iterate_args, missing_package, stage_argv
from machinery.launch import launcher, log_time, run_stage, stages_in_process
from machinery.lm import check_model_files, checked_prompt_ids, load_tokenizer, model_context, prompt_text
from machinery.records import (BUILT, WORK_MARK, InputError, atomic_write, cache_root, check_built, check_model_path,
                               check_not_input, check_output, check_work_dir, content_stamp, exclusive_lock,
                               load_prompts, looks_like_path, make_work_dir, one_line_errors, path_stamp, read_records,
                               run_info, write_json, write_records)

HERE = Path(__file__).resolve().parent
WORLD_CODE = ("machinery/lm.py", "machinery/records.py")  # what a built-in world is built with, besides its own module


def main(argv=None):
    args = iterate_args(argv, __doc__)  # every flag and choice checked here, before torch loads
    args.in_process = stages_in_process(args)
    args.run_dir = Path(args.run_dir).resolve()
    start = time.time()
    check_settings(args)  # what the flags alone decide, before a world is built
    world = open_world(args)  # a built-in world's model, prompts, judge and evaluator; None with --model
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    print(json.dumps(config, indent=2))
    if args.dry_run:
        return iterations(args, world, None, start)
    slices, eval_prompts, inputs = check_inputs(args, config)  # all of them, before anything is written
    with hold_run_dir(args.run_dir):  # ours alone while we run
        write_json(args.run_dir / "config.json", dict(run_info(config), inputs=inputs))
        if eval_prompts:
            write_if_changed(args.run_dir / "eval_prompts.jsonl", eval_prompts)
        if world is not None:
            log_time(args.run_dir / "timings.jsonl", time.time() - world["build_seconds"], iteration=0,
                     stage="build_world")
        iterations(args, world, slices, start)


def iterations(args, world, slices, start):
    """The T iterations, each on its slice of the prompts (slices[t - 1]; None for a dry run)."""
    run_dir = args.run_dir
    timings = run_dir / "timings.jsonl"  # wall time of every stage run, appended (a resumed run adds its own)

    def stage(script, t, done=None, step=None, **given):
        """Stage `script` of iteration t with the flags `given` (the others as resolved here), unless
        its output `done` exists (a resumed run)."""
        if args.dry_run or done is None or not Path(done).exists():
            run_stage(launcher(args.nproc_per_node) + [HERE / f"{script}.py"] + stage_argv(script, args, **given),
                      args.dry_run, timings, args.in_process, iteration=t, stage=step or script)

    models = [args.model]  # pi_0, pi_1, ...
    report(args, world, stage, models, timings)  # pi_0's evaluation: the baseline (iteration 0)
    for t in range(1, args.iterations + 1):
        it = run_dir / f"iter{t}"
        prompts, responses, ranked, model = it / "prompts.jsonl", it / "responses.jsonl", it / "ranked.jsonl", it / "model"
        print(f"\n=== iteration {t}: pi_{t - 1} -> pi_{t} ===", flush=True)
        if not args.dry_run:
            write_if_changed(prompts, slices[t - 1])  # this iteration's fresh slice of the prompts
        # 1. K responses per prompt from pi_{t-1}; a seed of its own per iteration (t < 1000), so no two
        # iterations or runs of other --seed draw the same samples for a prompt id (lm.row_seed)
        stage("generate", t, responses, model=models[-1], prompts=prompts, out=responses, seed=args.seed * 1000 + t)
        # 2. the judge's P(y_i > y_j | x) and the win rates P(y_i > pi_{t-1} | x)
        stage("rank", t, ranked, responses=responses, out=ranked,
              template_model=models[-1] if args.judge_prompt == "template" else None)
        # 3. pi_t: the square-loss fit of pi_{t-1} exp(eta P(y > pi_{t-1})), reference pi_{t-1}; the run's own
        # seed: it orders the examples (train.global_batch), and each iteration's examples are new ones
        stage("train", t, model / "train_info.json", model=models[-1], ranked=ranked, out=model, seed=args.seed,
              magnet=models[0] if args.loss_type == "magnet" else None)  # --loss_type magnet: pi_0 is the magnet
        models.append(str(model))
        report(args, world, stage, models, timings)
    if not args.dry_run:
        print(f"\nrun directory: {run_dir}; wall time of this invocation {time.time() - start:.1f} s; "
              f"stage times in {timings.name}")


# ---- what the loop needs: a world, checked inputs, and reports on every policy ----------------------


def check_settings(args):
    """What the flags alone decide, checked before a world is built or the run directory written (and by
    a sweep for each cell before the first runs): greedy sampling of K identical responses, the vLLM
    engine's limits (vllm_backend.check_engine_settings), --eval_best_of against the samples a built-in
    world's evaluation draws, a built world's files (records.check_built), and the judge's and the
    backend's packages."""
    from machinery.vllm_backend import check_engine_settings
    if args.temperature == 0:
        raise InputError(f"--temperature 0: greedy decoding gives each prompt {args.K} identical responses, which "
                         "every judge ties: SPPO would learn nothing; give a temperature > 0")
    if args.backend == "vllm":
        check_engine_settings(args.tensor_parallel_size, args.kv_cache_gib, temperature=args.temperature,
                              **({"eval_temperature": args.eval_temperature} if args.eval_prompts else {}))
    if args.model is None:  # a built-in world
        drawn = getattr(importlib.import_module(f"worlds.{args.preset}"), "EVAL_SAMPLES", 1)
        if not args.eval_prompts and args.eval_best_of not in (1, drawn):  # any other N would change nothing
            raise InputError(f"--eval_best_of {args.eval_best_of}: the {args.preset} world's evaluation draws "
                             f"{drawn} sample{'s' * (drawn > 1)} per held-out prompt and reports the best of those "
                             f"itself; give {'1 or ' * (drawn > 1)}{drawn}, or --eval_prompts to draw N of each of "
                             "those prompts")
        world_dir = Path(args.world_dir or default_world_dir(args.preset, args.seed))
        if (world_dir / BUILT).exists():
            check_built(world_dir)
    if not args.dry_run and (missing := missing_package(args)):  # the judge's package and the backend's
        raise InputError(missing)


def open_world(args):
    """With no --model, the preset's built-in world (worlds/<preset>.py), built once into its
    directory (a cache outside the run directory); its model, prompts and judge become the run's.
    Returns it (paths, its module, the seconds its build took), or None when the user brings a model."""
    if args.model is not None:
        return None
    module = importlib.import_module(f"worlds.{args.preset}")
    t0 = time.time()
    check_run_dir(args.run_dir)  # before the build: a bad --run_dir is not found after it
    if not args.world_dir:
        check_output(cache_root(), "SPPO_CACHE", directory=True)
    args.world_dir = Path(args.world_dir or default_world_dir(args.preset, args.seed)).resolve()
    check_output(args.world_dir, "--world_dir", directory=True)
    world = module.world_paths(args.world_dir) if args.dry_run else module.build_world(args.world_dir, seed=args.seed)
    args.model, args.prompts = str(world["model"]), str(world["train_prompts"])
    args.judge, args.judge_path = world["judge"], world["judge_path"] and str(world["judge_path"])
    return dict(world, module=module, build_seconds=time.time() - t0)


def check_inputs(args, config):
    """Everything checked before anything is written: the run directory (ours, not an input, its
    settings and inputs the same as before once a stage has finished), the judge, the model, every
    prompt of every iteration's slice and the schedule it trains with, the eval prompts. Returns
    (the slices, the eval prompts, the content stamps of the inputs); bad input raises InputError."""
    from machinery.judges import judge_factory
    from train import check_schedule
    run_dir = args.run_dir
    check_run_dir(run_dir)
    judge_factory(args.judge)  # a module:factory judge that does not import fails now, not after generate
    if args.judge_path and not Path(args.judge_path).exists() and looks_like_path(args.judge_path):
        raise InputError(f"--judge_path {args.judge_path}: not found")
    check_model_path(args.model)
    check_model_files(args.model)
    slices = prompt_slices(args)
    check_prompts_fit(args, slices)
    for records in slices:  # as train.py will count its steps: none may be all at lr 0
        check_schedule(args, len(records))
    eval_prompts = args.eval_prompts and load_prompts(args.eval_prompts, args.prompt_split, args.prompt_column)
    if eval_prompts:
        eval_prompts = eval_prompts[:args.eval_max]
        check_eval_prompts_fit(args, eval_prompts)
    for flag, path in [("--model", args.model), ("--eval_prompts", args.eval_prompts), ("--judge_path", args.judge_path),
                       ("--world_dir", args.world_dir)] + [("--prompts", p) for p in args.prompts.split(",")]:
        check_not_input(run_dir, {flag: path}, "--run_dir")
    stamps = {"--model": path_stamp(args.model), "--judge_path": content_stamp(args.judge_path or ""),
              "--prompts": [content_stamp(s) for s in args.prompts.split(",")],
              "--eval_prompts": content_stamp(args.eval_prompts or "")}
    check_same_settings(run_dir, config, stamps)
    return slices, eval_prompts, stamps


def check_run_dir(run_dir):
    """--run_dir is a directory we can write, and one iterate.py (or a sweep) made, or new or empty."""
    check_output(run_dir, "--run_dir", directory=True)
    check_work_dir(run_dir, "iterate.py or a sweep", "--run_dir")


@contextlib.contextmanager
def hold_run_dir(run_dir):
    """Make the run directory (marked as ours) and hold its lock for the block: a second iterate.py
    on it is refused, not run against the first."""
    make_work_dir(run_dir, "iterate.py")
    with exclusive_lock(run_dir / ".lock", f"{run_dir}: another iterate.py is running in this directory"):
        yield


def write_if_changed(path, records):
    """Write a copy of the input records the stages read, unless it already holds them."""
    try:
        same = path.exists() and read_records(path) == records
    except InputError:
        same = False
    if not same:
        write_records(path, records)


def report(args, world, stage, models, timings):
    """After iteration t = len(models) - 1: the outputs of pi_t on --eval_prompts in AlpacaEval's
    format, and a built-in world's held-out metrics of pi_0 .. pi_t (each policy scored once)."""
    t, run_dir = len(models) - 1, args.run_dir
    skip = frozenset() if args.eval_every_iteration else frozenset(range(1, args.iterations))
    if t in skip:  # --no-eval_every_iteration: pi_0 and the last policy only
        return
    if args.eval_prompts:
        out = run_dir / f"iter{t}" / "eval_responses.jsonl"
        stage("generate", t, out, step="export", model=models[-1], prompts=run_dir / "eval_prompts.jsonl", out=out,
              seed=args.seed, K=1, temperature=args.eval_temperature, top_p=args.eval_top_p,
              max_new_tokens=args.eval_max_new_tokens)
        if not args.dry_run:
            export_alpaca_eval(out, run_dir / f"iter{t}" / "model_outputs.json", f"{run_dir.name}-iter{t}")
    if args.eval_prompts and args.eval_best_of > 1:  # best-of-N: N samples, the judge's best of them
        n, it = args.eval_best_of, run_dir / f"iter{t}"
        samples, ranked = it / f"eval_best_of_{n}_responses.jsonl", it / f"eval_best_of_{n}_ranked.jsonl"
        stage("generate", t, samples, step="best_of_n", model=models[-1], prompts=run_dir / "eval_prompts.jsonl",
              out=samples, seed=args.seed, K=n, temperature=args.eval_temperature, top_p=args.eval_top_p,
              max_new_tokens=args.eval_max_new_tokens)
        stage("rank", t, ranked, step="best_of_n_rank", responses=samples, out=ranked,
              template_model=models[-1] if args.judge_prompt == "template" else None)
        if not args.dry_run:
            export_alpaca_eval(ranked, it / f"model_outputs_best_of_{n}.json", f"{run_dir.name}-iter{t}-best-of-{n}")
    if world is not None and not args.dry_run:
        from generate import sampler
        from machinery.vllm_backend import close_engine
        t0 = time.time()
        # pi_0's evaluation made once for every run of the world with this backend (shared_eval_dir), where a world offers it
        shared = getattr(world["module"], "shared_eval_dir", None)
        rows = world["module"].evaluate(models, world, run_dir, final=t == args.iterations,  # samples with --backend
                                        sample=sampler(args.backend, args.dtype, args.kv_cache_gib, args.enforce_eager,
                                                       args.gpu_memory_utilization), skip=skip,
                                        **({"shared": shared(world, args.backend, args.dtype)} if shared else {}))
        if not args.in_process:  # the stages start engines of their own: this one would take their cores and memory
            close_engine()
        print("\nevaluation on the held-out prompts:\n" + world["module"].format_table(rows), flush=True)
        write_json(run_dir / "eval.json", rows)
        if t == args.iterations:  # the plot once, at the end
            world["module"].plot(rows, run_dir / "eval.png")
        log_time(timings, t0, iteration=t, stage="evaluate")


def default_world_dir(preset, seed):
    """The cache directory of a built-in world: named by preset, seed and a hash of what builds it
    (the world's module, the shared modules it builds with, the torch, transformers and tokenizers
    versions), so runs and sweep cells of one world and seed share it, and a change to that code
    builds a new one."""
    code = b"".join((HERE / name).read_bytes() for name in (f"worlds/{preset}.py", *WORLD_CODE))
    versions = [importlib.metadata.version(package) for package in ("torch", "transformers", "tokenizers")]
    version = hashlib.sha256(code + repr(versions).encode()).hexdigest()[:12]
    return cache_root() / "worlds" / f"{preset}-seed{seed}-{version}"


def prompt_slices(args):
    """One list of prompt records per iteration: a source per iteration, or one source split.
    Every slice is checked now: an empty one is an error before any work."""
    sources = args.prompts.split(",")
    if len(sources) not in (1, args.iterations):
        raise InputError(f"--prompts: {len(sources)} sources for {args.iterations} iterations "
                         f"(give 1 or {args.iterations})")
    loaded = [load_prompts(s, args.prompt_split, args.prompt_column) for s in sources]
    if len(loaded) == 1:
        if len(loaded[0]) < args.iterations:  # before the split, which makes a list per iteration
            raise InputError(f"--iterations {args.iterations}: more iterations than the {len(loaded[0])} prompts of "
                             f"{sources[0]}; each iteration needs at least one prompt")
        loaded = split_prompts(loaded[0], args.iterations)
    if len(loaded) != args.iterations:
        raise InputError(f"--prompts: {len(loaded)} sources for {args.iterations} iterations (give 1 or {args.iterations})")
    slices = [part[:args.prompts_per_iteration or None] for part in loaded]  # --prompts_per_iteration (0: all)
    for t, records in enumerate(slices, 1):
        if not records:
            raise InputError(f"--prompts: iteration {t} of {args.iterations} gets no prompts "
                             f"({sum(map(len, loaded))} prompts in all)")
    return slices


def check_eval_prompts_fit(args, records):
    """The eval prompts fit the model's context with --eval_max_new_tokens, as generate.py will check."""
    context = model_context(args.model)
    if context and args.eval_max_new_tokens >= context:
        raise InputError(f"--eval_max_new_tokens {args.eval_max_new_tokens}: the model takes only {context} tokens in all")
    checked_prompt_ids(records, load_tokenizer(args.model), args.eval_prompts,
                       context and context - args.eval_max_new_tokens,
                       f"the model's context ({context}) minus --eval_max_new_tokens ({args.eval_max_new_tokens})",
                       args.prompt_format)


def check_prompts_fit(args, slices):
    """Every prompt of every slice, checked now as generate.py will check it: the chat template
    takes it and it fits the model's context with the new tokens (train.py's room for a response is
    the flags' own: --max_prompt_length below --max_length). A bad prompt of the last iteration does
    not wait for it."""
    tokenizer, context = load_tokenizer(args.model), model_context(args.model)
    sources = args.prompts.split(",")
    per_source = slices if len(sources) == len(slices) else [sum(slices, [])]  # each in its file's order
    for source, records in zip(sources, per_source):
        checked_prompt_ids(records, tokenizer, source, context and context - args.max_new_tokens,
                           f"the model's context ({context}) minus --max_new_tokens ({args.max_new_tokens})",
                           args.prompt_format)


# What a run directory holds before any stage or evaluation has run: the run's record and inputs, its
# timings, its marker and lock, a sweep's log of the cell. Anything else (a stage's output or shards,
# a world's cached samples of pi_0, eval.json) is work made with the run's settings.
BEFORE_WORK = ("config.json", "eval_prompts.jsonl", "timings.jsonl", ".lock", WORK_MARK, "sweep.log",
               "iter*/prompts.jsonl", ".*.tmp*", "*/.*.tmp*")  # (temporaries of a killed writer: never reused)


def holds_work(run_dir):
    """Whether the run directory holds anything a stage or an evaluation wrote."""
    return any(p.is_file() and not any(fnmatch.fnmatchcase(p.relative_to(run_dir).as_posix(), pattern)
                                       for pattern in BEFORE_WORK) for p in run_dir.rglob("*"))


def check_same_settings(run_dir, config, stamps):
    """A run directory that holds any work (holds_work: a stage's output, pi_0's evaluation) is
    resumed only with the settings that made it (flags.RESUME_FREE aside) and inputs of the same content
    (stamps: records.content_stamp): otherwise that work would be kept as if made with the new
    ones (pi_0's samples of one --backend beside pi_1's of another). One without takes the new
    settings."""
    config_path = run_dir / "config.json"
    if not config_path.exists() or not holds_work(run_dir):
        return
    try:
        record = json.loads(config_path.read_text())
        saved, saved_stamps = record["config"], record["inputs"]
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{config_path}: not the record of an iterate.py run ({type(e).__name__}: {e}); "
                         "give another --run_dir") from None
    for flag, stamp in stamps.items():
        if json.loads(json.dumps(stamp)) != saved_stamps.get(flag):
            raise InputError(f"{flag} {config[flag[2:]]}: its content changed since this run directory was made; "
                             f"give the old content, another --run_dir, or delete {run_dir}")
    diff = changed_settings(saved, config)
    if diff:
        details = "; ".join(f"--{k}: {saved.get(k)!r} in the run, {config.get(k)!r} now" for k in diff)
        raise InputError(f"{config_path}: this run directory was made with other settings ({details}). "
                         f"Give the same flags to resume it, another --run_dir, or delete {run_dir}")


def export_alpaca_eval(path, out_path, generator):
    """AlpacaEval's model_outputs.json: instruction, output, generator (and dataset) per prompt. The
    output is the one response of a responses file, or the best by win rate of a ranked file
    (best-of-N: the first of equals, as sppo_loss.best_and_worst picks)."""
    ranked = "win_rate" in json.loads(Path(path).read_text(encoding="utf-8").splitlines()[0])
    records = read_records(path, stage="ranked") if ranked else read_records(path, stage="responses", K=1)
    rows = [{"instruction": prompt_text(r["prompt"]),
             "output": r["responses"][max(range(len(r["responses"])), key=lambda k: (r["win_rate"][k], -k)) if ranked else 0],
             "generator": generator, **({"dataset": r["dataset"]} if "dataset" in r else {})} for r in records]
    atomic_write(out_path, lambda f: json.dump(rows, f, indent=1, ensure_ascii=False))


def split_prompts(records, parts):
    """Slice t of `parts` near-equal contiguous slices; every prompt lands in exactly one."""
    bounds = [round(i * len(records) / parts) for i in range(parts + 1)]
    return [records[bounds[i]:bounds[i + 1]] for i in range(parts)]


if __name__ == "__main__":
    one_line_errors(main)
