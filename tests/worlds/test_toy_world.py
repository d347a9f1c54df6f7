"""The toy world's game, judge and exact evaluator, and games.py's solver."""
import json
from pathlib import Path

import numpy as np
import pytest

from theory import games
from worlds import toy

RPS = np.array([[0.5, 1.0, 0.0], [0.0, 0.5, 1.0], [1.0, 0.0, 0.5]])


def test_von_neumann_winner_rock_paper_scissors_and_transitive():
    pi = games.von_neumann_winner(RPS)
    assert np.allclose(pi, 1 / 3, atol=1e-9)
    assert games.exploitability(RPS, pi) == pytest.approx(0.0, abs=1e-9)
    assert games.exploitability(RPS, np.array([1.0, 0.0, 0.0])) == pytest.approx(0.5)  # paper beats rock
    q = np.array([1.0, 0.2, -0.5, -2.0])  # Bradley-Terry: the best response is the winner
    bt = 1 / (1 + np.exp(-(q[:, None] - q[None, :])))
    assert np.allclose(games.von_neumann_winner(bt), [1, 0, 0, 0], atol=1e-9)
    # brute force over a grid of the simplex: nothing has lower exploitability than the LP's answer
    grid = [np.array([a, b, 1 - a - b]) for a in np.linspace(0, 1, 41) for b in np.linspace(0, 1 - a, 41)]
    P3 = toy.family_matrix("cyclic")[:3, :3]
    best = min(games.exploitability(P3, g) for g in grid)
    assert games.exploitability(P3, games.von_neumann_winner(P3)) <= best + 1e-9


def test_family_matrices():
    for kind in ("cyclic", "transitive"):
        M = toy.family_matrix(kind)
        assert M.shape == (6, 6) and np.allclose(M + M.T, 1.0) and np.all((M >= 0) & (M <= 1))
        assert np.all(M[:5, 5] == 1 - toy.INVALID_WINS)  # every valid answer beats invalid
    cyclic = games.von_neumann_winner(toy.family_matrix("cyclic"))
    assert np.allclose(cyclic, [1 / 3, 1 / 3, 1 / 3, 0, 0, 0], atol=1e-6)  # mixed winner
    assert np.allclose(games.von_neumann_winner(toy.family_matrix("transitive")), [1, 0, 0, 0, 0, 0], atol=1e-6)
    M = toy.family_matrix("cyclic")
    assert M[0, 1] == pytest.approx(0.7) and M[1, 2] == pytest.approx(0.7) and M[2, 0] == pytest.approx(0.7)


def test_toy_judge(toy_world):
    judge = toy.ToyJudge(toy_world["world"])
    (P, scores), = judge.preferences(["Which fruit suits the picnic?"], [["apple", " pear ", "apples", "apple"]])
    M = toy.family_matrix("cyclic")
    assert scores is None
    assert np.allclose(P, M[np.ix_([0, 1, 5, 0], [0, 1, 5, 0])])
    assert P[0, 2] == pytest.approx(0.95) and P[0, 3] == 0.5
    with pytest.raises(ValueError, match="names 0"):
        judge.preferences(["Which car?"], [["a", "b"]])


def test_evaluator_rows_against_direct_computation(toy_world):
    rows = toy.evaluate([toy_world["model"], toy_world["model"]], toy_world)
    world = json.loads(Path(toy_world["world"]).read_text())
    records = [json.loads(line) for line in Path(toy_world["eval_prompts"]).read_text().splitlines()]
    dists = toy.policy_distributions(toy_world["model"], records, world)
    assert np.allclose(dists.sum(1), 1.0) and np.all(dists >= 0)
    # a policy against itself wins exactly half the time
    assert rows[0]["win_vs_pi0"] == pytest.approx(0.5) and rows[1]["win_vs_pi0"] == pytest.approx(0.5)
    expl = np.mean([np.max(np.array(world["families"][r["family"]]["matrix"]) @ p) - 0.5 for r, p in zip(records, dists)])
    assert rows[1]["exploit"] == pytest.approx(expl) and rows[1]["exploit_avg"] == pytest.approx(expl)
    assert rows[1]["invalid"] == pytest.approx(dists[:, 5].mean())
    assert len(records) >= 100
    table = toy.format_table(rows)
    assert "P(pi_t>pi_0)" in table and len(table.splitlines()) == 3


def test_metrics_split_by_family_against_loops():
    """Each metric over the cyclic and over the transitive prompts, against plain loops over
    prompts, responses and iterations (no matrix products, no shared helper)."""
    rng = np.random.default_rng(3)
    kinds = ["cyclic", "transitive", "cyclic", "cyclic", "transitive", "cyclic", "transitive"]
    matrices = [toy.family_matrix(k) for k in kinds]
    dists = [rng.dirichlet(np.ones(6) * 0.7, size=len(kinds)) for _ in range(4)]  # pi_0 .. pi_3
    rows = toy.metric_rows(dists, matrices, kinds)

    def beats(M, y, pi):  # P(y > pi)
        return sum(M[y][j] * pi[j] for j in range(6))

    for t, row in enumerate(rows):
        for kind in ("cyclic", "transitive"):
            idx = [i for i, k in enumerate(kinds) if k == kind]
            win = [sum(dists[t][i][a] * dists[0][i][b] * matrices[i][a][b] for a in range(6) for b in range(6)) for i in idx]
            expl = [max(beats(matrices[i], y, dists[t][i]) for y in range(6)) - 0.5 for i in idx]
            avg = [[sum(dists[s][i][y] for s in range(1, t + 1)) / t for y in range(6)] if t else dists[0][i] for i in idx]
            expl_avg = [max(beats(matrices[i], y, a) for y in range(6)) - 0.5 for i, a in zip(idx, avg)]
            assert row[f"win_vs_pi0_{kind}"] == pytest.approx(sum(win) / len(idx), abs=1e-12)
            assert row[f"exploit_{kind}"] == pytest.approx(sum(expl) / len(idx), abs=1e-12)
            assert row[f"exploit_avg_{kind}"] == pytest.approx(sum(expl_avg) / len(idx), abs=1e-12)
            assert row[f"invalid_{kind}"] == pytest.approx(sum(dists[t][i][5] for i in idx) / len(idx), abs=1e-12)
        # the families differ here, and the overall mean is the prompt-weighted mean of the two
        assert abs(row["exploit_cyclic"] - row["exploit_transitive"]) > 1e-3
        for name in ("win_vs_pi0", "exploit", "exploit_avg", "invalid"):
            assert row[name] == pytest.approx((4 * row[f"{name}_cyclic"] + 3 * row[f"{name}_transitive"]) / 7, abs=1e-12)


