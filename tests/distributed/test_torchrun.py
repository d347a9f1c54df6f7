"""The stages under torchrun (CPU processes, gloo): same results as one process, resume after a kill.

Every multi-process run here is a real `python -m torch.distributed.run --standalone
--nproc_per_node=2` launch of the stage script on a tiny random Llama built in a temporary dir.
Single-process references run inside the test process (no launch: imports cost ~7 s), with one
thread, as each torchrun rank has.
"""
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from machinery.launch import shard_of
from processes import in_process, process_tree
from machinery.records import InputError, read_records, write_records

ROOT = Path(__file__).resolve().parents[2]
WORDS = ["apple", "pear", "plum", "fig", "the", "a", "and", "with", "or", "fruit", "party"]
TIMEOUT = 300  # seconds: a hang fails the test instead of blocking CI


# ---- a tiny world: a random Llama with its tokenizer, and ranked data -----------------------------


def ranked_records(n, K, equal, seed=0):
    """Prompts and responses of words that are one token each (" apple"): with equal=True every
    (prompt, response) sequence has the same length, so no batch has padding."""
    rng = random.Random(seed)

    def words(k):
        return " " + " ".join(rng.choice(WORDS) for _ in range(k))
    records = []
    for i in range(n):
        P = [[0.5] * K for _ in range(K)]
        for a in range(K):
            for b in range(a + 1, K):
                P[a][b] = rng.random()
                P[b][a] = 1.0 - P[a][b]
        records.append({"id": i, "prompt": words(4 if equal else rng.randint(1, 8)),
                        "responses": [words(5 if equal else rng.randint(1, 12)) for _ in range(K)],
                        "P": P, "win_rate": [sum(row) / K for row in P]})
    return records


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from worlds import toy
    from transformers import LlamaConfig, LlamaForCausalLM
    root = tmp_path_factory.mktemp("dist")
    corpus = ["the apple and the pear with a plum or a fig", "which fruit suits the party"] * 30
    tok = toy.train_tokenizer(corpus, root / "model")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    for name, equal in (("equal", True), ("unequal", False)):
        write_records(root / f"{name}.jsonl", ranked_records(23, 4, equal))
    from machinery.lm import prompt_token_ids, response_token_ids
    lengths = {len(prompt_token_ids(tok, r["prompt"]) + response_token_ids(tok, y, False))
               for r in read_records(root / "equal.jsonl", "ranked") for y in r["responses"]}
    assert len(lengths) == 1, lengths  # the "equal" data really has no padding
    return {"root": root, "model": root / "model", "runs": {}}


def launch(script, *args, nproc=1, env=None, popen=False):
    """Run a stage: plain python for one process, torchrun for several; OMP_NUM_THREADS=1 either way."""
    cmd = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                               f"--nproc_per_node={nproc}"]
    cmd += [str(ROOT / script), *map(str, args)]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                    PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests" / "fixtures"), str(Path(__file__).parent)]), **(env or {}))
    if popen:  # its own session, so the test can find and kill the whole tree
        return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=TIMEOUT)


# 23 prompts, global batch 7 = 4 + 3 per rank (one weight-0 padding example), micro-batch 3 (gradient
# accumulation over 2 forwards), a last batch of 2, grad clipping on, RMSprop, a checkpoint every 2 steps
TRAIN = ["--eta", "10", "--optimizer", "rmsprop", "--lr", "1e-3", "--lr_schedule", "constant", "--warmup_ratio", "0.1",
         "--global_batch", "7", "--micro_batch", "3", "--grad_clip", "1.0", "--max_length", "64", "--max_prompt_length", "32",
         "--save_every", "2"]
EPOCHS = {"equal": 2, "unequal": 4}


def train_args(tiny, data, out):
    return ["--model", tiny["model"], "--ranked", tiny["root"] / f"{data}.jsonl", "--out", out,
            "--epochs", EPOCHS[data], *TRAIN]


def trained(tiny, data, nproc, *extra):
    """Output dir of a training run, run once per module."""
    import train
    key = (data, nproc, extra)
    if key not in tiny["runs"]:
        out = tiny["root"] / f"train-{data}-{nproc}{''.join(extra)}"
        if nproc == 1:
            in_process(train.main, *train_args(tiny, data, out), *extra)
        else:
            res = launch("train.py", *train_args(tiny, data, out), *extra, nproc=nproc)
            assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
        tiny["runs"][key] = out
    return tiny["runs"][key]


