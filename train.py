"""Stage 3 of an SPPO iteration: fit pi_{t+1} to the multiplicative-weights update of pi_t.

    python train.py --model runs/x/iter0/model --ranked ranked.jsonl --out runs/x/iter1/model    # CPU or 1 GPU
    torchrun --standalone --nproc_per_node=8 train.py --model ... --ranked ... --out ...         # FSDP2, 8 GPUs
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST0:29500 train.py ...

The model at --model is pi_t: the starting point and the frozen reference. Per prompt, train on
the best and worst of the K ranked responses (Algorithm 1) with the square loss of Eq. 4.6,
(log pi_theta(y|x) - log pi_t(y|x) - eta (P(y > pi_t|x) - 1/2))^2, RMSprop (the paper's optimizer).
log pi_t is computed once, before the first step: no second model lives in memory. Under torchrun
the model is sharded with FSDP2 and the loss is a mean over the whole global batch, so the result
does not depend on the number of processes. The result is an HF directory (safetensors +
tokenizer) that transformers and vLLM load unchanged. Work files live in OUT.tmp/ (metrics.jsonl,
and with --save_every the checkpoints of checkpoint.py): run the same command again after a crash
and training continues from the last checkpoint, to the parameters an uninterrupted run ends with.
"""
import argparse
import contextlib
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from tqdm import tqdm

from sppo_loss import preference_loss, preference_stats, responses_used
from machinery.checkpoint import check_resumable, latest_checkpoint, load_checkpoint, save_checkpoint, verify_checkpoint
from machinery.flags import train_args
from machinery.fsdp import init_process_group, load_for_sharding, shard_model, sync_every_micro_batch
from machinery.launch import dist_env, watch_launcher
from machinery.lm import (LARGE_VOCAB, check_model_files, collate, cpu_lm_head, load_model, load_tokenizer, prompt_token_ids,
                          response_token_ids, sequence_logps)
from machinery.records import (InputError, check_model_path, check_not_input, check_output, check_work_dir,
                               file_sha256, make_work_dir, one_line_errors, path_stamp, read_records, record_line, run_info,
                               write_json)
from machinery.train_steps import longest, micro_batches_of, optimizer_step, padded_share, summed_over_ranks
from machinery.train_metrics import STEP_STATS, StepLog, flops_per_token_terms, peak_tflops, step_tokens


# ---- the objective: Algorithm 1's responses, Eq. 4.6's loss -------------------------------------


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
        # Algorithm 1: y_w and y_l, the best and worst of K by win rate (all K for sppo_all),
        # selected in the precision the file holds: float32 can turn a near-tie into a tie
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
    """log pi(y | x) of all R responses of every example, in one concatenated forward: -> [len(examples), R]."""
    pairs = [(ex["prompt_ids"], r) for ex in examples for r in ex["response_ids"]]
    return sequence_logps(model, collate(pairs, pad_id), device).view(len(examples), -1)  # the batch moves there


def accumulate_gradients(model, micro_batches, scale, pad_id, device, *, loss_type, eta, beta, tau=0.0,
                         autocast=contextlib.nullcontext(), fsdp=False, sync_every=False):
    """Forward and backward over micro-batches, gradients summed: d(scale * sum_b w_b loss_b)/d theta.

    micro_batches: (examples [B], ref_logps [B, R], weights [B]) each. Returns the weighted sums over
    the examples of the loss and of preference_stats's statistics (STEP_STATS), for the metrics.
    """
    sums = dict.fromkeys(STEP_STATS, 0.0)
    for n, (micro, ref, w) in enumerate(micro_batches):
        w = w.to(device)
        if fsdp:  # reduce gradients once per optimizer step, or at each micro-batch (fsdp.sync_every_micro_batch)
            model.set_requires_gradient_sync(sync_every or n == len(micro_batches) - 1)
        with autocast:
            logratios = batch_logps(model, micro, pad_id, device) - ref.to(device)  # log pi_theta/pi_t: [B, R]
        win_rate = torch.stack([ex["win_rate"] for ex in micro]).to(device)  # [B, K]: P(y_k > pi_t | x)
        P = torch.stack([ex["P"] for ex in micro]).to(device)  # [B, K, K]
        used = torch.stack([ex["used"] for ex in micro]).to(device)  # [B, R]: the responses Algorithm 1 picked
        # log pi_t - log pi_0 of each trained response (--loss_type magnet: magnet_pass)
        gap = torch.stack([ex["magnet_gap"] for ex in micro]).to(device) if loss_type == "magnet" else None
        # Eq. 4.6 on each trained response (--loss_type sppo*), or a baseline's loss
        losses = preference_loss(loss_type, logratios=logratios, win_rate=win_rate, P=P, used=used, eta=eta, beta=beta,
                                 tau=tau, magnet_gap=gap)
        ((losses * w).sum() * scale).backward()
        stats = preference_stats(loss_type, logratios=logratios, win_rate=win_rate, P=P, used=used, eta=eta,
                                 tau=tau, magnet_gap=gap)
        for key, value in dict(stats, loss=losses, weight=torch.ones_like(losses)).items():
            sums[key] = sums[key] + (value.detach() * w).double().sum()
    return dict(zip(STEP_STATS, torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=device)
                                             for k in STEP_STATS]).tolist()))  # one device-to-host copy


