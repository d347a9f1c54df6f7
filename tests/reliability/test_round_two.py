"""A hostile user's inputs, round two, driven through the command line as a user types them.

Each test asserts the promise (one `error:` line naming the problem, exit code 2, the user's files
intact, nothing half-written; or the warning asked for): a judge's results checked against its
prompts, work directories that are not ours refused, an output that is an input refused,
checkpoints resumed only for the same model and verified on load, a run directory's record that
covers the content of its inputs, a sweep that writes only into its own directory, training that
would do nothing refused, every check before anything is written, and one line for the tracebacks
of damaged files, bad paths, Ctrl-C and a full disk.
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SWEEP = [sys.executable, "-m", "tools.sweep"]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
SMALL_TRAIN = ["--epochs", "1", "--global_batch", "4", "--lr", "1e-4", "--eta", "10", "--max_prompt_length", "64",
               "--max_length", "96", "--lr_schedule", "constant"]
LONG = "Which fruit suits the " + "very " * 150 + "long picnic?"

JUDGES = '''
from worlds import toy
class _Base:
    def __init__(self, path): self.inner = toy.ToyJudge(path)
class Fewer(_Base):
    def preferences(self, prompts, responses): return self.inner.preferences(prompts, responses)[:-1]
class More(_Base):
    def preferences(self, prompts, responses):
        r = self.inner.preferences(prompts, responses); return r + r[:1]
class ScoresLen(_Base):
    def preferences(self, prompts, responses):
        return [(P, [0.0] * (len(P) + 3)) for P, _ in self.inner.preferences(prompts, responses)]
class PStrings(_Base):
    def preferences(self, prompts, responses):
        return [([["x"] * len(P)] * len(P), s) for P, s in self.inner.preferences(prompts, responses)]
class ReturnsNone(_Base):
    def preferences(self, prompts, responses): return None
class NoPrefs:
    def __init__(self, path): pass
'''


# ---- helpers -------------------------------------------------------------------------------------
def cli(*args, env=None, timeout=900):
    """Run a stage's command line from the repo root: python SCRIPT ARGS (or a full argv list)."""
    argv = list(args[0]) + [str(a) for a in args[1:]] if isinstance(args[0], list) else \
        [sys.executable, str(ROOT / args[0])] + [str(a) for a in args[1:]]
    return subprocess.run(argv, cwd=ROOT, env=dict(ENV, **(env or {})), capture_output=True, text=True,
                          errors="replace", timeout=timeout)


