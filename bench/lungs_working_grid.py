"""Lung segmentation on the working grid (node/pipeline/workgrid.py) against the same rules on the source grid,
on phantoms with 0.7 mm pixels (512 x 512; the cases of bench/lungs_on_phantom.py, whose coarser pixels keep
the source grid): Dice of both lungs against the truth, consolidation recall, false-positive lung (share of
the true lung volume) and seconds, per method.

    python bench/lungs_working_grid.py [--methods net hu]
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lungs_on_phantom import CASES, metrics  # noqa: E402

from node import phantom as ph  # noqa: E402
from node.pipeline import lungs, workgrid  # noqa: E402

SOURCE_PIXEL_MM = 0.7
SIZE = 512
THIN_SLICES = 60  # the 1.5 mm case: 60 slices keep the run short


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", nargs="+", default=["net", "hu"], choices=["net", "hu"])
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    working_factor = workgrid.working_factor
    grids = {"source": lambda spacing, max_mm=None: 1, "working": working_factor}
    print(f"{time.strftime('%Y-%m-%d')}  python bench/lungs_working_grid.py --methods {' '.join(args.methods)}")
    print("| phantom (0.7 mm pixels) | method | grid | Dice | consolidation recall | false positive % | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name, kw in CASES.items():
        kw = dict(kw, rows=SIZE, cols=SIZE, pixel_spacing=SOURCE_PIXEL_MM)
        if kw["slice_spacing"] < 2.0:
            kw["slices"] = THIN_SLICES
        p = ph.make_phantom(**kw)
        volume = p.as_volume()
        for method in args.methods:
            for grid, factor in grids.items():
                workgrid.working_factor = factor
                try:
                    t0 = time.perf_counter()
                    mask = lungs.segment_lungs(volume, method=method).lungs
                    seconds = time.perf_counter() - t0
                finally:
                    workgrid.working_factor = working_factor
                m = metrics(p, mask)
                print(f"| {name} | {method} | {grid} | {m['dice']:.4f} | {m['recall']:.3f} | {m['fp %']:.2f} "
                      f"| {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
