#!/usr/bin/env python3
"""QEMU live migration carried by dstx (CTest: qemu_migrate_through_dstx).

usage: migrate_through_dstx.py DSTX_BINARY

Case 1, good wire: a source QEMU (TCG, no KVM needed) runs tests/qemu/guest.S, which prints an incrementing counter
on its serial port. A destination QEMU waits with
    -incoming "exec:dstx recv --listen 127.0.0.1:0 --sink stdout: --quiet"
and the source migrates with QMP
    migrate uri="exec:dstx send --source stdin: --to 127.0.0.1:PORT --quiet".
Checks: QMP query-migrate says completed, both dstx exit 0 (send committed), the destination runs (query-status),
its counter carries on from where the source stopped (no restart from 1), and the source is left paused.

Cases 2 and 3, one flipped bit on the wire (a proxy in this script between dstx send and dstx recv), in the first
chunk and a few MiB later: the destination's dstx refuses the stream and exits non-zero, the destination QEMU never
runs the guest (with verified bytes before the bad chunk it fails the load and exits; with none it waits in
"inmigrate"), the source migration fails and the source VM keeps running and counting.

Case 4, the hazard of exec: migration: QEMU's whole stream fits in dstx's first chunk, so the flipped bit is found
only after QEMU has written everything and reported "completed". The source stays paused (postmigrate) although
dstx send failed, and "cont" resumes it. See docs/qemu.md.

Exit 0 pass, 1 fail, 77 skip (only when qemu-system-x86_64 is not installed).
"""

import os
import shutil
import sys
import tempfile
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qemu_harness as h  # noqa: E402
from qemu_harness import check, log, q, wait_for  # noqa: E402

MEM_MIB = 64
MIGRATE_TIMEOUT = 60
WATCHDOG = 160  # the whole script, below CTest's TIMEOUT 180 so that our own clean-up runs


def start_source(qemu, workdir, disk, name, mem_mib=MEM_MIB):
    src = h.Vm(qemu, workdir, name, disk, mem_mib)
    src.connect()
    # The guest fills RAM first and only then prints; wait for a few lines so it is really counting.
    wait_for(lambda: len(src.counters()) >= 5, 60, f"{name}: the guest's counter on the serial port")
    check(src.status() == "running", f"{name}: not running")
    return src


def start_destination(qemu, dstx, workdir, disk, name, mem_mib=MEM_MIB):
    rc_file = os.path.join(workdir, f"{name}.dstx-recv.rc")
    # exec: runs through /bin/sh -c; the "; echo $?" records dstx's exit status, which QEMU itself ignores.
    incoming = (f"exec:{q(dstx)} recv --listen 127.0.0.1:0 --sink stdout: --quiet --accept-timeout 60000"
                f"; echo $? > {q(rc_file)}")
    dst = h.Vm(qemu, workdir, name, disk, mem_mib, incoming=incoming)
    dst.connect()
    check(dst.status() == "inmigrate", f"{name}: expected status inmigrate, got {dst.status()}")
    port = h.dstx_recv_port(dst)
    return dst, port, rc_file


def send_uri(dstx, port, workdir, name):
    json_file = os.path.join(workdir, f"{name}.dstx-send.json")
    rc_file = os.path.join(workdir, f"{name}.dstx-send.rc")
    uri = (f"exec:{q(dstx)} send --source stdin: --to 127.0.0.1:{port} --quiet --json > {q(json_file)}"
           f"; echo $? > {q(rc_file)}")
    return uri, json_file, rc_file


