"""Steps 4, 5 and 7: aerated lung components assigned to right and left, their outlines closed and holes
filled, one connected component per lung."""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ..slicewise import by_slabs, map_slices
from ..types import LungMasks
from .airways import INTERIOR_MM, is_gas
from .shapes import close_2d, fill_holes_per_slice, interior, largest_component, lung_boxes, odd_pixels

CLOSING_MM = 10.0
OPEN_HOLE_MAX_MM2 = 150.0   # larger per-slice holes that open onto non-lung tissue are organs, not lesions
MIN_COMPONENT_FRACTION = 0.05   # of the largest air component
MIN_COMPONENT_AREA_MM2 = 100.0  # per slice spanned (drops specks)
STRADDLE_FRACTION = 0.15        # a component with this much on each side of the midline is split
MAX_SPLIT_EROSIONS = 15
LESION_MEDIAN_HU = (-60.0, 30.0)  # median of a large enclosed hole that is a lesion, not an organ or hilar fat
MIN_2D_PIECE_FRACTION = 0.1     # on one slice, lung pieces smaller than this share of the largest are dropped


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

