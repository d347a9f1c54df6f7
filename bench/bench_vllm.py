"""HF's generate against the vLLM engine on this CPU, side by side in one run: which backend a run
of the instruct (or sentiment) world should sample with. Not a test; run it in .venv-vllm.

    .venv-vllm/bin/python bench/bench_vllm.py                       # the instruct world, ~20 min on 2 cores
    .venv-vllm/bin/python bench/bench_vllm.py --world sentiment --prompts 48 --K 4 --max_new_tokens 20

Both backends sample through generate.sampler, as iterate.py's stages and evaluations do: HF loads
the model for each call (as the generate stage does); vLLM keeps one engine and reloads the weights
for each call (as a run does for each new policy). The work is the world's held-out prompts, K
samples each, at two decodings: the preset's (T 0.7, top_p 0.9 for the instruct world) and plain
T=1. The two backends alternate, call by call (bench/_util.interleave), so they see the same
background load. Also timed: the engine's start (once per run) and a weight reload (once per policy).
New tokens: the response tokens of every sample, the end of turn included when it ended by itself.
"""
import argparse
import json
import time
from pathlib import Path

import _util  # sets HF_HUB_OFFLINE, sys.path: before torch and the stages

BENCH = "vllm"
# vLLM's generate divides by its progress bar's elapsed time: the bars _util turns off are back on here
for _cls in {_util.tqdm.tqdm, _util.tqdm.auto.tqdm}:
    if "__init__" in vars(_cls) and hasattr(vars(_cls)["__init__"], "func"):
        _cls.__init__ = vars(_cls)["__init__"].func


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", default="instruct", choices=["instruct", "sentiment"])
    ap.add_argument("--prompts", type=int, default=24, help="held-out prompts per call")
    ap.add_argument("--K", type=int, default=4, help="samples per prompt")
    ap.add_argument("--max_new_tokens", type=int, default=96)
    ap.add_argument("--reps", type=int, default=1)
    args = ap.parse_args()

    import importlib

    from generate import sampler
    from machinery.lm import load_tokenizer, response_token_ids
    from machinery.vllm_backend import close_engine, engine_kwargs, prepare_vllm_process, start_engine
    world_module = importlib.import_module(f"worlds.{args.world}")
    world = world_module.build_world(_util.CACHE / f"{args.world}-world", seed=0)
    model = str(world["model"])
    records = [json.loads(line) for line in Path(world["eval_prompts"]).read_text().splitlines()][:args.prompts]
    tok = load_tokenizer(model)
    _util.header(f"HF vs vLLM sampling, the {args.world} world: {len(records)} prompts x K={args.K}, "
                 f"{args.max_new_tokens} new tokens")

    prepare_vllm_process(0, 1, 1)
    t0 = time.perf_counter()
    start_engine(**engine_kwargs(model, 1024, enforce_eager=True))
    start_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    start_engine(**engine_kwargs(model, 1024, enforce_eager=True))  # the same model again: a reload
    reload_seconds = time.perf_counter() - t0

    decodings = {"T 0.7, top_p 0.9": dict(temperature=0.7, top_p=0.9), "T 1": dict(temperature=1.0)}
    backends = {"hf": sampler("hf"), "vllm": sampler("vllm", enforce_eager=True)}
    tokens = {}

    def call(backend, decoding):
        def run():
            out = backends[backend](model, records, args.K, max_new_tokens=args.max_new_tokens, seed=1, batch_size=16,
                                    **decodings[decoding])
            tokens[backend, decoding] = sum(len(response_token_ids(tok, y, t)) for r in out
                                            for y, t in zip(r["responses"], r["truncated"]))
        return run

    fns = {(b, d): call(b, d) for d in decodings for b in backends}
    times = _util.interleave(fns, reps=args.reps, warmup=0)
    close_engine()
    rows = []
    for (b, d), ts in times.items():
        sec = _util.median(ts)
        rows.append([b, d, min(ts), sec, tokens[b, d], tokens[b, d] / sec])
        _util.record(BENCH, f"{args.world}:{b}:{d}", seconds=sec, seconds_min=min(ts), new_tokens=tokens[b, d],
                     tokens_per_s=tokens[b, d] / sec, prompts=len(records), K=args.K, max_new_tokens=args.max_new_tokens)
    print(_util.table(["backend", "decoding", "s (min)", "s (median)", "new tokens", "new tok/s"], rows))
    for d in decodings:
        print(f"\n{d}: vLLM / HF time {_util.median(times['vllm', d]) / _util.median(times['hf', d]):.2f}")
    print(f"\nvLLM engine start (enforce_eager, once per run) {start_seconds:.1f} s; weight reload "
          f"(once per policy) {reload_seconds:.1f} s")
    _util.record(BENCH, f"{args.world}:engine", start_seconds=start_seconds, reload_seconds=reload_seconds)


if __name__ == "__main__":
    main()
