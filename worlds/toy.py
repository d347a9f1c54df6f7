"""The embedded default world: a tiny language model, prompts and a judge that know the truth.

`iterate.py` with no --model uses it. It provides what a real setup provides, nothing more: a
base model directory (HF format), prompt files and a judge for rank.py (`toy:ToyJudge`). Because
every prompt has a small finite set of valid answers, it can also evaluate a policy exactly.

The game. Six families of questions ("Which fruit suits the picnic?"), five one-word answers
per family in roles A..E, plus "invalid" (anything else). Per family a preference matrix mixes a
transitive part (Bradley-Terry on qualities q) with a rock-paper-scissors cycle on A, B, C:

    P[i, j] = sigmoid(q_i - q_j) + c * R[i, j],   R = the A > B > C > A cycle (antisymmetric)

Cyclic families (c = 0.2, A = B = C in quality) have the mixed von Neumann winner
(1/3, 1/3, 1/3, 0, 0); transitive families (c = 0) have the pure winner A. Invalid responses
lose to every valid one with probability 0.95. The base "SFT" model answers from
pi_0 = (.30, .06, .05, .55, .04): mostly the dominated D, so there is a lot to learn.
"""
import argparse
import functools
import inspect
import json
import random
import re
from pathlib import Path

import numpy as np
import torch

from machinery.lm import load_model, load_tokenizer, prompt_token_ids, response_token_ids
from machinery.records import InputError, build_once, path_stamp, write_json, write_records
from theory import games

FAMILIES = {  # category: (answers in roles A..E, kind)
    "fruit": (["apple", "pear", "plum", "fig", "lime"], "cyclic"),
    "colour": (["red", "blue", "green", "grey", "brown"], "cyclic"),
    "animal": (["cat", "dog", "fox", "owl", "eel"], "cyclic"),
    "drink": (["tea", "milk", "juice", "soda", "water"], "cyclic"),
    "tool": (["saw", "drill", "hammer", "file", "rope"], "transitive"),
    "song": (["jazz", "rock", "folk", "pop", "polka"], "transitive"),
}
QUALITY = {"cyclic": ([2.0, 2.0, 2.0, 0.3, -1.0], 0.2), "transitive": ([2.0, 1.4, 0.8, 0.3, -1.0], 0.0)}
BASE_POLICY = [0.30, 0.06, 0.05, 0.55, 0.04]
INVALID_WINS = 0.05
TEMPLATES = ["Which {c} suits the {n}?", "Pick a {c} for the {n}.", "Name a {c} for the {n}.",
             "What {c} goes with the {n}?", "Suggest a {c} for the {n}.", "Choose a {c} to go with the {n}.",
             "Which {c} would you bring to the {n}?", "Give me a {c} for the {n}."]
NOUNS = ["picnic", "party", "wedding", "trip", "dinner", "festival", "garden", "beach", "concert", "school",
         "office", "market", "camp", "museum", "library", "harbour", "farm", "castle", "forest", "village"]
EVAL_NOUNS = NOUNS[-3:]  # held out: 6 families x 8 templates x 3 nouns = 144 prompts
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                 "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]


def family_matrix(kind: str) -> np.ndarray:
    """The 6 x 6 preference matrix over (A, B, C, D, E, invalid)."""
    q, c = QUALITY[kind]
    q = np.array(q)
    P = 1.0 / (1.0 + np.exp(-(q[:, None] - q[None, :])))
    cycle = np.zeros((5, 5))
    cycle[0, 1] = cycle[1, 2] = cycle[2, 0] = 1.0
    P += c * (cycle - cycle.T)
    full = np.full((6, 6), 1.0 - INVALID_WINS)
    full[:5, :5] = P
    full[5, :] = INVALID_WINS
    full[5, 5] = 0.5
    return full


def make_prompts():
    """(train, eval) prompt records; the family is a pass-through field the stages ignore."""
    train, held_out = [], []
    for fam in FAMILIES:
        for t, template in enumerate(TEMPLATES):
            for noun in NOUNS:
                rec = {"id": f"{fam}-{t}-{noun}", "prompt": template.format(c=fam, n=noun), "family": fam}
                (held_out if noun in EVAL_NOUNS else train).append(rec)
    return train, held_out


# ---- building the base model ------------------------------------------------------------------


