"""Helpers for driving QEMU live migration through dstx: the boot-sector guest, QEMU processes with QMP, serial
counter logs and a byte-flipping TCP proxy. Standard library only. Used by tests/qemu/migrate_through_dstx.py and
bench/qemu_migration.sh.

Every process started here is registered and killed by kill_all() (the callers install it for exit and signals).
"""

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
GUEST_SOURCE = os.path.join(HERE, "guest.S")

_procs = []
_procs_lock = threading.Lock()


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Failure(Exception):
    """A check did not hold."""


def check(cond, msg):
    if not cond:
        raise Failure(msg)


def wait_for(pred, timeout, what, interval=0.1):
    """Polls pred() until it returns a true value, which is returned. Raises Failure after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise Failure(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def spawn(argv, **kw):
    """Popen in its own process group, registered for kill_all()."""
    p = subprocess.Popen(argv, start_new_session=True, **kw)
    with _procs_lock:
        _procs.append(p)
    return p


def kill_all():
    """SIGKILLs the process group of every process spawn() started (QEMU and the dstx it runs)."""
    with _procs_lock:
        procs = list(_procs)
        _procs.clear()
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def install_cleanup(watchdog_seconds=None):
    """Kills every spawned process at exit and on SIGINT/SIGTERM/SIGHUP; with watchdog_seconds, also after that
    long (SIGALRM), whatever the script is doing."""
    import atexit

    atexit.register(kill_all)

    def on_signal(signum, _frame):
        if signum == signal.SIGALRM:
            print(f"FAIL: watchdog: still running after {watchdog_seconds} s", flush=True)
        kill_all()
        os._exit(1 if signum == signal.SIGALRM else 128 + signum)

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM):
        signal.signal(s, on_signal)
    if watchdog_seconds:
        signal.alarm(watchdog_seconds)


def build_guest(workdir):
    """Assembles tests/qemu/guest.S into a 512-byte boot sector; returns the raw disk image's path."""
    for tool in ("as", "ld"):
        if not shutil.which(tool):
            raise Failure(f"'{tool}' (binutils) is needed to assemble the guest")
    obj = os.path.join(workdir, "guest.o")
    img = os.path.join(workdir, "guest.img")
    subprocess.run(["as", "--32", "-o", obj, GUEST_SOURCE], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext", "0x7c00", "--oformat", "binary", "-o", img, obj], check=True)
    size = os.path.getsize(img)
    check(size == 512, f"guest image is {size} bytes, expected 512")
    return img


class Qmp:
    """A minimal QMP client on a unix socket."""

    def __init__(self, path, timeout=30):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.file = self.sock.makefile("rwb")
        greeting = self._read()
        check("QMP" in greeting, f"{path}: not a QMP greeting: {greeting}")
        self.execute("qmp_capabilities")

    def _read(self):
        line = self.file.readline()
        if not line:
            raise Failure(f"{self.path}: QMP connection closed (QEMU exited?)")
        return json.loads(line)

    def execute(self, cmd, **args):
        msg = {"execute": cmd}
        if args:
            msg["arguments"] = args
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            r = self._read()
            if "event" in r:
                continue
            if "error" in r:
                raise Failure(f"QMP {cmd}: {r['error'].get('desc', r['error'])}")
            return r.get("return")

    def close(self):
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass


class Vm:
    """One QEMU process running the boot-sector guest, with QMP and the serial port on files in workdir."""

    def __init__(self, qemu, workdir, name, disk, mem_mib=64, incoming=None, netns=None):
        self.name = name
        self.serial = os.path.join(workdir, f"{name}.serial")
        self.stderr_path = os.path.join(workdir, f"{name}.stderr")
        self.qmp_path = os.path.join(workdir, f"{name}.qmp")
        argv = [
            qemu, "-nodefaults", "-no-user-config",
            "-machine", "pc,accel=tcg", "-smp", "1", "-m", str(mem_mib),
            "-display", "none",
            "-serial", f"file:{self.serial}",
            # snapshot=on: each side reads the same image through its own throw-away overlay (IDE has no read-only
            # disks, and the guest never writes).
            "-drive", f"file={disk},format=raw,if=ide,snapshot=on",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]
        if incoming:
            argv += ["-incoming", incoming]
        if netns:
            argv = ["ip", "netns", "exec", netns] + argv
        self.argv = argv
        self._err = open(self.stderr_path, "wb")
        self.proc = spawn(argv, stdin=subprocess.DEVNULL, stdout=self._err, stderr=self._err)
        self.qmp = None

    def connect(self, timeout=20):
        def try_connect():
            if self.proc.poll() is not None:
                raise Failure(f"{self.name}: QEMU exited with {self.proc.returncode}: {self.stderr_text()}")
            if not os.path.exists(self.qmp_path):
                return None
            try:
                return Qmp(self.qmp_path)
            except (ConnectionRefusedError, FileNotFoundError):
                return None

        self.qmp = wait_for(try_connect, timeout, f"{self.name}'s QMP socket")
        return self.qmp

    def stderr_text(self):
        try:
            with open(self.stderr_path, "rb") as f:
                return f.read().decode(errors="replace").strip()
        except FileNotFoundError:
            return ""

    def counters(self):
        return read_counters(self.serial)

    def status(self):
        return self.qmp.execute("query-status")["status"]

    def migrate_info(self):
        return self.qmp.execute("query-migrate")

    def kill(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)
        if self.qmp:
            self.qmp.close()


_COUNTER = re.compile(rb"^n=(\d+)$", re.M)


def read_counters(path):
    """The counter values of the complete lines in a serial log."""
    try:
        with open(path, "rb") as f:
            return read_counters_bytes(f.read())
    except FileNotFoundError:
        return []


def read_counters_bytes(data):
    # Only complete lines count: a line cut by the migration is finished by the other side.
    data = data[: data.rfind(b"\n") + 1]
    return [int(m.group(1)) for m in _COUNTER.finditer(data)]


def serial_text(path):
    with open(path, "rb") as f:
        return f.read()


def dstx_recv_port(vm, timeout=20):
    """The port dstx recv (run by the destination QEMU's -incoming exec:) printed on QEMU's stderr."""
    pat = re.compile(r"dstx recv: listening on [^\s]+:(\d+)")

    def find():
        if vm.proc.poll() is not None:
            raise Failure(f"{vm.name}: QEMU exited with {vm.proc.returncode}: {vm.stderr_text()}")
        m = pat.search(vm.stderr_text())
        return int(m.group(1)) if m else None

    return wait_for(find, timeout, "dstx recv's 'listening on' line")


def wait_migration_end(vm, timeout):
    """Polls query-migrate on the source until the migration has left the active states; returns the info."""
    def done():
        info = vm.migrate_info()
        return info if info.get("status") in ("completed", "failed", "cancelled") else None

    return wait_for(done, timeout, f"{vm.name}: query-migrate to complete or fail", interval=0.05)


def read_int_file(path):
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (FileNotFoundError, ValueError):
        return None


def read_json_file(path):
    try:
        with open(path) as f:
            return json.loads(f.read())
    except (FileNotFoundError, ValueError):
        return None


def q(s):
    return shlex.quote(s)


class FlipProxy:
    """A TCP proxy from 127.0.0.1:<ephemeral> to a dstx receiver that flips one bit on the way: in the middle of
    the payload of the DATA frame whose chunk covers logical offset chunk_offset (docs/wire-format.md: 48-byte
    headers, type at byte 4, offset at 16, raw_len at 24, payload_len at 28), on whichever stream carries it;
    a stream source may cut chunks short where its input paused, so chunks need not start at multiples of the
    chunk size. Everything
    else, and the receiver-to-sender direction, passes unchanged. Choosing the chunk rather than a byte count
    keeps the outcome independent of how chunks are spread over the streams and how well they compress."""

    HEADER = 48
    DATA = 3

    def __init__(self, target_host, target_port, chunk_offset):
        self.target = (target_host, target_port)
        self.chunk_offset = chunk_offset
        self.flipped = False
        self.lock = threading.Lock()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closing:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            self.connections += 1
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src, dst, forward):
        # Frame scanner state for the sender-to-receiver direction.
        header = bytearray()
        payload_left = 0
        payload_seen = 0
        flip_index = None  # index in the current payload of the bit to flip
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if forward:
                    buf = bytearray(data)
                    i = 0
                    while i < len(buf):
                        if payload_left == 0:
                            take = min(self.HEADER - len(header), len(buf) - i)
                            header += buf[i:i + take]
                            i += take
                            if len(header) == self.HEADER:
                                ftype = header[4]
                                offset = int.from_bytes(header[16:24], "little")
                                raw_len = int.from_bytes(header[24:28], "little")
                                payload_left = int.from_bytes(header[28:32], "little")
                                payload_seen = 0
                                header = bytearray()
                                covers = offset <= self.chunk_offset < offset + raw_len
                                if ftype == self.DATA and payload_left > 0 and covers:
                                    with self.lock:
                                        if not self.flipped:
                                            self.flipped = True
                                            flip_index = payload_left // 2
                        else:
                            take = min(payload_left, len(buf) - i)
                            if flip_index is not None and payload_seen <= flip_index < payload_seen + take:
                                buf[i + flip_index - payload_seen] ^= 0x01
                                flip_index = None
                            payload_seen += take
                            payload_left -= take
                            i += take
                    data = bytes(buf)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
                try:
                    s.shutdown(how)
                except OSError:
                    pass

    def close(self):
        self.closing = True
        try:
            self.listener.close()
        except OSError:
            pass
