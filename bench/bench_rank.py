"""Ranking throughput: rank.py's PairRM judge against llm-blender's `rank(..., return_scores=True,
batch_size=1)` as the official SPPO code calls it; same tiny local ranker, same prompts, K=5.

    python bench/bench_rank.py                       # ~1-2 minutes on 2 cores
    python bench/bench_rank.py --prompts 64 --reps 12
    python bench/bench_rank.py --profile             # where rank.py's judge spends its time

The ranker is tests/tiny_models.build_tiny_pairrm: a random 2-layer DeBERTa-v2 (hidden 32) in
llm-blender's layout, loaded once by rank.PairRMJudge through llm-blender's own loader; both
sides call the same loaded ranker. A comparison = one ordered pair (y_i, y_j) forward: K(K-1)
per prompt. Texts are short (the tiny ranker's limits are 24 source / 16 candidate tokens).
Repetitions are interleaved A B C A B C ...; the table gives medians and ratios.
"""
import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402

import torch  # noqa: E402

import rank  # noqa: E402

sys.path.insert(0, str(_util.ROOT / "tests"))
import tiny_models  # noqa: E402

BENCH = "rank"


def tiny_ranker():
    out = _util.CACHE / "pairrm"
    if not (out / "ranker" / "config.json").exists():
        tiny_models.build_tiny_pairrm(out)
    return out / "ranker"


def make_records(n, K, seed=0):
    import toy
    rng = random.Random(seed)
    words = " ".join(tiny_models.CORPUS).split()
    prompts = [r["prompt"] for r in toy.make_prompts()[0]]
    return [{"id": i, "prompt": prompts[i % len(prompts)],
             "responses": [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(K)],
             "truncated": [False] * K} for i in range(n)]


