#!/usr/bin/env bash
# The GPU session's one command (issue 15, "Measure"; BENCHMARKS.md, "GPU session"):
# makes retrograd importable if it is not (an editable install, offline: nothing
# fetched), then runs benchmarks/gpu_session.py (~8 minutes at most, compile included),
# writing its JSON, markdown table and log into $OUT when set (the folder a lent
# device machine sends back), else into benchmarks/. Extra arguments pass through:
#   scripts/gpu_benchmarks.sh --no-max-autotune --budget 400
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import retrograd" 2>/dev/null || pip install -q --no-deps --no-build-isolation -e .
python benchmarks/gpu_session.py --out-dir "${OUT:-benchmarks}" "$@"
