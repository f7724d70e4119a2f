"""Step 3: the trachea and main bronchi (removed from the lungs), and the test that tells gas (bowel,
stomach, airway lumen) from aerated lung."""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ..types import Volume
from .body import Midline, superior_is_high_k
from .shapes import fill_holes_per_slice, interior, odd_pixels

AIRWAY_LUMEN_HU = -900.0  # airway lumen is near-pure air; aerated lung is mostly above
GAS_MEDIAN_HU = -900.0  # interior median below this and no vessels inside: bowel/stomach gas or airway
GAS_MAX_HOLE_FRACTION = 0.002
INTERIOR_MM = 3.5       # the interior of an air region (is_gas, slivers): eroded by this square, per slice
TRACHEA_AREA_MM2 = (60.0, 900.0)
TRACHEA_MIDLINE_MM = 25.0
AIRWAY_MAX_EXTENT_MM = 200.0
AIRWAY_BRANCH_MAX_AREA_MM2 = TRACHEA_AREA_MM2[1]  # a branch may be as large as a trachea the tracking starts from


def _trachea_seed(lumen: np.ndarray, midline: Midline, order: list[int], area_px: float) -> tuple[int, np.ndarray] | None:
    """First cranial slice with a round air region of tracheal size near the midline."""
    lo, hi = TRACHEA_AREA_MM2[0] / area_px, TRACHEA_AREA_MM2[1] / area_px
    for k in order[: max(1, len(order) // 3)]:
        lab, n = ndi.label(lumen[k])
        if n == 0:
            continue
        sizes = np.bincount(lab.ravel())
        dsum = np.bincount(lab.ravel(), weights=np.abs(midline.signed(k)).ravel())
        best, best_d = 0, np.inf
        for i in range(1, n + 1):
            if lo <= sizes[i] <= hi:
                d = dsum[i] / sizes[i]
                if d < TRACHEA_MIDLINE_MM and d < best_d:
                    best, best_d = i, d
        if best:
            return k, lab == best
    return None


def find_airways(hu: np.ndarray, air: np.ndarray, midline: Midline, volume: Volume) -> tuple[np.ndarray, list[str]]:
    """Trachea and main bronchi, followed caudally from the trachea with a per-branch leak guard."""
    notes: list[str] = []
    airways = np.zeros_like(air, dtype=bool)
    n = hu.shape[0]
    area_px = volume.pixel_spacing[0] * volume.pixel_spacing[1]
    lumen = air & (hu < AIRWAY_LUMEN_HU)
    order = list(range(n - 1, -1, -1)) if superior_is_high_k(volume) else list(range(n))
    if n == 1:
        return _airways_2d(hu, air, midline, volume.pixel_spacing), notes
    seed = _trachea_seed(lumen, midline, order, area_px)
    if seed is None:
        notes.append("trachea not found on the cranial slices: airways were not removed")
        return airways, notes
    k0, prev = seed
    airways[k0] = prev
    start = order.index(k0)
    step_mm = max(volume.slice_spacing, 1e-3)
    max_steps = int(AIRWAY_MAX_EXTENT_MM / step_mm)
    grow = np.ones((3, 3), dtype=bool)
    slack = 30.0 / area_px
    cap = AIRWAY_BRANCH_MAX_AREA_MM2 / area_px
    for k in order[start + 1: start + 1 + max_steps]:
        lab, nlab = ndi.label(lumen[k])
        if nlab == 0:
            break
        prev_lab, _ = ndi.label(prev)
        prev_sizes = np.bincount(prev_lab.ravel())
        touch = ndi.binary_dilation(prev, grow, iterations=2)
        cur = np.zeros_like(prev)
        for i in np.unique(lab[touch & lumen[k]]):
            if i == 0:
                continue
            comp = lab == i
            size = comp.sum()
            parents = np.unique(prev_lab[ndi.binary_dilation(comp, grow, iterations=2) & prev])
            parent_area = prev_sizes[parents[parents > 0]].sum()
            if size <= cap and size <= 2.0 * parent_area + slack:
                cur |= comp  # else: leak into the lung, this branch ends here
        if not cur.any():
            break
        airways[k] = cur
        prev = cur
    return airways, notes


def _airways_2d(hu: np.ndarray, air: np.ndarray, midline: Midline, spacing_rc: tuple[float, float]) -> np.ndarray:
    """On one slice: small gas-like regions near the midline (trachea or main bronchi cross-sections)."""
    lab, n = ndi.label(air[0])
    out = np.zeros_like(air, dtype=bool)
    hi = TRACHEA_AREA_MM2[1] / (spacing_rc[0] * spacing_rc[1])
    dist = np.abs(midline.signed(0))
    for i, sl in enumerate(ndi.find_objects(lab), start=1):
        comp = lab[sl] == i
        size = int(comp.sum())
        if size > hi or float(dist[sl][comp].mean()) >= 2 * TRACHEA_MIDLINE_MM:
            continue
        if is_gas(hu[0][sl], comp, interior(comp[None], odd_pixels(INTERIOR_MM, spacing_rc))):
            out[0][sl] |= comp
    return out


def is_gas(hu: np.ndarray, comp: np.ndarray, inner: np.ndarray) -> bool:
    """True for a region of near-pure air without vessels: bowel/stomach gas or an airway lumen.

    Aerated lung, even emphysematous, contains vessels that show as holes in its air mask; gas pockets
    and airway lumens do not, and their interior is darker than ``GAS_MEDIAN_HU``. ``comp`` is (k, r, c)
    or (r, c) with ``hu`` the matching crop; ``inner``: its :func:`interior`.
    """
    comp3 = comp if comp.ndim == 3 else comp[None]
    hu3 = hu if hu.ndim == 3 else hu[None]
    inner = inner.reshape(comp3.shape)
    values = hu3[inner] if inner.any() else hu3[comp3]
    if values.size == 0 or float(np.median(values)) >= GAS_MEDIAN_HU:
        return False
    filled = fill_holes_per_slice(comp3)
    holes = filled & ~comp3
    return holes.sum() < GAS_MAX_HOLE_FRACTION * filled.sum()

