#!/usr/bin/env bash
# The main job end to end on SmolLM2-135M-Instruct: set up, import the checkpoint, calibrate,
# convert with the TEAL-style recipe, evaluate dense and sparse side by side, generate.
#
# Environment: SPARSITY (default 0.5), RECIPE (teal-uniform), TOKENS (calibration tokens, 16384),
# WINDOWS (evaluation windows of 512 tokens, 16; the README tables use 64).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
scripts/import_models.sh smollm2
# shellcheck disable=SC1091
source .venv/bin/activate

sparsity=${SPARSITY:-0.5}
recipe=${RECIPE:-teal-uniform}
shared=../shared/data
if [ -f "$shared/wikitext-2/valid.txt" ] && [ -f "$shared/wikitext-2-raw/wiki.test.raw" ]; then
  calibration_text=$shared/wikitext-2/valid.txt
  evaluation_text=$shared/wikitext-2-raw/wiki.test.raw
elif python -m pip install -q 'datasets>=2.18' 2>/dev/null &&
     python -c "import datasets; datasets.load_dataset('wikitext', 'wikitext-2-raw-v1', split='validation')" >/dev/null 2>&1; then
  calibration_text=wikitext:wikitext-2-raw-v1:validation
  evaluation_text=wikitext:wikitext-2-raw-v1:test
else
  calibration_text=builtin:pydoc-calibration
  evaluation_text=builtin:pydoc-evaluation
fi
echo "main job: calibrating on $calibration_text, evaluating on $evaluation_text"

mkdir -p runs
moyu calibrate models/smollm2-135m --data "$calibration_text" --output runs/smollm2-135m.calib \
  --tokens "${TOKENS:-16384}" --overwrite
moyu convert models/smollm2-135m --calibration runs/smollm2-135m.calib --recipe "$recipe" \
  --sparsity "$sparsity" --output "runs/smollm2-135m-$recipe" --overwrite --eval-windows 0
moyu eval "runs/smollm2-135m-$recipe" --data "$evaluation_text" --windows "${WINDOWS:-16}" --compare-dense
moyu generate "runs/smollm2-135m-$recipe" "The history of the Roman Empire" --max-new-tokens 40
