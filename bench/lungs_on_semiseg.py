"""How much expert-marked infection the HU lung mask contains, on the 48 COVID-SemiSeg test slices.

The node scores infection only inside its lung mask, so infection that the mask leaves out (dense
consolidation against the chest wall, the known limit of an HU lung mask) is lost from every score. The
COVID-SemiSeg test slices are real chest CT with expert infection masks (GGO and consolidation separately):
the share of those pixels inside the lung mask measures that loss on real disease, which neither the phantom
(drawn lesions) nor the NY-SBU slices (no masks) can.

The slices are 8-bit lung-window crops around the lungs, not DICOM, so each one is made into a CT slice
first: the 8-bit values are mapped back to HU through the training images' window (``models.predict``:
centre -400, width 1300; values outside it are clipped, so bone reads as +250 HU), the crop is padded with a
24 mm soft-tissue wall (+30 HU) and air, so that the body and outside-air steps have something to find, and
the pixel size is taken as 0.75 mm (not recorded in the data set; ``--spacing``). Many crops are rotated by
90 degrees; the patient's left-right axis is taken across the gap between the two lungs. The figures are
therefore approximate (the real chest wall and its ribs are cut off in many crops), but the same for every
variant, so they compare the lung methods: the HU steps without dense-disease recovery, step 6 (chest-wall
rays), 6 + 6a (air bronchograms; the HU method) and the lung network (``segment_lungs(method="net")``,
docs/lungs.md); on the training and validation splits, when named in ``--variants``, also candidates that the
node does not run (``CANDIDATES``). Step 6b needs neighbouring slices and does nothing here.

With ``--infection`` it also measures what this costs the node's result: the shipped Inf-Net engine
(``node.pipeline.engines.infnet``, as the node runs it) inside the node's lung mask, against the same engine
with the whole crop as "lung" (close to how the network is evaluated in docs/results.md), both against the
expert infection masks (Dice at the engine's threshold, pooled over all pixels and the per-slice mean). Needs
torch and the shipped weights; a few minutes on a CPU.

    python bench/lungs_on_semiseg.py [--data ../shared/data/covid-semiseg] [--spacing 0.75] [--png DIR]
    python bench/lungs_on_semiseg.py --infection
    python bench/lungs_on_semiseg.py --why --split train   (where the left-out consolidation goes)
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterator
from typing import NamedTuple
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training.paths import data_root  # noqa: E402  ($CTNODE_DATA, else ../shared/data)
from training.semiseg_ct import AXIAL, ROTATED, as_ct, volume_of  # noqa: E402


def ct_slice(image8: np.ndarray, spacing: float, method: str = "hu"):
    """(volume, lungs of ``method``, pad in pixels) of one 8-bit crop; the volume's orientation has patient x
    across the gap between the two lungs (found with the HU method)."""
    from node.pipeline.lungs import segment_lungs

    hu, pad = as_ct(image8, spacing)
    volume = volume_of(hu, AXIAL, spacing)
    lungs = segment_lungs(volume, method="hu")
    if lungs_across_rows(lungs.lungs[0]):
        volume = volume_of(hu, ROTATED, spacing)
        lungs = segment_lungs(volume, method="hu")
    if method != "hu":
        lungs = segment_lungs(volume, method=method)
    return volume, lungs, pad


def lungs_across_rows(mask: np.ndarray) -> bool:
    """True when the two lungs lie above and below each other (fewer lung pixels in the middle rows
    than in the middle columns)."""
    h, w = mask.shape
    return mask[int(0.45 * h):int(0.55 * h)].mean() < mask[:, int(0.45 * w):int(0.55 * w)].mean()


def labelled_slices(data: Path, split: str) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(name, 8-bit image, GGO mask, consolidation mask) of each slice of ``split``: "test" (the 48 test
    slices, GGO and consolidation in GT-1 and GT-2; the figures reported), "train" (the 50 multi-class
    training slices, one label image: 1 GGO, 2 consolidation; where lung rules are worked out, so that the
    test slices stay unseen) or "val" (the 10 of those the lung network never trained on)."""
    from PIL import Image

    folder = data / ("TestingSet/MultiClassInfection-Test" if split == "test" else "TrainingSet/MultiClassInfection-Train")
    images = sorted((folder / "Imgs").glob("*.jpg"), key=lambda p: int(p.stem))
    if split == "val":  # the lung network's validation slices (never trained on): where its rules are tuned
        from training.data import labelled_split, load_split

        _, val_idx = labelled_split(load_split("doctor", data))
        images = [images[i] for i in val_idx]
    if not images:
        raise FileNotFoundError(f"no {split} images under {folder}")
    for path in images:
        image8 = np.asarray(Image.open(path).convert("L"))
        if split == "test":
            ggo = np.asarray(Image.open(folder / "GT-1" / f"{path.stem}.png")) > 0
            cons = np.asarray(Image.open(folder / "GT-2" / f"{path.stem}.png")) > 0
        else:
            label = np.asarray(Image.open(folder / "GT" / f"{path.stem}.png"))
            ggo, cons = label == 1, label == 2
        yield path.stem, image8, ggo, cons


