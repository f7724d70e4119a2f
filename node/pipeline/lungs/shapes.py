"""Mask helpers of the lung steps: structuring elements in millimetres, hole filling, components, and
per-lung, per-slice iteration."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from .. import morphology
from ..slicewise import map_slices
from ..types import LungMasks


def piece_means(lab: np.ndarray, n: int, values: np.ndarray) -> np.ndarray:
    """Mean of ``values`` over each connected piece of the labelling ``lab`` (``n`` pieces, 0 = background):
    an array of n + 1, index 0 set to 0. Sums over the labelled voxels only (cheaper than over the whole box)."""
    inside = lab > 0
    size = np.bincount(lab[inside], minlength=n + 1)
    means = np.bincount(lab[inside], weights=values[inside], minlength=n + 1) / np.maximum(size, 1)
    means[0] = 0.0
    return means


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


def interior(mask: np.ndarray, size: int) -> np.ndarray:
    """``mask`` (k, r, c) eroded slice by slice with a square of ``size`` pixels (``INTERIOR_MM``; two 1D
    minimum filters: the same as a binary erosion with that square, sooner)."""
    out = mask.view(np.uint8)
    for axis in (1, 2):
        out = ndi.minimum_filter1d(out, size, axis=axis, mode="constant", cval=0)
    return out.view(bool)


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

