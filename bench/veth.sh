# Sourced by bench/ab.sh and bench/downtime.sh (bench/e2e.py builds the same link in Python).
# veth_up SRC_NS DST_NS DEV [GBIT]: two network namespaces joined by a veth pair, 10.79.0.1 on DEVs in SRC_NS
# and 10.79.0.2 on DEVd in DST_NS, loopback up in both; with GBIT (Gbit/s, decimals allowed: 0.5), tc tbf on
# both ends' egress as e2e.py sets it: burst 2 ms at the rate (at least 256 KiB), queue 5 ms.
veth_up() {
  local src=$1 dst=$2 dev=$3 rate=${4:-} ns burst
  if [ -n "$rate" ] && ! [[ $rate =~ ^[0-9]+(\.[0-9]+)?$ && ! $rate =~ ^0+(\.0+)?$ ]]; then
    echo "veth_up: the rate must be a positive number of Gbit/s (e.g. 10 or 0.5), not '$rate'" >&2
    return 2
  fi
  ip netns add "$src"
  ip netns add "$dst"
  ip link add "${dev}s" netns "$src" type veth peer name "${dev}d" netns "$dst"
  ip -n "$src" addr add 10.79.0.1/24 dev "${dev}s"
  ip -n "$dst" addr add 10.79.0.2/24 dev "${dev}d"
  for ns in "$src" "$dst"; do ip -n "$ns" link set lo up; done
  ip -n "$src" link set "${dev}s" up
  ip -n "$dst" link set "${dev}d" up
  if [ -n "$rate" ]; then
    burst=$(awk -v g="$rate" 'BEGIN { b = int(g * 1e9 / 8 * 2 / 1000); print (b < 262144 ? 262144 : b) }')
    local mbit
    mbit=$(awk -v g="$rate" 'BEGIN { print int(g * 1000 + 0.5) }')
    ip netns exec "$src" tc qdisc add dev "${dev}s" root tbf rate "${mbit}mbit" burst "$burst" latency 5ms
    ip netns exec "$dst" tc qdisc add dev "${dev}d" root tbf rate "${mbit}mbit" burst "$burst" latency 5ms
  fi
}

# veth_down SRC_NS DST_NS: removes both namespaces (and the pair with them); never fails.
veth_down() {
  ip netns del "$1" 2>/dev/null || true
  ip netns del "$2" 2>/dev/null || true
}