# ---- what each optimizer step gets: its global batch and its learning rate -------------------------


def global_batch(run, step):
    """The examples (indices) of optimizer step `step`: slice i of epoch e's order, a permutation
    that depends on (--seed, e) only, so a resumed run meets every batch where it was."""
    epoch, i = divmod(step, run.steps_per_epoch)
    order = torch.randperm(len(run.examples), generator=torch.Generator().manual_seed(run.args.seed * 100003 + epoch))
    return order.tolist()[i * run.args.global_batch:(i + 1) * run.args.global_batch]


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


def schedule(args, n_examples):
    """(steps per epoch, total steps, warmup steps) of a run on n_examples."""
    steps_per_epoch = math.ceil(n_examples / args.global_batch)
    total_steps = steps_per_epoch * args.epochs
    return steps_per_epoch, total_steps, math.ceil(args.warmup_ratio * total_steps)


FEW_STEPS = 10  # fewer optimizer steps than this: train.py says how many, and at which learning rates


def check_schedule(args, n_examples):
    """The learning rate of every optimizer step; refuses a schedule whose steps are all at lr 0
    (few examples for --global_batch: the one step is warmup's first, at 0), which would return
    --model unchanged. --lr 0 itself is allowed (a no-op baseline on purpose), with the warning."""
    _, total_steps, warmup = schedule(args, n_examples)
    lrs = [args.lr * lr_factor(s, warmup, total_steps, args.lr_schedule) for s in range(total_steps)]
    if args.lr > 0 and max(lrs) == 0:
        raise InputError(f"--global_batch {args.global_batch}, --warmup_ratio {args.warmup_ratio}: {n_examples} "
                         f"examples make {total_steps} optimizer step{'s' * (total_steps > 1)}, all at lr 0 (warmup "
                         "starts at 0): training would return --model unchanged; lower --global_batch or "
                         "--warmup_ratio, or give more prompts")
    return lrs


# ---- the run: the inputs checked, Algorithm 1's examples, setup, the reference pass, the loop, the save


def main(argv=None):
    args = train_args(argv, __doc__)  # the flags: flags.py
    watch_launcher()
    records, tokenizer, config, resume = check_inputs(args)  # raises InputError: bad input stops every rank alike
    examples, responses_cut = build_examples(records, tokenizer, args.loss_type, args.max_prompt_length,  # Algorithm 1
                                             args.max_length, args.prompt_format, path=args.ranked)
    run = setup(args, tokenizer, examples, responses_cut, config, resume)
    ref_logps = reference_pass(run)
    if args.loss_type == "magnet":
        magnet_pass(run, ref_logps)
    train_loop(run, ref_logps)
    save(run)


