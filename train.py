"""Stage 3 of an SPPO iteration: fit pi_{t+1} to the multiplicative-weights update of pi_t.

One process (CPU or one GPU):
    python train.py --model runs/x/iter0/model --ranked ranked.jsonl --out runs/x/iter1/model
Several processes, FSDP2 (gloo on CPU, nccl on GPU); one node with 8 GPUs:
    torchrun --standalone --nproc_per_node=8 train.py --model ... --ranked ... --out ...
Two nodes with 8 GPUs each (the same command on both; node_rank 0 and 1; --out on a shared disk):
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST0:29500 train.py ...

The model at --model is pi_t: the starting point and the frozen reference. Its log-probs of the
training responses are computed once, before the first step, so no second model lives in memory.
Each step: this rank's share of the global batch, sorted by length and cut into micro-batches
(each padded to its own longest); per micro-batch one forward over all its (prompt, response)
sequences, summed response log-probs in fp32, the loss of sppo_loss.py, backward; then RMSprop
(the paper's optimizer). The result is an HF-format directory (safetensors + tokenizer) that
transformers and vLLM load unchanged.

Under torchrun the model is sharded with FSDP2 (each decoder layer, then the root). Each global
batch is split over the ranks and the loss is a mean over the whole global batch, so the result
does not depend on the number of processes. Work files live in OUT.tmp/: metrics.jsonl and
ckpt/step-N/, a resumable checkpoint written every --save_every steps and at the end (none
without --save_every). Run the same command again after a crash and training continues from the
last checkpoint, ending with the parameters an uninterrupted run would have had. OUT.tmp/ is
removed once OUT is in place.
"""
import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from common import (InputError, atomic_write, check_model_path, check_output, collate, dist_env, fail_with, load_model,
                    load_tokenizer, prompt_token_ids, read_records, record_line, response_token_ids, run_info, sequence_logps,
                    watch_launcher, write_json)
from flags import train_parser
from sppo_loss import preference_loss, responses_used

# flags that change how, not what, is computed (up to rounding): a checkpoint resumes across them
RESUME_FREE = ("save_every", "micro_batch", "grad_checkpointing", "cpu_offload", "peak_tflops")


def parse_args(argv=None):
    return train_parser(__doc__).parse_args(argv)  # the flags: flags.py


def build_examples(records, tokenizer, loss_type, max_prompt_length, max_length, prompt_format="auto", path=None):
    """Token ids of the responses each prompt trains on, with their P and win rates.

    Returns (examples, n_cut): example = dict(prompt_ids, response_ids [R lists], P, win_rate,
    used); n_cut counts responses shortened to fit max_length (their end tokens are then lost).
    Lengths are cut as the official trainer cuts them (uclaml/SPPO sppo/trainer.py, tokenize_row):
    only when the prompt plus the longest trained response exceed max_length does the prompt keep
    just its last max_prompt_length tokens; a response still too long then loses its tail. (The
    official code cuts such a response to max_length - max_prompt_length tokens even after a short
    prompt; here it keeps what max_length leaves.) A prompt so cut is flagged ("prompt_cut"); one
    that leaves no room for a response within max_length is an error naming its line in `path`.
    """
    examples, n_cut = [], 0
    for n, rec in enumerate(records):
        # select in the precision the file holds: float32 can turn a near-tie into a tie
        used = responses_used(loss_type, torch.tensor([rec["win_rate"]], dtype=torch.float64))[0]
        truncated = rec.get("truncated", [False] * len(rec["responses"]))
        responses = [response_token_ids(tokenizer, rec["responses"][k], truncated[k], prompt_format)
                     for k in used.tolist()]
        prompt_ids = prompt_token_ids(tokenizer, rec["prompt"], prompt_format)
        full_prompt = len(prompt_ids)
        if len(prompt_ids) + max(map(len, responses)) > max_length:
            prompt_ids = prompt_ids[-max_prompt_length:]
        budget = max_length - len(prompt_ids)
        if budget < 1:
            raise InputError(f"{f'{path}:{record_line(path, n)}' if path else f'record {n + 1}'}: field 'prompt': "
                             f"{len(prompt_ids)} tokens leave no room for a response within --max_length {max_length}")
        n_cut += sum(len(ids) > budget for ids in responses)
        examples.append({"prompt_ids": prompt_ids, "response_ids": [ids[:budget] for ids in responses], "used": used,
                         "P": torch.tensor(rec["P"], dtype=torch.float32),
                         "win_rate": torch.tensor(rec["win_rate"], dtype=torch.float32),
                         "prompt_cut": len(prompt_ids) < full_prompt})
    return examples, n_cut


