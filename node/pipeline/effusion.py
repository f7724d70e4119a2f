"""Pleural effusion, and dense tissue in a hemithorax that is neither lung nor effusion.

Both are looked for in the *dependent pocket* of each hemithorax (:func:`dependent_pocket`): in every
column of voxels along the direction of gravity (posterior for a supine patient, from PatientPosition),
the voxels beyond the most dependent lung voxel of the column and before the ribs behind it. The rib line
is the first bone beyond the lung, taken over ``RIB_WINDOW_MM`` of neighbouring columns (an intercostal
space has no bone in its own column), and across wider gaps between rib sections the chord between them
(up to ``RIB_GAP_MM``; the rib cage is convex, so the chord lies inside it); a band of
``MEDIASTINUM_HALF_WIDTH_MM`` either side of the body midline is left out (oesophagus, azygos, descending
aorta, paraspinal muscles). A voxel with lung dependent
of it (the heart in front of the lower lobes, the liver under a dome) is never in the pocket. The pocket
belongs to the side of the lung above it.

* Effusion: voxels of fluid density (``FLUID_HU`` after a 3x3 in-plane mean),
  inside the body, not lung, with rims thinner than about ``RIM_MM`` opened away, in 3D connected pieces of
  at least ``MIN_EFFUSION_ML`` (a single slice: ``MIN_EFFUSION_CM2``) of which at least
  ``POCKET_SUPPORT`` lies in the dependent pocket (the rest lies beside the lung, in the midline band or
  under its base). The piece goes to the side whose pocket holds most of it, and takes back the fluid
  voxels within ``REGROW_PX`` of it that the opening took away.
* Dense unexplained tissue: voxels of consolidation density (``node.pipeline.lungs.DENSE_HU`` after the
  same mean: above aerated lung, below the unenhanced liver) in the dependent pocket, at least
  ``WALL_MARGIN_MM`` in front of the rib line, that are neither lung nor effusion, after the same rim
  opening. From ``DENSE_NOTE_SHARE`` of that side's lung on, a note says that it was not scored.
  It does not depend on the infection engine (compare :func:`node.pipeline.lungs.missed_dense_note`).

Everything runs on whole arrays (no loop over slices) inside the lungs' bounding box widened by
``BOX_MARGIN_MM``.

What it misses: fluid that is not dependent of aerated lung (a loculated or anterior collection, an effusion
that fills the whole hemithorax with no lung left above it), haemothorax and other fluid denser than
``FLUID_HU`` (reported as dense unexplained tissue instead, when it lies in the pocket), fluid within the
midline band, and dense tissue lateral to or in front of the lung. Pericardial fluid or stomach content of
fluid density that lies dependent of lung with no lung beyond it would be counted.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .lungs.body import midline_offset
from .lungs.density import DENSE_HU, RIM_MM
from .lungs.notes import amount_text
from .types import Effusion, LungMasks, Volume

# Fluid density after a 3x3 mean. Pleural fluid on CT: transudates median 5 HU (range 2-15) and exudates median
# 12.5 HU (range 4-33) (Cullu et al., Diagn Interv Radiol 2014; 106 patients); transudates 5.0 +- 3.4 HU,
# exudates 15.1 +- 5.1 HU (Gumus et al., Clinics 2024; 380 patients); means 7-10 HU, SD 7-9 HU, with much
# overlap (Abramowitz et al., AJR 2009; 100 effusions). -5 HU allows for the +-5 HU of water calibration;
# 25 HU keeps most exudates and leaves unenhanced muscle and blood (35-50 HU) and the liver (50-65 HU) out. The
# densest exudates (empyema, haemorrhagic fluid) and a haemothorax (acute blood 35-70 HU) are not counted.
FLUID_HU = (-5.0, 25.0)
SMOOTH_PX = 3                     # in-plane mean filter before the density tests (noise down), where the
                                  # pixels are not averaged in blocks (``COARSE_MM``) already
BONE_HU = 200.0                   # ribs, spine: the pocket ends at the first of them beyond the lung
WALL_MARGIN_MM = 10.0             # dense unexplained tissue: at least this far in front of the rib line (the
                                  # inner chest wall, endothoracic fat and muscle between ribs, is not counted)
REGROW_PX = 2                     # fluid voxels this close (in-plane) to a found effusion join it (its rim, which
                                  # the opening took away)
RIB_WINDOW_MM = 30.0              # the rib line of a column: the nearest first rib within this width,
RIB_GAP_MM = 100.0                # ... else the chord between the ribs on either side, this far apart at most
MEDIASTINUM_HALF_WIDTH_MM = 50.0  # the band about the body midline left out of the pocket
POCKET_SUPPORT = 0.25             # share of a fluid piece that must lie in a dependent pocket
MIN_EFFUSION_ML = 1.0             # smaller pieces (3D) are not an effusion to report
MIN_EFFUSION_CM2 = 1.0            # ... on a single slice
DENSE_NOTE_SHARE = 0.05           # note dense unexplained tissue from this share of that side's lung
COARSE_MM = 1.5                   # the search runs on blocks of pixels up to this size (find_effusion)
BOX_MARGIN_MM = 40.0              # work box: the lungs' bounding box widened by this in-plane (ribs lie within)

#: The direction of gravity in patient coordinates (LPS: +x left, +y posterior) per PatientPosition.
DEPENDENT_DIRECTION: dict[str, tuple[float, float, float]] = {
    "HFS": (0, 1, 0), "FFS": (0, 1, 0), "HFP": (0, -1, 0), "FFP": (0, -1, 0),
    "HFDR": (-1, 0, 0), "FFDR": (-1, 0, 0), "HFDL": (1, 0, 0), "FFDL": (1, 0, 0),
}
SIDE_NAMES = Effusion.SIDES


def dependent_axes(volume: Volume) -> tuple[int, bool]:
    """(array axis 1 = rows or 2 = columns, reversed?) of the in-plane axis closest to the direction of
    gravity, from the first header's PatientPosition (supine when absent or unknown)."""
    position = str(volume.datasets[0].get("PatientPosition", "")) if volume.datasets else ""
    gravity = np.asarray(DEPENDENT_DIRECTION.get(position.strip().upper(), DEPENDENT_DIRECTION["HFS"]))
    along_rows = float(np.dot(volume.orientation[3:], gravity))     # patient direction of increasing row
    along_cols = float(np.dot(volume.orientation[:3], gravity))     # ... of increasing column
    if abs(along_rows) >= abs(along_cols):
        return 1, along_rows < 0
    return 2, along_cols < 0


