"""machinery/fsdp.py and the GPU-side details of train.py that a CPU can check: the process group's
backend and timeout, the per-run choice to reduce gradients at every micro-batch, the model loaded
by rank 0 only and broadcast, and log-probs whose masks are read on the host.

Run as a script under torchrun (`check_sharded_load`), it shards a model the way train.py does and
compares every parameter and buffer with the model loaded whole.
"""
import datetime
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from machinery import fsdp
from test_torchrun import launch, tiny  # noqa: F401 (tiny: the fixture)

ROOT = Path(__file__).resolve().parents[2]


# ---- the backend and the timeout ------------------------------------------------------------------


@pytest.mark.parametrize("device, offload", [("cuda", True), ("cuda", False), ("cpu", False), ("cpu", True)])
def test_backend_serves_the_devices_the_tensors_live_on(device, offload):
    """torch's own parser of the backend string: with --cpu_offload on GPUs the sharded gradients and
    parameters are CPU tensors, so the CPU needs a backend next to NCCL's CUDA one."""
    from torch.distributed.distributed_c10d import Backend, BackendConfig
    backend = fsdp.process_group_backend(device, offload)
    served = BackendConfig(Backend(backend)).get_device_backend_map()
    needed = {device, "cpu"} if offload else {device}
    assert needed <= set(served), (backend, served)
    if device == "cuda":
        assert served["cuda"] == "nccl"  # CUDA tensors stay on NCCL either way
    # today's string on GPUs leaves the CPU without a backend: what made --cpu_offload crash
    assert "cpu" not in BackendConfig(Backend("nccl")).get_device_backend_map()


def test_init_process_group_passes_a_timeout_longer_than_torchs(monkeypatch):
    seen = {}
    monkeypatch.setattr(fsdp.dist, "init_process_group", lambda backend, **kw: seen.update(kw, backend=backend))
    fsdp.init_process_group(torch.device("cpu"), cpu_offload=False)
    assert seen == {"backend": "gloo", "timeout": fsdp.COLLECTIVE_TIMEOUT}
    from torch.distributed.constants import default_pg_timeout
    # longer than gloo's default (30 min) and NCCL's (10 min, not compiled into a CPU build of torch)
    assert fsdp.COLLECTIVE_TIMEOUT > max(default_pg_timeout, datetime.timedelta(minutes=10))


# ---- reduce at every micro-batch, or once per step --------------------------------------------------


def test_unsharded_grad_fits_at_its_bound():
    """The estimate against its own terms, written out: 4 bytes per trainable parameter unsharded,
    4 x (params + trainable x (1 + slots)) / world sharded, LOGIT_BYTES per kept logit."""
    n, trainable, world, tokens, vocab = 10**9, 8 * 10**8, 4, 8 * 1024, 32000
    for optimizer, slots in (("rmsprop", 1), ("adamw", 2)):
        need = 4 * trainable + 4 * (n + trainable * (1 + slots)) / world + fsdp.LOGIT_BYTES * tokens * vocab
        exact = need / fsdp.MEMORY_SHARE
        assert fsdp.unsharded_grad_fits(n, trainable, world, optimizer, tokens, vocab, exact * 1.000001)
        assert not fsdp.unsharded_grad_fits(n, trainable, world, optimizer, tokens, vocab, exact * 0.999999)


def test_presets_reduce_every_micro_batch_where_the_accumulator_would_not_fit():
    """80 GB GPUs, the presets' models (parameter counts and vocabularies of their configs), RMSprop,
    micro_batch x 2 responses x 1024 tokens. gemma-2-9b on 8 GPUs (micro_batch 4: two micro-batches
    a step) would keep a 37 GB accumulator next to 256k-vocabulary logits; Mistral-7B on 4 GPUs fits."""
    gpu = 80 * 2**30
    models = {"mistral-7b": (7_241_732_096, 32000), "llama-3-8b": (8_030_261_248, 128256),
              "gemma-2-9b": (9_241_705_984, 256000)}

    def fits(name, world, micro_batch):
        n, vocab = models[name]
        return fsdp.unsharded_grad_fits(n, n, world, "rmsprop", micro_batch * 2 * 1024, vocab, gpu)
    assert not fits("gemma-2-9b", 8, 4)
    assert fits("mistral-7b", 4, 8) and not fits("mistral-7b", 2, 8)
    assert not fits("llama-3-8b", 4, 8)
    # without the accumulator each of them fits: reducing every micro-batch is enough, no chunked head needed
    for name, world, micro_batch in (("gemma-2-9b", 8, 4), ("llama-3-8b", 4, 8), ("mistral-7b", 2, 8)):
        n, vocab = models[name]
        assert 4 * n * 3 / world + fsdp.LOGIT_BYTES * micro_batch * 2 * 1024 * vocab < fsdp.MEMORY_SHARE * gpu


def test_the_flag_overrides_the_estimate():
    model = torch.nn.Linear(10, 10)
    model.config = SimpleNamespace(get_text_config=lambda: SimpleNamespace(vocab_size=16))
    args = SimpleNamespace(reduce_every_micro_batch=None, micro_batch=2, max_length=8, optimizer="rmsprop")
    assert fsdp.sync_every_micro_batch(model, args, 2, 2, torch.device("cpu")) is False  # 110 parameters fit
    for forced in (True, False):
        args.reduce_every_micro_batch = forced
        assert fsdp.sync_every_micro_batch(model, args, 2, 2, torch.device("cpu")) is forced