def train_tokenizer(corpus, out_dir):
    """A byte-level BPE tokenizer with a chat template, saved in HF format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
                                 extra_special_tokens={"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"})
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(out_dir)
    return load_tokenizer(out_dir)


@functools.lru_cache(maxsize=None)
def answer_tokens(tokenizer, prompt, answer):
    """(prompt ids, answer ids + EOS), cached: SFT and evaluation score the same pairs again and again."""
    return prompt_token_ids(tokenizer, prompt), response_token_ids(tokenizer, answer, truncated=False)


def answer_logps(model, tokenizer, prompts, answers, prompts_per_forward=128):
    """log pi(answer + EOS | prompt) for every prompt x answer: [len(prompts), len(answers[0])].

    Each prompt is run once and its keys and values are shared by all its answers (a KV cache
    repeated per answer): the numbers of scoring each (prompt, answer) sequence whole
    (lm.sequence_logps; equal to ~5e-7), from a third of the tokens. Only the canonical
    tokenisation of each answer is scored; other token paths to the same text count as invalid
    mass (they are rare and the evaluator says so).
    """
    out = []
    for s in range(0, len(prompts), prompts_per_forward):
        pairs = [answer_tokens(tokenizer, p, a) for p, ans in zip(prompts[s:s + prompts_per_forward],
                                                                   answers[s:s + prompts_per_forward]) for a in ans]
        out.append(shared_prompt_logps(model, pairs, len(answers[0]), tokenizer.pad_token_id))
    return torch.cat(out)


def shared_prompt_logps(model, pairs, A, pad_id):
    """Summed log-probs of (prompt ids, answer ids) pairs where each run of A pairs has one prompt: [N / A, A]."""
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # transformers < 5.24
    prompts, answers = [p for p, _ in pairs[::A]], [r for _, r in pairs]
    width = max(map(len, prompts))  # prompts left-padded: each one's last position predicts its answers' first token
    prompt_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    prompt_mask = (torch.arange(width) >= torch.tensor([[width - len(p)] for p in prompts])).long()
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=(prompt_mask.cumsum(-1) - 1).clamp(min=0),
                use_cache=True)
    first = out.logits[:, -1].float().log_softmax(-1).repeat_interleave(A, 0)  # [N, V]
    cache = getattr(out, cache_arg)
    cache.batch_repeat_interleave(A)  # each prompt's keys and values, once per answer
    width_a = max(map(len, answers))  # answers right-padded; the last token is predicted, never read
    answer_ids = torch.tensor([r + [pad_id] * (width_a - len(r)) for r in answers])  # [N, La]
    answer_mask = (torch.arange(width_a) < torch.tensor([[len(r)] for r in answers])).long()
    positions = torch.tensor([[len(p)] for p in prompts]).repeat_interleave(A, 0) + torch.arange(width_a - 1)
    logits = model(input_ids=answer_ids[:, :-1], position_ids=positions, use_cache=False, **{cache_arg: cache},
                   attention_mask=torch.cat([prompt_mask.repeat_interleave(A, 0), answer_mask[:, :-1]], 1)).logits
    later = logits.float().log_softmax(-1).gather(-1, answer_ids[:, 1:, None]).squeeze(-1) * answer_mask[:, 1:]
    return (first.gather(-1, answer_ids[:, :1]).squeeze(-1) + later.sum(-1)).view(-1, A)


def sft_base_model(model, tokenizer, records, steps=200, batch_prompts=16, lr=3e-3, seed=0, decay_from=0.7):
    """Fit pi(answer | prompt) to BASE_POLICY by expected NLL: min -sum_a pi_0(a) log pi(a | x).

    The lr is constant, then falls linearly to 0 from step decay_from x steps on (1.0: constant):
    the falling tail averages out the batch noise, so 200 steps of 16 prompts fit as well as 150
    of 64 at a constant lr did, in about half the time (bench/toy_sft_recipes.py measures recipes)."""
    rng = random.Random(seed)
    base = torch.tensor(BASE_POLICY)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    tail = max((1 - decay_from) * steps, 1)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        batch = rng.sample(records, batch_prompts)
        logps = answer_logps(model, tokenizer, [r["prompt"] for r in batch], [FAMILIES[r["family"]][0] for r in batch])
        loss = -(logps * base).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (steps - step) / tail)
        opt.step()
    model.eval()
    return loss.item()


def world_paths(out_dir):
    """Where each part of the toy world is in out_dir (the one place that says so), and its judge."""
    out_dir = Path(out_dir)
    return {"model": out_dir / "base_model", "train_prompts": out_dir / "train_prompts.jsonl",
            "eval_prompts": out_dir / "eval_prompts.jsonl", "world": out_dir / "world.json",
            "judge": "toy:ToyJudge", "judge_path": out_dir / "world.json"}


def build_world(out_dir, seed=0, sft_steps=200):
    """The toy world in out_dir, built there once (records.build_once: atomically, one builder at a
    time; a built one is found, not rebuilt); returns its paths."""
    with build_once(out_dir) as tmp:
        if tmp is not None:
            make_world(world_paths(tmp), seed, sft_steps)
    return world_paths(out_dir)


def make_world(paths, seed, sft_steps):
    """Tokenizer, base model (fit to BASE_POLICY), prompt files and world.json, written to `paths`."""
    train, held_out, tokenizer = prompts_and_tokenizer(seed, paths["model"])
    model = untrained_model(tokenizer, seed)
    loss = sft_base_model(model, tokenizer, train, steps=sft_steps, seed=seed)
    model.save_pretrained(paths["model"])
    write_records(paths["train_prompts"], train)
    write_records(paths["eval_prompts"], held_out)
    world = {"families": {f: {"answers": a, "kind": k, "matrix": family_matrix(k).tolist()} for f, (a, k) in FAMILIES.items()},
             "base_policy": BASE_POLICY, "seed": seed, "sft_final_loss": loss,
             "parameters": sum(p.numel() for p in model.parameters())}
    write_json(paths["world"], world)


def prompts_and_tokenizer(seed, out_dir):
    """The world's train prompts (shuffled by seed), held-out prompts, and tokenizer (saved in out_dir)."""
    train, held_out = make_prompts()
    random.Random(seed).shuffle(train)
    corpus = [r["prompt"] for r in train + held_out] + [" ".join(a) for a, _ in FAMILIES.values()] * 20
    return train, held_out, train_tokenizer(corpus, out_dir)


