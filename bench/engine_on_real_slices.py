"""The Inf-Net engine on the real NY-SBU axial slices (no ground truth: a realism check, not an accuracy figure).

Each axial slice goes through the node's pipeline as a single-slice study (HU lungs, then the engine). Per
slice with lung: the percentage of lung marked as infection, the mean HU inside the marked region and in the
rest of the lung, and the engine's GGO / consolidation split.

    python bench/engine_on_real_slices.py [--data ../shared/data/dicom/ny-sbu] [--engine infnet]
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support import SHARED_DATA  # noqa: E402  ($CTNODE_DATA, else ../shared/data)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=SHARED_DATA / "dicom" / "ny-sbu")
    ap.add_argument("--engine", default="infnet")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    from node.pipeline.run import run_pipeline

    engine = args.engine
    print(f"engine {engine}; slices under {args.data}")
    print("| slice | lung marked % | mean HU marked | mean HU rest of lung | GGO % of marked | consolidation % of marked |")
    print("|---|---|---|---|---|---|")
    marked_all = []
    for path in sorted(args.data.glob("*/axial/*.dcm")):
        result = run_pipeline([path], engine)
        if result.status != "done":
            continue
        lung = result.lungs.lungs
        inf = result.infection.infection & lung
        if not inf.any():
            print(f"| {path.parent.parent.name}/{path.name} | 0.0 | - | {result.volume.hu[lung].mean():.0f} | - | - |")
            marked_all.append(0.0)
            continue
        pct = 100.0 * inf.sum() / lung.sum()
        marked_all.append(pct)
        rest = lung & ~inf
        ggo = result.infection.ggo
        cons = result.infection.consolidation
        split = ("-", "-") if ggo is None else (f"{100.0 * (ggo & inf).sum() / inf.sum():.0f}",
                                               f"{100.0 * (cons & inf).sum() / inf.sum():.0f}")
        print(f"| {path.parent.parent.name}/{path.name} | {pct:.1f} | {result.volume.hu[inf].mean():.0f} | "
              f"{result.volume.hu[rest].mean():.0f} | {split[0]} | {split[1]} |")
    if marked_all:
        print(f"\n{len(marked_all)} slices with lung; lung marked {min(marked_all):.0f}-{max(marked_all):.0f} % "
              f"(median {np.median(marked_all):.0f} %)")


if __name__ == "__main__":
    main()
