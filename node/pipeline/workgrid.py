"""The coarser in-plane grid that lung segmentation works on, and the way back to the source grid.

A CT slice of 512 x 512 pixels of 0.6-0.9 mm holds far finer detail than the lung rules need (their smallest
lengths are millimetres: a 2.5 mm rim opening, a 10 mm closing), and their cost grows with the pixel count.
:func:`coarsened` averages blocks of ``factor`` x ``factor`` pixels (the mean HU, as a reconstruction with
larger pixels would give) into a :class:`Volume` whose geometry places each block at its centre, so patient
coordinates stay right; slices are not combined. :func:`upsampled_labels` brings a label map back to the
source grid: each pixel takes its block's label, then, along the lung outline only, the source pixels decide
where aerated lung ends: an aerated pixel (below ``air_hu``) in a block just outside a lung joins that lung,
and a denser pixel at the outer edge of a lung block that is aerated on average leaves it. Outlines through
dense tissue (consolidation against the chest wall, which the HU cannot place) keep the block edge.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from . import morphology
from .types import Volume

MAX_WORK_PIXEL_MM = 1.8   # the working pixel: the largest whole multiple of the source pixel not above this


def working_factor(pixel_spacing: tuple[float, float], max_mm: float = MAX_WORK_PIXEL_MM) -> int:
    """How many source pixels (per row and per column) one working pixel spans; 1 keeps the source grid."""
    return max(1, int(np.floor(max_mm / max(pixel_spacing) + 1e-9)))


def padded(hu: np.ndarray, factor: int) -> np.ndarray:
    """``hu`` with its rows and columns extended (edge values) to multiples of ``factor``."""
    pad_r, pad_c = -hu.shape[1] % factor, -hu.shape[2] % factor
    return np.pad(hu, ((0, 0), (0, pad_r), (0, pad_c)), mode="edge") if pad_r or pad_c else hu


def block_mean(hu: np.ndarray, factor: int) -> np.ndarray:
    """Mean of each ``factor`` x ``factor`` block of every slice of ``hu`` (float32)."""
    a = padded(hu, factor)
    out = np.zeros((a.shape[0], a.shape[1] // factor, a.shape[2] // factor), np.float32)
    for i in range(factor):  # strided sums: five times faster than a mean over a reshaped view
        for j in range(factor):
            out += a[:, i::factor, j::factor]
    out *= np.float32(1.0 / factor ** 2)
    return out


def _strided(a: np.ndarray, factor: int, op: np.ufunc) -> np.ndarray:
    """``op`` (np.minimum, np.logical_or) over each ``factor`` x ``factor`` block of the last two axes of ``a``
    (multiples of ``factor``), as strided in-place reductions: five times faster than over reshaped blocks."""
    out = a[..., ::factor, ::factor].copy()
    for i in range(factor):
        for j in range(factor):
            if i or j:
                op(out, a[..., i::factor, j::factor], out=out)
    return out


def block_min(hu: np.ndarray, factor: int) -> np.ndarray:
    """Minimum of each ``factor`` x ``factor`` block of every slice of ``hu``."""
    return _strided(padded(hu, factor), factor, np.minimum)


def coarsened(volume: Volume, factor: int) -> Volume:
    """``volume`` on the grid of ``factor`` x ``factor`` blocks (``volume`` itself for factor 1)."""
    if factor == 1:
        return volume
    row_cos, col_cos = volume.orientation[:3], volume.orientation[3:]
    sr, sc = volume.pixel_spacing
    # the first block's centre lies (factor - 1) / 2 source pixels down and right of the first pixel
    shift = (factor - 1) / 2.0 * (sr * col_cos + sc * row_cos)
    return dataclasses.replace(volume, hu=block_mean(volume.hu, factor), positions=volume.positions + shift,
                               pixel_spacing=(sr * factor, sc * factor))


def upsampled(mask: np.ndarray, shape: tuple[int, ...], factor: int) -> np.ndarray:
    """Each source pixel of ``shape`` takes the value of its block in ``mask`` (nearest neighbour; the last two
    axes are rows and columns: a volume or one slice)."""
    if factor == 1:
        return mask
    out = np.empty((*mask.shape[:-2], shape[-2], shape[-1]), mask.dtype)
    for i in range(factor):  # strided copies straight into the source grid: a third faster than np.repeat
        for j in range(factor):
            part = out[..., i::factor, j::factor]
            part[...] = mask[..., :part.shape[-2], :part.shape[-1]]
    return out


def block_any(mask: np.ndarray, factor: int) -> np.ndarray:
    """Whether each ``factor`` x ``factor`` block of ``mask`` (the last two axes, multiples of ``factor``) holds
    a pixel."""
    return _strided(mask, factor, np.logical_or)


def upsampled_labels(labels: np.ndarray, hu: np.ndarray, coarse_hu: np.ndarray, factor: int, air_hu: float,
                     keep_out: np.ndarray | None = None) -> np.ndarray:
    """The lung ``labels`` of the coarse grid on the source grid of ``hu`` (module docstring).

    ``coarse_hu``: the block means the labels were made from; ``keep_out``: coarse blocks no lung may grow into
    (the airways)."""
    if factor == 1:
        return labels
    out = upsampled(labels, hu.shape, factor)
    rows, cols = np.flatnonzero(labels.any(axis=(0, 2))), np.flatnonzero(labels.any(axis=(0, 1)))
    if rows.size == 0:
        return out
    # the outline lies in the lungs' box widened by one block
    box = (slice(None), slice(max(int(rows[0]) - 1, 0), int(rows[-1]) + 2),
           slice(max(int(cols[0]) - 1, 0), int(cols[-1]) + 2))
    src = (slice(None), slice(box[1].start * factor, min(box[1].stop * factor, hu.shape[1])),
           slice(box[2].start * factor, min(box[2].stop * factor, hu.shape[2])))
    out[src] = _refined(labels[box], out[src], hu[src], coarse_hu[box], factor, air_hu,
                        None if keep_out is None else keep_out[box])
    return out


def _pixels(blocks: np.ndarray, factor: int, shape: tuple[int, int, int]) -> tuple[np.ndarray, ...]:
    """Source (k, r, c) indices of the pixels of the ``blocks`` (a coarse mask), inside ``shape``."""
    k, i, j = np.nonzero(blocks)
    d = np.arange(factor)
    r = (i[:, None, None] * factor + d[None, :, None]).repeat(factor, axis=2).ravel()
    c = (j[:, None, None] * factor + d[None, None, :]).repeat(factor, axis=1).ravel()
    k = np.repeat(k, factor * factor)
    inside = (r < shape[1]) & (c < shape[2])
    return k[inside], r[inside], c[inside]


def _refined(labels: np.ndarray, out: np.ndarray, hu: np.ndarray, coarse_hu: np.ndarray, factor: int,
             air_hu: float, keep_out: np.ndarray | None) -> np.ndarray:
    """The outline refinement of :func:`upsampled_labels` on one box: ``out`` is ``labels`` upsampled. Only the
    pixels of the blocks on the outline are looked at."""
    near = functools.partial(morphology.binary_dilation, structure=morphology.NEIGHBOURS)
    lung = labels > 0
    # blocks just outside exactly one lung (not two: the junction of the lungs keeps its block edge)
    near_right = near(labels == 1)
    grow = ~lung & (near_right ^ near(labels == 2))
    if keep_out is not None:
        grow &= ~near(keep_out)
    # lung blocks on the outline that are aerated on average: their outer dense pixels are chest wall
    shrink = lung & near(~lung) & (coarse_hu < air_hu)
    out = out.copy()
    k, r, c = _pixels(grow, factor, hu.shape)
    take = hu[k, r, c] < air_hu
    k, r, c = k[take], r[take], c[take]
    out[k, r, c] = np.where(near_right[k, r // factor, c // factor], 1, 2)
    k, r, c = _pixels(shrink, factor, hu.shape)
    dense = hu[k, r, c] >= air_hu
    k, r, c = k[dense], r[dense], c[dense]
    # a source neighbour (4-connected, in plane; none beyond the image) outside the lung
    last_r, last_c = hu.shape[1] - 1, hu.shape[2] - 1
    beside = ((out[k, np.maximum(r - 1, 0), c] == 0) | (out[k, np.minimum(r + 1, last_r), c] == 0)
              | (out[k, r, np.maximum(c - 1, 0)] == 0) | (out[k, r, np.minimum(c + 1, last_c)] == 0))
    out[k[beside], r[beside], c[beside]] = 0
    return out