def _oriented(a: np.ndarray, axis: int, reverse: bool, back: bool = False) -> np.ndarray:
    """A view of (k, r, c) ``a`` with the dependent direction as increasing axis 1 (``back``: the inverse,
    from that view to (k, r, c))."""
    swap = (lambda x: x) if axis == 1 else (lambda x: np.swapaxes(x, 1, 2))  # noqa: E731
    flip = (lambda x: x[:, ::-1]) if reverse else (lambda x: x)              # noqa: E731
    return swap(flip(a)) if back else flip(swap(a))


def _last_index(mask: np.ndarray) -> np.ndarray:
    """For every voxel of (k, d, w) ``mask``, the largest d' <= d with mask[k, d', w], else -1 (int16)."""
    idx = np.where(mask, np.arange(mask.shape[1], dtype=np.int16)[None, :, None], np.int16(-1))
    return np.maximum.accumulate(idx, axis=1)


def _bridged(line: np.ndarray, missing: int, gap_px: int) -> np.ndarray:
    """(k, w) ``line`` with its ``missing`` values linearly interpolated along w between the known values on
    either side when they are at most ``gap_px`` apart (the chord across the gap between two ribs)."""
    known = line != missing
    w = np.arange(line.shape[1])[None, :]
    before = np.maximum.accumulate(np.where(known, w, -1), axis=1)
    after = np.minimum.accumulate(np.where(known, w, line.shape[1])[:, ::-1], axis=1)[:, ::-1]
    fill = ~known & (before >= 0) & (after < line.shape[1]) & (after - before <= gap_px)
    k_idx, w_idx = np.nonzero(fill)
    b, a = before[k_idx, w_idx], after[k_idx, w_idx]
    t = (w_idx - b) / (a - b)
    out = line.copy()
    out[k_idx, w_idx] = np.rint((1 - t) * line[k_idx, b] + t * line[k_idx, a]).astype(line.dtype)
    return out


