"""Processing time per stage for one phantom study, with the time to read the series from disk beside it.

    python bench/bench_pipeline.py --slices 300 --size 512 --engine threshold

Reading the files (pydicom, pixels decoded) is the baseline run in the same process: every stage is also
reported as a ratio to it, so the numbers compare across machines better than seconds do.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--engine", default="threshold")
    args = ap.parse_args()

    from pydicom import dcmread

    from node.phantom import make_phantom, write_phantom_study
    from node.processing import analyse, write_outputs

    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    try:
        phantom = make_phantom(rows=args.size, cols=args.size, slices=args.slices, slice_spacing=1.0)
        files = write_phantom_study(phantom, work / "study")
        del phantom
        t0 = time.perf_counter()
        for f in files:
            dcmread(f).pixel_array
        read_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        analysis = analyse(files, engine=args.engine)
        total_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        write_outputs(analysis, work / "out")
        analysis.timings["write"] = time.perf_counter() - t0
        stages = {k: round(v, 2) for k, v in analysis.timings.items()}
        result = {
            "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {os.cpu_count()} CPUs",
            "study": f"{len(files)} slices {args.size}x{args.size}", "engine": args.engine,
            "status": analysis.status,
            "read_series_s": round(read_s, 2), "analyse_total_s": round(total_s, 2), "stages_s": stages,
            "stage_over_read": {k: round(v / read_s, 2) for k, v in analysis.timings.items()},
            "seg_plus_sr_over_read": round((analysis.timings.get("seg", 0) + analysis.timings.get("sr", 0)) / read_s, 2),
        }
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
