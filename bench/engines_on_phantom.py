"""Infection engines against the phantom's ground truth: Dice and involvement found vs true, side by side.

    python bench/engines_on_phantom.py [--size 256] [--slices 80] [--seeds 1 2] [--engines threshold infnet]

The phantom's lesions are defined in HU (node/phantom.py), which favours the HU-threshold engine; the
learned engine was trained on 8-bit lung-window slices of real patients. So this is a check of the node's
plumbing and of the default choice, not a measure of either engine on real disease.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--slices", type=int, default=80)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--engines", nargs="+", default=["threshold", "infnet"])
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    from node.phantom import make_phantom, write_phantom_study
    from node.pipeline.run import run_pipeline

    print(f"phantom {args.size}x{args.size}x{args.slices}, {time.strftime('%Y-%m-%d')}")
    print("| seed | engine | Dice vs truth | % of lung found | % true | infection stage s |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            spacing = 1.4 * 256 / args.size
            phantom = make_phantom(rows=args.size, cols=args.size, slices=args.slices, pixel_spacing=spacing,
                                   slice_spacing=320.0 / args.slices, seed=seed)
            files = write_phantom_study(phantom, Path(tmp) / f"s{seed}")
            slice_of = {tuple(np.round(p, 3)): k for k, p in enumerate(phantom.positions)}
            for name in args.engines:
                result = run_pipeline(files, name)
                order = [slice_of[tuple(np.round(p, 3))] for p in result.volume.positions]
                truth = phantom.masks["infection"][order]
                lung = (phantom.masks["right_lung"] | phantom.masks["left_lung"])[order]
                found = result.infection.infection
                dice = 2 * (truth & found).sum() / (truth.sum() + found.sum())
                print(f"| {seed} | {result.engine.name} | {dice:.3f} | {result.scores.percent_involved_total:.1f} | "
                      f"{100 * truth.sum() / lung.sum():.1f} | {result.timings['infection']:.1f} |")


if __name__ == "__main__":
    main()
