"""Stage 2 of an SPPO iteration: a judge turns each prompt's K responses into P and win rates.

    python rank.py --responses responses.jsonl --out ranked.jsonl --judge toy:ToyJudge --judge_path world.json
    python rank.py --responses responses.jsonl --out ranked.jsonl --judge pairrm [--judge_path DIR] [--p_mode scores]
    python rank.py --responses responses.jsonl --out ranked.jsonl --judge reward --judge_path REWARD_MODEL_DIR
    torchrun --standalone --nproc_per_node=8 rank.py ...same flags...   # one shard per GPU

Under torchrun each rank judges a contiguous slice of the prompts on its own device and rank 0
merges the shard files in prompt order (launch.run_sharded); a re-run redoes only unfinished shards.

For every prompt x with responses y_1..y_K the judge gives the K x K matrix
P[i, j] = P(y_i > y_j | x); the win rate of y_i against the policy that sampled them is the
row mean, self term 1/2 included (sppo_loss.win_rates). Output records are the input records
plus "P", "win_rate" and, for judges that have them, the raw "scores".

--judge picks the judge (judges.py: the interface, PairRM, reward models, and `module:factory`
plug-ins such as the toy world's `toy:ToyJudge`); this file only feeds it and checks its P.
Judges see the response text and, by default, the plain prompt text (the last user message);
`--judge_prompt template` shows them the prompt as the official SPPO pipeline shows it to PairRM:
the policy's chat template up to the answer, as text (lm.templated_prompt_text).
"""
import functools
import math
import sys

import torch
from tqdm import tqdm

from machinery.flags import missing_package, rank_parser
from machinery.judges import is_plugin, judge_factory, make_judge, plugin_call
from machinery.launch import dist_env, run_sharded, watch_launcher
from machinery.lm import load_tokenizer, prompt_text, templated_prompt_text
from machinery.records import (InputError, check_not_input, check_output, check_work_dir, one_line_errors, path_stamp,
                               preference_matrix_problem, read_records)
from sppo_loss import win_rates


def checked_matrix(P, K, rec_id, name="the judge"):
    """The judge's P as a float tensor, checked: K x K, entries in [0, 1]; `name` (--judge) names the judge."""
    try:
        P = torch.as_tensor(P, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise InputError(f"judge {name} returned a P that is not a {K} x {K} matrix of numbers for id {rec_id!r} ({e})") from None
    if P.shape != (K, K):
        raise InputError(f"judge {name} returned P of shape {tuple(P.shape)} for id {rec_id!r}, expected {K} x {K}")
    if torch.isnan(P).any() or (P < 0).any() or (P > 1).any():
        raise InputError(f"judge {name} returned P outside [0, 1] for id {rec_id!r}")
    problem = preference_matrix_problem(P.tolist())
    if problem:
        raise InputError(f"judge {name} returned a P that is not a preference matrix for id {rec_id!r}: {problem}")
    return P


def is_finite_number(x):
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def checked_results(results, batch, name):
    """The judge's results for a batch: one (P, scores) pair per prompt, no more, no fewer."""
    if not isinstance(results, (list, tuple)) or len(results) != len(batch):
        got = f"{len(results)} results" if isinstance(results, (list, tuple)) else \
            f"a {type(results).__name__}, not a list of results,"
        raise InputError(f"judge {name} returned {got} for {len(batch)} prompts (ids {batch[0]['id']!r} .. "
                         f"{batch[-1]['id']!r}); it must return one (P, scores) pair per prompt, in order")
    for rec, result in zip(batch, results):
        if not (isinstance(result, (list, tuple)) and len(result) == 2):
            raise InputError(f"judge {name} returned {result!r:.80} for id {rec['id']!r}, not a (P, scores) pair")
        K, scores = len(rec["responses"]), result[1]
        if scores is not None and not (isinstance(scores, (list, tuple, torch.Tensor)) and len(scores) == K
                                       and all(map(is_finite_number, scores))):
            raise InputError(f"judge {name} returned {len(scores) if hasattr(scores, '__len__') else 'no list of'} "
                             f"scores for the K={K} responses of id {rec['id']!r}; expected None or K finite numbers")
    return results


def rank_records(records, judge, batch_size=16, desc="rank", judge_text=prompt_text, name="the judge"):
    """Add P, win_rate (and scores) to each record; records are not modified in place.
    judge_text(prompt) is the prompt as the judge reads it; `name` (the --judge spec) names it in errors."""
    out = []
    for start in tqdm(range(0, len(records), batch_size), desc=desc, unit="batch"):
        batch = records[start:start + batch_size]
        texts, responses = [judge_text(r["prompt"]) for r in batch], [r["responses"] for r in batch]
        results = plugin_call(name, "preferences()", judge.preferences, texts, responses) if is_plugin(name) \
            else judge.preferences(texts, responses)
        for rec, (P, scores) in zip(batch, checked_results(results, batch, name)):
            P = checked_matrix(P, len(rec["responses"]), rec["id"], name)
            new = dict(rec, P=P.tolist(), win_rate=win_rates(P).tolist())
            if scores is not None:
                new["scores"] = [float(s) for s in scores]
            out.append(new)
    return out


def main(argv=None):
    args = rank_parser(__doc__).parse_args(argv)  # the flags: flags.py
    watch_launcher()
    rank, world, local_rank = dist_env()
    records, judge_text = check_inputs(args)  # raises InputError: bad input stops every rank alike
    device = args.judge_device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    judge = None

    def work(shard):  # the judge is built only by a rank that has work left
        nonlocal judge
        judge = make_judge(args.judge, args.judge_path, p_mode=args.p_mode, max_length=args.judge_max_length,
                           batch_size=args.judge_batch_size, device=device)
        return rank_records(shard, judge, args.batch_size, desc="rank" if world == 1 else f"rank {rank}/{world}",
                            judge_text=judge_text, name=args.judge)
    run_sharded(records, args.out, work, config=dict(vars(args), judge_path=path_stamp(args.judge_path or "")))
    if getattr(judge, "cut", 0):
        print(f"note: {judge.cut} of {judge.seen} responses were longer than the judge's limit; "
              "it judged their first part", file=sys.stderr)


def check_inputs(args):
    """The responses, read and checked, and judge_text(prompt): the prompt as the judge reads it.
    Every rank checks paths, the judge and the whole file before any work, so bad input stops all
    ranks alike: InputError, one line and exit 2 (records.one_line_errors)."""
    check_output(args.out)
    judge_factory(args.judge)
    if (missing := missing_package(args)):  # pairrm without llm-blender: now, not when the judge is built
        raise InputError(missing)
    judge_text = prompt_text
    if args.judge_prompt == "template":
        if not args.template_model:
            raise InputError("--judge_prompt template needs --template_model (the policy's tokenizer)")
        tokenizer = load_tokenizer(args.template_model)
        if tokenizer.chat_template is None:
            raise InputError(f"--template_model {args.template_model}: the tokenizer has no chat template")
        judge_text = functools.partial(templated_prompt_text, tokenizer)
    records = read_records(args.responses, stage="responses")
    for out in (args.out, f"{args.out}.shards"):
        check_not_input(out, {"--responses": args.responses, "--judge_path": args.judge_path,
                              "--template_model": args.template_model})
    check_work_dir(f"{args.out}.shards", "rank.py")
    return records, judge_text


if __name__ == "__main__":
    one_line_errors(main)
