#!/usr/bin/env python3
"""End-to-end benchmark: dstx against the link ceiling and the baselines a user could pick instead.

Builds two network namespaces joined by a veth pair (10.77.0.1 in the source namespace, 10.77.0.2 in the
destination namespace; no other address is ever used), optionally rate-limits the link with tc tbf on both
ends' egress, and runs in one go, for each link x data profile:

  iperf3-1 / iperf3-N   the link ceiling on the same path (one stream / N streams; not a baseline)
  plain                 QEMU-style baseline: bench/plain_loop (one stream, 1 MiB read -> send, raw)
  lz4|socat             lz4 -1 -c FILE | socat  ->  socat | lz4 -d > /dev/null
  zstd|socat            zstd -1 -T0 -c FILE | socat  ->  socat | zstd -d > /dev/null
  dstx-none/-lz4/-zstd/-auto   dstx send --codec MODE  ->  dstx recv --sink null: (verifies, discards)

Before a link's runs, `dstx tune --quick` measures it (as an operator would once per link), and dstx reads
what tune measured for the opening of --codec auto from a profile (DSTX_TUNE_PROFILE; chunk size, streams and
zero-copy at their defaults; --no-tune: no profile at all, never the user's own).

Every tool is measured the same way: wall time from the launch of the first sender-side process to the exit
of the last receiver-side process (receivers are started and listening first); each process runs under
/usr/bin/time: CPU seconds from wait4 on it (children included), peak RSS from its %M; bytes on the link from the veth's
tx counters (Ethernet/IP/TCP headers included); payload bytes from dstx's --json wire_bytes, for the
pipelines from the compressor's write count (/proc/PID/io wchar), for the plain loop = the state size.
Each cell is repeated --repeats times, --fast-repeats times (7, at least --repeats) on links of 25 Gbit/s and
more and for a tool whose first run of a profile took under SHORT_RUN_SECONDS (dstx on all-zero state on any
link: a 60 ms run moves by 5 % from one run to the next); the median is reported. Within a repetition the tools
are interleaved (the extra repetitions of short runs: those tools only) and their order rotates from one
repetition to the next, so background noise hits all of them alike.

Sources read state files from tmpfs (/dev/shm), written by make_state (binary = make_state binary-real: real
executables and libraries from /usr). Output: OUT/e2e.json (every raw run), OUT/e2e.md (tables), OUT/e2e.png.

Needs root (namespaces, tc). Installs bench-only tools it lacks (iperf3, socat, gnuplot-nox, lz4, zstd,
time) with apt-get and says so. Everything it starts and both namespaces are removed on exit, Ctrl-C included.

  bench/e2e.py [--build build] [--size 512M] [--repeats 3] [--fast-repeats 7] [--links 1,10,25,unlimited]
               [--profiles ...]
  bench/e2e.py --quick                 small sizes, one repetition, short iperf3
  bench/e2e.py --quick --self-test     < 60 s functional check of the harness itself (exit code 0 = pass)
  bench/e2e.py --render OUT/e2e.json   recompute the tables and plot from an earlier run (no root needed)

The ideal model (also written into e2e.md): see IDEAL_MODEL below.
"""

import argparse
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SRC_IP = "10.77.0.1"
DST_IP = "10.77.0.2"
PROFILES = ["zero", "zero-heavy", "binary", "random", "mixed"]
LINKS = ["1", "10", "25", "unlimited"]  # Gbit/s
TOOLS = ["plain", "lz4|socat", "zstd|socat", "dstx-none", "dstx-lz4", "dstx-zstd", "dstx-auto"]
COLOURS = {"plain": "#888888", "lz4|socat": "#b5a642", "zstd|socat": "#8b5a2b", "dstx-none": "#9ecae1",
           "dstx-lz4": "#4292c6", "dstx-zstd": "#08519c", "dstx-auto": "#e31a1c"}
BASELINES = ["plain", "lz4|socat", "zstd|socat"]
DSTX_FIXED = ["dstx-none", "dstx-lz4", "dstx-zstd"]
# bench-only tools: command -> Debian package
NEEDED = {"iperf3": "iperf3", "socat": "socat", "gnuplot": "gnuplot-nox", "lz4": "lz4", "zstd": "zstd",
          "/usr/bin/time": "time", "nsenter": "util-linux", "tc": "iproute2", "ip": "iproute2"}

IDEAL_MODEL = """\
ideal(link, profile) = the best throughput any sender/receiver pair could reach with the measured link rate,
codec speeds and compression ratios, if it hid every latency and wasted no CPU. Both ends run on this machine,
so they share its C cores. Per logical byte, with z = fraction of all-zero 4 KiB pages (cost nothing on the
wire), and a fraction f of the non-zero bytes compressed with codec c (lz4 or zstd level 1), the rest raw:
  wire(f) = (1 - z) * (f * w_c + (1 - f))                       bytes on the link per logical byte
  cpu(f)  = 1/M + (1 - z) * f * (1/E_c + 1/D_c) + wire(f) * k    core-seconds per logical byte, both sides
  T(f)    = min(L / wire(f), C / cpu(f), M_C)
  ideal   = max over c in {lz4, zstd} and f in [0, 1] of T(f)      (f = 0 is plain raw with zero skipping)
L = link ceiling: best of iperf3 with 1 and N streams on that link. k = CPU cost of moving one byte through
TCP on this path (both sides' CPU seconds per byte of iperf3 on the unlimited link). M = single-core memory
read speed (dd from tmpfs): every byte is read once. M_C = the read speed of C such readers at once on
disjoint parts (C dd's; the cores share the memory bus, so M_C < C * M on this machine). E_c, D_c, w_c =
single-core encode and decode speed and compressed/original size of the CLI's own benchmark (lz4 -b1,
zstd -b1) on the profile's non-zero pages.
Per run the ideal time is S / ideal + the harness' launch overhead (nsenter + /usr/bin/time, a few ms).
It leaves out hashing, framing, syscalls and connection set-up, so it is an upper bound: dstx / ideal <= 1
up to noise."""


def log(*a):
    print("e2e:", *a, file=sys.stderr, flush=True)


def parse_size(s):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)(i?B?)?", s.strip(), re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {s!r}")
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * mult)


SHORT_RUN_SECONDS = 0.5


def repeats_for(a, link, first_run=None):
    """Runs per cell: more on fast links and where the first run (first_run: its record) took a fraction of a
    second."""
    fast = getattr(a, "fast_repeats", None) or a.repeats
    short = (first_run is not None and first_run.get("status") == "ok"
             and first_run["seconds"] < SHORT_RUN_SECONDS)
    return fast if link == "unlimited" or int(link) >= 25 or short else a.repeats


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def run(cmd, timeout=30, check=True, **kw):
    """A short setup command, bounded."""
    cmd = [str(c) for c in cmd]
    r = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))}: exit {r.returncode}: {r.stderr.strip()[-500:]}")
    return r


# --------------------------------------------------------------------------------------------------------
# Process tracking: everything started is in its own session (process group) so it can be killed whole.

class Proc:
    """One process, launched in a namespace under /usr/bin/time; a thread notes the moment it exits."""

    def __init__(self, h, ns, argv, name, stdin=None, stdout=None, capture=False):
        self.name = name
        self.timefile = h.tmp(f"{name}.time")
        self.errfile = h.tmp(f"{name}.err")
        self.outfile = h.tmp(f"{name}.out") if capture else None
        out = open(self.outfile, "wb") if capture else (stdout if stdout is not None else subprocess.DEVNULL)
        err = open(self.errfile, "wb")
        cmd = ["nsenter", f"--net=/run/netns/{ns}", "/usr/bin/time", "-f", "%e %U %S %M", "-o", self.timefile,
               *map(str, argv)]
        self.t_start = time.monotonic()
        self.p = subprocess.Popen(cmd, stdin=stdin if stdin is not None else subprocess.DEVNULL, stdout=out,
                                  stderr=err, start_new_session=True)
        if capture:
            out.close()
        err.close()
        h.procs.add(self)
        self.h = h
        self.t_exit = None
        self.status = None
        self.io = {}
        self.rusage = None
        self.done = threading.Event()
        threading.Thread(target=self._wait, daemon=True).start()

    def _wait(self):
        pid = self.p.pid
        try:
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped: /proc/PID/io readable
            self.t_exit = time.monotonic()
            try:
                with open(f"/proc/{pid}/io") as f:
                    self.io = {k: int(v) for k, v in (line.split(":") for line in f if ":" in line)}
            except OSError:
                pass
            _, st, self.rusage = os.wait4(pid, 0)
            self.status = os.waitstatus_to_exitcode(st)
            self.p.returncode = self.status
        except ChildProcessError:
            self.t_exit = self.t_exit or time.monotonic()
            self.status = self.p.returncode if self.p.returncode is not None else -1
        finally:
            self.h.procs.discard(self)
            self.done.set()

    def kill(self):
        if not self.done.is_set():
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def stats(self):
        """(user+sys CPU seconds, peak RSS KiB) of the program, children included, or (None, None). CPU from
        wait4 on /usr/bin/time (microseconds; its own share is ~1 ms), RSS from time's %M: time's own peak is
        not the program's (its image was this Python's until exec)."""
        try:
            lines = Path(self.timefile).read_text().strip().splitlines()
            _, u, s, m = lines[-1].split()
            cpu = self.rusage.ru_utime + self.rusage.ru_stime if self.rusage else float(u) + float(s)
            return cpu, int(m)
        except (OSError, ValueError, IndexError):
            return None, None

    def stderr_tail(self):
        try:
            return Path(self.errfile).read_text(errors="replace").strip()[-400:]
        except OSError:
            return ""

    def written(self):
        """Bytes the program wrote (wchar), less what time itself wrote to its -o file."""
        try:
            own = len(Path(self.timefile).read_bytes())
        except OSError:
            own = 0
        return self.io.get("wchar", 0) - own if self.io else None