def batch_logps(model, examples, pad_id, device):
    """One concatenated forward over all R responses of every example: -> [len(examples), R]."""
    pairs = [(ex["prompt_ids"], r) for ex in examples for r in ex["response_ids"]]
    batch = {k: v.to(device) for k, v in collate(pairs, pad_id).items()}
    return sequence_logps(model, batch).view(len(examples), -1)


def longest(example):
    """Tokens in the example's longest sequence. Micro-batches cut from examples sorted by it pad
    less (each is padded to its own longest): the same sums, less work."""
    return len(example["prompt_ids"]) + max(map(len, example["response_ids"]))


@torch.no_grad()
def reference_logps(model, examples, indices, micro_batch, pad_id, device, progress=False):
    """log pi_t of the responses of examples[indices] in length-sorted micro-batches.

    -> [len(indices), R] (fp32, CPU), rows in the order of `indices`.
    """
    order = sorted(range(len(indices)), key=lambda n: longest(examples[indices[n]]))
    out = torch.zeros(len(indices), len(examples[indices[0]]["response_ids"]))
    for s in tqdm(range(0, len(order), micro_batch), desc="reference", disable=not progress):
        rows = order[s:s + micro_batch]
        out[rows] = batch_logps(model, [examples[indices[n]] for n in rows], pad_id, device).float().cpu()
    return out


def micro_batches_of(indices, weights, examples, ref_logps, micro_batch):
    """A rank's share of a global batch as micro-batches of similar lengths.

    -> [(examples [B], ref_logps [B, R], weights [B])], the examples sorted by `longest`.
    """
    share = sorted(zip(indices, weights), key=lambda jw: longest(examples[jw[0]]))
    out = []
    for s in range(0, len(share), micro_batch):
        idx, w = zip(*share[s:s + micro_batch])
        out.append(([examples[j] for j in idx], ref_logps[list(idx)], torch.tensor(w)))
    return out


# what accumulate_gradients sums over a step's micro-batches (each weighted by the example's weight):
# the loss, preference_loss's statistics, the examples, their tokens
LOSS_STATS = ("logratio_chosen", "logratio_rejected", "target_chosen", "target_rejected", "ordered", "preferred")
STEP_SUMS = ("loss", *LOSS_STATS, "weight", "tokens", "tokens_sq")


