"""Step 1 and the patient frame: the body outline, its bounding box, the body midline (right / left, the
trunk), the outside air, and lung cut by the field of view."""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
from scipy import ndimage as ndi

from .. import morphology
from ..slicewise import by_slabs
from ..types import Volume
from .density import AIR_HU
from .shapes import disk, fill_holes_per_slice, largest_component, largest_per_slice

BODY_HU = -500.0        # soft tissue vs air/fat-free boundary used for the body outline
BODY_OPENING_MM = 2.0
BOX_MARGIN_PX = 8               # segment_lungs works in the body's bounding box widened by this (air around it)
FOV_LUNG_MEDIAN_HU = -900.0     # lung_cut_by_fov: air outside the body outline with a median above this is lung
                                # (aerated lung about -850 HU, room air -1000; not nearer -1000: a pocket of air
                                # and fabric between arm and chest read -943; a cut emphysematous lung may go unseen)
FOV_LUNG_MIN_CM2 = 1.0          # ... in a region of at least this area (specks at the skin are under 0.2 cm2)
FOV_LUNG_WALLED = 0.65          # ... with at least this share of its outline, beyond the cut, against the body
                                # (foam pads under the patient on the shared real slices: 0.58 at most)


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


def midline_offset(volume: Volume, body: np.ndarray, f: int = 1) -> np.ndarray:
    """Signed patient-x distance (mm, float32; + is the patient's left) of the voxels of ``body`` (a box of the
    volume) to their slice's body midline, the x-centroid of the body in the box: a cheap reading for steps that
    need only a band about the midline (:class:`Midline` excludes the arms). ``f``: the box's pixels are blocks
    of f x f. Where patient x follows the columns only (or the rows only), the array has one row (one column) and
    broadcasts."""
    n, rows, cols = body.shape
    x_per_row = f * volume.pixel_spacing[0] * volume.orientation[3]   # patient x per row, per column
    x_per_col = f * volume.pixel_spacing[1] * volume.orientation[0]
    count = body.sum(axis=(1, 2))
    x_sum = (body.sum(axis=2, dtype=np.int64) @ np.arange(rows) * x_per_row
             + body.sum(axis=1, dtype=np.int64) @ np.arange(cols) * x_per_col)
    mid = (x_sum / np.maximum(count, 1)).astype(np.float32)[:, None, None]
    x_r = (np.arange(rows if abs(x_per_row) > 1e-6 else 1) * x_per_row).astype(np.float32)[None, :, None]
    x_c = (np.arange(cols if abs(x_per_col) > 1e-6 else 1) * x_per_col).astype(np.float32)[None, None, :]
    return x_r + x_c - mid


def superior_is_high_k(volume: Volume) -> bool:
    """True when the slice index grows towards the head (normal has a positive patient-z component)."""
    return bool(volume.normal[2] >= 0)


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

