"""Lung segmentation time against an earlier revision, side by side, and whether the masks are the same.

Each run is a child process that segments the lungs of the same diseased phantom (512x512, ``--slices``) with
either this tree's ``node`` or that of ``--baseline-rev`` (a temporary git worktree; ``--baseline-tree DIR``:
a checkout of the baseline, where git is not at hand); the two alternate ``--repeat`` times. Reported: median
seconds and CPU seconds of ``segment_lungs`` for each, their ratios, and the number of voxels whose label
differs between the two (0 for a change meant to keep the masks).

    python bench/lungs_speed.py --baseline-rev HEAD~1 --slices 120 --repeat 4 [--method net]

``--one-process`` keeps the per-slice steps on one thread of the measuring process
(node/pipeline/slicewise.py; a baseline that forked child processes for them forks none), so that the CPU
seconds of the two trees compare the work done, which a loaded machine disturbs less than the time. Without
it, CPU seconds count this process's threads (and not a forking baseline's children). ``--method`` (hu | net)
is passed to this tree's ``segment_lungs`` only (the baseline runs its default), and ``--device`` with it
(where the lung network runs).

``--network`` measures the lung network alone: its arithmetic per slice and the rate it runs at, on one thread
and on all (``python bench/lungs_speed.py --network``).

``--profile`` runs this tree alone, on one thread (per-slice steps and torch), under cProfile, and prints the
functions that took the most time themselves:

    python bench/lungs_speed.py --profile --slices 300 --method net
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.environ.get("CTNODE_BENCH_TREE", str(REPO)))


def child(slices: int, out: Path, method: str | None = None, device: str = "cpu", one_process: bool = False) -> None:
    import numpy as np

    if one_process:
        try:
            from node.pipeline import slicewise
        except ImportError:  # a tree without child processes
            pass
        else:
            slicewise.workers = lambda: 1

    from node import phantom as ph
    from node.pipeline.lungs import segment_lungs

    p = ph.make_phantom(rows=512, cols=512, slices=slices, seed=0, burden={"right_lower": 0.8, "left_upper": 0.3})
    volume = p.as_volume()
    kwargs = {"method": method, "device": device} if method else {}
    # load the lung network before the clock starts, in both trees whatever the method (a worker loads it once; a
    # baseline that runs its default method would otherwise count the loading, about 1.5 s, against itself)
    try:
        from node.pipeline.lungs.net import _lung_net
    except ImportError:  # a tree without the lung network
        pass
    else:
        _lung_net(device)
    t0, c0 = time.perf_counter(), time.process_time()
    labels = segment_lungs(volume, **kwargs).labels
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    np.save(out, labels)
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu}))


def profile(slices: int, method: str | None, device: str, top: int = 15) -> None:
    """This tree's ``segment_lungs`` on one thread under cProfile: its total and the ``top`` functions by the
    time spent in them."""
    import cProfile
    import logging
    import pstats

    import torch

    from node import phantom as ph
    from node.pipeline import slicewise
    from node.pipeline.lungs import segment_lungs
    from node.pipeline.lungs.net import _lung_net

    logging.disable(logging.WARNING)
    slicewise.workers = lambda: 1
    torch.set_num_threads(1)
    volume = ph.make_phantom(rows=512, cols=512, slices=slices, seed=0,
                             burden={"right_lower": 0.8, "left_upper": 0.3}).as_volume()
    kwargs = {"method": method, "device": device} if method else {}
    if method == "net":
        _lung_net(device)
    profiler = cProfile.Profile()
    profiler.runcall(segment_lungs, volume, **kwargs)
    stats = pstats.Stats(profiler)
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  segment_lungs, 512x512x{slices}, one thread: "
          f"{stats.total_tt:.2f} s under the profiler")
    stats.sort_stats("tottime").print_stats(top)


def cpu_capability() -> str:
    """The widest vector instructions torch's CPU kernels use here ("AVX2", "AVX512", ...): the lung network's
    convolutions are bound by arithmetic (about 1.1 GFLOP a slice), so absolute times compare only between
    hosts of the same capability."""
    try:
        import torch
    except ImportError:
        return "torch not installed"
    return torch.backends.cpu.get_cpu_capability()


def network_throughput(device: str, batch: int = 32, repeat: int = 3) -> None:
    """The shipped lung network alone: arithmetic per slice (torch's FLOP counter) and the rate it runs at on
    ``device``, on one thread and on all, for a batch of ``batch`` random inputs of its size."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from node.pipeline.lungs.net import _lung_net

    model, size = _lung_net(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)  # time the work, not its launch
    x = torch.randn(batch, 2, size, size, device=device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            model(x)
        per_slice = counter.get_total_flops() / batch
        rates = {}
        for threads in sorted({1, torch.get_num_threads()}):
            torch.set_num_threads(threads)
            model(x)
            sync()
            t0 = time.perf_counter()
            for _ in range(repeat):
                model(x)
            sync()
            seconds = (time.perf_counter() - t0) / repeat / batch
            rates[f"{threads} thread(s)"] = {"s_per_slice": round(seconds, 4),
                                             "gflop_per_s": round(per_slice / seconds / 1e9, 1)}
    print(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                      "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {cpu_capability()}",
                      "device": device, "input": f"{size}x{size}", "gflop_per_slice": round(per_slice / 1e9, 3),
                      "rates": rates}, indent=2))