class SliceResult(NamedTuple):
    """One slice with expert infection, the last variant (``--method``)."""

    share_inside: float            # of its expert infection
    stem: str
    consolidation: int             # expert consolidation pixels
    consolidation_inside: int
    consolidation_median_hu: float  # through the assumed window; nan without consolidation
    infection: int = 0             # expert infection pixels (GGO or consolidation)
    infection_inside: int = 0


INTERVAL_DRAWS = 2000  # bootstrap draws of slices for the 95 % intervals (seeded: the same interval each run)


def slice_intervals(per_slice: list[SliceResult], draws: int = INTERVAL_DRAWS,
                    seed: int = 0) -> tuple[tuple[float, float], tuple[float, float]]:
    """95 % percentile-bootstrap intervals of the pooled share of expert infection and of consolidation inside
    the lung mask, slices drawn with replacement (the slice is the unit: pixels of one slice are not
    independent). Returns ((low, high) for infection, (low, high) for consolidation)."""
    counts = np.array([(r.infection_inside, r.infection, r.consolidation_inside, r.consolidation)
                       for r in per_slice], float)
    rng = np.random.default_rng(seed)
    drawn = counts[rng.integers(0, len(counts), size=(draws, len(counts)))].sum(axis=1)
    infection = drawn[:, 0] / np.maximum(drawn[:, 1], 1)
    consolidation = drawn[:, 2] / np.maximum(drawn[:, 3], 1)
    return (tuple(np.percentile(infection, [2.5, 97.5])),       # type: ignore[return-value]
            tuple(np.percentile(consolidation, [2.5, 97.5])))


# method of node.pipeline.lungs.segment_lungs and the HU steps switched off
VARIANTS = {"no recovery": ("aerated", ()), "step 6": ("hu", ("6a",)), "HU: 6 + 6a": ("hu", ()),
            "network, no chest-wall limit": ("net", ("wall",)), "lung network": ("net", ())}
CANDIDATES = ("network, no chest-wall limit",)  # not what the node runs: only when named, never on the test split
DEFAULT_VARIANTS = tuple(v for v in VARIANTS if v not in CANDIDATES)


def measure(data: Path, spacing: float = 0.75, variants: tuple[str, ...] = DEFAULT_VARIANTS,
            png: Path | None = None, split: str = "test") -> tuple[dict[str, np.ndarray], np.ndarray, list[SliceResult]]:
    """Segment the lungs of every slice of ``split`` with each variant of ``VARIANTS``.

    Returns, per variant, the expert pixels inside the lung mask (infection, GGO, consolidation) and, against
    the first variant, the pixels it adds and how many of those are expert infection; the expert pixels in
    all; and a :class:`SliceResult` per slice with infection for the last variant;
    ``png``: overlays of the last variant.
    """
    from bench.lung_variants import steps_off
    from node.pipeline.lungs import segment_lungs

    inside = {v: np.zeros(5) for v in variants}
    truth = np.zeros(3)
    per_slice: list[SliceResult] = []
    for stem, image8, ggo, cons in labelled_slices(data, split):
        classes = (ggo | cons, ggo, cons)
        truth += [m.sum() for m in classes]
        volume, _, pad = ct_slice(image8, spacing)
        first = None
        for name in variants:
            method, off = VARIANTS[name]
            with steps_off(*off):
                mask = segment_lungs(volume, method=method).lungs[0]
            mask = mask[pad:-pad, pad:-pad]
            first = mask if first is None else first
            added = mask & ~first
            inside[name] += [*((m & mask).sum() for m in classes), added.sum(), (added & classes[0]).sum()]
        if classes[0].any():
            hu = volume.hu[0][pad:-pad, pad:-pad]
            per_slice.append(SliceResult((classes[0] & mask).sum() / classes[0].sum(), stem, int(cons.sum()),
                                         int((cons & mask).sum()),
                                         float(np.median(hu[cons])) if cons.any() else float("nan"),
                                         int(classes[0].sum()), int((classes[0] & mask).sum())))
        if png:
            overlay(image8, mask, first, classes[0], png / f"{stem}.png")
    return inside, truth, per_slice


