#!/usr/bin/env bash
# The GPU session's one command (issue 15, "Measure"; BENCHMARKS.md, "GPU session"):
# makes retrograd importable if it is not (an editable install, offline: nothing
# fetched), runs the GPU tests of CUDA graphs and autotuning (90 s at most), then
# benchmarks/gpu_session.py (~8 minutes at most, compile included),
# writing its JSON, markdown table and log into $OUT when set (the folder a lent
# device machine sends back), else into benchmarks/. Extra arguments pass through:
#   scripts/gpu_benchmarks.sh --no-max-autotune --budget 400
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import retrograd" 2>/dev/null || pip install -q --no-deps --no-build-isolation -e .
# First, at most 90 s: the GPU tests of CUDA graphs and block autotuning (real capture and
# replay, RNG across replays, tuned kernels exact and cached); their log goes beside the
# results and a failure does not stop the measurements (whose compile_step records say
# whether the step was captured: "cudagraphs").
timeout 90 python -m pytest -q -m gpu tests/test_cudagraphs.py tests/test_autotune.py \
    > "${OUT:-benchmarks}/gpu-tests-cudagraphs-autotune.log" 2>&1 || true
tail -3 "${OUT:-benchmarks}/gpu-tests-cudagraphs-autotune.log"
python benchmarks/gpu_session.py --out-dir "${OUT:-benchmarks}" "$@"