def untrained_model(tokenizer, seed):
    """The toy policy before SFT: a 2-layer Llama of 0.37M parameters on the world's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


# ---- the judge --------------------------------------------------------------------------------


class ToyJudge:
    """Exact preferences: a response is one of the family's answers or invalid."""

    def __init__(self, world_path):
        if world_path is None or not Path(world_path).is_file():
            raise InputError(f"--judge_path {world_path}: the toy judge needs the world file (world.json)")
        try:
            world = json.loads(Path(world_path).read_text(encoding="utf-8"))
            families = world["families"]
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"--judge_path {world_path}: not a toy world file ({e!r})") from e
        self.families = {f: (v["answers"], np.array(v["matrix"])) for f, v in families.items()}

    def family(self, prompt: str) -> str:
        """The family a question is about: the one category word it names."""
        words = set(re.findall(r"[a-z]+", prompt.lower()))
        found = [f for f in self.families if f in words]
        if len(found) != 1:
            raise InputError(f"toy judge: prompt {prompt!r} names {len(found)} of the families {sorted(self.families)}")
        return found[0]

    def role(self, answers, response: str) -> int:
        text = response.strip()
        return answers.index(text) if text in answers else len(answers)

    def preferences(self, prompts, responses):
        out = []
        for prompt, resp in zip(prompts, responses):
            answers, matrix = self.families[self.family(prompt)]
            roles = [self.role(answers, r) for r in resp]
            out.append((matrix[np.ix_(roles, roles)], None))
        return out


# ---- the exact evaluator ----------------------------------------------------------------------


@torch.no_grad()
def policy_distributions(model_dir, records, world):
    """Per prompt, pi(A..E) from sequence log-probs and the leftover mass as invalid: [N, 6]."""
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir).eval()
    answers = [world["families"][r["family"]]["answers"] for r in records]
    probs = answer_logps(model, tokenizer, [r["prompt"] for r in records], answers).exp().double().numpy()
    return np.hstack([probs, np.clip(1.0 - probs.sum(1, keepdims=True), 0.0, 1.0)])


def effective_eta(matrices, prev, cur):
    """The step the update actually took: the slope of log(pi_t / pi_{t-1}) on P(y > pi_{t-1}).

    Exact multiplicative weights gives log pi_t(y) - log pi_{t-1}(y) = eta P(y > pi_{t-1}) - log Z,
    so the slope is eta. Pooled weighted least squares over the valid answers of all prompts,
    weights pi_{t-1}(y), one intercept per prompt (it absorbs log Z).
    """
    num = den = 0.0
    for M, p, q in zip(matrices, prev, cur):
        w, x, y = p[:5], (M @ p)[:5], np.log(q[:5]) - np.log(p[:5])
        x, y = x - np.average(x, weights=w), y - np.average(y, weights=w)
        num, den = num + np.sum(w * x * y), den + np.sum(w * x * x)
    return float(num / den)


SCORED = {}  # [model dir, its files' sizes and times, the eval prompts'] -> policy_distributions


