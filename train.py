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
import contextlib
import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from tqdm import tqdm

from machinery.checkpoint import check_resumable, latest_checkpoint, load_checkpoint, save_checkpoint, verify_checkpoint
from machinery.flags import train_args
from machinery.launch import dist_env, watch_launcher
from machinery.lm import (LARGE_VOCAB, check_model_files, collate, cpu_lm_head, load_model, load_tokenizer, prompt_token_ids,
                response_token_ids, sequence_logps)
from machinery.records import (InputError, check_model_path, check_not_input, check_output, check_work_dir, fail_with,
                     file_sha256, make_work_dir, one_line_errors, path_stamp, read_records, record_line, run_info,
                     write_json)
from sppo_loss import preference_loss, responses_used
from machinery.train_steps import (FEW_STEPS, NonFiniteError, check_schedule, data_order, longest, lr_factor, micro_batches_of,
                         optimizer_step, padded_share)
from machinery.train_metrics import (STEP_STATS, flops_per_token_terms, metrics_log, peak_tflops, progress_postfix, step_metrics,
                           step_tokens)


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
    batch = {k: v.to(device) for k, v in collate(pairs, pad_id).items()}
    return sequence_logps(model, batch).view(len(examples), -1)


def accumulate_gradients(model, micro_batches, scale, pad_id, device, *, loss_type, eta, beta, tau=0.0,
                         autocast=contextlib.nullcontext(), fsdp=False):
    """Forward and backward over micro-batches, gradients summed: d(scale * sum_b w_b loss_b)/d theta.

    micro_batches: (examples [B], ref_logps [B, R], weights [B]) each. Returns the weighted sums over
    the examples of the loss and of preference_loss's statistics (STEP_STATS), for the metrics.
    """
    sums = dict.fromkeys(STEP_STATS, 0.0)
    for n, (micro, ref, w) in enumerate(micro_batches):
        w = w.to(device)
        if fsdp:  # reduce gradients only once per optimizer step
            model.set_requires_gradient_sync(n == len(micro_batches) - 1)
        with autocast:
            logratios = batch_logps(model, micro, pad_id, device) - ref.to(device)  # log pi_theta/pi_t: [B, R]
        win_rate = torch.stack([ex["win_rate"] for ex in micro]).to(device)  # [B, K]: P(y_k > pi_t | x)
        P = torch.stack([ex["P"] for ex in micro]).to(device)  # [B, K, K]
        used = torch.stack([ex["used"] for ex in micro]).to(device)  # [B, R]: the responses Algorithm 1 picked
        # log pi_t - log pi_0 of each trained response (--loss_type magnet: magnet_pass)
        gap = torch.stack([ex["magnet_gap"] for ex in micro]).to(device) if loss_type == "magnet" else None
        # Eq. 4.6 on each trained response (--loss_type sppo*), or a baseline's loss
        losses, stats = preference_loss(loss_type, logratios=logratios, win_rate=win_rate, P=P, used=used,
                                        eta=eta, beta=beta, tau=tau, magnet_gap=gap)
        ((losses * w).sum() * scale).backward()
        for key, value in dict(stats, loss=losses, weight=torch.ones_like(losses)).items():
            sums[key] = sums[key] + (value.detach() * w).double().sum()
    return dict(zip(STEP_STATS, torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=device)
                                             for k in STEP_STATS]).tolist()))  # one device-to-host copy


# ---- the run: setup, the reference pass, the training loop, the save -----------------------------


def main(argv=None):
    args = train_args(argv, __doc__)  # the flags: flags.py
    watch_launcher()
    run = setup(args)
    ref_logps = reference_pass(run)
    if args.loss_type == "magnet":
        magnet_pass(run, ref_logps)
    train_loop(run, ref_logps)
    save(run)