class PairRMJudgeTokOnce(rank.PairRMJudge):
    """Proposed change to rank.PairRMJudge.pair_logits: tokenise each prompt's K responses once
    (one collator call with all K candidates; the same length budget, so the same ids) and build
    the K(K-1) ordered pairs by indexing, instead of tokenising 2K(K-1) candidate texts.
    sort_by_length: also order the pairs of a call by length before cutting forward batches."""

    sort_by_length = False

    @torch.no_grad()
    def pair_logits(self, prompts, responses):
        B, K = len(prompts), len(responses[0])
        pairs = torch.tensor([(i, j) for i in range(K) for j in range(K) if i != j])
        feats = []
        for x, ys in zip(prompts, responses):
            f = self.collator([{"source": x, "candidates": ys}])
            self._count_cut(ys, f)
            feats.append(f)
        pad = self.blender.ranker_tokenizer.pad_token_id
        n = len(pairs)
        source_ids = rank._pad_cat([f["source_ids"].expand(n, -1) for f in feats], pad)
        source_mask = rank._pad_cat([f["source_attention_mask"].expand(n, -1) for f in feats], 0)
        cand_ids = rank._pad_cat([f["candidate_ids"][0] for f in feats], pad).view(B, K, -1)
        cand_mask = rank._pad_cat([f["candidate_attention_mask"][0] for f in feats], 0).view(B, K, -1)
        left_ids, right_ids = cand_ids[:, pairs[:, 0]].flatten(0, 1), cand_ids[:, pairs[:, 1]].flatten(0, 1)
        left_mask, right_mask = cand_mask[:, pairs[:, 0]].flatten(0, 1), cand_mask[:, pairs[:, 1]].flatten(0, 1)
        tensors = (source_ids, source_mask, left_ids, left_mask, right_ids, right_mask)
        order = torch.arange(len(source_ids))
        if self.sort_by_length:  # similar lengths share a forward: less padding (_forward trims pad columns)
            order = (source_mask.sum(-1) + left_mask.sum(-1) + right_mask.sum(-1)).argsort(stable=True)
        logits = []
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            inputs = [t[idx].to(self.device) for t in tensors]
            logits.append(self.blender.ranker._forward(*inputs)["logits"].float().cpu())
        flat = torch.empty(len(order), dtype=torch.float64)
        flat[order] = torch.cat(logits).double()
        M = torch.zeros(B, K, K, dtype=torch.float64)
        M[:, pairs[:, 0], pairs[:, 1]] = flat.view(B, n)
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
    ap.add_argument("--big_batch", type=int, default=256, help="a larger judge batch for the proposed variant")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    _util.header("bench_rank: rank.py --judge pairrm vs llm-blender rank(..., batch_size=1)")
    import warnings
    warnings.filterwarnings("ignore")
    path = tiny_ranker()
    judge = rank.PairRMJudge(path, p_mode="scores", batch_size=args.judge_batch_size)
    judge_once = PairRMJudgeTokOnce(path, p_mode="scores", batch_size=args.judge_batch_size)
    judge_once.blender = judge.blender  # the very same ranker weights and tokenizer
    judge_once.collator = judge.collator
    judge_big = PairRMJudgeTokOnce.__new__(PairRMJudgeTokOnce)
    judge_big.__dict__.update(judge_once.__dict__, batch_size=args.big_batch)
    judge_sorted = PairRMJudgeTokOnce.__new__(PairRMJudgeTokOnce)
    judge_sorted.__dict__.update(judge_once.__dict__, sort_by_length=True)
    records = make_records(args.prompts, args.K)
    comparisons = args.chunk * args.K * (args.K - 1)  # per timed call

    # agreement: the official scores, ours, and the proposed variant
    off = torch.tensor(official(judge, records), dtype=torch.float64)
    mine = torch.tensor([r["scores"] for r in ours(judge, records)], dtype=torch.float64)
    once = torch.tensor([r["scores"] for r in ours(judge_once, records)], dtype=torch.float64)
    srt = torch.tensor([r["scores"] for r in ours(judge_sorted, records)], dtype=torch.float64)
    agree = (off - mine).abs().max().item()
    agree_once = max((mine - once).abs().max().item(), (mine - srt).abs().max().item())

    if args.profile:
        total, spent = profile(judge, records)
        total2, spent2 = profile(judge_once, records)
        rows = [[k, spent[k], spent[k] / total, spent2[k], spent2[k] / total2] for k in spent]
        print(f"rank.py judge on {args.prompts} prompts x K={args.K}: {total:.3f} s now, {total2:.3f} s tokenising once")
        print(_util.table(["part", "now s", "share", "tokenise once s", "share"], rows))
        _util.record(BENCH, "profile", prompts=args.prompts, K=args.K, total_s=total, spent=spent,
                     total_tok_once_s=total2, spent_tok_once=spent2)
        return

    chunks = [records[i:i + args.chunk] for i in range(0, len(records), args.chunk)]
    cur = {"i": -1}

    def chunk(advance=False):
        if advance:
            cur["i"] = (cur["i"] + 1) % len(chunks)
        return chunks[cur["i"]]
    fns = {
        "llm-blender rank(batch_size=1) [official]": lambda: official(judge, chunk(advance=True)),
        f"rank.py PairRMJudge (judge_batch_size {args.judge_batch_size})": lambda: ours(judge, chunk()),
        "proposed: tokenise K responses once": lambda: ours(judge_once, chunk()),
        f"proposed: tokenise once + judge_batch_size {args.big_batch}": lambda: ours(judge_big, chunk()),
        "proposed: tokenise once + sort pairs by length": lambda: ours(judge_sorted, chunk()),
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
                     max_abs_score_diff_vs_official=agree, max_abs_score_diff_tok_once=agree_once)
    print(f"{args.reps} rounds, each one chunk of {args.chunk} prompts x K={args.K} = {comparisons} comparisons; max |score diff| "
          f"ours vs official {agree:.2e}, proposed variants vs ours {agree_once:.2e}")
    print(_util.table(["implementation", "seconds per chunk (median)", "comparisons/s",
                       "speedup vs official (median of per-round ratios)", "ratio of medians"], rows))


if __name__ == "__main__":
    main()
