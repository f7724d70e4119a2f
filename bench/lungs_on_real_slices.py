"""Lung segmentation on the real axial chest slices: the HU method against the lung network.

No masks exist for these slices (a check by eye, not an accuracy figure): per slice, the lung area of
``segment_lungs(method="hu")`` and of ``method="net"``, what the network adds and leaves out against the HU
method (share of the HU lung, mean HU), and with ``--png DIR`` one image per slice (lung window; the outline
of the network's lung in green, what it adds to the HU lung in magenta, HU lung it leaves out in cyan) to
look at. Slices where neither method finds lung (abdomen) are listed with zero areas.

The last column is the network alone: the area it gives at least ``NET_LUNG_PROBABILITY`` that is denser than
aerated lung (above -320 HU) and lies outside the HU method's aerated lung. On these slices that is
consolidation and atelectasis where there is disease, and anything else is tissue the network mistakes for lung
(chest wall, mediastinal fat, axilla): the rules of step 6n must then keep it out. ``--net-png DIR`` draws it
(magenta, with the aerated lung's outline in green).

    python bench/lungs_on_real_slices.py [--data ../shared/data/dicom] [--png docs/lungs-overlays] [--net-png DIR]
                                         [--no-chest-wall-limit]
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


def overlay(hu: np.ndarray, hu_mask: np.ndarray, net_mask: np.ndarray, path: Path) -> None:
    from PIL import Image
    from scipy import ndimage as ndi

    grey = np.clip((hu + 1350.0) / 1500.0, 0.0, 1.0) * 255
    rgb = np.repeat(grey[..., None], 3, axis=2)
    for where, colour in ((net_mask & ~hu_mask, (255, 0, 255)), (hu_mask & ~net_mask, (0, 255, 255))):
        rgb[where] = 0.5 * rgb[where] + 0.5 * np.array(colour)
    rgb[net_mask & ~ndi.binary_erosion(net_mask)] = (0, 255, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb.astype(np.uint8)).save(path)


def network_dense(volume) -> np.ndarray:
    """The lung network's lung above -320 HU in the body box of a one-slice ``volume`` (source grid)."""
    from node.pipeline.lungs.body import body_box, body_mask
    from node.pipeline.lungs.net import NET_LUNG_PROBABILITY, lung_probability

    hu = volume.hu.astype(np.float32)
    rows, cols = body_box(body_mask(hu, volume.pixel_spacing))
    prob = np.zeros(hu.shape, np.float32)
    prob[:, rows, cols] = lung_probability(hu[:, rows, cols])
    return (prob[0] >= NET_LUNG_PROBABILITY) & (hu[0] > -320.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=SHARED_DATA / "dicom")
    ap.add_argument("--png", type=Path, help="write one overlay PNG per slice here")
    ap.add_argument("--net-png", type=Path, help="write one PNG per slice of the network's dense lung here")
    ap.add_argument("--no-chest-wall-limit", action="store_true",
                    help="the net method without step 6n's chest-wall limit (a candidate, docs/protocol.md)")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    from bench.lung_variants import steps_off
    from node.pipeline.lungs import segment_lungs
    from node.pipeline.volume import assemble_volume

    flag = " --no-chest-wall-limit" if args.no_chest_wall_limit else ""
    print(f"{time.strftime('%Y-%m-%d')}  python bench/lungs_on_real_slices.py{flag}")
    print("| slice | lung cm2, HU method | lung network | added % | mean HU added | left out % | mean HU left out "
          "| network alone: dense lung outside the aerated lung, cm2 |")
    print("|---|---|---|---|---|---|---|---|")
    paths = sorted(args.data.glob("ny-sbu/*/axial/*.dcm")) + sorted(args.data.glob("lungmask-slices/*.dcm"))
    for path in paths:
        volume = assemble_volume([path])
        hu_mask = segment_lungs(volume, method="hu").lungs[0]
        with steps_off(*(("wall",) if args.no_chest_wall_limit else ())):
            net_mask = segment_lungs(volume, method="net").lungs[0]
        px_cm2 = volume.pixel_spacing[0] * volume.pixel_spacing[1] / 100.0
        added, left_out = net_mask & ~hu_mask, hu_mask & ~net_mask
        mean = lambda m: f"{volume.hu[0][m].mean():.0f}" if m.any() else "-"  # noqa: E731
        share = lambda m: f"{100.0 * m.sum() / hu_mask.sum():.1f}" if hu_mask.any() else "-"  # noqa: E731
        name = path.relative_to(args.data).as_posix()
        aerated = segment_lungs(volume, method="aerated").lungs[0]
        net_dense = network_dense(volume) & ~aerated
        print(f"| {name} | {hu_mask.sum() * px_cm2:.1f} | {net_mask.sum() * px_cm2:.1f} | {share(added)} | "
              f"{mean(added)} | {share(left_out)} | {mean(left_out)} | {net_dense.sum() * px_cm2:.1f} |")
        if args.net_png:
            overlay(volume.hu[0], aerated, aerated | net_dense, args.net_png / (name.replace("/", "_") + ".png"))
        if args.png:
            overlay(volume.hu[0], hu_mask, net_mask, args.png / (name.replace("/", "_") + ".png"))


if __name__ == "__main__":
    main()
