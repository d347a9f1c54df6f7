#!/usr/bin/env bash
# Create .venv with everything the project and its tests need. CPU torch here; see README for GPUs.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
# llm-blender 0.0.2 without its unpinned dependencies (see rank.py: llm_blender_compat)
.venv/bin/pip install -q --disable-pip-version-check --no-deps llm-blender==0.0.2
