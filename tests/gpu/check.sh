#!/usr/bin/env bash
# The GPU check: every line of the project that runs only on NVIDIA GPUs, in one command (what it runs:
# tests/gpu/check.py). Expected time on one 80 GB GPU: about 4.5 minutes (estimated from the work; not
# yet measured). Exit 0: every check passed; 1: one failed; 3: no CUDA on this machine, nothing run.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${SPPO_PYTHON:-.venv/bin/python}" tests/gpu/check.py