def setup(args):
    """Check the input, load the data and pi_t, shard it (FSDP2 under torchrun), build the optimizer
    and schedule, and find a checkpoint to resume. Bad input stops every rank alike, before any
    collective: one clear line and exit 2."""
    rank, world, local_rank = dist_env()
    fsdp = "RANK" in os.environ  # under torchrun (even with 1 process): FSDP2
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and device.type == "cuda")
    out = Path(args.out)
    work_dir = out.with_name(out.name + ".tmp")  # metrics.jsonl, ckpt/; becomes nothing once out is written
    if args.cpu_offload and not (fsdp and device.type == "cuda"):
        fail_with(InputError("--cpu_offload needs torchrun on GPUs (FSDP2 offloads to CPU from GPU memory)"))
    tokenizer, examples, n_cut, config, resume, (steps_per_epoch, total_steps, warmup) = check_inputs(args, rank, world)
    if fsdp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    # the model: fp32 master weights; FSDP2 shards each decoder layer, then the root
    model = load_model(args.model, dtype=torch.float32, device="cpu" if fsdp else device)
    model.config.use_cache = False
    flop_counts = flops_per_token_terms(model, args.grad_checkpointing)  # before sharding: whole-model sizes
    if args.freeze_embeddings:  # with a large vocabulary, most of the parameters (Gemma-3-270M: 168M of 268M)
        model.get_input_embeddings().weight.requires_grad_(False)
    if args.grad_checkpointing:  # non-reentrant: the one that composes with FSDP2
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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

    # the optimizer, built right after sharding (it must hold the sharded parameters), and the
    # schedule: HF's linear warmup from 0, then linear decay (or constant), as the official trainer
    opt_cls = torch.optim.RMSprop if args.optimizer == "rmsprop" else torch.optim.AdamW
    optimizer = opt_cls([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total_steps, args.lr_schedule))
    # on the CPU with a large vocabulary the LM head runs in the layout the CPU's GEMM is fast in
    fast_head = device.type == "cpu" and model.config.get_text_config().vocab_size >= LARGE_VOCAB
    return SimpleNamespace(
        args=args, rank=rank, world=world, fsdp=fsdp, device=device, master=rank == 0, out=out, work_dir=work_dir,
        config=config, resume=resume, examples=examples, tokenizer=tokenizer, n_cut=n_cut,
        prompts_cut=sum(ex["prompt_cut"] for ex in examples),
        model=model, optimizer=optimizer, scheduler=scheduler, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
        flop_counts=flop_counts, peak=(args.peak_tflops or peak_tflops(device) or 0) * 1e12 * world,  # 0: unknown
        autocast=torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and not fsdp),  # one process
        head=(lambda: cpu_lm_head(model)) if fast_head else contextlib.nullcontext)


def check_inputs(args, rank, world):
    """The ranked data as examples, the model's tokenizer, the run's config and schedule, and the
    checkpoint to resume, all checked on every rank before any collective, so bad input stops all
    ranks alike with one clear line (exit 2); and the warnings a user must see."""
    out = Path(args.out)
    work_dir = out.with_name(out.name + ".tmp")
    try:
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
        examples, n_cut = build_examples(records, tokenizer, args.loss_type, args.max_prompt_length, args.max_length,
                                         args.prompt_format, path=args.ranked)
        check_model_files(args.model)
        steps_per_epoch = math.ceil(len(examples) / args.global_batch)
        total_steps = steps_per_epoch * args.epochs
        warmup = math.ceil(args.warmup_ratio * total_steps)
        lrs = check_schedule(args, len(examples), total_steps, warmup)
        config = dict(vars(args), world_size=world, ranked_sha256=file_sha256(args.ranked),
                      model_files=path_stamp(args.model))  # a checkpoint resumes only for the same pi_t
        resume = latest_checkpoint(work_dir / "ckpt")
        if resume is not None:
            verify_checkpoint(resume, rank)
            check_resumable(resume, config)
    except InputError as e:
        fail_with(e)
    prompts_cut = sum(ex["prompt_cut"] for ex in examples)
    if rank == 0 and n_cut:
        print(f"warning: {n_cut} responses cut to --max_length {args.max_length} (their end tokens are not trained on)")
    if rank == 0 and prompts_cut:
        print(f"warning: {prompts_cut} prompts cut to their last --max_prompt_length {args.max_prompt_length} tokens")
    if rank == 0 and (total_steps < FEW_STEPS or max(lrs) == 0):
        print(f"warning: {len(examples)} examples make {total_steps} optimizer step{'s' * (total_steps > 1)}, at lr "
              + ", ".join(f"{lr:.3g}" for lr in lrs))
    return tokenizer, examples, n_cut, config, resume, (steps_per_epoch, total_steps, warmup)


def reference_pass(run):
    """log pi_t of every trained response, once, sharded over the ranks and gathered: [examples, R].
    Recomputed on resume (the model at --model is pi_t; the forward is cheaper than storing them)."""
    every = list(range(len(run.examples)))
    run.model.eval()
    with run.autocast, run.head():
        local = reference_logps(run.model, run.examples, padded_share(every, run.rank, run.world)[0],
                                run.args.micro_batch, run.tokenizer.pad_token_id, run.device, progress=run.master)
    if not run.fsdp:
        return local
    gathered = [torch.zeros_like(local, device=run.device) for _ in range(run.world)]
    dist.all_gather(gathered, local.to(run.device))
    ref_logps = torch.zeros(len(run.examples), local.shape[1])
    for r, part in enumerate(gathered):
        ref_logps[padded_share(every, r, run.world)[0]] = part.cpu()
    run.model.reshard()  # the root stays unsharded after a forward without backward
    return ref_logps