def check_inputs(args):
    """The ranked records, the model's tokenizer, the run's config and the checkpoint to resume
    (or None), all checked on every rank before any collective, so bad input stops all ranks alike:
    InputError, one line and exit 2 (records.one_line_errors). Prints the warnings a user must see."""
    rank, world, _ = dist_env()
    out = Path(args.out)
    work_dir = out.with_name(out.name + ".tmp")
    if args.cpu_offload and not ("RANK" in os.environ and torch.cuda.is_available()):
        raise InputError("--cpu_offload needs torchrun on GPUs (FSDP2 offloads to CPU from GPU memory)")
    check_model_path(args.model)
    if args.loss_type == "magnet":
        if args.magnet is None:
            raise InputError("--loss_type magnet: give --magnet, the model dir of pi_0 (iterate.py gives its --model)")
        check_model_path(args.magnet, "--magnet")
    check_output(out, directory=True)
    records = read_records(args.ranked, stage="ranked")
    for path in (out, work_dir):  # before the train_info.json rule: --out = --model may be a dir train.py wrote
        check_not_input(path, {"--model": args.model, "--ranked": args.ranked})
    check_work_dir(work_dir, "train.py")
    if out.is_dir() and any(out.iterdir()) and not (out / "train_info.json").exists():
        raise InputError(f"--out {out}: exists and was not written by train.py (no train_info.json); "
                         "refusing to replace it: move it away or give another --out")
    tokenizer = load_tokenizer(args.model)
    check_model_files(args.model)
    lrs = check_schedule(args, len(records))  # one example per record
    config = dict(vars(args), world_size=world, ranked_sha256=file_sha256(args.ranked),
                  model_files=path_stamp(args.model))  # a checkpoint resumes only for the same pi_t
    resume = latest_checkpoint(work_dir / "ckpt")
    if resume is not None:
        verify_checkpoint(resume, rank)
        check_resumable(resume, config)
    if rank == 0 and (len(lrs) < FEW_STEPS or max(lrs) == 0):
        print(f"warning: {len(records)} examples make {len(lrs)} optimizer step{'s' * (len(lrs) > 1)}, at lr "
              + ", ".join(f"{lr:.3g}" for lr in lrs))
    return records, tokenizer, config, resume


@dataclass
class Run:
    """What the phases of a training run share; setup() makes it."""
    args: argparse.Namespace  # the flags (flags.py)
    rank: int  # this process's rank (torchrun's RANK; 0 without torchrun)
    world_size: int  # the processes training together
    fsdp: bool  # started by torchrun (even with one process): the model is sharded with FSDP2
    device: torch.device  # cuda:LOCAL_RANK, or the CPU
    out: Path  # --out: where pi_{t+1} is put once complete
    work_dir: Path  # OUT.tmp: metrics.jsonl and the checkpoints; removed once pi_{t+1} is in place
    config: dict  # the flags, the world size and the inputs' stamps: what a checkpoint resumes only under
    resume: Optional[Path]  # the checkpoint to continue from, or None: start at step 0
    tokenizer: object  # pi_t's tokenizer, saved with pi_{t+1}
    examples: list  # build_examples's: one per prompt, the responses Algorithm 1 picked as token ids
    responses_cut: int  # responses cut to --max_length (their end tokens are not trained on)
    model: torch.nn.Module  # pi_theta, from pi_t's weights in fp32; FSDP2-sharded under torchrun
    optimizer: torch.optim.Optimizer  # RMSprop (the paper's) or AdamW, over the trainable parameters
    scheduler: torch.optim.lr_scheduler.LambdaLR  # each step's learning rate: --lr times lr_factor
    steps_per_epoch: int  # ceil(examples / --global_batch)
    total_steps: int  # steps_per_epoch * --epochs
    flops_per_token: tuple  # (a, b): a training step on a sequence of n tokens costs a n + b n^2 FLOPs
    peak_flops: float  # the peak FLOP/s of all processes together, for MFU; 0 when unknown
    sync_every: bool  # FSDP2 reduces gradients at every micro-batch, not once per step (fsdp.sync_every_micro_batch)
    autocast: contextlib.AbstractContextManager  # bf16 autocast of one process (FSDP2 casts by its policy)
    lm_head_layout: Callable  # () -> the context in which the LM head runs (lm.cpu_lm_head on a CPU, big vocab)
    start_step: int = 0  # the step training starts at: the checkpoint's, or 0 (train_loop sets it)

    @property
    def is_rank0(self):  # rank 0 writes metrics.jsonl, the progress bar and pi_{t+1}
        return self.rank == 0


