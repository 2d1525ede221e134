#!/usr/bin/env bash
# What TLS costs: dstx send file:… → dstx recv null: over loopback, plain TCP against TLS 1.3 with the keys in the
# kernel (kTLS) and with the user-space relay, for a random and a mixed file, side by side in one run. Mutual
# certificate authentication (made here with the openssl command); --codec auto as a user would run it.
# Prints a markdown table (median GB/s of logical bytes, CPU seconds per GB on both sides together).
#   bench/tls_bench.sh [BUILD_DIR] [SIZE_MIB] [REPEATS] [STREAMS]
set -euo pipefail
build=$(realpath "${1:-build}")
size_mib=${2:-1024}
repeats=${3:-3}
streams=${4:-2}
dstx="$build/dstx"
make_state="$build/bench/make_state"
for b in "$dstx" "$make_state"; do [ -x "$b" ] || { echo "missing $b: build first" >&2; exit 1; }; done
command -v openssl >/dev/null || { echo "the openssl command is needed for the certificates" >&2; exit 1; }
work=$(mktemp -d /dev/shm/dstx-tls-bench.XXXXXX)
trap 'rm -rf "$work"; kill $(jobs -p) 2>/dev/null || true' EXIT
port=$((20000 + RANDOM % 20000))

# Certificates: one CA, a receiver (IP:127.0.0.1) and a sender.
(
  cd "$work"
  ec="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
  openssl req -x509 $ec -subj /CN=bench-ca -days 2 -keyout ca.key -out ca.pem \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
  for who in receiver:IP:127.0.0.1 sender:DNS:sender.bench; do
    name=${who%%:*} san=${who#*:}
    openssl req -new $ec -subj "/CN=$name" -keyout $name.key -out $name.csr -addext "subjectAltName=$san"
    openssl x509 -req -in $name.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -copy_extensions copy \
      -out $name.pem
  done
) >/dev/null 2>&1
recv_tls=(--tls-ca "$work/ca.pem" --tls-cert "$work/receiver.pem" --tls-key "$work/receiver.key"
          --tls-peer-name sender.bench)
send_tls=(--tls-ca "$work/ca.pem" --tls-cert "$work/sender.pem" --tls-key "$work/sender.key"
          --tls-peer-name 127.0.0.1)

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# run FILE MODE: prints "gbps cpu_seconds tls" (cpu: user+sys of sender and receiver), or "fail REASON".
run() {
  local file=$1 mode=$2 env=() rt=() st=()
  case $mode in
    plain) ;;
    ktls) env=(DSTX_KTLS=on); rt=("${recv_tls[@]}"); st=("${send_tls[@]}") ;;
    user) env=(DSTX_KTLS=off); rt=("${recv_tls[@]}"); st=("${send_tls[@]}") ;;
  esac
  env "${env[@]}" /usr/bin/time -f "%U %S" -o "$work/rtime" \
    "$dstx" recv --listen "127.0.0.1:$port" --sink null: --json --quiet "${rt[@]}" >"$work/recv.json" 2>/dev/null &
  local rpid=$!
  sleep 0.3
  env "${env[@]}" /usr/bin/time -f "%U %S" -o "$work/stime" \
    "$dstx" send --source "file:$file" --to "127.0.0.1:$port" --streams "$streams" --json --quiet "${st[@]}" \
    >"$work/send.json" 2>/dev/null || true
  wait "$rpid" || true
  python3 - "$work" <<'EOF'
import json, sys
w = sys.argv[1]
d = json.load(open(w + "/send.json"))
if d["status"] != "committed":
    print("fail", d.get("error", "?").replace(" ", "~")[:300]); sys.exit()
cpu = sum(float(x) for f in ("stime", "rtime") for x in open(w + "/" + f).read().split()[-2:])
print(f'{d["bytes"] / d["seconds"] / 1e9:.3f} {cpu:.2f} {d["tls"].split(" (")[0].replace(" ", "~")}')
EOF
}

printf '| profile | plain GB/s | kTLS GB/s | user-space TLS GB/s | kTLS / plain | user-space / plain | CPU s/GB plain | kTLS | user-space |\n'
printf '|---|---:|---:|---:|---:|---:|---:|---:|---:|\n'
notes=()
for profile in random mixed; do
  file="$work/$profile.bin"
  "$make_state" "$profile" $((size_mib << 20)) 1 "$file"
  gb=$(python3 -c "print($(stat -c %s "$file") / 1e9)")
  declare -A rate=() cpu=()
  for mode in plain ktls user; do
    rates=() cpus=()
    for _ in $(seq "$repeats"); do
      read -r r c t < <(run "$file" "$mode")
      if [ "$r" = fail ]; then
        notes+=("$profile/$mode: failed: ${c//\~/ }")
        break
      fi
      if [ "$mode" = ktls ] && [ "$t" != kTLS ]; then notes+=("$profile/ktls: ran as ${t//\~/ }"); fi
      rates+=("$r"); cpus+=("$c")
    done
    if [ ${#rates[@]} -gt 0 ]; then
      rate[$mode]=$(printf '%s\n' "${rates[@]}" | median)
      cpu[$mode]=$(python3 -c "print(f'{$(printf '%s\n' "${cpus[@]}" | median) / $gb:.2f}')")
    else
      rate[$mode]=n/a; cpu[$mode]=n/a
    fi
  done
  ratio() { [ "$1" = n/a ] && { echo n/a; return; }; python3 -c "print(f'{$1 / ${rate[plain]}:.2f}x')"; }
  printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$profile" "${rate[plain]}" "${rate[ktls]}" \
    "${rate[user]}" "$(ratio "${rate[ktls]}")" "$(ratio "${rate[user]}")" "${cpu[plain]}" "${cpu[ktls]}" "${cpu[user]}"
  rm -f "$file"
done
echo
echo "$(nproc) cores, ${size_mib} MiB per profile, median of $repeats runs, $streams streams, loopback TCP, files on tmpfs,"
echo "receiver discards (null:), --codec auto; TLS 1.3 with mutual certificate authentication."
for n in "${notes[@]}"; do echo "- $n"; done
