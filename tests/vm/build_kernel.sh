#!/usr/bin/env bash
# Builds the conformance VM's kernel (tests/vm/): Debian's linux-source-6.12, `make tinyconfig`, the options in
# tests/vm/kernel.config switched on with scripts/config, `make olddefconfig`, a check that every option survived, then
# `make bzImage`. The result is cached under $DSTX_VM_CACHE (default ${XDG_CACHE_HOME:-$HOME/.cache}/dstx-vm) in a
# directory named after a hash of the config fragment, the source package's version and a recipe number, so later
# runs and CI on the same machine reuse it. Prints the bzImage's path on stdout (logs go to stderr).
#
# Exit codes: 0 built or cached; 1 build failed; 77 the kernel source package is missing and cannot be installed.
# Environment: DSTX_VM_CACHE, DSTX_VM_JOBS (make -j; default nproc), DSTX_VM_KEEP_TREE=1 keeps the build tree.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
fragment="$here/kernel.config"
pkg=linux-source-6.12
cache_root="${DSTX_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dstx-vm}"
jobs="${DSTX_VM_JOBS:-$(nproc)}"

log() { echo "build_kernel: $*" >&2; }

pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

# Build tools the kernel needs beyond build-essential. Installed when missing and we are root.
need=(flex bison bc libelf-dev cpio xz-utils)
if ! pkg_installed "$pkg"; then need+=("$pkg"); fi
missing=()
for p in "${need[@]}"; do pkg_installed "$p" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    log "missing packages ${missing[*]} and not root"
    pkg_installed "$pkg" || exit 77
    exit 1
  fi
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2; then
    apt-get update -qq >&2 || true
    if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2; then
      log "cannot install ${missing[*]}"
      pkg_installed "$pkg" || exit 77
      exit 1
    fi
  fi
fi

version="$(dpkg-query -W -f='${Version}' "$pkg")"
tarball="$(dpkg -L "$pkg" | grep -E '/usr/src/linux-source-[0-9.]+\.tar\.(xz|bz2|gz)$' | head -n1)"
[ -f "$tarball" ] || { log "no source tarball in $pkg ($version)"; exit 1; }

# Options: the fragment's non-comment lines.
mapfile -t options < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$fragment" | grep -v '^$')

# Bump recipe when the way of building changes (not for comments); the fragment and the package version speak for
# themselves.
recipe=1
key="$( { echo "recipe $recipe $pkg $version"; cat "$fragment"; } | sha256sum | cut -c1-16)"
dir="$cache_root/$key"
if [ -s "$dir/bzImage" ] && [ -s "$dir/config" ]; then
  log "cached: $dir/bzImage ($pkg $version)"
  echo "$dir/bzImage"
  exit 0
fi

mkdir -p "$cache_root"
# One builder per key: a concurrent run (another engineer's ctest) waits for ours and then reuses the result.
exec 9>"$cache_root/$key.lock"
flock 9
if [ -s "$dir/bzImage" ] && [ -s "$dir/config" ]; then
  log "cached (built meanwhile): $dir/bzImage"
  echo "$dir/bzImage"
  exit 0
fi

work="$cache_root/$key.work"
rm -rf "$work"
mkdir -p "$work"
log "extracting $tarball ($pkg $version) into $work"
start=$(date +%s)
tar -C "$work" -xf "$tarball"
src="$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'linux-source-*' | head -n1)"
[ -d "$src" ] || { log "no source tree after extracting $tarball"; exit 1; }

cd "$src"
log "make tinyconfig"
make -s ARCH=x86_64 tinyconfig >&2
args=()
for o in "${options[@]}"; do args+=(--enable "$o"); done
./scripts/config "${args[@]}"
log "make olddefconfig"
make -s ARCH=x86_64 olddefconfig >&2

dropped=()
for o in "${options[@]}"; do
  grep -qx "CONFIG_$o=y" .config || dropped+=("$o")
done
if [ ${#dropped[@]} -gt 0 ]; then
  log "FAIL: options not =y after olddefconfig (a dependency dropped them): ${dropped[*]}"
  for o in "${dropped[@]}"; do grep -E "(^| )CONFIG_${o}[= ]" .config >&2 || echo "  CONFIG_$o absent" >&2; done
  exit 1
fi
log "all ${#options[@]} options present; make -j$jobs bzImage (a few minutes; longer on a busy machine)"
# nice: under ctest -j the other tests keep the CPU they need for their own time-outs.
if ! nice -n 10 make -s ARCH=x86_64 -j"$jobs" bzImage >"$work/build.log" 2>&1; then
  tail -n 60 "$work/build.log" >&2
  log "FAIL: kernel build failed (log: $work/build.log)"
  exit 1
fi

mkdir -p "$dir.new"
cp arch/x86/boot/bzImage "$dir.new/bzImage"
cp .config "$dir.new/config"
echo "$pkg $version" >"$dir.new/source"
rm -rf "$dir"
mv "$dir.new" "$dir"
cd /
if [ "${DSTX_VM_KEEP_TREE:-0}" != 1 ]; then rm -rf "$work"; fi
log "built $dir/bzImage in $(( $(date +%s) - start )) s"
echo "$dir/bzImage"