def setup(args, tokenizer, examples, responses_cut, config, resume):
    """Load pi_t, shard it (FSDP2 under torchrun), build the optimizer and the lr schedule."""
    rank, world, local_rank = dist_env()
    fsdp = "RANK" in os.environ  # under torchrun (even with 1 process): FSDP2
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and device.type == "cuda")
    out = Path(args.out)
    prompts_cut = sum(ex["prompt_cut"] for ex in examples)
    if rank == 0 and responses_cut:
        print(f"warning: {responses_cut} responses cut to --max_length {args.max_length} (their end tokens are not trained on)")
    if rank == 0 and prompts_cut:
        print(f"warning: {prompts_cut} prompts cut to their last --max_prompt_length {args.max_prompt_length} tokens")
    if fsdp:
        init_process_group(device, args.cpu_offload)  # fsdp.py: the backend and timeout, and why
        if device.type == "cuda":
            torch.cuda.set_device(device)
    torch.manual_seed(args.seed)  # any sampling in the model; iterate.py passes every iteration the run's --seed
    random.seed(args.seed)

    # the model: fp32 master weights
    model = load_for_sharding(args.model, rank) if fsdp else load_model(args.model, dtype=torch.float32, device=device)
    model.config.use_cache = False
    flops_per_token = flops_per_token_terms(model, args.grad_checkpointing)  # before sharding: whole-model sizes
    if args.freeze_embeddings:  # with a large vocabulary, most of the parameters (Gemma-3-270M: 168M of 268M)
        model.get_input_embeddings().weight.requires_grad_(False)
    if args.grad_checkpointing:  # non-reentrant: the one that composes with FSDP2
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    sync_every = fsdp and sync_every_micro_batch(model, args, len(examples[0]["response_ids"]), world, device)
    if fsdp:  # FSDP2 shards each decoder layer, then the root; rank 0's weights reach every rank
        shard_model(model, world, device, bf16, args.cpu_offload)

    # the optimizer, built right after sharding (it must hold the sharded parameters), and the
    # schedule: HF's linear warmup from 0, then linear decay (or constant), as the official trainer
    opt_cls = torch.optim.RMSprop if args.optimizer == "rmsprop" else torch.optim.AdamW
    optimizer = opt_cls([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    steps_per_epoch, total_steps, warmup = schedule(args, len(examples))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total_steps, args.lr_schedule))
    # on the CPU with a large vocabulary the LM head runs in the layout the CPU's GEMM is fast in
    fast_head = device.type == "cpu" and model.config.get_text_config().vocab_size >= LARGE_VOCAB
    return Run(
        args=args, rank=rank, world_size=world, fsdp=fsdp, device=device, out=out,
        work_dir=out.with_name(out.name + ".tmp"), config=config, resume=resume, tokenizer=tokenizer, examples=examples,
        responses_cut=responses_cut, model=model, optimizer=optimizer, scheduler=scheduler,
        steps_per_epoch=steps_per_epoch, total_steps=total_steps, sync_every=sync_every,
        flops_per_token=flops_per_token,
        peak_flops=(args.peak_tflops or peak_tflops(device) or 0) * 1e12 * world,
        autocast=torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and not fsdp),
        lm_head_layout=(lambda: cpu_lm_head(model)) if fast_head else contextlib.nullcontext)


def reference_pass(run):
    """log pi_t of every trained response, once, sharded over the ranks and gathered: [examples, R].
    Recomputed on resume (the model at --model is pi_t; the forward is cheaper than storing them)."""
    every = list(range(len(run.examples)))
    run.model.eval()
    with run.autocast, run.lm_head_layout():
        local = reference_logps(run.model, run.examples, padded_share(every, run.rank, run.world_size)[0],
                                run.args.micro_batch, run.tokenizer.pad_token_id, run.device, progress=run.is_rank0)
    if not run.fsdp:
        return local
    gathered = [torch.zeros_like(local, device=run.device) for _ in range(run.world_size)]
    dist.all_gather(gathered, local.to(run.device))
    ref_logps = torch.zeros(len(run.examples), local.shape[1])
    for r, part in enumerate(gathered):
        ref_logps[padded_share(every, r, run.world_size)[0]] = part.cpu()
    run.model.reshard()  # the root stays unsharded after a forward without backward
    return ref_logps


def magnet_pass(run, ref_logps):
    """--loss_type magnet: log pi_t(y|x) - log pi_0(y|x) of every trained response, once, kept in its
    example ("magnet_gap"), like the reference pass. pi_0 (--magnet) is loaded whole and every process
    scores every example with it: no collective, at the cost of a full copy of pi_0 per process."""
    magnet = load_model(run.args.magnet, dtype=torch.float32, device=run.device)
    alone = replace(run, model=magnet, fsdp=False, rank=0, world_size=1,
                    lm_head_layout=contextlib.nullcontext)
    for ex, gap in zip(run.examples, ref_logps - reference_pass(alone)):
        ex["magnet_gap"] = gap


