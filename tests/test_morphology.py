"""The separable binary morphology (node.pipeline.morphology) equals scipy.ndimage's with the same disks."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi

from node.pipeline import morphology
from node.pipeline.lungs.shapes import close_2d, disk

pytestmark = pytest.mark.unit

# (radius mm, (row, column) spacing mm): the lung steps' disks on typical grids, anisotropic ones included
DISKS = [(2.0, (0.7, 0.7)), (2.5, (0.7, 0.7)), (2.0, (0.4, 0.4)), (10.0, (0.7, 0.7)), (5.0, (0.6, 0.9)),
         (0.7, (0.7, 0.7)), (3.0, (2.0, 0.5))]


@pytest.fixture(scope="module")
def masks() -> np.ndarray:
    """Blobs of every size, touching the image border too, and a large ellipse with holes, on 5 slices."""
    rng = np.random.default_rng(0)
    blobs = ndi.gaussian_filter(rng.random((5, 97, 83)), (0, 2.5, 2.5)) > 0.5
    r, c = np.ogrid[:97, :83]
    ellipse = ((r - 50) / 38.0) ** 2 + ((c - 40) / 30.0) ** 2 <= 1
    holes = ndi.gaussian_filter(rng.random((5, 97, 83)), (0, 1.5, 1.5)) > 0.58
    return blobs | (ellipse & ~holes)


@pytest.mark.parametrize("radius,spacing", DISKS)
def test_equals_scipy(masks, radius, spacing):
    structure = disk(radius, spacing)
    for ours, theirs in ((morphology.binary_erosion, ndi.binary_erosion),
                         (morphology.binary_dilation, ndi.binary_dilation),
                         (morphology.binary_opening, ndi.binary_opening)):
        expected = theirs(masks, structure=structure)
        assert expected.any() and not np.array_equal(expected, masks)  # a comparison that can fail
        assert np.array_equal(ours(masks, structure), expected), ours.__name__
        assert np.array_equal(ours(masks[2], structure[0]), theirs(masks[2], structure=structure[0]))  # 2D


@pytest.mark.parametrize("radius,spacing", DISKS[:4])
def test_sparse_masks_equal_scipy(masks, radius, spacing):
    """Work is limited to the pixels' bounding box: a few blobs far from each other, near the image edges
    and on some slices only, and an empty mask, give scipy's result."""
    structure = disk(radius, spacing)
    sparse = np.zeros((7, 160, 150), bool)
    sparse[1, :40, -30:] = masks[0, :40, :30]      # at the top right corner
    sparse[4, 100:140, 60:100] = masks[3, 50:90, 20:60]
    sparse[5, 150:, :10] = True                    # a bar along the bottom edge
    for ours, theirs in ((morphology.binary_erosion, ndi.binary_erosion),
                         (morphology.binary_dilation, ndi.binary_dilation),
                         (morphology.binary_opening, ndi.binary_opening)):
        expected = theirs(sparse, structure=structure)
        assert np.array_equal(ours(sparse, structure), expected), ours.__name__
        assert not ours(np.zeros_like(sparse), structure).any()


def test_rectangles_of_a_disk():
    # radius 2.5 mm at 0.7 mm: half widths 3, 3, 2, 1 by row offset 0-3 -> rectangles (1, 3), (2, 2), (3, 1)
    assert morphology.rectangles(disk(2.5, (0.7, 0.7))) == ((1, 3), (2, 2), (3, 1))
    assert morphology.rectangles(np.ones((1, 5, 5), bool)) == ((2, 2),)


@pytest.mark.parametrize("element", [np.eye(3, dtype=bool), np.ones((2, 3), bool),
                                     np.array([[1, 0, 1], [1, 1, 1], [1, 0, 1]], bool)])
def test_refuses_elements_it_cannot_decompose(element):
    with pytest.raises(ValueError):
        morphology.rectangles(element)


@pytest.mark.parametrize("radius,spacing", DISKS)
def test_closing_by_distance_transforms_equals_scipy(masks, radius, spacing):
    """``close_2d`` (two distance transforms on the mask's bounding box) is the closing by the same disk,
    computed on a canvas wide enough that its border plays no part, on blobs that touch the image edge and on
    an empty slice."""
    structure = disk(radius, spacing)[0]
    margin = 2 * max(structure.shape) + 2
    for mask in (*masks, np.zeros_like(masks[0])):
        canvas = np.pad(mask, margin)
        expected = ndi.binary_erosion(ndi.binary_dilation(canvas, structure), structure)[margin:-margin,
                                                                                            margin:-margin] | mask
        assert np.array_equal(close_2d(mask, radius, spacing), expected)
    assert not np.array_equal(close_2d(masks[0], radius, spacing), masks[0])  # a comparison that can fail
