"""bench/lung_variants.py: the lung benches switch steps off for a block and restore them after it."""
from __future__ import annotations

import pytest

from bench.lung_variants import STEPS, steps_off
from node.pipeline import lungs as lungs_mod
from node.pipeline.lungs import net as net_step

pytestmark = pytest.mark.unit


def test_steps_are_switched_off_where_segment_lungs_calls_them_and_restored():
    originals = (lungs_mod.recover_dense_periphery, lungs_mod.recover_between_slices, net_step.within_chest_wall)
    with steps_off("6", "6b", "wall"):
        assert lungs_mod.recover_dense_periphery is STEPS["6"][2]
        assert lungs_mod.recover_between_slices is STEPS["6b"][2]
        assert net_step.within_chest_wall is STEPS["wall"][2]
        assert lungs_mod.recover_bronchograms is not STEPS["6a"][2]   # only the steps named
    assert (lungs_mod.recover_dense_periphery, lungs_mod.recover_between_slices,
            net_step.within_chest_wall) == originals


def test_steps_are_restored_after_an_error():
    original = net_step.within_chest_wall
    with pytest.raises(RuntimeError), steps_off("wall"):
        raise RuntimeError("bench failed")
    assert net_step.within_chest_wall is original
    with pytest.raises(KeyError), steps_off("6", "no such step"):
        pass
    assert lungs_mod.recover_dense_periphery is not STEPS["6"][2]
