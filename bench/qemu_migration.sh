#!/usr/bin/env bash
# QEMU's own tcp: live migration against QEMU through dstx (exec:), same VM, same link: total time and bytes on the
# wire. Over loopback, and with --veth over a veth pair between two network namespaces rate-limited with tc tbf
# (1 Gbit/s by default; needs root). Only loopback and namespace addresses are used. The driver is
# bench/qemu_migration.py; results go to bench/results/qemu.md.
#
# usage: bench/qemu_migration.sh [--dstx PATH] [--mem MIB] [--repeat N] [--veth] [--rate RATE] [--no-loopback]
#                                [--variant 'DSTX SEND OPTIONS']... [--out FILE]
#   Rows: QEMU tcp:, then one QEMU-through-dstx row per --variant (default: dstx's defaults, and --codec none).
# e.g.   bench/qemu_migration.sh --dstx build-g/dstx --veth
#        bench/qemu_migration.sh --dstx build-g/dstx --veth --variant "--streams 1" --variant "--codec zstd"
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
dstx="" mem=512 repeat=3 veth=0 rate=1gbit out="$root/bench/results/qemu.md" noloop=() variants=()
cmdline="bench/qemu_migration.sh$(printf ' %q' "$@")"
while [ $# -gt 0 ]; do
  case "$1" in
    --dstx) dstx="$2"; shift 2 ;;
    --mem) mem="$2"; shift 2 ;;
    --repeat) repeat="$2"; shift 2 ;;
    --veth) veth=1; shift ;;
    --rate) rate="$2"; shift 2 ;;
    --no-loopback) noloop=(--no-loopback); shift ;;
    --out) out="$2"; shift 2 ;;
    --variant) variants+=("--variant=$2"); shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "qemu_migration.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
if [ -z "$dstx" ]; then
  for c in "$root/build/dstx" "$root/build-g/dstx"; do [ -x "$c" ] && { dstx="$c"; break; }; done
fi
[ -n "$dstx" ] && [ -x "$dstx" ] || { echo "qemu_migration.sh: no dstx binary (--dstx PATH)" >&2; exit 2; }
command -v qemu-system-x86_64 >/dev/null || { echo "qemu_migration.sh: qemu-system-x86_64 missing (apt-get install --no-install-recommends qemu-system-x86)" >&2; exit 2; }

veth_args=()
if [ "$veth" = 1 ]; then
  [ "$(id -u)" -eq 0 ] || { echo "qemu_migration.sh: --veth needs root" >&2; exit 2; }
  ns_src="dstxq-src-$$" ns_dst="dstxq-dst-$$"
  dev_src="dqs$$" dev_dst="dqd$$"
  cleanup() { ip netns del "$ns_src" 2>/dev/null || true; ip netns del "$ns_dst" 2>/dev/null || true; }
  trap cleanup EXIT
  trap 'exit 130' INT TERM
  ip netns add "$ns_src"
  ip netns add "$ns_dst"
  ip link add "$dev_src" type veth peer name "$dev_dst"
  ip link set "$dev_src" netns "$ns_src"
  ip link set "$dev_dst" netns "$ns_dst"
  ip -n "$ns_src" addr add 10.231.0.1/24 dev "$dev_src"
  ip -n "$ns_dst" addr add 10.231.0.2/24 dev "$dev_dst"
  for pair in "$ns_src:$dev_src" "$ns_dst:$dev_dst"; do
    ns="${pair%%:*}" dev="${pair#*:}"
    ip -n "$ns" link set lo up
    ip -n "$ns" link set "$dev" up
    # burst: at least rate/HZ and larger than a GSO packet, or tbf drops and the rate collapses.
    tc -n "$ns" qdisc add dev "$dev" root tbf rate "$rate" burst 1mb latency 10ms
  done
  veth_args=(--veth "$ns_src" "$ns_dst" 10.231.0.2 "$dev_src" --veth-rate "$rate")
fi

mkdir -p "$(dirname "$out")"
python3 "$root/bench/qemu_migration.py" --dstx "$dstx" --mem "$mem" --repeat "$repeat" "${noloop[@]}" \
  "${veth_args[@]}" "${variants[@]}" --out "$out" --command "$cmdline"
