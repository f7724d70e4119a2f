"""Lung segmentation: HU thresholds and rules, optionally with a learned lung network (:class:`LungMethod`).

Method "hu" runs every step below; method "aerated" steps 1-5 and 7; method "net" every step and, after 6b,
step 6n (:func:`net_refine`): the lung probability of the network of models/lungnet.py (all slices of the body
box in batches, on the device given) adds dense disease that the rules miss and removes dense tissue that the
rules took but the network does not see as lung (docs/lungs.md). The network runs before step 6, and steps
6-6b skip the dense tissue it gives under ``NET_PREFILTER_PROBABILITY`` (step 6n would return it).

Every step runs on the working grid (:mod:`node.pipeline.workgrid`): blocks of source pixels averaged to
at most ``workgrid.MAX_WORK_PIXEL_MM`` (2 x 2 blocks of 1.4 mm for 0.7 mm pixels; slices are not combined);
the labels then return to the source grid, where source pixels place the outline of aerated lung. Steps:

1. body: largest connected region above -500 HU after a small per-slice opening (drops the table, cables,
   sheets), holes filled slice by slice;
2. air inside the body: below -320 HU inside the filled body; regions that touch the image border (air
   outside the patient) are dropped;
3. airways: the trachea is found on the most cranial slices near the midline and followed caudally
   (lumen below -900 HU) with a leak guard; the trachea and main bronchi are removed;
4. lung components: bowel/stomach gas (near-pure air without vessels), slivers (air in skin folds) and
   components under 5 % of the largest are dropped; every remaining
   component is assigned to the patient's right or left from its position relative to the midline
   (computed from ImageOrientationPatient, so any in-plane orientation works); a component straddling the
   midline (lungs touching at the anterior/posterior junction, or joined through an unremoved airway) is
   split by iterative erosion and nearest-seed assignment, falling back on the midline itself;
5. per lung: the outline is closed slice by slice (radius ``CLOSING_MM``, which also takes back thin dense
   lesions at the pleura), then holes are filled (vessels, enclosed lesions), except large holes that
   open onto non-lung tissue on a neighbouring slice (liver under a diaphragm dome, hilum);
6. dense peripheral recovery: consolidation or effusion against the chest wall is as dense as muscle, so
   the -320 HU threshold leaves a "bite" in the lung outline that the closing of step 5 only takes back
   when it is thin. Per slice, pixels of consolidation/effusion density (``DENSE_HU``, liver excluded)
   are taken into a lung when they lie (a) deeper under the skin than the inner chest wall, whose
   thickness is read from where aerated lung touches it around the body, (b) between that lung and the
   wall: towards the nearest skin there is no lung, away from it there is, and (c) on that lung's side of
   the body midline; thin rims (extrapleural fat, partial volume) are opened away. The heart, mediastinum
   and the liver under a dome fail (b) or the density range. Holes are then filled again, this time also
   large ones open to a neighbouring slice when their median HU is that of a lesion (``LESION_MEDIAN_HU``);
6a. air bronchograms: consolidation that fills the dependent lung over a wide arc leaves no aerated lung
   against the wall to read its thickness from, so step 6 cannot judge it; its air bronchograms mark it as
   lung. Clusters of small air pockets (``POCKET_MAX_MM2``; at least ``POCKET_CLUSTER`` within
   ``POCKET_CLUSTER_MM``) in dense tissue, away from the midline (esophagus, airways) and deep under the
   skin, take the dense tissue within ``POCKET_REACH_MM`` of them, up to the convex hull of the lung and
   its pockets (not into the chest wall beyond the outermost ones), into the lung they touch, where no lung
   lies between it and the skin (so not the hilum, whose bronchi look alike, nor the abdomen inside a
   diaphragm dome, where bowel gas does);
6b. between slices: dense pixels that are lung on both neighbouring slices join that lung (repeated until
   stable): consolidation against the mediastinum or a diaphragm dome, where the chest-wall rays of step 6
   do not apply; the top of the heart or a dome rising into the lung is lung on one neighbour only;
7. one connected component per lung (on a single slice: pieces under 10 % of the largest are dropped).
   ``LungMasks.notes`` say how much was recovered or dropped.

A single slice goes through the same steps in 2D. ``partial_coverage`` is set for one slice, or when lung
reaches the first or last slice; the note then says which end is cut (apex, base or both). It is also set,
with ``fov_cut_cm2`` and a note, when lung reaches the in-plane edge of the image (a field of view narrower
than the chest, :func:`lung_cut_by_fov`): series selection skips such a series.

Speed: the steps that work slice by slice (the body opening and hole filling, the closings of step 5, steps
6, 6a and 6n's chest-wall limit) run on all CPUs on worker threads (:mod:`node.pipeline.slicewise`), with the
result of one loop; docs/performance.md gives the times.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import logging
from collections.abc import Callable

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import Delaunay, cKDTree

from . import morphology, workgrid
from .slicewise import by_slabs, map_slices
from .types import LungMasks, Volume

log = logging.getLogger(__name__)

BODY_HU = -500.0        # soft tissue vs air/fat-free boundary used for the body outline
AIR_HU = -320.0         # lung parenchyma (with mild disease) vs soft tissue, as in classic lung thresholding
AIRWAY_LUMEN_HU = -900.0  # airway lumen is near-pure air; aerated lung is mostly above
GAS_MEDIAN_HU = -900.0  # interior median below this and no vessels inside: bowel/stomach gas or airway
GAS_MAX_HOLE_FRACTION = 0.002
INTERIOR_MM = 3.5       # the interior of an air region (is_gas, slivers): eroded by this square, per slice
BODY_OPENING_MM = 2.0
CLOSING_MM = 10.0
OPEN_HOLE_MAX_MM2 = 150.0   # larger per-slice holes that open onto non-lung tissue are organs, not lesions
MIN_COMPONENT_FRACTION = 0.05   # of the largest air component
MIN_COMPONENT_AREA_MM2 = 100.0  # per slice spanned (drops specks)
TRACHEA_AREA_MM2 = (60.0, 900.0)
TRACHEA_MIDLINE_MM = 25.0
AIRWAY_MAX_EXTENT_MM = 200.0
AIRWAY_BRANCH_MAX_AREA_MM2 = TRACHEA_AREA_MM2[1]  # a branch may be as large as a trachea the tracking starts from
STRADDLE_FRACTION = 0.15        # a component with this much on each side of the midline is split
MAX_SPLIT_EROSIONS = 15
DENSE_HU = (-320.0, 45.0)       # consolidation / effusion after a 3x3 mean; liver (>= 50 HU unenhanced) stays out
DENSE_SMOOTH_MM = 2.2    # side of the in-plane mean filter of dense_tissue and rib_mask (noise down)
LESION_MEDIAN_HU = (-60.0, 30.0)  # median of a large enclosed hole that is a lesion, not an organ or hilar fat
WALL_BINS = 180                 # directions (2 degrees) of the chest-wall thickness profile
WALL_WINDOW_BINS = 15           # 30 degrees: a pleural lesion narrower than this does not thicken the wall
WALL_TOLERANCE_MM = 2.0
WALL_RAY_MM = 50.0              # how far the rays of between_lung_and_wall look for lung
RAY_COMPACT_SHARE = 8           # ray_hits stops sampling rays that met lung when they are 1/8 of those left
POCKET_MAX_MM2 = 100.0          # air bronchogram cross-sections; lobar bronchi and bowel loops are larger
POCKET_CLUSTER = 3              # pockets (itself included) within POCKET_CLUSTER_MM for a pocket to count:
POCKET_CLUSTER_MM = 15.0        #   consolidation shows several bronchograms, a hilum one or two bronchi
POCKET_REACH_MM = 10.0          # dense tissue this close to a counted pocket is taken
POCKET_MIDLINE_MM = 25.0        # pockets nearer the body midline (esophagus, airways) do not count
POCKET_DEPTH_MM = 20.0          # nor pockets shallower under the skin (air in the chest wall)
PERIPHERAL_RAY_MM = 80.0        # step 6a: no lung may lie this far towards the skin from a taken pixel
MIN_2D_PIECE_FRACTION = 0.1     # on one slice, lung pieces smaller than this share of the largest are dropped
RIM_MM = 2.5                    # opening radius (at least one pixel): drops rims of extrapleural fat and
                                # partial volume thinner than about twice this
BOX_MARGIN_PX = 8               # segment_lungs works in the body's bounding box widened by this (air around it)
FOV_LUNG_MEDIAN_HU = -900.0     # lung_cut_by_fov: air outside the body outline with a median above this is lung
                                # (aerated lung about -850 HU, room air -1000; not nearer -1000: a pocket of air
                                # and fabric between arm and chest read -943; a cut emphysematous lung may go unseen)
FOV_LUNG_MIN_CM2 = 1.0          # ... in a region of at least this area (specks at the skin are under 0.2 cm2)
FOV_LUNG_WALLED = 0.65          # ... with at least this share of its outline, beyond the cut, against the body
                                # (foam pads under the patient on the shared real slices: 0.58 at most)
RIB_HU = 200.0                  # bone (cortex and marrow of the ribs) after the dense-tissue mean filter
RIB_MIDLINE_MM = 30.0           # bone nearer the body midline is sternum or spine, not rib
RIB_WINDOW_BINS = 9             # 18 degrees: an intercostal space takes the depth of the ribs beside it
RIB_MARGIN_MM = 3.0             # innermost intercostal muscle, endothoracic fascia and pleura under a rib
MISSED_DENSE_SHARE = 0.05       # missed_dense_note: report from this share of the lung (the first band of the
                                # zone score: less would not move a zone score by more than one band)


# --------------------------------------------------------------------------------------------- helpers


def disk(radius_mm: float, spacing_rc: tuple[float, float]) -> np.ndarray:
    """2D elliptical structuring element of ``radius_mm`` on a grid of (row, column) spacing, shape (1, h, w)."""
    rr = max(int(np.floor(radius_mm / spacing_rc[0])), 0)
    rc = max(int(np.floor(radius_mm / spacing_rc[1])), 0)
    y, x = np.ogrid[-rr:rr + 1, -rc:rc + 1]
    fy = (y * spacing_rc[0]) ** 2
    fx = (x * spacing_rc[1]) ** 2
    return ((fy + fx) <= radius_mm ** 2 + 1e-9)[None]


def ball(radius_mm: float, spacing_krc: tuple[float, float, float]) -> np.ndarray:
    """3D ellipsoidal structuring element of ``radius_mm`` on an anisotropic grid (k, r, c)."""
    half = [max(int(np.floor(radius_mm / s)), 0) if s > 0 else 0 for s in spacing_krc]
    k, y, x = np.ogrid[-half[0]:half[0] + 1, -half[1]:half[1] + 1, -half[2]:half[2] + 1]
    d2 = (k * spacing_krc[0]) ** 2 + (y * spacing_krc[1]) ** 2 + (x * spacing_krc[2]) ** 2
    return d2 <= radius_mm ** 2 + 1e-9


def odd_pixels(mm: float, spacing_rc: tuple[float, float]) -> int:
    """The odd number of pixels (at least 1) nearest to ``mm`` along the coarser in-plane axis: the side of a
    square filter centred on a pixel."""
    return max(1, 2 * int(round((mm / max(spacing_rc) - 1) / 2)) + 1)


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """Holes of a (k, r, c) mask filled slice by slice (as ``ndi.binary_fill_holes`` of each slice): the
    background is labelled in one call with in-plane connectivity, and its regions that do not reach the
    slice's edge are holes."""
    cross = np.zeros((3, 3, 3), bool)
    cross[1] = ndi.generate_binary_structure(2, 1)
    lab, n = ndi.label(~mask, structure=cross)
    outside = np.zeros(n + 1, bool)
    for edge in (lab[:, 0, :], lab[:, -1, :], lab[:, :, 0], lab[:, :, -1]):
        outside[edge] = True
    outside[0] = False  # label 0: the mask itself
    return mask | ~outside[lab]