class Harness:
    def __init__(self, args):
        self.args = args
        self.procs = set()
        self.tag = str(os.getpid())
        self.ns_src = f"dstx-e2e-{self.tag}-src"
        self.ns_dst = f"dstx-e2e-{self.tag}-dst"
        self.dev_src = f"dxe{self.tag}s"
        self.dev_dst = f"dxe{self.tag}d"
        self.holders = {}
        self.work = None
        self.port = 30000 + os.getpid() % 1000 * 20
        self.ntmp = 0
        self.ns_up = False

    # ---- temp files, ports
    def tmp(self, name):
        self.ntmp += 1
        return os.path.join(self.work, f"{self.ntmp:05d}-{re.sub(r'[^A-Za-z0-9.-]', '_', name)}")

    def next_port(self):
        self.port += 1
        if self.port > 60000:
            self.port = 30000
        return self.port

    # ---- namespaces
    @staticmethod
    def remove_stale():
        """Namespaces of an earlier harness that was killed outright (SIGKILL leaves no chance to clean up)."""
        listed = run(["ip", "netns", "list"], check=False).stdout.split()
        for ns in listed:
            m = re.fullmatch(r"dstx-e2e-(\d+)-(src|dst)", ns)
            if not m or os.path.exists(f"/proc/{m.group(1)}"):
                continue
            log(f"removing stale namespace {ns} (its harness, pid {m.group(1)}, is gone)")
            for pid in run(["ip", "netns", "pids", ns], check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            run(["ip", "netns", "del", ns], check=False)

    def setup_net(self):
        self.remove_stale()
        self.work = tempfile.mkdtemp(prefix="dstx-e2e.", dir="/dev/shm")
        run(["ip", "netns", "add", self.ns_src])
        self.ns_up = True
        run(["ip", "netns", "add", self.ns_dst])
        run(["ip", "link", "add", self.dev_src, "netns", self.ns_src, "type", "veth", "peer", "name", self.dev_dst,
             "netns", self.ns_dst])
        for ns, dev, ip in ((self.ns_src, self.dev_src, SRC_IP), (self.ns_dst, self.dev_dst, DST_IP)):
            run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev])
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
            run(["ip", "-n", ns, "link", "set", dev, "up"])
            # a long-lived process in each namespace: its /proc/PID/net/{dev,tcp} are that namespace's
            p = subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", "sleep", "86400"], start_new_session=True,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            self.holders[ns] = p
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if all(self._dev_line(ns, dev) for ns, dev in ((self.ns_src, self.dev_src),
                                                           (self.ns_dst, self.dev_dst))):
                break
            time.sleep(0.01)
        log(f"namespaces {self.ns_src} ({SRC_IP}) <-> {self.ns_dst} ({DST_IP}) via veth {self.dev_src}/{self.dev_dst}")

    def _dev_line(self, ns, dev):
        try:
            with open(f"/proc/{self.holders[ns].pid}/net/dev") as f:
                for line in f:
                    name, _, rest = line.partition(":")
                    if name.strip() == dev:
                        return rest.split()
        except (OSError, KeyError):
            return None
        return None

    def tx_bytes(self):
        """(source veth tx bytes, destination veth tx bytes)."""
        return tuple(int(self._dev_line(ns, dev)[8]) for ns, dev in ((self.ns_src, self.dev_src),
                                                                    (self.ns_dst, self.dev_dst)))

    def listening(self, port):
        want = f":{port:04X}"
        pid = self.holders[self.ns_dst].pid
        for table in ("tcp", "tcp6"):
            try:
                with open(f"/proc/{pid}/net/{table}") as f:
                    next(f)
                    for line in f:
                        fields = line.split()
                        if fields[1].endswith(want) and fields[3] == "0A":
                            return True
            except OSError:
                pass
        return False


    def await_listening(self, port, servers, what):
        """Waits (at most 10 s) until something in the destination namespace listens on `port`; fails naming
        `what` and the servers' last words if one of them exits first."""
        deadline = time.monotonic() + 10
        while not self.listening(port):
            if time.monotonic() > deadline or any(s.done.is_set() for s in servers):
                raise RuntimeError(f"{what}: not listening on {port}: "
                                   f"{' | '.join(s.stderr_tail() for s in servers)}")
            time.sleep(0.002)
    def set_link(self, link):
        """tbf on both veth ends' egress; burst = 2 ms at the rate (>= 256 KiB, so GSO packets pass whole and
        timer jitter on a busy machine does not cost throughput), queue = 5 ms at the rate."""
        for ns, dev in ((self.ns_src, self.dev_src), (self.ns_dst, self.dev_dst)):
            run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"], check=False)
            if link == "unlimited":
                continue
            rate = int(link) * 10**9
            burst = max(256 * 1024, rate // 8 * 2 // 1000)
            run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{link}gbit",
                 "burst", str(burst), "latency", "5ms"])
        q = run(["ip", "netns", "exec", self.ns_src, "tc", "qdisc", "show", "dev", self.dev_src]).stdout.strip()
        return q

    # ---- cleanup
    def cleanup(self):
        for pr in list(self.procs):
            pr.kill()
        for pr in list(self.procs):
            pr.done.wait(5)
        for p in self.holders.values():
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.holders = {}
        if self.ns_up:
            for ns in (self.ns_src, self.ns_dst):
                # any process left in a namespace would keep it (and the veth) alive: kill by namespace
                r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=10)
                for pid in r.stdout.split():
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except (ProcessLookupError, ValueError):
                        pass
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
            self.ns_up = False
        if self.work:
            shutil.rmtree(self.work, ignore_errors=True)
            self.work = None

    # ---- one transfer
    def transfer(self, tool, path, size, link):
        """Runs one tool once; returns the raw record."""
        a = self.args
        b = a.build
        port = self.next_port()
        recv, send = [], []
        dst, src = self.ns_dst, self.ns_src
        rate = (int(link) * 1e9 / 8) if link != "unlimited" else 1e9
        timeout = 30 + 20 * size / rate
        rec = {"tool": tool, "bytes": size, "port": port}
        if tool == "plain":
            recv.append(Proc(self, dst, [b / "bench/plain_loop", "recv", port, "-"], "plain-recv", capture=True))
            send_argv = [[b / "bench/plain_loop", "send", path, DST_IP, port]]
        elif tool in ("lz4|socat", "zstd|socat"):
            codec = tool.split("|")[0]
            r1 = Proc(self, dst, ["socat", "-u", "-b", a.socat_buffer, f"TCP-LISTEN:{port},bind={DST_IP},reuseaddr",
                                  "STDOUT"], f"{codec}-socat-recv", stdout=subprocess.PIPE)
            r2 = Proc(self, dst, [codec, "-d", "-c", "-q"], f"{codec}-dec", stdin=r1.p.stdout)
            r1.p.stdout.close()
            recv += [r1, r2]
            send_argv = None
        elif tool.startswith("dstx-"):
            codec = tool[5:]
            recv.append(Proc(self, dst, [b / "dstx", "recv", "--listen", f"{DST_IP}:{port}", "--sink", "null:",
                                         "--json", "--quiet"], "dstx-recv", capture=True))
            send_argv = [[b / "dstx", "send", "--source", f"file:{path}", "--to", f"{DST_IP}:{port}", "--codec",
                          codec, "--json", "--quiet", *a.dstx_arg]]
        else:
            raise ValueError(tool)
        try:
            self.await_listening(port, recv, f"{tool}: receiver")
            tx0 = self.tx_bytes()
            t0 = time.monotonic()
            if send_argv is not None:
                send.append(Proc(self, src, send_argv[0], f"{tool}-send", capture=True))
            else:
                codec = tool.split("|")[0]
                args = ["lz4", "-1", "-c", "-q", path] if codec == "lz4" else ["zstd", "-1", "-T0", "-c", "-q", path]
                s1 = Proc(self, src, args, f"{codec}-enc", stdout=subprocess.PIPE)
                s2 = Proc(self, src, ["socat", "-u", "-b", a.socat_buffer, "STDIN", f"TCP:{DST_IP}:{port}"],
                          f"{codec}-socat-send", stdin=s1.p.stdout)
                s1.p.stdout.close()
                send += [s1, s2]
            # wait for all; a process that fails ends the run at once (its peer would only wait for its time-out)
            deadline = t0 + timeout
            while not all(p.done.is_set() for p in send + recv):
                failed = [p for p in send + recv if p.done.is_set() and p.status != 0]
                if failed or time.monotonic() > deadline:
                    time.sleep(0.5)  # let the peer notice and report, then stop it
                    rec["status"] = "failed" if failed else "timeout"
                    rec["error"] = "; ".join(f"{p.name}: exit {p.status}: {p.stderr_tail()}" for p in failed) \
                        if failed else f"no exit within {timeout:.0f} s"
                    return rec
                (send + recv)[0].done.wait(0.01) if send else time.sleep(0.01)
            t1 = max(p.t_exit for p in recv)
            tx1 = self.tx_bytes()
        finally:
            for p in send + recv:
                p.kill()
            for p in send + recv:
                p.done.wait(5)
        rec["seconds"] = t1 - t0
        rec["gbps"] = size / rec["seconds"] / 1e9
        rec["link_bytes"] = tx1[0] - tx0[0]
        rec["link_bytes_back"] = tx1[1] - tx0[1]
        for side, procs in (("send", send), ("recv", recv)):
            cpu = rss = 0
            for p in procs:
                c, m = p.stats()
                if c is None:
                    cpu = rss = None
                    break
                cpu += c
                rss += m
            rec[f"{side}_cpu_s"] = cpu
            rec[f"{side}_cpu_s_per_gb"] = cpu / (size / 1e9) if cpu is not None else None
            rec[f"{side}_rss_mib"] = rss / 1024 if rss is not None else None
            rec[f"{side}_procs"] = [p.name for p in procs]
        bad = [p for p in send + recv if p.status != 0]
        if bad:
            rec["status"] = "failed"
            rec["error"] = "; ".join(f"{p.name}: exit {p.status}: {p.stderr_tail()}" for p in bad)
            return rec
        rec["status"] = "ok"
        if tool == "plain":
            r = json.loads(Path(recv[0].outfile).read_text())
            rec["wire_bytes"] = size
            if r["bytes"] != size:
                rec["status"], rec["error"] = "failed", f"receiver got {r['bytes']} bytes"
        elif tool.startswith("dstx-"):
            s = json.loads(Path(send[0].outfile).read_text())
            r = json.loads(Path(recv[0].outfile).read_text())
            rec["dstx_send"], rec["dstx_recv"] = s, r
            rec["wire_bytes"] = s.get("wire_bytes")
            if s.get("status") != "committed" or r.get("status") != "committed" or r.get("bytes") != size:
                rec["status"], rec["error"] = "failed", f"dstx: send {s.get('status')} recv {r.get('status')} " \
                                                        f"{r.get('bytes')} bytes"
        else:
            rec["wire_bytes"] = send[0].written()  # the compressor's output = the TCP payload
            got = recv[1].written()  # the decompressor's output
            if got is None or abs(got - size) > 0:
                rec["status"], rec["error"] = "failed", f"decompressor wrote {got} bytes, expected {size}"
        rec["wire_ratio"] = rec["wire_bytes"] / size if rec.get("wire_bytes") is not None else None
        return rec

    def iperf(self, streams, secs):
        port = self.next_port()
        srv = Proc(self, self.ns_dst, ["iperf3", "-s", "-1", "-B", DST_IP, "-p", port], "iperf3-server")
        try:
            self.await_listening(port, [srv], "iperf3 server")
            cli = Proc(self, self.ns_src, ["iperf3", "-c", DST_IP, "-p", port, "-t", secs, "-P", streams, "-J"],
                       "iperf3-client", capture=True)
            ok = cli.done.wait(secs + 30) and srv.done.wait(10)
            if not ok or cli.status != 0:
                raise RuntimeError(f"iperf3 failed: {cli.stderr_tail()} {srv.stderr_tail()}")
        finally:
            for p in (srv,):
                p.kill()
        j = json.loads(Path(cli.outfile).read_text())
        end = j["end"]
        moved = end["sum_received"]["bytes"]
        cpu = sum(p.stats()[0] or 0 for p in (cli, srv))
        return {"streams": streams, "seconds": secs, "Bps": end["sum_received"]["bits_per_second"] / 8,
                "bytes": moved, "cpu_s": cpu, "cpu_s_per_byte": cpu / moved if moved else None}


