"""Generation throughput of generate.py's HF backend: new tokens per second for several batch
sizes, and the same prompts one sample at a time.

    python bench/bench_generate.py                   # toy and 20M models, ~3 minutes on 2 cores
    python bench/bench_generate.py --models toy --prompts toy:32 --reps 5
    python bench/bench_generate.py --profile         # where generate_responses spends its time
    python bench/bench_generate.py --experiments     # before/after: Gumbel vs inverse-CDF sampler

Each variant calls generate.generate_responses (the real stage function) on the same prompts
with K=5, T=1, top_p=1, top_k=0 (the toy preset's sampling): `batch_size` prompts per generate
call, i.e. 5 x batch_size rows. "one at a time" generates each of the K samples of each prompt
by itself (K=1, one row per call, the sample index in the seed), the way a loop without batching
would. New tokens are counted from the ids `model.generate` returns: per row, up to and
including the first stop token (or max_new_tokens): the tokens that become responses. Rows that
finished early still occupy their slot until the whole batch stops ("slots" below); the gap
between the two is the padding waste of static batching. Variants are interleaved per round.
"""
import argparse
import time

import _util  # sets HF_HUB_OFFLINE, sys.path: before torch and the stages

import torch  # noqa: E402

import generate  # noqa: E402
from machinery.lm import load_model, load_tokenizer, stop_token_ids  # noqa: E402

BENCH = "generate"


class Counter:
    """Wraps model.generate to count the new tokens of every row (to the first stop, inclusive)."""

    def __init__(self, model, stops):
        self.model, self.stops, self.inner = model, stops, model.generate
        self.useful = self.slots = self.calls = 0
        model.generate = self

    def __call__(self, *a, **k):
        out = self.inner(*a, **k)
        width = k["input_ids"].shape[1]
        new = out[:, width:].tolist()
        self.calls += 1
        self.slots += len(new) * len(new[0])
        for row in new:
            end = next((n for n, t in enumerate(row) if t in self.stops), None)
            self.useful += len(row) if end is None else end + 1
        return out

    def reset(self):
        out = (self.useful, self.slots, self.calls)
        self.useful = self.slots = self.calls = 0
        return out


class InverseCDFSampler(generate.GumbelSampler):
    """Proposed: the same exact sample from softmax(filtered logits / T), drawn by inverse CDF with
    ONE uniform per row from the row's own generator (the Gumbel trick draws a uniform for every
    vocabulary entry of every row, plus two logs). Still deterministic per (seed, prompt id, k)
    and independent of batching; the samples differ from the Gumbel sampler's (another
    transform of the same seeds). Returns scores whose argmax is the sample (greedy decoding)."""

    def __call__(self, input_ids, scores):
        logits = generate.filter_logits(scores.float() / self.temperature, self.top_k, self.top_p)
        cdf = logits.softmax(-1).cumsum(-1)
        u = torch.cat([torch.rand(1, generator=g) for g in self.generators]).to(cdf.device)
        pick = torch.searchsorted(cdf, (u.clamp(min=1e-7) * cdf[:, -1]).unsqueeze(-1)).clamp(max=cdf.shape[-1] - 1)
        return torch.full_like(logits, float("-inf")).scatter(-1, pick, 0.0)


