"""Cheaper SFT recipes for the toy world's base policy: how well each fits BASE_POLICY. Not a test.

    python bench/toy_sft_recipes.py [--recipes 200x16@3e-3:0.7,150x64@3e-3:1 ...]

A recipe is STEPSxPROMPTS@LR[:DECAY_FROM] (the lr falls linearly to 0 from step DECAY_FROM x
STEPS on; 1 = constant, the default); each starts from the world's seed-0 init and prompt order
(toy.sft_base_model); the first is the world's own (its loss is world.json's), the second the
world's earlier recipe (64 prompts per step at a constant lr).
Columns: seconds; gap = final training loss minus the entropy of BASE_POLICY (0 = a perfect
fit); the largest and mean |pi_0(a | x) - BASE_POLICY(a)| over the held-out prompts; their
invalid mass (1 - the five answers' probability). Prints a table; appends to bench/results.jsonl.
"""
import argparse
import tempfile
import time

import _util  # sets sys.path and the thread policy: before torch and the stages

RECIPES = "200x16@3e-3:0.7,150x64@3e-3,150x32@3e-3,150x32@3e-3:0.7,180x16@3e-3:0.7,200x24@3e-3:0.7,150x32@4e-3:0.6,75x64@6e-3"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default=RECIPES)
    args = ap.parse_args()
    import torch

    from worlds import toy
    train, held_out, tokenizer = toy.prompts_and_tokenizer(0, tempfile.mkdtemp())
    base = torch.tensor(toy.BASE_POLICY)
    entropy = -(base * base.log()).sum().item()
    rows = []
    for recipe in args.recipes.split(","):
        shape, _, rest = recipe.partition("@")
        lr, _, decay_from = rest.partition(":")
        steps, prompts = map(int, shape.split("x"))
        model = toy.untrained_model(tokenizer, 0)
        t0 = time.time()
        loss = toy.sft_base_model(model, tokenizer, train, steps=steps, batch_prompts=prompts, lr=float(lr),
                                  decay_from=float(decay_from or 1.0))
        seconds = time.time() - t0
        with torch.no_grad():
            pi0 = toy.answer_logps(model, tokenizer, [r["prompt"] for r in held_out],
                                   [toy.FAMILIES[r["family"]][0] for r in held_out]).exp()
        dev = (pi0 - base).abs()
        row = dict(recipe=recipe, seconds=round(seconds, 1), gap=round(loss - entropy, 4), max_dev=round(dev.max().item(), 3),
                   mean_dev=round(dev.mean().item(), 4), invalid=round(1 - pi0.sum(1).mean().item(), 4))
        rows.append(row)
        _util.record("toy_sft_recipes", recipe, **row)
        print(row, flush=True)
    print(_util.table(list(rows[0]), [list(r.values()) for r in rows]))


if __name__ == "__main__":
    main()
