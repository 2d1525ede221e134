#!/usr/bin/env bash
# Side-by-side A/B of dstx builds (or the plain loop) over a veth between two network namespaces, for changes
# too small for the whole bench/e2e.py matrix. Runs are interleaved (A B A B ...) so background noise hits all
# alike. Per tool: median and min wall time from the sender's launch to the receiver's exit (what e2e.py
# measures), GB/s from that, and CPU seconds per GB on each side (user+sys of the process).
#
#   bench/ab.sh [--rate GBIT] [--runs N] [--pause S] FILE TOOL...   (as root)
#     TOOL = a dstx binary, optionally with send arguments after a colon ("build/dstx:--codec auto"),
#            or "plain" (bench/plain_loop from --build, default build)
#   e.g. bench/ab.sh --rate 10 --runs 10 /dev/shm/state.bin old/dstx:--codec\ none build/dstx:--codec\ none
#   --pause S sleeps S seconds before each run: memory freed by the run before is then cold again (a VM's
#   host may have taken it back), as at the start of a migration.
#
# Addresses: 10.79.0.1 -> 10.79.0.2 only. The namespaces are removed on exit.
set -euo pipefail
rate="" runs=5 build=build pause=0
while [ $# -gt 0 ]; do
  case $1 in
    --rate) rate=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --pause) pause=$2; shift 2 ;;
    --build) build=$2; shift 2 ;;
    *) break ;;
  esac
done
[ $# -ge 2 ] || { sed -n '2,14p' "$0" >&2; exit 2; }
file=$1; shift
[ -r "$file" ] || { echo "ab.sh: cannot read $file" >&2; exit 2; }
src=dstxab$$s dst=dstxab$$d
# shellcheck source=bench/veth.sh
. "$(dirname "$0")/veth.sh"
cleanup() { veth_down "$src" "$dst"; }
trap cleanup EXIT INT TERM
veth_up "$src" "$dst" vab$$ "$rate"
size=$(stat -c %s "$file")
out=$(mktemp -d)
port=$((20000 + $$ % 20000))
for ((i = 0; i < runs; i++)); do
  for tool in "$@"; do
    port=$((port + 1))
    bin=${tool%%:*} args=""
    [[ $tool == *:* ]] && args=${tool#*:}
    if [ "$bin" = plain ]; then
      recv=("$build/bench/plain_loop" recv "$port" -)
      send=("$build/bench/plain_loop" send "$file" 10.79.0.2 "$port")
    else
      recv=("$bin" recv --listen "10.79.0.2:$port" --sink null:)
      # shellcheck disable=SC2206  # the arguments after the colon are meant to split
      send=("$bin" send --source "file:$file" --to "10.79.0.2:$port" $args)
    fi
    sleep "$pause"
    ip netns exec "$dst" /usr/bin/time -f "%U %S" -o "$out/r" "${recv[@]}" >/dev/null 2>&1 &
    rpid=$!
    sleep 0.15
    a=$(date +%s%N)
    ip netns exec "$src" /usr/bin/time -f "%U %S" -o "$out/s" "${send[@]}" >/dev/null 2>&1 &
    spid=$!
    rc=0; wait "$rpid" || rc=$?
    b=$(date +%s%N)
    wait "$spid" || rc=$?
    echo "$tool|$(( b - a ))|$(cat "$out/s")|$(cat "$out/r")|$rc" >>"$out/runs"
  done
done
python3 - "$out/runs" "$size" <<'EOF'
import collections, statistics, sys
size = int(sys.argv[2]); runs = collections.OrderedDict()
for line in open(sys.argv[1]):
    tool, ns, s, r, rc = line.rstrip("\n").split("|")
    runs.setdefault(tool, []).append((int(ns) / 1e6, sum(map(float, s.split())), sum(map(float, r.split())), int(rc)))
gb = size / 1e9
print(f"{'tool':40} {'median ms':>10} {'min ms':>8} {'GB/s':>6} {'send s/GB':>10} {'recv s/GB':>10} failed")
for tool, v in runs.items():
    med = statistics.median(x[0] for x in v)
    print(f"{tool:40} {med:10.1f} {min(x[0] for x in v):8.1f} {gb / (med / 1e3):6.2f} "
          f"{statistics.median(x[1] for x in v) / gb:10.2f} {statistics.median(x[2] for x in v) / gb:10.2f} "
          f"{sum(1 for x in v if x[3])}")
EOF
rm -rf "$out"