def popen(args, log, env=None):
    """A stage in a session of its own; SIGINT handled as from a terminal (a runner started in the
    background, as a shell starts it, would pass on an ignored SIGINT)."""
    argv = [sys.executable, str(ROOT / args[0])] + [str(a) for a in args[1:]]
    return subprocess.Popen(argv, cwd=ROOT, env=dict(ENV, **(env or {})), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(pred, proc, timeout=300):
    deadline = time.time() + timeout
    while not pred():
        assert proc.poll() is None, f"exited {proc.returncode} before the point the test waits for"
        assert time.time() < deadline
        time.sleep(0.05)


def kill(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def one_error(p, *needles):
    """Exit 2, no traceback, exactly one `error:` line, and it holds every needle; -> that line."""
    err = p.stderr
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if "error:" in line]
    assert p.returncode == 2, f"exit {p.returncode}\n{err[-3000:]}"
    assert len(lines) == 1, err[-3000:]
    for needle in needles:
        assert str(needle) in lines[0], f"{needle!r} not in: {lines[0]}"
    return lines[0]


def sha(path):
    path = Path(path)
    if path.is_dir():
        return {str(p.relative_to(path)): sha(p) for p in sorted(path.rglob("*")) if p.is_file()}
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def prompts(world, n=8, start=0):
    return "".join(Path(world["train_prompts"]).read_text().splitlines(keepends=True)[start:start + n])


@pytest.fixture(scope="module")
def staged(toy_world, tmp_path_factory):
    """8 prompts through generate, rank and train once: a responses file, a ranked file and a
    directory train.py wrote."""
    d = tmp_path_factory.mktemp("staged")
    (d / "p.jsonl").write_text(prompts(toy_world))
    for args in (("generate.py", "--model", toy_world["model"], "--prompts", d / "p.jsonl", "--out", d / "r.jsonl",
                  "--K", "2", "--max_new_tokens", "4"),
                 ("rank.py", "--responses", d / "r.jsonl", "--out", d / "k.jsonl", "--judge", "toy:ToyJudge",
                  "--judge_path", toy_world["world"]),
                 ("train.py", "--model", toy_world["model"], "--ranked", d / "k.jsonl", "--out", d / "m", *SMALL_TRAIN)):
        p = cli(*args)
        assert p.returncode == 0, p.stderr[-3000:]
    return d


def iterate_args(world, tmp, *extra, run_dir=None, prompt_file=None):
    if prompt_file is None:
        prompt_file = tmp / "p.jsonl"
        if not prompt_file.exists():
            prompt_file.write_text(prompts(world))
    return ["iterate.py", "--model", world["model"], "--prompts", prompt_file, "--judge", "toy:ToyJudge",
            "--judge_path", world["world"], "--preset", "toy", "--iterations", "1", "--K", "2", "--epochs", "1",
            "--max_new_tokens", "4", "--global_batch", "4", "--micro_batch", "4", "--in_process",
            "--run_dir", run_dir or tmp / "run", *extra]


# ---- 1. a judge's results are checked against its prompts ------------------------------------------
@pytest.mark.parametrize("factory,needle", [("Fewer", "results"), ("More", "results"),
                                            ("ScoresLen", "scores"), ("PStrings", "P"),
                                            ("ReturnsNone", "results"), ("NoPrefs", "preferences")])
def test_judge_plugin_results_are_checked(tmp_path, toy_world, staged, factory, needle):
    """rank.py pairs prompts and results with zip: a judge returning fewer results lost records with
    exit 0, more passed; scores of the wrong length passed; an object without preferences() ended in
    a traceback. Each must be one line naming the judge, exit 2, no output."""
    (tmp_path / "hjudge.py").write_text(JUDGES)
    p = cli("rank.py", "--responses", staged / "r.jsonl", "--out", tmp_path / "k.jsonl", "--judge",
            f"hjudge:{factory}", "--judge_path", toy_world["world"], "--batch_size", "8",
            env={"PYTHONPATH": str(tmp_path)})
    line = one_error(p, f"hjudge:{factory}")
    assert needle in line, line
    assert not (tmp_path / "k.jsonl").exists()


# ---- 2. work directories that are not ours are refused, not emptied ----------------------------------
def test_train_refuses_a_work_dir_it_did_not_make(tmp_path, toy_world, staged):
    """train.py emptied OUT.tmp/ whatever it held (a user's notes.txt went with it)."""
    (tmp_path / "m.tmp").mkdir()
    (tmp_path / "m.tmp" / "notes.txt").write_text("my notes\n")
    p = cli("train.py", "--model", toy_world["model"], "--ranked", staged / "k.jsonl", "--out", tmp_path / "m",
            *SMALL_TRAIN)
    one_error(p, str(tmp_path / "m.tmp"))
    assert (tmp_path / "m.tmp" / "notes.txt").read_text() == "my notes\n"
    assert not (tmp_path / "m").exists()


def test_generate_under_torchrun_refuses_a_shards_dir_it_did_not_make(tmp_path, toy_world):
    """generate.py under torchrun removed OUT.shards/ with the user's files in it."""
    shards = tmp_path / "r.jsonl.shards"
    shards.mkdir()
    (shards / "notes.txt").write_text("my notes\n")
    (tmp_path / "p.jsonl").write_text(prompts(toy_world, 4))
    p = cli([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             str(ROOT / "generate.py")], "--model", toy_world["model"], "--prompts", tmp_path / "p.jsonl",
            "--out", tmp_path / "r.jsonl", "--K", "2", "--max_new_tokens", "4")
    assert (shards / "notes.txt").read_text() == "my notes\n", p.stderr[-2000:]
    assert not (tmp_path / "r.jsonl").exists()
    assert p.returncode != 0  # torchrun reports a rank's exit 2 as its own failure
    assert any("error:" in line and str(shards) in line for line in p.stderr.splitlines()), p.stderr[-3000:]


# ---- 3. an output that is, or is inside, an input is refused ----------------------------------------
@pytest.mark.parametrize("case", ["generate-out-is-model-file", "generate-out-is-prompts", "rank-out-is-judge_path",
                                  "train-out-is-model", "generate-out-symlink-to-prompts"])
def test_output_that_is_an_input_is_refused(tmp_path, toy_world, staged, case):
    model = tmp_path / "model"
    shutil.copytree(toy_world["model"], model)
    (tmp_path / "p.jsonl").write_text(prompts(toy_world))
    gen = ["generate.py", "--model", model, "--prompts", tmp_path / "p.jsonl", "--K", "2", "--max_new_tokens", "4"]
    if case == "generate-out-is-model-file":
        args, guarded = gen + ["--out", model / "config.json"], model
    elif case == "generate-out-is-prompts":
        args, guarded = gen + ["--out", tmp_path / "p.jsonl"], tmp_path / "p.jsonl"
    elif case == "generate-out-symlink-to-prompts":
        (tmp_path / "link.jsonl").symlink_to(tmp_path / "p.jsonl")
        args, guarded = gen + ["--out", tmp_path / "link.jsonl"], tmp_path / "p.jsonl"
    elif case == "rank-out-is-judge_path":
        shutil.copy(toy_world["world"], tmp_path / "world.json")
        args = ["rank.py", "--responses", staged / "r.jsonl", "--out", tmp_path / "world.json", "--judge",
                "toy:ToyJudge", "--judge_path", tmp_path / "world.json"]
        guarded = tmp_path / "world.json"
    else:  # a directory train.py wrote earlier, trained from again onto itself
        shutil.rmtree(model)
        shutil.copytree(staged / "m", model)
        args = ["train.py", "--model", model, "--ranked", staged / "k.jsonl", "--out", model, *SMALL_TRAIN]
        guarded = model
    before = sha(guarded)
    p = cli(*args)
    one_error(p, "--out")
    assert sha(guarded) == before
    if case == "generate-out-symlink-to-prompts":
        assert (tmp_path / "link.jsonl").is_symlink()


# ---- 4. checkpoints: resumed only for the same model, verified on load --------------------------------
def killed_with_checkpoint(tmp_path, model, ranked):
    """train.py with a checkpoint every step, killed once one exists; -> (its args, the checkpoint dir)."""
    args = ["train.py", "--model", model, "--ranked", ranked, "--out", tmp_path / "m", "--epochs", "30",
            "--global_batch", "4", "--lr", "1e-4", "--eta", "10", "--max_prompt_length", "64", "--max_length", "96",
            "--lr_schedule", "constant", "--save_every", "1"]
    proc = popen(args, tmp_path / "killed.log")
    ckpts = lambda: sorted(p for p in (tmp_path / "m.tmp" / "ckpt").glob("step-*") if not p.name.endswith(".tmp"))
    try:
        wait_for(lambda: ckpts(), proc)
    finally:
        kill(proc)
    return args, ckpts()[-1]


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path, toy_world, staged):
    """--model changed at the same path: the old code resumed (and ended with parameters of neither run)."""
    model = tmp_path / "pi_t"
    shutil.copytree(toy_world["model"], model)
    args, ckpt = killed_with_checkpoint(tmp_path, model, staged / "k.jsonl")
    shutil.copy(staged / "m" / "model.safetensors", model / "model.safetensors")  # another pi_t, same path
    proc = popen(args, tmp_path / "rerun.log")
    t0 = time.time()
    while proc.poll() is None and "resuming from" not in (tmp_path / "rerun.log").read_text(errors="replace") \
            and time.time() - t0 < 300:
        time.sleep(0.05)
    kill(proc) if proc.poll() is None else None
    log = (tmp_path / "rerun.log").read_text(errors="replace")
    assert "resuming from" not in log, "resumed a checkpoint written for another --model"
    assert proc.returncode == 2 and "--model" in log and "Traceback" not in log, log[-3000:]


