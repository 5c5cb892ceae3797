#!/usr/bin/env bash
# The tests marked `slow` (more transformers architectures, longer fuzzing and
# sweeps), left out of the default `python -m pytest` run that CI uses.
# Extra pytest arguments pass through: scripts/slow_tests.sh -k llama
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest -q -m slow "$@"
