"""Ranking throughput: rank.py's PairRM judge against llm-blender's `rank(..., return_scores=True,
batch_size=1)` as the official SPPO code calls it; same tiny local ranker, same prompts, K=5.

    python bench/bench_rank.py                       # ~1-2 minutes on 2 cores
    python bench/bench_rank.py --prompts 64 --reps 12
    python bench/bench_rank.py --profile             # where rank.py's judge spends its time

The ranker is tests/tiny_models.build_tiny_pairrm: a random 2-layer DeBERTa-v2 (hidden 32) in
llm-blender's layout, loaded once by judges.PairRMJudge through llm-blender's own loader; both
sides call the same loaded ranker. A comparison = one ordered pair (y_i, y_j) forward: K(K-1)
per prompt. Texts are short (the tiny ranker's limits are 24 source / 16 candidate tokens).
Repetitions are interleaved A B C A B C ...; the table gives medians and ratios.
"""
import argparse
import random
import time

import _util  # sets HF_HUB_OFFLINE, sys.path: before torch and the stages

import torch  # noqa: E402

from machinery import judges  # noqa: E402
import rank  # noqa: E402

import tiny_models  # noqa: E402

BENCH = "rank"


def tiny_ranker():
    out = _util.CACHE / "pairrm"
    if not (out / "ranker" / "config.json").exists():
        tiny_models.build_tiny_pairrm(out)
    return out / "ranker"


def make_records(n, K, seed=0):
    from worlds import toy
    rng = random.Random(seed)
    words = " ".join(tiny_models.CORPUS).split()
    prompts = [r["prompt"] for r in toy.make_prompts()[0]]
    return [{"id": i, "prompt": prompts[i % len(prompts)],
             "responses": [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(K)],
             "truncated": [False] * K} for i in range(n)]


class PairRMJudgeBefore(judges.PairRMJudge):
    """judges.PairRMJudge.pair_logits as it was before optimisation P3 (commit 44a852b), kept for the
    before/after row: PairRM's collator on K(K-1) two-candidate items per prompt, so every
    response is tokenised 2(K-1) times; forward batches in pair order, not sorted by length."""

    @torch.no_grad()
    def pair_logits(self, prompts, responses):
        B, K = len(prompts), len(responses[0])
        pairs = [(i, j) for i in range(K) for j in range(K) if i != j]
        per_prompt = []
        for x, ys in zip(prompts, responses):
            features = self.collator([{"source": x, "candidates": [ys[i], ys[j]]} for i, j in pairs])
            self._count_cut(ys, features)
            per_prompt.append(features)
        pad = self.blender.ranker_tokenizer.pad_token_id
        source_ids = judges._pad_cat([f["source_ids"] for f in per_prompt], pad)
        source_mask = judges._pad_cat([f["source_attention_mask"] for f in per_prompt], 0)
        cand_ids = judges._pad_cat([f["candidate_ids"] for f in per_prompt], pad)
        cand_mask = judges._pad_cat([f["candidate_attention_mask"] for f in per_prompt], 0)
        logits = []
        for s in range(0, len(source_ids), self.batch_size):
            inputs = [t[s:s + self.batch_size].to(self.device) for t in (
                source_ids, source_mask, cand_ids[:, 0], cand_mask[:, 0], cand_ids[:, 1], cand_mask[:, 1])]
            logits.append(self.blender.ranker._forward(*inputs)["logits"].float().cpu())
        M = torch.zeros(B, K, K, dtype=torch.float64)
        idx_i, idx_j = torch.tensor(pairs).T
        M[:, idx_i, idx_j] = torch.cat(logits).double().view(B, len(pairs))
        return M


def official(judge, records):
    """The official pipeline's call: llm-blender rank, return_scores=True, batch_size=1."""
    return judge.blender.rank([r["prompt"] for r in records], [r["responses"] for r in records],
                              return_scores=True, batch_size=1, disable_tqdm=True)


def ours(judge, records, prompts_per_call=16):
    return rank.rank_records(records, judge, batch_size=prompts_per_call, desc="rank")


