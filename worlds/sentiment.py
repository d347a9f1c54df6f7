"""The real-LM world: google/gemma-3-270m (a base model, from PyPI) learns to write warmer reviews.

`python iterate.py --preset sentiment` uses it. Like the toy world it provides only what a real
setup provides (a base model directory, prompt files, a judge for rank.py) plus an evaluator:

- model: the converted Gemma-3-270M (gemma.py), 268M parameters, no chat template: prompts are
  plain text, and a response is the model's continuation of it.
- prompts: 24 topics x 18 openings ("Honestly, the hotel near the station"), written for this
  project. The 6 EVAL_TOPICS are held out: training never sees those topics.
- judge (`sentiment:VaderJudge`): VADER's compound score c in [-1, 1] of prompt + response, and
  P(y_i > y_j) = sigmoid((c_i - c_j) / TAU). A scalar score, so the preference is transitive.
- evaluation, per iteration on held-out prompts with fixed sampling seeds: mean VADER score;
  P(pi_t > pi_0) by VADER and by two judges training never saw (AFINN, TextBlob); distinct-2
  and mean length (degenerate text); log pi_0 of pi_t's samples and a KL(pi_t || pi_0)
  estimate (how far the policy moved); three sample continuations.
"""
import json
from pathlib import Path

import numpy as np
import torch

from machinery.lm import collate, load_model, load_tokenizer, prompt_token_ids, response_token_ids, sequence_logps
from machinery.records import InputError, build_once, write_json, write_records
from sppo_loss import prob_matrix_from_scores

JUDGE_PACKAGES = "vaderSentiment afinn textblob"
TAU = 0.25  # VADER compound differences of 0.25 are one logit: a clearly warmer text wins ~73%
TOPICS = ["new phone", "hotel near the station", "Italian restaurant downtown", "train to the coast",
          "jazz concert", "science fiction film", "coffee shop on the corner", "local library", "city museum",
          "cheap laptop", "hiking trail", "dentist appointment", "farmers market", "new video game",
          "summer festival", "bakery next door", "morning flight", "public swimming pool",
          # held out (EVAL_TOPICS)
          "cooking class", "used car", "mystery novel", "neighbourhood park", "family wedding", "bike repair shop"]
EVAL_TOPICS = TOPICS[-6:]
OPENINGS = ["The {t} was", "Honestly, the {t}", "I have to say that the {t}", "Last weekend we tried the {t}, and it",
            "My first impression of the {t} was that", "Here is my review of the {t}:",
            "Compared to what I expected, the {t}", "After a week with the {t}, I think",
            "What surprised me most about the {t} was", "If a friend asked me about the {t}, I would say",
            "The best way to describe the {t} is", "Everyone was talking about the {t}, so I",
            "On a scale from one to ten, the {t}", "I went back to the {t} today and", "To be fair, the {t}",
            "The thing about the {t} is that", "My sister finally tried the {t}. She said it",
            "When I think about the {t}, I remember"]
EVAL_PROMPTS = 48  # held-out prompts evaluated (8 per topic), EVAL_SAMPLES samples each
EVAL_SAMPLES = 2
EVAL_SEED = 12345  # the same sampling noise for every policy: comparisons between iterations are paired


def make_prompts():
    """(train, held-out) prompt records: every opening for every topic; topic kept as a field."""
    train, held_out = [], []
    for t, topic in enumerate(TOPICS):
        for o, opening in enumerate(OPENINGS):
            rec = {"id": f"t{t:02d}-o{o:02d}", "prompt": opening.format(t=topic), "topic": topic}
            (held_out if topic in EVAL_TOPICS else train).append(rec)
    return train, held_out


def world_paths(out_dir):
    """Where each part of the world is (the prompts in out_dir, the model in the converted-model
    cache), and its judge."""
    from worlds import gemma
    out_dir = Path(out_dir)
    return {"model": gemma.cache_root() / gemma.MODEL_DIR_NAME, "train_prompts": out_dir / "train_prompts.jsonl",
            "eval_prompts": out_dir / "eval_prompts.jsonl", "judge": "sentiment:VaderJudge", "judge_path": None}


