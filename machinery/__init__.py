"""The machinery the five stages stand on; none of it is SPPO. The algorithm is in the files above
this package: generate.py, rank.py, train.py, iterate.py and sppo_loss.py.

Which module answers which question:
  flags         what a stage's command line takes, its defaults (the paper's values), the presets
  records       what a stage file holds and how it is checked; prompt sources; files written atomically
  lm            how a model and its tokenizer load; chat templates; token ids; log pi(y | x) of a batch
  judges        which judge rank.py builds (PairRM, a reward model, module:factory) and how it is called
  launch        which rank this is and its share; how iterate.py starts a stage, and watches it
  lifetime      that nothing a stage starts outlives it (SIGKILL included), and that Ctrl-C ends it
  train_steps   how a step of train.py runs: each rank's share in micro-batches, the optimizer step, sums over ranks
  train_metrics what train.py logs per step (metrics.jsonl, the progress bar)
  fsdp          how train.py's model is sharded under torchrun: process group, loading on rank 0, gradient sync
  checkpoint    train.py's resumable checkpoints (torch.distributed.checkpoint)
  vllm_backend  generate.py's vLLM engine: its arguments, one seeded request per sample, its lifetime
"""