def accumulate_gradients(model, micro_batches, scale, pad_id, device, *, loss_type, eta, beta,
                         autocast=contextlib.nullcontext(), fsdp=False):
    """Forward and backward over micro-batches, gradients summed: d(scale * sum_b w_b loss_b)/d theta.

    micro_batches: (examples [B], ref_logps [B, R], weights [B]) each; -> dict of STEP_SUMS, weighted
    sums over the examples: the loss and preference_loss's statistics (the chosen and rejected
    response's logratios and targets; `preferred` counts pairs whose win rates differ, `ordered`
    those of them whose logratios are in the same order); `weight` the examples; `tokens` and
    `tokens_sq` the sums of n and n^2 over the sequences of n real tokens (throughput, FLOPs).
    """
    sums = dict.fromkeys(STEP_SUMS, 0.0)
    for n, (micro, ref, w) in enumerate(micro_batches):
        w = w.to(device)
        if fsdp:  # reduce gradients only once per optimizer step
            model.set_requires_gradient_sync(n == len(micro_batches) - 1)
        with autocast:
            logratios = batch_logps(model, micro, pad_id, device) - ref.to(device)  # log pi_theta/pi_t: [B, R]
        win_rate = torch.stack([ex["win_rate"] for ex in micro]).to(device)  # [B, K]
        P = torch.stack([ex["P"] for ex in micro]).to(device)  # [B, K, K]
        used = torch.stack([ex["used"] for ex in micro]).to(device)  # [B, R]: which of the K are trained on
        # the square loss of Eq. 4.6 on each trained response (--loss_type sppo*), or a baseline's
        losses, stats = preference_loss(loss_type, logratios=logratios, win_rate=win_rate, P=P, used=used,
                                        eta=eta, beta=beta)
        ((losses * w).sum() * scale).backward()
        lengths = torch.tensor([[len(ex["prompt_ids"]) + len(r) for r in ex["response_ids"]] for ex in micro],
                               dtype=torch.float64, device=device)  # [B, R] real tokens per sequence
        real = (w > 0).double()  # weight-0 padding examples are not useful work
        step = {key: stats[key].detach() * w for key in LOSS_STATS}
        step.update(loss=losses.detach() * w, weight=w, tokens=lengths.sum(-1) * real,
                    tokens_sq=(lengths ** 2).sum(-1) * real)
        for key, value in step.items():
            sums[key] = sums[key] + value.double().sum()
    return dict(zip(STEP_SUMS, torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=device)
                                            for k in STEP_SUMS]).tolist()))  # one device-to-host copy


def flops_per_token_terms(model, grad_checkpointing):
    """(a, b) of the training FLOP estimate a * n + b * n^2 for a sequence of n tokens (nanoGPT's
    and PaLM's): forward and backward cost 6 FLOPs per parameter per token, attention 12 L d n per
    token; recomputing activations (--grad_checkpointing) adds a forward: x 4/3. Parameters count
    the matrix multiplies: the input embedding is a lookup unless it is tied to the LM head."""
    n_params = sum(p.numel() for p in model.parameters())  # a tied weight is listed once
    if not model.config.tie_word_embeddings:
        n_params -= model.get_input_embeddings().weight.numel()
    factor = 4 / 3 if grad_checkpointing else 1.0
    return 6 * n_params * factor, 12 * model.config.num_hidden_layers * model.config.hidden_size * factor


# dense bf16 tensor-core peak per GPU (vendor datasheets), matched in this order on the device name
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


