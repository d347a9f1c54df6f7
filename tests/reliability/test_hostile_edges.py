"""A hostile user's inputs at the edges: plug-in judges whose code fails, flags that only make sense
together, a run longer than its prompts, a full disk under the world build and under train.py, and
odd but valid input that must simply work. Driven through the command line as a user types it;
the helpers are test_round_two's."""
import json
import shutil
from pathlib import Path

import pytest

from test_round_two import SMALL_TRAIN, cli, iterate_args, one_error, prompts, sha, staged  # noqa: F401 (a fixture)

MORE_JUDGES = '''
from worlds import toy
class PrefsRaise:
    def __init__(self, path): self.inner = toy.ToyJudge(path)
    def preferences(self, prompts, responses): raise ConnectionError("judge server went away")
def Raises(path):
    raise RuntimeError("judge server unreachable")
'''


# ---- a plug-in judge whose own code fails: one line naming the judge; the traceback on request --------
@pytest.mark.parametrize("module,spec,needle", [
    (MORE_JUDGES, "hj:Raises", "--judge hj:Raises: the factory raised RuntimeError: judge server unreachable"),
    (MORE_JUDGES, "hj:PrefsRaise", "--judge hj:PrefsRaise: preferences() raised ConnectionError: judge server went away"),
    ("def J(path)\n    return 1\n", "hj:J", "importing module 'hj' raised SyntaxError"),
    ("raise RuntimeError('no licence file')\n", "hj:J", "importing module 'hj' raised RuntimeError: no licence file"),
], ids=["factory-raises", "preferences-raises", "module-syntax-error", "module-raises-at-import"])
def test_plugin_judge_failure_is_one_line(tmp_path, toy_world, staged, module, spec, needle):  # noqa: F811
    (tmp_path / "hj.py").write_text(module)
    args = ["rank.py", "--responses", staged / "r.jsonl", "--out", tmp_path / "k.jsonl", "--judge", spec,
            "--judge_path", toy_world["world"]]
    p = cli(*args, env={"PYTHONPATH": str(tmp_path)})
    one_error(p, needle)
    assert not (tmp_path / "k.jsonl").exists()
    traced = cli(*args, env={"PYTHONPATH": str(tmp_path), "SPPO_TRACEBACK": "1"})  # for the plug-in's author
    assert traced.returncode == 2 and "Traceback" in traced.stderr, traced.stderr[-2000:]
    assert traced.stderr.rstrip().splitlines()[-1] == f"error: {one_error(p)[len('error: '):]}"


# ---- --iterations: bounded by the prompts, checked before the per-iteration lists are built -----------
def test_more_iterations_than_prompts_is_refused_at_once(tmp_path, toy_world):
    """--iterations 10**12 made a list per iteration and was killed by the kernel (out of memory)."""
    p = cli(*iterate_args(toy_world, tmp_path, "--iterations", str(10 ** 12)), timeout=120)
    one_error(p, f"--iterations {10 ** 12}: more iterations than the 8 prompts")
    assert not (tmp_path / "run").exists()


# ---- a full disk under the world build and under train.py ---------------------------------------------
def test_world_build_on_a_full_disk_names_the_world_and_leaves_nothing(tmp_path, small_fs):
    """The error named no file (': No space left on device') and the build's lock file stayed."""
    fs = small_fs("64k")
    p = cli("iterate.py", "--preset", "toy", "--iterations", "1", "--world_dir", fs / "w", "--run_dir", tmp_path / "run")
    one_error(p, f"error: {fs / 'w'}: No space left on device")
    assert sorted(x.name for x in fs.iterdir()) == ["filler"]


def test_train_on_a_full_disk_keeps_only_its_work_dir_and_the_rerun_gives_the_same_bytes(tmp_path, toy_world, staged,
                                                                                          small_fs):
    """A full disk while train.py saves: one line, nothing at --out, its own marked OUT.tmp/ kept (it
    holds the metrics and any checkpoint); the same command with room gives the bytes of a run that
    never failed, and leaves no OUT.tmp/."""
    fs = small_fs("4m", 3500)
    args = ["train.py", "--model", toy_world["model"], "--ranked", staged / "k.jsonl", "--out", fs / "m", *SMALL_TRAIN]
    p = cli(*args)
    one_error(p, "No space left on device", f"nothing was put in place at {fs / 'm'}")
    assert sorted(x.name for x in fs.iterdir()) == ["filler", "m.tmp"]
    assert (fs / "m.tmp" / ".sppo-work").exists()
    (fs / "filler").unlink()
    again = cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(x.name for x in fs.iterdir()) == ["m"]
    assert (fs / "m" / "model.safetensors").read_bytes() == (staged / "m" / "model.safetensors").read_bytes()


