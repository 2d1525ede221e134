#!/usr/bin/env bash
# The sanitizer stages of CI (cmake/DstxSanitize.cmake, tests/fuzz/README.md). Each builds in its own directory
# and runs tests there; `all` runs every stage and fails if any failed.
#
#   scripts/sanitize.sh asan   gcc, -fsanitize=address,undefined: the whole test suite but the QEMU/VM tests and
#                              the C-ABI packaging tests (see below), including the fuzz corpora's replay
#   scripts/sanitize.sh tsan   gcc, -fsanitize=thread: the same tests
#   scripts/sanitize.sh fuzz   clang, libFuzzer + ASan + UBSan: each fuzz target replays its corpus, then fuzzes
#                              for DSTX_FUZZ_SECONDS (default 20) seconds; skipped with a note when clang or its
#                              runtimes are missing
#   scripts/sanitize.sh all    the three, in that order
#
# Not under sanitizers: the tests labelled qemu and vm (guests under TCG: minutes each, and what they add is the
# guest's and the kernel's side), and the C-ABI packaging tests capi_install, capi_c_*, capi_external_cmake,
# capi_symbols, capi_abi (they build a C program and an external CMake project against the installed library with
# their own flags, which cannot link an instrumented libdstx.a, or inspect the release binary's symbols and ABI);
# instead the same C program is built in-tree with the sanitizer flags (sanitized_capi, tests/CMakeLists.txt).
#
# Environment: DSTX_SAN_BUILD_PREFIX (default "build-": build-asan, build-tsan, build-fuzz), DSTX_JOBS (default
# nproc), DSTX_FUZZ_SECONDS.
set -euo pipefail
self=$(realpath "$0")
cd "$(dirname "$0")/.."

prefix=${DSTX_SAN_BUILD_PREFIX:-build-}
jobs=${DSTX_JOBS:-$(nproc)}
fuzz_seconds=${DSTX_FUZZ_SECONDS:-20}

# Every report is fatal and names its frames; leaks count (LeakSanitizer is part of ASan).
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:check_initialization_order=1:strict_init_order=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export TSAN_OPTIONS=${TSAN_OPTIONS:-halt_on_error=1:second_deadlock_stack=1}

not_sanitized=(-LE '^(qemu|vm)$' -E '^capi_(install|c_|external_cmake|symbols|abi)')

configure() {  # DIR, then cmake arguments
  local dir=$1
  shift
  cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDSTX_WERROR=ON "$@" >/dev/null
}

stage_asan() {
  local b=${prefix}asan
  configure "$b" -DDSTX_SANITIZE=address,undefined
  cmake --build "$b" -j"$jobs"
  (cd "$b" && ctest --output-on-failure -j"$jobs" --timeout 1800 "${not_sanitized[@]}")
}

stage_tsan() {
  local b=${prefix}tsan
  configure "$b" -DDSTX_SANITIZE=thread
  cmake --build "$b" -j"$jobs"
  (cd "$b" && ctest --output-on-failure -j"$jobs" --timeout 1800 "${not_sanitized[@]}")
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
  rm -rf "$b/tests/fuzz/fuzz-artifacts" && mkdir -p "$b/tests/fuzz/fuzz-artifacts"  # this run's findings only
  local rc=0
  (cd "$b" && ctest --output-on-failure -j"$jobs" -L '^fuzz$') || rc=1
  (cd "$b" && ctest --output-on-failure -j1 -L '^fuzz_smoke$') || rc=1
  local found
  found=$(find "$b/tests/fuzz/fuzz-artifacts" -type f 2>/dev/null | head -5)
  if [ -n "$found" ]; then
    echo "sanitize: fuzzing saved reproducers: $found"
    rc=1
  fi
  return $rc
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
    # Every stage runs even when one fails: their findings differ, and each is worth having from one CI run.
    # Each in its own process, so that `set -e` still stops a stage at its first failing command.
    failed=()
    for stage in asan tsan fuzz; do "$self" "$stage" || failed+=("$stage"); done
    if [ ${#failed[@]} -gt 0 ]; then
      echo "sanitize: failed stages: ${failed[*]}"
      exit 1
    fi
    ;;
  *)
    echo "usage: $0 asan|tsan|fuzz|all" >&2
    exit 2
    ;;
esac
