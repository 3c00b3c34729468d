#!/usr/bin/env bash
# Load test of the Triton text model with AIPerf (scripts/load_test.py says what it measures).
#   scripts/load_test.sh --onnx out/onnx                 concurrency 1, 4, 16, 32 -> docs/serving-load.json
#   scripts/load_test.sh --quick --onnx DIR --out FILE   concurrency 1 and 4, short requests (the slow suite)
#   scripts/load_test.sh --url http://host:8000 --model cqil_text --tokenizer out/onnx   any running Triton
#   scripts/load_test.sh --soak 600 --onnx out/onnx --hf-model DIR                         the 10-minute soak
# On a shared machine run it alone, e.g. flock /tmp/cqil-bench.lock nice -n -15 scripts/load_test.sh ...
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
if ! "$VENV/bin/python" -c "import importlib.util as u; assert u.find_spec('pytriton')" 2>/dev/null; then
  # The local server is the tritonserver binary in this wheel; --no-deps as in scripts/test.sh (docs/triton.md).
  "$VENV/bin/python" -m pip install -q --no-deps "nvidia-pytriton==0.7.0" >&2
fi
exec "$VENV/bin/python" scripts/load_test.py "$@"
