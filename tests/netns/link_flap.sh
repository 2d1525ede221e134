#!/usr/bin/env bash
# Link faults between two network namespaces joined by a veth pair (10.79.0.1 ↔ 10.79.0.2 only):
#  1. the link goes down for 2 s mid-transfer and comes back: TCP rides it out, the transfer commits;
#  2. the link goes down for longer than the TCP user time-out: the connections break, the sender reconnects
#     when the link is back and resumes from the receiver's last chunk per stream; the transfer commits;
#  3. the link goes down for good: both sides fail within their time-outs and nothing is left at the
#     destination.
# The receiver's emu: sink checks every byte. Exit 0 pass, 1 fail, 77 skip (not root / no ip or tc).
#   tests/netns/link_flap.sh DSTX_BINARY
set -uo pipefail
dstx=$(realpath "${1:?usage: link_flap.sh DSTX_BINARY}")
if [ "$(id -u)" -ne 0 ]; then echo "SKIP: needs root for network namespaces"; exit 77; fi
command -v ip >/dev/null && command -v tc >/dev/null || { echo "SKIP: ip/tc (iproute2) not installed"; exit 77; }

tag="dflap$$"
a="$tag-a" b="$tag-b"
work=$(mktemp -d)
cleanup() {
  ip netns pids "$a" 2>/dev/null | xargs -r kill -9 2>/dev/null
  ip netns pids "$b" 2>/dev/null | xargs -r kill -9 2>/dev/null
  ip netns del "$a" 2>/dev/null
  ip netns del "$b" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT INT TERM
ip netns add "$a" && ip netns add "$b" || { echo "SKIP: cannot create network namespaces"; exit 77; }
ip link add "$tag-va" type veth peer name "$tag-vb" || { echo "SKIP: cannot create a veth pair"; exit 77; }
ip link set "$tag-va" netns "$a"
ip link set "$tag-vb" netns "$b"
ip -n "$a" addr add 10.79.0.1/24 dev "$tag-va"
ip -n "$b" addr add 10.79.0.2/24 dev "$tag-vb"
for ns in "$a" "$b"; do ip -n "$ns" link set lo up; done
ip -n "$a" link set "$tag-va" up
ip -n "$b" link set "$tag-vb" up
# 400 Mbit/s: a 256 MiB random state takes about 5 s, long enough to break the link in the middle.
ip netns exec "$a" tc qdisc add dev "$tag-va" root tbf rate 400mbit burst 256kb latency 20ms

fails=0
spec="emu:size=256M,profile=random,seed=7"
port=7411

run_case() {  # name down_ms(-1 = for good) expect(committed|failed) extra send args...
  local name=$1 down_ms=$2 expect=$3; shift 3
  port=$((port + 1))
  local sink="$spec"
  [ "$expect" = failed ] && sink="file:$work/$name.bin"
  ip netns exec "$b" timeout 120 "$dstx" recv --listen "10.79.0.2:$port" --sink "$sink" --json --quiet \
    --resume-timeout 8000 --idle-timeout 6000 --tcp-user-timeout 1500 >"$work/$name.recv" 2>"$work/$name.recv.err" &
  local rpid=$!
  sleep 0.3
  ip netns exec "$a" timeout 120 "$dstx" send --source "$spec" --to "10.79.0.2:$port" --json --quiet --streams 2 \
    --idle-timeout 6000 "$@" >"$work/$name.send" 2>"$work/$name.send.err" &
  local spid=$!
  sleep 1.5
  ip -n "$a" link set "$tag-va" down
  if [ "$down_ms" -ge 0 ]; then
    sleep "$(awk "BEGIN {print $down_ms / 1000}")"
    ip -n "$a" link set "$tag-va" up
  fi
  wait "$spid"; local src=$?
  wait "$rpid"; local rrc=$?
  ip -n "$a" link set "$tag-va" up
  local ok=1
  if [ "$expect" = committed ]; then
    [ $src -eq 0 ] && [ $rrc -eq 0 ] && grep -q '"status":"committed"' "$work/$name.recv" || ok=0
    if [ "$name" = outage_breaks_connections ]; then
      grep -q '"resumes":0' "$work/$name.send" && { echo "  expected the connections to break and resume"; ok=0; }
    fi
  else
    [ $src -ne 0 ] && [ $rrc -ne 0 ] && [ ! -e "$work/$name.bin" ] && [ ! -e "$work/$name.bin.partial" ] || ok=0
  fi
  if [ $ok -eq 1 ]; then
    echo "PASS $name (send rc=$src, recv rc=$rrc, $(grep -o '"resumes":[0-9]*' "$work/$name.send"))"
  else
    echo "FAIL $name (send rc=$src, recv rc=$rrc)"
    cat "$work/$name.send" "$work/$name.send.err" "$work/$name.recv" "$work/$name.recv.err"
    fails=$((fails + 1))
  fi
  grep -o '"error":"[^"]*"' "$work/$name.send" "$work/$name.recv" 2>/dev/null | sed 's/^/    /'
}

run_case brief_outage 2000 committed --tcp-user-timeout 30000
run_case outage_breaks_connections 4000 committed --tcp-user-timeout 1500 --reconnect-attempts 8
run_case link_stays_down -1 failed --tcp-user-timeout 1500 --reconnect-attempts 3
echo "$((3 - fails)) passed, $fails failed"
[ $fails -eq 0 ]