def case_good_wire(qemu, dstx, workdir, disk):
    log("case 1: migration through dstx over loopback")
    src = start_source(qemu, workdir, disk, "good-src")
    dst, port, recv_rc = start_destination(qemu, dstx, workdir, disk, "good-dst")
    uri, send_json, send_rc = send_uri(dstx, port, workdir, "good")
    src.qmp.execute("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
    before = src.counters()[-1]
    t0 = time.monotonic()
    src.qmp.execute("migrate", uri=uri)
    info = h.wait_migration_end(src, MIGRATE_TIMEOUT)
    check(info["status"] == "completed",
          f"source: migration {info['status']}: {info.get('error-desc', '')}; source stderr: {src.stderr_text()}")
    log(f"source: query-migrate completed in {info.get('total-time')} ms, "
        f"{info['ram']['total'] >> 20} MiB RAM, {info['ram']['transferred']} bytes in QEMU's stream, "
        f"downtime {info.get('downtime')} ms")

    # QEMU ignores the exit status of an exec: migration command and reports "completed" once it has written the
    # last byte into the pipe. The dstx exit status shows whether the receiver committed.
    rc = wait_for(lambda: h.read_int_file(send_rc) is not None, MIGRATE_TIMEOUT, "dstx send to exit")
    rc = h.read_int_file(send_rc)
    result = h.read_json_file(send_json)
    check(rc == 0 and result and result.get("status") == "committed",
          f"dstx send exited {rc}: {result}; source stderr: {src.stderr_text()}")
    log(f"dstx send: committed {result['bytes']} bytes, {result['wire_bytes']} on the wire, "
        f"{result['streams']} streams, {result['seconds']:.3f} s")

    wait_for(lambda: dst.status() == "running", 30, "destination: query-status running")
    dinfo = dst.migrate_info()
    check(dinfo.get("status") == "completed", f"destination: query-migrate says {dinfo}")
    wait_for(lambda: h.read_int_file(recv_rc) is not None, 30, "dstx recv to exit")
    check(h.read_int_file(recv_rc) == 0, f"dstx recv exited {h.read_int_file(recv_rc)}: {dst.stderr_text()}")
    elapsed = time.monotonic() - t0
    log(f"destination running {elapsed:.2f} s after migrate")

    # The counter: the source's last value, then the destination's values, one after the other.
    wait_for(lambda: len(dst.counters()) >= 5, 30, "destination: the counter to continue on its serial port")
    s, d = src.counters(), dst.counters()
    check(s and s[-1] >= before, f"source counter went backwards: {before} then {s[-1:]}")
    joined = h.serial_text(src.serial) + h.serial_text(dst.serial)
    values = h.read_counters_bytes(joined)
    check(values == list(range(values[0], values[0] + len(values))),
          f"counter is not continuous across the migration: source ends {s[-3:]}, destination starts {d[:3]}")
    check(d[0] > 1 and d[0] >= s[-1], f"destination counter restarted: source ended at {s[-1]}, destination "
          f"starts at {d[0]}")
    log(f"counter: source stopped at n={s[-1]}, destination continued n={d[0]}..{d[-1]}")
    st = src.status()
    check(st == "postmigrate", f"source: expected status postmigrate after a completed migration, got {st}")
    src.kill()
    dst.kill()


def case_flipped_byte(qemu, dstx, workdir, disk, name, chunk_offset, dst_gets_bytes):
    """chunk_offset: a logical offset; the frame of the chunk that covers it gets the flipped bit.
    dst_gets_bytes: whether chunks before the bad one reach the destination QEMU (a bad first chunk leaves it
    with an empty stream)."""
    log(f"case {name}: one flipped bit in the chunk covering offset {chunk_offset} on its way to dstx recv")
    src = start_source(qemu, workdir, disk, f"{name}-src")
    dst, port, recv_rc = start_destination(qemu, dstx, workdir, disk, f"{name}-dst")
    proxy = h.FlipProxy("127.0.0.1", port, chunk_offset)
    uri, send_json, send_rc = send_uri(dstx, proxy.port, workdir, name)
    # Throttle QEMU so it is still writing RAM when the receiver refuses the stream (the guest's ~45 MiB take ~3 s
    # at this rate). Had QEMU written the whole stream before the refusal, it would report "completed" and leave
    # the source paused: see docs/qemu.md.
    src.qmp.execute("migrate-set-parameters", **{"max-bandwidth": 16 << 20})
    src.qmp.execute("migrate", uri=uri)
    info = h.wait_migration_end(src, MIGRATE_TIMEOUT)
    check(proxy.flipped, "the proxy never flipped a byte (stream shorter than expected?)")
    check(info["status"] == "failed", f"source: expected the migration to fail, got {info}")
    log(f"source: query-migrate failed: {info.get('error-desc', '')}")

    wait_for(lambda: h.read_int_file(send_rc) is not None, 30, "dstx send to exit")
    rc = h.read_int_file(send_rc)
    result = h.read_json_file(send_json) or {}
    check(rc == 1 and result.get("status") == "failed", f"dstx send: expected exit 1 and failed, got {rc}: {result}")
    log(f"dstx send: exit {rc}, {result.get('reason')}: {result.get('error')}")

    wait_for(lambda: h.read_int_file(recv_rc) is not None, 30, "dstx recv to exit")
    rrc = h.read_int_file(recv_rc)
    check(rrc not in (None, 0), f"dstx recv: expected a non-zero exit, got {rrc}")
    recv_said = " | ".join(line.strip() for line in dst.stderr_text().splitlines() if "listening" not in line)
    if dst_gets_bytes:
        # The verified chunks before the bad one reached QEMU, then the stream ended early: QEMU fails the load and
        # exits without running the guest.
        try:
            dst.proc.wait(timeout=30)
        except Exception:
            raise h.Failure(f"destination QEMU still alive after the refused stream: {dst.stderr_text()}")
        check(dst.proc.returncode != 0, f"destination QEMU exited {dst.proc.returncode}")
        log(f"destination: dstx recv exit {rrc}, QEMU exit {dst.proc.returncode}: {recv_said}")
    else:
        # Nothing was verified, so nothing reached QEMU. QEMU 7.2 does not notice a stream that ends before its
        # first byte (it waits for data, never for hang-up) and stays in "inmigrate" until it is killed.
        time.sleep(2)
        check(dst.proc.poll() is None, f"destination QEMU exited {dst.proc.returncode}: {dst.stderr_text()}")
        st = dst.status()
        check(st == "inmigrate", f"destination: expected inmigrate, got {st}")
        log(f"destination: dstx recv exit {rrc}, QEMU still '{st}' with an empty stream: {recv_said}")
    check(dst.counters() == [], f"destination ran the guest: {dst.counters()[:5]}")

    st = src.status()
    check(st == "running", f"source: expected running after the failed migration, got {st}")
    n = src.counters()[-1]
    wait_for(lambda: src.counters()[-1] >= n + 5, 30, "source: the counter to keep counting")
    log(f"source: running, counter went on from n={n} to n={src.counters()[-1]}")
    proxy.close()
    src.kill()
    dst.kill()


def case_flip_after_qemu_finished(qemu, dstx, workdir, disk):
    """The hazard of exec: migration: QEMU reports "completed" once the last byte is in the pipe and never looks at
    the command's exit status. With 16 MiB of RAM the guest fills nothing and QEMU's whole stream (about 1 MiB)
    is in the pipe and in dstx's first chunk before dstx sends anything, so the flipped bit is found only after
    QEMU has finished: the source says completed and stays paused although nothing was committed. dstx's exit
    status tells; "cont" resumes the source."""
    name = "flip-after-completed"
    log(f"case {name}: QEMU's stream fits dstx's buffers, a flipped bit is found after QEMU has finished")
    src = start_source(qemu, workdir, disk, f"{name}-src", mem_mib=16)
    dst, port, recv_rc = start_destination(qemu, dstx, workdir, disk, f"{name}-dst", mem_mib=16)
    proxy = h.FlipProxy("127.0.0.1", port, 0)
    uri, send_json, send_rc = send_uri(dstx, proxy.port, workdir, name)
    src.qmp.execute("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
    src.qmp.execute("migrate", uri=uri)
    info = h.wait_migration_end(src, MIGRATE_TIMEOUT)
    check(info["status"] == "completed", f"source: expected QEMU to report completed, got {info}")
    wait_for(lambda: h.read_int_file(send_rc) is not None, 30, "dstx send to exit")
    rc = h.read_int_file(send_rc)
    result = h.read_json_file(send_json) or {}
    check(proxy.flipped, "the proxy never flipped a byte")
    check(rc == 1 and result.get("status") == "failed", f"dstx send: expected exit 1 and failed, got {rc}: {result}")
    st = src.status()
    check(st == "postmigrate", f"source: expected postmigrate, got {st}")
    log(f"source: query-migrate completed, status {st}, but dstx send exit {rc}: {result.get('error')}")
    wait_for(lambda: h.read_int_file(recv_rc) is not None, 30, "dstx recv to exit")
    check(h.read_int_file(recv_rc) not in (None, 0), "dstx recv: expected a non-zero exit")
    check(dst.counters() == [] and dst.status() != "running", "destination ran the guest")
    n = src.counters()[-1]
    src.qmp.execute("cont")
    check(src.status() == "running", "source: not running after cont")
    wait_for(lambda: src.counters()[-1] >= n + 5, 30, "source: the counter to go on after cont")
    log(f"source: after 'cont' running again, counter went on from n={n} to n={src.counters()[-1]}")
    proxy.close()
    src.kill()
    dst.kill()


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    dstx = os.path.abspath(sys.argv[1])
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        print("SKIP: qemu-system-x86_64 not found (Debian: apt-get install --no-install-recommends qemu-system-x86)")
        return 77
    if not os.access(dstx, os.X_OK):
        print(f"FAIL: {dstx}: not an executable", file=sys.stderr)
        return 1
    h.install_cleanup(watchdog_seconds=WATCHDOG)
    keep = os.environ.get("DSTX_QEMU_KEEP")  # keep the work dir (logs) for a look afterwards
    workdir = tempfile.mkdtemp(prefix="dstx-qemu-")
    ok = False
    try:
        disk = h.build_guest(workdir)
        case_good_wire(qemu, dstx, workdir, disk)
        # In the first chunk: the destination QEMU gets no byte at all.
        case_flipped_byte(qemu, dstx, workdir, disk, "flip-first-chunk", 0, dst_gets_bytes=False)
        # In the chunk at 8 MiB (of ~45): the verified chunks before it reach QEMU, then the stream ends early.
        case_flipped_byte(qemu, dstx, workdir, disk, "flip-later", 8 << 20, dst_gets_bytes=True)
        case_flip_after_qemu_finished(qemu, dstx, workdir, disk)
        ok = True
        log("PASS")
    except h.Failure as e:
        log(f"FAIL: {e}")
        log(f"logs kept in {workdir}")
        keep = True
    finally:
        h.kill_all()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
