"""The machinery of train.py's optimizer steps (the step's data order and the lr schedule are in train.py).

Each rank gets the same number of a global batch's examples (weight-0 padding), as FSDP needs;
micro-batches are cut from length-sorted examples, so each is padded to a similar length. The step
itself clips, stops on a non-finite gradient, steps the optimizer and the schedule; the step's sums
are then added up over the ranks, and a non-finite loss stops the run too.
"""
import math

import torch
import torch.distributed as dist

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


def optimizer_step(model, optimizer, scheduler, grad_clip, step):
    """Clip, step, zero the gradients, advance the schedule -> (grad norm before clipping, lr used).

    A non-finite gradient (a NaN or an overflow anywhere in the loss) stops training before the
    step can write NaN into the parameters; the norm is global, so every rank stops alike.
    """
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # a DTensor under FSDP2
    if not torch.isfinite(grad_norm):
        raise non_finite(step, f"gradient norm {grad_norm.item()}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lr = scheduler.get_last_lr()[0]
    scheduler.step()
    return grad_norm.item(), lr


def summed_over_ranks(sums, step, fsdp, device):
    """A step's sums (floats by name) over every rank's share of the global batch; a non-finite
    loss stops the run here, before anything is saved."""
    if fsdp:
        summed = torch.tensor(list(sums.values()), dtype=torch.float64, device=device)
        dist.all_reduce(summed)
        sums = dict(zip(sums, summed.tolist()))
    if not math.isfinite(sums["loss"]):
        raise non_finite(step, f"loss {sums['loss']}")
    return sums


def non_finite(step, what):
    """The error that stops training at a NaN or infinite loss or gradient: nothing is saved."""
    return InputError(f"step {step + 1}: non-finite {what}; training stopped and nothing was saved "
                      "(lower --lr or --eta, or check --model)")