def one_at_a_time(model, tok, records, K, max_new_tokens, seed):
    out = []
    for r in records:
        for k in range(K):
            out += generate.generate_responses(model, tok, [r], 1, 1.0, 1.0, 0, max_new_tokens, seed * 1000 + k, 1)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="toy,20m")
    ap.add_argument("--prompts", default="toy:16,20m:8", help="prompts per model")
    ap.add_argument("--K", type=int, default=5)
    ap.add_argument("--max_new_tokens", type=int, default=32)
    ap.add_argument("--batch_sizes", default="1,4,16", help="prompts per generate call (x K rows)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--experiments", action="store_true", help="before/after: Gumbel vs inverse-CDF sampler")
    args = ap.parse_args()
    _util.header("bench_generate: generate.py (HF backend) new tokens per second")
    world = _util.toy_world()
    dirs = {"toy": world["model"], "20m": _util.model_20m(world["model"])}
    import json
    all_prompts = [json.loads(line) for line in open(world["train_prompts"])]
    n_prompts = dict((k, int(v)) for k, v in (x.split(":") for x in args.prompts.split(",")))
    rows, exp_rows = [], []
    for name in args.models.split(","):
        prompts = all_prompts[:n_prompts[name]]
        tok = load_tokenizer(dirs[name])
        model = load_model(dirs[name]).eval()
        counter = Counter(model, stop_token_ids(model.generation_config.eos_token_id, tok))
        gen = dict(K=args.K, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=args.max_new_tokens, seed=0)
        if args.profile:
            spent = {"sampler": 0.0}
            call = generate.GumbelSampler.__call__

            def timed(self, *a, **k):
                t0 = time.perf_counter()
                try:
                    return call(self, *a, **k)
                finally:
                    spent["sampler"] += time.perf_counter() - t0
            generate.GumbelSampler.__call__ = timed
            from torch.profiler import ProfilerActivity, profile
            bs = max(int(b) for b in args.batch_sizes.split(","))
            generate.generate_responses(model, tok, prompts[:bs], batch_size=bs, **gen)
            spent["sampler"] = 0.0
            counter.reset()
            t0 = time.perf_counter()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                generate.generate_responses(model, tok, prompts, batch_size=bs, **gen)
            total = time.perf_counter() - t0
            generate.GumbelSampler.__call__ = call
            useful, slots, calls = counter.reset()
            print(f"### {name}: batch_size {bs}, {len(prompts)} prompts x K={args.K}: {total:.2f} s (under the profiler), "
                  f"GumbelSampler {spent['sampler']:.2f} s = {spent['sampler'] / total:.0%}; new tokens {useful}, slots {slots}")
            print("```\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12) + "\n```")
            _util.record(BENCH, "profile", model=name, batch_size=bs, seconds=total, sampler_s=spent["sampler"],
                         new_tokens=useful, slots=slots)
            continue
        if args.experiments:
            bs = max(int(b) for b in args.batch_sizes.split(","))
            gumbel = generate.GumbelSampler

            def with_sampler(cls):
                def run():
                    generate.GumbelSampler = cls
                    try:
                        generate.generate_responses(model, tok, prompts, batch_size=bs, **gen)
                    finally:
                        generate.GumbelSampler = gumbel
                    counts.setdefault(cls.__name__, []).append(counter.reset())
                return run
            counts = {}
            times = _util.interleave({"GumbelSampler (now)": with_sampler(gumbel),
                                      "InverseCDFSampler (proposed)": with_sampler(InverseCDFSampler)},
                                     reps=args.reps, warmup=1)
            before = times["GumbelSampler (now)"]
            for key, ts in times.items():
                t = _util.median(ts)
                sp = _util.median([b / x for b, x in zip(before, ts)])
                exp_rows.append([name, bs, key, counts[key.split()[0]][-1][0], t, counts[key.split()[0]][-1][0] / t, sp])
                _util.record(BENCH, f"experiment_{key.split()[0]}", model=name, batch_size=bs, seconds=t, times=ts,
                             speedup_vs_now=sp, new_tokens=counts[key.split()[0]][-1][0])
            continue
        variants = {f"batch_size {b}": (lambda b=int(b): generate.generate_responses(model, tok, prompts, batch_size=b, **gen))
                    for b in args.batch_sizes.split(",")}
        variants["one at a time"] = lambda: one_at_a_time(model, tok, prompts, args.K, args.max_new_tokens, 0)
        counts = {}

        def counted(key, fn):
            def run():
                fn()
                counts.setdefault(key, []).append(counter.reset())
            return run
        times = _util.interleave({k: counted(k, fn) for k, fn in variants.items()}, reps=args.reps, warmup=1)
        base = times["one at a time"]
        for key, ts in times.items():
            useful, slots, calls = counts[key][-1]
            t = _util.median(ts)
            speed = _util.median([(useful / x) for x in ts])
            ratio = _util.median([b / x for b, x in zip(base, ts)])
            rows.append([name, key, args.K, calls, useful, slots, t, speed, ratio])
            _util.record(BENCH, key, model=name, prompts=len(prompts), K=args.K, max_new_tokens=args.max_new_tokens,
                         generate_calls=calls, new_tokens=useful, slots=slots, seconds=t, times=ts,
                         new_tokens_per_s=speed, speedup_vs_one_at_a_time=ratio)
    if exp_rows:
        print(f"prompts {args.prompts}, K={args.K}, max_new_tokens={args.max_new_tokens}; {args.reps} interleaved rounds")
        print(_util.table(["model", "batch_size", "sampler", "new tokens", "seconds", "new tokens/s", "speedup vs now"],
                          exp_rows))
    if rows:
        print(f"prompts {args.prompts}, K={args.K}, max_new_tokens={args.max_new_tokens}, sampling T=1 top_p=1 top_k=0; "
              f"{args.reps} interleaved rounds, medians")
        print(_util.table(["model", "variant", "K", "generate calls", "new tokens", "slots (rows x steps)", "seconds",
                           "new tokens/s", "speedup vs one at a time"], rows))


if __name__ == "__main__":
    main()