@pytest.mark.parametrize("damage", ["tensor-bytes-flipped", "tensor-file-truncated", "train_state-missing",
                                    "config-garbage"])
def test_damaged_checkpoint_is_one_clear_error(tmp_path, toy_world, staged, damage):
    args, ckpt = killed_with_checkpoint(tmp_path, toy_world["model"], staged / "k.jsonl")
    tensors = max(ckpt.glob("*.distcp"), key=lambda p: p.stat().st_size)
    if damage == "tensor-bytes-flipped":  # same size, other bytes: only a hash finds it
        data = bytearray(tensors.read_bytes())
        for i in range(len(data) // 4, len(data) // 2, 7):
            data[i] ^= 0xFF
        tensors.write_bytes(bytes(data))
    elif damage == "tensor-file-truncated":
        tensors.write_bytes(tensors.read_bytes()[:1000])
    elif damage == "train_state-missing":
        (ckpt / "train_state.pt").unlink()
    else:
        (ckpt / "config.json").write_text("{garbage")
    p = cli(*args, timeout=600)
    one_error(p, f"damaged checkpoint at {ckpt}", "delete it to start over")
    assert "--lr" not in p.stderr and "--eta" not in p.stderr


@pytest.mark.parametrize("case", ["holds-a-users-config.json", "is-the-model-dir"])
def test_iterate_refuses_a_run_dir_that_is_not_its_own(tmp_path, toy_world, case):
    """A user's directory as --run_dir: its config.json was read (a KeyError traceback) or replaced;
    --run_dir = --model wrote the run into the model's directory."""
    model = tmp_path / "model"
    shutil.copytree(toy_world["model"], model)
    if case == "holds-a-users-config.json":
        run_dir, guarded = tmp_path / "run", tmp_path / "run"
        run_dir.mkdir()
        (run_dir / "config.json").write_text('{"mine": 1}\n')
    else:
        run_dir, guarded = model, model
    before = sha(guarded)
    p = cli(*iterate_args(toy_world, tmp_path, "--model", model, run_dir=run_dir))
    one_error(p, "--run_dir")
    assert sha(guarded) == before


# ---- 5. iterate.py: the run directory's record covers the content of its inputs ------------------------
def test_iterate_does_not_train_on_a_changed_prompt_file(tmp_path, toy_world):
    """Killed after rank, re-run with another --prompts file at the same path: the old code trained on
    the old file's data (0 of the new file's prompts), exit 0."""
    args = iterate_args(toy_world, tmp_path)
    proc = popen(args, tmp_path / "first.log")
    try:
        wait_for(lambda: (tmp_path / "run" / "iter1" / "ranked.jsonl").exists(), proc)
    finally:
        kill(proc)
    (tmp_path / "p.jsonl").write_text(prompts(toy_world, 8, start=100))  # other prompts, same file
    new_ids = {json.loads(line)["id"] for line in (tmp_path / "p.jsonl").read_text().splitlines()}
    p = cli(*args)
    if p.returncode == 0:  # either redone on the new prompts ...
        ranked = tmp_path / "run" / "iter1" / "ranked.jsonl"
        assert {json.loads(line)["id"] for line in ranked.read_text().splitlines()} == new_ids
    else:  # ... or refused as another run's directory, naming --prompts
        one_error(p, "--prompts")


def test_iterate_refreshes_a_fixed_eval_prompts_file(tmp_path, toy_world):
    """Its copy of --eval_prompts was never refreshed, so a fixed file kept failing."""
    ev = tmp_path / "eval.jsonl"
    ev.write_text(json.dumps({"id": "e1", "prompt": LONG}) + "\n")
    args = iterate_args(toy_world, tmp_path, "--eval_prompts", ev, "--eval_max_new_tokens", "8")
    first = cli(*args)
    assert first.returncode == 2, first.stderr[-2000:]
    ev.write_text(prompts(toy_world, 2, start=200))  # fixed
    p = cli(*args)
    assert p.returncode == 0, p.stderr[-3000:]
    copied = (tmp_path / "run" / "eval_prompts.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in copied] == [json.loads(line)["id"] for line in ev.read_text().splitlines()]


# ---- 6. the sweep writes only into its own directory ---------------------------------------------------
def sweep_args(toy_world, out, *flags):  # cells that fail at once (a missing prompt file): only the sweep's own files
    return [SWEEP, "--out", out, *flags, "--", "--model", toy_world["model"], "--prompts", "/nonexistent/p.jsonl",
            "--judge", "toy:ToyJudge", "--preset", "toy"]


def test_sweep_refuses_a_directory_with_a_users_sweep_json(tmp_path, toy_world):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "sweep.json").write_text("my own file\n")
    p = cli(*sweep_args(toy_world, tmp_path / "out", "--grid", "eta=3", "--seeds", "0"))
    one_error(p, "sweep.json")
    assert (tmp_path / "out" / "sweep.json").read_text() == "my own file\n"


def test_second_sweep_with_another_grid_is_refused(tmp_path, toy_world):
    cli(*sweep_args(toy_world, tmp_path / "out", "--grid", "eta=3", "--seeds", "0"))
    first = (tmp_path / "out" / "sweep.json").read_text()
    p = cli(*sweep_args(toy_world, tmp_path / "out", "--grid", "lr=1e-4", "--seeds", "0"))
    one_error(p, "sweep.json")
    assert (tmp_path / "out" / "sweep.json").read_text() == first


@pytest.mark.parametrize("seeds", [""])  # "," and "0,,1" are refused today already
def test_sweep_empty_seeds_is_an_error(tmp_path, toy_world, seeds):
    p = cli(*sweep_args(toy_world, tmp_path / "out", "--grid", "eta=3", "--seeds", seeds))
    one_error(p, "--seeds")
    assert not (tmp_path / "out").exists()


# ---- 7. training that does nothing says so ------------------------------------------------------------
def test_training_without_a_nonzero_lr_step_is_not_silent(tmp_path, toy_world, staged):
    """8 prompts with the default --global_batch 64 and --warmup_ratio 0.1: one step at lr 0, so
    pi_{t+1} == pi_t, exit 0, no word. Refuse (exit 2 naming the lr), or warn with steps and lrs."""
    p = cli("train.py", "--model", toy_world["model"], "--ranked", staged / "k.jsonl", "--out", tmp_path / "m",
            "--max_prompt_length", "64", "--max_length", "96")
    if p.returncode == 2:
        one_error(p, "lr")
        assert not (tmp_path / "m").exists()
    else:
        assert p.returncode == 0, p.stderr[-3000:]
        warnings = [line for line in (p.stdout + p.stderr).splitlines() if "warning" in line.lower()]
        assert any("1 step" in w and "lr" in w and "0" in w for w in warnings), (p.stdout + p.stderr)[-3000:]


# ---- 8. every check before anything is written; an unfinished run dir takes new settings ---------------
@pytest.mark.parametrize("bad,good", [(["--K", "1"], ["--K", "2"]),
                                      (["--eval_max", "0"], ["--eval_max", "2"]),
                                      (["--eval_max_new_tokens", "500"], ["--eval_max_new_tokens", "8"]),
                                      (["--judge_path", "nope.json"], [])],
                         ids=["K-1", "eval_max-0", "eval_max_new_tokens-past-context", "judge_path-missing"])
def test_late_check_does_not_poison_the_run_dir(tmp_path, toy_world, bad, good):
    ev = tmp_path / "eval.jsonl"
    ev.write_text(prompts(toy_world, 2, start=200))
    extra = [] if bad[0] in ("--K", "--judge_path") else ["--eval_prompts", ev]
    first = cli(*iterate_args(toy_world, tmp_path, *extra, *bad))
    one_error(first, bad[0])
    run_dir = tmp_path / "run"
    assert not run_dir.exists() or not any(run_dir.iterdir()), sorted(p.name for p in run_dir.rglob("*"))
    p = cli(*iterate_args(toy_world, tmp_path, *extra, *good))
    assert p.returncode == 0, p.stderr[-3000:]


# ---- tracebacks where one line was promised (a few of the families) -----------------------------------
@pytest.mark.parametrize("damage", ["safetensors-truncated", "safetensors-empty", "config-sizes-disagree",
                                    "config-field-wrong-type", "tokenizer-ids-beyond-embedding"])
def test_damaged_model_is_one_clear_error(tmp_path, toy_world, damage):
    model = tmp_path / "model"
    shutil.copytree(toy_world["model"], model)
    weights, config = model / "model.safetensors", json.loads((model / "config.json").read_text())
    if damage == "safetensors-truncated":
        weights.write_bytes(weights.read_bytes()[:5000])
    elif damage == "safetensors-empty":
        weights.write_bytes(b"")
    elif damage == "config-sizes-disagree":
        (model / "config.json").write_text(json.dumps(dict(config, hidden_size=64, head_dim=16)))
    elif damage == "config-field-wrong-type":
        (model / "config.json").write_text(json.dumps(dict(config, num_hidden_layers="two")))
    else:
        tok = json.loads((model / "tokenizer.json").read_text())
        for word in list(tok["model"]["vocab"])[3:]:
            tok["model"]["vocab"][word] += 5000
        (model / "tokenizer.json").write_text(json.dumps(tok))
    (tmp_path / "p.jsonl").write_text(prompts(toy_world))
    p = cli("generate.py", "--model", model, "--prompts", tmp_path / "p.jsonl", "--out", tmp_path / "r.jsonl",
            "--K", "2", "--max_new_tokens", "4")
    one_error(p, "--model")
    assert not (tmp_path / "r.jsonl").exists()


@pytest.mark.parametrize("where", ["prompt", "id"])
def test_lone_surrogate_is_one_clear_error(tmp_path, toy_world, where):
    rec = '{"id": "a", "prompt": "Which fruit suits the picnic? \\ud800"}' if where == "prompt" else \
        '{"id": "\\ud800", "prompt": "Which fruit suits the picnic?"}'
    (tmp_path / "p.jsonl").write_text(rec + "\n")
    p = cli("generate.py", "--model", toy_world["model"], "--prompts", tmp_path / "p.jsonl", "--out",
            tmp_path / "r.jsonl", "--K", "2", "--max_new_tokens", "4")
    one_error(p, "p.jsonl:1", f"field '{where}'")
    assert not (tmp_path / "r.jsonl").exists()


@pytest.mark.parametrize("case", ["run_dir-is-file", "run_dir-under-file", "eval_prompts-missing",
                                  "prompts-missing", "eval_prompts-not-utf8", "eval_prompts-nested", "seed-too-large"])
def test_iterate_bad_path_or_value_is_one_clear_error(tmp_path, toy_world, case):
    (tmp_path / "f").write_text("x")
    extra, kw = [], {}
    if case == "run_dir-is-file":
        kw["run_dir"], needle = tmp_path / "f", "--run_dir"
    elif case == "run_dir-under-file":
        kw["run_dir"], needle = tmp_path / "f" / "run", "--run_dir"
    elif case == "prompts-missing":
        kw["prompt_file"], needle = tmp_path / "missing.jsonl", "missing.jsonl: file not found"
    elif case == "eval_prompts-missing":
        extra, needle = ["--eval_prompts", tmp_path / "missing.json"], "missing.json: file not found"
    elif case == "eval_prompts-not-utf8":
        (tmp_path / "e.json").write_bytes(b'[{"instruction": "caf\xe9 picnic fruit?"}]')
        extra, needle = ["--eval_prompts", tmp_path / "e.json"], "not UTF-8"
    elif case == "eval_prompts-nested":
        (tmp_path / "e.json").write_text("[" * 100000 + "]" * 100000)
        extra, needle = ["--eval_prompts", tmp_path / "e.json"], "nested too deeply"
    else:
        extra, needle = ["--seed", str(2 ** 70)], "--seed"
    p = cli(*iterate_args(toy_world, tmp_path, *extra, **kw))
    one_error(p, needle)
    assert (tmp_path / "f").read_text() == "x"


def test_train_seed_too_large_is_one_clear_error(tmp_path, toy_world, staged):
    p = cli("train.py", "--model", toy_world["model"], "--ranked", staged / "k.jsonl", "--out", tmp_path / "m",
            *SMALL_TRAIN, "--seed", str(2 ** 70))
    one_error(p, "--seed")
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.tmp").exists()


@pytest.mark.parametrize("content", ['{"grid": [["eta", ["3"]]], "seeds": [0', '{"name": "not a sweep"}\n'],
                         ids=["corrupt", "foreign"])
def test_aggregate_only_on_a_bad_sweep_json_is_one_clear_error(tmp_path, content):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "sweep.json").write_text(content)
    p = cli(SWEEP, "--out", tmp_path / "out", "--aggregate-only")
    one_error(p, "sweep.json")