def params(model_dir):
    return load_file(str(Path(model_dir) / "model.safetensors"))


def max_diff(a, b):
    assert sorted(a) == sorted(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def metrics(model_dir):
    return [json.loads(line) for line in (Path(model_dir) / "metrics.jsonl").read_text().splitlines()]


# ---- 1. FSDP2 on 2 processes = one process on the same global batch ---------------------------------


@pytest.mark.parametrize("data", ["equal", "unequal"])
def test_two_processes_match_one(tiny, data):
    one = trained(tiny, data, 1)
    # the equal-length run also checkpoints activations: it must not change the numbers
    two = trained(tiny, data, 2, *(["--grad_checkpointing"] if data == "equal" else []))
    base, p1, p2 = params(tiny["model"]), params(one), params(two)
    assert min((p1[k] - base[k]).abs().max().item() for k in base) > 1e-3  # every tensor trained
    assert max_diff(p1, p2) < 1e-4
    # the logged loss and pre-clip gradient norm agree too: a loss normalised per rank, or off by a
    # constant factor (to which RMSprop and clipping are blind), would show here
    m1, m2 = metrics(one), metrics(two)
    assert [m["step"] for m in m1] == [m["step"] for m in m2] == list(range(1, 4 * EPOCHS[data] + 1))
    for key in ("loss", "grad_norm"):  # step 1: same parameters, so the same numbers up to rounding
        assert math.isclose(m1[0][key], m2[0][key], rel_tol=1e-5), (key, m1[0][key], m2[0][key])
    for a, b in zip(m1, m2):  # later, the tiny parameter differences show in the summed log-ratios
        for key in ("loss", "grad_norm", "logratio_chosen", "logratio_rejected", "target_chosen", "target_rejected"):
            assert math.isclose(a[key], b[key], rel_tol=1e-3, abs_tol=1e-3), (a["step"], key, a[key], b[key])
        assert a["tokens"] == b["tokens"]  # the weight-0 padding example of a rank is not counted
    assert not Path(f"{two}.tmp").exists()  # the work dir and its checkpoints are gone once the model is in place


def test_magnet_on_two_processes_matches_one(tiny):
    """--loss_type magnet: each rank scores its share with a whole copy of pi_0 (train.magnet_pass), so
    two processes end where one does; pi_0 is here another model than --model, so the gap is not 0."""
    import train
    runs = {}
    for nproc in (1, 2):
        out = tiny["root"] / f"magnet-{nproc}"
        argv = [*train_args(tiny, "unequal", out), "--loss_type", "magnet", "--tau", "0.3",
                "--magnet", trained(tiny, "equal", 1)]
        if nproc == 1:
            in_process(train.main, *argv)
        else:
            res = launch("train.py", *argv, nproc=2)
            assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
        runs[nproc] = params(out)
    assert max_diff(runs[1], runs[2]) < 1e-4
    assert max_diff(runs[1], params(trained(tiny, "unequal", 1))) > 1e-3  # the magnet changed the steps


# ---- 2. a run killed by SIGKILL resumes and ends where an uninterrupted run ends -------------------


def test_killed_run_resumes_to_the_same_parameters(tiny, capsys):
    out = tiny["root"] / "killed"
    ckpt_dir = Path(f"{out}.tmp") / "ckpt"
    proc = launch("train.py", *train_args(tiny, "unequal", out), nproc=2, popen=True)
    deadline = time.time() + TIMEOUT
    while not (ckpt_dir / f"step-{2:08d}").exists():  # the first checkpoint of 16 steps
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.005)
    for pid in process_tree(proc.pid):  # the launcher and both ranks, at once, no clean-up
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert not out.exists(), "the run finished before it was killed"
    killed_at = int(sorted(p.name for p in ckpt_dir.glob("step-*") if not p.name.endswith(".tmp"))[-1][5:])
    assert 2 <= killed_at < 16

    # another run's flags (here: 1 process instead of 2, another lr) never resume this checkpoint
    import train
    with pytest.raises(SystemExit) as exit_:
        in_process(train.main, *train_args(tiny, "unequal", out), "--lr", "2e-3")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "checkpoint of a different run" in err, err[-2000:]
    assert "lr: checkpoint 0.001, now 0.002" in err and "world_size: checkpoint 2, now 1" in err

    res = launch("train.py", *train_args(tiny, "unequal", out), nproc=2)  # the same command again
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming from {ckpt_dir}" in res.stdout and f"at step {killed_at} of 16" in res.stdout
    assert max_diff(params(out), params(trained(tiny, "unequal", 2))) < 1e-6  # in practice bit for bit
    assert max_diff(params(out), params(trained(tiny, "unequal", 1))) < 1e-4
    assert [m["step"] for m in metrics(out)] == list(range(1, 17))
    info = json.loads((out / "train_info.json").read_text())
    assert info["resumed_from_step"] == killed_at and info["world_size"] == 2


