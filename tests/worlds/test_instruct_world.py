"""The instruct world (worlds/instruct.py) without generation: the split, the judge on plain and templated
prompts, the IFEval checkers offline, the loose rule. The model is the real SmolLM2-135M-Instruct."""
import json

import pytest

from machinery.lm import templated_prompt_text
from worlds import instruct


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return instruct.build_world(tmp_path_factory.mktemp("w") / "instruct", seed=0)


def read(path):
    return [json.loads(line) for line in open(path)]


def test_split_holds_out_tasks_and_types(world):
    train, held = read(world["train_prompts"]), read(world["eval_prompts"])
    assert {r["task"] for r in train}.isdisjoint(instruct.EVAL_TASKS)
    assert not any(t in instruct.UNSEEN_TYPES for r in train for t in r["instruction_id_list"])
    assert {r["split"] for r in held} == {"seen", "unseen"}
    for r in held:
        assert (r["split"] == "unseen") == any(t in instruct.UNSEEN_TYPES for t in r["instruction_id_list"])
        assert 1 <= len(r["instruction_id_list"]) <= 3 and instruct.compatible(r["instruction_id_list"])


def test_build_is_deterministic(tmp_path):
    a, b = instruct.make_prompts(seed=3), instruct.make_prompts(seed=3)
    assert a == b and instruct.make_prompts(seed=4) != a


def test_judge_reads_plain_and_templated_prompts(world):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(world["model"])
    judge = instruct.InstructJudge(world["judge_path"])
    rec = next(r for r in read(world["eval_prompts"]) if "change_case:english_lowercase" in r["instruction_id_list"])
    ys = ["all lowercase here.", "NOT Lowercase", ""]
    plain = judge.preferences([instruct.user_message(rec["prompt"])], [ys])[0]
    templ = judge.preferences([templated_prompt_text(tok, rec["prompt"])], [ys])[0]
    assert plain == templ
    P, scores = plain
    n = len(rec["instruction_id_list"])
    assert scores[2] == 0.0 and scores[0] >= 1 / n and scores[1] <= scores[0]
    for i in range(3):
        assert P[i][i] == 0.5
        for j in range(3):
            assert abs(P[i][j] + P[j][i] - 1) < 1e-12 and 0 <= P[i][j] <= 1


def test_unknown_prompt_is_an_input_error(world):
    judge = instruct.InstructJudge(world["judge_path"])
    with pytest.raises(instruct.InputError):
        judge.preferences(["a prompt the world never wrote"], [["x"]])


def test_sentence_counting_works_offline():
    reg = instruct.registry()
    inst = reg.INSTRUCTION_DICT["length_constraints:number_sentences"]("length_constraints:number_sentences")
    inst.build_description(num_sentences=3, relation="less than")
    assert inst.check_following("Dr. Smith came. He left.") and not inst.check_following("One. Two. Three. Four.")


def test_loose_accepts_a_stray_first_line():
    ids, kw = ["change_case:english_lowercase"], [{}]
    y = "Sure! Here it is:\nall lowercase text"
    assert instruct.follow_list(y, ids, kw, "p") == [False]
    assert instruct.follow_list(y, ids, kw, "p", loose=True) == [True]


def test_evaluation_of_a_policy_against_itself_with_ifbench(world, tmp_path):
    # the real model, HF sampling: pi_0 and a "pi_1" that is the same model give the same rows (the
    # evaluation's samples are paired by seed), and the run's last evaluation adds IFBench to both
    model = str(world["model"])
    rows = instruct.evaluate([model, model], world, tmp_path, max_new_tokens=16, samples=2, limit=3, final=True,
                             ifbench_limit=3)
    a, b = rows
    assert a["P_vs_pi0"] == b["P_vs_pi0"] == 0.5 and abs(b["kl_estimate"]) < 1e-3
    assert a["inst_strict_all"] == b["inst_strict_all"] and a["ifbench"] == b["ifbench"]
    bench = a["ifbench"]
    assert bench["prompts"] == 3 and 0 <= bench["inst_strict_low"] <= bench["inst_strict_high"] <= 1
    assert bench["inst_strict_low"] <= bench["inst_loose_low"] and bench["inst_strict_high"] <= bench["inst_loose_high"]
    responses = read(tmp_path / "iter0" / "ifbench_responses.jsonl")
    assert len(responses) == 3 and all(len(r["responses"]) == 1 for r in responses)
    table = instruct.format_table(rows)
    assert "IFBench pi_0" in table and "IFBench pi_1" in table