def largest_component(mask: np.ndarray, structure: np.ndarray | None = None) -> np.ndarray:
    lab, n = ndi.label(mask, structure=structure)
    if n == 0:
        return np.zeros_like(mask, dtype=bool)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def largest_per_slice(mask: np.ndarray) -> np.ndarray:
    """The largest in-plane connected region (4-connected, as :func:`largest_component` of a 2D slice) of
    every slice of a (k, r, c) mask, labelled in one call; ties go to the first label, as there."""
    cross = np.zeros((3, 3, 3), bool)
    cross[1] = ndi.generate_binary_structure(2, 1)
    lab, n = ndi.label(mask, structure=cross)
    if n == 0:
        return np.zeros(mask.shape, bool)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    # labels grow slice by slice (raster order) and none spans two slices: a label's slice is the first
    # whose highest label reaches it
    highest = np.maximum.accumulate(lab.reshape(lab.shape[0], -1).max(axis=1))
    first_k = np.searchsorted(highest, np.arange(1, n + 1))
    order = np.lexsort((np.arange(n), -sizes, first_k))  # per slice: largest first, then lowest label
    best = order[np.r_[True, first_k[order][1:] != first_k[order][:-1]]]
    keep = np.zeros(n + 1, bool)
    keep[best + 1] = True
    return keep[lab]


class Midline:
    """Signed patient-x distance (mm) of voxels to the body midline of their slice; + is the patient's LEFT.

    Patient x (LPS) comes from ImagePositionPatient and ImageOrientationPatient, so flipped or rotated
    in-plane orientations are handled. The midline of a slice is the x-centroid of the trunk (largest
    body component on that slice: arms excluded). Values are computed per slice, never as a full float
    volume, to keep memory low on large series.
    """

    def __init__(self, volume: Volume, body: np.ndarray):
        n, rows, cols = volume.shape
        row_cos, col_cos = volume.orientation[:3], volume.orientation[3:]
        ps_r, ps_c = volume.pixel_spacing
        self._xrc = ((np.arange(rows) * ps_r * col_cos[0])[:, None]
                     + (np.arange(cols) * ps_c * row_cos[0])[None, :]).astype(np.float32)
        xk = volume.positions[:, 0]
        mid = np.full(n, np.nan)
        trunk = by_slabs(largest_per_slice, body)
        self.trunk = trunk  # the largest body region of every slice (the chest-wall steps use it too)
        count = trunk.sum(axis=(1, 2))
        has = count > 0
        # patient x is linear in row and column: its sum over the trunk needs only the row and column sums
        rows_sum = trunk.sum(axis=2, dtype=np.int64) @ np.arange(rows)
        cols_sum = trunk.sum(axis=1, dtype=np.int64) @ np.arange(cols)
        x_sum = rows_sum * ps_r * col_cos[0] + cols_sum * ps_c * row_cos[0]
        mid[has] = xk[has] + x_sum[has] / count[has]
        if np.isnan(mid).all():
            mid = xk + float(self._xrc.mean())
        else:
            idx = np.arange(n)
            good = ~np.isnan(mid)
            mid = np.interp(idx, idx[good], mid[good])
        self._offset = (xk - mid).astype(np.float32)

    def signed(self, k: int) -> np.ndarray:
        """(rows, cols) signed distance to the midline on slice ``k``."""
        return self._offset[k] + self._xrc

    def right_side(self) -> np.ndarray:
        """Boolean volume: voxel on the patient's right of the midline."""
        out = np.empty((len(self._offset),) + self._xrc.shape, dtype=bool)
        for k in range(len(self._offset)):
            np.less(self.signed(k), 0, out=out[k])
        return out


def superior_is_high_k(volume: Volume) -> bool:
    """True when the slice index grows towards the head (normal has a positive patient-z component)."""
    return bool(volume.normal[2] >= 0)


# --------------------------------------------------------------------------------------------- stages


def body_mask(hu: np.ndarray, spacing_rc: tuple[float, float]) -> np.ndarray:
    """Patient body: largest region above ``BODY_HU`` after a per-slice opening, holes filled per slice."""
    m = hu > BODY_HU
    structure = disk(BODY_OPENING_MM, spacing_rc)
    rows, cols = body_box(m, margin=max(structure.shape) + 1)  # all air beyond: the same result, sooner
    body = np.zeros(hu.shape, bool)
    opened = by_slabs(functools.partial(morphology.binary_opening, structure=structure), m[:, rows, cols])
    body[:, rows, cols] = by_slabs(fill_holes_per_slice, largest_component(opened))
    return body


def outside_air_removed(air: np.ndarray) -> np.ndarray:
    """Drop air regions that touch the in-plane image border (outside the patient, under the table)."""
    lab, n = ndi.label(air)
    if n == 0:
        return air
    border = np.zeros(n + 1, dtype=bool)
    for edge in (lab[:, 0, :], lab[:, -1, :], lab[:, :, 0], lab[:, :, -1]):
        border[np.unique(edge)] = True
    border[0] = True
    return ~border[lab] & air


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


def interior(mask: np.ndarray, size: int) -> np.ndarray:
    """``mask`` (k, r, c) eroded slice by slice with a square of ``size`` pixels (``INTERIOR_MM``; two 1D
    minimum filters: the same as a binary erosion with that square, sooner)."""
    out = mask.view(np.uint8)
    for axis in (1, 2):
        out = ndi.minimum_filter1d(out, size, axis=axis, mode="constant", cval=0)
    return out.view(bool)


