"""The GPU check: every line of the project that runs only on NVIDIA GPUs, in one command.

    bash setup.sh && bash tests/gpu/check.sh      # on a machine with one or more NVIDIA GPUs

What it runs, on GPU 0 (and GPUs 0-1 for the last check, with 2 or more):
  - the toy world and SmolLM2-135M-Instruct (built or converted once into the cache, on the CPU);
  - generate.py's HF backend on the GPU: Gumbel noise from CUDA generators, the same samples at two
    batch sizes (at least 95% equal: bf16 logits move slightly with the batch); rank.py on its output;
  - train.py under torchrun: FSDP2 with bf16 mixed precision, --grad_checkpointing, two micro-batches
    per step, resumable checkpoints; the same with --cpu_offload; the same killed (SIGKILL) after a
    checkpoint and run again, ending where the uninterrupted run ends;
  - vLLM on the GPU in bf16, the toy model (eager) and SmolLM2 (compiled, CUDA graphs): seeded samples
    per (seed, id, k), the kept engine reloaded with train.py's HF save against a fresh engine on it;
  - iterate.py's 3 toy iterations with --backend vllm and the stages in one process, recording the GPU
    memory in use as rank.py and train.py start (the kept engine closed before them);
  - with 2+ GPUs: train.py on 2 ranks against 1, generate.py --backend vllm on 2 ranks against 1.
It prints one row per check (check, result, seconds, peak GPU memory) and exits 1 if any failed.
Without CUDA it prints one line and exits 3, running nothing.

Expected time on one 80 GB GPU: about 4.5 minutes, estimated from the work (not yet measured): the
world build 30 s (the toy's 200 SFT steps on the CPU; nothing when cached), HF generate and rank 30 s
(three processes' start-up), the three training checks 60 s (four torchrun starts, 32 steps of a
0.37M-parameter model each), vLLM on the toy model 35 s (two eager engine starts), SmolLM2 60 s
(one start with torch.compile and CUDA graph capture), iterate.py 75 s (three eager engine starts,
12 training epochs of 272 prompts); 2 GPUs add about 45 s.
"""
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_steps import gpu_memory_used  # noqa: E402
NO_CUDA = 3  # the exit code without CUDA: nothing was checked
PY = sys.executable
STEPS = str(ROOT / "tests" / "gpu" / "gpu_steps.py")
TORCHRUN = [PY, "-m", "torch.distributed.run", "--standalone"]
# the toy world's training settings (flags.PRESETS["toy"]) on 64 prompts: 8 prompts per step in two
# micro-batches (the no-sync accumulation path), 32 steps
TRAIN = ["--eta", "10", "--lr", "1e-4", "--lr_schedule", "constant", "--epochs", "4", "--global_batch", "8",
         "--micro_batch", "4", "--max_prompt_length", "64", "--max_length", "96", "--grad_checkpointing",
         "--save_every", "2"]


class Kill:
    """A command killed with SIGKILL (its whole process group: torchrun and its ranks) once ready() is true."""

    def __init__(self, argv, ready):
        self.argv, self.ready = argv, ready


def checkpoint_at(out: Path, step: int):
    """ready(): train.py writing `out` has a complete checkpoint of `step` or later."""
    from machinery.checkpoint import latest_checkpoint

    def ready():
        latest = latest_checkpoint(out.with_name(out.name + ".tmp") / "ckpt")
        return latest is not None and int(latest.name.split("-")[1]) >= step
    return ready


class Check:
    def __init__(self, name, commands, verify):
        self.name, self.commands, self.verify = name, commands, verify


def toy_paths():
    import iterate
    from worlds import toy
    return toy.world_paths(iterate.default_world_dir("toy", 0))