# ---- log-probs with the masks read on the host -------------------------------------------------------


def masked_sequence_logps(model, batch):
    """sequence_logps as it was: boolean-mask indexing and nonzero() on the batch's device."""
    predicts = (batch["response_mask"][:, 1:] * batch["attention_mask"][:, :-1]).bool()
    first = int(predicts.any(0).int().argmax())
    keep = predicts.shape[1] - first + 1
    mask = predicts[:, first:]
    targets = batch["input_ids"][:, first + 1:][mask]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], use_cache=False, logits_to_keep=keep).logits[:, -keep:-1]
    token_logps = -F.cross_entropy(logits[mask].float(), targets, reduction="none")
    rows = mask.nonzero(as_tuple=True)[0]
    return torch.zeros(len(mask), dtype=torch.float32).index_add(0, rows, token_logps)


def pairs_of(tok):
    from machinery.lm import prompt_token_ids, response_token_ids
    return [(prompt_token_ids(tok, p), response_token_ids(tok, r, truncated=t)) for p, r, t in [
        ("Which fruit suits the picnic?", "apple", False), ("Name a tool.", "hammer drill saw", True),
        ("Pick a colour for the wedding, a long prompt to force padding of the others.", "blue and red", False),
        ("x", "", True)]]  # a response of no tokens: its row sums nothing


def test_logps_with_host_masks_equal_the_masked_ones_bit_for_bit(toy_world):
    from machinery.lm import collate, load_model, load_tokenizer, sequence_logps
    tok, model = load_tokenizer(toy_world["model"]), load_model(toy_world["model"])
    for side in ("split", "right", "left"):
        batch = collate(pairs_of(tok), tok.pad_token_id, padding_side=side)
        grads = []
        for fn in (lambda: masked_sequence_logps(model, batch), lambda: sequence_logps(model, batch, "cpu"),
                   lambda: sequence_logps(model, batch)):
            model.zero_grad()
            values = fn()
            (values * torch.tensor([1.0, -2.0, 0.5, 3.0])).sum().backward()
            grads.append((values.detach(), [p.grad.clone() for p in model.parameters()]))
        for values, g in grads[1:]:
            assert torch.equal(values, grads[0][0]), side
            assert all(torch.equal(a, b) for a, b in zip(g, grads[0][1])), side


def test_with_a_device_the_masks_never_touch_it(toy_world):
    """The meta device holds no values: any data-dependent op there (int(), nonzero, a boolean-mask
    index: each a host sync on a GPU) raises. The model here is an embedding and a head on meta (HF's
    own forward reads its attention mask on the device, see sequence_logps)."""
    from machinery.lm import collate, load_tokenizer, sequence_logps
    tok = load_tokenizer(toy_world["model"])

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = torch.nn.Embedding(len(tok), 8), torch.nn.Linear(8, len(tok))

        def forward(self, input_ids, attention_mask, position_ids, use_cache, logits_to_keep):
            return SimpleNamespace(logits=self.head(self.emb(input_ids)[:, -logits_to_keep:]))
    batch = collate(pairs_of(tok), tok.pad_token_id)
    with torch.device("meta"):
        model = Tiny()
    out = sequence_logps(model, batch, "meta")
    assert out.device.type == "meta" and out.shape == (4,)
    with pytest.raises((RuntimeError, NotImplementedError)):  # the old code reads the masks where the batch is
        masked_sequence_logps(model, {k: v.to("meta") for k, v in batch.items()})


# ---- rank 0 loads, the others build on meta: the sharded model is the model ---------------------------


def check_sharded_load(model_dir):
    """Under torchrun: train.py's load and shard; every parameter (gathered) and buffer equals the model
    loaded whole, the tied head stays tied, and the forward gives the whole model's logits."""
    import torch.distributed as dist

    from machinery.lm import load_model
    rank = int(__import__("os").environ["RANK"])
    fsdp.init_process_group(torch.device("cpu"), cpu_offload=False)
    model = fsdp.load_for_sharding(model_dir, rank)
    fsdp.shard_model(model, dist.get_world_size(), torch.device("cpu"), bf16=False, cpu_offload=False)
    whole = load_model(model_dir)
    got = {k: v.full_tensor() for k, v in model.named_parameters()}
    want = dict(whole.named_parameters())
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    bad = [k for k in want if not torch.equal(got[k], want[k])]
    assert not bad, f"rank {rank}: parameters differ: {bad}"
    buffers, whole_buffers = dict(model.named_buffers()), dict(whole.named_buffers())
    assert sorted(buffers) == sorted(whole_buffers) and buffers, sorted(buffers)
    bad = [k for k in buffers if not torch.equal(buffers[k], whole_buffers[k])]
    assert not bad, f"rank {rank}: buffers differ: {bad}"
    tied = whole.config.tie_word_embeddings
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    ids = torch.arange(12).view(2, 6) % whole.config.vocab_size
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, whole(input_ids=ids).logits, atol=1e-5)
    print(f"rank {rank}: {len(got)} parameters, {len(buffers)} buffers equal; tied={tied}", flush=True)
    dist.destroy_process_group()


def test_sharded_load_equals_the_whole_model(tiny):  # test_torchrun's tiny tied Llama (rotary inv_freq: a buffer)
    res = launch("tests/distributed/test_fsdp.py", tiny["model"], nproc=2)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert res.stdout.count("buffers equal; tied=True") == 2, res.stdout


if __name__ == "__main__":
    check_sharded_load(sys.argv[1])
