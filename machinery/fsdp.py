"""train.py under torchrun: the process group, the model loaded once and sharded with FSDP2, and
whether gradients are reduced at every micro-batch.

Each choice here answers a behaviour of torch.distributed (2.13) that only shows on GPUs at the
presets' sizes; the reasons are at each function.
"""
import datetime
import os

import torch
import torch.distributed as dist

# How long a collective may wait before the process group gives up. torch's defaults are 10 min for
# NCCL (torch.distributed.constants.default_pg_nccl_timeout, enforced by ProcessGroupNCCL's watchdog)
# and 30 min for gloo: the ranks wait that long in a barrier while rank 0 alone gathers the full
# fp32 model and writes it (train.save: 29-37 GB for the 7-9B presets, to a shared filesystem on
# several nodes) or hashes its checkpoint files. A rank that dies makes torchrun stop the others, so
# the timeout only bounds a silent hang: a long one costs little.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


def process_group_backend(device_type, cpu_offload):
    """The backend string for init_process_group.

    gloo on CPUs, NCCL on GPUs; with --cpu_offload both: FSDP2's CPUOffloadPolicy keeps the sharded
    parameters and gradients as CPU DTensors, so the gradient-norm all-reduce of clip_grad_norm_, the
    full-state-dict gather at the save and the rank-0 broadcast at load run collectives on CPU
    tensors, and NCCL serves only "cuda" (torch distributed_c10d.py: Backend.backend_capability).
    "cpu:gloo,cuda:nccl" sends each tensor to the backend of its device.
    """
    if device_type != "cuda":
        return "gloo"
    return "cpu:gloo,cuda:nccl" if cpu_offload else "nccl"


def init_process_group(device, cpu_offload):
    dist.init_process_group(process_group_backend(device.type, cpu_offload), timeout=COLLECTIVE_TIMEOUT)


# ---- the model: loaded by rank 0 only, sharded, then broadcast ------------------------------------


def load_for_sharding(model_dir, rank):
    """pi_t for FSDP2: rank 0 loads the weights (fp32, CPU), every other rank builds the same model on
    the meta device (no memory). Loading on every rank would hold world x the fp32 model in host RAM
    at once (8 ranks of a 7-9B model: 232-296 GB); shard_model sends rank 0's values to the others."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from machinery.lm import load_model
    if rank == 0:
        return load_model(model_dir, dtype=torch.float32, device="cpu")
    with torch.device("meta"):  # the config and attention implementation from_pretrained would choose
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.float32)


def shard_model(model, world, device, bf16, cpu_offload):
    """FSDP2 on each decoder layer, then the root; rank 0's weights (load_for_sharding) go to every rank.

    fully_shard on a meta model leaves meta shards; to_empty allocates them (on the CPU with
    CPUOffloadPolicy, which refuses shards elsewhere: _fsdp_param_group._validate_cpu_offload_params)
    and set_model_state_dict(broadcast_from_rank0=True) fills them from rank 0's full state dict, one
    tensor at a time (torch.distributed.checkpoint.state_dict._broadcast_state_dict). A tied LM head
    is one parameter to FSDP and is filled once. Buffers are not all in the state dict (rotary
    inv_freq and Gemma's embed_scale are non-persistent), so each is broadcast from rank 0 as well.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    rank = dist.get_rank()
    full = model.state_dict() if rank == 0 else {}  # references rank 0's tensors: no copy
    mesh = init_device_mesh(device.type, (world,))
    # bf16 compute, fp32 gradient reduction; the sharded parameters the optimizer sees stay fp32
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp, offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload)  # moves rank 0's shards to the device
    if rank != 0:
        model.to_empty(device="cpu" if cpu_offload else device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    for module in model.modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None:
                if rank != 0:  # (to_empty put them with the parameters; the forward needs them on the device)
                    buf = torch.empty_like(buf, device=device)
                    setattr(module, name, buf)
                dist.broadcast(buf, src=0)
    return model


# ---- gradient accumulation: reduce at each micro-batch, or once per step --------------------------

# The training state besides the gradients, per parameter: the fp32 parameter, its gradient, and the
# optimizer's slots (RMSprop: square_avg; AdamW: exp_avg, exp_avg_sq), all sharded over the ranks.
OPTIMIZER_SLOTS = {"rmsprop": 1, "adamw": 2}
# What a micro-batch's forward and backward hold besides the model: its logits are the largest part
# with a large vocabulary (the LM head's output in the compute dtype, its fp32 copy, log_softmax and
# its gradient: ~12 bytes per kept position and vocabulary entry), plus the activations.
LOGIT_BYTES = 12
# The share of device memory the estimate may fill: the rest is the allocator's fragmentation, the
# CUDA context, NCCL's buffers and the unsharded bf16 layer being computed.
MEMORY_SHARE = 0.8


def unsharded_grad_fits(n_params, n_trainable, world, optimizer, micro_tokens, vocab, device_bytes):
    """Whether skipping the gradient reduction on a step's non-final micro-batches fits in memory.

    With set_requires_gradient_sync(False), FSDP2 keeps each parameter's gradient unsharded, in the
    reduce dtype (fp32), until the micro-batch that syncs (torch distributed/fsdp/_fully_shard/
    _fsdp_param.py: FSDPParam.to_accumulated_grad_if_needed, unsharded_accumulated_grad; with fp32
    compute the unsharded parameter's .grad itself): 4 bytes x every trainable parameter on every
    rank, not divided by the world size (gemma-2-9b: 37 GB per GPU). Reducing at every
    micro-batch keeps only the sharded gradient, at the cost of one reduce-scatter per micro-batch
    instead of per step (overlapped with the backward). The estimate: that accumulator, plus the
    sharded training state, plus the largest micro-batch's logits (`micro_tokens` kept positions x
    `vocab`), against MEMORY_SHARE of `device_bytes`. The gradient is the same either way (up to
    the order of fp32 additions).
    """
    accumulator = 4 * n_trainable
    sharded = 4 * (n_params + n_trainable * (1 + OPTIMIZER_SLOTS[optimizer])) / world
    logits = LOGIT_BYTES * micro_tokens * vocab
    return accumulator + sharded + logits <= MEMORY_SHARE * device_bytes


def device_memory(device, local_world):
    """Bytes of memory one rank may use: its GPU's, or on the CPU a share of the host's RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // local_world


def sync_every_micro_batch(model, args, responses, world, device):
    """train.py's choice for this run: --reduce_every_micro_batch if given, else unsharded_grad_fits'
    estimate for `model` (before sharding). One rank's micro-batch holds at most micro_batch x
    `responses` sequences of max_length tokens."""
    if args.reduce_every_micro_batch is not None:
        return args.reduce_every_micro_batch
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    micro_tokens = args.micro_batch * responses * args.max_length
    vocab = model.config.get_text_config().vocab_size
    return not unsharded_grad_fits(n_params, n_trainable, world, args.optimizer, micro_tokens, vocab,
                                   device_memory(device, int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