def profile(judge, records):
    """Seconds in: the collator (tokenisation), _count_cut (re-tokenisation), ranker forwards."""
    spent = {"collator": 0.0, "count_cut": 0.0, "forward": 0.0}

    class TimedCollator:  # keeps the collator's attributes (_count_cut reads them)
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, *a, **k):
            t0 = time.perf_counter()
            try:
                return self.inner(*a, **k)
            finally:
                spent["collator"] += time.perf_counter() - t0

    def timed(fn, key):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t0
        return wrapper
    collator, count_cut, forward = judge.collator, judge._count_cut, judge.blender.ranker._forward
    judge.collator, judge._count_cut = TimedCollator(collator), timed(count_cut, "count_cut")
    judge.blender.ranker._forward = timed(forward, "forward")
    t0 = time.perf_counter()
    try:
        ours(judge, records)
    finally:
        judge.collator, judge._count_cut = collator, count_cut
        del judge.blender.ranker._forward
    total = time.perf_counter() - t0
    spent["other"] = total - sum(spent.values())
    return total, spent


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--K", type=int, default=5)
    ap.add_argument("--reps", type=int, default=12, help="interleaved rounds; each ranks one chunk of prompts")
    ap.add_argument("--chunk", type=int, default=16, help="prompts per timed call (rounds cycle over the prompts)")
    ap.add_argument("--judge_batch_size", type=int, default=32, help="rank.py's --judge_batch_size (pairs per forward)")
    ap.add_argument("--big_batch", type=int, default=256, help="a larger judge batch, for comparison")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    _util.header("bench_rank: rank.py --judge pairrm vs llm-blender rank(..., batch_size=1)")
    import warnings
    warnings.filterwarnings("ignore")
    path = tiny_ranker()
    judge = judges.PairRMJudge(path, p_mode="scores", batch_size=args.judge_batch_size)
    judge_before = PairRMJudgeBefore.__new__(PairRMJudgeBefore)  # the very same ranker weights and tokenizer
    judge_before.__dict__.update(judge.__dict__)
    judge_big = judges.PairRMJudge.__new__(judges.PairRMJudge)
    judge_big.__dict__.update(judge.__dict__, batch_size=args.big_batch)
    records = make_records(args.prompts, args.K)
    comparisons = args.chunk * args.K * (args.K - 1)  # per timed call

    # agreement: the official scores, ours now, ours before P3
    off = torch.tensor(official(judge, records), dtype=torch.float64)
    mine = torch.tensor([r["scores"] for r in ours(judge, records)], dtype=torch.float64)
    before = torch.tensor([r["scores"] for r in ours(judge_before, records)], dtype=torch.float64)
    agree = (off - mine).abs().max().item()
    agree_before = (mine - before).abs().max().item()

    if args.profile:
        total, spent = profile(judge, records)
        total2, spent2 = profile(judge_before, records)
        rows = [[k, spent[k], spent[k] / total, spent2[k], spent2[k] / total2] for k in spent]
        print(f"rank.py judge on {args.prompts} prompts x K={args.K}: {total:.3f} s now, {total2:.3f} s before P3")
        print(_util.table(["part", "now s", "share", "before P3 s", "share"], rows))
        _util.record(BENCH, "profile", prompts=args.prompts, K=args.K, total_s=total, spent=spent,
                     total_before_p3_s=total2, spent_before_p3=spent2)
        return

    chunks = [records[i:i + args.chunk] for i in range(0, len(records), args.chunk)]
    cur = {"i": -1}

    def chunk(advance=False):
        if advance:
            cur["i"] = (cur["i"] + 1) % len(chunks)
        return chunks[cur["i"]]
    fns = {
        "llm-blender rank(batch_size=1) [official]": lambda: official(judge, chunk(advance=True)),
        f"rank.py PairRMJudge (judge_batch_size {args.judge_batch_size}) [now]": lambda: ours(judge, chunk()),
        f"rank.py PairRMJudge (judge_batch_size {args.big_batch})": lambda: ours(judge_big, chunk()),
        "rank.py before P3 (per-pair tokenisation, judge_batch_size 32)": lambda: ours(judge_before, chunk()),
        "llm-blender rank(batch_size=16)": lambda: judge.blender.rank(
            [r["prompt"] for r in chunk()], [r["responses"] for r in chunk()], return_scores=True, batch_size=16,
            disable_tqdm=True),
    }
    times = _util.interleave(fns, reps=args.reps, warmup=1)
    base = _util.median(times["llm-blender rank(batch_size=1) [official]"])
    base_list = times["llm-blender rank(batch_size=1) [official]"]
    rows = []
    for name, ts in times.items():
        t = _util.median(ts)
        per_rep = _util.median([b / x for b, x in zip(base_list, ts)])
        rows.append([name, t, comparisons / t, per_rep, base / t])
        _util.record(BENCH, name, prompts=args.prompts, K=args.K, comparisons=comparisons, seconds=t, times=ts,
                     comparisons_per_s=comparisons / t, speedup_vs_official=base / t, speedup_per_rep_median=per_rep,
                     max_abs_score_diff_vs_official=agree, max_abs_score_diff_before_p3=agree_before)
    print(f"{args.reps} rounds, each one chunk of {args.chunk} prompts x K={args.K} = {comparisons} comparisons; max |score diff| "
          f"ours vs official {agree:.2e}, ours before P3 vs now {agree_before:.2e}")
    print(_util.table(["implementation", "seconds per chunk (median)", "comparisons/s",
                       "speedup vs official (median of per-round ratios)", "ratio of medians"], rows))


if __name__ == "__main__":
    main()