def infection_dice(data: Path, spacing: float = 0.75, split: str = "test", method: str = "hu") -> tuple[dict[str, tuple[float, float]], np.ndarray]:
    """{"inside the node's lung mask" | "whole crop": (pooled Dice, per-slice mean Dice)} of the shipped
    Inf-Net engine against the expert infection masks of the test slices; and per slice (share of the lung
    that :func:`node.pipeline.lungs.dense_infection_outside` finds, share of the lung that the expert
    infection outside the lung mask amounts to), the two sides of the node's under-segmentation note."""
    from node.pipeline.engines.infnet import InfNetEngine
    from node.pipeline.lungs.notes import dense_infection_outside
    from node.pipeline.types import LungMasks

    engine = InfNetEngine(device="cpu")
    counts = {name: np.zeros(3) for name in ("inside the node's lung mask", "whole crop")}
    per_slice: dict[str, list[float]] = {name: [] for name in counts}
    flagged: list[tuple[float, float]] = []
    for _, image8, ggo, cons in labelled_slices(data, split):
        truth = ggo | cons
        volume, lungs, pad = ct_slice(image8, spacing, method)
        whole = np.zeros(volume.shape, np.uint8)
        whole[0, pad:-pad, pad:-pad] = LungMasks.RIGHT
        for name, mask in (("inside the node's lung mask", lungs), ("whole crop", LungMasks(labels=whole))):
            result = engine.segment(volume, mask)
            if mask is lungs:
                lung = lungs.lungs[0]
                outside = dense_infection_outside(lungs.labels, volume.hu, result.probability, volume.pixel_spacing)
                flagged.append((outside.sum() / lung.sum(),
                                (truth & ~lung[pad:-pad, pad:-pad]).sum() / lung.sum()))
            found = result.infection[0][pad:-pad, pad:-pad]
            tp, fp, fn = (found & truth).sum(), (found & ~truth).sum(), (~found & truth).sum()
            counts[name] += (tp, fp, fn)
            per_slice[name].append(1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
    return ({name: (2 * c[0] / (2 * c[0] + c[1] + c[2]), float(np.mean(per_slice[name])))
             for name, c in counts.items()}, np.array(flagged))


MISS_CAUSES = ("the network gives it less than NET_LUNG_PROBABILITY",
               "network lung, but beyond the chest-wall limit (within_chest_wall)",
               "network lung, but air (below AIR_HU: an air pocket the HU steps did not take)",
               "network lung of soft-tissue density, in a rim thinner than step 6n's opening (RIM_MM)",
               "network lung within the wall, dropped later (opening, not touching the lung, side, smoothing)")


def why_missed(data: Path, spacing: float = 0.75, split: str = "train") -> tuple[int, np.ndarray]:
    """Expert consolidation that the "net" lung mask leaves out, by cause (``MISS_CAUSES``): the network's
    probability, the HU it saw and the chest-wall limit of step 6n as ``segment_lungs`` computed them (recorded by
    wrapping the two functions). Returns the expert consolidation pixels and the missed pixels per cause."""
    from node.pipeline import lungs as lungs_mod
    from node.pipeline import workgrid
    from node.pipeline.lungs import net as net_step
    from node.pipeline.lungs.density import AIR_HU

    seen: dict[str, np.ndarray] = {}
    probability, chest_wall, cropped = net_step.lung_probability, net_step.within_chest_wall, lungs_mod.cropped

    def recorded_probability(hu, device="cpu"):
        seen["probability"], seen["hu"] = probability(hu, device), hu
        return seen["probability"]

    def recorded_box(volume, rows, cols):
        seen["box"] = (rows, cols)
        return cropped(volume, rows, cols)

    def recorded_chest_wall(cand, *args, **kwargs):
        seen["candidate"], seen["kept"] = cand, chest_wall(cand, *args, **kwargs)
        return seen["kept"]

    total, causes = 0, np.zeros(len(MISS_CAUSES), np.int64)
    net_step.lung_probability, net_step.within_chest_wall = recorded_probability, recorded_chest_wall
    lungs_mod.cropped = recorded_box
    try:
        for _, image8, _, cons in labelled_slices(data, split):
            if not cons.any():
                continue
            volume, _, pad = ct_slice(image8, spacing)
            seen.clear()
            mask = lungs_mod.segment_lungs(volume, method="net").lungs
            # net_refine's box, on the working grid (node/pipeline/workgrid.py); its maps brought to the source
            f = workgrid.working_factor(volume.pixel_spacing)
            rows, cols = (slice(s.start * f, s.stop * f) for s in seen["box"])
            truth = np.zeros(workgrid.padded(volume.hu, f).shape, bool)
            truth[0, pad:pad + cons.shape[0], pad:pad + cons.shape[1]] = cons
            missed = (truth[:, :mask.shape[1], :mask.shape[2]] & ~mask)[:, rows, cols]

            def source(a: np.ndarray) -> np.ndarray:
                return workgrid.upsampled(a, (a.shape[0], a.shape[1] * f, a.shape[2] * f), f)[:, :missed.shape[1],
                                                                                            :missed.shape[2]]

            lung = source(seen["probability"] >= net_step.NET_LUNG_PROBABILITY)
            candidate = source(seen["candidate"]) if "candidate" in seen else np.zeros_like(lung)
            kept = source(seen["kept"]) if "kept" in seen else np.zeros_like(lung)
            missed = missed[:, :lung.shape[1], :lung.shape[2]]
            beyond = missed & lung & candidate & ~kept
            not_candidate = missed & lung & ~candidate
            air = source(seen["hu"] < AIR_HU)[:, :lung.shape[1], :lung.shape[2]]
            causes += [(missed & ~lung).sum(), beyond.sum(), (not_candidate & air).sum(), (not_candidate & ~air).sum(),
                       (missed & lung & candidate & ~beyond).sum()]
            total += int(cons.sum())
    finally:
        net_step.lung_probability, net_step.within_chest_wall = probability, chest_wall
        lungs_mod.cropped = cropped
    return total, causes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=data_root() / "covid-semiseg")
    ap.add_argument("--spacing", type=float, default=0.75, help="assumed pixel size (mm)")
    ap.add_argument("--split", choices=("test", "train", "val"), default="test",
                    help="test: the 48 test slices (the reported figures); train: the 50 multi-class training "
                    "slices; val: the 10 of them the lung network validates on (training.data.labelled_split), "
                    "where the network's thresholds are chosen")
    ap.add_argument("--png", type=Path, help="write one overlay per slice (--method) here")
    ap.add_argument("--method", choices=("hu", "net"), default="net",
                    help="the lung method of the per-slice lines and of --infection (default: net)")
    ap.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), help="only these (default: all but the candidates "
                    f"{', '.join(CANDIDATES)})")
    ap.add_argument("--infection", action="store_true",
                    help="also the Inf-Net engine's Dice inside the node's lung mask and on the whole crop")
    ap.add_argument("--why", action="store_true",
                    help="only: the expert consolidation the net lung mask leaves out, by cause")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    if args.why:
        total, causes = why_missed(args.data, args.spacing, args.split)
        print(f"{time.strftime('%Y-%m-%d')}  python bench/lungs_on_semiseg.py --why --split {args.split}: "
              f"expert consolidation {total} pixels, left out by the net lung mask {causes.sum() / total:.3f}")
        print("| cause | share of the expert consolidation |\n|---|---|")
        for cause, n in zip(MISS_CAUSES, causes):
            print(f"| {cause} | {n / total:.3f} |")
        return
    last = "lung network" if args.method == "net" else "HU: 6 + 6a"
    variants = tuple(v for v in (args.variants or DEFAULT_VARIANTS) if v != last) + (last,)
    if args.split == "test" and set(variants) & set(CANDIDATES):
        ap.error("the test split is measured for what the node runs, not for candidates (docs/protocol.md)")
    inside, truth, per_slice = measure(args.data, args.spacing, variants, png=args.png, split=args.split)
    print(f"{time.strftime('%Y-%m-%d')}  python bench/lungs_on_semiseg.py --spacing {args.spacing:g}  "
          f"--split {args.split}  ({len(per_slice)} slices with infection; {int(truth[0])} infection pixels, "
          f"{int(truth[2])} of them consolidation)")
    print("| lung steps | share of expert infection inside the lung mask | GGO | consolidation "
          "| pixels added to the lung mask | of which expert infection |")
    print("|---|---|---|---|---|---|")
    for name, pixels in inside.items():
        share = pixels[:3] / np.maximum(truth, 1)
        added = f"{int(pixels[3])} | {pixels[4] / pixels[3]:.2f}" if pixels[3] else "- | -"
        print(f"| {name} | {share[0]:.3f} | {share[1]:.3f} | {share[2]:.3f} | {added} |")
    (inf_lo, inf_hi), (cons_lo, cons_hi) = slice_intervals(per_slice)
    print(f"95 % interval, slices resampled ({INTERVAL_DRAWS} draws; {last}): infection {inf_lo:.3f}-{inf_hi:.3f}, "
          f"consolidation {cons_lo:.3f}-{cons_hi:.3f}")
    per_slice.sort()
    print(f"slices with the least infection inside ({last}): "
          + ", ".join(f"{r.stem} ({r.share_inside:.2f})" for r in per_slice[:5]))
    # Consolidation that reads denser than DENSE_HU allows through the assumed window (another display
    # window, or contrast) is out of reach of the density range by construction of this bench's HU.
    from node.pipeline.lungs.density import DENSE_HU

    for label, pick in ((f"<= {DENSE_HU[1]:g} HU", lambda r: r.consolidation_median_hu <= DENSE_HU[1]),
                        (f"> {DENSE_HU[1]:g} HU", lambda r: r.consolidation_median_hu > DENSE_HU[1])):
        rows = [r for r in per_slice if r.consolidation and pick(r)]
        total = sum(r.consolidation for r in rows)
        print(f"slices whose expert consolidation reads at a median {label}: {len(rows)}, "
              f"{total} consolidation pixels, {sum(r.consolidation_inside for r in rows) / max(total, 1):.3f} "
              f"inside the lung mask ({last})")
    if args.infection:
        print("| Inf-Net engine (shipped weights, flip TTA) | infection Dice, pooled | per-slice mean |")
        print("|---|---|---|")
        dice, flagged = infection_dice(args.data, args.spacing, args.split, args.method)
        for name, (pooled, mean) in dice.items():
            print(f"| {name} | {pooled:.3f} | {mean:.3f} |")
        from node.pipeline.lungs.notes import MISSED_DENSE_SHARE as share

        noted, missed = flagged[:, 0] >= share, flagged[:, 1] >= share
        print(f"under-segmentation note (>= {100 * share:g} % of the lung): on {noted.sum()} slices, of which "
              f"{(noted & missed).sum()} where the lung mask leaves out expert infection of >= {100 * share:g} % "
              f"of the lung ({missed.sum()} such slices); correlation of the two shares over the "
              f"{len(flagged)} slices {np.corrcoef(flagged[:, 0], flagged[:, 1])[0, 1]:.2f}")


def overlay(image8: np.ndarray, mask: np.ndarray, first: np.ndarray, infection: np.ndarray, path: Path) -> None:
    """Lung outline in green, expert infection outside the lung mask in red; what the recovery steps added
    (``mask`` against ``first``) in yellow where it is expert infection, in blue where it is not."""
    from PIL import Image
    from scipy import ndimage as ndi

    rgb = np.repeat(image8[..., None].astype(np.float32), 3, axis=2)
    missed = infection & ~mask
    rgb[missed] = 0.5 * rgb[missed] + 0.5 * np.array([255.0, 0.0, 0.0])
    added = mask & ~first
    for where, colour in ((added & infection, (255.0, 255.0, 0.0)), (added & ~infection, (0.0, 128.0, 255.0))):
        rgb[where] = 0.5 * rgb[where] + 0.5 * np.array(colour)
    rgb[mask & ~ndi.binary_erosion(mask)] = (0, 255, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb.astype(np.uint8)).save(path)


if __name__ == "__main__":
    main()