def run(tree: Path, slices: int, out: Path, extra: list[str] = ()) -> dict:
    env = dict(os.environ, CTNODE_BENCH_TREE=str(tree))
    done = subprocess.run([sys.executable, __file__, "--child", "--slices", str(slices), "--out", str(out), *extra],
                          env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline-rev", help="the revision to compare with (or --baseline-tree)")
    ap.add_argument("--baseline-tree", type=Path, help="a checkout of the baseline to compare with")
    ap.add_argument("--slices", type=int, default=120)
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--method", choices=("hu", "net"), help="this tree's lung method (default: its default)")
    ap.add_argument("--device", default="cpu", help="where the lung network runs (cpu | cuda)")
    ap.add_argument("--one-process", action="store_true", help="the per-slice steps on one thread (no child processes)")
    ap.add_argument("--profile", action="store_true", help="this tree only, one thread, under cProfile")
    ap.add_argument("--network", action="store_true", help="the lung network alone: GFLOP per slice and its rate")
    args = ap.parse_args()
    if args.network:
        network_throughput(args.device)
        return
    if args.profile:
        profile(args.slices, args.method, args.device)
        return
    if args.child:
        child(args.slices, args.out, args.method, args.device, args.one_process)
        return
    if not (args.baseline_rev or args.baseline_tree):
        ap.error("--baseline-rev or --baseline-tree is required")
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="lungs-speed-") as tmp:
        work = Path(tmp)
        baseline = args.baseline_tree.resolve() if args.baseline_tree else work / "baseline-tree"
        if not args.baseline_tree:
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(baseline),
                            args.baseline_rev], check=True)
        try:
            runs: dict[str, list[dict]] = {"this tree": [], "baseline": []}
            common = ["--one-process"] if args.one_process else []
            for _ in range(args.repeat):
                runs["baseline"].append(run(baseline, args.slices, work / "baseline.npy", common))
                extra = ["--method", args.method, "--device", args.device] if args.method else []
                runs["this tree"].append(run(REPO, args.slices, work / "this.npy", common + extra))
            differing = int((np.load(work / "baseline.npy") != np.load(work / "this.npy")).sum())
        finally:
            if not args.baseline_tree:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(baseline)], check=False)
    medians = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    cpu = {k: statistics.median(r["cpu_seconds"] for r in v) for k, v in runs.items()}
    print(json.dumps({
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {cpu_capability()}",
        "phantom": f"512x512x{args.slices}", "baseline": args.baseline_rev or str(args.baseline_tree),
        "method": args.method or "default", "device": args.device, "one_process": args.one_process,
        "median_s": {k: round(v, 2) for k, v in medians.items()},
        "ratio_this_over_baseline": round(medians["this tree"] / medians["baseline"], 2),
        "median_cpu_s": {k: round(v, 2) for k, v in cpu.items()},
        "cpu_ratio_this_over_baseline": round(cpu["this tree"] / cpu["baseline"], 2),
        "voxels_with_another_label": differing,
        "runs_s": {k: [round(r["seconds"], 2) for r in v] for k, v in runs.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
