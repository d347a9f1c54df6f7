"""Every kind of bad input is one clear error before any work: exit code 2, a line naming the
file, line and field (or the flag), and nothing written. One case per kind, run in-process
(each stage's main(argv)); CASES below lists them."""
import gzip
import json
import shutil

import pytest
import torch

import generate
import iterate
import rank
import train
from machinery.records import one_line_errors

PROMPT = {"id": "a", "prompt": "Which fruit suits the picnic?"}
RESP = dict(PROMPT, responses=["apple", "pear"], truncated=[False, False])
RANKED = dict(RESP, P=[[0.5, 0.7], [0.3, 0.5]], win_rate=[0.6, 0.4])
LONG = "Which fruit suits the " + "very " * 150 + "long picnic?"


def jl(*recs):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs)


# (case id, stage, input file content (str or bytes, or None), extra flags, expected text in the error)
# In flags, IN is the input file, OUT the output, TMP the test's directory.
CASES = [
    # ---- file content: prompts (generate.py) ----
    ("non-utf8", "generate", b'{"id": "a", "prompt": "caf\xe9"}\n', [], "in.jsonl:1: not UTF-8"),
    ("malformed-json", "generate", jl(PROMPT, '{"id": "b", "prompt": '), [], "in.jsonl:2: malformed JSON"),
    ("deeply-nested", "generate", jl(PROMPT, "[" * 100000 + "]" * 100000), [], "in.jsonl:2: malformed JSON (nested too deeply)"),
    ("nan-constant", "generate", jl('{"id": NaN, "prompt": "x"}'), [], "in.jsonl:1: malformed JSON (NaN is not valid JSON)"),
    ("huge-int", "generate", jl('{"id": ' + "9" * 5000 + ', "prompt": "x"}'), [], "in.jsonl:1: malformed JSON"),
    ("utf8-bom", "generate", b"\xef\xbb\xbf" + jl(PROMPT).encode(), [], "in.jsonl:1: malformed JSON"),
    ("not-an-object", "generate", jl(PROMPT, [1, 2]), [], "in.jsonl:2: expected a JSON object"),
    ("missing-id", "generate", jl({"prompt": "x"}), [], "in.jsonl:1: field 'id': missing"),
    ("missing-prompt", "generate", jl({"id": "a"}), [], "in.jsonl:1: field 'prompt': missing"),
    ("id-float", "generate", jl(dict(PROMPT, id=1.5)), [], "in.jsonl:1: field 'id'"),
    ("id-bool", "generate", jl(dict(PROMPT, id=True)), [], "in.jsonl:1: field 'id'"),
    ("id-null", "generate", jl(dict(PROMPT, id=None)), [], "in.jsonl:1: field 'id'"),
    ("id-duplicate", "generate", jl(PROMPT, PROMPT), [], "in.jsonl:2: field 'id': duplicate"),
    ("id-collides-as-text", "generate", jl(dict(PROMPT, id=1), dict(PROMPT, id="1")), [], "in.jsonl:2: field 'id': duplicate"),
    ("prompt-empty", "generate", jl(dict(PROMPT, prompt="")), [], "in.jsonl:1: field 'prompt': empty"),
    ("prompt-whitespace", "generate", jl(PROMPT, dict(PROMPT, id="b", prompt=" \n\t ")), [], "in.jsonl:2: field 'prompt': empty"),
    ("prompt-number", "generate", jl(dict(PROMPT, prompt=5)), [], "in.jsonl:1: field 'prompt': expected"),
    ("prompt-empty-chat", "generate", jl(dict(PROMPT, prompt=[])), [], "in.jsonl:1: field 'prompt': expected"),
    ("chat-no-content", "generate", jl(dict(PROMPT, prompt=[{"role": "user"}])), [], "in.jsonl:1: field 'prompt': expected"),
    ("chat-unknown-role", "generate", jl(dict(PROMPT, prompt=[{"role": "robot", "content": "hi"}, {"role": "user", "content": "x"}])),
     [], "in.jsonl:1: field 'prompt': message 0: unknown role 'robot'"),
    ("chat-ends-on-assistant", "generate", jl(dict(PROMPT, prompt=[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])),
     [], "in.jsonl:1: field 'prompt': the last message is a 'assistant' turn"),
    ("chat-blank-user", "generate", jl(dict(PROMPT, prompt=[{"role": "system", "content": "s"}, {"role": "user", "content": "  "}])),
     [], "in.jsonl:1: field 'prompt': the last user message is empty"),
    ("file-empty", "generate", "", [], "in.jsonl: no records"),
    ("file-blank-lines", "generate", "\n  \n\n", [], "in.jsonl: no records"),
    ("prompt-longer-than-context", "generate", jl(PROMPT, "", dict(PROMPT, id="b", prompt=LONG)), [],
     "in.jsonl:3: field 'prompt': "),
    ("ranked-scores-wrong-length", "train", jl(dict(RANKED, scores=[1.0, 2.0, 3.0])), [], "in.jsonl:1: field 'scores'"),
    # ---- file content: responses (rank.py) ----
    ("responses-missing", "rank", jl(RESP, PROMPT), [], "in.jsonl:2: field 'responses': missing"),
    ("responses-not-strings", "rank", jl(dict(RESP, responses=[1, 2])), [], "in.jsonl:1: field 'responses'"),
    ("responses-K1", "rank", jl(dict(RESP, responses=["x"], truncated=[False])), [], "in.jsonl:1: field 'responses': need K >= 2"),
    ("responses-K-mismatch", "rank", jl(RESP, dict(RESP, id="b", responses=["x", "y", "z"], truncated=[False] * 3)), [],
     "in.jsonl:2: field 'responses': K mismatch"),
    ("truncated-length", "rank", jl(dict(RESP, truncated=[False])), [], "in.jsonl:1: field 'truncated'"),
    ("truncated-not-bool", "rank", jl(dict(RESP, truncated=[0, 1])), [], "in.jsonl:1: field 'truncated'"),
    ("responses-prompt-blank", "rank", jl(dict(RESP, prompt="   ")), [], "in.jsonl:1: field 'prompt': empty"),
    # ---- file content: ranked (train.py) ----
    ("P-not-KxK", "train", jl(RANKED, dict(RANKED, id="b", P=[[0.5, 0.7, 0.1], [0.3, 0.5, 0.2]])), [], "in.jsonl:2: field 'P'"),
    ("P-above-1", "train", jl(dict(RANKED, P=[[0.5, 1.7], [-0.7, 0.5]])), [], "in.jsonl:1: field 'P': entry 1.7"),
    ("P-string", "train", jl(dict(RANKED, P=[[0.5, "0.7"], [0.3, 0.5]])), [], "in.jsonl:1: field 'P': entry '0.7'"),
    ("P-nan", "train", jl('{"id": "a", "prompt": "x", "responses": ["a", "b"], "P": [[0.5, NaN], [0.5, 0.5]], "win_rate": [0.5, 0.5]}'),
     [], "in.jsonl:1: malformed JSON (NaN is not valid JSON)"),
    ("P-not-antisymmetric", "train", jl(dict(RANKED, P=[[0.5, 0.7], [0.7, 0.5]], win_rate=[0.6, 0.6])), [],
     "in.jsonl:1: field 'P': P[0][1] + P[1][0] = 1.4"),
    ("P-diagonal", "train", jl(dict(RANKED, P=[[0.4, 0.7], [0.3, 0.5]], win_rate=[0.55, 0.4])), [],
     "in.jsonl:1: field 'P': diagonal entry [0][0] is 0.4"),
    ("win-rate-not-row-mean", "train", jl(dict(RANKED, win_rate=[0.4, 0.6])), [], "in.jsonl:1: field 'win_rate': entry 0 is 0.4"),
    ("win-rate-missing", "train", jl({k: v for k, v in RANKED.items() if k != "win_rate"}), [], "in.jsonl:1: field 'win_rate'"),
    ("win-rate-length", "train", jl(dict(RANKED, win_rate=[0.6])), [], "in.jsonl:1: field 'win_rate'"),
    ("max-length-not-above-max-prompt-length", "train", jl(RANKED), ["--max_length", "8"],
     "argument --max_length: 8 is not above --max_prompt_length 512"),
    # ---- flags and paths: generate.py ----
    ("model-missing", "generate", jl(PROMPT), ["--model", "TMP/nope/model"], "--model TMP/nope/model: directory not found"),
    ("model-empty-dir", "generate", jl(PROMPT), ["--model", "TMP"], "no config.json in it"),
    ("model-is-file", "generate", jl(PROMPT), ["--model", "IN"], "in.jsonl: not a directory"),
    ("prompts-missing", "generate", None, [], "in.jsonl: file not found"),
    ("prompts-is-dir", "generate", None, ["--prompts", "TMP"], ": not a file"),
    ("out-is-dir", "generate", jl(PROMPT), ["--out", "TMP"], "is a directory; give a file name"),
    ("out-parent-is-file", "generate", jl(PROMPT), ["--out", "IN/x.jsonl"], "in.jsonl is a file, not a directory"),
    ("K-0", "generate", jl(PROMPT), ["--K", "0"], "argument --K: expected an integer > 0, got '0'"),
    ("batch-size-0", "generate", jl(PROMPT), ["--batch_size", "0"], "argument --batch_size: expected an integer > 0"),
    ("max-new-tokens-0", "generate", jl(PROMPT), ["--max_new_tokens", "0"], "argument --max_new_tokens: expected an integer > 0"),
    ("max-new-tokens-past-context", "generate", jl(PROMPT), ["--max_new_tokens", "500"], "--max_new_tokens 500: the model takes only 128"),
    ("top-p-0", "generate", jl(PROMPT), ["--top_p", "0"], "argument --top_p: expected a number in (0, 1]"),
    ("top-p-above-1", "generate", jl(PROMPT), ["--top_p", "1.5"], "argument --top_p: expected a number in (0, 1]"),
    ("top-p-nan", "generate", jl(PROMPT), ["--top_p", "nan"], "argument --top_p: expected a number in (0, 1]"),
    ("temperature-negative", "generate", jl(PROMPT), ["--temperature", "-1"], "argument --temperature: expected a finite number >= 0"),
    ("top-k-negative", "generate", jl(PROMPT), ["--top_k", "-1"], "argument --top_k: expected an integer >= 0"),
    ("K-not-a-number", "generate", jl(PROMPT), ["--K", "five"], "argument --K: expected an integer > 0, got 'five'"),
    # ---- flags and paths: rank.py ----
    ("judge-module-missing", "rank", jl(RESP), ["--judge", "no_such_module:make"], "cannot import module 'no_such_module'"),
    ("judge-factory-missing", "rank", jl(RESP), ["--judge", "toy:NoSuchJudge"], "module 'toy' has no factory 'NoSuchJudge'"),
    ("judge-unknown", "rank", jl(RESP), ["--judge", "bogus"], "argument --judge: expected pairrm, reward or module:factory, got 'bogus'"),
    ("toy-judge-no-path", "rank", jl(RESP), ["--judge_path", None], "--judge_path None: the toy judge needs the world file"),
    ("toy-judge-path-missing", "rank", jl(RESP), ["--judge_path", "TMP/world.json"], "the toy judge needs the world file"),
    ("toy-judge-path-not-world", "rank", jl(RESP), ["--judge_path", "IN"], "not a toy world file"),
    ("rank-batch-size-0", "rank", jl(RESP), ["--batch_size", "0"], "argument --batch_size: expected an integer > 0"),
    ("rank-judge-batch-size-0", "rank", jl(RESP), ["--judge_batch_size", "0"], "argument --judge_batch_size"),
    ("responses-is-dir", "rank", None, ["--responses", "TMP"], ": not a file"),
    ("rank-out-is-dir", "rank", jl(RESP), ["--out", "TMP"], "is a directory; give a file name"),
    # ---- flags and paths: train.py ----
    ("eta-nan", "train", jl(RANKED), ["--eta", "nan"], "argument --eta: expected a finite number, got 'nan'"),
    ("eta-inf", "train", jl(RANKED), ["--eta", "inf"], "argument --eta: expected a finite number, got 'inf'"),
    ("lr-negative", "train", jl(RANKED), ["--lr", "-0.0001"], "argument --lr: expected a finite number >= 0"),
    ("epochs-0", "train", jl(RANKED), ["--epochs", "0"], "argument --epochs: expected an integer > 0"),
    ("global-batch-0", "train", jl(RANKED), ["--global_batch", "0"], "argument --global_batch: expected an integer > 0"),
    ("micro-batch-0", "train", jl(RANKED), ["--micro_batch", "0"], "argument --micro_batch: expected an integer > 0"),
    ("max-prompt-length-0", "train", jl(RANKED), ["--max_prompt_length", "0"], "argument --max_prompt_length"),
    ("warmup-ratio-above-1", "train", jl(RANKED), ["--warmup_ratio", "1.5"], "argument --warmup_ratio: expected a number in [0, 1]"),
    ("beta-0", "train", jl(RANKED), ["--beta", "0"], "argument --beta: expected a finite number > 0"),
    ("save-every-negative", "train", jl(RANKED), ["--save_every", "-1"], "argument --save_every"),
    ("train-out-is-file", "train", jl(RANKED), ["--out", "IN"], "exists and is not a directory"),
    ("train-out-not-ours", "train", jl(RANKED), ["--out", "TMP/mine"], "exists and was not written by train.py"),
    ("train-out-parent-is-file", "train", jl(RANKED), ["--out", "IN/model"], "in.jsonl is a file, not a directory"),
    ("ranked-missing", "train", None, [], "in.jsonl: file not found"),
    ("train-model-missing", "train", jl(RANKED), ["--model", "TMP/nope/model"], "directory not found"),
    ("magnet-not-given", "train", jl(RANKED), ["--loss_type", "magnet"], "--loss_type magnet: give --magnet"),
    ("magnet-missing", "train", jl(RANKED), ["--loss_type", "magnet", "--magnet", "TMP/nope"], "--magnet TMP/nope: directory not found"),
    ("tau-negative", "train", jl(RANKED), ["--tau", "-1"], "argument --tau: expected a finite number >= 0"),
    # ---- iterate.py: everything up front ----
    ("iterate-empty-slice", "iterate", jl(PROMPT, dict(PROMPT, id="b")), ["--iterations", "3"],
     "--iterations 3: more iterations than the 2 prompts"),
    ("iterate-bad-prompt-last-slice", "iterate", jl(*[dict(PROMPT, id=i) for i in range(5)], dict(PROMPT, id=5, prompt=LONG)),
     ["--iterations", "3"], "in.jsonl:6: field 'prompt': "),
    ("iterate-sources-count", "iterate", jl(PROMPT), ["--prompts", "IN,IN"], "--prompts: 2 sources for 3 iterations"),
    ("iterate-iterations-0", "iterate", jl(PROMPT), ["--iterations", "0"], "argument --iterations: expected an integer > 0"),
    ("iterate-K-0", "iterate", jl(PROMPT), ["--K", "0"], "argument --K: expected an integer > 0"),
    ("iterate-eta-nan", "iterate", jl(PROMPT), ["--eta", "nan"], "argument --eta: expected a finite number"),
    ("iterate-top-p-0", "iterate", jl(PROMPT), ["--top_p", "0"], "argument --top_p"),
    ("iterate-nproc-0", "iterate", jl(PROMPT), ["--nproc_per_node", "0"], "argument --nproc_per_node"),
    ("iterate-model-missing", "iterate", jl(PROMPT), ["--model", "TMP/nope/model"], "directory not found"),
    ("iterate-max-length-short", "iterate", jl(PROMPT), ["--max_length", "8", "--iterations", "1"],
     "argument --max_length: 8 is not above --max_prompt_length"),
    ("iterate-judge-factory-missing", "iterate", jl(PROMPT), ["--judge", "toy:NoSuchJudge"], "module 'toy' has no factory"),
    ("iterate-prompts-dir-not-dataset", "iterate", jl(PROMPT), ["--prompts", "TMP"], "not a dataset saved with save_to_disk"),
    # ---- more kinds of a hostile user's input ----
    ("chat-role-not-string", "generate", jl(dict(PROMPT, prompt=[{"role": 5, "content": "x"}])), [],
     "in.jsonl:1: field 'prompt': expected"),
    ("chat-content-list-of-parts", "generate", jl(dict(PROMPT, prompt=[{"role": "user", "content": [{"type": "text",
                                                                                               "text": "x"}]}])),
     [], "in.jsonl:1: field 'prompt': expected"),
    ("two-objects-on-one-line", "generate", jl(PROMPT)[:-1] + " " + jl(dict(PROMPT, id="b")), [],
     "in.jsonl:1: malformed JSON (Extra data"),
    ("gzip-compressed-file", "generate", gzip.compress(jl(PROMPT).encode(), mtime=0), [], "in.jsonl:1: not UTF-8"),
    ("out-is-a-directory", "generate", jl(PROMPT), ["--out", "TMP"], "is a directory; give a file name"),
    ("max-new-tokens-0", "generate", jl(PROMPT), ["--max_new_tokens", "0"], "argument --max_new_tokens"),
    ("ranked-K-differs-per-line", "train", jl(RANKED, dict(RANKED, id="b", responses=["x", "y", "z"], truncated=[False] * 3,
                                                          P=[[0.5] * 3] * 3, win_rate=[0.5] * 3)), [],
     "in.jsonl:2: field 'responses': K mismatch"),
    ("ranked-win-rate-strings", "train", jl(dict(RANKED, win_rate=["0.6", "0.4"])), [], "in.jsonl:1: field 'win_rate'"),
    ("ranked-P-flat-list", "train", jl(dict(RANKED, P=[0.5, 0.7, 0.3, 0.5])), [], "in.jsonl:1: field 'P'"),
    ("warmup-ratio-above-1", "train", jl(RANKED), ["--warmup_ratio", "1.5"], "argument --warmup_ratio"),
    ("max-prompt-length-equals-max-length", "train", jl(RANKED), ["--max_prompt_length", "96", "--max_length", "96"],
     "argument --max_length: 96 is not above --max_prompt_length 96"),
    ("iterate-unknown-flag", "iterate", jl(PROMPT), ["--learning_rate", "1e-4"], "unrecognized arguments: --learning_rate"),
    # ---- round three: no checkpoint taken on trust, the engine's limits before it starts ----
    ("model-missing-tensor", "generate", jl(PROMPT), ["--model", "TMP/model"],
     "--model TMP/model: no weight file holds model.layers.1.mlp.down_proj.weight"),
    ("train-model-missing-tensor", "train", jl(RANKED), ["--model", "TMP/model"],
     "--model TMP/model: no weight file holds model.layers.1.mlp.down_proj.weight"),
    ("iterate-model-missing-tensor", "iterate", jl(PROMPT), ["--model", "TMP/model"],
     "--model TMP/model: no weight file holds model.layers.1.mlp.down_proj.weight"),
    ("model-unknown-tensor", "generate", jl(PROMPT), ["--model", "TMP/model"],
     "model.layers.9.mlp.up_proj.weight is not a tensor of the LlamaForCausalLM"),
    ("vllm-temperature-above-2", "generate", jl(PROMPT), ["--backend", "vllm", "--temperature", "3"],
     "--temperature 3: vLLM samples at temperatures from 0.01 to 2"),
    ("iterate-vllm-temperature-above-2", "iterate", jl(PROMPT), ["--backend", "vllm", "--temperature", "3"],
     "--temperature 3: vLLM samples at temperatures from 0.01 to 2"),
    ("iterate-vllm-temperature-below-0.01", "iterate", jl(PROMPT), ["--backend", "vllm", "--temperature", "0.005"],
     "--temperature 0.005: vLLM samples at temperatures from 0.01 to 2 (or 0, greedy); it would raise this one"),
    ("iterate-greedy-identical-responses", "iterate", jl(PROMPT), ["--temperature", "0"],
     "--temperature 0: greedy decoding gives each prompt 5 identical responses"),
]