# --------------------------------------------------------------------------------------------------------
# Calibration for the ideal model

def ensure_tools(check_only=False):
    missing = sorted({pkg for cmd, pkg in NEEDED.items() if not shutil.which(cmd)})
    if not missing:
        return
    if check_only:
        raise SystemExit(f"e2e: missing packages: {' '.join(missing)}")
    log(f"installing bench-only tools with apt-get: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], env=env, timeout=600, check=False)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env, timeout=900,
                   check=True)


def zero_fraction_and_sample(path, sample_path, sample_max):
    """Fraction of all-zero 4 KiB pages; writes the non-zero pages of every stride-th 1 MiB block to
    sample_path (stride chosen so the sample spans the whole file and stays near sample_max bytes)."""
    zero = bytes(4096)
    zeros = pages = 0
    kept = 0
    stride = max(1, math.ceil(os.path.getsize(path) / sample_max))
    with open(path, "rb") as f, open(sample_path, "wb") as out:
        n = 0
        while True:
            block = f.read(1 << 20)
            if not block:
                break
            take = n % stride == 0
            n += 1
            mv = memoryview(block)
            for i in range(0, len(block), 4096):
                page = mv[i:i + 4096]
                pages += 1
                if page == zero[:len(page)]:
                    zeros += 1
                elif take:
                    out.write(page)
                    kept += len(page)
    return (zeros / pages if pages else 1.0), kept


def codec_bench(cli, sample):
    """Single-core (encode B/s, decode B/s, compressed/original) from the CLI's own benchmark mode."""
    r = run([cli, "-b1", "-i1", sample], timeout=120)
    text = (r.stdout + r.stderr).replace("\r", "\n")
    m = re.findall(r"(\d+) ->\s*(\d+) \(x?[\d.]+\),\s*([\d.]+) MB/s\s*,\s*([\d.]+) MB/s", text)
    if not m:
        raise RuntimeError(f"cannot parse {cli} -b output: {text[-300:]}")
    orig, comp, enc, dec = m[-1]
    return {"enc_Bps": float(enc) * 1e6, "dec_Bps": float(dec) * 1e6, "ratio": int(comp) / int(orig)}


def mem_read_speed(path):
    r = run(["dd", f"if={path}", "of=/dev/null", "bs=1M"], timeout=120)
    m = re.search(r"(\d+) bytes .* copied, ([\d.e-]+) s", r.stderr)
    return int(m.group(1)) / float(m.group(2))


