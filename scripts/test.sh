#!/usr/bin/env bash
# Builds dstx with warnings as errors and runs the whole test suite (unit, integration, CLI, benchmark smoke).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
build=${DSTX_BUILD_DIR:-build-test}
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDSTX_WERROR=ON >/dev/null
cmake --build "$build" -j"$(nproc)"
cd "$build"
ctest --output-on-failure -j"$(nproc)" --timeout 900
