#!/bin/sh
# Compares the freshly built libdstx.so against the committed ABI baseline with libabigail's abidiff.
#   usage: check_abi.sh BASELINE.abi LIBDSTX.so SUPPRESSIONS SOURCE-DIR WORK-DIR [--update]
# Only the types of the public header are kept (SUPPRESSIONS). Fails on:
#   - abidiff's "incompatible" bit (8: a function or symbol removed) or its error bits (1, 2);
#   - any reported change other than additions: libabigail 2.2 sets only the "change" bit (4) for layout
#     changes such as reordered or retyped struct members or changed parameter types, so the report is read
#     for the leaf changes that break callers (moved or retyped members and parameters, removed members,
#     shrunk structs, members inserted before a struct's old end, changed enumerators). What remains is
#     allowed: added functions and data members appended at a struct's end (the size-first structs grow only
#     there), and what those additions show through pointers and callbacks.
# Enumerator values are invisible to abidiff (functions pass them as int); engine/capi.cpp pins them with
# static_asserts instead.
# --update rewrites the baseline (for a deliberate, compatible addition: review its diff, commit the file).
set -eu
baseline=$1 lib=$2 suppressions=$3 srcdir=$4 work=$5
update=${6:-}
for tool in abidw abidiff; do
  if ! command -v $tool >/dev/null 2>&1; then
    echo "$tool not found: install Debian's abigail-tools (scripts/setup.sh does)"
    echo "0 passed, 1 failed"
    exit 1
  fi
done
mkdir -p "$work"
current="$work/libdstx.so.1.abi"
abidw --suppressions "$suppressions" --no-corpus-path --no-comp-dir-path --no-show-locs --type-id-style hash \
  --out-file "$current.tmp" "$lib"
# Source paths as relative ones, so that the file does not depend on where the tree was checked out; and only
# the translation units of the C ABI (engine/capi*.cpp), where the exported functions and the public types
# live: the other units add only declarations of the engine's internals, which would make the baseline churn
# with every engine change without being part of the ABI.
sed "s|path='$srcdir/|path='|" "$current.tmp" | awk '
  /<abi-instr / { unit = 1; keep = ($0 ~ /engine\/capi[a-z_]*\.cpp/) }
  unit { if (keep) print; if ($0 ~ /<\/abi-instr>/) unit = 0; next }
  { print }' >"$current"
rm -f "$current.tmp"
# A blind comparison passes everything: the public structs must be in the representation (they come from the
# library's debug information, so -g is needed; a suppression that matched nothing would drop them too).
for type in dstx_endpoint dstx_send_config dstx_recv_config dstx_stats; do
  if ! grep -q "class-decl name='$type' size-in-bits" "$current"; then
    echo "$type is missing from the ABI representation of $lib (no debug information?)"
    echo "0 passed, 1 failed"
    exit 1
  fi
done

if [ "$update" = "--update" ]; then
  cp "$current" "$baseline"
  echo "baseline written: $baseline"
  exit 0
fi
if [ ! -f "$baseline" ]; then
  echo "no baseline at $baseline (generate it with: $0 $* --update)"
  echo "0 passed, 1 failed"
  exit 1
fi

set +e
abidiff "$baseline" "$current" >"$work/abidiff.txt" 2>&1
rc=$?
set -e
cat "$work/abidiff.txt"
if [ $((rc & 3)) -ne 0 ]; then
  echo "abidiff could not compare (exit $rc)"
  echo "0 passed, 1 failed"
  exit 1
fi
if [ $((rc & 8)) -ne 0 ]; then
  echo "INCOMPATIBLE ABI CHANGE against $(basename "$baseline") (abidiff exit $rc): a function or symbol was removed."
  echo "0 passed, 1 failed"
  exit 1
fi
if [ $((rc & 4)) -ne 0 ]; then
  # Look for the leaf changes that break existing callers.
  bad=$(awk '
    /changes summary:/ { next }
    /type size changed from [0-9]+ to [0-9]+/ {
      old = $5 + 0
      if ($7 + 0 < old) print "shrank: " $0
      next
    }
    /type size hasn.t changed/ { old = -1; next }
    /, at offset [0-9]+ \(in bits\)/ {
      match($0, /at offset [0-9]+/); off = substr($0, RSTART + 10, RLENGTH - 10) + 0
      if (old < 0 || off < old) print "inserted before the old end: " $0
      next
    }
    /offset changed|type name changed|entity changed|data member deletion|enumerator change|enumerator deletion|\[D\]/ {
      print
    }' "$work/abidiff.txt")
  if [ -n "$bad" ]; then
    echo "INCOMPATIBLE ABI CHANGE against $(basename "$baseline"):"
    echo "$bad"
    echo "Append instead of changing: new functions in a new version node, new fields at the end of structs."
    echo "0 passed, 1 failed"
    exit 1
  fi
  echo "compatible ABI additions (abidiff exit $rc): refresh the baseline with --update when deliberate"
else
  echo "ABI identical to the baseline"
fi
echo "1 passed, 0 failed"
