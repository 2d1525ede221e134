#!/usr/bin/env bash
# Installs what dstx needs to build and test, from Debian 12's packages. Idempotent: when everything is
# present it only checks. Runs as root, or through sudo.
set -euo pipefail

packages=(
  build-essential cmake pkg-config
  liburing-dev liblz4-dev libxxhash-dev libzstd-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  xxhash  # xxhsum: the wire-format golden vectors' independent check
  abigail-tools  # abidw/abidiff: the C ABI baseline check (tests/capi)
  qemu-system-x86 python3  # tests/qemu: QEMU migration through dstx (TCG; ~16 MiB download, ~81 MiB installed)
  clang libclang-rt-14-dev llvm  # tests/fuzz: libFuzzer targets (scripts/sanitize.sh fuzz), llvm-symbolizer
  libssl-dev openssl  # TLS on the streams (engine/tls.cpp); openssl makes tests/test_tls's certificates
  linux-source-6.12 flex bison bc libelf-dev cpio busybox-static  # tests/vm: mtty VM kernel, initramfs (~150 MiB)
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#packages[@]} packages present"
  exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "setup: need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
  sudo="sudo"
fi
echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
