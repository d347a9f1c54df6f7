"""The built-in worlds: a model, prompts, a judge and an evaluator, built once, offline.

`python iterate.py --preset NAME` without --model runs the world worlds/NAME.py. A world module has
  world_paths(out_dir)            -> {model, train_prompts, eval_prompts, judge, judge_path, ...}
  build_world(out_dir, seed)      builds them once into out_dir (records.build_once) and returns them
  evaluate(model_dirs, world, run_dir) -> rows of held-out metrics, one per policy pi_0 .. pi_t
  format_table(rows), plot(rows, path)
and a judge class that rank.py builds as `--judge NAME:Class` (judges.judge_factory finds it here).
"""
