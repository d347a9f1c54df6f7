"""train.py's resumable checkpoints: sharded with torch.distributed.checkpoint (DCP).

Each rank writes only its own shard of the parameters and optimizer state, in parallel, and
nothing of the size of the whole model is gathered. (A checkpoint holds the fp32 parameters and
the optimizer state: RMSprop keeps one tensor per parameter (square_avg), so 2 x 4 bytes x 7.24B
= 58 GB for Mistral-7B (AdamW keeps two: 87 GB); full state dicts would collect all of it on rank
0's CPU at every save.) The RNG states are per rank, one small file each; step and scheduler are
written by rank 0. A checkpoint is written to step-N.tmp and renamed to step-N when complete, so a
run killed mid-save leaves the previous checkpoint intact.

Each rank records the size and sha256 of the files it wrote (manifest-RANK.json; rank 0 adds the
files DCP's coordinator and it wrote) before the rename, and `verify_checkpoint` checks them before
a resume: a truncated, missing or altered file is "damaged checkpoint at PATH", not a traceback or
a silently wrong resume. The hashes cost one read of the checkpoint per save and per resume (about
a minute for Mistral-7B's 58 GB, small next to the reference pass at that size); each rank hashes
its own files, so the time does not grow with the number of processes.
"""
import json
import os
import pickle
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from machinery.records import InputError, atomic_write, file_sha256, write_json

# flags that change how, not what, is computed (up to rounding): a checkpoint resumes across them
RESUME_FREE = ("save_every", "micro_batch", "grad_checkpointing", "cpu_offload", "peak_tflops",
               "reduce_every_micro_batch")


def barrier():
    if dist.is_initialized():
        dist.barrier()


def latest_checkpoint(ckpt_dir: Path):
    """The newest complete checkpoint directory, or None."""
    done = sorted(p for p in ckpt_dir.glob("step-*") if not p.name.endswith(".tmp")) if ckpt_dir.exists() else []
    return done[-1] if done else None


def rng_states():
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def save_checkpoint(ckpt_dir: Path, step, model, optimizer, scheduler, config, rank):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    final = ckpt_dir / f"step-{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
    barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
    atomic_write(tmp / f"rng-{rank}.pt", lambda f: torch.save(rng_states(), f), mode="wb")
    if rank == 0:
        atomic_write(tmp / "train_state.pt", lambda f: torch.save({"step": step, "scheduler": scheduler.state_dict()}, f), mode="wb")
        write_json(tmp / "config.json", config)
    barrier()  # every rank's files are in tmp
    mine = [p for p in sorted(tmp.iterdir()) if file_owner(p.name, dist.get_world_size() if dist.is_initialized() else 1) == rank]
    write_json(tmp / f"manifest-{rank}.json", {p.name: [p.stat().st_size, file_sha256(p)] for p in mine})
    barrier()
    if rank == 0:
        os.replace(tmp, final)
        for old in ckpt_dir.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)


def file_owner(name, world):
    """The rank that records file `name` of a checkpoint in its manifest: DCP's __R_N.distcp and
    rng-R.pt are rank R's; the rest (.metadata, train_state.pt, config.json) rank 0's; the manifests
    and the temporaries of files being written (another rank's manifest) nobody's."""
    if name.startswith("manifest-") or (name.startswith(".") and name != ".metadata"):
        return None
    for prefix in ("__", "rng-"):
        if name.startswith(prefix) and name[len(prefix):].split("_")[0].split(".")[0].isdigit():
            return int(name[len(prefix):].split("_")[0].split(".")[0]) % world
    return 0


def verify_checkpoint(path: Path, rank):
    """Check the checkpoint against its manifests before resuming: every file listed is there with
    its size, and this rank's files (all of them with one process) with their sha256; no file is
    missing from the manifests. Raises InputError("damaged checkpoint at PATH: ...")."""
    def damaged(what):
        raise InputError(f"damaged checkpoint at {path}: {what}; delete it to start over")
    listed = {}
    manifests = sorted(path.glob("manifest-*.json"))
    if not manifests:
        damaged("no manifest-*.json")
    for manifest in manifests:
        try:
            entries = json.loads(manifest.read_text())
            listed.update({name: (int(size), str(digest), manifest.stem == f"manifest-{rank}" or len(manifests) == 1)
                           for name, (size, digest) in entries.items()})
        except (ValueError, TypeError, AttributeError, UnicodeDecodeError) as e:
            damaged(f"{manifest.name} is not a manifest ({e})")
    for name in ("config.json", "train_state.pt", ".metadata"):
        if name not in listed:
            damaged(f"{name} is not in its manifest")
    for name, (size, digest, mine) in sorted(listed.items()):
        file = path / name
        if not file.is_file():
            damaged(f"{name} is missing")
        if file.stat().st_size != size:
            damaged(f"{name} has {file.stat().st_size} bytes, {size} when written")
        if mine and file_sha256(file) != digest:
            damaged(f"{name} does not hold the bytes written (another sha256)")
    unlisted = sorted(p.name for p in path.iterdir() if p.name not in listed and not p.name.startswith("manifest-"))
    if unlisted:
        damaged(f"{', '.join(unlisted)} not in its manifest")


def load_checkpoint(path: Path, model, optimizer, scheduler, rank):
    """Restore model, optimizer, scheduler and this rank's RNG states; returns the step. A file
    that cannot be read (verify_checkpoint passed, yet ...) is one line, not a traceback."""
    try:
        return _load_checkpoint(path, model, optimizer, scheduler, rank)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, KeyError, ValueError) as e:
        raise InputError(f"damaged checkpoint at {path}: cannot load it ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); delete it to start over") from e


def _load_checkpoint(path: Path, model, optimizer, scheduler, rank):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_state, optim_state = get_state_dict(model, optimizer)  # the layout to load into
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train_state = torch.load(path / "train_state.pt", weights_only=True)
    scheduler.load_state_dict(train_state["scheduler"])
    rng = torch.load(path / f"rng-{rank}.pt", weights_only=True)  # tensors and python's tuple: no code runs
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return train_state["step"]


def check_resumable(path: Path, config):
    """Resume only the run that wrote the checkpoint: same flags (but RESUME_FREE), data, world size."""
    saved = json.loads((path / "config.json").read_text())
    if saved.get("model_files") != config.get("model_files"):  # a list of (file, size, mtime): named, not printed
        raise InputError(f"--model {config['model']}: its files changed since the checkpoint {path} was written; "
                         f"delete {path.parent.parent} to start over")
    diff = sorted(k for k in set(saved) | set(config) if k not in RESUME_FREE and saved.get(k) != config.get(k))
    if diff:
        details = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {config.get(k)!r}" for k in diff)
        raise InputError(f"{path}: checkpoint of a different run ({details}). Run with the same flags and "
                         f"number of processes, or delete {path.parent.parent} to start over")
