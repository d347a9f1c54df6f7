"""train.py's metrics: what one optimizer step did, by name (metrics.jsonl and the progress bar).

Computed from sums the step already has (the loss and preference_loss's statistics, weighted per
example) and from the token counts of its micro-batches, outside the gradient computation.
"""
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

# what accumulate_gradients sums over a step's micro-batches, each weighted by the example's weight
STEP_STATS = ("loss", "logratio_chosen", "logratio_rejected", "target_chosen", "target_rejected", "ordered",
              "preferred", "weight")


def step_tokens(micro_batches):
    """{tokens, tokens_sq}: the sums of n and n^2 over the step's sequences of n real tokens
    (throughput and the FLOP estimate); weight-0 padding examples are not useful work."""
    lengths = [len(ex["prompt_ids"]) + len(r) for micro, _, w in micro_batches
               for ex, weight in zip(micro, w.tolist()) if weight > 0 for r in ex["response_ids"]]
    return {"tokens": float(sum(lengths)), "tokens_sq": float(sum(n * n for n in lengths))}


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
    """One step's metrics by name, from the STEP_STATS and step_tokens sums over all ranks and the step's wall time."""
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


class StepLog:
    """What rank 0 reports of each optimizer step: a line of metrics.jsonl and the progress bar.
    metrics.jsonl keeps the lines of the steps before start_step (those a resumed checkpoint
    holds) and no later ones; on the other ranks nothing is written or shown."""

    def __init__(self, path: Path, start_step, total_steps, flops_per_token, peak_flops, enabled):
        self.flops_per_token, self.peak_flops, self.t0 = flops_per_token, peak_flops, time.time()
        self.file = None
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            kept = [line for line in (path.read_text().splitlines() if path.exists() else [])
                    if json.loads(line)["step"] <= start_step]
            path.write_text("".join(line + "\n" for line in kept))
            self.file = open(path, "a")
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", disable=not enabled)

    def write(self, step, epoch, sums, seconds, lr, grad_norm):
        """Step `step` (0-based) of `epoch`: its sums over all ranks and its wall time in seconds."""
        if self.file is None:
            return
        m = step_metrics(sums, seconds, self.flops_per_token, self.peak_flops)
        self.file.write(json.dumps({"step": step + 1, "epoch": epoch, **m, "lr": lr, "grad_norm": grad_norm,
                                    "elapsed": time.time() - self.t0}) + "\n")
        self.file.flush()
        self.bar.set_postfix(progress_postfix(m))
        self.bar.update(1)

    def close(self):
        self.bar.close()
        if self.file is not None:
            self.file.close()
