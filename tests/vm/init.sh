#!/bin/sh
# shellcheck shell=dash disable=SC2012  # busybox ash: local is there; ls on sysfs names is fine
# /init of the mtty conformance VM: built into the initramfs by tests/vm/build_initramfs.sh, booted by
# tests/vm/run_mtty_test.sh. Creates mtty sample devices (samples/vfio-mdev/mtty.c), writes markers into the source's
# UART scratch registers, migrates with `dstx migrate` / `dstx recv` over loopback TCP, reads the markers back on the
# destination, and checks that a failing destination leaves the source RUNNING. One line per case:
#   DSTX-VM-RESULT case=NAME result=PASS|FAIL [why=...]
# then DSTX-VM-DONE pass=N fail=M, and the VM powers off.
# Kernel command line: dstx.cases=NAME,NAME runs only those cases; dstx.shell=1 opens a shell at the end instead of
# powering off (run by hand: tests/vm/run_mtty_test.sh --shell).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
export HOME=/tmp

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
mount -t tmpfs tmpfs /tmp
ip link set lo up

cmdline="$(cat /proc/cmdline)"
only=""
shell=0
for word in $cmdline; do
  case "$word" in
    dstx.cases=*) only=",${word#dstx.cases=}," ;;
    dstx.shell=1) shell=1 ;;
  esac
done

pass=0
fail=0
finish() {
  echo "DSTX-VM-DONE pass=$pass fail=$fail"
  if [ "$shell" = 1 ]; then
    echo "dstx.shell=1: a shell; 'poweroff -f' ends the VM"
    setsid cttyhack sh
  fi
  sync
  poweroff -f
  reboot -f
}

say() { echo "vm: $*"; }

MTYPES=/sys/class/mdev_bus/mtty/mdev_supported_types
if ! [ -d "$MTYPES/mtty-2" ]; then
  echo "DSTX-VM-RESULT case=setup result=FAIL why=no_mtty_parent_device:$MTYPES/mtty-2_missing"
  fail=$((fail + 1))
  dmesg | tail -n 40
  finish
fi
say "kernel $(uname -r); mtty types: $(ls $MTYPES | tr '\n' ' '); dstx: $(dstx --version 2>&1 | head -n1)"

# --- mdev helpers -------------------------------------------------------------------------------------------------
# uuid CASE ROLE: literal UUIDs (no uuidgen here), unique per case and role.
uuid() { printf '%08x-0000-4000-8000-%012x\n' "$1" "$2"; }
create() {  # UUID TYPE(1|2)
  echo "$1" >"$MTYPES/mtty-$2/create" || { say "create mtty-$2 $1 failed"; return 1; }
}
remove() {  # UUID
  [ -e "/sys/bus/mdev/devices/$1" ] && echo 1 >"/sys/bus/mdev/devices/$1/remove"
  return 0
}
spec() {  # KIND(group|cdev) UUID -> a dstx device spec
  local dir="/sys/bus/mdev/devices/$2"
  case "$1" in
    group) echo "vfio-group:/dev/vfio/$(basename "$(readlink "$dir/iommu_group")"):$2" ;;
    cdev) echo "vfio:/dev/vfio/devices/$(ls "$dir/vfio-dev" | head -n1)" ;;
  esac
}
jfield() {  # FILE KEY: a string or number field of dstx's --json object
  sed -n "s/.*\"$2\":\"\{0,1\}\([^\",}]*\).*/\1/p" "$1" | head -n1
}

# --- one migration ---------------------------------------------------------------------------------------------
# migrate NAME SRC_SPEC DST_SPEC STREAMS ROUNDS: sets mig_rc recv_rc; outputs in /tmp/NAME.{mig,recv}.{json,err}
migrate() {
  local f="/tmp/$1" rpid port i
  : >"$f.recv.err"
  timeout -s KILL 90 dstx recv --listen 127.0.0.1:0 --sink "$3" --json --accept-timeout 60000 \
    >"$f.recv.json" 2>"$f.recv.err" &
  rpid=$!
  port=""
  i=0
  while [ $i -lt 600 ]; do
    port="$(sed -n 's/.*listening on 127\.0\.0\.1:\([0-9][0-9]*\).*/\1/p' "$f.recv.err")"
    [ -n "$port" ] && break
    kill -0 $rpid 2>/dev/null || break
    sleep 0.1
    i=$((i + 1))
  done
  # No listener (the receiver could not open its device): migrate towards a closed port; it must fail cleanly.
  [ -n "$port" ] || port=1
  say "$1: dstx migrate --device $2 --to 127.0.0.1:$port --streams $4 --precopy-max-rounds $5 --json"
  timeout -s KILL 90 dstx migrate --device "$2" --to "127.0.0.1:$port" --streams "$4" --precopy-max-rounds "$5" \
    --json --connect-timeout 5000 >"$f.mig.json" 2>"$f.mig.err"
  mig_rc=$?
  wait $rpid
  recv_rc=$?
  say "$1: migrate exit $mig_rc: $(cat "$f.mig.json") $(cat "$f.mig.err")"
  say "$1: recv exit $recv_rc: $(cat "$f.recv.json") $(cat "$f.recv.err")"
}

