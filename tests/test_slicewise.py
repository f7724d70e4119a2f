"""Per-slice work on worker threads (node/pipeline/slicewise.py) gives what one loop gives."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from node import phantom as ph
from node.pipeline import slicewise
from node.pipeline.lungs import segment_lungs

pytestmark = pytest.mark.unit


@pytest.fixture
def three_workers(monkeypatch):
    monkeypatch.setattr(slicewise, "workers", lambda: 3)


def test_map_slices_keeps_the_order_and_sees_the_arrays(three_workers):
    volume = np.arange(7 * 4 * 5, dtype=np.float32).reshape(7, 4, 5)
    ks = [6, 0, 3, 2, 5]
    got = slicewise.map_slices(lambda k: (k, volume[k].sum()), ks)
    assert got == [(k, volume[k].sum()) for k in ks]


def test_an_error_in_a_worker_is_raised_in_the_caller(three_workers):
    def fail_on_four(k: int) -> int:
        if k == 4:
            raise ValueError("slice 4")
        return k

    with pytest.raises(ValueError, match="slice 4"):
        slicewise.map_slices(fail_on_four, range(8))


def test_by_slabs_equals_the_whole_volume_call(three_workers):
    rng = np.random.default_rng(0)
    mask = ndi.uniform_filter(rng.random((40, 30, 30)), (1, 5, 5)) > 0.5
    opening = lambda m: ndi.binary_opening(m, structure=np.ones((1, 3, 3), bool))  # noqa: E731
    assert np.array_equal(slicewise.by_slabs(opening, mask), opening(mask))


def test_segment_lungs_on_threads_equals_one_thread(monkeypatch):
    p = ph.make_phantom(rows=128, cols=128, slices=40, pixel_spacing=2.75, slice_spacing=7.5, seed=2,
                        burden={"right_lower": 0.8, "left_upper": 0.3})
    volume = p.as_volume()
    monkeypatch.setattr(slicewise, "workers", lambda: 1)
    alone = segment_lungs(volume)
    monkeypatch.setattr(slicewise, "workers", lambda: 3)
    spread = segment_lungs(volume)
    assert alone.labels.any() and np.array_equal(alone.labels, spread.labels)
    assert alone.notes == spread.notes