def test_bad_input_stops_every_rank(tiny, tmp_path):
    src = tmp_path / "ranked.jsonl"
    good = ranked_records(2, 2, equal=False)
    src.write_text(json.dumps(good[0]) + "\n" + json.dumps(dict(good[1], P=[[0.5, 1.5], [-0.5, 0.5]])) + "\n")
    res = launch("train.py", "--model", tiny["model"], "--ranked", src, "--out", tmp_path / "m", nproc=2)
    assert res.returncode != 0
    assert f"error: {src}:2: field 'P'" in res.stderr  # and the launch returned: no rank hangs
    assert not (tmp_path / "m").exists()
    # torchrun itself exits 1 when a rank fails (its convention, not ours); the ranks exit 2, and their
    # line comes before torchrun's summary. Here with no prompts at all, for generate.py
    (tmp_path / "empty.jsonl").write_text("\n")
    res = launch("generate.py", "--model", tiny["model"], "--prompts", tmp_path / "empty.jsonl", "--out",
                 tmp_path / "r.jsonl", nproc=2)
    assert res.returncode == 1 and "exitcode  : 2" in res.stderr, res.stderr[-3000:]
    first = res.stderr.index(f"error: {tmp_path / 'empty.jsonl'}: no records")
    assert first < res.stderr.index("Traceback") and "Traceback" not in res.stderr[:first]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl", "ranked.jsonl"]


# ---- 3. generate and rank on 7 prompts over 2 processes = one process, record for record -----------


class LengthJudge:
    """A deterministic judge for these tests: longer responses win, P = sigmoid(length difference / 4).

    `path` is a log file: each judged prompt is appended, so a test can see what was redone.
    With FAIL_ON=<prompt> in the environment it waits a moment (the other rank finishes its shard)
    and then fails on that prompt, as a crash would.
    """

    def __init__(self, path):
        self.path = Path(path)

    def preferences(self, prompts, responses):
        with open(self.path, "a") as f:
            f.writelines(p + "\n" for p in prompts)
        if os.environ.get("FAIL_ON") in prompts:
            time.sleep(3)
            raise InputError(f"judge failed on {os.environ['FAIL_ON']!r}")
        return [([[1.0 / (1.0 + math.exp((len(b) - len(a)) / 4)) for b in ys] for a in ys], [len(a) for a in ys])
                for ys in responses]


PROMPTS = [{"id": f"p{i}", "prompt": " ".join(WORDS[:1 + (3 * i) % len(WORDS)]), "extra": i} for i in range(7)]