def peak_tflops(device):
    """The device's peak TFLOP/s if it is a GPU we know, else None (then no MFU without --peak_tflops)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in PEAK_TFLOPS if key in name), None)


def step_metrics(sums, seconds, flop_counts, peak_flops):
    """One step's metrics by name, from STEP_SUMS over all ranks and the step's wall time."""
    n, preferred = sums["weight"], sums["preferred"]
    flops = flop_counts[0] * sums["tokens"] + flop_counts[1] * sums["tokens_sq"]
    targets = {k: sums[k] / n if math.isfinite(sums[k]) else None  # None: dpo and ipo have none
               for k in ("target_chosen", "target_rejected")}
    return {"loss": sums["loss"] / n,
            "logratio_chosen": sums["logratio_chosen"] / n, "target_chosen": targets["target_chosen"],
            "logratio_rejected": sums["logratio_rejected"] / n, "target_rejected": targets["target_rejected"],
            "ordered_fraction": sums["ordered"] / preferred if preferred else None,  # None: all win rates tied
            "tokens": int(sums["tokens"]), "tokens_per_s": sums["tokens"] / seconds,
            "mfu": flops / seconds / peak_flops if peak_flops else None}


def progress_postfix(m):
    """The progress bar's postfix: the step's metrics, named."""
    def fmt(x):
        return "?" if x is None else f"{x:.3g}"
    return {"loss": fmt(m["loss"]),
            "logratio_chosen": f"{fmt(m['logratio_chosen'])} (target {fmt(m['target_chosen'])})",
            "logratio_rejected": f"{fmt(m['logratio_rejected'])} (target {fmt(m['target_rejected'])})",
            "ordered": fmt(m["ordered_fraction"]), "tokens/s": f"{m['tokens_per_s']:.0f}", "mfu": fmt(m["mfu"])}


def optimizer_step(model, optimizer, scheduler, grad_clip):
    """Clip, step, zero the gradients, advance the schedule -> (grad norm before clipping, lr used).

    A non-finite gradient (a NaN or an overflow anywhere in the loss) stops training before the
    step can write NaN into the parameters; the norm is global, so every rank stops alike.
    """
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # a DTensor under FSDP2
    if not torch.isfinite(grad_norm):
        raise NonFiniteError(f"gradient norm {grad_norm.item()}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lr = scheduler.get_last_lr()[0]
    scheduler.step()
    return grad_norm.item(), lr


class NonFiniteError(ArithmeticError):
    """The loss or gradient of a step is NaN or infinite: training stops, nothing is saved."""


def lr_factor(step, warmup_steps, total_steps, schedule="linear"):
    """The learning rate of optimizer step `step` (0-based) as a fraction of --lr: HF's
    get_linear_schedule_with_warmup (or get_constant_schedule_with_warmup), as the official
    trainer: 0 at step 0, linear up to 1 at `warmup_steps`, then linear down to 0 at `total_steps`
    (or constant)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if schedule == "constant":
        return 1.0
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def data_order(n, seed, epoch):
    """The order of the examples in an epoch: a function of (seed, epoch) only, so a resumed run
    finds every batch where the uninterrupted run had it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()


def padded_share(indices, rank, world):
    """This rank's share of `indices` (a global batch), padded so every rank has the same count.

    Our distributed sampler. FSDP runs collectives inside forward and backward, so all ranks must
    do the same number of forwards; a padding example carries weight 0. (torch's DistributedSampler
    pads with real examples that would then count twice.) Returns (indices, weights).
    """
    share = indices[rank::world]
    size = math.ceil(len(indices) / world)
    weights = [1.0] * len(share) + [0.0] * (size - len(share))
    return share + [indices[0]] * (size - len(share)), weights


# ---- resumable checkpoints ----------------------------------------------------------------------
# Sharded with torch.distributed.checkpoint (DCP): each rank writes only its own shard of the
# parameters and optimizer state, in parallel, and nothing of the size of the whole model is
# gathered. (A checkpoint holds the fp32 parameters and the optimizer state: RMSprop keeps one
# tensor per parameter (square_avg), so 2 x 4 bytes x 7.24B = 58 GB for Mistral-7B (AdamW keeps
# two: 87 GB); full state dicts would collect all of it on rank 0's CPU at every save.) The RNG
# states are per rank, one small file each; step and scheduler are written by rank 0. A checkpoint
# is written to step-N.tmp and renamed to step-N when complete, so a run killed mid-save leaves the
# previous checkpoint intact.


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
    if rank == 0:
        os.replace(tmp, final)
        for old in ckpt_dir.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, model, optimizer, scheduler, rank):
    """Restore model, optimizer, scheduler and this rank's RNG states; returns the step."""
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
    diff = sorted(k for k in set(saved) | set(config) if k not in RESUME_FREE and saved.get(k) != config.get(k))
    if diff:
        details = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {config.get(k)!r}" for k in diff)
        raise InputError(f"{path}: checkpoint of a different run ({details}). Run with the same flags and "
                         f"number of processes, or delete {path.parent.parent} to start over")


