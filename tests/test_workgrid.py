"""The working grid of lung segmentation (node/pipeline/workgrid.py): geometry, and the way back to the source grid."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from scipy import ndimage as ndi

from node import phantom as ph
from node.pipeline import workgrid
from node.pipeline.lungs import segment_lungs
from node.pipeline.lungs.density import AIR_HU
from node.pipeline.types import Volume

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("spacing", "factor"), [((0.7, 0.7), 2), ((0.9, 0.9), 2), ((0.6, 0.6), 3),
                                                 ((0.95, 0.95), 1), ((2.2, 2.2), 1), ((0.6, 0.95), 1)])
def test_working_pixel_is_the_largest_whole_multiple_not_above_the_limit(spacing, factor):
    assert workgrid.working_factor(spacing) == factor


def _patient(volume: Volume, k: int, r: float, c: float) -> np.ndarray:
    return (volume.positions[k] + c * volume.pixel_spacing[1] * volume.orientation[:3]
            + r * volume.pixel_spacing[0] * volume.orientation[3:])


def test_a_block_sits_at_the_centre_of_its_source_pixels():
    rng = np.random.default_rng(0)
    row_cos = np.array([0.96, 0.28, 0.0])
    col_cos = np.cross([0.0, 0.0, 1.0], row_cos)
    col_cos = -col_cos / np.linalg.norm(col_cos)
    volume = Volume(hu=rng.normal(0, 100, (2, 9, 10)).astype(np.float32),
                    positions=np.array([[-100.0, -80.0, 10.0], [-100.0, -80.0, 12.5]]),
                    orientation=np.concatenate([row_cos, col_cos]), pixel_spacing=(0.7, 0.8), slice_spacing=2.5,
                    sop_instance_uids=["1", "2"], series_instance_uid="1", study_instance_uid="1")
    coarse = workgrid.coarsened(volume, 3)
    assert coarse.shape == (2, 3, 4) and coarse.pixel_spacing == pytest.approx((2.1, 2.4))
    for k, i, j in [(0, 0, 0), (1, 2, 1), (0, 1, 2)]:
        block = [_patient(volume, k, r, c) for r in range(3 * i, 3 * i + 3) for c in range(3 * j, 3 * j + 3)]
        assert np.allclose(_patient(coarse, k, i, j), np.mean(block, axis=0))
        assert coarse.hu[k, i, j] == pytest.approx(volume.hu[k, 3 * i:3 * i + 3, 3 * j:3 * j + 3].mean(), abs=1e-3)
    # the last column block is padded with the edge column (10 columns in blocks of 3)
    assert coarse.hu[0, 0, 3] == pytest.approx(volume.hu[0, 0:3, [9, 9, 9]].mean(), abs=1e-3)



@pytest.mark.parametrize("factor", [2, 3])
def test_block_min_and_any_reduce_each_block_and_upsampled_returns_it(factor):
    rng = np.random.default_rng(factor)
    hu = rng.normal(0, 300, (3, 6 * factor, 4 * factor)).astype(np.float32)
    mask = rng.random(hu.shape) < 0.05
    blocks = lambda a: a.reshape(3, 6, factor, 4, factor)  # noqa: E731
    assert np.array_equal(workgrid.block_min(hu, factor), blocks(hu).min(axis=(2, 4)))
    expected = blocks(mask).any(axis=(2, 4))
    assert expected.any() and not expected.all()  # a comparison that can fail
    assert np.array_equal(workgrid.block_any(mask, factor), expected)
    assert np.array_equal(workgrid.block_any(mask[1], factor), expected[1])  # one slice
    # and back: every source pixel takes its block's value, the last block cut to the source's size
    up = workgrid.upsampled(expected, (3, 6 * factor - 1, 4 * factor - 1), factor)
    assert up.shape == (3, 6 * factor - 1, 4 * factor - 1)
    assert np.array_equal(up, expected.repeat(factor, axis=1).repeat(factor, axis=2)[:, :-1, :-1])

def _slice_with_a_lung() -> tuple[np.ndarray, np.ndarray]:
    """A 0.7 mm slice: aerated lung (an ellipse, -850 HU) in soft tissue, with consolidation (30 HU) against its
    lower edge; and the dense part's mask."""
    rr, cc = np.mgrid[0:120, 0:120]
    hu = np.full((1, 120, 120), 40.0, np.float32)
    aerated = ((rr - 55) / 35.0) ** 2 + ((cc - 60) / 41.0) ** 2 <= 1.0
    dense = ((rr - 88) / 12.0) ** 2 + ((cc - 60) / 25.0) ** 2 <= 1.0
    hu[0][aerated] = -850.0
    hu[0][dense & ~aerated] = 30.0
    return hu, dense & ~aerated


def test_the_outline_returns_to_the_source_pixels_where_the_lung_is_aerated():
    hu, dense = _slice_with_a_lung()
    coarse_hu = workgrid.block_mean(hu, 2)
    # the coarse segmentation: aerated blocks, plus the blocks of the consolidation
    dense_blocks = workgrid.block_mean(dense[None].astype(np.float32), 2) > 0
    labels = ((coarse_hu < AIR_HU) | dense_blocks).astype(np.uint8)
    out = workgrid.upsampled_labels(labels, hu, coarse_hu, 2, AIR_HU)
    # aerated lung: exactly the source threshold, everywhere away from the consolidation
    dense_px = np.repeat(np.repeat(dense_blocks[0], 2, 0), 2, 1)
    far = ~ndi.binary_dilation(dense_px, iterations=3)
    assert np.array_equal((out[0] > 0)[far], (hu[0] < AIR_HU)[far])
    # consolidation: each of its blocks stays lung whole (the HU cannot place that outline)
    assert out[0][dense_px].all()
    # the staircase of the nearest-neighbour upsampling is gone from the aerated outline
    nearest = workgrid.upsampled(labels, hu.shape, 2)
    assert (nearest != (hu < AIR_HU))[0][far].sum() > 20


def test_segmentation_on_the_working_grid_matches_the_source_grid(monkeypatch):
    """The node's method on a phantom with 0.8 mm pixels (2 x 2 blocks): the two grids agree, and the working
    grid is as close to the truth (bench/lungs_working_grid.py measures more cases, and the HU method)."""
    logging.disable(logging.WARNING)
    try:
        p = ph.make_phantom(rows=448, cols=448, pixel_spacing=0.8, slices=16, slice_spacing=5.0, seed=2,
                            burden={"right_lower": 0.8})
        volume = p.as_volume()
        work = segment_lungs(volume).labels
        monkeypatch.setattr(workgrid, "working_factor", lambda spacing, max_mm=None: 1)
        source = segment_lungs(volume).labels
    finally:
        logging.disable(logging.NOTSET)
    assert work.shape == source.shape == volume.shape
    for value, truth in ((1, p.masks["right_lung"]), (2, p.masks["left_lung"])):
        a, b = work == value, source == value
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.98
        dice = [2 * (m & truth).sum() / (m.sum() + truth.sum()) for m in (a, b)]
        assert dice[0] > dice[1] - 0.002  # measured: 0.0003 lower and equal (right, left)
