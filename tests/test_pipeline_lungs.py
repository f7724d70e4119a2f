"""HU-based lung segmentation on synthetic chests with known right and left lungs."""
from __future__ import annotations

import numpy as np

from node.pipeline.lungs import segment_lungs
from node.pipeline.types import LungMasks
from tests.test_pipeline_helpers import dice, single_slice, synthetic_chest


def test_right_and_left_lungs_standard_orientation():
    chest = synthetic_chest()
    lungs = segment_lungs(chest.volume)
    assert lungs.labels.dtype == np.uint8 and lungs.labels.shape == chest.volume.shape
    assert dice(lungs.right, chest.right) > 0.9 and dice(lungs.left, chest.left) > 0.9
    assert not lungs.partial_coverage
    assert lungs.body is not None and lungs.body[:, 48, 48].all()
    assert (lungs.lungs & ~(chest.right | chest.left)).sum() < 0.05 * (chest.right | chest.left).sum()
    # table, outside air and the trachea are not lung
    assert not lungs.lungs[:, 90:, :].any()
    assert lungs.airways is not None and lungs.airways.any()
    assert not (lungs.airways & lungs.lungs).any()


def test_sides_follow_the_orientation_vector():
    chest = synthetic_chest(orientation=(-1.0, 0.0, 0.0, 0.0, 1.0, 0.0))  # row direction to patient right
    lungs = segment_lungs(chest.volume)
    assert dice(lungs.right, chest.right) > 0.9 and dice(lungs.left, chest.left) > 0.9
    # the lung drawn at small column index is the patient's LEFT lung here
    cols_left = np.nonzero(lungs.left.any(axis=(0, 1)))[0]
    assert cols_left.max() < chest.volume.shape[2] / 2


def test_partial_coverage_when_lungs_reach_the_ends():
    chest = synthetic_chest(lung_slices=(0, 12))
    lungs = segment_lungs(chest.volume)
    assert lungs.partial_coverage and any("first or last slice" in n for n in lungs.notes)


def test_single_slice_2d_path():
    chest = single_slice(synthetic_chest())
    lungs = segment_lungs(chest.volume)
    assert lungs.labels.shape == (1, 96, 96)
    assert dice(lungs.right, chest.right) > 0.9 and dice(lungs.left, chest.left) > 0.9
    assert lungs.partial_coverage and any("single slice" in n for n in lungs.notes)


def test_touching_lungs_are_split_at_the_midline():
    chest = synthetic_chest(trachea=False)
    hu = chest.volume.hu
    k0, k1 = 5, 11
    hu[k0:k1, 44:52, 30:66] = -850.0  # an aerated bridge between the lungs (anterior junction)
    lungs = segment_lungs(chest.volume)
    assert dice(lungs.right, chest.right) > 0.85 and dice(lungs.left, chest.left) > 0.85
    assert any("lungs touch" in n for n in lungs.notes)
    rc = np.nonzero(lungs.right.any(axis=(0, 1)))[0]
    lc = np.nonzero(lungs.left.any(axis=(0, 1)))[0]
    assert rc.max() < lc.min()  # no interleaving across the split


def test_gas_without_vessels_is_not_lung():
    chest = synthetic_chest(lung_slices=(3, 13))
    hu = chest.volume.hu
    rr, cc = np.mgrid[0:96, 0:96]
    bubble = (rr - 50) ** 2 + (cc - 48) ** 2 <= 144  # a large stomach-like gas pocket below the lungs
    hu[0:2][:, bubble] = -1000.0 + np.random.default_rng(1).normal(0, 10, (2, int(bubble.sum())))
    lungs = segment_lungs(chest.volume)
    assert not lungs.lungs[0:2].any()
    assert any("gas-filled region" in n for n in lungs.notes)
    assert dice(lungs.lungs, chest.right | chest.left) > 0.9


def test_no_lung_in_an_abdomen_like_volume():
    chest = synthetic_chest()
    chest.volume.hu[chest.right | chest.left] = 40.0  # solid organs instead of lungs
    lungs = segment_lungs(chest.volume)
    assert not lungs.lungs.any()
    assert lungs.labels.max() == 0 and LungMasks.RIGHT == 1 and LungMasks.LEFT == 2
