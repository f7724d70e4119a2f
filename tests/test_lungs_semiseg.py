"""The lung mask on real disease with expert masks: the COVID-SemiSeg test slices (bench/lungs_on_semiseg.py).

Infection left out of the lung mask is lost from every score. Measured on 2026-11-27 (a 2-core x86-64 CPU, the bench's
command): 0.862 of the expert infection and 0.623 of the expert consolidation lie inside the default lung
mask, against 0.750 and 0.344 with the dense-disease recovery steps switched off. The floors below sit a few
points under the measured values, so that a change to the lung steps that loses real consolidation fails.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from tests.support import SHARED_DATA, skip_or_fail

pytestmark = [pytest.mark.unit, pytest.mark.slow]  # the bench measures 48 slices: minutes


def load_bench():
    """The bench script as a module (bench/ is a folder of scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "bench" / "lungs_on_semiseg.py"
    spec = importlib.util.spec_from_file_location("lungs_on_semiseg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lung_mask_keeps_expert_consolidation():
    data = SHARED_DATA / "covid-semiseg"
    if not (data / "TestingSet" / "MultiClassInfection-Test" / "Imgs").is_dir():
        skip_or_fail(f"COVID-SemiSeg test slices not found under {data}")
    bench = load_bench()
    inside, truth, per_slice = bench.measure(data, variants=("no recovery", "HU: 6 + 6a"))
    assert len(per_slice) == 48 and truth[2] > 0
    off = inside["no recovery"][:3] / truth
    on = inside["HU: 6 + 6a"][:3] / truth
    assert on[0] >= 0.83 and on[2] >= 0.58, on            # infection, consolidation
    assert on[2] - off[2] >= 0.2, (off, on)               # the recovery steps bring back real consolidation
    assert np.all(on >= off), (off, on)                   # and lose no expert pixels in any class


def test_why_missed_accounts_for_every_left_out_pixel():
    """``--why``: the causes of the left-out expert consolidation add up to exactly what the net lung mask
    leaves out (the 10 validation slices: seconds)."""
    data = SHARED_DATA / "covid-semiseg"
    if not (data / "TrainingSet" / "MultiClassInfection-Train" / "Imgs").is_dir():
        skip_or_fail(f"COVID-SemiSeg training slices not found under {data}")
    bench = load_bench()
    inside, truth, _ = bench.measure(data, variants=("lung network",), split="val")
    total, causes = bench.why_missed(data, split="val")
    assert total == truth[2] > 0 and len(causes) == len(bench.MISS_CAUSES) and (causes >= 0).all()
    assert causes.sum() == truth[2] - inside["lung network"][2] > 0


def test_slice_intervals_resample_whole_slices():
    """The bench's 95 % intervals: slices, not pixels, are drawn (one bad slice widens the interval whatever its
    pixel count), the pooled share lies inside, and identical slices give no spread."""
    bench = load_bench()

    def row(inside: int, total: int):
        return bench.SliceResult(inside / total, "s", total, inside, 0.0, total, inside)

    same = [row(80, 100)] * 12
    assert bench.slice_intervals(same) == ((0.8, 0.8), (0.8, 0.8))
    mixed = [row(95, 100)] * 11 + [row(10, 100)]
    (lo, hi), (c_lo, c_hi) = bench.slice_intervals(mixed)
    pooled = (11 * 95 + 10) / 1200
    assert lo < pooled < hi and (lo, hi) == (c_lo, c_hi)
    assert hi == pytest.approx(0.95) and lo < 0.85        # the draws without the bad slice reach 0.95
    assert bench.slice_intervals(mixed) == bench.slice_intervals(mixed)  # seeded
