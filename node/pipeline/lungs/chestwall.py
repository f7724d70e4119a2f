"""The inner chest wall: how deep under the skin lung may begin (read from where aerated lung meets the wall
and bounded by the ribs), and rays between the lung and the wall (steps 6, 6a and 6n)."""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ..slicewise import map_slices
from .body import Midline
from .density import DENSE_SMOOTH_MM
from .shapes import odd_pixels, piece_means

WALL_BINS = 180                 # directions (2 degrees) of the chest-wall thickness profile
WALL_WINDOW_BINS = 15           # 30 degrees: a pleural lesion narrower than this does not thicken the wall
WALL_TOLERANCE_MM = 2.0
WALL_RAY_MM = 50.0              # how far the rays of between_lung_and_wall look for lung
RAY_COMPACT_SHARE = 8           # ray_hits stops sampling rays that met lung when they are 1/8 of those left
RIB_HU = 200.0                  # bone (cortex and marrow of the ribs) after the dense-tissue mean filter
RIB_MIDLINE_MM = 30.0           # bone nearer the body midline is sternum or spine, not rib
RIB_WINDOW_BINS = 9             # 18 degrees: an intercostal space takes the depth of the ribs beside it
RIB_MARGIN_MM = 3.0             # innermost intercostal muscle, endothoracic fascia and pleura under a rib
RIB_LUNG_PROBABILITY = 0.5      # a piece of bone the lung network gives this on average may lie in the lung (the
                                # network's lung threshold): contrast in lung vessels, a bright speck in consolidation
RIB_LUNG_RAY_SHARE = 0.5        # ... and does when the rays towards the skin of this share of it meet aerated lung,
RIB_MIN_MM2 = 20.0              # or when it is smaller than this (a rib's cross-section is tens of mm2; a speck of
                                # contrast or calcium in consolidation, with no aerated lung outside it, a few)


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


def rib_mask(hu: np.ndarray, trunk: np.ndarray, midline_mm: np.ndarray, spacing_rc: tuple[float, float],
             lung: tuple[np.ndarray, np.ndarray, SkinGeometry] | None = None) -> np.ndarray:
    """Rib pixels of one slice: bone (``RIB_HU`` after the dense-tissue mean filter) of the trunk, at least
    ``RIB_MIDLINE_MM`` from the body midline (``midline_mm``: signed distance; sternum and spine lie nearer).

    With ``lung`` = (the lung network's probability of the slice, its aerated lung, its :class:`SkinGeometry`),
    a connected piece of bone that lies in the lung is not a rib (contrast in a lung vessel, a calcification, a
    bright speck in consolidation would put the bound deep inside the lung): the network gives it at least
    ``RIB_LUNG_PROBABILITY`` on average, and either the rays towards the skin from at least
    ``RIB_LUNG_RAY_SHARE`` of it meet aerated lung within ``WALL_RAY_MM`` or it covers less than
    ``RIB_MIN_MM2``. A rib lies outside the lung, only chest wall between it and the skin, and is large; the
    network alone may give a rib beside consolidation a lung probability."""
    bone = ndi.uniform_filter(hu, odd_pixels(DENSE_SMOOTH_MM, spacing_rc)) >= RIB_HU
    ribs = bone & trunk & (np.abs(midline_mm) >= RIB_MIDLINE_MM)
    if lung is None or not ribs.any():
        return ribs
    prob, aerated, skin = lung
    lab, n = ndi.label(ribs)
    likely = piece_means(lab, n, prob) >= RIB_LUNG_PROBABILITY  # background (0) is not
    small = np.bincount(lab.ravel(), minlength=n + 1) * spacing_rc[0] * spacing_rc[1] < RIB_MIN_MM2
    in_lung = likely & small
    asked = likely & ~small  # the rays decide the larger pieces
    if asked.any():
        rows, cols = np.nonzero(asked[lab])
        meets = np.zeros(hu.shape)
        meets[rows, cols] = ray_hits(aerated, rows, cols, skin, spacing_rc, True, WALL_RAY_MM)
        in_lung |= asked & (piece_means(lab, n, meets) >= RIB_LUNG_RAY_SHARE)
    return ribs & ~in_lung[lab]


def within_chest_wall(cand: np.ndarray, aerated: np.ndarray, trunk: np.ndarray,
                      spacing_rc: tuple[float, float], hu: np.ndarray | None = None,
                      midline: Midline | None = None, prob: np.ndarray | None = None) -> np.ndarray:
    """``cand`` without the pixels that lie beyond the pleura: per slice, a pixel must be at least as deep under
    the skin as the inner chest wall is where aerated lung meets it (:func:`wall_depth_ok`, the rule of step 6;
    interpolated around the body where no aerated lung meets the wall). With ``hu`` and ``midline``, the ribs
    bound that depth (:func:`rib_depths`): where consolidation fills the periphery over a wide arc, aerated
    lung meets no wall and its depth says the wall is thicker than it is; the ribs' inner surface says where
    the wall ends; with ``prob``, the lung network's probability, bone inside the lung is told from ribs
    (:func:`rib_mask`), and no rib pixel is kept (where a rib runs obliquely, its inner cortex lies deeper than
    aerated lung beside it). Slices without aerated lung keep nothing."""
    def kept(k: int) -> tuple[np.ndarray, np.ndarray]:
        rows, cols = np.nonzero(cand[k])
        skin = SkinGeometry(trunk[k], spacing_rc)
        ribs = None if hu is None or midline is None else rib_mask(
            hu[k], trunk[k], midline.signed(k), spacing_rc, None if prob is None else (prob[k], aerated[k], skin))
        ok = wall_depth_ok(aerated[k], skin, rows, cols, interpolate=True, ribs=ribs)
        if ribs is not None:  # a rib is never lung
            ok &= ~ribs[rows, cols]
        return rows[ok], cols[ok]

    out = np.zeros_like(cand)
    ks = [int(k) for k in np.flatnonzero(cand.reshape(cand.shape[0], -1).any(axis=1))
          if aerated[k].any() and trunk[k].any()]
    for k, (rows, cols) in zip(ks, map_slices(kept, ks)):  # one distance transform per slice, over the CPUs
        out[k, rows, cols] = True
    return out