# ---- odd input that is valid: it works ------------------------------------------------------------------
def _records(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").split("\n") if line]  # newlines only


@pytest.mark.parametrize("case", ["ids-NFC-and-NFD", "id-very-long", "prompt-with-NUL", "prompt-with-raw-U+2028-and-NEL",
                                  "prompts-are-a-ranked-file", "model-through-a-symlink"])
def test_odd_but_valid_prompts_work(tmp_path, toy_world, staged, case):  # noqa: F811
    """Ids are compared as exact text (no Unicode normalisation: "café" in NFC and NFD are two ids);
    any character a JSON string holds passes through (a raw U+2028 or NEL does not end a line: files
    are split on newline bytes only); extra fields pass through."""
    model, out = toy_world["model"], tmp_path / "r.jsonl"
    recs = {"ids-NFC-and-NFD": [{"id": "caf\u00e9", "prompt": "Which fruit suits the picnic?"},
                                {"id": "cafe\u0301", "prompt": "Which tool suits the trip?"}],
            "id-very-long": [{"id": "x" * 100000, "prompt": "Which fruit suits the picnic?"}],
            "prompt-with-NUL": [{"id": "a", "prompt": "Which fruit\u0000 suits the picnic?"}],
            "prompt-with-raw-U+2028-and-NEL": [{"id": "a", "prompt": "Which fruit\u2028suits\u0085the picnic?"}]}.get(case)
    if recs is not None:
        (tmp_path / "p.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    elif case == "prompts-are-a-ranked-file":
        shutil.copy(staged / "k.jsonl", tmp_path / "p.jsonl")
    else:
        (tmp_path / "p.jsonl").write_text(prompts(toy_world, 2))
        (tmp_path / "mlink").symlink_to(model)
        model = tmp_path / "mlink"
    p = cli("generate.py", "--model", model, "--prompts", tmp_path / "p.jsonl", "--out", out, "--K", "2",
            "--max_new_tokens", "4")
    assert p.returncode == 0, p.stderr[-3000:]
    assert [r["id"] for r in _records(out)] == [r["id"] for r in _records(tmp_path / "p.jsonl")]
    p = cli("rank.py", "--responses", out, "--out", tmp_path / "k.jsonl", "--judge", "toy:ToyJudge",
            "--judge_path", toy_world["world"])
    assert p.returncode == 0, p.stderr[-3000:]


@pytest.mark.parametrize("case", ["responses-empty", "responses-without-truncated", "P-integers",
                                  "micro_batch-above-global_batch"])
def test_odd_but_valid_stage_files_work(tmp_path, toy_world, staged, case):  # noqa: F811
    """An empty response is a response (the model ended at once); `truncated` is optional; P may be
    written with integers; a micro-batch larger than the batch is the batch."""
    ranked, extra = tmp_path / "k.jsonl", []
    if case in ("responses-empty", "responses-without-truncated"):
        recs = _records(staged / "r.jsonl")
        recs = [dict(r, responses=["", ""]) for r in recs] if case == "responses-empty" else \
            [{k: v for k, v in r.items() if k != "truncated"} for r in recs]
        (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        p = cli("rank.py", "--responses", tmp_path / "r.jsonl", "--out", ranked, "--judge", "toy:ToyJudge",
                "--judge_path", toy_world["world"])
        assert p.returncode == 0, p.stderr[-3000:]
    elif case == "P-integers":
        recs = [{k: v for k, v in r.items() if k != "scores"} for r in _records(staged / "k.jsonl")]
        for r in recs:
            r.update(P=[[0.5, 1], [0, 0.5]], win_rate=[0.75, 0.25])
        ranked.write_text("".join(json.dumps(r) + "\n" for r in recs))
    else:
        shutil.copy(staged / "k.jsonl", ranked)
        extra = ["--micro_batch", "64"]
    p = cli("train.py", "--model", toy_world["model"], "--ranked", ranked, "--out", tmp_path / "m", *SMALL_TRAIN, *extra)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "m" / "train_info.json").exists()