def test_shard_of_covers_every_record_once():
    for n in range(0, 20):
        for world in range(1, 9):
            shards = [shard_of(list(range(n)), r, world) for r in range(world)]
            assert sum(shards, []) == list(range(n))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_generate_and_rank_sharded_equal_single(tiny, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    write_records(prompts, PROMPTS)
    gen = ["--model", tiny["model"], "--prompts", prompts, "--K", "3", "--max_new_tokens", "6",
           "--batch_size", "2", "--seed", "5"]
    import generate
    import rank
    in_process(generate.main, *gen, "--out", tmp_path / "responses1.jsonl")
    res = launch("generate.py", *gen, "--out", tmp_path / "responses2.jsonl", nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    one, two = (read_records(tmp_path / f"responses{n}.jsonl", "responses", K=3) for n in (1, 2))
    assert one == two and [r["id"] for r in two] == [p["id"] for p in PROMPTS]
    assert len({y for r in one for y in r["responses"]}) > 3  # it really sampled

    log = tmp_path / "judged.txt"
    judge = ["--responses", tmp_path / "responses1.jsonl", "--judge", "test_torchrun:LengthJudge", "--judge_path", log]
    in_process(rank.main, *judge, "--out", tmp_path / "ranked1.jsonl")
    # rank 1 (prompts p3..p6) crashes on p5 after rank 0 wrote its shard: every rank exits, non-zero
    log.unlink()
    out = tmp_path / "ranked2.jsonl"
    res = launch("rank.py", *judge, "--out", out, nproc=2, env={"FAIL_ON": PROMPTS[5]["prompt"]})
    assert res.returncode != 0 and "judge failed on" in res.stderr and not out.exists()
    assert len(list(Path(f"{out}.shards").glob("*-00000-of-00002.jsonl"))) == 1
    # the same command again judges only the unfinished shard
    log.unlink()
    res = launch("rank.py", *judge, "--out", out, nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(log.read_text().splitlines()) == sorted(p["prompt"] for p in PROMPTS[3:])
    assert read_records(out, "ranked") == read_records(tmp_path / "ranked1.jsonl", "ranked")
    assert not Path(f"{out}.shards").exists()


# ---- 4. two nodes on one machine: two launchers, --nnodes=2, c10d rendezvous on 127.0.0.1 ---------------


def launch_two_nodes(script, *args):
    """The README's 2-node command, both nodes here: one process per node, rendezvous on a free port."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests" / "fixtures"), str(Path(__file__).parent)]))
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
                               "--nproc_per_node=1", "--rdzv_id=sppo-test", "--rdzv_backend=c10d",
                               f"--rdzv_endpoint=127.0.0.1:{port}", str(ROOT / script), *map(str, args)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in (0, 1)]
    outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]


def test_two_nodes_on_one_machine(tiny, tmp_path):
    out = tmp_path / "model"
    launch_two_nodes("train.py", *train_args(tiny, "unequal", out))
    # 2 nodes x 1 process is the same world of 2 as 2 processes on one node: the same reduction order
    assert max_diff(params(out), params(trained(tiny, "unequal", 2))) < 1e-6
    assert max_diff(params(out), params(trained(tiny, "unequal", 1))) < 1e-4  # the parity of test 1
    assert json.loads((out / "train_info.json").read_text())["world_size"] == 2

    prompts = tmp_path / "prompts.jsonl"
    write_records(prompts, PROMPTS)
    gen = ["--model", tiny["model"], "--prompts", prompts, "--K", "3", "--max_new_tokens", "6", "--seed", "5"]
    import generate
    import rank
    in_process(generate.main, *gen, "--out", tmp_path / "responses1.jsonl")
    launch_two_nodes("generate.py", *gen, "--out", tmp_path / "responses2.jsonl")
    assert (tmp_path / "responses1.jsonl").read_bytes() == (tmp_path / "responses2.jsonl").read_bytes()
    judge = ["--responses", tmp_path / "responses1.jsonl", "--judge", "test_torchrun:LengthJudge",
             "--judge_path", tmp_path / "judged.txt"]
    in_process(rank.main, *judge, "--out", tmp_path / "ranked1.jsonl")
    launch_two_nodes("rank.py", *judge, "--out", tmp_path / "ranked2.jsonl")
    assert (tmp_path / "ranked1.jsonl").read_bytes() == (tmp_path / "ranked2.jsonl").read_bytes()
    assert not list(tmp_path.glob("*.shards")) and not list(tmp_path.glob(".*tmp*"))


# ---- 5. gradients reduced at every micro-batch or once per step: the same training ------------------


def test_reducing_every_micro_batch_trains_the_same(tiny):
    """2 micro-batches per rank and step: with --reduce_every_micro_batch FSDP2 reduce-scatters each
    one's gradient (no unsharded accumulator, fsdp.unsharded_grad_fits); only the order of the fp32
    additions differs from the default here (one reduction per step)."""
    once = trained(tiny, "unequal", 2, "--no-reduce_every_micro_batch")
    every = trained(tiny, "unequal", 2, "--reduce_every_micro_batch")
    base, p1, p2 = params(tiny["model"]), params(once), params(every)
    assert min((p1[k] - base[k]).abs().max().item() for k in base) > 1e-3  # every tensor trained
    # step 1's gradient is the same up to fp32 rounding; 16 RMSprop steps later the parameters differ by
    # ~3e-6, a fraction of one step (RMSprop moves each parameter by up to ~lr = 1e-3 a step)
    m1, m2 = metrics(once), metrics(every)
    assert math.isclose(m1[0]["grad_norm"], m2[0]["grad_norm"], rel_tol=1e-6), (m1[0], m2[0])
    assert max_diff(p1, p2) < 2e-5
    assert max_diff(p2, params(trained(tiny, "unequal", 1))) < 1e-4  # the parity of test 1
