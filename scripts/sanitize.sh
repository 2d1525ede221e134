#!/usr/bin/env bash
# The sanitizer stages of CI (cmake/DstxSanitize.cmake, tests/fuzz/README.md). Each builds in its own directory
# and runs tests there; the first failure stops the script.
#
#   scripts/sanitize.sh asan   gcc, -fsanitize=address,undefined: the whole test suite but the QEMU test and the
#                              C-ABI packaging tests (see below), including the fuzz corpora's replay
#   scripts/sanitize.sh tsan   gcc, -fsanitize=thread: the same tests
#   scripts/sanitize.sh fuzz   clang, libFuzzer + ASan + UBSan: each fuzz target replays its corpus, then fuzzes
#                              for DSTX_FUZZ_SECONDS (default 20) seconds; skipped with a note when clang or its
#                              runtimes are missing
#   scripts/sanitize.sh all    the three, in that order
#
# Not under sanitizers: qemu_migrate_through_dstx (a TCG guest; minutes, and it tests QEMU's side), and capi_* (they
# build a C program and an external CMake project against the installed library with their own flags, which an
# ASan/TSan-instrumented libdstx.a cannot link without). The C ABI's code runs under the sanitizers through
# test_cli and the engine tests.
#
# Environment: DSTX_SAN_BUILD_PREFIX (default "build-": build-asan, build-tsan, build-fuzz), DSTX_JOBS (default
# nproc), DSTX_FUZZ_SECONDS.
set -euo pipefail
cd "$(dirname "$0")/.."

prefix=${DSTX_SAN_BUILD_PREFIX:-build-}
jobs=${DSTX_JOBS:-$(nproc)}
fuzz_seconds=${DSTX_FUZZ_SECONDS:-20}

# Every report is fatal and names its frames; leaks count (LeakSanitizer is part of ASan).
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:check_initialization_order=1:strict_init_order=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export TSAN_OPTIONS=${TSAN_OPTIONS:-halt_on_error=1:second_deadlock_stack=1}

not_sanitized='^(qemu_migrate_through_dstx|capi_.*)$'

configure() {  # DIR, then cmake arguments
  local dir=$1
  shift
  cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDSTX_WERROR=ON "$@" >/dev/null
}

stage_asan() {
  local b=${prefix}asan
  configure "$b" -DDSTX_SANITIZE=address,undefined
  cmake --build "$b" -j"$jobs"
  (cd "$b" && ctest --output-on-failure -j"$jobs" --timeout 1800 -E "$not_sanitized")
}

stage_tsan() {
  local b=${prefix}tsan
  configure "$b" -DDSTX_SANITIZE=thread
  cmake --build "$b" -j"$jobs"
  (cd "$b" && ctest --output-on-failure -j"$jobs" --timeout 1800 -E "$not_sanitized")
}

stage_fuzz() {
  local b=${prefix}fuzz
  if ! command -v clang++ >/dev/null || ! clang++ -fsanitize=fuzzer -x c++ - -o /dev/null \
    <<<'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) { return 0; }' 2>/dev/null; then
    echo "sanitize: fuzz stage skipped: clang++ with libFuzzer not available (scripts/setup.sh installs it)"
    return 0
  fi
  CC=clang CXX=clang++ configure "$b" -DDSTX_SANITIZE=address,undefined -DDSTX_FUZZ=ON -DDSTX_BUILD_BENCH=OFF \
    -DDSTX_FUZZ_SECONDS="$fuzz_seconds"
  # Only the fuzz targets: the rest of the suite is the ASan stage's (and libdstx.so does not link under clang's
  # sanitizers).
  local targets=()
  for t in header handshake chunk receiver roundtrip; do targets+=(--target "fuzz_$t"); done
  cmake --build "$b" -j"$jobs" "${targets[@]}"
  # One target at a time: each fuzzes for a fixed wall time, so running them side by side only halves their
  # executions.
  (cd "$b" && ctest --output-on-failure -j"$jobs" -L '^fuzz$' && ctest --output-on-failure -j1 -L '^fuzz_smoke$')
  local found
  found=$(find "$b/tests/fuzz/fuzz-artifacts" -type f 2>/dev/null | head -5)
  if [ -n "$found" ]; then
    echo "sanitize: fuzzing saved reproducers: $found"
    return 1
  fi
}

run_stage() {
  local start=$SECONDS
  echo "sanitize: stage $1"
  "stage_$1"
  echo "sanitize: stage $1 passed in $((SECONDS - start)) s"
}

case ${1:-all} in
  asan | tsan | fuzz) run_stage "$1" ;;
  all)
    run_stage asan
    run_stage tsan
    run_stage fuzz
    ;;
  *)
    echo "usage: $0 asan|tsan|fuzz|all" >&2
    exit 2
    ;;
esac
