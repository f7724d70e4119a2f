"""Ingest benchmark: the node's listener against a minimal pynetdicom storage SCP, side by side.

Both SCPs run in child Python processes; DCMTK ``storescu`` (with TCP_NODELAY=1) sends the same phantom study
to each, alternately, ``--repeat`` times. The minimal SCP only writes ``event.encoded_dataset()`` to a file;
the node also validates, writes atomically and durably (O_DSYNC, rename, folder fsync) and records each
instance in SQLite before answering.
Reported: median wall time of storescu for each, their ratio (also paired: median and quartiles of the ratio
within each alternation), the CPU time each SCP process used meanwhile
(all threads; steadier than wall time on a shared machine) and the peak RSS of each SCP process.

    python bench/bench_ingest.py --slices 300 --size 512 --repeat 3
    python bench/bench_ingest.py --repeat 7 --baseline-rev 7627eca   # a change against an earlier commit
    python bench/bench_ingest.py --repeat 7 --decompose --no-fsync-diagnostic   # what each part costs
    python bench/bench_ingest.py --repeat 7 --like-for-like   # also a minimal SCP with pynetdicom's log
                                                              # handlers off, as in the node
    python bench/bench_ingest.py --repeat 7 --to-disk        # also the node with node.receive_to_disk = true
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# --baseline-rev runs a child from a worktree of an earlier commit: it imports that tree's ``node``
sys.path.insert(0, os.environ.get("CTNODE_BENCH_TREE", str(REPO)))


def serve_minimal(port: int, folder: Path, tuned: bool = False) -> None:
    """The minimal SCP; ``tuned`` turns pynetdicom's per-message log handlers off as the node does (unless
    ``ctnode -v``), so that the node's ratio to it is what the node's own work costs (--like-for-like)."""
    from pynetdicom import AE, _config, evt
    from pynetdicom.sop_class import CTImageStorage

    def on_store(event):
        with open(folder / f"{event.request.AffectedSOPInstanceUID}.dcm", "wb") as fh:
            fh.write(event.encoded_dataset())
        return 0x0000

    if tuned:
        _config.LOG_HANDLER_LEVEL = "none"
    ae = AE(ae_title="CTNODE")
    ae.add_supported_context(CTImageStorage)
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[(evt.EVT_C_STORE, on_store)])


def cut_node(stage: str) -> None:
    """Diagnostic only (--decompose): make the node's C-STORE handler stop after ``stage``, so that the
    cost of each part shows against the same minimal SCP: "empty" answers at once; "checks" parses,
    validates and hashes, then answers (no file, no row); "row" also records and commits the row (no file)."""
    from concurrent import futures

    import node.listener
    from node.spool import Stager

    if stage == "empty":
        node.listener.Listener.handle_store = lambda self, event: 0x0000
        return

    def no_write(self, chunks):
        done = futures.Future()
        done.set_result(Path("/nonexistent"))  # handle_store's unlink(missing_ok=True) of it is a no-op
        return done

    Stager.submit = no_write
    if stage == "checks":  # the handler hashes before it records
        node.listener.Listener._record = lambda self, event, path, study_uid, digest, staged, record, ct: "stored"
    else:  # "row"
        node.listener.place = lambda staged, path: None


def serve_node(port: int, folder: Path, fsync: bool = True, cut: str = "", to_disk: bool = False) -> None:
    import logging

    import node.spool
    from node.config import load_settings

    # Logging as `ctnode serve` sets it up (node/cli.py main), to a file here instead of the journal
    logging.basicConfig(level=logging.INFO, filename=folder / "node.log",
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")

    if not fsync:  # diagnostic only: shows what durability costs on this disk; the node always syncs
        node.spool.os.fsync = lambda fd: None
        node.spool.os.O_DSYNC = 0  # the staged files' synchronised writes
    if cut:
        cut_node(cut)
    from node.db import open_database
    from node.listener import Listener

    settings = load_settings(overrides={"node": {"port": port, "receive_to_disk": to_disk},
                                        "storage": {"spool_dir": str(folder / "spool"),
                                                    "database_url": f"sqlite:///{folder / 'ctnode.db'}"}}, env={})
    listener = Listener(settings, open_database(settings.storage.database_url))
    listener.start()
    while True:
        time.sleep(3600)


def child(kind: str, port: int, folder: Path) -> None:
    import signal

    def report(*_):
        # VmHWM is this process's own peak (ru_maxrss would carry the parent's peak across exec)
        hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
        (folder / "rss_kb").write_text(hwm.split()[1])
        os._exit(0)

    signal.signal(signal.SIGTERM, report)
    if kind in ("minimal", "minimal-tuned"):
        serve_minimal(port, folder, tuned=kind == "minimal-tuned")
    else:
        serve_node(port, folder, fsync=(kind != "node-nofsync"), to_disk=(kind == "node-to-disk"),
                   cut=kind.removeprefix("node-upto-") if kind.startswith("node-upto-") else "")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30) -> None:
    import socket

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"SCP on port {port} did not start")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far, all its threads (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_once(kind: str, study: Path, work: Path, baseline_tree: Path | None = None) -> tuple[float, int, float]:
    """(storescu's wall time, the SCP's peak RSS in KB, the SCP's CPU seconds while storescu ran)."""
    folder = work / f"{kind}-{time.monotonic_ns()}"
    folder.mkdir()
    port = free_port()
    env = dict(os.environ)
    if kind == "baseline":  # the node listener as of --baseline-rev
        env["CTNODE_BENCH_TREE"] = str(baseline_tree)
    proc = subprocess.Popen([sys.executable, __file__, "--child", "node" if kind == "baseline" else kind,
                             "--port", str(port), "--folder", str(folder)], env=env)
    try:
        wait_port(port)
        storescu = shutil.which("storescu", path="/usr/bin") or "storescu"
        env = dict(os.environ, TCP_NODELAY="1")
        cpu0, t0 = cpu_seconds(proc.pid), time.perf_counter()
        subprocess.run([storescu, "-aec", "CTNODE", "+sd", "+r", "127.0.0.1", str(port), str(study)],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        elapsed, cpu = time.perf_counter() - t0, cpu_seconds(proc.pid) - cpu0
    finally:
        proc.terminate()
        proc.wait(30)
    rss = int((folder / "rss_kb").read_text()) if (folder / "rss_kb").exists() else -1
    shutil.rmtree(folder)
    return elapsed, rss, cpu


def paired(a: list[float], b: list[float]) -> dict[str, float]:
    """Median and quartiles of a[i] / b[i]."""
    ratios = [x / y for x, y in zip(a, b)]
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    return {"median": round(statistics.median(ratios), 2), "q1": round(q1, 2), "q3": round(q3, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-fsync-diagnostic", action="store_true",
                    help="also run the node with fsync disabled, to show what durability costs on this disk")
    ap.add_argument("--decompose", action="store_true",
                    help="also run the node with its handler cut after each part (diagnostic: empty, checks, row), "
                    "to show what each part of the handler costs against the same minimal SCP")
    ap.add_argument("--like-for-like", action="store_true",
                    help="also run the minimal SCP with pynetdicom's log handlers off, as the node runs: the "
                    "node's ratio to it is what the node's own work costs")
    ap.add_argument("--to-disk", action="store_true",
                    help="also run the node with node.receive_to_disk = true (config/node.production.toml): "
                    "pynetdicom writes each data set to a temporary file while it arrives")
    ap.add_argument("--baseline-rev", help="also run the node listener of this git revision (a temporary "
                    "worktree), side by side: how a change moved the ingest time on a noisy machine")
    ap.add_argument("--child")
    ap.add_argument("--port", type=int)
    ap.add_argument("--folder", type=Path)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.port, args.folder)
        return
    from node.phantom import make_phantom, write_phantom_study

    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        files = write_phantom_study(make_phantom(rows=args.size, cols=args.size, slices=args.slices), work / "study")
        size_mb = sum(f.stat().st_size for f in files) / 1e6
        kinds = ["minimal", "node"] + (["node-nofsync"] if args.no_fsync_diagnostic else [])
        if args.decompose:
            kinds += ["node-upto-empty", "node-upto-checks", "node-upto-row"]
        if args.like_for_like:
            kinds.append("minimal-tuned")
        if args.to_disk:
            kinds.append("node-to-disk")
        baseline_tree = None
        if args.baseline_rev:
            baseline_tree = work / "baseline-tree"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(baseline_tree),
                            args.baseline_rev], check=True)
            kinds.append("baseline")
        times: dict[str, list[float]] = {k: [] for k in kinds}
        cpu: dict[str, list[float]] = {k: [] for k in kinds}
        rss: dict[str, int] = {}
        for _ in range(args.repeat):
            for kind in kinds:
                t, r, c = run_once(kind, work / "study", work, baseline_tree)
                times[kind].append(t)
                cpu[kind].append(c)
                rss[kind] = max(rss.get(kind, 0), r)
        med = {k: statistics.median(v) for k, v in times.items()}
        med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
        result = {
            "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {os.cpu_count()} CPUs",
            "study": f"{len(files)} instances {args.size}x{args.size}, {size_mb:.0f} MB",
            "minimal_scp_s": round(med["minimal"], 2), "node_s": round(med["node"], 2),
            "ratio_node_over_minimal": round(med["node"] / med["minimal"], 2),
            **({"baseline_rev": args.baseline_rev, "baseline_s": round(med["baseline"], 2),
                "ratio_baseline_over_minimal": round(med["baseline"] / med["minimal"], 2),
                "ratio_node_over_baseline": round(med["node"] / med["baseline"], 2)} if args.baseline_rev else {}),
            **({"node_nofsync_s": round(med["node-nofsync"], 2),
                "ratio_nofsync_over_minimal": round(med["node-nofsync"] / med["minimal"], 2)}
               if "node-nofsync" in med else {}),
            **({"minimal_tuned_s": round(med["minimal-tuned"], 2),
                "ratio_node_over_minimal_tuned": round(med["node"] / med["minimal-tuned"], 2)}
               if args.like_for_like else {}),
            **({"node_to_disk_s": round(med["node-to-disk"], 2),
                "ratio_to_disk_over_minimal": round(med["node-to-disk"] / med["minimal"], 2)}
               if args.to_disk else {}),
            **({"ratio_over_minimal": {k: round(v / med["minimal"], 2) for k, v in med.items()}}
               if args.decompose else {}),
            # CPU seconds of each SCP process while storescu ran (less noisy than wall time on a shared CPU)
            "cpu_s": {k: round(v, 2) for k, v in med_cpu.items()},
            "peak_rss_mb": {k: round(v / 1024) for k, v in rss.items()},
            # Each alternation runs every kind once, close in time: the ratio within an alternation is paired,
            # so the machine's drift cancels. Median and quartiles of those ratios.
            "paired_ratios": {f"{a}/{b}": paired(times[a], times[b]) for a, b in
                              [(k, "minimal") for k in kinds if k != "minimal"]
                              + ([("node", "baseline")] if args.baseline_rev else [])},
            "runs": {k: [round(x, 2) for x in v] for k, v in times.items()},
        }
        print(json.dumps(result, indent=2))
    finally:
        if args.baseline_rev:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(work / "baseline-tree")],
                           check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