def evaluate(model_dirs, paths, run_dir=None, sample=None, final=False, skip=()):
    """Exact metrics of pi_0..pi_T on the held-out prompts of the world at `paths`; one row per iteration
    (exact: nothing is sampled; sample, final and skip, as the other worlds take them, are not used: an
    exact evaluation costs next to nothing, and exploit_avg averages every policy).

    win_vs_pi0 = P(pi_t > pi_0); exploit = max_y P(y > pi_t) - 1/2 (0 at the von Neumann winner);
    exploit_avg = exploitability of (1/t) sum_{s=1..t} pi_s (Theorem 4.1's average policy);
    invalid = the mass on anything but the five answers; all averaged over prompts, and each also
    over the cyclic and over the transitive families' prompts (`exploit_cyclic`, ...).
    """
    world = json.loads(Path(paths["world"]).read_text())
    records = [json.loads(line) for line in Path(paths["eval_prompts"]).read_text().splitlines() if line.strip()]
    matrices = [np.array(world["families"][r["family"]]["matrix"]) for r in records]
    kinds = np.array([world["families"][r["family"]]["kind"] for r in records])
    dists = []
    for d in model_dirs:  # iteration t evaluates pi_0 .. pi_t: each model is scored once per process
        key = json.dumps([str(d), path_stamp(d), path_stamp(paths["eval_prompts"])])
        if key not in SCORED:
            SCORED[key] = policy_distributions(d, records, world)
        dists.append(SCORED[key])
    return metric_rows(dists, matrices, kinds)


def metric_rows(dists, matrices, kinds):
    """The evaluator's rows from the policies pi_0..pi_T ([N, 6] each: A..E and invalid per prompt),
    the prompts' matrices and their families' kinds: each metric averaged over all prompts, then
    over the prompts of each kind (`_cyclic`, `_transitive`)."""
    kinds = np.asarray(kinds)

    def by_kind(name, per_prompt):  # {name: mean, name_cyclic: mean over cyclic prompts, ...}
        out = {name: float(per_prompt.mean())}
        for kind in ("cyclic", "transitive"):
            out[f"{name}_{kind}"] = float(per_prompt[kinds == kind].mean()) if (kinds == kind).any() else float("nan")
        return out

    rows = []
    for t, pi in enumerate(dists):
        avg = np.mean(dists[1:t + 1], axis=0) if t > 0 else pi
        rows.append({
            "iteration": t,
            **by_kind("win_vs_pi0", np.array([games.win_rate(M, p, q) for M, p, q in zip(matrices, pi, dists[0])])),
            **by_kind("exploit", np.array([games.exploitability(M, p) for M, p in zip(matrices, pi)])),
            **by_kind("exploit_avg", np.array([games.exploitability(M, p) for M, p in zip(matrices, avg)])),
            **by_kind("invalid", pi[:, 5]),
            "eta_eff": effective_eta(matrices, dists[t - 1], pi) if t > 0 else float("nan"),
            "mean_policy": pi[:, :5].mean(0).round(3).tolist(),
        })
    return rows


def format_table(rows) -> str:
    head = (f"{'iter':>4} {'P(pi_t>pi_0)':>12} {'exploit':>8} {'exploit_avg':>11} {'cyclic':>7} {'transit':>7} "
            f"{'invalid':>8} {'eta_eff':>7}  mean pi(A..E)")
    lines = [head]
    for r in rows:
        lines.append(f"{r['iteration']:>4} {r['win_vs_pi0']:>12.3f} {r['exploit']:>8.3f} {r['exploit_avg']:>11.3f} "
                     f"{r['exploit_cyclic']:>7.3f} {r['exploit_transitive']:>7.3f} {r['invalid']:>8.3f} {r['eta_eff']:>7.2f}  "
                     f"{r['mean_policy']}")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    t = [r["iteration"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(t, [r["win_vs_pi0"] for r in rows], "o-", label="P(pi_t > pi_0)")
    ax.plot(t, [r["exploit"] for r in rows], "s-", label="exploitability(pi_t)")
    ax.plot(t, [r["exploit_avg"] for r in rows], "^--", label="exploitability(avg pi_1..t)")
    ax.plot(t, [r["invalid"] for r in rows], "x:", label="invalid mass")
    ax.axhline(0.5, color="grey", lw=0.5)
    ax.set_xlabel("SPPO iteration t")
    ax.set_xticks(t)
    ax.set_title("toy world, held-out prompts (exact)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description="Build the toy world, or evaluate models in it.")
    ap.add_argument("--out_dir", default="runs/toy_world")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--evaluate", nargs="*", help="model dirs pi_0 .. pi_T to evaluate")
    args = ap.parse_args()
    paths = build_world(args.out_dir, args.seed)
    if args.evaluate:
        print(format_table(evaluate(args.evaluate, paths)))
    else:
        print({k: str(v) for k, v in paths.items()})


if __name__ == "__main__":
    main()
