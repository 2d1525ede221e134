#!/usr/bin/env python3
"""QEMU's own tcp: migration against QEMU through dstx (exec:), same VM, same link. Driven by bench/qemu_migration.sh,
which sets up the optional veth/tbf link; see that script for usage. Standard library only.

The VM: tests/qemu/guest.S under TCG with --mem MiB of RAM. Before it starts counting, the guest fills RAM between
2 MiB and top-2 MiB page by page: 1/4 zero, 1/2 pseudo-random (incompressible), 1/4 a repeated 64-byte pattern.
QEMU itself skips zero pages (a few bytes each), so what dstx can still win is the compressible quarter.

Per run: boot the source, wait for the counter (RAM filled), start the destination, lift QEMU's bandwidth cap
(max-bandwidth 1 TiB/s; the default cap would be what is measured), migrate, and record QEMU's query-migrate on the
source, the wall time from `migrate` until the destination's query-status says running (for dstx this includes the
commit: both QEMUs wait for their exec: child to exit), dstx's --json numbers, and the link's tx byte counter (veth
only: loopback is shared with everything else on the machine).
"""

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "qemu"))
import qemu_harness as h  # noqa: E402
from qemu_harness import check, log, q, wait_for  # noqa: E402


class Link:
    def __init__(self, name, addr, src_ns=None, dst_ns=None, src_dev=None):
        self.name, self.addr, self.src_ns, self.dst_ns, self.src_dev = name, addr, src_ns, dst_ns, src_dev

    def tx_bytes(self):
        """Bytes sent on the source's side of the link (frames, headers included), or None on loopback."""
        if not self.src_dev:
            return None
        out = subprocess.run(["ip", "-j", "-s", "-n", self.src_ns, "link", "show", "dev", self.src_dev],
                             check=True, capture_output=True, text=True).stdout
        return json.loads(out)[0]["stats64"]["tx"]["bytes"]


