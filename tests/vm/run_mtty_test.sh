#!/usr/bin/env bash
# Conformance against a real kernel: boots a small Linux 6.12 (Debian's linux-source-6.12, tests/vm/kernel.config)
# with the kernel's mtty VFIO sample built in, under qemu-system-x86_64 (TCG), and inside it migrates mtty devices
# with `dstx migrate` / `dstx recv` over loopback TCP (tests/vm/init.sh has the cases). The kernel is cached by
# content hash (tests/vm/build_kernel.sh); the initramfs is rebuilt each run around the given dstx binary.
#
# usage: run_mtty_test.sh [--cases NAME,NAME] [--shell] [--keep] DSTX_BINARY
#   --cases   run only these cases (names as in tests/vm/init.sh)
#   --shell   interactive: the VM's console on this terminal, a shell after the cases (no time-out)
#   --keep    keep the work directory (initramfs, console log)
# Environment: DSTX_VM_TIMEOUT (seconds the VM may run, default 600), DSTX_VM_CACHE, DSTX_VM_JOBS (see
# build_kernel.sh), DSTX_VM_LOG (also copy the console log there).
# Exit: 0 every case passed; 1 a case failed, the VM did not finish, or a build failed; 2 usage;
#       77 skipped: qemu-system-x86 or the kernel source package is missing and cannot be installed.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
cases=""
shell=0
keep=0
dstx=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cases) cases="$2"; shift 2 ;;
    --shell) shell=1; shift ;;
    --keep) keep=1; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    -*) echo "run_mtty_test: unknown option $1" >&2; exit 2 ;;
    *) dstx="$1"; shift ;;
  esac
done
[ -n "$dstx" ] || { echo "usage: $0 [--cases NAME,NAME] [--shell] [--keep] DSTX_BINARY" >&2; exit 2; }
[ -x "$dstx" ] || { echo "run_mtty_test: no dstx binary at $dstx" >&2; exit 1; }

log() { echo "run_mtty_test: $*" >&2; }
skip() { echo "SKIP: $*" >&2; exit 77; }
t0=$(date +%s)

# 1. qemu
qemu="qemu-system-x86_64"
if ! command -v "$qemu" >/dev/null; then
  if [ "$(id -u)" -eq 0 ]; then
    log "installing qemu-system-x86"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends qemu-system-x86 >&2 ||
      { apt-get update -qq >&2 || true; apt-get install -y -qq --no-install-recommends qemu-system-x86 >&2; } || true
  fi
  command -v "$qemu" >/dev/null ||
    skip "$qemu is not installed and cannot be installed here (Debian package qemu-system-x86; scripts/setup.sh)"
fi

# 2. kernel (cached)
set +e
bzimage="$("$here/build_kernel.sh")"
rc=$?
set -e
[ $rc -eq 77 ] &&
  skip "Debian's linux-source-6.12 (the kernel with the mtty sample) is not installed and cannot be installed here"
[ $rc -eq 0 ] || { log "FAIL: the kernel build failed (exit $rc)"; exit 1; }
t_kernel=$(date +%s)

# 3. initramfs
work="$(mktemp -d "${TMPDIR:-/tmp}/dstx-vm.XXXXXX")"
if [ $keep -eq 0 ]; then trap 'rm -rf "$work"' EXIT; else log "work directory $work kept"; fi
trap 'exit 143' TERM INT  # ctest's time-out, Ctrl-C: still clean up
set +e
"$here/build_initramfs.sh" "$dstx" "$work/initramfs.cpio"
rc=$?
set -e
[ $rc -eq 77 ] && skip "busybox-static is not installed and cannot be installed here"
[ $rc -eq 0 ] || { log "FAIL: the initramfs build failed (exit $rc)"; exit 1; }
t_initramfs=$(date +%s)

# 4. boot
append="console=ttyS0 panic=-1 quiet"
[ -n "$cases" ] && append+=" dstx.cases=$cases"
[ $shell -eq 1 ] && append+=" dstx.shell=1"
qemu_args=(-accel tcg -cpu max -m 1024 -smp 2 -nographic -no-reboot
  -kernel "$bzimage" -initrd "$work/initramfs.cpio" -append "$append")
if [ $shell -eq 1 ]; then
  log "interactive: the cases run, then a shell on this console; 'poweroff -f' (or Ctrl-A x) ends the VM"
  "$qemu" "${qemu_args[@]}"
  exit 0
fi
console="$work/console.log"
limit="${DSTX_VM_TIMEOUT:-600}"
log "booting $bzimage (TCG, time-out ${limit} s)"
set +e
timeout --kill-after=10 "$limit" "$qemu" "${qemu_args[@]}" </dev/null >"$console" 2>&1
qrc=$?
set -e
t_vm=$(date +%s)
[ -n "${DSTX_VM_LOG:-}" ] && cp "$console" "$DSTX_VM_LOG"

# 5. verdict
tr -d '\r' <"$console" >"$console.txt"
results="$(grep -a '^DSTX-VM-RESULT ' "$console.txt" || true)"
done_line="$(grep -a '^DSTX-VM-DONE ' "$console.txt" | tail -n1 || true)"
echo "$results"
[ -n "$done_line" ] && echo "$done_line"
timings="kernel $((t_kernel - t0)) s, initramfs $((t_initramfs - t_kernel)) s, VM $((t_vm - t_initramfs)) s"

failed=""
[ $qrc -eq 124 ] || [ $qrc -eq 137 ] && failed="the VM did not finish within ${limit} s"
[ -z "$failed" ] && [ -z "$done_line" ] && failed="the VM ended (qemu exit $qrc) without reporting DSTX-VM-DONE"
if [ -z "$failed" ]; then
  n_pass="$(echo "$done_line" | sed -n 's/.*pass=\([0-9]*\).*/\1/p')"
  n_fail="$(echo "$done_line" | sed -n 's/.*fail=\([0-9]*\).*/\1/p')"
  expected="$(grep -cE '^(good|fault) ' "$here/init.sh")"
  [ -n "$cases" ] && expected="$(echo "$cases" | tr ',' '\n' | grep -c .)"
  if [ "${n_fail:-1}" != 0 ]; then
    failed="$n_fail case(s) failed"
  elif [ "${n_pass:-0}" != "$expected" ]; then
    failed="$n_pass case(s) passed, expected $expected"
  fi
fi
if [ -n "$failed" ]; then
  echo "---- VM console ($console) ----"
  cat "$console.txt"
  echo "---- end of VM console ----"
  log "FAIL: $failed ($timings)"
  exit 1
fi
log "PASS: ${n_pass} cases ($timings)"
exit 0
