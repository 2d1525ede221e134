#!/bin/sh
# The shared library exports the C ABI and nothing else.
#   usage: check_symbols.sh LIBDSTX.so VERSION-SCRIPT HEADER LIBDSTX.a
# Checks: the SONAME; every defined dynamic symbol is a dstx_* function versioned DSTX_<n>.<m>, or the
# version node's own name (the linker emits one absolute symbol per node, e.g. "DSTX_1.0", for symbol
# versioning; nothing else is forced by the toolchain); the exported set equals the functions declared in
# dstx.h and the names listed in the version script; and the static archive defines no unmangled global
# symbol outside dstx_* (no C name of ours can clash with the host program's; C++ names are in namespace
# dstx).
set -eu
lib=$1 map=$2 header=$3 archive=$4
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail=0

soname=$(readelf -d "$lib" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
if [ "$soname" != "libdstx.so.1" ]; then
  echo "SONAME is '$soname', expected libdstx.so.1"
  fail=1
fi

nm -D --defined-only "$lib" >"$tmp/nm"
# Version node symbols: type A, named like the node.
awk '$2 == "A" {print $3}' "$tmp/nm" | sort >"$tmp/nodes"
awk '$2 != "A" {print $3}' "$tmp/nm" | sort >"$tmp/exported"
if grep -v '^DSTX_[0-9][0-9]*\.[0-9][0-9]*$' "$tmp/nodes"; then
  echo "^ absolute symbols that are not version nodes"
  fail=1
fi
if grep -v '^dstx_[a-z0-9_]*@@*DSTX_[0-9][0-9]*\.[0-9][0-9]*$' "$tmp/exported"; then
  echo "^ exported symbols that are not versioned dstx_* names"
  fail=1
fi
sed 's/@.*//' "$tmp/exported" | sort -u >"$tmp/exported_names"

# Functions declared in the header: "DSTX_API <type> <name>(".
sed -n 's/^DSTX_API[^(]*[ *]\(dstx_[a-z0-9_]*\)(.*/\1/p' "$header" | sort -u >"$tmp/declared"
# Names in the version script's global sections.
sed -n 's/^[[:space:]]*\(dstx_[a-z0-9_]*\);.*/\1/p' "$map" | sort -u >"$tmp/listed"

if ! diff -u "$tmp/declared" "$tmp/exported_names" >"$tmp/d1"; then
  echo "declared in $(basename "$header") (-) vs exported by $(basename "$lib") (+):"
  cat "$tmp/d1"
  fail=1
fi
if ! diff -u "$tmp/declared" "$tmp/listed" >"$tmp/d2"; then
  echo "declared in $(basename "$header") (-) vs listed in $(basename "$map") (+):"
  cat "$tmp/d2"
  fail=1
fi
if [ ! -s "$tmp/declared" ]; then
  echo "found no DSTX_API declarations in $header"
  fail=1
fi

# Static archive: unmangled global definitions must be ours. Allowed besides: GCC's DW.ref.* (hidden, weak,
# COMDAT pointers to typeinfo and the personality routine that exception tables refer to; one copy survives
# per link and none is visible outside it).
nm -g --defined-only "$archive" 2>/dev/null | awk 'NF == 3 {print $3}' | grep -v '^_Z' | grep -v '^dstx_' |
  grep -v '^DW\.ref\.' | sort -u >"$tmp/foreign" || true
if [ -s "$tmp/foreign" ]; then
  echo "$(basename "$archive") defines global C symbols outside dstx_*:"
  cat "$tmp/foreign"
  fail=1
fi

if [ $fail -ne 0 ]; then
  echo "0 passed, 1 failed"
  exit 1
fi
echo "exported: $(wc -l <"$tmp/exported_names") dstx_* functions, version nodes: $(tr '\n' ' ' <"$tmp/nodes")"
echo "1 passed, 0 failed"