def base_args(stage, world, tmp):
    inp, out = tmp / "in.jsonl", tmp / "out" / "x"
    return {
        "generate": ["--model", world["model"], "--prompts", inp, "--out", out, "--max_new_tokens", "4"],
        "rank": ["--responses", inp, "--out", out, "--judge", "toy:ToyJudge", "--judge_path", world["world"]],
        "train": ["--model", world["model"], "--ranked", inp, "--out", out],
        "iterate": ["--model", world["model"], "--prompts", inp, "--judge", "toy:ToyJudge", "--judge_path", world["world"],
                    "--preset", "toy", "--run_dir", out],
    }[stage]


def with_flags(args, flags, tmp):
    """Override or add flags; a value None drops the flag."""
    args = list(args)
    for flag, value in zip(flags[::2], flags[1::2]):
        if value is not None:
            value = value.replace("TMP", str(tmp)).replace("IN", str(tmp / "in.jsonl"))
        if flag in args:
            at = args.index(flag)
            args[at:at + 2] = [] if value is None else [flag, value]
        elif value is not None:
            args += [flag, value]
    return [str(a) for a in args]


def snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case,stage,content,flags,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_error(tmp_path, toy_world, capsys, case, stage, content, flags, expected):
    if content is not None:
        (tmp_path / "in.jsonl").write_bytes(content if isinstance(content, bytes) else content.encode())
    if "-tensor" in case:  # a model whose files are valid but lack a tensor the architecture needs, or hold another
        from safetensors.torch import load_file, save_file
        shutil.copytree(toy_world["model"], tmp_path / "model")
        tensors = load_file(tmp_path / "model" / "model.safetensors")
        if "missing" in case:
            del tensors["model.layers.1.mlp.down_proj.weight"]
        else:
            tensors["model.layers.9.mlp.up_proj.weight"] = torch.zeros(2, 2)
        save_file(tensors, tmp_path / "model" / "model.safetensors", metadata={"format": "pt"})
    if case == "train-out-not-ours":
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "notes.txt").write_text("my notes\n")
    before = snapshot(tmp_path)
    argv = with_flags(base_args(stage, toy_world, tmp_path), flags, tmp_path)
    main = {"generate": generate.main, "rank": rank.main, "train": train.main, "iterate": iterate.main}[stage]
    with pytest.raises(SystemExit) as exit_:
        one_line_errors(lambda: main(argv))  # as `python STAGE.py` runs it
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and expected.replace("TMP", str(tmp_path)) in lines[0], err
    assert "Traceback" not in err
    assert snapshot(tmp_path) == before  # nothing written, nothing deleted