def dependent_pocket(lung_labels: np.ndarray, bone: np.ndarray, midline_mm: np.ndarray,
                     width_px: int, gap_px: int) -> tuple[np.ndarray, np.ndarray]:
    """The dependent pocket (module docstring): the side (1 right, 2 left, 0 none) of each of its voxels, and
    for every voxel its distance in pixels to the rib line of its column (int16, meaningful in the pocket).

    Arrays are oriented (k, d, w) with d increasing in the direction of gravity; ``midline_mm``: |distance|
    (mm) of every voxel to the body midline; ``width_px``, ``gap_px``: ``RIB_WINDOW_MM`` and ``RIB_GAP_MM`` in
    pixels along w.
    """
    n_d = lung_labels.shape[1]
    deepest = _last_index(lung_labels > 0)[:, -1, :]   # (k, w): the most dependent lung voxel of each column
    d = np.arange(n_d, dtype=np.int16)[None, :, None]
    beyond = (deepest[:, None, :] >= 0) & (d > deepest[:, None, :])
    # first bone beyond the deepest lung of each column; n_d where there is none
    first_bone = np.where(bone & beyond, d, np.int16(n_d)).min(axis=1)
    rib_line = _bridged(ndi.minimum_filter1d(first_bone, max(width_px, 1), axis=1, mode="nearest"), n_d,
                        gap_px)[:, None, :]
    pocket = beyond & (d < rib_line) & (rib_line < n_d) & (midline_mm >= MEDIASTINUM_HALF_WIDTH_MM)
    k_idx, w_idx = np.nonzero(deepest >= 0)
    side = np.zeros(deepest.shape, np.uint8)            # the side of the deepest lung voxel of the column
    side[k_idx, w_idx] = lung_labels[k_idx, deepest[k_idx, w_idx], w_idx]
    return np.where(pocket, side[:, None, :], np.uint8(0)), (rib_line - d).astype(np.int16)


def _box(labels: np.ndarray, spacing_rc: tuple[float, float]) -> tuple[slice, slice, slice] | None:
    """The bounding box of the lungs, widened in-plane by ``BOX_MARGIN_MM``; None without lung."""
    ks = np.flatnonzero(labels.reshape(labels.shape[0], -1).max(axis=1))
    if ks.size == 0:
        return None
    in_plane = labels[ks[0]:ks[-1] + 1].any(axis=0)
    rows, cols = np.flatnonzero(in_plane.any(axis=1)), np.flatnonzero(in_plane.any(axis=0))
    pad = [int(np.ceil(BOX_MARGIN_MM / s)) for s in spacing_rc]
    return (slice(ks[0], ks[-1] + 1), slice(max(rows[0] - pad[0], 0), rows[-1] + 1 + pad[0]),
            slice(max(cols[0] - pad[1], 0), cols[-1] + 1 + pad[1]))


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    found = ndi.find_objects(mask.view(np.uint8))
    return found[0] if found else None


def _opened(mask: np.ndarray, spacing_rc: tuple[float, float]) -> np.ndarray:
    """In-plane opening with a square of half-width ``RIM_MM`` (at least one pixel): drops rims thinner than
    about twice that (partial volume at the pleura). Separable minimum and maximum filters in the mask's
    bounding box: fast on big boxes. Beyond the box is background (``mode="constant"``), so a piece that fills its
    box is opened like any other."""
    size = (1, *(2 * max(int(RIM_MM / s), 1) + 1 for s in spacing_rc))
    out = np.zeros_like(mask)
    box = _bounding_box(mask)
    if box is not None:
        sub = mask[box]
        eroded = ndi.minimum_filter(sub.view(np.uint8), size=size, mode="constant", cval=0)
        out[box] = ndi.maximum_filter(eroded, size=size, mode="constant", cval=0).view(bool) & sub
    return out


