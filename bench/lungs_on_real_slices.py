"""Lung segmentation on the real axial chest slices, with the air-bronchogram step (6a) on and off.

No masks exist for these slices (a check by eye, not an accuracy figure): per slice, the lung area without
and with step 6a, what 6a added (share of the lung, mean HU), and with ``--png DIR`` one image per slice
(lung window; the outline without 6a in green, what 6a adds in magenta) to look at.

    python bench/lungs_on_real_slices.py [--data ../shared/data/dicom] [--png /tmp/lungs-6a]
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support import SHARED_DATA  # noqa: E402  ($CTNODE_DATA, else ../shared/data)


def overlay(hu: np.ndarray, before: np.ndarray, after: np.ndarray, path: Path) -> None:
    from PIL import Image
    from scipy import ndimage as ndi

    grey = np.clip((hu + 1350.0) / 1500.0, 0.0, 1.0) * 255
    rgb = np.repeat(grey[..., None], 3, axis=2)
    added = after & ~before
    rgb[added] = 0.5 * rgb[added] + 0.5 * np.array([255, 0, 255])
    rgb[before & ~ndi.binary_erosion(before)] = (0, 255, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb.astype(np.uint8)).save(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=SHARED_DATA / "dicom")
    ap.add_argument("--png", type=Path, help="write one overlay PNG per slice here")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    from node.pipeline import lungs as lungs_mod
    from node.pipeline.volume import assemble_volume

    step_6a = lungs_mod.recover_bronchograms
    off = lambda labels, *a, **k: (labels.copy(), 0)  # noqa: E731
    print(f"{time.strftime('%Y-%m-%d')}  python bench/lungs_on_real_slices.py")
    print("| slice | lung cm2 without 6a | with 6a | added % | mean HU added |")
    print("|---|---|---|---|---|")
    paths = sorted(args.data.glob("ny-sbu/*/axial/*.dcm")) + sorted(args.data.glob("lungmask-slices/*.dcm"))
    for path in paths:
        volume = assemble_volume([path])
        after = lungs_mod.segment_lungs(volume).lungs[0]
        lungs_mod.recover_bronchograms = off
        try:
            before = lungs_mod.segment_lungs(volume).lungs[0]
        finally:
            lungs_mod.recover_bronchograms = step_6a
        if not before.any():
            continue  # abdomen slices
        px_cm2 = volume.pixel_spacing[0] * volume.pixel_spacing[1] / 100.0
        added = after & ~before
        mean_hu = f"{volume.hu[0][added].mean():.0f}" if added.any() else "-"
        name = path.relative_to(args.data).as_posix()
        print(f"| {name} | {before.sum() * px_cm2:.1f} | {after.sum() * px_cm2:.1f} | "
              f"{100.0 * added.sum() / before.sum():.1f} | {mean_hu} |")
        if args.png:
            overlay(volume.hu[0], before, after, args.png / (name.replace("/", "_") + ".png"))


if __name__ == "__main__":
    main()