why=""
check() {  # DESCRIPTION CONDITION...: records the first failed check in $why
  local desc="$1"
  shift
  if ! "$@"; then
    [ -n "$why" ] || why="$desc"
    say "check failed: $desc"
  fi
}
eq() { [ "$1" = "$2" ]; }

report() {  # NAME
  if [ -z "$why" ]; then
    echo "DSTX-VM-RESULT case=$1 result=PASS"
    pass=$((pass + 1))
  else
    echo "DSTX-VM-RESULT case=$1 result=FAIL why=$(echo "$why" | tr ' ' '_')"
    fail=$((fail + 1))
    say "$1: dmesg tail:"
    dmesg | tail -n 25
  fi
}

wanted() { [ -z "$only" ] || case "$only" in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

# mtty-2's migration stream (samples/vfio-mdev/mtty.c: a 24-byte header, then 36 bytes per port).
MTTY2_BYTES=96
MTTY2_PRECOPY_BYTES=24

ncase=0
# --- a successful migration ----------------------------------------------------------------------------------------
# good NAME SRC_KIND DST_KIND STREAMS ROUNDS
good() {
  ncase=$((ncase + 1))
  wanted "$1" || return 0
  name="$1" skind="$2" dkind="$3" streams="$4" rounds="$5"
  why=""
  src="$(uuid $ncase 1)"
  dst="$(uuid $ncase 2)"
  m0="$(printf '0x%02x' $((0x10 + ncase)))"
  m1="$(printf '0x%02x' $((0xa0 + ncase)))"
  if create "$src" 2 && create "$dst" 2; then
    s="$(spec "$skind" "$src")"
    d="$(spec "$dkind" "$dst")"
    say "$name: source $s, destination $d, markers $m0 $m1"
    check "marker_write_on_source" mtty_marker "$s" write "$m0" "$m1"
    check "marker_readback_on_source" eq "$(mtty_marker "$s" read)" "scr $m0 $m1"
    check "destination_scratch_zero_before" eq "$(mtty_marker "$d" read)" "scr 0x00 0x00"
    migrate "$name" "$s" "$d" "$streams" "$rounds"
    f="/tmp/$name"
    check "migrate_exit_$mig_rc" eq "$mig_rc" 0
    check "recv_exit_$recv_rc" eq "$recv_rc" 0
    check "migrate_status_$(jfield "$f.mig.json" status)" eq "$(jfield "$f.mig.json" status)" committed
    check "recv_status_$(jfield "$f.recv.json" status)" eq "$(jfield "$f.recv.json" status)" committed
    check "protocol_$(jfield "$f.mig.json" protocol)" eq "$(jfield "$f.mig.json" protocol)" v2
    pre="$(jfield "$f.mig.json" precopy_bytes)"
    stop="$(jfield "$f.mig.json" stopcopy_bytes)"
    rounds_done="$(jfield "$f.mig.json" precopy_rounds)"
    check "state_bytes_${pre}+${stop}_not_$MTTY2_BYTES" eq "$((${pre:-0} + ${stop:-0}))" "$MTTY2_BYTES"
    if [ "$rounds" = 0 ]; then
      check "precopy_rounds_${rounds_done}_with_max_0" eq "$rounds_done" 0
    else
      check "precopy_rounds_${rounds_done}_expected_1" eq "$rounds_done" 1
      check "precopy_bytes_${pre}_not_$MTTY2_PRECOPY_BYTES" eq "$pre" "$MTTY2_PRECOPY_BYTES"
    fi
    check "streams_$(jfield "$f.mig.json" streams)_not_$streams" eq "$(jfield "$f.mig.json" streams)" "$streams"
    check "source_json_device_state_$(jfield "$f.mig.json" device_state)" eq "$(jfield "$f.mig.json" device_state)" STOP
    check "destination_json_device_state_$(jfield "$f.recv.json" device_state)" \
      eq "$(jfield "$f.recv.json" device_state)" STOP
    got="$(mtty_marker "$d" read)"
    say "$name: destination scratch registers after migration: $got"
    check "markers_on_destination:$(echo "$got" | tr ' ' ',')" eq "$got" "scr $m0 $m1"
    check "destination_state:$(mtty_marker "$d" state | tr ' ' ',')" eq "$(mtty_marker "$d" state)" "state STOP 1"
    check "source_state:$(mtty_marker "$s" state | tr ' ' ',')" eq "$(mtty_marker "$s" state)" "state STOP 1"
  else
    why="mdev_create_failed"
  fi
  remove "$src"
  remove "$dst"
  report "$name"
}

# --- a destination that fails: the source must end RUNNING, markers intact, and still migrate afterwards -----------
# fault NAME FAULT(rejected|removed) SRC_KIND DST_KIND ROUNDS RETRY_KIND
#   rejected: the destination is an mtty-1 (one port); the kernel refuses mtty-2's stream (nr_ports differ): the
#             sink's write() or RESUMING -> STOP fails after the source went through STOP_COPY.
#   removed:  the destination mdev is removed (sysfs remove) before the receiver opens it.
# Then the same source migrates to a fresh mtty-2 over RETRY_KIND: the rolled-back device is a working device.
fault() {
  ncase=$((ncase + 1))
  wanted "$1" || return 0
  name="$1" kind="$2" skind="$3" dkind="$4" rounds="$5" rkind="$6"
  why=""
  src="$(uuid $ncase 1)"
  dst="$(uuid $ncase 2)"
  again="$(uuid $ncase 3)"
  m0="$(printf '0x%02x' $((0x10 + ncase)))"
  m1="$(printf '0x%02x' $((0xa0 + ncase)))"
  dtype=2
  [ "$kind" = rejected ] && dtype=1
  if create "$src" 2 && create "$dst" "$dtype"; then
    s="$(spec "$skind" "$src")"
    d="$(spec "$dkind" "$dst")"
    say "$name: source $s, destination $d (mtty-$dtype, fault $kind), markers $m0 $m1"
    check "marker_write_on_source" mtty_marker "$s" write "$m0" "$m1"
    if [ "$kind" = removed ]; then
      remove "$dst"
      check "destination_still_present_after_remove" eval "! [ -e /sys/bus/mdev/devices/$dst ]"
    fi
    migrate "$name" "$s" "$d" 2 "$rounds"
    f="/tmp/$name"
    check "migrate_exit_${mig_rc}_expected_1" eq "$mig_rc" 1
    check "recv_exit_${recv_rc}_expected_1" eq "$recv_rc" 1
    check "migrate_status_$(jfield "$f.mig.json" status)_expected_failed" eq "$(jfield "$f.mig.json" status)" failed
    check "source_json_device_state_$(jfield "$f.mig.json" device_state)_expected_RUNNING" \
      eq "$(jfield "$f.mig.json" device_state)" RUNNING
    if [ "$kind" = rejected ]; then
      check "migrate_reason_$(jfield "$f.mig.json" reason)_expected_sink" eq "$(jfield "$f.mig.json" reason)" sink
      check "source_reached_stop_copy:stopcopy_bytes=$(jfield "$f.mig.json" stopcopy_bytes)" \
        eval "[ \"$(jfield "$f.mig.json" stopcopy_bytes)\" -gt 0 ]"
      check "destination_json_device_state_$(jfield "$f.recv.json" device_state)_expected_RUNNING" \
        eq "$(jfield "$f.recv.json" device_state)" RUNNING
      check "destination_state_after_abort:$(mtty_marker "$d" state | tr ' ' ',')" \
        eq "$(mtty_marker "$d" state)" "state RUNNING 2"
    fi
    check "source_state:$(mtty_marker "$s" state | tr ' ' ',')_expected_RUNNING" \
      eq "$(mtty_marker "$s" state)" "state RUNNING 2"
    got="$(mtty_marker "$s" read)"
    say "$name: source scratch registers after the failed migration: $got"
    check "markers_on_source_after_fault:$(echo "$got" | tr ' ' ',')" eq "$got" "scr $m0 $m1"
    # The rolled-back source is a working device: it migrates now.
    if create "$again" 2; then
      a="$(spec "$rkind" "$again")"
      migrate "$name.retry" "$s" "$a" 2 "$rounds"
      check "retry_migrate_exit_$mig_rc" eq "$mig_rc" 0
      check "retry_recv_exit_$recv_rc" eq "$recv_rc" 0
      got="$(mtty_marker "$a" read)"
      check "retry_markers_on_destination:$(echo "$got" | tr ' ' ',')" eq "$got" "scr $m0 $m1"
      check "retry_source_state:$(mtty_marker "$s" state | tr ' ' ',')" eq "$(mtty_marker "$s" state)" "state STOP 1"
    else
      check "retry_mdev_create" false
    fi
  else
    why="mdev_create_failed"
  fi
  remove "$src"
  remove "$dst"
  remove "$again"
  report "$name"
}

#    NAME                    SRC    DST    STREAMS PRECOPY_MAX_ROUNDS
good group_stopcopy_1s       group  group  1       0
good group_precopy_4s        group  group  4       8
good cdev_stopcopy_4s        cdev   cdev   4       0
good cdev_precopy_1s         cdev   cdev   1       8
good group_to_cdev_precopy_2s group cdev   2       8
#     NAME                    FAULT    SRC    DST    ROUNDS RETRY_DST
fault fault_rejected_group    rejected group  group  8      group
fault fault_rejected_cdev     rejected cdev   cdev   0      cdev
fault fault_removed_cdev      removed  cdev   cdev   8      cdev

finish
