"""Every benchmark script still imports what it uses from the stages and the machinery (a rename there
must reach bench/ too); running them is BENCHMARKS.md's business, not the suite's."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_bench_script_imports():
    scripts = sorted(p.stem for p in (ROOT / "bench").glob("*.py") if p.stem != "_util")
    assert len(scripts) >= 10, scripts
    code = ("import importlib, sys; sys.path.insert(0, 'bench'); sys.argv = ['bench']\n"
            f"for name in {scripts!r}:\n"
            "    importlib.import_module(name)\n")  # their main() runs only as __main__
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
