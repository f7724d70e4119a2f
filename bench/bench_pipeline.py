"""Processing time per stage for one phantom study, with the time to read the series from disk beside it.

    python bench/bench_pipeline.py --slices 300 --size 512 --runs threshold infnet
    python bench/bench_pipeline.py --runs infnet:cuda infnet:cuda infnet:cpu   # on a GPU machine

Each run is ``ENGINE[:DEVICE]`` and analyses the same phantom study, one after the other in this process.
Reading the files (pydicom, pixels decoded) is the baseline measured in the same process: every stage is
also reported as a ratio to it, so the numbers compare across machines better than seconds do. "setup" is
the part of the analysis outside the stages (building the engine: loading weights and, on the first CUDA
run of a process, creating the CUDA context; each node job runs in a fresh worker process, so a job pays
it every time). Each run's infection mask is compared with the first run of the same engine (Dice and
voxels that differ), which shows what the GPU's half precision changes against the CPU's fp32.
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


def agreement(ref, other) -> dict:
    """How ``other``'s infection (and consolidation) masks differ from ``ref``'s (Dice None: both empty)."""
    from node.agreement import dice

    out = {"infection_dice": dice(ref.infection, other.infection),
           "infection_voxels_differing": int((ref.infection ^ other.infection).sum()),
           "infection_voxels": int(ref.infection.sum())}
    if ref.consolidation is not None and other.consolidation is not None:
        out["consolidation_dice"] = dice(ref.consolidation, other.consolidation)
    return {k: round(v, 5) if isinstance(v, float) else v for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--runs", nargs="+", default=["threshold"], metavar="ENGINE[:DEVICE]")
    ap.add_argument("--engine", help="one run of this engine (same as --runs ENGINE)")
    args = ap.parse_args()
    runs = [args.engine] if args.engine else args.runs

    import torch
    from pydicom import dcmread

    from node.phantom import make_phantom, write_phantom_study
    from node.processing import analyse, write_outputs

    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{platform.node()}, {os.cpu_count()} CPUs, GPU {gpu}, torch {torch.__version__}",
              "runs": []}
    try:
        phantom = make_phantom(rows=args.size, cols=args.size, slices=args.slices, slice_spacing=1.0)
        files = write_phantom_study(phantom, work / "study")
        del phantom
        t0 = time.perf_counter()
        for f in files:
            dcmread(f).pixel_array
        read_s = time.perf_counter() - t0
        report.update(study=f"{len(files)} slices {args.size}x{args.size}", read_series_s=round(read_s, 2))
        first: dict[str, object] = {}
        for i, run in enumerate(runs):
            engine, _, device = run.partition(":")
            options = {"device": device} if device else {}
            t0 = time.perf_counter()
            analysis = analyse(files, engine=engine, engine_options=options)
            total_s = time.perf_counter() - t0
            stages = dict(analysis.timings)
            stages["setup"] = total_s - sum(stages.values())
            t0 = time.perf_counter()
            write_outputs(analysis, work / f"out{i}")
            stages["write"] = time.perf_counter() - t0
            entry = {"run": run, "status": analysis.status, "analyse_total_s": round(total_s, 2),
                     "stages_s": {k: round(v, 2) for k, v in stages.items()},
                     "stage_over_read": {k: round(v / read_s, 2) for k, v in stages.items()},
                     "percent_involved": {k: v for k, v in analysis.scores.items() if k.startswith("percent_involved")}}
            infection = analysis.pipeline.infection if analysis.pipeline is not None else None
            if infection is not None:
                if engine in first:
                    entry["against_first_" + engine] = agreement(first[engine], infection)
                else:
                    first[engine] = infection
            report["runs"].append(entry)
            print(json.dumps(entry), flush=True)
            del analysis
        print(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
