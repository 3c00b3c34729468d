#!/usr/bin/env bash
# Run the test suite in a project virtualenv (created on first use).
#   scripts/test.sh            fast suite (tiny random models, no downloads)
#   scripts/test.sh --slow     also the real-model tests (fetches SmolLM2-135M once, ~1 min per test file)
#   extra arguments go to pytest, e.g. scripts/test.sh -k plan -x
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

markers=(-m "not slow")
args=()
for arg in "$@"; do
  if [[ "$arg" == "--slow" ]]; then markers=(-m "slow or not slow"); else args+=("$arg"); fi
done
if [[ "${markers[1]}" != "not slow" ]] && ! "$VENV/bin/python" -c "import importlib.util as u; assert u.find_spec('pytriton')" 2>/dev/null; then
  # The real-Triton test runs the tritonserver binary shipped in this wheel. --no-deps: the wheel pins
  # numpy<2 for its own Python API, which the tests do not use (docs/triton.md).
  "$VENV/bin/python" -m pip install -q --no-deps "nvidia-pytriton==0.7.0" >&2
fi
# Two workers (one per core here; --dist loadfile keeps a module's shared fixtures in one worker): the fast
# suite takes about 4 min instead of 7 on the 2-core build machine. CQIL_TEST_WORKERS=0 runs in one process.
exec "$VENV/bin/python" -m pytest -n "${CQIL_TEST_WORKERS:-2}" --dist loadfile "${markers[@]}" "${args[@]}"
