"""What each optimizer step of train.py sees: its examples and its learning rate.

The order is a function of (seed, epoch) only, so a resumed run meets every batch where it was;
each rank gets the same number of examples (weight-0 padding), as FSDP needs; micro-batches are
cut from length-sorted examples, so each is padded to a similar length. The learning rate follows
HF's schedule, as the official trainer's does; the step itself clips, stops on a non-finite
gradient, steps the optimizer and the schedule.
"""
import math

import torch

from machinery.records import InputError


def longest(example):
    """Tokens in the example's longest sequence. Micro-batches cut from examples sorted by it pad
    less (each is padded to its own longest): the same sums, less work."""
    return len(example["prompt_ids"]) + max(map(len, example["response_ids"]))


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


FEW_STEPS = 10  # fewer optimizer steps than this: train.py says how many, and at which learning rates


def check_schedule(args, n_examples, total_steps, warmup):
    """The learning rate of every optimizer step; refuses a schedule whose steps are all at lr 0
    (few examples for --global_batch: the one step is warmup's first, at 0), which would return
    --model unchanged. --lr 0 itself is allowed (a no-op baseline on purpose), with the warning."""
    lrs = [args.lr * lr_factor(s, warmup, total_steps, args.lr_schedule) for s in range(total_steps)]
    if args.lr > 0 and max(lrs) == 0:
        raise InputError(f"--global_batch {args.global_batch}, --warmup_ratio {args.warmup_ratio}: {n_examples} "
                         f"examples make {total_steps} optimizer step{'s' * (total_steps > 1)}, all at lr 0 (warmup "
                         "starts at 0): training would return --model unchanged; lower --global_batch or "
                         "--warmup_ratio, or give more prompts")
    return lrs


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