def run_once(args, qemu, disk, workdir, link, mode, idx):
    name = f"{link.name}-{mode.replace(' ', '').replace('-', '')}-{idx}"
    src = h.Vm(qemu, workdir, f"{name}-src", disk, args.mem, netns=link.src_ns)
    src.connect()
    wait_for(lambda: len(src.counters()) >= 3, 120, "the guest to fill RAM and count")
    send_json = os.path.join(workdir, f"{name}.send.json")
    send_rc = os.path.join(workdir, f"{name}.send.rc")
    recv_rc = os.path.join(workdir, f"{name}.recv.rc")
    if mode == "tcp":
        dst = h.Vm(qemu, workdir, f"{name}-dst", disk, args.mem, incoming=f"tcp:{link.addr}:0", netns=link.dst_ns)
        dst.connect()
        port = int(dst.migrate_info()["socket-address"][0]["port"])
        uri = f"tcp:{link.addr}:{port}"
    else:
        extra = " ".join(q(a) for a in shlex.split(mode[len("dstx"):]))
        dst = h.Vm(qemu, workdir, f"{name}-dst", disk, args.mem, netns=link.dst_ns,
                   incoming=f"exec:{q(args.dstx)} recv --listen {link.addr}:0 --sink stdout: --quiet "
                            f"--accept-timeout 600000; echo $? > {q(recv_rc)}")
        dst.connect()
        port = h.dstx_recv_port(dst)
        uri = (f"exec:{q(args.dstx)} send --source stdin: --to {link.addr}:{port} --quiet --json {extra}"
               f" > {q(send_json)}; echo $? > {q(send_rc)}")
    src.qmp.execute("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
    tx0 = link.tx_bytes()
    t0 = time.monotonic()
    src.qmp.execute("migrate", uri=uri)
    info = h.wait_migration_end(src, 600)
    check(info["status"] == "completed", f"{name}: migration {info['status']}: {info.get('error-desc')}")
    wait_for(lambda: dst.status() == "running", 600, f"{name}: destination running", interval=0.02)
    t_running = time.monotonic() - t0
    r = {"link": link.name, "mode": mode, "qemu_total_ms": info.get("total-time"), "qemu_downtime_ms":
         info.get("downtime"), "qemu_setup_ms": info.get("setup-time"), "ram_transferred": info["ram"]["transferred"],
         "ram_total": info["ram"]["total"], "zero_pages": info["ram"]["duplicate"],
         "normal_pages": info["ram"]["normal"], "wall_to_dst_running_s": t_running}
    if mode != "tcp":
        wait_for(lambda: h.read_int_file(send_rc) is not None and h.read_int_file(recv_rc) is not None, 60,
                 "both dstx to exit")
        check(h.read_int_file(send_rc) == 0 and h.read_int_file(recv_rc) == 0,
              f"{name}: dstx exit send {h.read_int_file(send_rc)} recv {h.read_int_file(recv_rc)}")
        j = h.read_json_file(send_json)
        r.update({"stream_bytes": j["bytes"], "dstx_wire_bytes": j["wire_bytes"], "dstx_seconds": j["seconds"],
                  "dstx_streams": j["streams"], "dstx_chunks": j["chunks"], "dstx_zero_chunks": j["zero_chunks"],
                  "dstx_raw_chunks": j["raw_chunks"], "dstx_compressed_chunks": j["compressed_chunks"]})
    tx1 = link.tx_bytes()
    if tx0 is not None:
        r["link_tx_bytes"] = tx1 - tx0
    wait_for(lambda: len(dst.counters()) >= 1, 30, f"{name}: the guest counting on the destination")
    src.kill()
    dst.kill()
    log(f"{name}: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                                if k not in ("link", "mode")))
    return r


def mib(b):
    return f"{b / (1 << 20):.1f} MiB"


def med(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def spread(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return f"{min(vals):.2f}–{max(vals):.2f}" if len(vals) > 1 else "one run"


def write_markdown(args, results, path, command):
    titles = {"loopback": "Loopback (127.0.0.1)",
              "veth": f"veth pair between two network namespaces, tc tbf {args.veth_rate} on each side"}
    lines = [
        "# QEMU live migration: QEMU's tcp: against QEMU through dstx",
        "",
        "Produced by `bench/qemu_migration.sh` (driver `bench/qemu_migration.py`). Reproduce with:",
        "",
        "```",
        command,
        "```",
        "",
        f"- {args.qemu_version}, TCG (no KVM), `-machine pc -m {args.mem}`, guest `tests/qemu/guest.S`: RAM from "
        "2 MiB to top-2 MiB filled page by page, 1/4 zero, 1/2 pseudo-random, 1/4 a repeated 64-byte pattern; "
        "the guest then idles (HLT) and prints a counter, so hardly anything is dirtied during the migration.",
        "- Both sides: `migrate-set-parameters max-bandwidth` 1 TiB/s (QEMU's default cap, 128 MiB/s in this "
        "build, would otherwise be what is measured); all other parameters and capabilities QEMU's defaults "
        "(no multifd, no compression, no xbzrle).",
        f"- dstx: `{args.dstx_version}`, `send --source stdin: --json [variant options]`, `recv --sink stdout:`; "
        "defaults otherwise (codec auto: zero skip + lz4 where it pays, one stream per core).",
        f"- Machine: {os.cpu_count()} cores shared with other work (loopback numbers are CPU-bound and move with "
        f"the neighbours' load); {args.repeat} runs per row, medians shown, min–max of the wall time in brackets.",
        "",
        "Columns: *QEMU total* and *downtime* are the source's `query-migrate` (for dstx QEMU stops its clock when the "
        "last byte is in the pipe, before dstx has delivered and committed it); *to dest running* is wall time from "
        "`migrate` until the destination's `query-status` says running (both QEMUs wait for their exec: child to "
        "exit, so for dstx this includes the commit); *QEMU stream* is the bytes QEMU wrote (dstx: its `bytes`; "
        "tcp: `ram.transferred`, which leaves out the device state, under 1 MiB); *on the wire* is dstx's "
        "`wire_bytes` (frames, without TCP/IP) or, on the veth link, the interface's tx byte counter (everything "
        "including Ethernet/IP/TCP headers, source to destination only).",
        "",
    ]
    for link in args.link_names:
        groups = [(("QEMU tcp:" if m == "tcp" else f"QEMU exec: {m}"),
                   [r for r in results if r["link"] == link and r["mode"] == m]) for m in args.modes]
        groups = [(label, rows) for label, rows in groups if rows]
        if not groups:
            continue
        everything = [r for _, rows in groups for r in rows]
        title = titles.get(link, link)
        lines += [f"## {title}", ""]
        veth = any("link_tx_bytes" in r for r in everything)
        head = "| transport | QEMU total | downtime | to dest running | QEMU stream | on the wire (dstx frames) |"
        sep = "|---|---:|---:|---:|---:|---:|"
        if veth:
            head += " link tx bytes |"
            sep += "---:|"
        lines += [head, sep]
        for mode, rows in groups:
            stream = med(rows, "stream_bytes") or med(rows, "ram_transferred")
            wire = med(rows, "dstx_wire_bytes")
            row = (f"| {mode} | {med(rows, 'qemu_total_ms'):.0f} ms | {med(rows, 'qemu_downtime_ms'):.0f} ms | "
                   f"{med(rows, 'wall_to_dst_running_s'):.2f} s ({spread(rows, 'wall_to_dst_running_s')}) | "
                   f"{mib(stream)} | "
                   f"{mib(wire) + f' ({wire / stream:.3f})' if wire else 'same as the stream'} |")
            if veth:
                tx = med(rows, "link_tx_bytes")
                row += f" {mib(tx)} |"
            lines.append(row)
        lines.append("")
        lines.append("Every run:")
        lines.append("")
        lines.append("```")
        for r in everything:
            lines.append(json.dumps(r, sort_keys=True))
        lines.append("```")
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dstx", required=True)
    ap.add_argument("--mem", type=int, default=512, help="guest RAM in MiB (default 512)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--veth", nargs=4, metavar=("SRC_NS", "DST_NS", "DST_ADDR", "SRC_DEV"),
                    help="also run over this namespace link")
    ap.add_argument("--veth-rate", default="1gbit", help="the tbf rate on the veth link, for the report")
    ap.add_argument("--no-loopback", action="store_true")
    ap.add_argument("--out", help="write the markdown report here")
    ap.add_argument("--command", default="", help="the command line to quote in the report")
    ap.add_argument("--variant", action="append", metavar="OPTIONS",
                    help="dstx send options for one dstx row; repeatable (default: '' and '--codec none')")
    args = ap.parse_args()
    qemu = shutil.which("qemu-system-x86_64")
    check(qemu, "qemu-system-x86_64 not found")
    args.dstx = os.path.abspath(args.dstx)
    args.qemu_version = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    args.dstx_version = subprocess.run([args.dstx, "--version"], capture_output=True, text=True).stdout.strip()
    links = []
    if not args.no_loopback:
        links.append(Link("loopback", "127.0.0.1"))
    if args.veth:
        links.append(Link("veth", args.veth[2], args.veth[0], args.veth[1], args.veth[3]))
    args.link_names = [lk.name for lk in links]
    variants = args.variant if args.variant is not None else ["", "--codec none"]
    args.modes = ["tcp"] + [("dstx " + v).strip() for v in variants]
    h.install_cleanup()
    workdir = tempfile.mkdtemp(prefix="dstx-qemu-bench-")
    results = []
    try:
        disk = h.build_guest(workdir)
        for i in range(args.repeat):
            for link in links:
                for mode in args.modes:  # interleaved, so drift on the shared machine hits every mode alike
                    results.append(run_once(args, qemu, disk, workdir, link, mode, i))
    except h.Failure as e:
        log(f"FAIL: {e} (logs in {workdir})")
        return 1
    finally:
        h.kill_all()
    if args.out:
        write_markdown(args, results, args.out, args.command)
        log(f"wrote {args.out}")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