def _component_stats(lab: np.ndarray, n: int, side: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per component: voxel count, fraction on the patient-right side, number of slices spanned."""
    flat = lab.ravel()
    sizes = np.bincount(flat, minlength=n + 1).astype(np.float64)
    right = np.bincount(lab[side], minlength=n + 1) / np.maximum(sizes, 1)
    slices = np.zeros(n + 1)
    for i, sl in enumerate(ndi.find_objects(lab), start=1):
        if sl is not None:
            slices[i] = sl[0].stop - sl[0].start
    return sizes, right, slices


def split_straddling(comp: np.ndarray, right_side: np.ndarray) -> tuple[np.ndarray, bool]:
    """Split one component crossing the midline into right (True) / left (False) parts.

    Erode slice by slice until pieces lie on both sides of the midline, then give every voxel of the
    component to its nearest seed. Returns (is_right mask within ``comp``, whether erosion succeeded);
    without separation the midline itself is used.
    """
    bbox = ndi.find_objects(comp.astype(np.uint8))[0]
    sub = comp[bbox]
    side = right_side[bbox]
    cross = ndi.generate_binary_structure(2, 1)[None]
    eroded = sub
    for _ in range(MAX_SPLIT_EROSIONS):
        eroded = ndi.binary_erosion(eroded, cross)
        lab, n = ndi.label(eroded)
        if n < 2:
            if n == 0:
                break
            continue
        sizes = np.bincount(lab.ravel())[1:]
        frac_right = np.bincount(lab.ravel(), weights=side.ravel())[1:] / np.maximum(sizes, 1)
        keep = sizes >= 0.05 * sizes.max()
        is_r = frac_right >= 0.5
        if (keep & is_r).any() and (keep & ~is_r).any():
            seed_label = np.zeros_like(lab, dtype=np.uint8)
            for i in np.flatnonzero(keep):
                seed_label[lab == i + 1] = 1 if is_r[i] else 2
            _, idx = ndi.distance_transform_edt(seed_label == 0, return_distances=True, return_indices=True)
            nearest = seed_label[tuple(idx)]
            out = np.zeros_like(comp)
            out[bbox] = sub & (nearest == 1)
            return out, True
    out = np.zeros_like(comp)
    out[bbox] = sub & side
    return out, False


def assign_sides(cand: np.ndarray, hu: np.ndarray, right_side: np.ndarray,
                 spacing_rc: tuple[float, float]) -> tuple[np.ndarray, list[str]]:
    """Label lung components 1 (right) / 2 (left); drop gas pockets and specks."""
    notes: list[str] = []
    labels = np.zeros(cand.shape, dtype=np.uint8)
    lab, n = ndi.label(cand)
    if n == 0:
        return labels, notes
    sizes, frac_right, slices = _component_stats(lab, n, right_side)
    largest = sizes[1:].max()
    area_px = spacing_rc[0] * spacing_rc[1]
    boxes = ndi.find_objects(lab)
    gas = 0
    for i in range(1, n + 1):
        if sizes[i] < MIN_COMPONENT_FRACTION * largest or sizes[i] / max(slices[i], 1) < MIN_COMPONENT_AREA_MM2 / area_px:
            continue
        sl = boxes[i - 1]
        inner = interior(lab[sl] == i, odd_pixels(INTERIOR_MM, spacing_rc))
        if not inner.any():
            continue  # a sliver without interior: air trapped in a skin fold or between arm and chest
        if is_gas(hu[sl], lab[sl] == i, inner):
            gas += 1
            continue
        comp = lab == i
        if STRADDLE_FRACTION <= frac_right[i] <= 1 - STRADDLE_FRACTION:
            is_right, by_erosion = split_straddling(comp, right_side)
            labels[is_right] = LungMasks.RIGHT
            labels[comp & ~is_right] = LungMasks.LEFT
            notes.append("right and left lungs touch: separated by erosion" if by_erosion
                         else "right and left lungs touch: separated at the body midline")
        else:
            labels[comp] = LungMasks.RIGHT if frac_right[i] > 0.5 else LungMasks.LEFT
    if gas:
        notes.append(f"{gas} gas-filled region(s) without vessels (bowel, stomach or airway) excluded")
    return labels, notes


def close_2d(mask: np.ndarray, radius_mm: float, spacing_rc: tuple[float, float]) -> np.ndarray:
    """Morphological closing of a 2D mask with a disk of ``radius_mm``, computed with distance transforms
    (exact Euclidean, anisotropic pixels, cost independent of the radius), on the mask's bounding box: a
    closing by a disk adds nothing outside it."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return mask.copy()
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    pad = (int(np.ceil(radius_mm / spacing_rc[0])) + 1, int(np.ceil(radius_mm / spacing_rc[1])) + 1)
    m = np.pad(mask[box], ((pad[0], pad[0]), (pad[1], pad[1])))
    dilated = ndi.distance_transform_edt(~m, sampling=spacing_rc) <= radius_mm
    closed = ndi.distance_transform_edt(dilated, sampling=spacing_rc) > radius_mm
    out = mask.copy()
    out[box] |= closed[pad[0]:-pad[0], pad[1]:-pad[1]]
    return out


def fill_holes_guarded(mask: np.ndarray, max_open_hole_px: float, hu: np.ndarray | None = None) -> np.ndarray:
    """Fill holes slice by slice, except large holes that open onto non-lung tissue in a neighbouring slice.

    Per-slice holes are vessels and lesions enclosed by lung, but also the liver or spleen under a
    diaphragm dome, or a hilum, ringed by lung on a few slices. Holes are chained across slices; a chain
    whose largest slice exceeds ``max_open_hole_px`` pixels and that continues into tissue outside the lung
    on an adjacent slice is such an organ and stays out. Small holes (vessels) are always filled.
    With ``hu`` given, a chain whose median HU is that of a lesion (``LESION_MEDIAN_HU``: consolidation,
    not liver, heart, vessels or hilar fat) is filled even when it opens onto a neighbouring slice: a
    consolidation enclosed by lung on one slice often reaches the pleura on the next. A chain that fails
    is judged again slice by slice, so a lesion joined to an organ through a chain keeps its lesion slices.
    """
    filled = by_slabs(fill_holes_per_slice, mask)
    holes = filled & ~mask
    if mask.shape[0] == 1 or not holes.any():
        return filled
    lab, n = ndi.label(holes)  # 6-connected chains across slices
    k_idx = np.broadcast_to(np.arange(mask.shape[0])[:, None, None], mask.shape)
    sel = lab > 0
    area = np.bincount(lab[sel] * mask.shape[0] + k_idx[sel], minlength=(n + 1) * mask.shape[0])
    big = area.reshape(n + 1, mask.shape[0]).max(axis=1) > max_open_hole_px
    outside = ~filled
    near_outside = np.zeros_like(outside)
    near_outside[:-1] |= outside[1:]
    near_outside[1:] |= outside[:-1]
    opened = np.zeros(n + 1, bool)
    opened[np.unique(lab[holes & near_outside])] = True
    drop = big & opened
    drop[0] = False
    if hu is None or not drop.any():
        return filled & ~drop[lab]
    # Judged by median HU, per chain and then per slice of a chain still dropped: a chain can join a lesion
    # to an organ (consolidation resting on a diaphragm dome), and the lesion's slices are still a lesion.
    # (medians over the hole voxels only: with label 0 scipy would sort the whole volume)
    med = np.zeros(n + 1)
    med[1:] = ndi.median(hu[sel], lab[sel], index=np.arange(1, n + 1))
    drop &= ~_lesion_like(med)
    if not drop.any():
        return filled
    dropped = drop[lab]
    piece = np.where(dropped, lab * mask.shape[0] + k_idx, 0)
    ids = np.unique(piece[dropped])
    lesions = ids[_lesion_like(np.asarray(ndi.median(hu[dropped], piece[dropped], index=ids), dtype=np.float64))]
    return filled & ~(dropped & ~np.isin(piece, lesions))


def _lesion_like(median_hu: np.ndarray) -> np.ndarray:
    return (median_hu > LESION_MEDIAN_HU[0]) & (median_hu <= LESION_MEDIAN_HU[1])


def smooth_lungs(labels: np.ndarray, spacing_rc: tuple[float, float], radius_mm: float,
                 hu: np.ndarray | None = None) -> np.ndarray:
    """Per lung: close the outline slice by slice, then fill holes (vessels, enclosed lesions).

    The closing also takes back dense lesions at the lung surface (subpleural consolidation) that the
    -320 HU threshold cut out, as long as they are narrower than about twice ``radius_mm`` (0: no
    closing). Voxels that belong to the other lung are never taken. ``hu``: see :func:`fill_holes_guarded`.
    """
    out = np.zeros_like(labels)
    max_hole_px = OPEN_HOLE_MAX_MM2 / (spacing_rc[0] * spacing_rc[1])
    for value, lung_box in lung_boxes(labels):
        # work in the lung's in-plane bounding box; closing never grows a mask beyond its bounding box
        box = (slice(None),) + lung_box[1:]
        mb = labels[box] == value
        closed = mb.copy()
        if radius_mm > 0:
            ks = np.flatnonzero(mb.reshape(mb.shape[0], -1).any(axis=1))
            for k, slice_closed in zip(ks, map_slices(lambda k: close_2d(mb[k], radius_mm, spacing_rc), ks)):
                closed[k] = slice_closed
        closed = fill_holes_guarded(closed, max_hole_px, None if hu is None else hu[box])
        ob, lb = out[box], labels[box]
        ob[closed & (ob == 0) & ((lb == value) | (lb == 0))] = value
    return out


# --------------------------------------------------------------------------------------------- dense recovery


class SkinGeometry:
    """Per slice: depth under the skin (mm) of every trunk pixel and, for the pixels asked about, the
    direction from their nearest skin point (one distance transform shared by the chest-wall tests).
    ``trunk`` must not be empty."""

    def __init__(self, trunk: np.ndarray, spacing_rc: tuple[float, float]):
        # the distance transform runs on the trunk's bounding box grown by one pixel of background: the
        # nearest background pixel of every trunk pixel lies in it, so depths and nearest points are those of
        # the whole slice; outside it (background) the depth is 0 and the nearest point the pixel itself
        box = tuple(slice(max(int(ix[0]) - 1, 0), int(ix[-1]) + 2) for ix in
                    (np.flatnonzero(trunk.any(axis=1)), np.flatnonzero(trunk.any(axis=0))))
        depth, nearest = ndi.distance_transform_edt(trunk[box], sampling=spacing_rc, return_indices=True)
        self.depth = np.zeros(trunk.shape)
        self.depth[box] = depth
        self._nearest = np.indices(trunk.shape)
        for axis in (0, 1):
            self._nearest[axis][box] = nearest[axis] + box[axis].start
        self._centre = np.argwhere(trunk).mean(axis=0)

    def inward(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Unit vectors (row, column components, in pixels) from the nearest skin point to the pixels."""
        dr = (rows - self._nearest[0][rows, cols]).astype(np.float32)
        dc = (cols - self._nearest[1][rows, cols]).astype(np.float32)
        norm = np.hypot(dr, dc)
        norm[norm == 0] = 1.0
        return dr / norm, dc / norm

    def angle_bins(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Direction from the trunk centre of the nearest skin point of the pixels, in ``WALL_BINS`` bins."""
        angle = np.arctan2(self._nearest[0][rows, cols] - self._centre[0],
                           self._nearest[1][rows, cols] - self._centre[1])
        return ((angle + np.pi) / (2 * np.pi) * WALL_BINS).astype(np.int64) % WALL_BINS


def wall_depth_ok(lungs: np.ndarray, skin: SkinGeometry, rows: np.ndarray, cols: np.ndarray,
                  interpolate: bool = False, ribs: np.ndarray | None = None) -> np.ndarray:
    """For the pixels (rows, cols) of one slice: at least as deep under the skin as the inner chest wall?

    The chest wall is as dense as consolidation, so its inner surface is estimated from where aerated lung
    meets it: pixels are grouped by the direction, from the trunk centre, of their nearest skin point
    (``WALL_BINS`` bins); the shallowest lung pixel of a bin gives the wall thickness there. A lesion at
    the pleura makes that depth too large in a few neighbouring bins, so the profile is opened (running
    minimum, then maximum, over ``WALL_WINDOW_BINS``), which keeps the thin wall of the healthy
    neighbours. Bins without lung have no wall estimate and nothing in them qualifies, unless ``interpolate``:
    then their wall depth is interpolated around the circle between the nearest bins that have one (a
    dependent consolidation that no aerated lung reaches past).
    """
    lung_rows, lung_cols = np.nonzero(lungs)
    wall = np.full(WALL_BINS, np.inf)
    np.minimum.at(wall, skin.angle_bins(lung_rows, lung_cols), skin.depth[lung_rows, lung_cols])
    wall = ndi.maximum_filter1d(ndi.minimum_filter1d(wall, WALL_WINDOW_BINS, mode="wrap"),
                                WALL_WINDOW_BINS, mode="wrap")
    known = np.flatnonzero(np.isfinite(wall))
    if interpolate and 0 < known.size < WALL_BINS:
        wall = np.interp(np.arange(WALL_BINS), known, wall[known], period=WALL_BINS)
    if ribs is not None and ribs.any():
        wall = np.minimum(wall, rib_depths(ribs, skin) + RIB_MARGIN_MM)
    return skin.depth[rows, cols] >= wall[skin.angle_bins(rows, cols)] - WALL_TOLERANCE_MM


def rib_depths(ribs: np.ndarray, skin: SkinGeometry) -> np.ndarray:
    """Per direction bin of ``skin`` (``WALL_BINS``): the depth under the skin of the deepest rib pixel, the
    rib's inner surface; a running maximum over ``RIB_WINDOW_BINS`` bridges the gaps between ribs (an
    intercostal space takes its neighbours' depth). Bins without a rib near them: inf (no estimate)."""
    rows, cols = np.nonzero(ribs)
    depth = np.full(WALL_BINS, -np.inf)
    np.maximum.at(depth, skin.angle_bins(rows, cols), skin.depth[rows, cols])
    depth = ndi.maximum_filter1d(depth, RIB_WINDOW_BINS, mode="wrap")
    depth[~np.isfinite(depth)] = np.inf
    return depth


def ray_hits(lung: np.ndarray, rows: np.ndarray, cols: np.ndarray, skin: SkinGeometry,
             spacing_rc: tuple[float, float], outward: bool, mm: float) -> np.ndarray:
    """For the pixels (rows, cols) of one slice: does the ray towards (``outward``) or away from their
    nearest skin point meet ``lung`` within ``mm``?

    ``lung`` is padded by the rays' reach (no lung beyond the image edge), so every sample is one lookup in
    the flat padded array; rays that met lung stop being sampled once they are a good share of those left.
    """
    step = max(min(spacing_rc), 1.0)  # mm; rays sampled about every pixel, never finer than 1 mm
    n_steps = int(mm / step)
    ur, uc = skin.inward(rows, cols)
    sign = -1 if outward else 1
    ur, uc = sign * ur * step / spacing_rc[0], sign * uc * step / spacing_rc[1]
    pad = int(np.ceil(n_steps * step / min(spacing_rc))) + 1
    flat = np.pad(lung, pad).ravel()
    width = lung.shape[1] + 2 * pad
    hit = np.zeros(rows.shape, bool)
    open_ = np.arange(rows.size)
    for s in range(1, n_steps + 1):
        r = np.rint(rows + s * ur).astype(np.int64)
        c = np.rint(cols + s * uc).astype(np.int64)
        met = flat[(r + pad) * width + (c + pad)]
        n_met = np.count_nonzero(met)
        if n_met == met.size:
            hit[open_] = True
            break
        if n_met * RAY_COMPACT_SHARE >= met.size:
            hit[open_[met]] = True
            still = ~met
            open_, rows, cols, ur, uc = open_[still], rows[still], cols[still], ur[still], uc[still]
        elif n_met:
            hit[open_[met]] = True
    return hit


def between_lung_and_wall(lung: np.ndarray, rows: np.ndarray, cols: np.ndarray, skin: SkinGeometry,
                          spacing_rc: tuple[float, float]) -> np.ndarray:
    """For the pixels (rows, cols) of one slice: between ``lung`` and the chest wall?

    A pixel qualifies when the ray from it towards its nearest skin point meets no lung within
    ``WALL_RAY_MM`` (only chest wall lies outside it) while the opposite ray meets lung within
    ``WALL_RAY_MM`` (the lung lies on its inner side). The heart and mediastinum fail the first
    test where the lung wraps them and the second one deep inside; the liver under a dome fails the first
    test below the lung recesses and the second one elsewhere.
    """
    ok = ray_hits(lung, rows, cols, skin, spacing_rc, False, WALL_RAY_MM)
    ok[ok] = ~ray_hits(lung, rows[ok], cols[ok], skin, spacing_rc, True, WALL_RAY_MM)
    return ok


def dense_tissue(hu: np.ndarray, spacing_rc: tuple[float, float]) -> np.ndarray:
    """Pixels of consolidation / effusion density (``DENSE_HU``) after a small in-plane mean filter
    (``DENSE_SMOOTH_MM``: noise down), of one slice (r, c) or of every slice of (k, r, c)."""
    size = odd_pixels(DENSE_SMOOTH_MM, spacing_rc)
    smooth = ndi.uniform_filter(hu, (1,) * (hu.ndim - 2) + (size, size)) if size > 1 else hu
    return (smooth > DENSE_HU[0]) & (smooth <= DENSE_HU[1])


def recover_dense_periphery(labels: np.ndarray, hu: np.ndarray, body: np.ndarray, right_side: np.ndarray,
                            spacing_rc: tuple[float, float], *, dense: np.ndarray | None = None,
                            trunk: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Take back consolidation / effusion between each lung and the inner chest wall (step 6), per slice.

    Candidates are unlabelled trunk pixels of ``DENSE_HU`` density after a 3x3 mean (noise down), at least
    as deep as the inner chest wall (:func:`wall_depth_ok`) and, for one lung, between that lung and the
    wall (:func:`between_lung_and_wall`) and on that lung's side of the body midline (``right_side``:
    a lesion never crosses it, the mediastinum does). An opening (``RIM_MM``) drops thin rims along the
    pleura (extrapleural fat, partial volume); what remains and touches the lung joins it. ``dense``
    (:func:`dense_tissue` of ``hu``) and ``trunk`` (the largest ``body`` region of each slice) are computed
    when not given. Returns the new labels and the number of voxels taken.
    """
    dense = dense_tissue(hu, spacing_rc) if dense is None else dense
    trunk = by_slabs(largest_per_slice, body) if trunk is None else trunk
    rim = disk(max(RIM_MM, max(spacing_rc)), spacing_rc)[0]
    return per_lung_slice(labels, lambda k, lab: _dense_periphery_slice(lab, dense[k] & trunk[k], trunk[k],
                                                                         right_side[k], rim, spacing_rc))


def per_lung_slice(labels: np.ndarray, step: Callable[[int, np.ndarray], int]) -> tuple[np.ndarray, int]:
    """``step(k, slice_labels)`` on a copy of every slice of ``labels`` with lung, on the worker threads
    (:func:`~node.pipeline.slicewise.map_slices`); ``step`` updates the slice and returns the pixels it took.
    Returns the new labels and the voxels taken in all."""
    def one(k: int) -> tuple[np.ndarray, int]:
        lab = labels[k].copy()
        return lab, step(k, lab)

    out = labels.copy()
    ks = np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1))
    taken = 0
    for k, (lab, n) in zip(ks, map_slices(one, ks)):
        out[k] = lab
        taken += n
    return out, taken


def _dense_periphery_slice(labels: np.ndarray, dense: np.ndarray, trunk: np.ndarray, right_side: np.ndarray,
                           rim: np.ndarray, spacing_rc: tuple[float, float]) -> int:
    """Step 6 on one slice: ``labels`` (r, c) updated in place; returns the number of pixels taken."""
    lungs = labels > 0
    # the rim opening below keeps whole disks, and a disk of the pixels that pass every test lies in the opened
    # candidates: only those need the tests (none on many slices, where no skin distances are needed at all)
    dense = morphology.binary_opening(dense & ~lungs, rim)
    if not dense.any():
        return 0
    before = labels.copy()
    skin = SkinGeometry(trunk, spacing_rc)
    rr, cc = np.nonzero(dense)
    keep = wall_depth_ok(lungs, skin, rr, cc)
    deep = np.zeros_like(lungs)
    deep[rr[keep], cc[keep]] = True
    rr, cc = np.nonzero(morphology.binary_opening(deep, rim))
    recovered = 0
    for value in (LungMasks.RIGHT, LungMasks.LEFT):
        lung = before == value
        if not lung.any() or rr.size == 0:
            continue
        # only pixels on this lung's side and within ray reach of it can pass the ray test, and only those
        # joined to it through such pixels can touch it after the opening (which acts on each piece alone)
        near = right_side[rr, cc] == (value == LungMasks.RIGHT)
        near &= within_mm(lung, rr, cc, WALL_RAY_MM, spacing_rc)
        near[near] = joined_to(lung, rr[near], cc[near])
        r1, c1 = rr[near], cc[near]
        keep = between_lung_and_wall(lung, r1, c1, skin, spacing_rc)
        taken = np.zeros_like(lung)
        taken[r1[keep], c1[keep]] = True
        taken = touching_lung(morphology.binary_opening(taken, rim) & (labels == 0), lung)
        labels[taken] = value
        recovered += int(taken.sum())
    return recovered


def bronchogram_pockets(air: np.ndarray, where: np.ndarray, midline_mm: np.ndarray,
                        depth: Callable[[], np.ndarray], spacing_rc: tuple[float, float]) -> np.ndarray:
    """Air bronchograms on one slice: small pockets of ``air`` (below ``AIR_HU``; ``POCKET_MAX_MM2``) among the
    pixels ``where`` (trunk, not lung, airways or next to them), at least ``POCKET_MIDLINE_MM`` from the
    midline and ``POCKET_DEPTH_MM`` under the skin, that have at least ``POCKET_CLUSTER`` such pockets
    (themselves included) within ``POCKET_CLUSTER_MM``. ``depth`` (under the skin, mm) is called only on
    slices with enough candidates (most slices have none)."""
    none = np.zeros_like(where)
    lab, n = ndi.label(air & where)
    if n < POCKET_CLUSTER:
        return none
    area = np.bincount(lab.ravel()) * spacing_rc[0] * spacing_rc[1]
    small = area <= POCKET_MAX_MM2
    small[0] = False
    pocket = small[lab] & (np.abs(midline_mm) >= POCKET_MIDLINE_MM)
    if np.unique(lab[pocket]).size < POCKET_CLUSTER:
        return none
    pocket &= depth() >= POCKET_DEPTH_MM
    ids = np.unique(lab[pocket])
    if ids.size < POCKET_CLUSTER:
        return none
    centres = np.array(ndi.center_of_mass(pocket, lab, ids)) * np.asarray(spacing_rc)
    dist = np.sqrt(((centres[:, None, :] - centres[None, :, :]) ** 2).sum(-1))
    counted = ids[(dist <= POCKET_CLUSTER_MM).sum(axis=1) >= POCKET_CLUSTER]
    return np.isin(lab, counted)


def recover_bronchograms(labels: np.ndarray, hu: np.ndarray, body: np.ndarray, airways: np.ndarray,
                         midline: Midline, spacing_rc: tuple[float, float], *,
                         dense: np.ndarray | None = None, air: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Take back consolidated lung marked by air bronchograms (step 6a), per slice.

    The pockets of :func:`bronchogram_pockets` and the :func:`dense_tissue` within ``POCKET_REACH_MM`` of
    them join the lung they touch (8-connected, on its side of the midline, inside the convex hull of that
    lung and its pockets), except pixels with lung within ``PERIPHERAL_RAY_MM`` towards their nearest skin
    point: tissue enclosed by aerated lung on its skin side is the hilum or, inside a diaphragm dome, the
    abdomen. ``dense`` (:func:`dense_tissue` of ``hu``) is computed when not given; ``body`` is that of
    ``midline``, whose trunk (largest region of each slice) is used. ``air``: the source pixels below
    ``AIR_HU``, on a grid ``f`` times finer than ``hu`` (the working grid's blocks, :func:`segment_lungs`):
    bronchograms a pixel or two wide vanish in a block's mean, so the pockets are found on the source grid;
    ``hu < AIR_HU`` when not given. Returns the new labels and the number of voxels taken.
    """
    dense = dense_tissue(hu, spacing_rc) if dense is None else dense
    air = hu < AIR_HU if air is None else air
    trunk = midline.trunk
    return per_lung_slice(labels, lambda k, lab: _bronchograms_slice(lab, air[k], dense[k], trunk[k], airways[k],
                                                                     midline.signed(k), spacing_rc))


def _bronchograms_slice(labels: np.ndarray, air: np.ndarray, dense: np.ndarray, trunk: np.ndarray,
                        airways: np.ndarray, signed: np.ndarray, spacing_rc: tuple[float, float]) -> int:
    """Step 6a on one slice: ``labels`` (r, c) updated in place; returns the number of pixels taken. ``air``:
    see :func:`recover_bronchograms`."""
    lungs = labels > 0
    skin_of = functools.cache(lambda: SkinGeometry(trunk, spacing_rc))  # made once, and only when needed
    # air touching the lung is its edge; on the working grid, the air of the blocks on its outline
    where = trunk & ~morphology.binary_dilation(lungs | airways, morphology.NEIGHBOURS)
    f = air.shape[0] // labels.shape[0]
    if f == 1:
        pockets = bronchogram_pockets(air, where, signed, lambda: skin_of().depth, spacing_rc)
    else:  # found among the source pixels of the blocks that hold air; a block with a pocket pixel is a pocket
        pockets = np.zeros_like(lungs)
        rows, cols = np.nonzero(where & workgrid.block_any(air, f))
        if rows.size:
            box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
            source = tuple(slice(s.start * f, s.stop * f) for s in box)
            fine = functools.partial(workgrid.upsampled, shape=air[source].shape, factor=f)
            found = bronchogram_pockets(air[source], fine(where[box]), fine(signed[box]),
                                        lambda: fine(skin_of().depth[box]), (spacing_rc[0] / f, spacing_rc[1] / f))
            pockets[box] = workgrid.block_any(found, f)
    if not pockets.any():
        return 0
    skin = skin_of()
    near = ndi.distance_transform_edt(~pockets, sampling=spacing_rc) <= POCKET_REACH_MM
    rr, cc = np.nonzero(near & (dense | pockets) & trunk & ~lungs)
    keep = ~ray_hits(lungs, rr, cc, skin, spacing_rc, True, PERIPHERAL_RAY_MM)
    rr, cc = rr[keep], cc[keep]
    recovered = 0
    for value in (LungMasks.RIGHT, LungMasks.LEFT):
        lung = labels == value
        side = (signed < 0) == (value == LungMasks.RIGHT)
        on_side = side[rr, cc]
        if not lung.any() or not on_side.any():
            continue
        r1, c1 = rr[on_side], cc[on_side]
        # not beyond the outermost bronchograms: inside the convex hull of the lung and its pockets
        hull = Delaunay(np.argwhere((lung & ~ndi.binary_erosion(lung)) | (pockets & side)))
        inside = hull.find_simplex(np.stack([r1, c1], axis=1)) >= 0
        cand = np.zeros_like(lung)
        cand[r1[inside], c1[inside]] = True
        taken = touching_lung(cand, lung) & (labels == 0)
        labels[taken] = value
        recovered += int(taken.sum())
    return recovered


def recover_between_slices(labels: np.ndarray, hu: np.ndarray, body: np.ndarray, right_side: np.ndarray,
                           spacing_rc: tuple[float, float], *,
                           dense: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Take back dense tissue that is lung on both neighbouring slices (step 6b).

    A pixel of :func:`dense_tissue` on slice k joins a lung when that lung covers the same
    pixel on slice k-1 and on slice k+1, on its side of the midline, after the same rim opening as step 6;
    repeated until nothing changes, so a lesion is taken back from its edges inwards. Consolidation
    against the mediastinum or a diaphragm dome, which the chest-wall rays of step 6 cannot judge, is
    caught this way where the lung around it was found above and below. Organs that rise into the lung's
    footprint from one side (the top of the heart, a diaphragm dome) are lung on one neighbour only and
    stay out. ``dense`` (:func:`dense_tissue` of ``hu``) is computed when not given. Returns the new labels
    and the number of voxels taken.
    """
    out = labels.copy()
    if out.shape[0] < 3:
        return out, 0
    dense = dense_tissue(hu, spacing_rc) if dense is None else dense
    rim = disk(max(RIM_MM, max(spacing_rc)), spacing_rc)[0]
    taken_total = 0
    while True:
        taken_now = 0
        for k in range(1, out.shape[0] - 1):
            for value in (LungMasks.RIGHT, LungMasks.LEFT):
                both = (out[k - 1] == value) & (out[k + 1] == value) & (out[k] == 0)
                if not both.any():
                    continue
                side = right_side[k] == (value == LungMasks.RIGHT)
                taken = morphology.binary_opening(both & dense[k] & body[k] & side, rim)
                out[k][taken] = value
                taken_now += int(taken.sum())
        taken_total += taken_now
        if not taken_now:
            return out, taken_total


def within_mm(mask: np.ndarray, rows: np.ndarray, cols: np.ndarray, mm: float,
              spacing_rc: tuple[float, float]) -> np.ndarray:
    """Whether each pixel (rows, cols) of a 2D slice lies within ``mm`` of ``mask`` (non-empty).

    Distances are to the mask's edge pixels (the nearest mask pixel of a pixel outside it is one: a step
    from an inner pixel towards the outside pixel would be nearer), found with a k-d tree (a few thousand
    points instead of a distance transform of the slice) and computed from the pixel offsets as
    ``ndi.distance_transform_edt`` computes them.
    """
    sampling = np.asarray(spacing_rc, dtype=np.float64)
    edge = np.argwhere(mask & ~ndi.binary_erosion(mask))
    pixels = np.stack([rows, cols], axis=1)
    _, nearest = cKDTree(edge * sampling).query(pixels * sampling, distance_upper_bound=mm * (1 + 1e-6))
    found = nearest < len(edge)  # the tree answers len(edge) where no edge pixel is within the bound
    offset = (edge[nearest[found]] - pixels[found]).astype(np.float64) * sampling
    out = mask[rows, cols]
    out[found] |= np.sqrt((offset * offset).sum(axis=1)) <= mm
    return out


def lung_boxes(labels: np.ndarray) -> list[tuple[int, tuple[slice, ...]]]:
    """(label, bounding box) of each lung (right, then left) present in ``labels``."""
    boxes = ndi.find_objects(labels, max_label=LungMasks.LEFT)
    return [(value, boxes[value - 1]) for value in (LungMasks.RIGHT, LungMasks.LEFT) if boxes[value - 1] is not None]


def joined_to(lung: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """For the pixels (rows, cols) of one slice: 8-connected to ``lung`` through such pixels?"""
    pixels = np.zeros_like(lung)
    pixels[rows, cols] = True
    return touching_lung(pixels, lung)[rows, cols]


def touching_lung(cand: np.ndarray, lung: np.ndarray) -> np.ndarray:
    """The pieces of the 2D mask ``cand`` that touch ``lung`` (8-connected)."""
    lab, _ = ndi.label(cand | lung, structure=morphology.NEIGHBOURS)
    return cand & np.isin(lab, np.unique(lab[lung]))


def one_component_per_lung(labels: np.ndarray, volumetric: bool = True) -> int:
    """Keep only the largest connected piece of each lung, in place; returns the voxels dropped.

    On a single slice a lung may legitimately show as two pieces (split by a fissure-side consolidation or
    cut through a recess), so there only pieces under ``MIN_2D_PIECE_FRACTION`` of the largest go: a main
    bronchus cross-section next to the hilum, air in a fold.
    """
    dropped = 0
    for value, box in lung_boxes(labels):
        m = labels[box] == value
        if volumetric:
            extra = m & ~largest_component(m)
        else:
            lab, _ = ndi.label(m)
            sizes = np.bincount(lab.ravel())
            sizes[0] = 0
            extra = m & (sizes[lab] < MIN_2D_PIECE_FRACTION * sizes.max())
        labels[box][extra] = 0
        dropped += int(extra.sum())
    return dropped


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


def lung_cut_by_fov(hu: np.ndarray, body: np.ndarray, spacing_rc: tuple[float, float]) -> float:
    """Largest area (cm2) on one slice of lung that the image edge cuts: 0.0 when none.

    Where the field of view is narrower than the chest, the lungs reach the image edge; they are then not
    holes of the body outline but part of the air around it, and no lung step sees them. Such lung is told
    from room air by its density: on slices where the body reaches the image edge, a region of air
    (below ``AIR_HU``) outside the body outline counts when it reaches the image edge too, its
    median is above ``FOV_LUNG_MEDIAN_HU``, its area at least ``FOV_LUNG_MIN_CM2`` and at least
    ``FOV_LUNG_WALLED`` of the rest of its outline lies against the body (the foam pad under the patient is
    as dense as lung, but lies against the table and room air). The area is that of the lung lost on that
    slice. Not detected: a lung cut by the edge of the reconstruction circle inside the image (its padding
    reads as air, -1024 HU, in a :class:`Volume`), which foam pads and air under the arms imitate too closely.
    """
    pixel_cm2 = spacing_rc[0] * spacing_rc[1] / 100.0
    edge = np.zeros(body.shape[1:], bool)
    edge[[0, -1], :] = edge[:, [0, -1]] = True
    cross = ndi.generate_binary_structure(2, 1)
    largest = 0
    # slices where the body reaches the image edge (looking at the border rows and columns only)
    for k in np.flatnonzero(body[:, [0, -1], :].any(axis=(1, 2)) | body[:, :, [0, -1]].any(axis=(1, 2))):
        lab, n = ndi.label((hu[k] < AIR_HU) & ~body[k])
        if n == 0:
            continue
        size = np.bincount(lab.ravel(), minlength=n + 1)
        denser = np.bincount(lab[hu[k] > FOV_LUNG_MEDIAN_HU], minlength=n + 1)
        at_edge = np.zeros(n + 1, bool)
        at_edge[lab[edge]] = True
        # more than half of a region above the threshold: its median is
        lung_like = (denser * 2 > size) & (size * pixel_cm2 >= FOV_LUNG_MIN_CM2) & at_edge
        lung_like[0] = False
        if not lung_like.any():
            continue
        cand = np.where(lung_like[lab], lab, 0)
        ring = ndi.grey_dilation(cand, footprint=cross) * ((cand == 0) & ~edge)  # outline, by region
        walled = (np.bincount(ring[body[k]], minlength=n + 1)
                  >= FOV_LUNG_WALLED * np.bincount(ring.ravel(), minlength=n + 1))
        largest = max(largest, int(size[lung_like & walled].sum()))
    return largest * pixel_cm2


def body_box(body: np.ndarray, margin: int = BOX_MARGIN_PX) -> tuple[slice, slice]:
    """In-plane (rows, columns) bounding box of ``body`` over all slices, ``margin`` pixels wider (clipped)."""
    rows = np.flatnonzero(body.any(axis=(0, 2)))
    cols = np.flatnonzero(body.any(axis=(0, 1)))
    if rows.size == 0:
        return slice(0, body.shape[1]), slice(0, body.shape[2])
    return (slice(max(int(rows[0]) - margin, 0), int(rows[-1]) + margin + 1),
            slice(max(int(cols[0]) - margin, 0), int(cols[-1]) + margin + 1))


def cropped(volume: Volume, rows: slice, cols: slice) -> Volume:
    """``volume`` cut to the in-plane box (a view of its HU), with ImagePositionPatient moved to the box's
    first pixel so that patient coordinates of every voxel are unchanged."""
    row_cos, col_cos = volume.orientation[:3], volume.orientation[3:]
    # one row down moves along the column cosine by the row spacing; one column along the row cosine
    shift = rows.start * volume.pixel_spacing[0] * col_cos + cols.start * volume.pixel_spacing[1] * row_cos
    return dataclasses.replace(volume, hu=volume.hu[:, rows, cols], positions=volume.positions + shift)


class LungMethod(str, enum.Enum):
    """How :func:`segment_lungs` decides what is lung."""

    HU = "hu"              # steps 1-7 of the module docstring (HU thresholds and rules only)
    AERATED = "aerated"    # steps 1-5 and 7: aerated lung only, no dense recovery (also the training labels'
                           # aerated part, training/lungnet.py)
    NET = "net"            # every step, then step 6n: the learned lung probability (models/lungnet.py) adds
                           # dense disease the rules miss and removes dense tissue they took wrongly


DEFAULT_METHOD = LungMethod.NET  # docs/lungs.md, "Default"
NET_WEIGHTS = "lungnet"         # models/weights/<name>.safetensors
NET_LUNG_PROBABILITY = 0.5      # a pixel is lung for the net from this probability
NET_PREFILTER_PROBABILITY = 0.05  # steps 6-6b skip dense tissue below this (0.2, the veto, cost 0.01 of
                                  # phantom consolidation recall: pieces that joined others to the lung)
NET_VETO_PROBABILITY = 0.2     # dense tissue the HU rules recovered leaves the lung below this probability
NET_COMPONENT_PROBABILITY = 0.3  # a connected piece of lung whose mean probability is lower leaves it (bowel gas,
                                 # air in the chest wall)


def lung_method(name: str) -> LungMethod:
    """The :class:`LungMethod` of a configuration value: "auto" is ``DEFAULT_METHOD``."""
    return DEFAULT_METHOD if name == "auto" else LungMethod(name)


@functools.lru_cache(maxsize=2)
def _lung_net(device: str):
    """The shipped lung network on ``device``, batch normalisation folded, and its input size (loaded once per
    process and device)."""
    from models.lungnet import folded
    from models.registry import load_shipped

    model, meta = load_shipped(NET_WEIGHTS, device=device)
    return folded(model), int(meta["input"]["size"])


def lung_probability(hu: np.ndarray, device: str = "cpu") -> np.ndarray:
    """Lung probability (float32) of every voxel of ``hu`` (k, r, c), from the lung network (models/lungnet.py),
    all slices in batches on ``device``. ``hu`` should be the body box (:func:`body_box`): the network saw
    slices cropped so."""
    import torch

    from models.lungnet import lung_probability as net_probability

    model, size = _lung_net(device)
    with torch.inference_mode():
        prob = net_probability(model, torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32)), size)
    return prob.cpu().numpy()


def lung_probability_near(hu: np.ndarray, aerated: np.ndarray, device: str = "cpu") -> np.ndarray:
    """:func:`lung_probability` on the slices from the first to the last that hold ``aerated`` lung or lie next
    to one; 0 on the others. Steps 6-6n use the probability only there: a slice gains lung only beside lung
    on the same slice (6, 6a, 6n) or between two neighbours with lung (6b), and step 6n keeps nothing on a
    slice without aerated lung (:func:`within_chest_wall`)."""
    prob = np.zeros(hu.shape, np.float32)
    ks = np.flatnonzero(aerated.reshape(aerated.shape[0], -1).any(axis=1))
    if ks.size:
        first, last = max(int(ks[0]) - 1, 0), min(int(ks[-1]) + 2, hu.shape[0])
        prob[first:last] = lung_probability(hu[first:last], device)
    return prob


def rib_mask(hu: np.ndarray, trunk: np.ndarray, midline_mm: np.ndarray,
             spacing_rc: tuple[float, float]) -> np.ndarray:
    """Rib pixels of one slice: bone (``RIB_HU`` after the dense-tissue mean filter) of the trunk, at least
    ``RIB_MIDLINE_MM`` from the body midline (``midline_mm``: signed distance; sternum and spine lie nearer)."""
    bone = ndi.uniform_filter(hu, odd_pixels(DENSE_SMOOTH_MM, spacing_rc)) >= RIB_HU
    return bone & trunk & (np.abs(midline_mm) >= RIB_MIDLINE_MM)


def within_chest_wall(cand: np.ndarray, aerated: np.ndarray, trunk: np.ndarray,
                      spacing_rc: tuple[float, float], hu: np.ndarray | None = None,
                      midline: Midline | None = None) -> np.ndarray:
    """``cand`` without the pixels that lie beyond the pleura: per slice, a pixel must be at least as deep under
    the skin as the inner chest wall is where aerated lung meets it (:func:`wall_depth_ok`, the rule of step 6;
    interpolated around the body where no aerated lung meets the wall). With ``hu`` and ``midline``, the ribs
    bound that depth (:func:`rib_depths`): where consolidation fills the periphery over a wide arc, aerated
    lung meets no wall and its depth says the wall is thicker than it is; the ribs' inner surface says where
    the wall ends. Slices without aerated lung keep nothing."""
    def kept(k: int) -> tuple[np.ndarray, np.ndarray]:
        rows, cols = np.nonzero(cand[k])
        ribs = None if hu is None or midline is None else rib_mask(hu[k], trunk[k], midline.signed(k), spacing_rc)
        ok = wall_depth_ok(aerated[k], SkinGeometry(trunk[k], spacing_rc), rows, cols, interpolate=True,
                           ribs=ribs)
        return rows[ok], cols[ok]

    out = np.zeros_like(cand)
    ks = [int(k) for k in np.flatnonzero(cand.reshape(cand.shape[0], -1).any(axis=1))
          if aerated[k].any() and trunk[k].any()]
    for k, (rows, cols) in zip(ks, map_slices(kept, ks)):  # one distance transform per slice, over the CPUs
        out[k, rows, cols] = True
    return out


def net_refine(labels: np.ndarray, aerated: np.ndarray, hu: np.ndarray, body: np.ndarray, airways: np.ndarray,
               right_side: np.ndarray, spacing_rc: tuple[float, float], device: str,
               trunk: np.ndarray | None = None, midline: Midline | None = None,
               prob: np.ndarray | None = None) -> tuple[np.ndarray, int, int]:
    """Step 6n (method "net"): the lung network's probability corrects the HU method where the HU rules are weak.

    Dense tissue that the HU rules recovered (steps 5-6b: not ``aerated``) and the network gives less than
    ``NET_VETO_PROBABILITY`` leaves the lung (a strip of mediastinum or heart border the rays took), and so does
    a connected piece whose mean probability is under ``NET_COMPONENT_PROBABILITY`` (bowel gas). Dense
    tissue of the body that the network gives at least ``NET_LUNG_PROBABILITY`` joins the lung it touches (3D),
    when at least as deep under the skin as the inner chest wall (:func:`within_chest_wall`: the network,
    trained without real chest walls, also marks muscle between the ribs; with ``midline``, the ribs' inner
    surface bounds that depth where consolidation hides the wall), after an opening of ``RIM_MM`` per
    slice (thin rims at the pleura, the network's blurred edge), on the side of the body midline:
    consolidation and atelectasis that no HU rule reaches. Holes are then filled as in
    step 6, not those open onto an organ on a neighbouring slice (a liver dome ringed by lung stays out).
    Aerated lung is the HU method's. ``prob``: the network's probability of ``hu``, computed (on ``device``)
    when not given. Returns the labels, the voxels taken and the voxels removed.
    """
    prob = lung_probability(hu, device) if prob is None else prob
    labels = labels.copy()
    vetoed = (labels > 0) & ~aerated & (prob < NET_VETO_PROBABILITY)
    lab, n = ndi.label(labels > 0)
    if n:  # a whole piece of "lung" the network does not see as lung: bowel gas, air in the chest wall
        inside = lab > 0  # the lung voxels only: sums over the whole box cost 4 times as much, same per piece
        size = np.bincount(lab[inside], minlength=n + 1)
        mean_prob = np.bincount(lab[inside], weights=prob[inside], minlength=n + 1) / np.maximum(size, 1)
        unlike = mean_prob < NET_COMPONENT_PROBABILITY
        unlike[0] = False
        vetoed |= unlike[lab]
    labels[vetoed] = 0
    lung = labels > 0
    rim = disk(max(RIM_MM, max(spacing_rc)), spacing_rc)
    dense = (prob >= NET_LUNG_PROBABILITY) & body & ~airways & ~lung & (hu >= AIR_HU)
    # an opening keeps whole disks, and a disk of what the chest-wall limit keeps lies in the opened candidates:
    # so the limit is asked only about those (on most slices none: the network's blurred edge is a thin rim)
    dense = morphology.binary_opening(dense, rim)
    dense = morphology.binary_opening(within_chest_wall(dense, aerated, body if trunk is None else trunk,
                                                        spacing_rc, hu=hu, midline=midline), rim)
    lab, n = ndi.label(dense | lung)
    touching = np.zeros(n + 1, bool)
    touching[np.unique(lab[lung])] = True
    touching[0] = False
    dense &= touching[lab]
    labels[dense] = np.where(right_side[dense], LungMasks.RIGHT, LungMasks.LEFT)
    # holes enclosed now: filled as in step 6, not those open onto an organ on the next slice (a liver dome)
    return smooth_lungs(labels, spacing_rc, 0.0, hu=hu), int(dense.sum()), int(vetoed.sum())


def segment_lungs(volume: Volume, *, closing_mm: float | None = None,
                  method: LungMethod | str = DEFAULT_METHOD, device: str = "cpu") -> LungMasks:
    """Segment the right (1) and left (2) lungs of ``volume``; works on one slice (2D) too.

    ``method``: see :class:`LungMethod`; ``device``: where the lung network runs (method "net"; "cuda" or
    "cpu"). ``closing_mm``: radius of the per-slice outline closing of the HU methods (default ``CLOSING_MM``).
    Every step runs on the working grid (module docstring; ``labels``, ``airways`` and ``body`` come back on
    the source grid), and after the body mask inside the body's bounding box (:func:`body_box`): the air
    around the patient holds no lung, and a CT field of view is often half air.
    """
    method = LungMethod(method)
    factor = workgrid.working_factor(volume.pixel_spacing)
    work = workgrid.coarsened(volume, factor)
    # the body outline from each block's darkest pixel: a channel of outside air one source pixel wide (between
    # skin folds) stays open, and the air it leads to stays outside the body
    body = body_mask(workgrid.block_min(volume.hu, factor), work.pixel_spacing) if factor > 1 else None
    air = workgrid.padded(volume.hu, factor) < AIR_HU if factor > 1 else None  # step 6a's pockets
    masks = _segment_on_grid(work, closing_mm, method, device, body, air)
    if factor == 1:
        return masks
    airways = workgrid.upsampled(masks.airways, volume.shape, factor)
    labels = workgrid.upsampled_labels(masks.labels, volume.hu, work.hu, factor, AIR_HU, keep_out=masks.airways)
    labels[airways] = 0
    return dataclasses.replace(masks, labels=labels, airways=airways,
                               body=workgrid.upsampled(masks.body, volume.shape, factor))


def _segment_on_grid(volume: Volume, closing_mm: float | None, method: LungMethod, device: str,
                     body: np.ndarray | None = None, air: np.ndarray | None = None) -> LungMasks:
    """:func:`segment_lungs` on the grid of ``volume`` (the working grid); ``body``: its body mask, when made
    otherwise than from ``volume.hu``; ``air``: the source pixels below ``AIR_HU`` (``f`` times finer,
    :func:`recover_bronchograms`)."""
    body = body_mask(volume.hu, volume.pixel_spacing) if body is None else body
    rows, cols = body_box(body)
    f = 1 if air is None else air.shape[1] // volume.shape[1]
    inner = _segment_in_box(cropped(volume, rows, cols), body[:, rows, cols], closing_mm, method, device,
                            None if air is None else air[:, rows.start * f:rows.stop * f, cols.start * f:cols.stop * f])
    labels = np.zeros(volume.shape, np.uint8)
    labels[:, rows, cols] = inner.labels
    airways = np.zeros(volume.shape, bool)
    airways[:, rows, cols] = inner.airways
    cut_cm2 = lung_cut_by_fov(volume.hu, body, volume.pixel_spacing)
    notes = inner.notes
    if cut_cm2 > 0:
        notes = [*notes, f"lung reaches the edge of the reconstructed field of view (up to {cut_cm2:.1f} cm2 "
                         "of lung on one slice not segmented): the field of view is narrower than the chest"]
    return dataclasses.replace(inner, labels=labels, airways=airways, body=body, fov_cut_cm2=cut_cm2,
                               partial_coverage=inner.partial_coverage or cut_cm2 > 0, notes=notes,
                               method=method.value)


def _segment_in_box(volume: Volume, body: np.ndarray, closing_mm: float | None,
                    method: LungMethod = LungMethod.HU, device: str = "cpu",
                    source_air: np.ndarray | None = None) -> LungMasks:
    """Steps 2-7 of the module docstring on ``volume`` with its ``body`` mask (step 1); see :class:`LungMethod`."""
    hu = volume.hu
    spacing_rc = volume.pixel_spacing
    area_px = spacing_rc[0] * spacing_rc[1]
    notes: list[str] = []

    midline = Midline(volume, body)

    air = outside_air_removed((hu < AIR_HU) & body)
    airways, airway_notes = find_airways(hu, air, midline, volume)
    notes += airway_notes
    right_side = midline.right_side()

    recovered = taken = vetoed = 0
    labels, side_notes = assign_sides(air & ~airways, hu, right_side, spacing_rc)
    notes += side_notes
    labels = smooth_lungs(labels, spacing_rc, CLOSING_MM if closing_mm is None else closing_mm)
    if method in (LungMethod.HU, LungMethod.NET):
        aerated = labels > 0
        dense = dense_tissue(hu, spacing_rc)
        prob = None
        if method is LungMethod.NET:
            # the network first: dense tissue it gives under NET_PREFILTER_PROBABILITY (far below the veto of
            # step 6n) would leave the lung there anyway, so steps 6-6b need not trace it (most of their
            # candidates are chest wall and heart)
            prob = lung_probability_near(hu, aerated, device)
            dense &= prob >= NET_PREFILTER_PROBABILITY
        labels, recovered = recover_dense_periphery(labels, hu, body, right_side, spacing_rc, dense=dense,
                                                    trunk=midline.trunk)
        labels, bronchograms = recover_bronchograms(labels, hu, body, airways, midline, spacing_rc, dense=dense,
                                                    air=source_air)
        labels, between = recover_between_slices(labels, hu, body, right_side, spacing_rc, dense=dense)
        recovered += bronchograms + between
        # fill again: the recovered rim may now enclose lesions, which count even when open on the next slice
        labels = smooth_lungs(labels, spacing_rc, 0.0, hu=hu)
        if method is LungMethod.NET:
            labels, taken, vetoed = net_refine(labels, aerated, hu, body, airways, right_side, spacing_rc, device,
                                               trunk=midline.trunk, midline=midline, prob=prob)
    labels[airways] = 0
    dropped = one_component_per_lung(labels, volumetric=volume.is_volumetric)
    amount = functools.partial(amount_text, volume=volume)
    if recovered:
        notes.append(f"recovered {amount(recovered)} of dense peripheral tissue (consolidation/effusion at "
                     "the chest wall) into the lungs")
    if taken:
        notes.append(f"the lung network took {amount(taken)} of dense tissue (consolidation, atelectasis) "
                     "into the lungs")
    if vetoed:
        notes.append(f"the lung network returned {amount(vetoed)} of tissue that the HU rules had "
                     "taken into the lungs (heart border, mediastinum, effusion, bowel gas)")
    if dropped * area_px * max(volume.slice_spacing, 1.0) >= 1000.0:  # at least 1 ml (1 cm3)
        notes.append(f"dropped {amount(dropped)} of lung-like pieces detached from the main lung components")

    if not (labels == LungMasks.RIGHT).any() or not (labels == LungMasks.LEFT).any():
        if labels.any():
            notes.append("only one lung found")
    partial = volume.shape[0] == 1 or bool(labels[0].any() or labels[-1].any())
    if volume.shape[0] == 1:
        notes.append("single slice: 2D segmentation, partial coverage")
    elif partial:
        notes.append(coverage_note(labels, volume))
    return LungMasks(labels=labels, airways=airways, body=body, partial_coverage=partial, notes=notes)
