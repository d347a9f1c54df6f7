"""Stage 1 of an SPPO iteration: sample K responses per prompt from the policy pi_t.

    python generate.py --model runs/x/iter0/model --prompts prompts.jsonl --out responses.jsonl --K 5
    torchrun --standalone --nproc_per_node=8 generate.py ...same flags...   # one shard per GPU

Under torchrun each rank generates a contiguous slice of the prompts on its own device
(cuda:LOCAL_RANK), writes it to a shard file, and rank 0 merges the shards in prompt order
(launch.run_sharded); a re-run after a crash redoes only the shards that were not written.

Every record of the prompt file gets "responses" (K strings) and "truncated" (K flags: the
response hit --max_new_tokens before an end-of-sequence token). Prompts go through the model's
chat template as token ids, so nothing in a prompt is cut and BOS appears once.

Sampling is deterministic per (seed, prompt id, k): each of the K rows of a prompt draws its
randomness from its own generator, so a re-run, another batch size or another number of
processes gives the same samples (the merged output of N processes equals one process's).
This uses HF `generate` in greedy mode with a logits processor that adds Gumbel noise to the
tempered, filtered logits: the argmax of logits/T + Gumbel is an exact sample from softmax(logits/T).
`--backend vllm` samples the same distribution with the vLLM engine (vllm_backend.py), also
fixed per (seed, prompt id, k).
"""
import os

import torch
from tqdm import tqdm

from machinery.flags import generate_parser, missing_package
from machinery.launch import dist_env, run_sharded, watch_launcher
from machinery.lm import (check_model_files, checked_prompt_ids, cpu_lm_head, load_model, load_tokenizer, model_context,
                          prompt_token_ids, row_seed, stop_token_ids)
from machinery.records import (InputError, check_model_path, check_not_input, check_output, check_work_dir, one_line_errors,
                               path_stamp, read_records, run_info, write_json)
from machinery.vllm_backend import check_engine_settings, engine_kwargs, generate_responses_vllm, prepare_vllm_process, start_engine


def filter_logits(logits, top_k: int, top_p: float):
    """Keep the top_k tokens (0: all) and the smallest set with probability >= top_p: [N, V]."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class GumbelSampler:
    """Logits processor: per-row generators turn greedy decoding into seeded sampling.

    Each row's noise is drawn on its generator's device: generators on the model's device (a GPU's
    own Philox generators) keep every draw there, with no host work or copy per row and step; a
    GPU's draws differ from a CPU's for the same seed, each fixed per (seed, prompt id, k)."""

    def __init__(self, generators, temperature: float, top_k: int, top_p: float):
        self.generators, self.temperature, self.top_k, self.top_p = generators, temperature, top_k, top_p

    def __call__(self, input_ids, scores):
        logits = filter_logits(scores.float() / self.temperature, self.top_k, self.top_p)
        gumbel = torch.stack([torch.rand(logits.shape[-1], generator=g, device=g.device) for g in self.generators])
        gumbel.clamp_(1e-20, 1.0 - 1e-7).log_().neg_().log_().neg_()  # -log(-log u), in place: [N, V]
        return logits + gumbel


@torch.no_grad()
def generate_responses(model, tokenizer, records, K, temperature=1.0, top_p=1.0, top_k=0,
                       max_new_tokens=128, seed=0, batch_size=16, desc="generate", prompt_format="auto"):
    """K responses per record: returns new records with "responses" and "truncated"."""
    from transformers import GenerationConfig, LogitsProcessorList
    device = next(model.parameters()).device
    stops = stop_token_ids(model.generation_config.eos_token_id, tokenizer, prompt_format)
    prompt_ids = [prompt_token_ids(tokenizer, r["prompt"], prompt_format) for r in records]
    # longest prompts first: batches of similar length waste less padding
    order = sorted(range(len(records)), key=lambda i: -len(prompt_ids[i]))
    results = {}
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(stops))
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        idx = order[start:start + batch_size]
        rows = [prompt_ids[i] for i in idx for _ in range(K)]
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows], device=device)
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        processors = LogitsProcessorList()
        if temperature > 0:
            gens = [torch.Generator(device).manual_seed(row_seed(seed, records[i]["id"], k)) for i in idx for k in range(K)]
            processors.append(GumbelSampler(gens, temperature, top_k, top_p))
        with cpu_lm_head(model):  # the GEMM layout the CPU runs faster (lm.py); no change on a GPU
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                 logits_processor=processors)
        new_tokens = out[:, width:].tolist()
        for j, i in enumerate(idx):
            texts, truncated = [], []
            for ids in new_tokens[j * K:(j + 1) * K]:
                end = next((n for n, t in enumerate(ids) if t in stops), None)
                truncated.append(end is None)
                texts.append(tokenizer.decode(ids[:end], skip_special_tokens=True))
            results[i] = dict(records[i], responses=texts, truncated=truncated)
    return [results[i] for i in range(len(records))]


def sample_responses(model_dir, records, K, backend="hf", engine=None, dtype="auto", device="cpu", batch_size=16,
                     desc="generate", prompt_format="auto", **decoding):
    """K responses per record from the model in model_dir, by HF's generate (the model loaded for
    the call) or by vLLM (engine: engine_kwargs(...); the engine this process keeps, its weights
    reloaded, when it can: vllm_backend.start_engine). decoding: temperature, top_p, top_k,
    max_new_tokens, seed."""
    tokenizer = load_tokenizer(model_dir)
    if backend == "vllm":
        return generate_responses_vllm(start_engine(**engine), model_dir, tokenizer, records, K,
                                       prompt_format=prompt_format, **decoding)
    dtype = {"auto": torch.bfloat16 if device != "cpu" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = load_model(model_dir, dtype=dtype, device=device).eval()
    return generate_responses(model, tokenizer, records, K, batch_size=batch_size, desc=desc,
                              prompt_format=prompt_format, **decoding)


def sampler(backend="hf", dtype="auto", kv_cache_gib=None, enforce_eager=False, gpu_memory_utilization=None):
    """sample(model_dir, records, K, batch_size=16, desc=..., **decoding), as sample_responses with this
    backend on this process's device: how code outside this stage (a world's evaluation) samples with
    a run's --backend."""
    def sample(model_dir, records, K, batch_size=16, desc="generate", **decoding):
        engine = None
        if backend == "vllm":
            prepare_vllm_process(0, 1, 1)
            tokenizer = load_tokenizer(model_dir)
            longest = max(len(prompt_token_ids(tokenizer, r["prompt"])) for r in records) + decoding.get("max_new_tokens", 128)
            engine = engine_kwargs(model_dir, longest, dtype, kv_cache_gib, enforce_eager,
                                   gpu_memory_utilization=gpu_memory_utilization)
        device = "cuda" if backend == "hf" and torch.cuda.is_available() else "cpu"
        return sample_responses(model_dir, records, K, backend, engine, dtype, device, batch_size, desc, **decoding)
    return sample


