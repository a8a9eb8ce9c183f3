#!/usr/bin/env bash
# Builds the CPU preset and runs every test: unit tests, PyTorch reference checks and the
# multi-rank tests under mpirun. Exits non-zero on any failure.
#
#   scripts/test.sh [PRESET] [CTEST ARGS...]     PRESET: cpu (default) or cpu-asan
set -euo pipefail
cd "$(dirname "$0")/.."
preset="${1:-cpu}"
shift || true
scripts/setup.sh "$preset"
# Open MPI refuses to run as root without these; harmless otherwise.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
ctest --preset "$preset" -j "$(nproc)" "$@"
