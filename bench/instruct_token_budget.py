"""What the instruct preset's token budget costs: the evaluation's sampling of pi_0 (SmolLM2-135M-
Instruct, held-out prompts, T 0.7 / top_p 0.9, the evaluation's seed and batch size) at several
max_new_tokens, with the time, the fraction of answers cut at the budget and IFEval's
instruction-level strict accuracy on the same samples.

    python bench/instruct_token_budget.py                     # 16 held-out prompts x 1 sample, 96 / 160 / 256
    python bench/instruct_token_budget.py --prompts 48 --budgets 96,192

The same prompts and seed for every budget: a longer budget continues the same answers (the
sampler's draws per position do not depend on max_new_tokens), so the rows differ only by where
answers are cut.
"""
import argparse
import time

import _util  # sets HF_HUB_OFFLINE, sys.path: before torch and the stages

import numpy as np  # noqa: E402

from generate import sampler  # noqa: E402
from worlds import instruct  # noqa: E402

BENCH = "instruct_token_budget"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16, help="held-out prompts (the first N)")
    ap.add_argument("--budgets", default="96,160,256", help="max_new_tokens values, comma-separated")
    args = ap.parse_args()
    _util.header("instruct world: evaluation sampling of pi_0 per token budget")
    world = instruct.build_world(_util.CACHE / "instruct-world", seed=0)
    import json
    prompts = [json.loads(line) for line in open(world["eval_prompts"])][:args.prompts]
    sample, rows = sampler(), []
    for budget in map(int, args.budgets.split(",")):
        t0 = time.perf_counter()
        records = sample(str(world["model"]), prompts, 1, temperature=instruct.EVAL_TEMPERATURE,
                         top_p=instruct.EVAL_TOP_P, max_new_tokens=budget, seed=instruct.EVAL_SEED, batch_size=16,
                         desc=f"budget {budget}")
        seconds = time.perf_counter() - t0
        checks = instruct.check_records(records)
        acc = instruct.accuracies(records, checks)
        cut = float(np.mean([r["truncated"][0] for r in records]))
        rows.append([budget, f"{seconds:.1f}", f"{seconds / len(prompts):.2f}", f"{cut:.2f}",
                     f"{acc['inst_strict_all']:.3f}", f"{acc['prompt_strict_all']:.3f}"])
        _util.record(BENCH, f"max_new_tokens={budget}", prompts=len(prompts), seconds=seconds, truncated=cut,
                     inst_strict_all=acc["inst_strict_all"], prompt_strict_all=acc["prompt_strict_all"])
    print(_util.table(["max_new_tokens", "seconds", "s / prompt", "cut", "inst-S all", "prm-S all"], rows))


if __name__ == "__main__":
    main()