def checks(work: Path, gpus: int):
    """The checks in order, each its commands (argv lists, or Kill) and a verify() -> detail that raises
    AssertionError on failure. Nothing runs here: tests read the commands on a CPU."""
    from worlds import instruct
    toy, smol = toy_paths(), instruct.world_paths(work)["model"]
    prompts, smol_prompts, ranked = work / "toy_prompts.jsonl", work / "smol_prompts.jsonl", work / "ranked.jsonl"
    model = str(toy["model"])

    def generate(out, *extra, launcher=(PY,)):
        return [*launcher, "generate.py", "--model", model, "--prompts", str(prompts), "--out", str(work / out),
                "--K", "4", "--max_new_tokens", "8", "--seed", "5", *extra]

    def train(out, *extra, nproc=1):
        return [*TORCHRUN, f"--nproc_per_node={nproc}", "train.py", "--model", model, "--ranked", str(ranked),
                "--out", str(work / out), *TRAIN, *extra]

    result = [
        Check("worlds: the toy world, SmolLM2 converted, prompt files", [[PY, STEPS, "prepare", "--dir", str(work)]],
              lambda: f"{len(read(prompts))} toy prompts, {len(read(smol_prompts))} SmolLM2 prompts"),
        Check("generate.py HF on cuda:0 (Gumbel noise from CUDA generators) at 2 batch sizes; rank.py",
              [generate("hf_a.jsonl", "--batch_size", "64"), generate("hf_b.jsonl", "--batch_size", "7"),
               [PY, "rank.py", "--responses", str(work / "hf_a.jsonl"), "--out", str(ranked), "--judge", "toy:ToyJudge",
                "--judge_path", str(toy["judge_path"])]],
              lambda: agreement(work / "hf_a.jsonl", work / "hf_b.jsonl", 0.95)),
        Check("train.py: torchrun, FSDP2, bf16 mixed precision, --grad_checkpointing, checkpoints", [train("t1")],
              lambda: trained(work / "t1", model)),
        Check("train.py --cpu_offload", [train("t_offload", "--cpu_offload")],
              lambda: close_to(work / "t_offload", work / "t1", model, 0.1)),
        Check("train.py killed (SIGKILL) after its second checkpoint, then run again",
              [Kill(train("t_killed"), checkpoint_at(work / "t_killed", 4)), train("t_killed")],
              lambda: resumed(work / "t_killed") + "; " + close_to(work / "t_killed", work / "t1", model, 0.05)),
        Check("vLLM, toy model, bf16: seeded samples; kept engine reloaded with train.py's save = a fresh engine",
              [[PY, STEPS, "samples", "--model", model, "--reload", str(work / "t1"), "--prompts", str(prompts),
                "--out", str(work / "vllm_toy.json"), "--enforce_eager"]],
              lambda: engine_samples(work / "vllm_toy.json", reload=True)),
        Check("vLLM, SmolLM2-135M-Instruct, bf16, torch.compile and CUDA graphs",
              [[PY, STEPS, "samples", "--model", str(smol), "--prompts", str(smol_prompts), "--out",
                str(work / "vllm_smol.json"), "--K", "2", "--max_new_tokens", "32", "--temperature", "0.7"]],
              lambda: engine_samples(work / "vllm_smol.json")),
        Check("iterate.py: 3 toy iterations, --backend vllm, stages in process (engine closed before rank/train)",
              [[PY, STEPS, "iterate", "--record", str(work / "iterate_memory.json"), "--", "--backend", "vllm",
                "--in_process", "--enforce_eager", "--run_dir", str(work / "iterate"),
                "--world_dir", str(Path(toy["model"]).parent)]],
              lambda: iterated(work / "iterate", work / "iterate_memory.json")),
    ]
    if gpus >= 2:
        result.append(Check(
            "2 ranks against 1: train.py (FSDP2 over 2 GPUs), generate.py --backend vllm",
            [train("t_2ranks", nproc=2), generate("vllm_1.jsonl", "--backend", "vllm", "--enforce_eager"),
             generate("vllm_2.jsonl", "--backend", "vllm", "--enforce_eager", launcher=(*TORCHRUN, "--nproc_per_node=2"))],
            lambda: close_to(work / "t_2ranks", work / "t1", model, 0.1) + "; "
            + agreement(work / "vllm_1.jsonl", work / "vllm_2.jsonl", 0.9)))
    return result


# ---- what each check verifies ----------------------------------------------------------------------


def read(path):
    from machinery.records import read_records
    return read_records(path)


def agreement(a, b, least):
    ra, rb = {r["id"]: r["responses"] for r in read(a)}, {r["id"]: r["responses"] for r in read(b)}
    assert ra.keys() == rb.keys(), f"{b.name}: other ids than {a.name}"
    pairs = [(x, y) for i in ra for x, y in zip(ra[i], rb[i])]
    share = sum(x == y for x, y in pairs) / len(pairs)
    # bf16 logits depend slightly on the batch a row shares (its shapes, its padding): a near tie can
    # flip a sample, so not all need be equal; a generator not fixed per (seed, id, k) flips most
    assert share >= least, f"only {share:.1%} of the samples equal between {a.name} and {b.name}"
    return f"{share:.1%} of {len(pairs)} samples equal"


def weights(path):
    from safetensors.torch import load_file
    state = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(f))
    return {k: v.double() for k, v in state.items()}


