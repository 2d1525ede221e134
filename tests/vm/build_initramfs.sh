#!/usr/bin/env bash
# Builds the conformance VM's initramfs (tests/vm/): Debian's busybox-static, the given dstx binary with the shared
# libraries ldd lists for it, tests/vm/mtty_marker.c compiled statically, and tests/vm/init.sh as /init.
# usage: build_initramfs.sh DSTX_BINARY OUTPUT.cpio
# Exit codes: 0 built; 1 failed; 77 busybox-static is missing and cannot be installed.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
log() { echo "build_initramfs: $*" >&2; }
[ $# -eq 2 ] || { echo "usage: $0 DSTX_BINARY OUTPUT.cpio" >&2; exit 2; }
dstx="$(readlink -f "$1")"
out="$2"
[ -x "$dstx" ] || { log "no dstx binary at $1"; exit 1; }

pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
missing=()
for p in busybox-static cpio; do pkg_installed "$p" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then log "missing ${missing[*]} and not root"; exit 77; fi
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 ||
    { apt-get update -qq >&2 || true; apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2; } ||
    { log "cannot install ${missing[*]}"; exit 77; }
fi
busybox=/bin/busybox
[ -x "$busybox" ] || { log "busybox-static is installed but $busybox is missing"; exit 1; }
# Debian's busybox-static is a static binary; a dynamic one would need its own libraries.
if ldd "$busybox" >/dev/null 2>&1; then log "$busybox is not static (busybox-static replaced by busybox?)"; exit 1; fi

root="$(mktemp -d "${TMPDIR:-/tmp}/dstx-initramfs.XXXXXX")"
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,etc,lib64}

cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
  [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done

cp "$dstx" "$root/bin/dstx"
# Every library at the path ldd resolved it to (Debian 12: /lib/x86_64-linux-gnu, /lib64 for the loader).
ldd "$dstx" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | sort -u | while read -r lib; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
if ! [ -e "$root/lib64/ld-linux-x86-64.so.2" ]; then log "ldd listed no dynamic loader for $dstx"; exit 1; fi

${CC:-gcc} -static -O2 -Wall -Wextra -Werror -o "$root/bin/mtty_marker" "$here/mtty_marker.c"

install -m 0755 "$here/init.sh" "$root/init"
# The kernel opens /dev/console before /init runs; without the node /init starts without stdio (it re-opens the
# console once devtmpfs is mounted, so a non-root build still works).
mknod -m 600 "$root/dev/console" c 5 1 2>/dev/null || log "cannot mknod dev/console (not root?); /init re-opens it"
printf 'root:x:0:0:root:/:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\n' >"$root/etc/group"
printf '127.0.0.1 localhost\n' >"$root/etc/hosts"

mkdir -p "$(dirname "$out")"
(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --owner 0:0 --quiet) >"$out.tmp"
mv "$out.tmp" "$out"
log "built $out ($(du -h "$out" | cut -f1); dstx $(du -h "$dstx" | cut -f1))"
