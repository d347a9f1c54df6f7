"""The judges (judges.py) through rank.py on tiny local models, checked against independent computations.

pairrm: the batched judge vs llm-blender's own `compare` (pairwise mode) and its own
`rank(..., return_scores=True, batch_size=1)` as the official SPPO code calls it (scores mode).
reward: the batched, padded judge vs the reward model called on one unpadded sequence.
win rates: rank.py's against a count of wins and ties over the responses themselves.
"""
import json

import pytest
import torch

from machinery import judges
import rank
import tiny_models
from machinery.lm import prompt_text
from machinery.records import one_line_errors

PROMPTS = [  # short texts: DeBERTa's relative attention is quadratic in length
    ("a", "which fruit suits the picnic", ["the apple", "a pear is soft", "fig", "i think you should bring a lime"]),
    ("b", [{"role": "system", "content": "be brief"}, {"role": "user", "content": "pick a colour for the party"}],
     ["red", "blue or green", "grey grey grey", "brown is a good colour"]),
    ("c", "name a drink for the dinner", ["tea", "milk and juice", "soda", "water"]),
]
LONG = "that is a good question and here is a long answer with many words in it " * 3


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("judges")
    return {"pairrm": tiny_models.build_tiny_pairrm(root), "pair_rm": tiny_models.build_tiny_pair_reward(root),
            "chat_rm": tiny_models.build_tiny_chat_reward(root)}


@pytest.fixture(scope="module")
def blender(models):
    """An independent llm-blender Blender on the tiny ranker, loaded by llm-blender's own loader."""
    judges.llm_blender_compat()
    import llm_blender
    b = llm_blender.Blender(llm_blender.BlenderConfig(device="cpu", use_tqdm=False))
    b.loadranker(str(models["pairrm"]), device="cpu")
    return b


def write_responses(path, items):
    with open(path, "w") as f:
        for rid, prompt, ys in items:
            f.write(json.dumps({"id": rid, "prompt": prompt, "responses": ys, "truncated": [False] * len(ys)}) + "\n")


def run_rank(tmp_path, items, *args):
    src, out = tmp_path / "responses.jsonl", tmp_path / "ranked.jsonl"
    write_responses(src, items)
    rank.main(["--responses", str(src), "--out", str(out), *args])
    return [json.loads(line) for line in out.read_text().splitlines()]


def check_matrix(rec, K):
    P = torch.tensor(rec["P"], dtype=torch.float64)
    assert P.shape == (K, K)
    assert ((P >= 0) & (P <= 1)).all()
    return P


def compare_matrix(blender, x, ys):
    """C[i, j] = blender.compare(x, y_i, y_j) (default "[A,B]+[B,A]" mode), every i != j."""
    K = len(ys)
    pairs = [(i, j) for i in range(K) for j in range(K) if i != j]
    logits = blender.compare([x] * len(pairs), [ys[i] for i, _ in pairs], [ys[j] for _, j in pairs],
                             return_logits=True, batch_size=len(pairs), disable_tqdm=True)
    C = torch.zeros(K, K, dtype=torch.float64)
    for (i, j), c in zip(pairs, logits):
        C[i, j] = float(c)
    return C