def build_world(out_dir, seed=0):
    """The world's prompt files in out_dir, written once (records.build_once), and the converted
    model; returns their paths."""
    import random

    from worlds import gemma
    gemma.converted_model_dir()  # converted once per machine
    with build_once(out_dir) as tmp:
        if tmp is not None:
            paths = world_paths(tmp)
            train, held_out = make_prompts()
            random.Random(seed).shuffle(train)  # each iteration's slice mixes all training topics
            per_topic = EVAL_PROMPTS // len(EVAL_TOPICS)
            held_out = [r for topic in EVAL_TOPICS for r in [h for h in held_out if h["topic"] == topic][:per_topic]]
            write_records(paths["train_prompts"], train)
            write_records(paths["eval_prompts"], held_out)
    return world_paths(out_dir)


# ---- judges ---------------------------------------------------------------------------------------


def lexicon_scorers():
    """{name: text -> float} for VADER (the training judge), AFINN and TextBlob (held-out judges)."""
    try:
        from afinn import Afinn
        from textblob import TextBlob
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as e:
        raise InputError(f"the sentiment judges need {e.name!r}: pip install {JUDGE_PACKAGES}") from None
    vader, afinn = SentimentIntensityAnalyzer(), Afinn()
    return {"vader": lambda s: vader.polarity_scores(s)["compound"], "afinn": afinn.score,
            "textblob": lambda s: TextBlob(s).sentiment.polarity}


class VaderJudge:
    """rank.py judge: P[i, j] = sigmoid((c_i - c_j) / TAU), c = VADER compound of prompt + response."""

    def __init__(self, path=None):
        self.vader = lexicon_scorers()["vader"]

    def preferences(self, prompts, responses):
        out = []
        for prompt, ys in zip(prompts, responses):
            scores = torch.tensor([self.vader(prompt + y) for y in ys], dtype=torch.float64)
            out.append((prob_matrix_from_scores(scores / TAU), scores.tolist()))
        return out


# ---- evaluation -----------------------------------------------------------------------------------


def distinct_2(texts) -> float:
    """Distinct word bigrams over all bigrams of the texts (1.0: no bigram repeats)."""
    bigrams = [b for t in texts for b in zip(t.split(), t.split()[1:])]
    return len(set(bigrams)) / max(1, len(bigrams))


def win_probability(a, b) -> float:
    """P(a > b) over all pairs, ties half: [n] scores of one policy's samples vs [m] of another's."""
    a, b = np.asarray(a, dtype=float)[:, None], np.asarray(b, dtype=float)[None, :]
    return float(np.mean((a > b) + 0.5 * (a == b)))


@torch.no_grad()
def sample_logps(model, tokenizer, records, batch_size=16):
    """log pi(response | prompt), summed, and token counts, of every sample: ([n], [n])."""
    pairs = [(prompt_token_ids(tokenizer, r["prompt"]), response_token_ids(tokenizer, y, t))
             for r in records for y, t in zip(r["responses"], r["truncated"])]
    out = [sequence_logps(model, collate(pairs[s:s + batch_size], tokenizer.pad_token_id))
           for s in range(0, len(pairs), batch_size)]
    return torch.cat(out).tolist(), [len(r) for _, r in pairs]