def _fluid_pieces(fluid: np.ndarray, pocket: np.ndarray, min_voxels: int) -> np.ndarray:
    """Side labels of the connected pieces of ``fluid`` of at least ``min_voxels`` voxels, of which at least
    ``POCKET_SUPPORT`` lies in ``pocket``; the side holding most of the piece's pocket voxels."""
    lab, n = ndi.label(fluid, structure=ndi.generate_binary_structure(3, 1) | _in_plane_8())
    if n == 0:
        return np.zeros(fluid.shape, np.uint8)
    where = lab > 0
    flat, in_pocket = lab[where], pocket[where]
    size = np.bincount(flat, minlength=n + 1)
    right = np.bincount(flat[in_pocket == LungMasks.RIGHT], minlength=n + 1)
    left = np.bincount(flat[in_pocket == LungMasks.LEFT], minlength=n + 1)
    ok = (size >= min_voxels) & (right + left >= POCKET_SUPPORT * size)
    side = np.where(ok, np.where(right >= left, LungMasks.RIGHT, LungMasks.LEFT), 0).astype(np.uint8)
    side[0] = 0
    return side[lab]


def _regrown(pieces: np.ndarray, fluid: np.ndarray) -> np.ndarray:
    """``pieces`` (side labels) grown by ``REGROW_PX`` in-plane steps into ``fluid`` (each side into its own),
    in the pieces' bounding box."""
    out = pieces.copy()
    if not pieces.any():
        return out
    ks, rows, cols = _bounding_box(pieces > 0)
    box = (ks, slice(max(rows.start - REGROW_PX, 0), rows.stop + REGROW_PX),
           slice(max(cols.start - REGROW_PX, 0), cols.stop + REGROW_PX))
    cross = np.zeros((3, 3, 3), bool)
    cross[1] = ndi.generate_binary_structure(2, 1)
    sub, sub_out, sub_fluid = pieces[box], out[box], fluid[box]
    for value in SIDE_NAMES:
        seed = sub == value
        grown = ndi.binary_dilation(seed, cross, iterations=REGROW_PX, mask=sub_fluid | seed)
        sub_out[grown & (sub_out == 0)] = value
    return out


def _in_plane_8() -> np.ndarray:
    s = np.zeros((3, 3, 3), bool)
    s[1] = True
    return s


def _reduced(a: np.ndarray, f: int, op: np.ufunc, dtype: type | None = None) -> np.ndarray:
    """``op`` (np.add, np.maximum, np.logical_and, ...) over each block of f x f pixels of (k, r, c) ``a`` (r
    and c multiples of f): f*f strided passes, much faster than a reduction over reshaped block axes."""
    out = a[:, 0::f, 0::f].astype(dtype or a.dtype)
    for i in range(f):
        for j in range(f):
            if i or j:
                op(out, a[:, i::f, j::f], out=out)
    return out


def _spread(coarse: np.ndarray, f: int, out: np.ndarray) -> None:
    """Write each pixel of ``coarse`` over its f x f block of ``out`` (f*f strided assignments)."""
    for i in range(f):
        for j in range(f):
            out[:, i::f, j::f] = coarse


