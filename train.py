"""Stage 3 of an SPPO iteration: fit pi_{t+1} to the multiplicative-weights update of pi_t.

One process (CPU or one GPU):
    python train.py --model runs/x/iter0/model --ranked ranked.jsonl --out runs/x/iter1/model
Several processes (FSDP2; gloo on CPU, nccl on GPU), e.g. one node with 8 GPUs:
    torchrun --standalone --nproc_per_node=8 train.py --model ... --ranked ... --out ...

The model at --model is pi_t: the starting point and the frozen reference. Its log-probs of the
training responses are computed once, before the first step, so no second model lives in memory.
Each step: one forward over every (prompt, response) sequence of the batch, summed response
log-probs in fp32, the loss of sppo_loss.py, RMSprop (the paper's optimizer). The result is an
HF-format directory (safetensors + tokenizer) that transformers and vLLM load unchanged.
"""
import argparse
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

from common import (InputError, collate, fail_with, load_model, load_tokenizer, prompt_token_ids, read_records,
                    response_token_ids, run_info, sequence_logps, write_json)
from sppo_loss import LOSS_TYPES, preference_loss, responses_used


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model dir of pi_t (start and reference)")
    ap.add_argument("--ranked", required=True, help="JSONL from rank.py")
    ap.add_argument("--out", required=True, help="directory for pi_{t+1}")
    ap.add_argument("--loss_type", default="sppo", choices=LOSS_TYPES)
    ap.add_argument("--eta", type=float, default=1000.0, help="SPPO step size (official: 1000, i.e. beta=1e-3)")
    ap.add_argument("--beta", type=float, default=0.1, help="DPO/IPO beta")
    ap.add_argument("--optimizer", default="rmsprop", choices=["rmsprop", "adamw"])
    ap.add_argument("--lr", type=float, default=5e-7)
    ap.add_argument("--lr_schedule", default="linear", choices=["linear", "constant"], help="after warmup")
    ap.add_argument("--warmup_ratio", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--global_batch", type=int, default=64, help="prompts per optimizer step, all ranks")
    ap.add_argument("--micro_batch", type=int, default=8, help="prompts per forward on one rank")
    ap.add_argument("--grad_clip", type=float, default=1.0, help="max grad norm; 0 = off")
    ap.add_argument("--max_prompt_length", type=int, default=512, help="prompt tokens kept (the last ones)")
    ap.add_argument("--max_length", type=int, default=1024, help="prompt + response tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="parameter dtype in forward; auto: bfloat16 on GPU, float32 on CPU")
    return ap.parse_args(argv)


def build_examples(records, tokenizer, loss_type, max_prompt_length, max_length):
    """Token ids of the responses each prompt trains on, with their P and win rates.

    Returns (examples, n_cut): example = dict(prompt_ids, response_ids [R lists], P, win_rate,
    used); n_cut counts responses shortened to fit max_length (their EOS is then lost).
    """
    examples, n_cut = [], 0
    for rec in records:
        win_rate = torch.tensor([rec["win_rate"]], dtype=torch.float32)
        used = responses_used(loss_type, win_rate)[0]
        prompt_ids = prompt_token_ids(tokenizer, rec["prompt"])[-max_prompt_length:]
        budget = max_length - len(prompt_ids)
        responses = []
        for k in used.tolist():
            ids = response_token_ids(tokenizer, rec["responses"][k], rec.get("truncated", [False] * len(rec["responses"]))[k])
            n_cut += len(ids) > budget
            responses.append(ids[:budget])
        examples.append({"prompt_ids": prompt_ids, "response_ids": responses, "used": used,
                         "P": torch.tensor(rec["P"], dtype=torch.float32), "win_rate": win_rate[0]})
    return examples, n_cut


def batch_logps(model, examples, pad_id, device):
    """One concatenated forward over all R responses of every example: -> [len(examples), R]."""
    pairs = [(ex["prompt_ids"], r) for ex in examples for r in ex["response_ids"]]
    batch = {k: v.to(device) for k, v in collate(pairs, pad_id).items()}
    return sequence_logps(model, batch).view(len(examples), -1)


def padded_share(indices, rank, world):
    """This rank's share of `indices`, padded so every rank has the same count.

    FSDP runs collectives inside forward and backward, so all ranks must do the same number
    of forwards; a padding example carries weight 0. Returns (indices, weights).
    """
    share = indices[rank::world]
    size = math.ceil(len(indices) / world)
    weights = [1.0] * len(share) + [0.0] * (size - len(share))
    return share + [indices[0]] * (size - len(share)), weights


def main(argv=None):
    args = parse_args(argv)
    # ---- processes and devices: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK -------------------
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if ddp:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    master = rank == 0
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    # ---- data ------------------------------------------------------------------------------
    tokenizer = load_tokenizer(args.model)
    try:
        records = read_records(args.ranked, stage="ranked")
    except InputError as e:
        fail_with(e)
    examples, n_cut = build_examples(records, tokenizer, args.loss_type, args.max_prompt_length, args.max_length)
    if master and n_cut:
        print(f"warning: {n_cut} responses cut to --max_length {args.max_length}; generate with fewer new tokens")

    # ---- model: fp32 master weights; FSDP2 shards each decoder layer, then the root -----------
    model = load_model(args.model, dtype=torch.float32, device=device)
    if ddp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mesh = init_device_mesh(device.type, (world,))
        param_dtype = torch.bfloat16 if args.dtype == "bfloat16" or (args.dtype == "auto" and device.type == "cuda") else None
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)

    # ---- reference log-probs of pi_t, once, sharded over ranks ----------------------------------
    model.eval()
    ref_logps = torch.zeros(len(examples), len(examples[0]["response_ids"]))
    share, _ = padded_share(list(range(len(examples))), rank, world)
    with torch.no_grad():
        local = torch.cat([batch_logps(model, [examples[i] for i in share[s:s + args.micro_batch]],
                                       tokenizer.pad_token_id, device).cpu()
                           for s in tqdm(range(0, len(share), args.micro_batch), desc="reference", disable=not master)])
    if ddp:
        gathered = [torch.zeros_like(local) for _ in range(world)]
        dist.all_gather(gathered, local.to(device) if device.type == "cuda" else local)
        for r, part in enumerate(gathered):
            idx, _ = padded_share(list(range(len(examples))), r, world)
            ref_logps[idx] = part.cpu()
    else:
        ref_logps[share] = local

    # ---- optimizer and schedule: linear warmup, then linear decay (or constant) ---------------
    opt_cls = torch.optim.RMSprop if args.optimizer == "rmsprop" else torch.optim.AdamW
    optimizer = opt_cls(model.parameters(), lr=args.lr)
    steps_per_epoch = math.ceil(len(examples) / args.global_batch)
    total_steps = steps_per_epoch * args.epochs
    warmup = math.ceil(args.warmup_ratio * total_steps)

    def lr_factor(step):
        if step < warmup:
            return (step + 1) / warmup
        if args.lr_schedule == "constant":
            return 1.0
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)

    # ---- training loop ------------------------------------------------------------------------
    out = Path(args.out)
    tmp_out = out.with_name(out.name + ".tmp")
    if master:
        shutil.rmtree(tmp_out, ignore_errors=True)
        tmp_out.mkdir(parents=True)
        log = open(tmp_out / "metrics.jsonl", "w")
    model.train()
    order_rng = torch.Generator().manual_seed(args.seed)
    step, t0 = 0, time.time()
    bar = tqdm(total=total_steps, desc="train", disable=not master)
    for epoch in range(args.epochs):
        order = torch.randperm(len(examples), generator=order_rng).tolist()
        for start in range(0, len(order), args.global_batch):
            batch_idx = order[start:start + args.global_batch]
            share, weights = padded_share(batch_idx, rank, world)
            stats = torch.zeros(4)  # loss sum, chosen logratio sum, rejected logratio sum, examples
            for s in range(0, len(share), args.micro_batch):
                micro = [examples[i] for i in share[s:s + args.micro_batch]]
                w = torch.tensor(weights[s:s + args.micro_batch], device=device)
                if ddp:  # reduce gradients only once per optimizer step
                    model.set_requires_gradient_sync(s + args.micro_batch >= len(share))
                logratios = batch_logps(model, micro, tokenizer.pad_token_id, device) - \
                    ref_logps[share[s:s + args.micro_batch]].to(device)
                losses = preference_loss(args.loss_type, logratios,
                                         torch.stack([ex["P"] for ex in micro]).to(device),
                                         torch.stack([ex["win_rate"] for ex in micro]).to(device),
                                         torch.stack([ex["used"] for ex in micro]).to(device), args.eta, args.beta)
                # mean over the global batch; FSDP averages gradients over ranks, hence * world
                ((losses * w).sum() * world / len(batch_idx)).backward()
                lr_w = logratios.detach()
                stats += torch.stack([(losses.detach() * w).sum(), (lr_w[:, 0] * w).sum(),
                                      (lr_w[:, -1] * w).sum(), w.sum()]).cpu()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr_now = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1
            if ddp:
                dist.all_reduce(stats)
            if master:
                n = stats[3].item()
                log.write(json.dumps({"step": step, "epoch": epoch, "loss": stats[0].item() / n, "lr": lr_now,
                                      "grad_norm": grad_norm.item(), "logratio_first": stats[1].item() / n,
                                      "logratio_last": stats[2].item() / n, "elapsed": time.time() - t0}) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{stats[0].item() / n:.4g}")
                bar.update(1)
    bar.close()

    # ---- save pi_{t+1}: full state dict on rank 0, HF format, then rename into place ----------
    if ddp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = model.state_dict()
    if master:
        log.close()
        model.save_pretrained(tmp_out, state_dict=state)
        tokenizer.save_pretrained(tmp_out)
        write_json(tmp_out / "train_info.json", dict(run_info(vars(args)), examples=len(examples), steps=step,
                                                     responses_cut=n_cut, world_size=world))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp_out, out)
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
