#!/usr/bin/env bash
# First numbers: dstx against the QEMU-style plain loop (one stream, 1 MiB read → send, raw) on the same
# loopback path, same files, same run, for each data profile. Prints a markdown table of ratios.
#   bench/loopback.sh [BUILD_DIR] [SIZE_MIB] [REPEATS]
set -euo pipefail
build=$(realpath "${1:-build}")
size_mib=${2:-1024}
repeats=${3:-3}
dstx="$build/dstx"
plain="$build/bench/plain_loop"
make_state="$build/bench/make_state"
for b in "$dstx" "$plain" "$make_state"; do [ -x "$b" ] || { echo "missing $b: build first" >&2; exit 1; }; done
work=$(mktemp -d /dev/shm/dstx-bench.XXXXXX)
trap 'rm -rf "$work"; kill $(jobs -p) 2>/dev/null || true' EXIT
port=$((20000 + RANDOM % 20000))

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
field() { python3 -c "import json,sys; d=json.loads(sys.stdin.readline()); print(d['$1'])"; }

run_plain() {  # prints seconds
  local file=$1
  "$plain" recv "$port" - >"$work/precv.json" 2>/dev/null &
  local rpid=$!
  sleep 0.2
  "$plain" send "$file" 127.0.0.1 "$port" | field seconds
  wait "$rpid"
}

run_dstx() {  # prints "seconds wire_bytes"
  local file=$1; shift
  "$dstx" recv --listen "127.0.0.1:$port" --sink null: --json --quiet >"$work/drecv.json" 2>/dev/null &
  local rpid=$!
  sleep 0.2
  "$dstx" send --source "file:$file" --to "127.0.0.1:$port" --json --quiet "$@" >"$work/dsend.json"
  wait "$rpid"
  python3 -c "import json; d=json.load(open('$work/dsend.json')); assert d['status']=='committed', d; print(d['seconds'], d['wire_bytes'])"
}

echo "| profile | plain loop GB/s | dstx GB/s | dstx / plain | wire / logical |"
echo "|---|---:|---:|---:|---:|"
for profile in zero zero-heavy binary-real text random mixed; do
  file="$work/$profile.bin"
  "$make_state" "$profile" $((size_mib << 20)) 1 "$file"
  bytes=$(stat -c %s "$file")
  p=(); d=(); w=0
  for _ in $(seq "$repeats"); do
    p+=("$(run_plain "$file")")
    read -r secs wire < <(run_dstx "$file")
    d+=("$secs"); w=$wire
  done
  ps=$(printf '%s\n' "${p[@]}" | median)
  ds=$(printf '%s\n' "${d[@]}" | median)
  python3 -c "
b=$bytes; ps=$ps; ds=$ds; w=$w
print(f'| $profile | {b/ps/1e9:.2f} | {b/ds/1e9:.2f} | {ps/ds:.2f}x | {w/b:.3f} |')"
  rm -f "$file"
done
echo
echo "$(nproc) cores, ${size_mib} MiB per profile, median of $repeats runs, loopback TCP, files on tmpfs, receivers discard."
