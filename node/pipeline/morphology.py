"""Binary erosion, dilation and opening of masks slice by slice with a symmetric 2D structuring element (the
disks of :func:`node.pipeline.lungs.disk`), equal to ``scipy.ndimage.binary_erosion`` / ``binary_dilation`` /
``binary_opening`` with that element (outside the image counts as background), computed as separable minimum
and maximum filters: such an element is the union of a few centred rectangles, erosion by a union is the
intersection of the erosions by its rectangles, dilation the union of the dilations. The cost grows with the
number of rectangles (about the radius in pixels), not with the element's area as scipy's does, and only the
bounding box of the mask's pixels (widened by the element) is filtered.
"""
from __future__ import annotations

import functools

import numpy as np
import scipy.ndimage as ndi


NEIGHBOURS = np.ones((3, 3), bool)  # a pixel and its 8 neighbours in plane


@functools.cache
def _rectangles(rows: tuple[tuple[bool, ...], ...]) -> tuple[tuple[int, int], ...]:
    element = np.array(rows, bool)
    h, w = element.shape
    if h % 2 == 0 or w % 2 == 0 or not np.array_equal(element, element[::-1, ::-1]) or not element.any():
        raise ValueError("the structuring element must be non-empty, odd-sized and symmetric about its centre")
    cr, cc = h // 2, w // 2
    spans = []  # (half height, half width) of the rectangle reaching row cr + dy
    for dy in range(cr + 1):
        row = np.flatnonzero(element[cr + dy])
        if row.size:
            spans.append((dy, int(row.max()) - cc))
    rects = tuple(r for r in spans if not any(o != r and o[0] >= r[0] and o[1] >= r[1] for o in spans))
    union = np.zeros_like(element)
    for hh, hw in rects:
        union[cr - hh:cr + hh + 1, cc - hw:cc + hw + 1] = True
    if not np.array_equal(union, element):
        raise ValueError("the structuring element is not a union of centred rectangles (not convex)")
    return rects


def rectangles(structure: np.ndarray) -> tuple[tuple[int, int], ...]:
    """(half height, half width) of the centred rectangles whose union is the 2D ``structure`` (shape (h, w) or
    (1, h, w)); ValueError if it has no such form (not symmetric, or not convex along rows and columns)."""
    element = np.asarray(structure, bool)
    if element.ndim == 3 and element.shape[0] == 1:
        element = element[0]
    if element.ndim != 2:
        raise ValueError(f"a 2D structuring element is needed, not shape {structure.shape}")
    return _rectangles(tuple(map(tuple, element.tolist())))


def _box(mask: np.ndarray, reach: tuple[int, int]) -> tuple[slice, ...] | None:
    """The bounding box of ``mask``'s pixels, widened in-plane by ``reach`` (clipped); None when it is empty."""
    box = []
    grow_by_axis = (0,) * (mask.ndim - 2) + tuple(reach)  # leading axes (slices) are not filtered across
    for axis, grow in enumerate(grow_by_axis):
        idx = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if idx.size == 0:
            return None
        box.append(slice(max(int(idx[0]) - grow, 0), int(idx[-1]) + grow + 1))
    return tuple(box)


def _filtered(mask: np.ndarray, structure: np.ndarray, filt, combine) -> np.ndarray:
    # only the bounding box of the pixels, widened by the element's reach, can hold any of the result
    rects = rectangles(structure)
    m = np.ascontiguousarray(mask, dtype=bool)
    out = np.zeros_like(m)
    box = _box(m, (max(h for h, _ in rects), max(w for _, w in rects)))
    if box is None:
        return out
    sub = np.ascontiguousarray(m[box]).view(np.uint8)
    part_out = None
    for hh, hw in rects:
        size = (1,) * (m.ndim - 2) + (2 * hh + 1, 2 * hw + 1)  # in-plane only: each slice on its own
        part = filt(sub, size=size, mode="constant", cval=0).view(bool)
        part_out = part if part_out is None else combine(part_out, part, out=part_out)
    out[box] = part_out
    return out


def binary_erosion(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """Erosion of every 2D slice (the last two axes) of ``mask`` by ``structure``."""
    return _filtered(mask, structure, ndi.minimum_filter, np.logical_and)


def binary_dilation(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """Dilation of every 2D slice (the last two axes) of ``mask`` by ``structure``."""
    return _filtered(mask, structure, ndi.maximum_filter, np.logical_or)


def binary_opening(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """Opening (erosion, then dilation) of every 2D slice (the last two axes) of ``mask`` by ``structure``."""
    return binary_dilation(binary_erosion(mask, structure), structure)
