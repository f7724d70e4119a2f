"""Lung segmentation against the phantom's true lungs: the HU method with its dense-disease recovery steps on
and off, and the lung network.

For each phantom (diseased ones with lower-lobe consolidation, with and without a dependent pleural
effusion, a healthy one, thin slices) it prints Dice of both lungs, recall of the true consolidation inside
the lung mask, and false-positive lung voxels (share of the true lung volume; "heart": those in the heart and
great vessels, "effusion": those in the effusion), for: no recovery, step 6 only (chest wall rays), 6 + 6a
(air bronchograms), 6 + 6a + 6b (between slices; the HU method) and the lung network (method "net"). The
phantom has no air bronchograms, so step 6a takes nothing here. The phantoms here are not those the network
was trained or validated on (other seeds, sizes and spacings; training/lungnet.py). See node/pipeline/lungs/.
``--dense``: the same phantoms with airless consolidation (node.phantom.DENSE_CONSOLIDATION_HU, about -30..+90
HU: complete consolidation and atelectasis, up to contrast enhancement) instead of partly aerated consolidation.
``--no-chest-wall-limit``: also the lung network without step 6n's chest-wall limit (a candidate,
docs/protocol.md). ``--notes``: then, for the lung network, how much of the consolidation it leaves out lies within
twice the rim opening's radius of the lung mask (a rim the dense-tissue note's opening drops by design), how much
lies where that note looks (node/pipeline/effusion.py: the dependent pocket) and which notes the result carries;
and per side, that rim's volume and share of the lung mask against protocol version 16's bound (a candidate note,
not shipped: ``edge_bound_candidate``).

    python bench/lungs_on_phantom.py [--dense] [--no-chest-wall-limit] [--notes]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node import phantom as ph  # noqa: E402
from bench.lung_variants import steps_off  # noqa: E402
from node.pipeline.lungs import segment_lungs  # noqa: E402
from node.pipeline.lungs.density import RIM_MM  # noqa: E402

CASES = {
    "right lower lobe 80 %, 5 mm": dict(rows=160, cols=160, slices=60, pixel_spacing=2.2, slice_spacing=5.0,
                                        seed=0, burden={"right_lower": 0.8}),
    "left lower 80 % + right upper 50 %, 5 mm": dict(rows=160, cols=160, slices=60, pixel_spacing=2.2,
                                                     slice_spacing=5.0, seed=4,
                                                     burden={"left_lower": 0.8, "right_upper": 0.5}),
    "30 % everywhere, 1.5 mm": dict(rows=112, cols=112, slices=150, pixel_spacing=3.1, slice_spacing=1.5, seed=3,
                                    burden=0.3),
    "both lower lobes 80 % + effusion, 5 mm": dict(rows=160, cols=160, slices=60, pixel_spacing=2.2,
                                                   slice_spacing=5.0, seed=5, effusion=0.15,
                                                   burden={"right_lower": 0.8, "left_lower": 0.8}),
    "healthy + large effusion, 5 mm": dict(rows=160, cols=160, slices=60, pixel_spacing=2.2, slice_spacing=5.0,
                                           seed=6, burden=0.0, effusion=0.25),
    "healthy, 7.5 mm": dict(rows=128, cols=128, slices=40, pixel_spacing=2.75, slice_spacing=7.5, seed=1,
                            burden=0.0),
}


def metrics(p: ph.Phantom, lungs: np.ndarray) -> dict[str, float]:
    truth = p.masks["right_lung"] | p.masks["left_lung"]
    cons = p.masks["consolidation"]
    fp = lungs & ~truth
    heart = np.isin(p.labels, [ph.TISSUES["heart"], ph.TISSUES["blood"]])
    return {"dice": 2 * (lungs & truth).sum() / (lungs.sum() + truth.sum()),
            "recall": (cons & lungs).sum() / max(cons.sum(), 1),
            "fp %": 100 * fp.sum() / truth.sum(), "heart %": 100 * (fp & heart).sum() / truth.sum(),
            "effusion %": 100 * (fp & (p.labels == ph.TISSUES["effusion"])).sum() / truth.sum()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dense", action="store_true", help="airless consolidation (DENSE_CONSOLIDATION_HU)")
    ap.add_argument("--no-chest-wall-limit", action="store_true",
                    help="also the lung network without step 6n's chest-wall limit (within_chest_wall)")
    ap.add_argument("--notes", action="store_true",
                    help="also where the consolidation the lung network leaves out lies against the dense-tissue note")
    args = ap.parse_args()
    cons_hu = ph.DENSE_CONSOLIDATION_HU if args.dense else ph.CONSOLIDATION_HU
    steps = {"no recovery": ("hu", ("6", "6a", "6b")), "step 6": ("hu", ("6a", "6b")),
             "steps 6 + 6a": ("hu", ("6b",)), "HU: 6 + 6a + 6b": ("hu", ()), "lung network": ("net", ())}
    if args.no_chest_wall_limit:
        steps["network, no chest-wall limit"] = ("net", ("wall",))
    flags = (" --dense" if args.dense else "") + (" --no-chest-wall-limit" if args.no_chest_wall_limit else "")
    print(f"{time.strftime('%Y-%m-%d')}  python bench/lungs_on_phantom.py{flags} "
          f"(consolidation {cons_hu[0]:g}..{cons_hu[1]:g} HU)")
    print("| phantom | method | Dice | consolidation recall | false positive % | in the heart % | in the effusion % |")
    print("|---|---|---|---|---|---|---|")
    for name, kw in CASES.items():
        p = ph.make_phantom(**kw, consolidation_hu=cons_hu)
        volume = p.as_volume()
        for label, (method, off) in steps.items():
            with steps_off(*off):
                m = metrics(p, segment_lungs(volume, method=method).lungs)
            print(f"| {name} | {label} | {m['dice']:.4f} | {m['recall']:.3f} | {m['fp %']:.2f} | {m['heart %']:.3f} "
                  f"| {m['effusion %']:.3f} |")
    if args.notes:
        print_notes(cons_hu)


LUNG_MASKS = {1: "right_lung", 2: "left_lung"}  # the phantom's lung of each side label
RIM_OUT_MM = 2 * RIM_MM   # the rim along the lung mask that the rim opening drops (opening radius RIM_MM)
EDGE_BOUND_MM = RIM_OUT_MM  # protocol version 16's candidate (not shipped): its reach outside the mask
EDGE_MIDLINE_MM = 50.0    # ... not within this of the body midline


def edge_bound_candidate(volume, lungs) -> np.ndarray:
    """Protocol version 16's candidate (docs/protocol.md; not shipped: it does not bound what it should): side
    labels of the tissue outside the lung mask within ``EDGE_BOUND_MM`` of where the mask's edge runs through
    dense lung. Per slice: dense lung is the mask's pixels of ``dense_tissue`` density opened by the rim disk;
    its pixels with a 4-neighbour outside the mask start the bound, which holds the tissue within
    ``EDGE_BOUND_MM`` of them outside the mask, in the body, of ``dense_tissue`` density, at least
    ``EDGE_MIDLINE_MM`` from the body midline, labelled by the side of the midline it lies on."""
    from scipy import ndimage as ndi

    from node.pipeline import morphology
    from node.pipeline.lungs.body import midline_offset
    from node.pipeline.lungs.density import dense_tissue
    from node.pipeline.lungs.shapes import disk

    labels, spacing = lungs.labels, volume.pixel_spacing
    out = np.zeros(labels.shape, np.uint8)
    lung = labels > 0
    dense = dense_tissue(volume.hu, spacing)
    dense_lung = morphology.binary_opening(lung & dense, disk(max(RIM_MM, max(spacing)), spacing))
    start = dense_lung & lung & ~morphology.binary_erosion(lung, ndi.generate_binary_structure(2, 1)[None])
    body = lungs.body if lungs.body is not None else np.ones(lung.shape, bool)
    near = morphology.binary_dilation(start, disk(EDGE_BOUND_MM, spacing)) & ~lung & body & dense
    offset = midline_offset(volume, body)
    near &= np.abs(offset) >= EDGE_MIDLINE_MM
    out[near & (offset < 0)] = 1
    out[near & (offset >= 0)] = 2
    return out


def print_notes(cons_hu: tuple[float, float]) -> None:
    """For the lung network on each phantom: the share of the consolidation it leaves out, the shares of that
    within ``RIM_OUT_MM`` of the lung mask (in-plane) and in the dense-tissue note's mask
    (``Effusion.dense_unexplained``), and the sides the note names with its amount and share of that lung."""
    from scipy import ndimage as ndi

    from node.pipeline.effusion import SIDE_NAMES, find_effusion
    from node.pipeline.lungs.notes import MISSED_DENSE_SHARE, amount_text

    print()
    print(f"| phantom | consolidation left out | as % of that side's lung mask, right / left | of it within "
          f"{RIM_OUT_MM:g} mm of the lung mask | of it where the dense-tissue note looks | notes |")
    print("|---|---|---|---|---|---|")
    bounds = []
    for name, kw in CASES.items():
        p = ph.make_phantom(**kw, consolidation_hu=cons_hu)
        volume = p.as_volume()
        lungs = segment_lungs(volume, method="net")
        effusion = find_effusion(volume, lungs)
        cons = p.masks["consolidation"]
        missed = cons & (lungs.labels == 0)
        noted = missed & (effusion.dense_unexplained > 0)
        counts = np.bincount(effusion.dense_unexplained.ravel(), minlength=3)
        lung = np.bincount(lungs.labels.ravel(), minlength=3)
        sides = ", ".join(f"{side_name} ({amount_text(int(counts[side]), volume)}, "
                          f"{100 * counts[side] / lung[side]:.0f} %)"
                          for side, side_name in SIDE_NAMES.items()
                          if any(f"the {side_name} hemithorax" in note for note in effusion.notes)) or "none"
        to_lung = np.stack([ndi.distance_transform_edt(~lung_k, sampling=volume.pixel_spacing)
                            for lung_k in lungs.labels > 0])
        rim = missed & (to_lung <= RIM_OUT_MM)
        missed_of = {side: missed & p.masks[LUNG_MASKS[side]] for side in SIDE_NAMES}
        share = (lambda m: f"{m.sum() / missed.sum():.2f}" if missed.any() else "-")  # noqa: E731
        of_lung = " / ".join(f"{100 * missed_of[side].sum() / max(lung[side], 1):.1f}" for side in SIDE_NAMES)
        left_out = f"{missed.sum() / cons.sum():.3f}" if cons.any() else "-"
        print(f"| {name} | {left_out} | {of_lung} | {share(rim)} | {share(noted)} | {sides} |")
        bound = edge_bound_candidate(volume, lungs)
        row = [name]
        for side in SIDE_NAMES:
            rim_side = int((rim & missed_of[side]).sum())
            row.append(f"{amount_text(rim_side, volume)} ({100 * rim_side / max(lung[side], 1):.1f} %) / "
                       f"{amount_text(int((bound == side).sum()), volume)}")
        row.append(", ".join(side_name for side, side_name in SIDE_NAMES.items()
                             if (bound == side).sum() >= MISSED_DENSE_SHARE * lung[side]) or "none")
        bounds.append(row)
    print()
    print(f"| phantom | right: consolidation left out within {EDGE_BOUND_MM:g} mm of the mask (% of that lung's "
          "mask) / version 16's bound | left: the same | sides whose bound reaches 5 % of the lung |")
    print("|---|---|---|---|")
    for row in bounds:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
