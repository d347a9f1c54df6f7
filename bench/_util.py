"""Shared bench code: machine facts, interleaved timing, tables, the results file, bench models.

Benchmarks are scripts, not tests. Every script prints a markdown table and appends one JSON
line per measurement to bench/results.jsonl with the machine, library versions and the exact
command, so a number in BENCHMARKS.md can be traced to the run that produced it.
"""
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# libgomp threads sleep instead of spinning while they wait. On this shared 2-core machine the
# default (spin) makes small-op workloads 10-50x slower whenever another process holds a core
# (toy generation: 29 s spinning vs 0.9 s passive, same run). Set before torch is imported; both
# sides of every comparison run under the same policy; OMP_WAIT_POLICY=ACTIVE overrides it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The one place bench scripts get their imports from: run as `python bench/x.py`, a script finds
# this file beside it (its own directory is sys.path[0]); the project root gives the stages, and
# tests/fixtures the tiny judges of tests/fixtures/tiny_models.py.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "fixtures")]
RESULTS = ROOT / "bench" / "results.jsonl"
CACHE = ROOT / "runs" / "bench"  # runs/ is git-ignored

import torch  # noqa: E402
import tqdm  # noqa: E402
import tqdm.auto  # noqa: E402,F401

# no progress bars in bench output (the stages' own tqdm bars go to stderr and hide the tables)
for _cls in {tqdm.tqdm, tqdm.auto.tqdm}:
    _cls.__init__ = __import__("functools").partialmethod(_cls.__init__, disable=True)


# ---- the machine -------------------------------------------------------------------------------


def cpu_facts() -> dict:
    """Cores, clock, vector ISA and the fp32 peak derived from them (no turbo: the nominal clock).

    peak = cores x FMA units per core x fp32 lanes per FMA x 2 flops per FMA x clock.
    AVX-512: 16 lanes; AVX2: 8 lanes. Zen 2/3/4 and Intel since Haswell have 2 FMA pipes per core.
    """
    text = Path("/proc/cpuinfo").read_text()
    flags = set(re.search(r"^flags\s*:\s*(.*)$", text, re.M).group(1).split())
    model = re.search(r"^model name\s*:\s*(.*)$", text, re.M).group(1).strip()
    mhz = float(re.search(r"^cpu MHz\s*:\s*([\d.]+)$", text, re.M).group(1))
    cores = os.cpu_count()
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    fma_units = 2 if "fma" in flags else 1
    peak = cores * fma_units * lanes * 2 * mhz * 1e6
    return {"cpu": model, "cores": cores, "mhz": mhz, "isa": "avx512" if lanes == 16 else "avx2" if lanes == 8 else "sse",
            "fma_units": fma_units, "fp32_lanes": lanes, "peak_fp32_flops": peak,
            "peak_formula": f"{cores} cores x {fma_units} FMA x {lanes} lanes x 2 x {mhz / 1e3:.3f} GHz = {peak / 1e9:.1f} GFLOP/s"}


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "trl", "accelerate", "tokenizers", "llm_blender"):
        mod = sys.modules.get(name)
        if mod is not None:
            out[name] = getattr(mod, "__version__", "0.0.2" if name == "llm_blender" else "?")
    return out


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "*.py"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except OSError:
        return "?"


def command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])


def load_avg() -> float:
    return os.getloadavg()[0]


def record(bench: str, name: str, **metrics):
    """Append one measurement to bench/results.jsonl."""
    line = {"bench": bench, "name": name, **metrics, "command": command(), "commit": git_commit(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S %z"), "load_avg_1min": load_avg(),
            "torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "machine": cpu_facts(), "versions": versions(),
            "host": platform.node()}
    with open(RESULTS, "a") as f:
        f.write(json.dumps(line, default=float) + "\n")


# ---- timing ------------------------------------------------------------------------------------


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def interleave(fns: dict, reps: int, warmup: int = 1) -> dict:
    """Run fns A B C A B C ... `reps` times after `warmup` rounds; -> {name: [seconds, ...]}.

    Interleaving puts A and B under the same background load (this machine is shared), so their
    ratio is meaningful even when absolute times drift.
    """
    times = {k: [] for k in fns}
    for r in range(warmup + reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[k].append(dt)
    return times


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def table(headers, rows) -> str:
    def fmt(x):
        if isinstance(x, float):
            return f"{x:.4g}" if abs(x) < 1e5 else f"{x:.3e}"
        return str(x)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def header(title: str):
    c = cpu_facts()
    print(f"## {title}\n`{command()}`  commit {git_commit()}  torch {torch.__version__} threads {torch.get_num_threads()} "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}  "
          f"{c['cpu']} {c['cores']} cores {c['isa']}  load {load_avg():.2f}\n", flush=True)


# ---- bench models ------------------------------------------------------------------------------


def toy_world(seed=0, sft_steps=10):
    """The toy world (tiny Llama, 369k params, its tokenizer with chat template, prompts), cached.

    sft_steps is small on purpose: speed does not depend on what the model learned.
    """
    from worlds import toy
    return toy.build_world(CACHE / f"world-s{seed}-sft{sft_steps}", seed=seed, sft_steps=sft_steps)


def model_20m(tokenizer_dir):
    """A random ~20.6M-parameter Llama (hidden 256, 4 layers, MLP 1024, vocab 32000, untied head)
    saved with the toy tokenizer (its ids are < 320, so every token is in range). Cached."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    out = CACHE / "llama20m"
    if (out / "model.safetensors").exists():
        return out
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def param_counts(model) -> dict:
    """Total parameters, and the ones that cost FLOPs per token (all but the input embedding
    table, whose lookup is free; a tied output head is counted once, as the head); the head's."""
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    matmul = total - emb.numel() + (head.numel() if head is emb else 0)
    return {"params": total, "matmul_params": matmul, "head_params": head.numel(), "head_tied": head is emb}


WORDS = ("apple pear plum fig lime red blue green grey brown cat dog fox owl eel tea milk juice soda water "
         "saw drill hammer file rope jazz rock folk pop polka picnic party wedding trip dinner festival garden "
         "beach concert school office market camp museum the a is and of to with for on good better best").split()


def random_text(rng, n_words):
    return " ".join(rng.choice(WORDS) for _ in range(n_words))