def test_effective_eta_recovers_the_multiplicative_weights_step():
    rng = np.random.default_rng(0)
    matrices = [toy.family_matrix(k) for k in ("cyclic", "transitive", "cyclic")]
    prev = rng.dirichlet(np.ones(6), size=3)
    cur = np.array([games.multiplicative_weights_step(M, p, 7.5) for M, p in zip(matrices, prev)])
    assert toy.effective_eta(matrices, prev, cur) == pytest.approx(7.5, rel=1e-9)
    assert toy.effective_eta(matrices, prev, prev) == pytest.approx(0.0, abs=1e-12)


def test_world_paths_are_where_build_world_puts_the_files(toy_world):
    root = Path(toy_world["world"]).parent
    assert toy.world_paths(root) == toy_world  # the layout the dry run prints is the one built
    assert all(Path(toy_world[k]).exists() for k in ("model", "train_prompts", "eval_prompts", "world"))
    assert toy.build_world(root) == toy_world  # built: found, not rebuilt


def test_answer_logps_with_a_shared_prompt_cache_match_whole_sequences(toy_world):
    """toy.answer_logps runs each prompt once and reuses its keys and values for the 5 answers;
    values and gradients must be those of scoring every (prompt, answer) sequence whole."""
    import torch

    from machinery.lm import collate, load_model, load_tokenizer, sequence_logps
    tok, model = load_tokenizer(toy_world["model"]), load_model(toy_world["model"])
    train, held_out = toy.make_prompts()
    records = train[::97] + held_out[::29]  # templates of different lengths: left padding matters
    prompts, answers = [r["prompt"] for r in records], [toy.FAMILIES[r["family"]][0] for r in records]
    pairs = [toy.answer_tokens(tok, p, a) for p, ans in zip(prompts, answers) for a in ans]
    assert len({len(p) for p, _ in pairs}) > 2 and len({len(r) for _, r in pairs}) > 1
    grads = []
    for logps in (lambda: sequence_logps(model, collate(pairs, tok.pad_token_id)).view(len(prompts), -1),
                  lambda: toy.answer_logps(model, tok, prompts, answers, prompts_per_forward=4)):
        model.zero_grad()
        value = logps()
        (value * torch.linspace(0.1, 1, value.numel()).view_as(value)).sum().backward()
        grads.append((value.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (whole, g_whole), (shared, g_shared) = grads
    assert whole.shape == shared.shape == (len(prompts), 5)
    assert torch.allclose(whole, shared, atol=2e-5) and whole.abs().max() > 1
    assert torch.allclose(g_whole, g_shared, rtol=1e-3, atol=1e-5 * g_whole.abs().max().item())


def test_evaluate_scores_each_model_once_and_a_changed_model_again(toy_world, tmp_path):
    import shutil

    import torch

    from machinery.lm import load_model
    mine = tmp_path / "model"
    shutil.copytree(toy_world["model"], mine)
    toy.SCORED.clear()
    first = toy.evaluate([toy_world["model"], mine], toy_world)
    assert first[1]["win_vs_pi0"] == pytest.approx(0.5) and len(toy.SCORED) == 2  # a copy of pi_0
    model = load_model(mine)
    with torch.no_grad():
        model.model.norm.weight.mul_(3.0)  # sharper: another policy in the same directory
    model.save_pretrained(mine)
    again = toy.evaluate([toy_world["model"], mine], toy_world)
    assert len(toy.SCORED) == 3 and abs(again[1]["win_vs_pi0"] - 0.5) > 1e-3  # rescored, pi_0 not


def test_sft_lr_is_constant_then_falls_linearly_to_zero(toy_world, monkeypatch):
    """The world's SFT schedule as its docstring states it: lr until step decay_from x steps, then
    a straight line to 0 (checked against that closed form), and constant with decay_from = 1."""
    import torch

    from machinery.lm import load_model, load_tokenizer
    tok = load_tokenizer(toy_world["model"])
    train, _ = toy.make_prompts()
    seen = []

    class RecordingAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            seen.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    for decay_from, expected in ((0.6, [1, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25]), (1.0, [1] * 10)):
        seen.clear()
        model = load_model(toy_world["model"])
        toy.sft_base_model(model, tok, train, steps=10, batch_prompts=2, lr=2e-3, decay_from=decay_from)
        assert seen == pytest.approx([2e-3 * f for f in expected])
