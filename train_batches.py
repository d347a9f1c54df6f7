"""How train.py cuts its data: each epoch's order, each rank's share of a global batch, micro-batches.

The order is a function of (seed, epoch) only, so a resumed run meets every batch where it was;
each rank gets the same number of examples (weight-0 padding), as FSDP needs; micro-batches are
cut from length-sorted examples, so each is padded to a similar length.
"""
import math

import torch


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
