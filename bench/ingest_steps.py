"""Where the listener's time goes per received instance: wall-clock timers around each step, no profiler.

Runs the node's listener in this process, sends a phantom study with DCMTK ``storescu`` (TCP_NODELAY=1) and
prints the mean time per instance of each step, by thread ("Accep..." is the association's thread, "spool"
the Stager's). Steps overlap across threads, so they do not add up to the handler time.

    python bench/ingest_steps.py --slices 300 --size 512
"""
from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TIMES: dict[str, float] = collections.defaultdict(float)


def timed(owner, name: str) -> None:
    """Replace ``owner.name`` by a wrapper that adds its wall time to TIMES under name@thread."""
    fn = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[f"{name}@{threading.current_thread().name[:5]}"] += time.perf_counter() - t0

    setattr(owner, name, wrapper)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()

    import node.listener as listener_mod
    import node.spool as spool_mod
    from node.config import load_settings
    from node.db import open_database
    from node.phantom import make_phantom, write_phantom_study

    for name in ("validate_instance", "sha256_of", "record_instance", "part10_header", "place"):
        timed(listener_mod, name)
    for name in ("_new_temp", "_write_synced"):
        timed(spool_mod, name)
    real_submit = spool_mod.Stager.submit

    def submit(self, chunks):
        """The staged file's future, its result() timed: how long the handler waits for the spool thread."""
        staged = real_submit(self, chunks)
        timed(staged, "result")
        return staged

    spool_mod.Stager.submit = submit
    timed(spool_mod.os, "fsync")
    work = Path(tempfile.mkdtemp(prefix="ingest-steps-"))
    try:
        files = write_phantom_study(make_phantom(rows=args.size, cols=args.size, slices=args.slices), work / "study")
        port = 11199
        settings = load_settings(overrides={"node": {"port": port}, "storage": {
            "spool_dir": str(work / "spool"), "database_url": f"sqlite:///{work / 'db.sqlite'}"}}, env={})
        lst = listener_mod.Listener(settings, open_database(settings.storage.database_url))
        timed(lst, "handle_store")  # the instance attribute shadows the method the handlers are bound to
        lst.start()
        time.sleep(0.5)
        storescu = shutil.which("storescu", path="/usr/bin") or "storescu"
        t0 = time.perf_counter()
        subprocess.run([storescu, "-aec", "CTNODE", "+sd", "+r", "127.0.0.1", str(port), str(work / "study")],
                       check=True, env=dict(os.environ, TCP_NODELAY="1"), stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        lst.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{time.strftime('%Y-%m-%d')}  {len(files)} instances {args.size}x{args.size}, storescu wall {wall:.2f} s")
    for key, total in sorted(TIMES.items(), key=lambda kv: -kv[1]):
        print(f"  {key:32s} {1000 * total / len(files):6.2f} ms per instance")


if __name__ == "__main__":
    main()