def test_world_dir_that_is_a_file_is_one_clear_error(tmp_path):
    (tmp_path / "f").write_text("x")
    p = cli("iterate.py", "--preset", "toy", "--iterations", "1", "--world_dir", tmp_path / "f", "--run_dir", tmp_path / "run")
    one_error(p, "--world_dir")
    assert (tmp_path / "f").read_text() == "x"


def test_two_iterate_on_one_run_dir_one_refuses(tmp_path, toy_world):
    """The second starts while the first holds the run directory: a first run of one toy iteration
    (a second or so) could end before a second one started at the same time got to its lock, and the
    second would then rightly find the work done; 2000 epochs keep the first busy for minutes."""
    args = iterate_args(toy_world, tmp_path, "--epochs", "2000")
    a = popen(args, tmp_path / "a.log")
    try:
        wait_for(lambda: "=== iteration 1" in (tmp_path / "a.log").read_text(errors="replace"), a)
        b = popen(args, tmp_path / "b.log")
        b.wait(timeout=900)
        assert a.poll() is None, "the first run ended before the second was refused"
    finally:
        kill(a)
    log = (tmp_path / "b.log").read_text()
    assert b.returncode == 2 and "Traceback" not in log and "another iterate.py" in log, log[-2000:]


def test_ctrl_c_is_one_line(tmp_path, toy_world):
    """Ctrl-C in the middle of the work (400 prompts one at a time: seconds of work left)."""
    (tmp_path / "p.jsonl").write_text(prompts(toy_world, 400))
    proc = popen(["generate.py", "--model", toy_world["model"], "--prompts", tmp_path / "p.jsonl", "--out",
                  tmp_path / "r.jsonl", "--K", "2", "--max_new_tokens", "4", "--batch_size", "1"], tmp_path / "log")
    try:
        wait_for(lambda: "generate:" in (tmp_path / "log").read_text(errors="replace"), proc)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        kill(proc)
    log = (tmp_path / "log").read_text(errors="replace")
    assert "Traceback" not in log, log[-2000:]
    assert proc.returncode in (130, -signal.SIGINT), proc.returncode
    assert not (tmp_path / "r.jsonl").exists()


def test_disk_full_is_one_line_nothing_half_written_and_rerun_is_identical(tmp_path, toy_world, small_fs):
    (tmp_path / "p.jsonl").write_text(prompts(toy_world))
    fs = small_fs("64k")
    gen = ["generate.py", "--model", toy_world["model"], "--prompts", tmp_path / "p.jsonl", "--K", "2",
           "--max_new_tokens", "4"]
    p = cli(*gen, "--out", fs / "r.jsonl")
    one_error(p, "No space left")
    assert sorted(x.name for x in fs.iterdir()) == ["filler"]
    (fs / "filler").unlink()
    assert cli(*gen, "--out", fs / "r.jsonl").returncode == 0
    assert cli(*gen, "--out", tmp_path / "ref.jsonl").returncode == 0
    assert (fs / "r.jsonl").read_bytes() == (tmp_path / "ref.jsonl").read_bytes()
