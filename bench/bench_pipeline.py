"""Processing time per stage for one phantom study, with the time to read the series from disk beside it.

    python bench/bench_pipeline.py --slices 300 --size 512 --runs threshold infnet
    python bench/bench_pipeline.py --runs infnet:cuda infnet:cuda infnet:cpu   # on a GPU machine
    python bench/bench_pipeline.py --slices 300 --runs threshold --baseline-rev 43d6f02 --repeat 2

Each run is ``ENGINE[:DEVICE]`` and analyses the same phantom study, one after the other in this process.
Reading the files (pydicom, pixels decoded) is the baseline measured in the same process: every stage is
also reported as a ratio to it, so the numbers compare across machines better than seconds do. "setup" is
the part of the analysis outside the stages (building the engine: loading weights and, on the first CUDA
run of a process, creating the CUDA context; each node job runs in a fresh worker process, so a job pays
it every time). Each run's infection mask is compared with the first run of the same engine (Dice and
voxels that differ), which shows what the GPU's half precision changes against the CPU's fp32.

With ``--baseline-rev REV`` (a temporary git worktree of REV) or ``--baseline-tree DIR`` (a checkout of the
baseline, where git is not at hand) the same runs go side by side: each tree runs them in a child process
(its own ``bench/bench_pipeline.py``), the two alternating ``--repeat`` times, and the report gives the
median seconds of every stage for each tree and their ratio (this tree / baseline) per run.
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
sys.path.insert(0, str(REPO))


def agreement(ref, other) -> dict:
    """How ``other``'s infection (and consolidation) masks differ from ``ref``'s (Dice None: both empty)."""
    from node.agreement import dice

    out = {"infection_dice": dice(ref.infection, other.infection),
           "infection_voxels_differing": int((ref.infection ^ other.infection).sum()),
           "infection_voxels": int(ref.infection.sum())}
    if ref.consolidation is not None and other.consolidation is not None:
        out["consolidation_dice"] = dice(ref.consolidation, other.consolidation)
    return {k: round(v, 5) if isinstance(v, float) else v for k, v in out.items()}


def tree_runs(tree: Path, slices: int, size: int, runs: list[str]) -> list[dict]:
    """The runs of ``tree``'s own bench in a child process (its ``node``), as the JSON lines it prints."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, str(tree / "bench" / "bench_pipeline.py"), "--slices", str(slices),
                           "--size", str(size), "--runs", *runs], cwd=tree, env=env, check=True,
                          capture_output=True, text=True)
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"run"')]


def side_by_side(baseline: Path, label: str, args: argparse.Namespace, runs: list[str]) -> None:
    """``runs`` of this tree and of ``baseline``, alternating ``args.repeat`` times; medians and ratios."""
    results: dict[str, list[list[dict]]] = {"this tree": [], "baseline": []}
    for _ in range(args.repeat):
        results["baseline"].append(tree_runs(baseline, args.slices, args.size, runs))
        results["this tree"].append(tree_runs(REPO, args.slices, args.size, runs))
        print(json.dumps({"baseline": results["baseline"][-1], "this tree": results["this tree"][-1]}), flush=True)
    per_run = []
    for i, run in enumerate(runs):
        medians = {}
        for tree, reps in results.items():
            stages = {k: statistics.median(r[i]["stages_s"][k] for r in reps) for k in reps[0][i]["stages_s"]}
            stages["analyse_total"] = statistics.median(r[i]["analyse_total_s"] for r in reps)
            medians[tree] = stages
        ratio = {k: round(v / medians["baseline"][k], 3) for k, v in medians["this tree"].items()
                 if medians["baseline"].get(k)}
        per_run.append({"run": run, "median_s": {t: {k: round(v, 2) for k, v in m.items()} for t, m in medians.items()},
                        "ratio_this_over_baseline": ratio,
                        "percent_involved": {t: reps[-1][i]["percent_involved"] for t, reps in results.items()}})
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                      "machine": f"{platform.node()}, {os.cpu_count()} CPUs, GPU {gpu}, torch {torch.__version__}",
                      "study": f"{args.slices} slices {args.size}x{args.size}", "baseline": label,
                      "repeat": args.repeat, "runs": per_run}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--runs", nargs="+", default=["threshold"], metavar="ENGINE[:DEVICE]")
    ap.add_argument("--engine", help="one run of this engine (same as --runs ENGINE)")
    ap.add_argument("--baseline-rev", help="run side by side with this revision (a temporary git worktree)")
    ap.add_argument("--baseline-tree", type=Path, help="run side by side with this checkout")
    ap.add_argument("--repeat", type=int, default=1, help="alternations of the side-by-side runs")
    args = ap.parse_args()
    runs = [args.engine] if args.engine else args.runs
    if args.baseline_tree:
        side_by_side(args.baseline_tree.resolve(), str(args.baseline_tree), args, runs)
        return
    if args.baseline_rev:
        with tempfile.TemporaryDirectory(prefix="bench-pipeline-baseline-") as tmp:
            tree = Path(tmp) / "tree"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(tree), args.baseline_rev],
                           check=True)
            try:
                side_by_side(tree, args.baseline_rev, args, runs)
            finally:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
        return

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
