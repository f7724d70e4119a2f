"""Peak data memory of a fresh process analysing one phantom study, as a worker does: the figure to compare
with ``processing.worker_memory_gb`` (the worker's RLIMIT_DATA cap, :func:`node.worker.limit_memory`).

    python bench/worker_memory.py --slices 300 --size 512 --engine infnet [--device cuda]

VmData (heap and private writable mappings; what RLIMIT_DATA counts) is sampled every 10 ms in the child.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def vmdata_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmData:"):
                return int(line.split()[1]) / 1024**2
    raise RuntimeError("no VmData in /proc/self/status (Linux only)")


def analyse_and_watch(files: list[Path], engine: str, device: str) -> dict:
    peak = [0.0]

    def watch() -> None:
        while True:
            peak[0] = max(peak[0], vmdata_gb())
            time.sleep(0.01)

    threading.Thread(target=watch, daemon=True).start()
    from node.processing import analyse

    before = vmdata_gb()
    analysis = analyse(files, engine=engine, engine_options={"device": device} if device else {})
    return {"status": analysis.status, "engine_device": analysis.pipeline.engine.device,
            "vmdata_after_imports_gb": round(before, 2), "peak_vmdata_gb": round(max(peak[0], vmdata_gb()), 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--engine", default="infnet")
    ap.add_argument("--device", default="", help="cpu or cuda (default: the engine's own choice)")
    args = ap.parse_args()

    from node.phantom import make_phantom, write_phantom_study

    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    try:
        files = write_phantom_study(make_phantom(rows=args.size, cols=args.size, slices=args.slices), work / "study")
        with multiprocessing.get_context("spawn").Pool(1) as pool:  # a fresh process, like a worker
            result = pool.apply(analyse_and_watch, (files, args.engine, args.device))
        result.update(study=f"{len(files)} slices {args.size}x{args.size}", engine=args.engine,
                      date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
