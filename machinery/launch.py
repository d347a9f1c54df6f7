"""The launch side: which process this is, its share of the work, and how iterate.py starts a stage.

Every stage runs as one plain process or under torchrun; it reads RANK / WORLD_SIZE / LOCAL_RANK
from the environment (`dist_env`), as nanoGPT does. generate.py and rank.py split their records
over the ranks and merge the shards (`run_sharded`); every rank exits when its launcher is gone
(`watch_launcher`). iterate.py starts each stage in its own process (which dies with iterate.py:
lifetime.py), under torchrun, or in its own process's interpreter (`run_stage`), and logs the
stage's wall time and peak memory.
"""
import gc
import hashlib
import importlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from machinery.lifetime import dies_with_this_process
from machinery.records import InputError, atomic_write, make_work_dir, one_line_errors, pid_alive, write_records


def dist_env():
    """(rank, world size, local rank) of this process, from torchrun's environment variables."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def shard_of(records, rank, world):
    """Contiguous slice `rank` of `world` near-equal slices: each record in exactly one, order kept.

    Any number of records over any world size: sizes differ by at most one; a slice may be empty.
    """
    bounds = [len(records) * r // world for r in range(world + 1)]
    return records[bounds[rank]:bounds[rank + 1]]


def shard_path(out, records, rank, world, config) -> Path:
    """Where rank `rank` writes its shard of `out`: named by a hash of the stage's config and of
    the shard's records (their whole content, not only ids), so a re-run with other flags or an
    edited input never reuses a stale shard."""
    shard = shard_of(records, rank, world)
    key = hashlib.sha256(json.dumps([config, shard], sort_keys=True, default=str).encode()).hexdigest()[:12]
    out = Path(out)
    return out.with_name(out.name + ".shards") / f"{key}-{rank:05d}-of-{world:05d}.jsonl"


def run_sharded(records, out, work, config):
    """Run `work(shard) -> new records` on this rank's shard of `records`; write `out` in input order.

    Under torchrun every rank does its own slice and writes it to its own shard file (atomically);
    a rank whose shard file exists skips its work, so a re-run after a crash redoes only the
    unfinished shards. After a barrier rank 0 merges the shards into `out` and removes them.
    The shard files must be on a filesystem all ranks see (several nodes: a shared one).
    One process: no shard files, `work(records)` goes straight to `out`. The shard directory
    OUT.shards is marked as the stage's when made (records.make_work_dir); the stage refuses one it
    did not make (records.check_work_dir) before any rank starts.
    """
    rank, world, _ = dist_env()
    if world == 1:
        write_records(out, work(records))
        return
    import datetime
    import shutil
    import torch.distributed as dist
    # gloo for a barrier of CPU tensors, also on GPUs; a long timeout because ranks wait here
    # for the slowest shard (hours of generation on a big model)
    dist.init_process_group("gloo", timeout=datetime.timedelta(hours=24))
    mine = shard_path(out, records, rank, world, config)
    make_work_dir(mine.parent, Path(sys.argv[0]).name)
    if not mine.exists():
        done = work(shard_of(records, rank, world))
        atomic_write(mine, lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in done))
    dist.barrier()
    if rank == 0:
        merged = []
        for r in range(world):
            path = shard_path(out, records, r, world, config)
            shard = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            if [s["id"] for s in shard] != [s["id"] for s in shard_of(records, r, world)]:
                raise InputError(f"{path}: shard does not hold the ids of slice {r} of {world}")
            merged += shard
        write_records(out, merged)
        shutil.rmtree(mine.parent)
    dist.destroy_process_group()


def watch_launcher(poll=0.5):
    """Exit as soon as the process that launched this one is gone.

    torchrun starts every rank in a session of its own, so killing the launcher's process group
    leaves the ranks running: they hang at a collective or race a re-run for the same outputs.
    Under torchrun (TORCHELASTIC_RUN_ID) a thread watches the parent; under iterate.py also
    iterate.py itself (SPPO_LAUNCHER_PID), which sits above torchrun. A plain process started by
    hand is never watched (it may outlive its shell on purpose).
    """
    launcher = os.environ.get("SPPO_LAUNCHER_PID")
    if "TORCHELASTIC_RUN_ID" not in os.environ and not launcher:
        return
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(poll)
            if os.getppid() != parent or (launcher and not pid_alive(int(launcher))):
                print(f"error: the launcher of process {os.getpid()} is gone; exiting", file=sys.stderr, flush=True)
                os._exit(1)
    threading.Thread(target=watch, name="watch_launcher", daemon=True).start()


# ---- starting a stage from iterate.py ------------------------------------------------------------


def run_stage(cmd, dry_run, timings=None, in_process=False, **where):
    """Run one stage: as its own process, or `in_process` (its main(argv) called here). Its wall
    time and peak memory go to `timings` (a JSONL file) with `where`."""
    print("+ " + " ".join(str(c) for c in cmd), flush=True)
    if dry_run:
        return
    t0 = time.time()
    script = next(Path(str(c)) for c in cmd if str(c).endswith(".py"))
    code, peak = run_here(script, cmd[cmd.index(script) + 1:]) if in_process else run_process(cmd)
    if code:  # the stage said why; no traceback of ours on top
        print(f"error: iteration {where['iteration']}: {script.name} exited with code {code}", file=sys.stderr)
        sys.exit(code)
    if timings is not None:
        log_time(timings, t0, peak_rss_gb=round(peak / 2**20, 2) if peak else None, **where)


def run_process(cmd):
    """The stage as its own process (or torchrun's): (exit code, peak RSS in KiB)."""
    # the stage exits when this process is gone, killed or not (so do torchrun's ranks: watch_launcher)
    proc = subprocess.Popen([str(c) for c in cmd], env=dict(os.environ, SPPO_LAUNCHER_PID=str(os.getpid())),
                            preexec_fn=dies_with_this_process())
    peak = 0
    while proc.poll() is None:  # (a child's ru_maxrss would include this process's RSS at fork)
        peak = max(peak, peak_rss_kib(proc.pid))
        time.sleep(0.5)
    return proc.returncode, peak


def run_here(script, argv):
    """The stage's main(argv) in this process: (exit code, peak RSS in KiB since it began). What a
    stage could leave behind is put back: sys.argv (run_info records the stage's own), and the
    global RNG states (train.py seeds them; the subprocess path starts each stage afresh)."""
    import random

    import torch

    from machinery.vllm_backend import close_gpu_engine
    if script.stem != "generate":  # the kept engine's GPU memory, for this stage's judge or model
        close_gpu_engine()
    module = importlib.import_module(script.stem)
    if not gc.get_freeze_count():  # once: what lives now (imports, this run's state) stays, so the
        gc.collect()               # collection after each stage scans only what stages made
        gc.freeze()
    saved = sys.argv, torch.get_rng_state(), random.getstate()
    sys.argv = [str(script)] + [str(a) for a in argv]
    try:
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS from here on (Linux)
    except OSError:
        pass
    try:  # the handler the script runs under as its own process: bad input is one line and exit 2
        one_line_errors(lambda: module.main(sys.argv[1:]))
        code = 0
    except SystemExit as e:  # fail_with's exit 2 after its one line, or sys.exit(message)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        sys.argv = saved[0]
        torch.set_rng_state(saved[1])
        random.setstate(saved[2])
        gc.collect()  # the stage's model is garbage now: free it before the next stage loads one
        if torch.cuda.is_initialized():  # torch's allocator keeps freed blocks; a vLLM engine starting next
            torch.cuda.empty_cache()     # counts only the GPU memory free to the driver (see close_gpu_engine)
    return code, peak_rss_kib(os.getpid())


def peak_rss_kib(pid) -> int:
    """Peak resident memory so far of process `pid` and its descendants (torchrun's ranks), summed (Linux)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:  # exited meanwhile, or not Linux
        return 0
    own = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)
    return own + sum(peak_rss_kib(int(child)) for child in children)


def log_time(timings, t0, peak_rss_gb=None, **where):
    """Append {where..., seconds, peak_rss_gb} to the run's timings.jsonl and say it."""
    entry = dict(where, seconds=round(time.time() - t0, 2))
    if peak_rss_gb is not None:  # of a stage process (Linux reports KiB); None for work done in this process
        entry["peak_rss_gb"] = peak_rss_gb
    print(f"[time] {' '.join(str(v) for v in where.values())}: {entry['seconds']:.1f} s"
          + (f", peak RSS {peak_rss_gb:.2f} GB" if peak_rss_gb is not None else ""), flush=True)
    with open(timings, "a") as f:
        f.write(json.dumps(entry) + "\n")


def launcher(nproc):
    """How a stage is started: plain python, or torchrun for several processes on this node
    (generate and rank shard the prompts over them, train shards the model with FSDP2)."""
    if nproc <= 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def stages_in_process(args):
    """--in_process as given, else: with one process and no GPU (see its help)."""
    if args.in_process is not None:
        return args.in_process
    import torch
    return args.nproc_per_node == 1 and not torch.cuda.is_available()
