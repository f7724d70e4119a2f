"""Checks of the test data builders (tests/builders.py): a synthetic chest's lungs lie where its orientation
says, and a written series decodes to the Hounsfield units it was given."""
from __future__ import annotations

import numpy as np
import pytest

from tests.builders import ct_header, synthetic_chest, write_series

pytestmark = pytest.mark.unit


def test_synthetic_chest_lungs_are_where_the_orientation_says():
    std = synthetic_chest()
    cols = np.nonzero(std.right.any(axis=(0, 1)))[0]
    assert cols.max() < std.volume.shape[2] / 2  # patient right = small column for [1,0,0,0,1,0]
    mirrored = synthetic_chest(orientation=(-1.0, 0, 0, 0, 1.0, 0))
    assert np.nonzero(mirrored.right.any(axis=(0, 1)))[0].min() > mirrored.volume.shape[2] / 2


def test_written_series_round_trips(tmp_path):
    import pydicom

    hu = np.arange(2 * 8 * 8, dtype=float).reshape(2, 8, 8) - 1000
    paths = write_series(tmp_path, hu, rescale=[(1.0, -1024.0), (2.0, -2048.0)])
    ds = pydicom.dcmread(paths[1])
    got = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(got, hu[1], atol=1.0)
    with pytest.raises(AttributeError):
        _ = ct_header(BodyPartExamined=None).BodyPartExamined