def trained(out, base):
    from transformers import AutoModelForCausalLM
    info = json.loads((out / "train_info.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert info["steps"] == len(metrics) and all(math.isfinite(m["loss"]) for m in metrics), "missing or non-finite steps"
    AutoModelForCausalLM.from_pretrained(out)
    moved = distance(out, base)
    assert moved > 0, "training left the model unchanged"
    return f"{len(metrics)} steps, loss {metrics[0]['loss']:.3g} -> {metrics[-1]['loss']:.3g}, ||change|| {moved:.3g}"


def distance(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys(), f"{a} and {b} hold other tensors"
    return math.sqrt(sum(float((wa[k] - wb[k]).pow(2).sum()) for k in wa))


def close_to(out, reference, base, most):
    """out ends near the reference run: their distance against how far training moved the reference
    (bitwise equality is not expected: CUDA's atomic adds, bf16, another reduction order)."""
    ratio = distance(out, reference) / distance(reference, base)
    assert ratio <= most, f"{out.name} is {ratio:.3g} of the training step away from {reference.name} (at most {most})"
    return f"{out.name} vs {reference.name}: {ratio:.2g} of the change"


def resumed(out):
    info = json.loads((out / "train_info.json").read_text())
    assert info["resumed_from_step"], "the second run did not resume from a checkpoint"
    return f"resumed from step {info['resumed_from_step']}"


def engine_samples(path, reload=False):
    r = json.loads(Path(path).read_text())
    assert r["dtype"] == "bfloat16", r["dtype"]
    assert r["reversed_equal"], "the same requests in another order gave other samples"
    assert r["subset_agreement"] >= 0.9, f"a subset's samples: only {r['subset_agreement']:.0%} equal"
    assert r["distinct"] > 1, "every sample equal: not sampling"
    if reload:
        assert r["reload_equal"], "the kept engine, reloaded, samples otherwise than a fresh engine on the same save"
    return (f"{r['requests']} requests, reversed equal, subset {r['subset_agreement']:.0%} equal"
            + (", reload = fresh" if reload else ""))


def iterated(run_dir, record):
    rows = json.loads((run_dir / "eval.json").read_text())
    assert len(rows) == 4, f"{len(rows)} rows in eval.json, expected pi_0 .. pi_3"
    seen = json.loads(record.read_text())["memory_at_rank_and_train"]
    assert len(seen) == 6, f"{len(seen)} rank/train starts recorded, expected 6"
    worst = max(used / total for gpus in seen for used, total in gpus[:1])
    assert worst < 0.5, f"GPU 0 was {worst:.0%} full as a rank or train stage started: the engine was kept"
    return f"pi_3 exploitability {rows[-1]['exploit']:.3f}; GPU 0 at most {worst:.0%} used at rank/train"


# ---- running them -----------------------------------------------------------------------------------


class PeakGpuMemory:
    """The most memory in use on any GPU while the block runs (nvidia-smi, every 0.2 s), in GiB."""

    def __enter__(self):
        self.peak, self.done = 0, threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()
        return self

    def poll(self):
        while not self.done.wait(0.2):
            self.peak = max([self.peak] + [used for used, _ in gpu_memory_used()])

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


def run(command, log):
    """Run one command (its output to `log`); a Kill is killed when its path appears."""
    argv = command.argv if isinstance(command, Kill) else command
    log.write(f"\n+ {' '.join(map(str, argv))}\n")
    log.flush()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    if isinstance(command, Kill):
        while proc.poll() is None and not command.ready():
            time.sleep(0.02)
        assert proc.poll() is None, f"{argv[argv.index('--out') + 1]}: finished before its checkpoint, nothing to kill"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return
    if proc.wait():
        script = next((Path(str(a)).name for a in argv if str(a).endswith(".py")), argv[0])
        raise AssertionError(f"{script} exited {proc.returncode} (its output: check.log)")


def gpu_count():
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # NVML: no CUDA context in this process
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def main():
    gpus = gpu_count()
    if not gpus:
        print("no CUDA device (torch.cuda.is_available() is False): the GPU check needs an NVIDIA GPU; nothing was run")
        sys.exit(NO_CUDA)
    work = Path(os.environ.get("SPPO_GPU_CHECK_DIR", ROOT / "runs" / "gpu-check")).resolve()
    if work.exists():  # a directory is replaced only if an earlier check made it
        if any(work.iterdir()) and not (work / "check.log").exists():
            sys.exit(f"error: SPPO_GPU_CHECK_DIR {work}: not empty and not made by the GPU check; give another")
        import shutil
        shutil.rmtree(work)
    work.mkdir(parents=True)
    rows, failed = [], 0
    with open(work / "check.log", "w") as log:
        for check in checks(work, gpus):
            t0 = time.time()
            with PeakGpuMemory() as memory:
                try:
                    for command in check.commands:
                        run(command, log)
                    result, detail = "ok", check.verify()
                except (AssertionError, OSError, ValueError, KeyError) as e:
                    result, detail, failed = "FAILED", str(e) or type(e).__name__, failed + 1
            rows.append((check.name, result, time.time() - t0, memory.peak / 1024, detail))
            print(f"{result:6} {rows[-1][2]:6.1f} s  {check.name}: {detail}", flush=True)
    width = max(len(r[0]) for r in rows)
    print(f"\n{'check':{width}}  result  seconds  peak GPU GiB  detail")
    for name, result, seconds, peak, detail in rows:
        print(f"{name:{width}}  {result:6}  {seconds:7.1f}  {peak:12.1f}  {detail}")
    print(f"\n{len(rows) - failed} of {len(rows)} checks passed on {gpus} GPU(s) in {sum(r[2] for r in rows):.0f} s; "
          f"commands and output: {work / 'check.log'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