def find_effusion(volume: Volume, lungs: LungMasks) -> Effusion:
    """Pleural effusion per side and dense unexplained tissue (module docstring) of ``volume`` with its
    lung segmentation ``lungs`` (whose ``body`` is used when present).

    The search runs on blocks of f x f pixels (f: the most that keeps them within ``COARSE_MM``; their mean
    HU), a quarter of the work on a 0.7 mm grid; the result is on the volume's grid, never in the lungs.
    """
    spacing_rc = volume.pixel_spacing
    volumetric = volume.is_volumetric
    voxel = spacing_rc[0] * spacing_rc[1] * (volume.slice_spacing if volumetric else 1.0)
    labels = np.zeros(volume.shape, np.uint8)
    dense_out = np.zeros(volume.shape, np.uint8)
    result = Effusion(labels=labels, dense_unexplained=dense_out, volumetric=volumetric, voxel_mm3=voxel)
    found = _box(lungs.labels, spacing_rc)
    if found is None:
        return result
    ks, rows, cols = found
    f = max(1, int(COARSE_MM / max(spacing_rc)))
    rows = slice(rows.start, min(rows.stop, volume.shape[1]))
    cols = slice(cols.start, min(cols.stop, volume.shape[2]))
    box = (ks, slice(rows.start, rows.stop - (rows.stop - rows.start) % f),
           slice(cols.start, cols.stop - (cols.stop - cols.start) % f))
    body = lungs.body[box] if lungs.body is not None else np.ones(lungs.labels[box].shape, bool)
    lung_full = lungs.labels[box]
    hu_full = volume.hu[box]
    hu = _reduced(hu_full, f, np.add, np.float32) / np.float32(f * f)
    bone = _reduced(hu_full, f, np.maximum) >= BONE_HU
    lung_labels = _reduced(lung_full, f, np.maximum)          # a block with lung is not free
    in_body = _reduced(body, f, np.logical_and)
    spacing = (spacing_rc[0] * f, spacing_rc[1] * f)
    smooth = ndi.uniform_filter(hu, size=(1, SMOOTH_PX, SMOOTH_PX)) if f == 1 else hu
    free = in_body & (lung_labels == 0)

    axis, reverse = dependent_axes(volume)
    across = spacing[2 - axis]                                  # spacing along the other in-plane axis
    width_px, gap_px = int(round(RIB_WINDOW_MM / across)), int(round(RIB_GAP_MM / across))
    view = lambda a: _oriented(a, axis, reverse)  # noqa: E731
    pocket, to_ribs = dependent_pocket(view(lung_labels), view(bone), view(np.abs(midline_offset(volume, in_body, f))),
                                       width_px, gap_px)
    pocket, to_ribs = _oriented(pocket, axis, reverse, back=True), _oriented(to_ribs, axis, reverse, back=True)

    raw_fluid = free & (smooth >= FLUID_HU[0]) & (smooth <= FLUID_HU[1])
    block = voxel * f * f
    min_voxels = int(np.ceil((MIN_EFFUSION_ML * 1000.0 if volumetric else MIN_EFFUSION_CM2 * 100.0) / block))
    effusion = _regrown(_fluid_pieces(_opened(raw_fluid, spacing), pocket, min_voxels), raw_fluid)
    margin_px = WALL_MARGIN_MM / spacing[axis - 1]
    dense = _opened(free & (smooth > DENSE_HU[0]) & (smooth <= DENSE_HU[1]) & (effusion == 0) & (pocket > 0)
                    & (to_ribs >= margin_px), spacing)
    dense_sides = np.where(dense, pocket, np.uint8(0))
    _spread(effusion, f, labels[box])
    _spread(dense_sides, f, dense_out[box])
    lung_count = [0, *(np.count_nonzero(lung_full == value) for value in SIDE_NAMES)]
    result.notes = dense_notes(np.bincount(dense_sides.ravel(), minlength=3) * f * f, np.array(lung_count), volume)
    return result


def dense_notes(dense_count: np.ndarray, lung_count: np.ndarray, volume: Volume) -> list[str]:
    """One note per hemithorax whose dense unexplained voxels (``dense_count[side]``) are at least
    ``DENSE_NOTE_SHARE`` of its lung's (``lung_count[side]``)."""
    notes = []
    for value, name in SIDE_NAMES.items():
        n_dense, n_lung = int(dense_count[value]), int(lung_count[value])
        if n_dense == 0 or n_dense < DENSE_NOTE_SHARE * n_lung:
            continue
        notes.append(f"dense tissue of {amount_text(n_dense, volume)} in the {name} hemithorax, between the lung "
                     "and the chest wall, is neither lung nor effusion and was not scored (consolidation, "
                     "atelectasis, a mass or fluid of another density may be excluded; "
                     f"{100 * n_dense / max(n_lung, 1):.0f} % of the {name} lung)")
    return notes
