"""What the lung mask's notes say: coverage, amounts, and dense tissue outside the mask that the infection
engine reads as infection."""
from __future__ import annotations

import numpy as np

from .. import morphology
from ..types import LungMasks, Volume
from .body import superior_is_high_k
from .density import RIM_MM, dense_tissue
from .shapes import disk, touching_lung

MISSED_DENSE_SHARE = 0.05       # missed_dense_note: report from this share of the lung (the first band of the
                                # zone score: less would not move a zone score by more than one band)


def dense_infection_outside(labels: np.ndarray, hu: np.ndarray, probability: np.ndarray,
                            spacing_rc: tuple[float, float], threshold: float = 0.5) -> np.ndarray:
    """Dense tissue touching the lungs that an engine's infection map calls infection, outside the lung mask.

    Per slice: pixels outside the mask, of :func:`dense_tissue` density, where ``probability`` >=
    ``threshold``, after the rim opening of step 6, in pieces that touch a lung (8-connected). This is not
    taken into the lungs: on whole-chest slices the same map also marks chest wall, hilum and pericardium
    (bench/lungs_on_semiseg.py, README), so it only measures how much dense disease the mask may have missed.
    """
    out = np.zeros(labels.shape, bool)
    rim = disk(max(RIM_MM, max(spacing_rc)), spacing_rc)[0]
    for k in np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1)):
        lung = labels[k] > 0
        cand = (probability[k] >= threshold) & ~lung
        if not cand.any():  # most slices: the map marks nothing outside the lung
            continue
        cand = morphology.binary_opening(cand & dense_tissue(hu[k], spacing_rc), rim)
        if not cand.any():
            continue
        out[k] = touching_lung(cand, lung)
    return out


def missed_dense_note(volume: Volume, lungs: LungMasks, probability: np.ndarray | None,
                      infection: np.ndarray | None = None, threshold: float = 0.5) -> str | None:
    """A warning when :func:`dense_infection_outside` is at least ``MISSED_DENSE_SHARE`` of the lung.

    On the 48 COVID-SemiSeg test slices (bench/lungs_on_semiseg.py --infection) this share follows the share
    of expert-marked infection that the lung mask leaves out; see the bench for how well. With the engine's
    ``infection`` mask the note also gives the percentage of opacity (PO) the tissue would make if all of it
    were infected lung: what the reader weighs against the SEG overlay.
    """
    lung = lungs.labels > 0
    if probability is None or not lung.any():
        return None
    outside = int(dense_infection_outside(lungs.labels, volume.hu, probability, volume.pixel_spacing,
                                          threshold).sum())
    n_lung = int(lung.sum())
    share = outside / n_lung
    if share < MISSED_DENSE_SHARE:
        return None
    bound = ""
    if infection is not None:
        inside = int((infection & lung).sum())
        po_if_lung = 100 * (inside + outside) / (n_lung + outside)
        bound = (f"; if all of it is infected lung, the percentage of opacity is {po_if_lung:.0f} % instead of "
                 f"{100 * inside / n_lung:.0f} %")
    return (f"possible lung under-segmentation: {amount_text(outside, volume)} of dense tissue touching the lungs "
            f"but outside the lung mask reads as infection to the engine ({100 * share:.0f} % of the lung){bound}; "
            "percentages and scores may be underestimated there (check the SEG overlay)")


def amount_text(voxels: int, volume: Volume) -> str:
    """``voxels`` of ``volume`` for a note: ml for a volume, cm2 for a single slice (no thickness assumed)."""
    area_px = volume.pixel_spacing[0] * volume.pixel_spacing[1]
    if volume.is_volumetric:
        return f"{voxels * area_px * volume.slice_spacing / 1000.0:.0f} ml"
    return f"{voxels * area_px / 100.0:.1f} cm2"


def coverage_note(labels: np.ndarray, volume: Volume) -> str | None:
    """Which end of the lungs is cut off by the scan range, if any (apex and/or base)."""
    first, last = bool(labels[0].any()), bool(labels[-1].any())
    if not (first or last):
        return None
    top, bottom = (last, first) if superior_is_high_k(volume) else (first, last)
    cut = " and ".join(name for name, hit in (("apex", top), ("base", bottom)) if hit)
    return f"lung reaches the first or last slice: {cut} not fully in the field of view"

