"""Throughput of one worker-role process with 1, 2, 3, ... worker processes: studies per hour, and as a
ratio to one worker.

    python bench/scaleout.py --workers 1 2 3 --studies 6 --size 128 --slices 32 --engine threshold

The studies (phantoms, different seeds) are received first by a listener-only node, until every job is
ready; then a worker-only node (``node.roles``) with ``processing.workers = N`` starts and processes them
all. Throughput is the number of studies over the time from the first claim to the last outcome
(``jobs.started_at`` .. ``jobs.finished_at``), so ingest does not count. SQLite, one machine; each run in a
fresh folder. The load average before each run is printed: on a shared machine the figures move with it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETTLE_TIMEOUT_S = 3600


def run(workers: int, studies: list[list[Path]], engine: str, folder: Path) -> dict:
    from sqlalchemy import func, select

    from node.config import load_settings
    from node.db.schema import Job
    from node.demo import free_port, send_study
    from node.service import Node

    def settings(roles: list[str]):
        return load_settings(env={}, overrides={
            "node": {"port": free_port(), "roles": roles, "name": f"bench-{roles[0]}"},
            "storage": {"spool_dir": str(folder / "spool"), "results_dir": str(folder / "results"),
                        "database_url": f"sqlite:///{folder / 'ctnode.db'}"},
            "processing": {"stable_after": 0.5, "check_interval": 0.2, "engine": engine, "workers": workers},
            "http": {"enabled": False}})

    front = Node(settings(["listener"]))
    front.start()
    try:
        for files in studies:
            assert send_study(files, "127.0.0.1", front.listener.port, "CTNODE", progress=False) == len(files)
        while True:
            with front.sessions() as s:
                if s.scalar(select(func.count()).where(Job.state == "ready")) == len(studies):
                    break
            time.sleep(0.2)
    finally:
        front.stop()
    load = os.getloadavg()[0]
    back = Node(settings(["worker"]))
    back.start()
    end = time.monotonic() + SETTLE_TIMEOUT_S
    try:
        while time.monotonic() < end:
            with back.sessions() as s:
                if s.scalar(select(func.count()).where(Job.state.in_(["done", "skipped", "failed"]))) == len(studies):
                    break
            time.sleep(0.2)
    finally:
        back.stop()
    with back.sessions() as s:
        first, last = s.execute(select(func.min(Job.started_at), func.max(Job.finished_at))).one()
        states = sorted(s.scalars(select(Job.state)))
    seconds = (last - first).total_seconds()
    return {"workers": workers, "studies": len(studies), "states": sorted(set(states)), "seconds": round(seconds, 1),
            "studies_per_hour": round(len(studies) * 3600 / seconds, 1), "load_before": round(load, 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--studies", type=int, default=6)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--slices", type=int, default=32)
    p.add_argument("--engine", default="threshold")
    args = p.parse_args()

    import logging

    from node.phantom import make_phantom, write_phantom_study

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="ctnode-scaleout-") as tmp:
        root = Path(tmp)
        studies = [write_phantom_study(make_phantom(rows=args.size, cols=args.size, slices=args.slices, seed=i,
                                                    pixel_spacing=0.7 * 512 / args.size,
                                                    slice_spacing=300.0 / args.slices), root / f"study{i}")
                   for i in range(args.studies)]
        results = [run(n, studies, args.engine, root / f"run{n}") for n in args.workers]
    base = results[0]["studies_per_hour"]
    for r in results:
        r["ratio_to_first"] = round(r["studies_per_hour"] / base, 2)
        print(json.dumps(r))
    print(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
                      "study": f"{args.slices} slices {args.size}x{args.size}", "engine": args.engine}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