def main(argv=None):
    args = generate_parser(__doc__).parse_args(argv)  # the flags: flags.py
    watch_launcher()
    rank, world, local_rank = dist_env()
    records, engine = check_inputs(args, world, local_rank)  # raises InputError: bad input stops every rank alike
    device = f"cuda:{local_rank}" if args.backend == "hf" and torch.cuda.is_available() else "cpu"

    def work(shard):  # the model is loaded only by a rank that has work left
        return sample_responses(args.model, shard, args.K, args.backend, engine, args.dtype, device, args.batch_size,
                                "generate" if world == 1 else f"generate rank {rank}/{world}",
                                args.prompt_format, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                max_new_tokens=args.max_new_tokens, seed=args.seed)
    run_sharded(records, args.out, work, config=dict(vars(args), model=path_stamp(args.model)))
    if rank == 0:
        write_json(f"{args.out}.info.json", dict(run_info(vars(args)), world_size=world))


def check_inputs(args, world, local_rank):
    """The prompts, read and checked, and the vLLM engine's arguments (None with --backend hf).
    Every rank checks paths and the whole file before any work, so bad input stops all ranks
    alike: InputError, one line and exit 2 (records.one_line_errors)."""
    check_model_path(args.model)
    check_output(args.out)
    records = read_records(args.prompts, stage="prompts")
    for out in (args.out, f"{args.out}.info.json", f"{args.out}.shards"):
        check_not_input(out, {"--model": args.model, "--prompts": args.prompts})
    check_work_dir(f"{args.out}.shards", "generate.py")
    check_model_files(args.model)
    context = model_context(args.model)  # a prompt must leave room for the new tokens
    if context and args.max_new_tokens >= context:
        raise InputError(f"--max_new_tokens {args.max_new_tokens}: the model takes only {context} tokens in all")
    prompt_ids = checked_prompt_ids(records, load_tokenizer(args.model), args.prompts,
                                    context and context - args.max_new_tokens,
                                    f"the model's context ({context}) minus --max_new_tokens ({args.max_new_tokens})",
                                    args.prompt_format)
    if args.backend != "vllm":
        return records, None
    check_engine_settings(temperature=args.temperature)  # the engine's own limits, before it starts
    if (missing := missing_package(args)):  # --backend vllm without vllm
        raise InputError(missing)
    prepare_vllm_process(local_rank, world, args.tensor_parallel_size)  # vLLM picks its device: no CUDA query before
    return records, engine_kwargs(args.model, max(map(len, prompt_ids)) + args.max_new_tokens, args.dtype,
                                  args.kv_cache_gib, args.enforce_eager, args.seed, args.tensor_parallel_size,
                                  engines=int(os.environ.get("LOCAL_WORLD_SIZE", world)),
                                  gpu_memory_utilization=args.gpu_memory_utilization)


if __name__ == "__main__":
    one_line_errors(main)