def magnet_pass(run, ref_logps):
    """--loss_type magnet: log pi_t(y|x) - log pi_0(y|x) of every trained response, once, kept in its
    example ("magnet_gap"), like the reference pass. pi_0 (--magnet) is loaded whole and every process
    scores every example with it: no collective, at the cost of a full copy of pi_0 per process."""
    magnet = load_model(run.args.magnet, dtype=torch.float32, device=run.device)
    alone = SimpleNamespace(**dict(vars(run), model=magnet, fsdp=False, rank=0, world=1, head=contextlib.nullcontext))
    for ex, gap in zip(run.examples, ref_logps - reference_pass(alone)):
        ex["magnet_gap"] = gap


def train_loop(run, ref_logps):
    """The optimizer steps from the checkpoint's step (or 0) to the last, each on one global batch
    of a (seed, epoch) permutation, so a resumed run meets every batch where it was."""
    args, model = run.args, run.model
    start_step = 0
    if run.resume is not None:
        start_step = load_checkpoint(run.resume, model, run.optimizer, run.scheduler, run.rank)
        if run.master:
            print(f"resuming from {run.resume} at step {start_step} of {run.total_steps}", flush=True)
    run.start_step = start_step
    if run.fsdp:
        dist.barrier()  # every rank has looked for a checkpoint before rank 0 clears the work dir
    if run.master:
        if run.resume is None:  # our own work dir, or none (setup refused any other)
            shutil.rmtree(run.work_dir, ignore_errors=True)
        make_work_dir(run.work_dir, "train.py")
        log = metrics_log(run.work_dir / "metrics.jsonl", start_step)
    model.train()
    t0 = time.time()
    bar = tqdm(total=run.total_steps, initial=start_step, desc="train", disable=not run.master)
    for step in range(start_step, run.total_steps):
        t_step = time.time()
        epoch, i = divmod(step, run.steps_per_epoch)
        batch_idx = data_order(len(run.examples), args.seed, epoch)[i * args.global_batch:(i + 1) * args.global_batch]
        micro_batches = micro_batches_of(*padded_share(batch_idx, run.rank, run.world), run.examples, ref_logps,
                                         args.micro_batch)
        # mean over the global batch, not over this rank's share; FSDP averages gradients over
        # ranks, hence * world: the gradient is the same for any number of processes
        with run.head():
            sums = accumulate_gradients(model, micro_batches, run.world / len(batch_idx), run.tokenizer.pad_token_id,
                                        run.device, loss_type=args.loss_type, eta=args.eta, beta=args.beta, tau=args.tau,
                                        autocast=run.autocast, fsdp=run.fsdp)
        sums.update(step_tokens(micro_batches))
        try:  # a NaN or overflow stops the run here, before anything is saved
            grad_norm, lr_now = optimizer_step(model, run.optimizer, run.scheduler, args.grad_clip)
            if run.fsdp:
                summed = torch.tensor(list(sums.values()), dtype=torch.float64, device=run.device)
                dist.all_reduce(summed)
                sums = dict(zip(sums, summed.tolist()))
            if not math.isfinite(sums["loss"]):
                raise NonFiniteError(f"loss {sums['loss']}")
        except NonFiniteError as e:
            fail_with(InputError(f"step {step + 1}: non-finite {e}; training stopped and nothing was saved "
                                 "(lower --lr or --eta, or check --model)"))
        if run.master:
            m = step_metrics(sums, time.time() - t_step, run.flop_counts, run.peak)
            log.write(json.dumps({"step": step + 1, "epoch": epoch, **m, "lr": lr_now, "grad_norm": grad_norm,
                                  "elapsed": time.time() - t0}) + "\n")
            log.flush()
            bar.set_postfix(progress_postfix(m))
            bar.update(1)
        # with --save_every, also at the end: a run killed while saving the model resumes there
        if args.save_every and ((step + 1) % args.save_every == 0 or step + 1 == run.total_steps):
            save_checkpoint(run.work_dir / "ckpt", step + 1, model, run.optimizer, run.scheduler, run.config, run.rank)
    bar.close()
    if run.master:
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
    if run.master:
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
                                                   resumed_from_step=run.start_step, responses_cut=run.n_cut,
                                                   prompts_cut=run.prompts_cut, world_size=run.world))
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