def train_loop(run, ref_logps):
    """The optimizer steps from the checkpoint's step (or 0) to the last, each on one global batch."""
    args, model = run.args, run.model
    if run.resume is not None:
        run.start_step = load_checkpoint(run.resume, model, run.optimizer, run.scheduler, run.rank)
        if run.is_rank0:
            print(f"resuming from {run.resume} at step {run.start_step} of {run.total_steps}", flush=True)
    if run.fsdp:
        dist.barrier()  # every rank has looked for a checkpoint before rank 0 clears the work dir
    if run.is_rank0:
        if run.resume is None:  # our own work dir, or none (check_inputs refused any other)
            shutil.rmtree(run.work_dir, ignore_errors=True)
        make_work_dir(run.work_dir, "train.py")
    model.train()
    log = StepLog(run.work_dir / "metrics.jsonl", run.start_step, run.total_steps, run.flops_per_token, run.peak_flops,
                  enabled=run.is_rank0)
    for step in range(run.start_step, run.total_steps):
        t_step = time.time()
        batch = global_batch(run, step)
        micro_batches = micro_batches_of(*padded_share(batch, run.rank, run.world_size), run.examples, ref_logps,
                                         args.micro_batch)  # this rank's share, in micro-batches
        # mean over the global batch, not over this rank's share; FSDP averages gradients over
        # ranks, hence * world_size: the gradient is the same for any number of processes
        with run.lm_head_layout():
            sums = accumulate_gradients(model, micro_batches, run.world_size / len(batch), run.tokenizer.pad_token_id,
                                        run.device, loss_type=args.loss_type, eta=args.eta, beta=args.beta, tau=args.tau,
                                        autocast=run.autocast, fsdp=run.fsdp, sync_every=run.sync_every)
        grad_norm, lr = optimizer_step(model, run.optimizer, run.scheduler, args.grad_clip, step)
        sums = summed_over_ranks(dict(sums, **step_tokens(micro_batches)), step, run.fsdp, run.device)
        log.write(step, step // run.steps_per_epoch, sums, time.time() - t_step, lr, grad_norm)
        # with --save_every, also at the end: a run killed while saving the model resumes there
        if args.save_every and ((step + 1) % args.save_every == 0 or step + 1 == run.total_steps):
            save_checkpoint(run.work_dir / "ckpt", step + 1, model, run.optimizer, run.scheduler, run.config, run.rank)
    log.close()


def save(run):
    """pi_{t+1} as an HF directory: the full state dict on rank 0, written next to OUT, renamed into place."""
    model = run.model
    if run.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if model.config.tie_word_embeddings:  # FSDP lists the tied copy too; HF files leave it out
            state.pop("lm_head.weight", None)
    else:
        state = model.state_dict()
    if run.is_rank0:
        final = run.work_dir / "model"
        shutil.rmtree(final, ignore_errors=True)
        try:
            model.save_pretrained(final, state_dict=state)
            run.tokenizer.save_pretrained(final)
        except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error, not an OSError
            shutil.rmtree(final, ignore_errors=True)
            raise InputError(f"{final}: cannot write the model ({str(e).strip().splitlines()[0]}); nothing was put "
                             f"in place at {run.out}: free space and run the same command again") from e
        shutil.copy(run.work_dir / "metrics.jsonl", final / "metrics.jsonl")
        write_json(final / "train_info.json", dict(run_info(run.config), examples=len(run.examples), steps=run.total_steps,
                                                   resumed_from_step=run.start_step, responses_cut=run.responses_cut,
                                                   prompts_cut=sum(ex["prompt_cut"] for ex in run.examples),
                                                   world_size=run.world_size))
        shutil.rmtree(run.out, ignore_errors=True)
        os.replace(final, run.out)
        shutil.rmtree(run.work_dir)  # the training checkpoint is not needed once pi_{t+1} is in place
    if run.fsdp:
        dist.barrier()
        dist.destroy_process_group()


# ---- the reference pass, in length-sorted micro-batches ---------------------------------------


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


if __name__ == "__main__":
    one_line_errors(main)