def main(argv=None):
    args = parse_args(argv)
    watch_launcher()
    rank, world, local_rank = dist_env()
    master = rank == 0
    fsdp = "RANK" in os.environ  # under torchrun (even with 1 process): FSDP2
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and device.type == "cuda")
    out = Path(args.out)
    work_dir = out.with_name(out.name + ".tmp")  # metrics.jsonl, ckpt/; becomes nothing once out is written
    ckpt_dir = work_dir / "ckpt"

    # ---- data, and the checkpoint to resume from: checked on every rank before any collective, so
    # bad input makes all ranks exit with the same clear error instead of leaving some waiting ------
    try:
        if args.cpu_offload and not (fsdp and device.type == "cuda"):
            raise InputError("--cpu_offload needs torchrun on GPUs (FSDP2 offloads to CPU from GPU memory)")
        check_model_path(args.model)
        check_output(out, directory=True)
        if out.is_dir() and any(out.iterdir()) and not (out / "train_info.json").exists():
            raise InputError(f"--out {out}: exists and was not written by train.py (no train_info.json); "
                             "refusing to replace it: move it away or give another --out")
        records = read_records(args.ranked, stage="ranked")
        tokenizer = load_tokenizer(args.model)
        examples, n_cut = build_examples(records, tokenizer, args.loss_type, args.max_prompt_length, args.max_length,
                                         args.prompt_format, path=args.ranked)
        config = dict(vars(args), world_size=world, ranked_sha256=hashlib.sha256(Path(args.ranked).read_bytes()).hexdigest())
        resume = latest_checkpoint(ckpt_dir)
        if resume is not None:
            check_resumable(resume, config)
    except InputError as e:
        fail_with(e)
    if master and n_cut:
        print(f"warning: {n_cut} responses cut to --max_length {args.max_length} (their end tokens are not trained on)")
    prompts_cut = sum(ex["prompt_cut"] for ex in examples)
    if master and prompts_cut:
        print(f"warning: {prompts_cut} prompts cut to their last --max_prompt_length {args.max_prompt_length} tokens")
    if fsdp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    # ---- model: fp32 master weights; FSDP2 shards each decoder layer, then the root -----------
    model = load_model(args.model, dtype=torch.float32, device="cpu" if fsdp else device)
    model.config.use_cache = False
    flop_counts = flops_per_token_terms(model, args.grad_checkpointing)  # before sharding: whole-model sizes
    peak = (args.peak_tflops or peak_tflops(device) or 0) * 1e12 * world  # FLOP/s of all ranks; 0: unknown
    if args.freeze_embeddings:  # with a large vocabulary, most of the parameters (Gemma-3-270M: 168M of 268M)
        model.get_input_embeddings().weight.requires_grad_(False)
    if args.grad_checkpointing:  # non-reentrant: the one that composes with FSDP2
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and not fsdp)  # one process
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
        mesh = init_device_mesh(device.type, (world,))
        # bf16 compute, fp32 gradient reduction; the sharded parameters the optimizer sees stay fp32
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
        offload = CPUOffloadPolicy() if args.cpu_offload else OffloadPolicy()
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp, offload_policy=offload)
        fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload)  # moves the shards to the device

    # ---- optimizer and schedule: linear warmup, then linear decay (or constant). Built right after
    # sharding: it must hold the sharded parameters (after a forward FSDP2's root holds unsharded ones)
    opt_cls = torch.optim.RMSprop if args.optimizer == "rmsprop" else torch.optim.AdamW
    optimizer = opt_cls([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    steps_per_epoch = math.ceil(len(examples) / args.global_batch)
    total_steps = steps_per_epoch * args.epochs
    warmup = math.ceil(args.warmup_ratio * total_steps)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total_steps, args.lr_schedule))

    # ---- reference log-probs of pi_t, once, sharded over ranks (recomputed on resume: the model
    # at --model is pi_t, and that forward is cheaper than storing them) ------------------------
    model.eval()
    every = list(range(len(examples)))
    with autocast:
        local = reference_logps(model, examples, padded_share(every, rank, world)[0], args.micro_batch,
                                tokenizer.pad_token_id, device, progress=master)
    if fsdp:
        gathered = [torch.zeros_like(local, device=device) for _ in range(world)]
        dist.all_gather(gathered, local.to(device))
        ref_logps = torch.zeros(len(examples), local.shape[1])
        for r, part in enumerate(gathered):
            ref_logps[padded_share(every, r, world)[0]] = part.cpu()
    else:
        ref_logps = local
    if fsdp:
        model.reshard()  # the root stays unsharded after a forward without backward

    # ---- resume, or start afresh ---------------------------------------------------------------
    start_step = 0
    if resume is not None:
        start_step = load_checkpoint(resume, model, optimizer, scheduler, rank)
        if master:
            print(f"resuming from {resume} at step {start_step} of {total_steps}", flush=True)
    barrier()  # every rank has looked for a checkpoint before rank 0 clears the work dir
    if master:
        if resume is None:
            shutil.rmtree(work_dir, ignore_errors=True)
        work_dir.mkdir(parents=True, exist_ok=True)
        metrics = work_dir / "metrics.jsonl"  # keep the lines of the steps the checkpoint holds
        kept = [line for line in (metrics.read_text().splitlines() if metrics.exists() else [])
                if json.loads(line)["step"] <= start_step]
        metrics.write_text("".join(line + "\n" for line in kept))
        log = open(metrics, "a")

    # ---- training loop ------------------------------------------------------------------------
    model.train()
    t0 = time.time()
    bar = tqdm(total=total_steps, initial=start_step, desc="train", disable=not master)
    for step in range(start_step, total_steps):
        t_step = time.time()
        epoch, i = divmod(step, steps_per_epoch)
        batch_idx = data_order(len(examples), args.seed, epoch)[i * args.global_batch:(i + 1) * args.global_batch]
        micro_batches = micro_batches_of(*padded_share(batch_idx, rank, world), examples, ref_logps, args.micro_batch)
        # mean over the global batch, not over this rank's share; FSDP averages gradients over
        # ranks, hence * world: the gradient is the same for any number of processes
        sums = accumulate_gradients(model, micro_batches, world / len(batch_idx), tokenizer.pad_token_id, device,
                                    loss_type=args.loss_type, eta=args.eta, beta=args.beta, autocast=autocast, fsdp=fsdp)
        try:  # a NaN or overflow stops the run here, before anything is saved
            grad_norm, lr_now = optimizer_step(model, optimizer, scheduler, args.grad_clip)
            if fsdp:
                summed = torch.tensor([sums[k] for k in STEP_SUMS], dtype=torch.float64, device=device)
                dist.all_reduce(summed)
                sums = dict(zip(STEP_SUMS, summed.tolist()))
            if not math.isfinite(sums["loss"]):
                raise NonFiniteError(f"loss {sums['loss']}")
        except NonFiniteError as e:
            fail_with(InputError(f"step {step + 1}: non-finite {e}; training stopped and nothing was saved "
                                 "(lower --lr or --eta, or check --model)"))
        if master:
            m = step_metrics(sums, time.time() - t_step, flop_counts, peak)
            log.write(json.dumps({"step": step + 1, "epoch": epoch, **m, "lr": lr_now, "grad_norm": grad_norm,
                                  "elapsed": time.time() - t0}) + "\n")
            log.flush()
            bar.set_postfix(progress_postfix(m))
            bar.update(1)
        # with --save_every, also at the end: a run killed while saving the model resumes there.
        # Without it, no checkpoint at all (for its size at 7B see "resumable checkpoints" above)
        if args.save_every and ((step + 1) % args.save_every == 0 or step + 1 == total_steps):
            save_checkpoint(ckpt_dir, step + 1, model, optimizer, scheduler, config, rank)
    bar.close()

    # ---- save pi_{t+1}: full state dict on rank 0, HF format, then rename into place ----------
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if model.config.tie_word_embeddings:  # FSDP lists the tied copy too; HF files leave it out
            state.pop("lm_head.weight", None)
    else:
        state = model.state_dict()
    if master:
        log.close()
        final = work_dir / "model"
        shutil.rmtree(final, ignore_errors=True)
        model.save_pretrained(final, state_dict=state)
        tokenizer.save_pretrained(final)
        shutil.copy(work_dir / "metrics.jsonl", final / "metrics.jsonl")
        write_json(final / "train_info.json", dict(run_info(config), examples=len(examples), steps=total_steps,
                                                   resumed_from_step=start_step, responses_cut=n_cut,
                                                   prompts_cut=prompts_cut, world_size=world))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(final, out)
        shutil.rmtree(work_dir)  # the training checkpoint is not needed once pi_{t+1} is in place
    if fsdp:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