def test_pairrm_pairwise_matches_llm_blender_compare(tmp_path, models, blender):
    # judge_batch_size 5 packs pairs of different prompts into one forward
    ranked = run_rank(tmp_path, PROMPTS, "--judge", "pairrm", "--judge_path", str(models["pairrm"]),
                      "--p_mode", "pairwise", "--judge_batch_size", "5", "--judge_device", "cpu")
    assert [r["id"] for r in ranked] == ["a", "b", "c"]
    for rec, (_, prompt, ys) in zip(ranked, PROMPTS):
        P = check_matrix(rec, 4)
        assert torch.allclose(P + P.T, torch.ones(4, 4, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(P.diagonal(), torch.full((4,), 0.5, dtype=torch.float64))
        C = compare_matrix(blender, prompt_text(prompt), ys)  # the judge sees the plain user text
        # compare() sums the two orders' logits; the paper's P averages them
        assert torch.allclose(P, torch.sigmoid(C / 2), atol=1e-5), (P, torch.sigmoid(C / 2))
        assert torch.allclose(torch.tensor(rec["win_rate"], dtype=torch.float64), torch.sigmoid(C / 2).mean(-1), atol=1e-5)
        assert torch.allclose(torch.tensor(rec["scores"], dtype=torch.float64), C.mean(-1), atol=1e-5)
    spread = max(abs(p - 0.5) for rec in ranked for row in rec["P"] for p in row)
    assert spread > 0.1  # the tiny ranker is not a constant judge, so the comparison means something


def test_pairrm_scores_matches_official_rank(tmp_path, models, blender):
    ranked = run_rank(tmp_path, PROMPTS, "--judge", "pairrm", "--judge_path", str(models["pairrm"]),
                      "--p_mode", "scores", "--judge_batch_size", "7", "--judge_device", "cpu")
    pairwise = run_rank(tmp_path, PROMPTS, "--judge", "pairrm", "--judge_path", str(models["pairrm"]),
                        "--judge_device", "cpu")
    for rec, pw, (_, prompt, ys) in zip(ranked, pairwise, PROMPTS):
        P = check_matrix(rec, 4)
        official = torch.tensor(blender.rank([prompt_text(prompt)], [ys], return_scores=True, batch_size=1,
                                             disable_tqdm=True)[0], dtype=torch.float64)
        assert torch.allclose(torch.tensor(rec["scores"], dtype=torch.float64), official, atol=1e-5)
        assert torch.allclose(P, torch.sigmoid(official[:, None] - official[None, :]), atol=1e-5)
        assert torch.allclose(P + P.T, torch.ones(4, 4, dtype=torch.float64), atol=1e-12)
        assert not torch.allclose(P, torch.tensor(pw["P"], dtype=torch.float64), atol=1e-3)  # the modes differ


def test_pairrm_modes_for_two_responses(models):
    """For K = 2 the official score difference is the summed two-order logit: twice the paper's mean."""
    x, ys = "which fruit suits the picnic", ["the apple", "i think you should bring a lime"]
    pairwise, scores = [judges.make_judge("pairrm", models["pairrm"], p_mode=m).preferences([x], [ys])[0][0]
                        for m in ("pairwise", "scores")]
    assert torch.allclose(torch.logit(scores), 2 * torch.logit(pairwise), atol=1e-9)


def test_pairrm_cuts_long_responses_as_official_whatever_the_batch(models, blender):
    """Long responses are cut to PairRM's per-prompt budget, the same alone or packed with others."""
    short = ("fig", ["tea", LONG, "the apple " + LONG])
    long_prompt = ("a long prompt " + LONG, ["red", LONG + " red", "blue " + LONG])
    judge = judges.make_judge("pairrm", models["pairrm"], batch_size=4)
    alone = judge.preferences([short[0]], [short[1]])[0][0]
    assert judge.cut == 2 and judge.seen == 3
    packed = judge.preferences([long_prompt[0], short[0]], [long_prompt[1], short[1]])[1][0]
    assert torch.allclose(alone, packed, atol=1e-5)
    # llm-blender's compare on one prompt's pairs cuts as the official per-prompt ranking does
    assert torch.allclose(alone, torch.sigmoid(compare_matrix(blender, *short) / 2), atol=1e-5)
    # and a tighter --judge_max_length changes what the judge sees
    tight = judges.make_judge("pairrm", models["pairrm"], max_length=6).preferences([short[0]], [short[1]])[0][0]
    assert not torch.allclose(alone, tight, atol=1e-4)


def direct_rewards(model_dir, prompt, ys, max_length=None):
    """The reward model called on one unpadded sequence at a time: the independent computation."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    out = []
    for y in ys:
        if tok.chat_template is not None:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": y}],
                                           tokenize=False)
            ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :max_length]
            enc = {"input_ids": ids}
        else:
            enc = tok(prompt, y, return_tensors="pt", truncation="longest_first", max_length=max_length)
        with torch.no_grad():
            out.append(float(model(**enc).logits[0, 0]))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["pair_rm", "chat_rm"])
def test_reward_judge_matches_direct_model_call(tmp_path, models, kind):
    ranked = run_rank(tmp_path, PROMPTS, "--judge", "reward", "--judge_path", str(models[kind]),
                      "--judge_batch_size", "3", "--judge_device", "cpu")
    for rec, (_, prompt, ys) in zip(ranked, PROMPTS):
        P = check_matrix(rec, 4)
        r = direct_rewards(models[kind], prompt_text(prompt), ys)
        assert torch.allclose(torch.tensor(rec["scores"], dtype=torch.float64), r, atol=1e-5)
        assert torch.allclose(P, torch.sigmoid(r[:, None] - r[None, :]), atol=1e-5)
        assert torch.allclose(P + P.T, torch.ones(4, 4, dtype=torch.float64), atol=1e-12)
    assert max(abs(p - 0.5) for rec in ranked for row in rec["P"] for p in row) > 0.1


@pytest.mark.parametrize("kind", ["pair_rm", "chat_rm"])
def test_reward_judge_cuts_to_max_length(models, kind):
    x, ys = "which fruit suits the picnic", ["tea", LONG, "the apple " + LONG]
    judge = judges.make_judge("reward", models[kind], max_length=20, batch_size=2)
    P, scores = judge.preferences([x], [ys])[0]
    assert judge.cut == 2 and judge.seen == 3
    assert torch.allclose(torch.tensor(scores, dtype=torch.float64), direct_rewards(models[kind], x, ys, 20), atol=1e-5)


def test_plugin_judge_and_errors(tmp_path, models):
    ranked = run_rank(tmp_path, PROMPTS[:1], "--judge", "tiny_models:ConstJudge")
    assert ranked[0]["win_rate"] == [0.5] * 4 and "scores" not in ranked[0]
    for bad in (["--judge", "nonsense"], ["--judge", "reward"], ["--judge", "reward", "--judge_path", str(tmp_path)],
                ["--judge", "pairrm", "--judge_path", str(models["pair_rm"])]):
        with pytest.raises(SystemExit) as e:
            one_line_errors(lambda: run_rank(tmp_path, PROMPTS[:1], *bad))  # as `python rank.py` runs it
        assert e.value.code == 2, bad


RPS = {("paper", "rock"), ("rock", "scissors"), ("scissors", "paper")}


def beats(a, b):
    """Rock-paper-scissors between those words (intransitive), else the longer text wins."""
    return (a, b) in RPS if {a, b} <= {"rock", "paper", "scissors"} else len(a) > len(b)


class RuleJudge:
    """`--judge test_judges:RuleJudge`: P[i, j] = 1 if y_i beats y_j, 0 if it loses, 1/2 for a tie."""

    def __init__(self, path=None):
        pass

    def preferences(self, prompts, responses):
        return [([[1.0 if beats(a, b) else 0.0 if beats(b, a) else 0.5 for b in ys] for a in ys], None)
                for ys in responses]


def test_win_rate_is_the_share_of_the_samples_beaten(tmp_path):
    """win_rate[i] estimates P(y_i > y), y ~ pi_t, from pi_t's K samples, y_i itself among them:
    the share of the K responses y_i beats, a tie (itself included) counting half."""
    items = [("len", "q", ["a", "bb", "bb", "cccc"]), ("rps", "q", ["rock", "paper", "scissors", "rock"]),
             ("mixed", "q", ["rock", "paper", "paper", "stone!"])]
    ranked = run_rank(tmp_path, items, "--judge", "test_judges:RuleJudge")
    # by hand: "a" ties only itself, 0.5/4; "bb" beats "a" and ties both "bb", 2/4; "cccc" 3.5/4.
    # Rock-paper-scissors, rock drawn twice: rock beats scissors, loses to paper, ties both rocks,
    # 2/4; paper beats two rocks, 2.5/4; scissors beats paper only, 1.5/4 (each word beats another).
    # "mixed": rock loses to both papers and to the longer "stone!", 0.5/4; paper beats rock, ties
    # paper and loses to "stone!", 2/4; "stone!" beats the other three, 3.5/4.
    assert ranked[0]["win_rate"] == [0.125, 0.5, 0.5, 0.875]
    assert ranked[1]["win_rate"] == [0.5, 0.625, 0.375, 0.5]
    assert ranked[2]["win_rate"] == [0.125, 0.5, 0.5, 0.875]
    for rec, (_, _, ys) in zip(ranked, items):  # the same count, over the responses
        counted = [(sum(beats(y, o) for o in ys) + 0.5 * sum(not beats(y, o) and not beats(o, y) for o in ys)) / len(ys)
                   for y in ys]
        assert rec["win_rate"] == pytest.approx(counted)