def mem_read_speed_parallel(path, readers):
    """M_C: `readers` dd's at once, each over its own part of the file; total bytes over the slowest one's own
    copy time (their start-up is left out, as it is for M)."""
    size = os.path.getsize(path)
    part = size // readers // (1 << 20)
    if part == 0:
        return None
    procs = [subprocess.Popen(["dd", f"if={path}", "of=/dev/null", "bs=1M", f"skip={i * part}", f"count={part}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(readers)]
    times = []
    for p in procs:
        _, err = p.communicate(timeout=120)
        m = re.search(r"(\d+) bytes .* copied, ([\d.e-]+) s", err)
        times.append(float(m.group(2)))
    return readers * part * (1 << 20) / max(times)


def ideal(L, C, k, M, z, codecs, MC=math.inf):
    """The model in IDEAL_MODEL. Returns (B/s, choice)."""
    best, choice = 0.0, "raw"
    options = [("raw", None)] + [(name, c) for name, c in codecs.items()]
    for name, c in options:
        steps = 200 if c else 0
        for i in range(steps + 1):
            f = i / steps if steps else 0.0
            w = c["ratio"] if c else 1.0
            wire = (1 - z) * (f * w + (1 - f))
            cpu = 1 / M + (1 - z) * f * ((1 / c["enc_Bps"] + 1 / c["dec_Bps"]) if c else 0) + wire * k
            t = min(L / wire if wire > 0 else math.inf, C / cpu, MC)
            if t > best:
                best, choice = t, f"{name} f={f:.2f}" if c else "raw"
    return best, choice


# --------------------------------------------------------------------------------------------------------
# Reports

def fmt(x, nd=2):
    return "–" if x is None else f"{x:.{nd}f}"


def summarize(results):
    """cells[link][profile][tool] = medians; plus derived ratios."""
    cells = {}
    for rec in results["runs"]:
        d = cells.setdefault(rec["link"], {}).setdefault(rec["profile"], {}).setdefault(rec["tool"], [])
        d.append(rec)
    out = {}
    for link, profs in cells.items():
        for prof, tools in profs.items():
            row = {}
            for tool, recs in tools.items():
                good = [r for r in recs if r["status"] == "ok"]
                m = {"n": len(good), "failed": len(recs) - len(good)}
                for key in ("gbps", "seconds", "wire_ratio", "link_bytes", "send_cpu_s_per_gb", "recv_cpu_s_per_gb",
                            "send_rss_mib", "recv_rss_mib"):
                    m[key] = median([r.get(key) for r in good])
                if tool.startswith("dstx") and good:
                    for key in ("zero_chunks", "raw_chunks", "compressed_chunks", "chunks"):
                        m[key] = median([r["dstx_send"].get(key) for r in good])
                    m["dstx_seconds"] = median([r["dstx_send"].get("seconds") for r in good])
                    m["dstx_streams"] = good[0]["dstx_send"].get("streams")
                if not good and recs:
                    m["error"] = recs[-1].get("error")
                row[tool] = m
            out.setdefault(link, {})[prof] = row
    return out


def derive(results, summary):
    """Per cell: best baseline, ideal, ratios, targets."""
    cal = results["calibration"]
    derived = {}
    for link, profs in summary.items():
        ceil = results["links"][link]["ceiling_Bps"]
        for prof, row in profs.items():
            g = {t: row[t]["gbps"] for t in row}
            bases = {t: g.get(t) for t in BASELINES if g.get(t)}
            best_base_tool = max(bases, key=bases.get) if bases else None
            fixed = {t: g.get(t) for t in DSTX_FIXED if g.get(t)}
            best_fixed_tool = max(fixed, key=fixed.get) if fixed else None
            pc = cal["profiles"][prof]
            idl, choice = ideal(ceil, cal["cores"], cal["k_s_per_byte"], cal["mem_Bps"], pc["zero_fraction"],
                                pc["codecs"], cal.get("mem_parallel_Bps") or math.inf)
            size = results["args"]["size"]
            idl = size / (size / idl + cal["launch_overhead_s"])  # the harness' own launch cost, same for all
            auto = g.get("dstx-auto")
            d = {"best_baseline": best_base_tool, "best_baseline_gbps": bases.get(best_base_tool),
                 "best_fixed": best_fixed_tool, "best_fixed_gbps": fixed.get(best_fixed_tool),
                 "ideal_gbps": idl / 1e9, "ideal_choice": choice, "ceiling_gbps": ceil / 1e9}
            d["auto_vs_baseline"] = auto / d["best_baseline_gbps"] if auto and d["best_baseline_gbps"] else None
            d["auto_vs_ideal"] = auto / d["ideal_gbps"] if auto else None
            d["auto_vs_fixed"] = auto / d["best_fixed_gbps"] if auto and d["best_fixed_gbps"] else None
            d["auto_vs_plain"] = auto / g["plain"] if auto and g.get("plain") else None
            derived.setdefault(link, {})[prof] = d
    return derived


def targets(summary, derived):
    """Issue 4's targets, per cell: {target, kind, link, profile, cell, value, goal, met}."""
    out = []
    for link, profs in derived.items():
        for prof, d in profs.items():
            auto = summary[link][prof].get("dstx-auto", {})

            def add(kind, name, value, goal, le=False):
                out.append({"target": name, "kind": kind, "link": link, "profile": prof,
                            "cell": f"{link_label(link)} {prof}", "value": value, "goal": goal,
                            "met": None if value is None else (value <= goal if le else value >= goal)})
            add("base", "auto >= 1.0x best baseline", d["auto_vs_baseline"], 1.0)
            if link == "10" and prof == "binary":
                add("special", "auto >= 1.3x best baseline (10G binary)", d["auto_vs_baseline"], 1.3)
            if link == "10" and prof == "mixed":
                add("special", "auto >= 2x best baseline (10G mixed)", d["auto_vs_baseline"], 2.0)
            if link == "1" and prof == "binary":
                add("special", "auto >= 1.2x best baseline (1G binary)", d["auto_vs_baseline"], 1.2)
            if prof == "random":
                add("special", "auto >= 0.95x plain (random)", d["auto_vs_plain"], 0.95)
            if prof == "zero":
                add("special", "auto >= 5 GB/s (all-zero)", auto.get("gbps"), 5.0)
            add("ideal", "auto >= 0.9x ideal", d["auto_vs_ideal"], 0.9)
            add("fixed", "auto >= 0.95x best fixed dstx codec", d["auto_vs_fixed"], 0.95)
            rss = [x for x in (auto.get("send_rss_mib"), auto.get("recv_rss_mib")) if x is not None]
            add("rss", "auto peak RSS <= 64 MiB each side", max(rss) if rss else None, 64, le=True)
    return out


def md(s):
    """A tool name inside a markdown table cell."""
    return s.replace("|", "\\|")


def link_label(link):
    return "unlimited" if link == "unlimited" else f"{link} Gbit/s"


def write_md(results, summary, derived, tgts, path, png_name):
    a = results["args"]
    tools = [t for t in TOOLS if t in a["tools"]]
    cal = results["calibration"]
    L = []
    L.append("# dstx end-to-end benchmark\n")
    L.append(f"Produced by `bench/e2e.py` on {results['started']}. Reproduce with:\n")
    bd = results["args"]["build"]
    L.append(f"```\ncmake -S . -B {bd} -DCMAKE_BUILD_TYPE=Release && cmake --build {bd} --target dstx plain_loop "
             f"make_state\nsudo {results['command']}\n```\n")
    L.append(f"- Total time of the transfers: {results.get('seconds', 0) / 60:.1f} min.")
    L.append(f"- Machine: {cal['cores']} cores ({cal['cpu_model']}), kernel {cal['kernel']}; "
             f"{'**shared with other work while measuring**' if not a['quiet_machine'] else 'otherwise idle'}; "
             f"load average at start {cal['loadavg_start']}, at end {results.get('loadavg_end', '?')}.")
    L.append(f"- State per profile: {a['size'] / 2**20:.0f} MiB from `make_state` (binary = `binary-real`: "
             f"executables and libraries from /usr), on tmpfs; median of {a['repeats']} runs per cell "
             f"({a.get('fast_repeats', a['repeats'])} on links of 25 Gbit/s and more"
             + (f", and where a tool's first run took under {a['short_run_seconds']} s: the extra runs "
                f"interleave those tools only" if 'short_run_seconds' in a else "")
             + "), tools interleaved, order rotating per repetition.")
    L.append(f"- Link: veth between two network namespaces ({SRC_IP} -> {DST_IP}), `tc tbf` on both ends' egress "
             f"(burst 2 ms at the rate, at least 256 KiB; 5 ms queue); 'unlimited' has no qdisc.")
    L.append(f"- dstx: `{cal['dstx_version']}` built from `{cal.get('git', '?')}` (Release), `send --source file:… --codec MODE --json"
             f"{' ' + ' '.join(a['dstx_arg']) if a['dstx_arg'] else ''}` -> `recv --sink null: --json` "
             f"(defaults otherwise). Baselines: `plain` = bench/plain_loop (QEMU-style: one stream, 1 MiB read "
             f"-> send, raw); `lz4|socat` = `lz4 -1 -c F | socat -b {a['socat_buffer']} -u STDIN TCP:…` -> "
             f"`socat … STDOUT | lz4 -d -c > /dev/null` (lz4 {cal['lz4_version']}, single-threaded); "
             f"`zstd|socat` the same with `zstd -1 -T0` (zstd {cal['zstd_version']}).")
    L.append("- GB/s = state bytes (10^9) / wall seconds from the launch of the sender to the exit of the "
             "receiver, the same for every tool (process launch included: "
             f"~{cal['launch_overhead_s'] * 1e3:.0f} ms per run for `nsenter` + `/usr/bin/time`).")
    L.append("- Both ends share the same cores: a CPU-bound sender slows its receiver and vice versa.")
    if cal.get("note"):
        L.append(f"- Note: {cal['note']}")
    L.append("")
    L.append(f"![e2e]({png_name})\n")
    L.append("## Throughput, GB/s\n")
    L.append("Cells: median GB/s. *auto/base* = dstx-auto / best of plain, lz4|socat, zstd|socat; *auto/ideal* "
             "= dstx-auto / the model's ideal (below); *auto/fixed* = dstx-auto / best of dstx none, lz4, zstd.\n")
    for link in results["args"]["links"]:
        if link not in summary:
            continue
        li = results["links"][link]
        L.append(f"### {link_label(link)}\n")
        L.append(f"Link ceiling (iperf3): 1 stream {li['iperf3'][0]['Bps'] / 1e9:.2f} GB/s, "
                 f"{li['iperf3'][1]['streams']} streams {li['iperf3'][1]['Bps'] / 1e9:.2f} GB/s. "
                 f"qdisc: `{li['qdisc'] or 'none'}`"
                 + (f". `dstx tune --quick` here: raw {li['tune']['raw_mb_s']} MB/s, lz4 {li['tune']['lz4_mb_s']} "
                    f"MB/s a core x {li['tune']['streams']} streams: auto opens on {li['tune']['opens']}"
                    if li.get("tune") else "") + "\n")
        L.append("| profile | " + " | ".join(md(t) for t in tools) + " | auto/base | auto/ideal | ideal GB/s | auto/fixed |")
        L.append("|---|" + "---:|" * (len(tools) + 4))
        for prof in results["args"]["profiles"]:
            row = summary[link].get(prof)
            if not row:
                continue
            d = derived[link][prof]
            cells = []
            for t in tools:
                m = row.get(t)
                if not m:
                    cells.append("")
                elif m["gbps"] is None:
                    cells.append("FAIL")
                else:
                    s = fmt(m["gbps"])
                    if t == d["best_baseline"]:
                        s = f"*{s}*"
                    cells.append(s)
            L.append(f"| {prof} | " + " | ".join(cells) + f" | **{fmt(d['auto_vs_baseline'])}×** | "
                     f"{fmt(d['auto_vs_ideal'])}× | {fmt(d['ideal_gbps'])} | {fmt(d['auto_vs_fixed'])}× |")
        L.append("")
    L.append("*Italics*: the best baseline of the row.\n")
    L.append("## Detail: wire, CPU, memory\n")
    L.append("wire = payload bytes / state bytes (dstx: its `wire_bytes`; pipelines: the compressor's output; "
             "plain: 1); link = veth tx bytes source->destination / state bytes (headers included); CPU = user+sys "
             "seconds per GB of state on each side (all processes of that side); RSS = peak resident MiB per "
             "side (pipelines: sum over their processes). dstx-auto's chunk choice: zero / raw / compressed "
             "chunks.\n")
    for link in results["args"]["links"]:
        if link not in summary:
            continue
        L.append(f"### {link_label(link)}\n")
        L.append("| profile | tool | GB/s | wire | link | send CPU s/GB | recv CPU s/GB | send RSS MiB | "
                 "recv RSS MiB | chunks z/r/c |")
        L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for prof in results["args"]["profiles"]:
            row = summary[link].get(prof, {})
            for t in tools:
                m = row.get(t)
                if not m:
                    continue
                ch = ""
                if t.startswith("dstx") and m.get("chunks") is not None:
                    ch = f"{m['zero_chunks']:.0f}/{m['raw_chunks']:.0f}/{m['compressed_chunks']:.0f}"
                link_ratio = m["link_bytes"] / a["size"] if m["link_bytes"] is not None else None
                L.append(f"| {prof} | {md(t)} | {fmt(m['gbps'])} | {fmt(m['wire_ratio'], 3)} | {fmt(link_ratio, 3)} | "
                         f"{fmt(m['send_cpu_s_per_gb'])} | {fmt(m['recv_cpu_s_per_gb'])} | "
                         f"{fmt(m['send_rss_mib'], 1)} | {fmt(m['recv_rss_mib'], 1)} | {ch} |"
                         + (f" FAILED: {m.get('error')}" if m["gbps"] is None else ""))
        L.append("")
    L.append("## Targets of issue 4\n")
    L.append("dstx-auto per cell; ✓ met, ✗ missed. *Profile target*: 10 Gbit/s binary >= 1.3x and mixed >= 2x the "
             "best baseline, 1 Gbit/s binary >= 1.2x, random >= 0.95x plain, all-zero >= 5 GB/s.\n")
    L.append("| cell | vs best baseline (>= 1.0) | profile target | vs ideal (>= 0.9) | vs best fixed codec (>= 0.95) "
             "| peak RSS MiB (<= 64) |")
    L.append("|---|---|---|---|---|---|")
    by_cell = {}
    for t in tgts:
        by_cell.setdefault((t["link"], t["profile"]), {}).setdefault(t["kind"], []).append(t)

    def mark(ts):
        if not ts:
            return ""
        parts = []
        for t in ts:
            v = "–" if t["value"] is None else f"{t['value']:.2f}{'' if t['kind'] in ('rss',) else ''}"
            m = "" if t["met"] is None else (" ✓" if t["met"] else " ✗")
            goal = f" (goal {t['goal']})" if t["kind"] == "special" else ""
            unit = " GB/s" if "GB/s" in t["target"] else ("" if t["kind"] == "rss" else "×")
            parts.append(f"{v}{unit}{m}{goal}")
        return "; ".join(parts)
    for link in a["links"]:
        for prof in a["profiles"]:
            k = by_cell.get((link, prof))
            if not k:
                continue
            L.append(f"| {link_label(link)} {prof} | {mark(k.get('base'))} | {mark(k.get('special'))} | "
                     f"{mark(k.get('ideal'))} | {mark(k.get('fixed'))} | {mark(k.get('rss'))} |")
    met = sum(1 for t in tgts if t["met"])
    L.append(f"\n{met} of {len(tgts)} met. The RSS target is for an 8 GiB transfer; here the state is "
             f"{a['size'] / 2**20:.0f} MiB per run.\n")
    L.append("## Ideal model\n")
    L.append("```\n" + IDEAL_MODEL + "\n```\n")
    L.append(f"Measured: C = {cal['cores']} cores, k = {cal['k_s_per_byte'] * 1e9:.3f} core-s/GB "
             f"(iperf3 {cal['k_streams']} streams unlimited), M = {cal['mem_Bps'] / 1e9:.2f} GB/s, "
             f"M_C = {(cal.get('mem_parallel_Bps') or 0) / 1e9:.2f} GB/s ({cal['cores']} readers).\n")
    L.append("| profile | z (zero pages) | lz4 enc/dec MB/s, ratio | zstd enc/dec MB/s, ratio |")
    L.append("|---|---:|---|---|")
    for prof in results["args"]["profiles"]:
        pc = cal["profiles"].get(prof)
        if not pc:
            continue
        cs = []
        for c in ("lz4", "zstd"):
            x = pc["codecs"].get(c)
            cs.append(f"{x['enc_Bps'] / 1e6:.0f} / {x['dec_Bps'] / 1e6:.0f}, {x['ratio']:.3f}" if x else "–")
        L.append(f"| {prof} | {pc['zero_fraction']:.3f} | {cs[0]} | {cs[1]} |")
    L.append("\nIdeal per cell (GB/s, and the strategy that reaches it):\n")
    L.append("| profile | " + " | ".join(link_label(lk) for lk in results["args"]["links"] if lk in derived) + " |")
    L.append("|---|" + "---|" * len([lk for lk in results["args"]["links"] if lk in derived]))
    for prof in results["args"]["profiles"]:
        cells = [f"{derived[lk][prof]['ideal_gbps']:.2f} ({derived[lk][prof]['ideal_choice']})"
                 for lk in results["args"]["links"] if lk in derived and prof in derived[lk]]
        L.append(f"| {prof} | " + " | ".join(cells) + " |")
    fails = [r for r in results["runs"] if r["status"] != "ok"]
    if fails:
        L.append(f"\n## Failed runs ({len(fails)})\n")
        for r in fails[:30]:
            L.append(f"- {link_label(r['link'])} {r['profile']} {r['tool']} rep {r['rep']}: {r['status']}: "
                     f"{r.get('error', '')[:300]}")
    Path(path).write_text("\n".join(L) + "\n")


def write_png(results, summary, out_dir, png_path):
    if not shutil.which("gnuplot"):
        log("gnuplot missing: no plot")
        return False
    links = [lk for lk in results["args"]["links"] if lk in summary]
    profs = results["args"]["profiles"]
    data = []
    for lk in links:
        path = os.path.join(out_dir, f"e2e-{lk}.dat.tmp")
        # tools with at least one result on this link (gnuplot refuses an all-empty histogram column)
        tools = [t for t in TOOLS if any(summary[lk].get(p, {}).get(t, {}).get("gbps") for p in profs)]
        with open(path, "w") as f:
            f.write("profile " + " ".join(f'"{t}"' for t in tools) + "\n")
            for p in profs:
                row = summary[lk].get(p, {})
                vals = [row.get(t, {}).get("gbps") for t in tools]
                f.write(f'"{p}" ' + " ".join(f"{v:.4f}" if v else "NaN" for v in vals) + "\n")
        data.append((lk, path, tools))
    cols = 2 if len(links) > 1 else 1
    rows = math.ceil(len(links) / cols)
    g = [f"set terminal pngcairo size {900 * cols},{520 * rows} font 'sans,10'",
         f"set output '{png_path}'",
         f"set multiplot layout {rows},{cols} title 'dstx end-to-end, GB/s of state (log scale), "
         f"{results['args']['size'] / 2**20:.0f} MiB per run, median of {results['args']['repeats']} "
         f"(fast links and short runs {results['args'].get('fast_repeats', results['args']['repeats'])})'",
         "set style data histograms", "set style histogram clustered gap 1", "set style fill solid 0.85 border -1",
         "set boxwidth 0.9", "set logscale y", "set yrange [0.02:30]", "set grid ytics", "set ylabel 'GB/s'",
         "set key below horizontal font ',9'", "set xtics nomirror"]
    for lk, path, tools in data:
        ceil = results["links"][lk]["ceiling_Bps"] / 1e9
        g.append(f"set title '{link_label(lk)} (dashed: iperf3 ceiling {ceil:.2f} GB/s)'")
        g.append("unset arrow")
        g.append(f"set arrow from graph 0, first {ceil} to graph 1, first {ceil} nohead dt 2 lw 2 lc rgb 'black'")
        g.append("plot " + ", ".join(f"'{path}' using {i + 2}:xtic(1) title columnhead({i + 2}) "
                                     f"lc rgb '{COLOURS[t]}'" for i, t in enumerate(tools)) if tools else
                 "NaN notitle")
    g.append("unset multiplot")
    script = os.path.join(out_dir, "e2e.gp.tmp")
    Path(script).write_text("\n".join(g) + "\n")
    r = subprocess.run(["gnuplot", script], capture_output=True, text=True, timeout=60)
    for _, path, _ in data:
        os.unlink(path)
    os.unlink(script)
    if r.returncode != 0:
        log(f"gnuplot failed: {r.stderr.strip()[-500:]}")
        return False
    return True


# --------------------------------------------------------------------------------------------------------

def calibrate(h, files, a):
    cal = {"cores": os.cpu_count(), "kernel": os.uname().release, "loadavg_start": open("/proc/loadavg").read().split()[:3]}
    try:
        cal["cpu_model"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except StopIteration:
        cal["cpu_model"] = "?"
    r = run([a.build / "dstx", "--version"], check=False)
    cal["dstx_version"] = (r.stdout or r.stderr).strip().splitlines()[0] if (r.stdout or r.stderr) else "?"
    g = run(["git", "-C", REPO, "describe", "--always", "--dirty"], check=False)
    cal["git"] = g.stdout.strip() or "?"
    cal["lz4_version"] = re.search(r"v([\d.]+)", run(["lz4", "--version"]).stdout).group(1)
    cal["zstd_version"] = re.search(r"v([\d.]+)", run(["zstd", "--version"]).stdout).group(1)
    # launch overhead of one run (receiver start + sender start and exit), for the notes
    t = []
    for _ in range(5):
        t0 = time.monotonic()
        p = Proc(h, h.ns_src, ["true"], "launch")
        p.done.wait(10)
        t.append(time.monotonic() - t0)
    cal["launch_overhead_s"] = min(t)  # the fixed part; the rest is noise
    cal["mem_Bps"] = max(mem_read_speed(files[p]) for p in files)
    biggest = max(files.values(), key=os.path.getsize)
    cal["mem_parallel_Bps"] = max(mem_read_speed_parallel(biggest, cal["cores"]) or 0 for _ in range(3)) or None
    cal["profiles"] = {}
    for prof, path in files.items():
        sample = h.tmp(f"{prof}.sample")
        z, kept = zero_fraction_and_sample(path, sample, a.sample_size)
        pc = {"zero_fraction": z, "codecs": {}}
        if kept >= 4096:
            for c in ("lz4", "zstd"):
                pc["codecs"][c] = codec_bench(c, sample)
        os.unlink(sample)
        cal["profiles"][prof] = pc
        log(f"calibrated {prof}: zero pages {z:.3f}, " + ", ".join(
            f"{c} {x['enc_Bps'] / 1e6:.0f}/{x['dec_Bps'] / 1e6:.0f} MB/s x{1 / x['ratio']:.2f}"
            for c, x in pc["codecs"].items()))
    return cal


def measure_link(h, link, a):
    q = h.set_link(link)
    res = []
    for streams in (1, a.streams):
        runs = [h.iperf(streams, a.iperf_seconds) for _ in range(a.iperf_repeats)]
        best = max(runs, key=lambda x: x["Bps"])
        best = dict(best, runs=[x["Bps"] for x in runs])
        best["Bps"] = median([x["Bps"] for x in runs])
        res.append(best)
    return {"qdisc": q if "tbf" in q else "", "iperf3": res, "ceiling_Bps": max(x["Bps"] for x in res)}


def tune_link(h, link, a):
    """`dstx tune --quick` over this link, as an operator would run it once per link. The dstx runs on the link
    then read a profile (DSTX_TUNE_PROFILE) with what it measured for the opening of --codec auto (raw_mb_s,
    lz4_mb_s); chunk size, streams and zero-copy stay at their defaults, so that the columns compare codecs as
    in earlier runs, not the chunk sizes a short sweep happened to prefer."""
    b = a.build
    n = int(run([b / "dstx", "tune", "--quick", "--plan"]).stdout.split()[0])
    port = h.next_port()
    saved = h.tmp(f"tune-{link}.json")
    procs = [Proc(h, h.ns_dst, [b / "dstx", "recv", "--listen", f"{DST_IP}:{port}", "--sink", "null:",
                                "--count", n, "--quiet"], "tune-recv")]
    try:
        h.await_listening(port, procs, "dstx tune: receiver")
        procs.append(Proc(h, h.ns_src, [b / "dstx", "tune", "--quick", "--to", f"{DST_IP}:{port}", "--out",
                                        saved], "tune"))
        deadline = time.monotonic() + 300
        while not all(p.done.is_set() for p in procs):
            failed = [p for p in procs if p.done.is_set() and p.status != 0]
            if failed or time.monotonic() > deadline:
                raise RuntimeError("dstx tune: " + ("; ".join(f"{p.name}: exit {p.status}: {p.stderr_tail()}"
                                                              for p in failed) if failed else "no exit in 300 s"))
            time.sleep(0.01)
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.done.wait(5)
    failed = [p for p in procs if p.status != 0]
    if failed:
        raise RuntimeError("dstx tune: " + "; ".join(f"{p.name}: exit {p.status}: {p.stderr_tail()}"
                                                     for p in failed))
    with open(saved) as f:
        tuned = json.load(f)
    profile = {"version": 1, "chunk_bytes": 1 << 20, "streams": min(64, os.cpu_count() or 1),
               "zero_copy_min_bytes": 0, "raw_mb_s": tuned["raw_mb_s"], "lz4_mb_s": tuned["lz4_mb_s"]}
    path = h.tmp(f"profile-{link}.json")
    with open(path, "w") as f:
        json.dump(profile, f)
    os.environ["DSTX_TUNE_PROFILE"] = path
    return dict(profile, opens=observed_opening(h, a))


def observed_opening(h, a):
    """The rung --codec auto opens on with this link's profile and --dstx-arg, as dstx itself reports it
    (DSTX_TRACE_CODEC) for a 64 MiB send of generated binary-like state: "raw" or "lz4"."""
    b = a.build
    port = h.next_port()
    procs = [Proc(h, h.ns_dst, [b / "dstx", "recv", "--listen", f"{DST_IP}:{port}", "--sink", "null:", "--quiet"],
                  "opening-recv")]
    try:
        h.await_listening(port, procs, "opening probe: receiver")
        procs.append(Proc(h, h.ns_src, ["env", "DSTX_TRACE_CODEC=1", b / "dstx", "send", "--source",
                                        "emu:size=64M,profile=binary", "--to", f"{DST_IP}:{port}", "--codec",
                                        "auto", "--quiet", *a.dstx_arg], "opening-send"))
        if not all(p.done.wait(120) for p in procs) or any(p.status != 0 for p in procs):
            raise RuntimeError("opening probe: " + "; ".join(f"{p.name}: exit {p.status}: {p.stderr_tail()}"
                                                             for p in procs))
        with open(procs[1].errfile, errors="replace") as f:
            return "raw" if "opening on raw" in f.read() else "lz4"
    finally:
        for p in procs:
            p.kill()


def main_run(a, h):
    results = {"started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": a.command,
               "args": {"size": a.size, "repeats": a.repeats, "fast_repeats": a.fast_repeats,
                        "short_run_seconds": SHORT_RUN_SECONDS, "links": a.links, "profiles": a.profiles,
                        "tools": a.tools, "dstx_arg": a.dstx_arg, "tune": a.tune, "socat_buffer": a.socat_buffer,
                        "build": os.path.relpath(a.build, REPO) if a.build.is_relative_to(REPO) else str(a.build), "quiet_machine": a.quiet_machine},
               "links": {}, "runs": []}
    h.setup_net()
    # No profile but the one each link gets (tune_link): never one found in the user's configuration.
    os.environ["DSTX_TUNE_PROFILE"] = os.path.join(h.work, "no-tune-profile.json")
    files = {}
    for prof in a.profiles:
        path = os.path.join(h.work, f"{prof}.bin")
        mp = "binary-real" if prof == "binary" else prof
        run([a.build / "bench/make_state", mp, a.size, 1, path], timeout=300)
        if os.path.getsize(path) != a.size:
            raise RuntimeError(f"make_state {mp}: wrote {os.path.getsize(path)} bytes, wanted {a.size}")
        files[prof] = path
    log(f"state files: {len(files)} x {a.size / 2**20:.0f} MiB in {h.work}")
    cal = calibrate(h, files, a)
    results["calibration"] = cal
    # network cost per byte from iperf3 on the unlimited link (both sides' CPU)
    log("link unlimited: iperf3 (calibration)")
    unl = measure_link(h, "unlimited", a)
    k_run = unl["iperf3"][1] if unl["iperf3"][1]["Bps"] >= unl["iperf3"][0]["Bps"] else unl["iperf3"][0]
    cal["k_s_per_byte"] = k_run["cpu_s_per_byte"]
    cal["k_streams"] = k_run["streams"]
    t_begin = time.monotonic()
    total = sum(repeats_for(a, link) for link in a.links) * len(a.profiles) * len(a.tools)
    n = 0
    for link in a.links:
        li = unl if link == "unlimited" else None
        if li is None:
            log(f"link {link_label(link)}: iperf3")
            li = measure_link(h, link, a)
        else:
            h.set_link("unlimited")
        results["links"][link] = li
        if a.tune:
            li["tune"] = tune_link(h, link, a)
            log(f"link {link_label(link)}: dstx tune: raw {li['tune']['raw_mb_s']} MB/s, lz4 "
                f"{li['tune']['lz4_mb_s']} MB/s x {li['tune']['streams']}: auto opens on {li['tune']['opens']}")
        log(f"link {link_label(link)}: ceiling {li['ceiling_Bps'] / 1e9:.2f} GB/s "
            f"(1 stream {li['iperf3'][0]['Bps'] / 1e9:.2f}, {a.streams} streams {li['iperf3'][1]['Bps'] / 1e9:.2f})")
        for prof in a.profiles:
            reps = {tool: repeats_for(a, link) for tool in a.tools}
            rep = 0
            while rep < max(reps.values()):
                tools = [t for t in a.tools if rep < reps[t]]
                order = tools[rep % len(tools):] + tools[:rep % len(tools)]
                for tool in order:
                    n += 1
                    try:
                        rec = h.transfer(tool, files[prof], a.size, link)
                    except RuntimeError as e:
                        rec = {"tool": tool, "bytes": a.size, "status": "failed", "error": str(e)}
                    rec.update(link=link, profile=prof, rep=rep)
                    results["runs"].append(rec)
                    if rec["status"] == "ok":
                        extra = ""
                        if tool.startswith("dstx"):
                            s = rec["dstx_send"]
                            extra = f" z/r/c {s.get('zero_chunks')}/{s.get('raw_chunks')}/{s.get('compressed_chunks')}"
                        log(f"[{n}/{total}] {link_label(link)} {prof} {tool}: {rec['gbps']:.3f} GB/s, wire "
                            f"{rec['wire_ratio']:.3f}, cpu s/GB {rec['send_cpu_s_per_gb']:.2f}/"
                            f"{rec['recv_cpu_s_per_gb']:.2f}, rss {rec['send_rss_mib']:.0f}/{rec['recv_rss_mib']:.0f} MiB"
                            + extra)
                    else:
                        log(f"[{n}/{total}] {link_label(link)} {prof} {tool}: {rec['status']}: {rec.get('error')}")
                    if rep == 0:  # a short first run asks for more
                        more = repeats_for(a, link, rec)
                        total += more - reps[tool]
                        reps[tool] = more
                rep += 1
    results["seconds"] = time.monotonic() - t_begin
    results["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    return results


def report(results, out_dir):
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(results)
    derived = derive(results, summary)
    tgts = targets(summary, derived)
    results["summary"], results["derived"], results["targets"] = summary, derived, tgts
    (out_dir / "e2e.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    png = out_dir / "e2e.png"
    write_png(results, summary, str(out_dir), str(png))
    write_md(results, summary, derived, tgts, out_dir / "e2e.md", png.name)
    return summary, derived, tgts


def self_test(a, h, out_dir):
    """Runs a tiny benchmark and checks the harness' own invariants. Prints 'N passed, N failed'."""
    checks = []

    def check(name, cond, detail=""):
        checks.append(bool(cond))
        print(f"{'ok  ' if cond else 'FAIL'} {name}{(': ' + detail) if detail and not cond else ''}", flush=True)

    # the model: raw-only on a slow link with incompressible data is the link; zero data is CPU-bound
    c = {"lz4": {"enc_Bps": 5e8, "dec_Bps": 2e9, "ratio": 0.5}}
    check("ideal: link-bound raw", abs(ideal(1e8, 2, 1e-10, 1e10, 0.0, {})[0] - 1e8) < 1)
    check("ideal: compression pays on a slow link", ideal(1e8, 2, 1e-10, 1e10, 0.0, c)[0] > 1.9e8)
    check("ideal: zero pages are CPU-bound only", ideal(1e8, 2, 1e-10, 1e10, 1.0, c)[0] == 2e10)
    check("ideal: the shared memory bus caps it", ideal(1e8, 2, 1e-10, 1e10, 1.0, c, 1.5e10)[0] == 1.5e10)
    check("median", median([3, 1, 2, None]) == 2)
    check("parse_size", parse_size("64M") == 64 << 20 and parse_size("1G") == 1 << 30)
    results = main_run(a, h)
    runs = results["runs"]
    ok = [r for r in runs if r["status"] == "ok"]
    check("every run succeeded", len(ok) == len(runs),
          "; ".join(f"{r['tool']}: {r.get('error')}" for r in runs if r["status"] != "ok"))
    check("every tool ran in every cell", {(r["link"], r["profile"], r["tool"]) for r in ok} ==
          {(lk, p, t) for lk in a.links for p in a.profiles for t in a.tools})
    check("CPU and RSS recorded for both sides", all(r.get("send_cpu_s") is not None and r.get("recv_rss_mib")
                                                     for r in ok))
    check("link counters moved", all(r["link_bytes"] > 0 for r in ok))
    check("dstx tune measured every link", not a.tune or all(
        results["links"][lk]["tune"]["raw_mb_s"] > 0 and results["links"][lk]["tune"]["lz4_mb_s"] > 0
        for lk in a.links), str({lk: results["links"][lk].get("tune") for lk in a.links}))
    # The opening as dstx reported it: lz4 outruns a 1 Gbit/s link on any machine, so raw there means the probe
    # misread dstx's trace.
    openings = {lk: results["links"][lk]["tune"]["opens"] for lk in a.links} if a.tune else {}
    check("auto's opening observed on every link",
          all(o in ("raw", "lz4") for o in openings.values()) and openings.get("1", "lz4") == "lz4", str(openings))
    plain = [r for r in ok if r["tool"] == "plain"]
    check("plain: link bytes >= state bytes", all(r["link_bytes"] >= r["bytes"] for r in plain))
    comp = [r for r in ok if r["tool"] in ("lz4|socat", "zstd|socat")]
    check("pipelines: payload counted and <= link bytes",
          all(r["wire_bytes"] and 0 < r["wire_bytes"] <= r["link_bytes"] for r in comp))
    rate = [r for r in ok if r["link"] == "1" and r["tool"] == "plain"]
    check("1 Gbit/s link limits the plain loop", all(r["gbps"] < 0.13 for r in rate),
          str([round(r["gbps"], 3) for r in rate]))
    summary, derived, tgts = report(results, out_dir)
    check("reports written", all((out_dir / f).exists() for f in ("e2e.json", "e2e.md")))
    check("plot written", (out_dir / "e2e.png").exists() and (out_dir / "e2e.png").stat().st_size > 1000)
    check("ideal computed for every cell", all(d["ideal_gbps"] > 0 for pr in derived.values() for d in pr.values()))
    ns, work = (h.ns_src, h.ns_dst), h.work
    h.cleanup()
    left = run(["ip", "netns", "list"]).stdout
    check("namespaces removed", not any(x in left for x in ns), left)
    check("work dir removed", not os.path.exists(work))
    check("no process left", not h.procs and not h.holders)
    # Ctrl-C: a second harness interrupted mid-run must leave nothing behind
    child = subprocess.Popen([sys.executable, __file__, "--build", str(a.build), "--quick", "--size", "8M",
                              "--links", "1", "--profiles", "random", "--tools", "plain", "--repeats", "20",
                              "--out", str(out_dir / "interrupted.tmp")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 30
    started = False
    while time.monotonic() < deadline and child.poll() is None:
        if any(f"dstx-e2e-{child.pid}-" in x for x in run(["ip", "netns", "list"]).stdout.split()):
            started = True
            time.sleep(1.0)
            break
        time.sleep(0.05)
    os.killpg(child.pid, signal.SIGINT)
    try:
        child.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(5)
    left = run(["ip", "netns", "list"]).stdout
    check("Ctrl-C: interrupted run cleans up", started and f"dstx-e2e-{child.pid}-" not in left,
          f"started={started} left={left}")
    pids = run(["pgrep", "-s", str(child.pid)], check=False).stdout.split()
    check("Ctrl-C: no process of it left", not pids, str(pids))
    shutil.rmtree(out_dir / "interrupted.tmp", ignore_errors=True)
    passed = sum(checks)
    print(f"{passed} passed, {len(checks) - passed} failed")
    return 0 if passed == len(checks) else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", type=Path, default=None, help="build directory with dstx, bench/plain_loop, "
                    "bench/make_state (default: build, else build-f)")
    ap.add_argument("--size", type=parse_size, default=None, help="state bytes per profile (default 512M; "
                    "--quick 64M)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per cell (default 3; --quick 1)")
    ap.add_argument("--fast-repeats", type=int, default=None, help="runs per cell on links of 25 Gbit/s and "
                    "more, and for a tool whose first run of a profile took under SHORT_RUN_SECONDS: a run "
                    "lasts a fraction of a second and noise weighs most (default 7; --quick 1)")
    ap.add_argument("--links", default=",".join(LINKS), help="Gbit/s list, 'unlimited' for no limit")
    ap.add_argument("--profiles", default=",".join(PROFILES))
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--streams", type=int, default=os.cpu_count(), help="iperf3 streams for the N-stream ceiling")
    ap.add_argument("--socat-buffer", type=parse_size, default=131072, help="socat -b for the pipelines "
                    "(socat's 8 KiB default costs them throughput; default 128K)")
    ap.add_argument("--dstx-arg", action="append", default=[], help="extra argument for dstx send (repeatable)")
    ap.add_argument("--out", type=Path, default=REPO / "bench/results")
    ap.add_argument("--quick", action="store_true", help="64 MiB, 1 repetition, 1 s iperf3")
    ap.add_argument("--self-test", action="store_true", help="tiny run checking the harness; with --quick < 60 s")
    ap.add_argument("--render", type=Path, metavar="JSON", help="only recompute the summary and rewrite e2e.json, e2e.md, e2e.png in --out from "
                    "an earlier run's e2e.json (no root needed)")
    ap.add_argument("--no-tune", dest="tune", action="store_false", help="dstx runs without a tune profile "
                    "(default: `dstx tune --quick` on each link gives dstx the opening of --codec auto)")
    ap.add_argument("--quiet-machine", action="store_true", help="say in the report that nothing else ran")
    a = ap.parse_args()
    a.command = " ".join(["bench/e2e.py"] + sys.argv[1:])
    if a.build is None:
        a.build = next((REPO / d for d in ("build", "build-f") if (REPO / d / "dstx").exists()), REPO / "build")
    a.build = a.build.resolve()
    a.links = [x.strip().lower().removesuffix("g") for x in a.links.split(",") if x.strip()]
    for lk in a.links:
        if lk != "unlimited" and not lk.isdigit():
            ap.error(f"bad link {lk!r}")
    a.profiles = [x.strip() for x in a.profiles.split(",") if x.strip()]
    for p in a.profiles:
        if p not in PROFILES:
            ap.error(f"unknown profile {p!r} ({', '.join(PROFILES)})")
    a.tools = [x.strip() for x in a.tools.split(",") if x.strip()]
    for t in a.tools:
        if t not in TOOLS:
            ap.error(f"unknown tool {t!r} ({', '.join(TOOLS)})")
    if a.self_test:
        if a.links == LINKS:
            a.links = ["1", "unlimited"]
        if a.profiles == PROFILES:
            a.profiles = ["zero", "mixed"]
        a.size = a.size or (16 << 20)
        a.repeats = a.repeats or 1
        if a.out == REPO / "bench/results":
            a.out = Path(tempfile.mkdtemp(prefix="dstx-e2e-selftest."))
    a.size = a.size or ((64 << 20) if a.quick else (512 << 20))
    a.repeats = a.repeats or (1 if a.quick else 3)
    if a.repeats < 1 or (a.fast_repeats is not None and a.fast_repeats < 1):
        ap.error("--repeats and --fast-repeats must be at least 1")
    a.fast_repeats = max(a.repeats, a.fast_repeats or (1 if a.quick or a.self_test else 7))
    a.iperf_seconds = 1 if a.quick else 3
    a.iperf_repeats = 1 if a.quick else 2
    a.sample_size = (16 << 20) if a.quick else (64 << 20)
    if a.render:
        results = json.loads(a.render.read_text())
        for k in ("summary", "derived", "targets"):
            results.pop(k, None)
        report(results, a.out)
        log(f"rewrote {a.out / 'e2e.md'} and {a.out / 'e2e.png'} from {a.render}")
        return 0
    if os.geteuid() != 0:
        raise SystemExit("e2e: needs root (network namespaces, tc)")
    for exe in ("dstx", "bench/plain_loop", "bench/make_state"):
        if not (a.build / exe).exists():
            raise SystemExit(f"e2e: missing {a.build / exe}: cmake --build {a.build} --target dstx plain_loop "
                             f"make_state")
    ensure_tools()

    h = Harness(a)

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    try:
        if a.self_test:
            out = a.out
            rc = self_test(a, h, out)
            if out.name.startswith("dstx-e2e-selftest."):
                shutil.rmtree(out, ignore_errors=True)
            return rc
        results = main_run(a, h)
        summary, derived, tgts = report(results, a.out)
        log(f"wrote {a.out / 'e2e.json'}, {a.out / 'e2e.md'}, {a.out / 'e2e.png'} "
            f"({results['seconds']:.0f} s of transfers)")
        print((a.out / "e2e.md").read_text())
        return 0
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        h.cleanup()


if __name__ == "__main__":
    sys.exit(main())