def evaluate(model_dirs, world, run_dir, max_new_tokens=24, sample=None, final=False, skip=()):
    """One row per policy pi_0..pi_T on the held-out prompts, but for the iterations in skip (iterate.py
    --no-eval_every_iteration).

    Each policy's samples (EVAL_SAMPLES per prompt, the same seeds for every policy, so the
    comparisons are paired) and their scores and log-probs are cached in run_dir/iter{t}/, so a
    later iteration evaluates only the new policy. sample: generate.sampler(the run's backend);
    final (the run's last policy) changes nothing here.
    """
    from generate import sampler
    sample = sample or sampler()
    eval_prompts = [json.loads(line) for line in Path(world["eval_prompts"]).read_text().splitlines()]
    scorers = lexicon_scorers()
    base = None
    policies = {}  # iteration -> its policy's samples, scores and log-probs
    for t, model_dir in enumerate(model_dirs):
        if t in skip:
            continue
        cache = Path(run_dir) / f"iter{t}" / "eval_samples.json"
        if not cache.exists():
            records = sample(model_dir, eval_prompts, EVAL_SAMPLES, max_new_tokens=max_new_tokens, seed=EVAL_SEED,
                             batch_size=24, desc=f"eval samples pi_{t}")
            tokenizer, model = load_tokenizer(model_dir), load_model(model_dir).eval()
            logp_t, lengths = sample_logps(model, tokenizer, records)
            if base is None:
                base = (tokenizer, model) if t == 0 else (load_tokenizer(model_dirs[0]), load_model(model_dirs[0]).eval())
            logp_0 = logp_t if t == 0 else sample_logps(base[1], base[0], records)[0]
            texts = [r["prompt"] + y for r in records for y in r["responses"]]
            write_json(cache, {"texts": texts, "responses": [y for r in records for y in r["responses"]],
                               "scores": {name: [f(s) for s in texts] for name, f in scorers.items()},
                               "logp_pi0": logp_0, "logp_pit": logp_t, "tokens": lengths})
        policies[t] = json.loads(cache.read_text())
    rows = []
    for t, stats in policies.items():
        row = {"iteration": t, "vader": float(np.mean(stats["scores"]["vader"])),
               "afinn": float(np.mean(stats["scores"]["afinn"])), "textblob": float(np.mean(stats["scores"]["textblob"]))}
        for name in scorers:  # pi_t's samples of a prompt against pi_0's samples of the same prompt
            mine, base_scores = stats["scores"][name], policies[0]["scores"][name]
            row[f"P_{name}"] = float(np.mean([win_probability(mine[i:i + EVAL_SAMPLES], base_scores[i:i + EVAL_SAMPLES])
                                              for i in range(0, len(mine), EVAL_SAMPLES)]))
        row["distinct_2"] = distinct_2(stats["responses"])
        row["length"] = float(np.mean(stats["tokens"]))
        row["logp_pi0_per_token"] = float(np.sum(stats["logp_pi0"]) / max(1, np.sum(stats["tokens"])))
        row["kl_estimate"] = float(np.mean(np.array(stats["logp_pit"]) - np.array(stats["logp_pi0"])))
        row["samples"] = stats["texts"][:3 * EVAL_SAMPLES:EVAL_SAMPLES]  # the first sample of 3 prompts
        rows.append(row)
    return rows


def format_table(rows) -> str:
    head = (f"{'iter':>4} {'vader':>6} {'P>pi0 vader':>11} {'afinn':>6} {'textblob':>8} "
            f"{'distinct2':>9} {'tokens':>6} {'logp0/tok':>9} {'KL(pi_t|pi_0)':>13}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['iteration']:>4} {r['vader']:>6.3f} {r['P_vader']:>11.3f} {r['P_afinn']:>6.3f} "
                     f"{r['P_textblob']:>8.3f} {r['distinct_2']:>9.3f} {r['length']:>6.1f} "
                     f"{r['logp_pi0_per_token']:>9.3f} {r['kl_estimate']:>13.2f}")
    lines.append("(afinn, textblob: P(pi_t > pi_0) by judges the training never saw; vader: mean compound)")
    for r in rows[-1:]:
        lines += [f"  pi_{r['iteration']} sample: {s!r}" for s in r["samples"]]
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    t = [r["iteration"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, marker in (("P_vader", "o-"), ("P_afinn", "s-"), ("P_textblob", "^-")):
        left.plot(t, [r[key] for r in rows], marker, label=key.replace("P_", "P(pi_t > pi_0) by "))
    left.plot(t, [r["vader"] for r in rows], "x--", label="mean VADER compound")
    left.axhline(0.5, color="grey", lw=0.5)
    left.set_title("sentiment world: held-out topics")
    right.plot(t, [r["distinct_2"] for r in rows], "o-", label="distinct-2")
    right.plot(t, [r["kl_estimate"] / max(1e-9, max(abs(x["kl_estimate"]) for x in rows) or 1) for r in rows],
               "s--", label="KL(pi_t || pi_0), scaled to max 1")
    right.set_title("degeneration checks")
    for ax in (left, right):
        ax.set_xlabel("SPPO iteration t")
        ax.set_xticks(t)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
