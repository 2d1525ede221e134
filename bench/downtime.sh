#!/usr/bin/env bash
# Side-by-side A/B of a VFIO migration's downtime (from entering stop-copy to COMMITTED, dstx migrate --json's
# downtime_ms) for an emulated device, over a veth between two network namespaces. Runs are interleaved
# (A B A B ...) so background noise hits all alike. Per variant: median and min downtime, median total seconds,
# and the chunk size the sender used.
#
#   bench/downtime.sh [--rate GBIT] [--runs N] DEVICE VARIANT...   (as root)
#     DEVICE  = an emulated source device, e.g. emu-v2:size=16M,profile=mixed (the destination gets the same
#               kind and size)
#     VARIANT = a dstx binary, optionally with migrate arguments after a colon
#               ("build/dstx:--chunk-size 1M --precopy-max-rounds 0")
#   e.g. bench/downtime.sh --runs 9 emu-v2:size=32M,profile=mixed "build/dstx:--precopy-max-rounds 0 \
#          --chunk-size 1M" "build/dstx:--precopy-max-rounds 0"
#
# Addresses: 10.79.0.1 -> 10.79.0.2 only. The namespaces are removed on exit.
set -euo pipefail
rate="" runs=5
while [ $# -gt 0 ]; do
  case $1 in
    --rate) rate=$2; shift 2
      [[ $rate =~ ^[0-9]+$ ]] || { echo "downtime.sh: --rate takes whole Gbit/s, not '$rate'" >&2; exit 2; } ;;
    --runs) runs=$2; shift 2 ;;
    *) break ;;
  esac
done
[ $# -ge 2 ] || { sed -n '2,14p' "$0" >&2; exit 2; }
device=$1; shift
case $device in
  emu-v1:*|emu-v2:*) ;;
  *) echo "downtime.sh: DEVICE must be emu-v1:... or emu-v2:..., not '$device'" >&2; exit 2 ;;
esac
kind=${device%%:*}
size=$(tr ',' '\n' <<<"${device#*:}" | sed -n 's/^size=//p')
[ -n "$size" ] || { echo "downtime.sh: DEVICE needs size=SIZE" >&2; exit 2; }
# The destination: the same kind, size and device features (how it is opened, what it offers); not what only
# the source does (content, dirtying, faults).
sink="$kind:size=$size"
for kv in $(tr ',' ' ' <<<"${device#*:}"); do
  case $kv in open=*|p2p=*|precopy=*|temp-end=*|section=*|mmap=*) sink+=",$kv" ;; esac
done
src=dstxdt$$s dst=dstxdt$$d rpid="" out=""
# shellcheck source=bench/veth.sh
. "$(dirname "$0")/veth.sh"
cleanup() {
  if [ -n "$rpid" ]; then kill "$rpid" 2>/dev/null || true; fi
  veth_down "$src" "$dst"
  if [ -n "$out" ]; then rm -rf "$out"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
veth_up "$src" "$dst" vdt$$ "$rate"
out=$(mktemp -d)
port=$((20000 + $$ % 20000))
for ((i = 0; i < runs; i++)); do
  for variant in "$@"; do
    port=$((port + 1))
    bin=${variant%%:*} args=""
    [[ $variant == *:* ]] && args=${variant#*:}
    ip netns exec "$dst" "$bin" recv --listen "10.79.0.2:$port" --sink "$sink" >/dev/null 2>&1 &
    rpid=$!
    sleep 0.15
    rc=0
    set -f  # the arguments after the colon are split, never globbed
    # shellcheck disable=SC2086
    json=$(ip netns exec "$src" "$bin" migrate --device "$device" --to "10.79.0.2:$port" --json $args 2>/dev/null) ||
      rc=$?
    set +f
    wait "$rpid" || rc=$?
    rpid=""
    printf '%s\t%s\t%s\n' "$variant" "$rc" "$json" >>"$out/runs"
  done
done
python3 - "$out/runs" <<'EOF'
import collections, json, statistics, sys
runs = collections.OrderedDict()
for line in open(sys.argv[1]):
    variant, rc, text = line.rstrip("\n").split("\t", 2)
    runs.setdefault(variant, [])
    try:
        d = json.loads(text)
    except ValueError:
        d = {}
    runs[variant].append((int(rc), d))
print(f"{'variant':52} {'downtime ms':>11} {'min':>7} {'total s':>8} {'chunk':>8} failed")
for variant, v in runs.items():
    ok = [d for rc, d in v if rc == 0 and d.get("status") == "committed"]
    if not ok:
        print(f"{variant:52} {'-':>11} {'-':>7} {'-':>8} {'-':>8} {len(v)}")
        continue
    down = [d["downtime_ms"] for d in ok]
    chunk = ok[0].get("chunk_bytes", 0)
    print(f"{variant:52} {statistics.median(down):11.2f} {min(down):7.2f} "
          f"{statistics.median(d['seconds'] for d in ok):8.4f} {chunk // 1024:7d}K {len(v) - len(ok)}")
EOF
