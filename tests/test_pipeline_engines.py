"""Engine registry and the HU-threshold engine on synthetic lesions and vessels."""
from __future__ import annotations

import numpy as np
import pytest

from node.pipeline import engines
from node.pipeline.engines import InfectionEngine, ThresholdEngine, aerated_peak, base, get_engine, register_engine
from node.pipeline.lungs import segment_lungs
from node.pipeline.types import EngineIdentity, InfectionResult
from tests.builders import dice, single_slice, synthetic_chest

pytestmark = pytest.mark.unit


def test_registry_and_threshold_identity():
    assert "threshold" in engines.available_engines()
    eng = get_engine("threshold")
    assert isinstance(eng, InfectionEngine)
    assert (eng.identity.name, eng.identity.version, eng.identity.weights_sha256) == ("threshold", "1.0", "")
    assert "GGO [-700, -300) HU" in eng.identity.description
    assert get_engine("threshold", vessel_radius_mm=4.0, device="cpu").vessel_radius_mm == 4.0
    with pytest.raises(ValueError, match="unknown infection engine 'nope'.*threshold"):
        get_engine("nope")
    with pytest.raises(ValueError, match="ordered"):
        ThresholdEngine(ggo_range=(-300.0, -700.0))


def test_register_engine_adds_a_factory(monkeypatch):
    class Dummy:
        identity = EngineIdentity("dummy", "0", "")

        def segment(self, volume, lungs):
            return InfectionResult(infection=np.zeros(volume.shape, bool))

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    register_engine("dummy", lambda **options: Dummy())
    assert "dummy" in engines.available_engines() and get_engine("dummy").identity.name == "dummy"


def test_ggo_and_consolidation_are_found():
    chest = synthetic_chest(ggo=True, consolidation=True, slices=20)
    lungs = segment_lungs(chest.volume)
    res = ThresholdEngine().segment(chest.volume, lungs)
    assert res.infection.shape == chest.volume.shape and res.infection.dtype == bool
    assert dice(res.ggo, chest.ggo) > 0.75
    assert dice(res.consolidation, chest.consolidation) > 0.6
    assert dice(res.infection, chest.ggo | chest.consolidation) > 0.75
    assert not (res.ggo & res.consolidation).any()
    assert not (res.infection & ~lungs.lungs).any()
    assert res.notes and "GGO lower bound" in res.notes[0]


def test_normal_lung_has_no_infection():
    chest = synthetic_chest(noise=25.0)
    res = ThresholdEngine().segment(chest.volume, segment_lungs(chest.volume))
    assert res.infection.sum() < 0.005 * (chest.right | chest.left).sum()


def test_a_bright_vessel_tube_is_not_infection():
    chest = synthetic_chest(vessel=True, slices=20)
    lungs = segment_lungs(chest.volume)
    tube = chest.vessel
    assert tube.sum() > 50 and lungs.lungs[tube].mean() > 0.9  # the vessel is inside the lung mask
    res = ThresholdEngine().segment(chest.volume, lungs)
    # neither the vessel (consolidation-like HU) nor its partial-volume rim (GGO-like HU) is infection
    from scipy import ndimage as ndi
    around = ndi.binary_dilation(tube, structure=np.ones((1, 5, 5), bool))
    assert res.infection[around].mean() < 0.02


def test_single_slice_lesion():
    chest = single_slice(synthetic_chest(ggo=True, slices=20))
    res = ThresholdEngine().segment(chest.volume, segment_lungs(chest.volume))
    assert dice(res.ggo, chest.ggo) > 0.7


def test_adaptive_ggo_bound_follows_the_aerated_peak():
    rng = np.random.default_rng(0)
    normal = rng.normal(-850, 30, 20000)
    assert aerated_peak(normal) == pytest.approx(-850, abs=15)
    eng = ThresholdEngine()
    low, note = eng.ggo_lower_bound(normal)
    assert low == pytest.approx(-675, abs=15) and "aerated lung peaks" in note
    low, _ = eng.ggo_lower_bound(rng.normal(-720, 30, 20000))  # shallow inspiration / dense scanner
    assert low == -550.0
    low, note = eng.ggo_lower_bound(rng.normal(-450, 60, 20000))  # almost no aerated lung left
    assert low == -700.0 and "fixed" in note
    low, note = ThresholdEngine(adaptive=False).ggo_lower_bound(normal)
    assert low == -700.0 and "fixed" in note
