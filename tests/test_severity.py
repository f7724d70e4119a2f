"""Severity scores: PO/PHO, CT-SS (20 regions), lobe/zone score, severity category, region partition.

Exact phantom tests (external lobe map = ``Phantom.regions``), a tolerance test with the geometric
partition, CT-SS exactness on a synthetic volume, orientation invariance of the partition, and
hypothesis properties (bounds, monotonicity, left-right mirror symmetry).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from node.phantom import make_phantom
from node.pipeline.regions import REGION_LABEL, REGION_ZONE, REGIONS, ZONE_LABEL, ZONES, partition
from node.pipeline.scores import (
    compute_scores,
    ctss_region_score,
    severity_category,
    zone_score,
)
from node.pipeline.types import InfectionResult, LungMasks, Volume

pytestmark = pytest.mark.unit

BURDEN = {"right_upper": 0.02, "right_middle": 0.15, "right_lower": 0.40, "left_upper": 0.60,
          "left_lower": 0.90}
EXPECTED_ZONE_SCORES = {"right_upper": 1, "right_middle": 2, "right_lower": 3, "left_upper": 4,
                        "left_lower": 5}


def _volume(hu: np.ndarray, positions=None, orientation=(1.0, 0, 0, 0, 1.0, 0), spacing=(2.0, 2.0),
            dz: float = 5.0) -> Volume:
    n = hu.shape[0]
    if positions is None:
        positions = np.array([[-100.0, -80.0, -200.0 + k * dz] for k in range(n)])
    return Volume(hu=hu.astype(np.float32), positions=np.asarray(positions, float),
                  orientation=np.asarray(orientation, float), pixel_spacing=spacing, slice_spacing=dz,
                  sop_instance_uids=[str(k) for k in range(n)], series_instance_uid="1",
                  study_instance_uid="2")


@pytest.fixture(scope="module")
def phantom_case():
    ph = make_phantom(rows=160, cols=160, slices=60, pixel_spacing=2.2, slice_spacing=5.0, seed=3,
                      burden=BURDEN)
    volume = Volume(hu=ph.hu.astype(np.float32), positions=ph.positions, orientation=ph.orientation,
                    pixel_spacing=ph.pixel_spacing, slice_spacing=ph.slice_spacing,
                    sop_instance_uids=[str(k) for k in range(ph.shape[0])], series_instance_uid="1",
                    study_instance_uid="2")
    lungs = LungMasks(labels=ph.lung_labels)
    infection = InfectionResult(infection=ph.masks["infection"], ggo=ph.masks["ggo"],
                                consolidation=ph.masks["consolidation"])
    return ph, volume, lungs, infection


# --------------------------------------------------------------------------- phantom

def test_phantom_zone_scores_and_po_exact_with_external_lobe_map(phantom_case):
    ph, volume, lungs, infection = phantom_case
    s = compute_scores(volume, lungs, infection, region_map=ph.regions, region_map_kind="lobes")
    assert s.region_method == "lobes"
    for zone in ZONES:
        assert s.zones[zone]["percent"] == pytest.approx(100 * ph.achieved_burden[zone], abs=1e-9), zone
        assert s.zones[zone]["score"] == EXPECTED_ZONE_SCORES[zone], zone
    assert s.zone_score_total == 15
    burden = ph.lung_burden
    assert s.percent_involved_right == pytest.approx(100 * burden["right"], abs=1e-9)
    assert s.percent_involved_left == pytest.approx(100 * burden["left"], abs=1e-9)
    assert s.percent_involved_total == pytest.approx(100 * burden["total"], abs=1e-9)
    lung = lungs.lungs
    high = ph.masks["infection"] & lung & (volume.hu > -200)
    assert s.percent_high_opacity_total == pytest.approx(100 * high.sum() / lung.sum(), abs=1e-9)
    assert s.percent_high_opacity_total > 0   # the phantom's consolidation is above -200 HU
    assert 0 <= s.ctss_total <= 40 and s.severity in ("moderate", "severe")
    assert s.ggo_volume_ml + s.consolidation_volume_ml == pytest.approx(s.infection_volume_ml)


def test_phantom_zone_scores_with_geometric_partition(phantom_case):
    ph, volume, lungs, infection = phantom_case
    s = compute_scores(volume, lungs, infection)
    assert s.region_method == "geometric"
    for zone in ZONES:
        assert s.zones[zone]["percent"] == pytest.approx(100 * ph.achieved_burden[zone], abs=1.0), zone
        assert s.zones[zone]["score"] == EXPECTED_ZONE_SCORES[zone], zone
    assert s.zone_score_total == 15
    # every CT-SS region of the left lower zone (90 %) is involved >= 50 %, the right upper (2 %) < 50 %
    assert all(s.regions[r]["ctss"] == 2 for r in REGIONS if REGION_ZONE[r] == "left_lower")
    for r in (r for r in REGIONS if REGION_ZONE[r] == "right_upper"):  # involved, but < 50 %: 1 above the floor
        assert s.regions[r]["ctss"] == (1 if s.regions[r]["percent"] >= 1.0 else 0), r
    assert any("approximation" in n for n in s.notes)


# --------------------------------------------------------------------------- synthetic CT-SS

def _box_lungs(shape=(20, 24, 40)) -> np.ndarray:
    labels = np.zeros(shape, np.uint8)
    labels[:, 2:22, 2:18] = 1     # image left (low column, low x) = patient right
    labels[:, 2:22, 22:38] = 2
    return labels


def test_ctss_exact_on_synthetic_volume_with_known_region_involvement():
    labels = _box_lungs()
    volume = _volume(np.full(labels.shape, -850.0))
    lungs = LungMasks(labels=labels)
    regions = partition(volume, lungs).regions
    assert {int(v) for v in np.unique(regions)} == set(range(21))          # all 20 regions + 0
    fractions = [0.0, 0.3, 0.5, 0.8, 0.01]
    infection = np.zeros(labels.shape, bool)
    expected = {}
    for i, name in enumerate(REGIONS):
        idx = np.flatnonzero(regions == REGION_LABEL[name])
        f = fractions[i % len(fractions)]
        n = int(np.ceil(f * idx.size))
        infection.flat[idx[:n]] = True
        expected[name] = 0 if n == 0 else (1 if n / idx.size < 0.5 else 2)
    s = compute_scores(volume, lungs, InfectionResult(infection=infection))
    assert {r: s.regions[r]["ctss"] for r in REGIONS} == expected
    assert s.ctss_total == sum(expected.values())
    # the same map given as an external segment map gives the same scores
    s2 = compute_scores(volume, lungs, InfectionResult(infection=infection), region_map=regions,
                        region_map_kind="segments")
    assert s2.regions == s.regions and s2.zones == s.zones and s2.region_method == "segments"


def test_partition_layout_follows_patient_axes():
    labels = _box_lungs()
    volume = _volume(np.full(labels.shape, -850.0))
    rm = partition(volume, LungMasks(labels=labels))
    k, r, c = np.nonzero(rm.regions)
    lab = rm.regions[k, r, c]

    def mean(axis, name):
        return axis[lab == REGION_LABEL[name]].mean()
    # cranial (high k) vs caudal; anterior (low row = low y) vs posterior; medial vs lateral
    assert mean(k, "right_apical") > mean(k, "right_anterior") > mean(k, "right_lateral") > mean(k, "right_superior")
    assert mean(r, "right_anterior") < mean(r, "right_posterior")
    assert mean(c, "right_medial") > mean(c, "right_lateral")              # right lung: medial = higher x
    assert mean(c, "left_medial_basal") < mean(c, "left_anterior_basal")   # left lung: medial = lower x
    assert mean(r, "left_lateral_basal") > mean(r, "left_anterior_basal")
    assert mean(k, "left_superior_lingular") > mean(k, "left_inferior_lingular")
    for zone in ZONES:   # zones are unions of regions
        members = [REGION_LABEL[r_] for r_ in REGIONS if REGION_ZONE[r_] == zone]
        assert np.array_equal(rm.zones == ZONE_LABEL[zone], np.isin(rm.regions, members))


def test_partition_is_invariant_to_storage_flips():
    labels = _box_lungs((12, 24, 40))
    labels[:, 2:6, 2:18] = 0                     # break the in-plane symmetry of the boxes
    volume = _volume(np.full(labels.shape, -850.0))
    base = partition(volume, LungMasks(labels=labels)).regions
    o = volume.orientation
    ps_r, ps_c = volume.pixel_spacing
    rows, cols = labels.shape[1:]
    # columns stored right-to-left and rows bottom-to-top
    # (both cosines negated: the normal is unchanged, so slice k keeps its z)
    flipped_pos = volume.positions + (cols - 1) * ps_c * o[:3] + (rows - 1) * ps_r * o[3:]
    flipped = _volume(np.full(labels.shape, -850.0), positions=flipped_pos, orientation=np.r_[-o[:3], -o[3:]])
    got = partition(flipped, LungMasks(labels=labels[:, ::-1, ::-1].copy())).regions
    assert np.array_equal(got[:, ::-1, ::-1], base)


# --------------------------------------------------------------------------- scoring functions

def test_score_bands():
    # below the 1 % noise floor a region or zone scores 0
    assert [ctss_region_score(p) for p in (None, 0, 0.99, 1.0, 49.99, 50, 100)] == [0, 0, 0, 1, 1, 2, 2]
    assert [zone_score(p) for p in (0, 0.99, 1.0, 4.9, 5, 25, 25.5, 49.9, 50, 75, 75.1, 100)] == [
        0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert severity_category(19.5, 10.0) == "severe" and severity_category(19, 10.0) == "mild"
    assert severity_category(0, 50.0) == "severe" and severity_category(10, 25.0) == "moderate"
    assert severity_category(0, 0.0) == "none" and severity_category(None, None) is None
    # below the minimum involvement (false-positive voxels on a clear scan) no category is given
    assert severity_category(0, 0.045) == "none" and severity_category(0, 0.1) == "mild"


@given(st.floats(0, 100), st.floats(0, 100))
def test_score_functions_bounded_and_monotonic(a, b):
    lo, hi = min(a, b), max(a, b)
    assert 0 <= ctss_region_score(lo) <= ctss_region_score(hi) <= 2
    assert 0 <= zone_score(lo) <= zone_score(hi) <= 5


# --------------------------------------------------------------------------- properties of compute_scores

SHAPE = (10, 8, 14)


def _small_lungs() -> np.ndarray:
    labels = np.zeros(SHAPE, np.uint8)
    labels[:, 1:7, 1:6] = 1
    labels[:, 1:7, 8:13] = 2
    return labels


def _small_volume(high: np.ndarray) -> Volume:
    return _volume(np.where(high, 0.0, -700.0), spacing=(3.0, 3.0), dz=6.0)


_SEVERITY_RANK = {"none": 0, "mild": 1, "moderate": 2, "severe": 3}
_settings = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_masks = arrays(bool, SHAPE, elements=st.booleans())


def _numbers(s):
    out = {"po_r": s.percent_involved_right, "po_l": s.percent_involved_left, "po": s.percent_involved_total,
           "pho_r": s.percent_high_opacity_right, "pho_l": s.percent_high_opacity_left,
           "pho": s.percent_high_opacity_total, "ctss": s.ctss_total, "zone": s.zone_score_total,
           "severity": _SEVERITY_RANK[s.severity]}
    out.update({f"r.{r}": s.regions[r]["ctss"] for r in REGIONS})
    out.update({f"z.{z}": s.zones[z]["score"] for z in ZONES})
    return out


@_settings
@given(_masks, _masks, _masks)
def test_scores_bounded_and_monotonic_in_infection(infection, extra, high):
    labels = _small_lungs()
    volume = _small_volume(high)
    lungs = LungMasks(labels=labels)
    s1 = compute_scores(volume, lungs, InfectionResult(infection=infection))
    s2 = compute_scores(volume, lungs, InfectionResult(infection=infection | extra))
    for s in (s1, s2):
        assert all(0 <= v["ctss"] <= 2 for v in s.regions.values()) and 0 <= s.ctss_total <= 40
        assert all(0 <= v["score"] <= 5 for v in s.zones.values()) and 0 <= s.zone_score_total <= 25
        assert 0 <= s.percent_high_opacity_total <= s.percent_involved_total <= 100
    a, b = _numbers(s1), _numbers(s2)
    assert all(b[k] >= a[k] for k in a), {k: (a[k], b[k]) for k in a if b[k] < a[k]}


# right region <-> left region in the same position (for the mirror test with a segment map)
MIRROR = {
    "right_apical": "left_apical", "right_posterior": "left_posterior", "right_anterior": "left_anterior",
    "right_lateral": "left_superior_lingular", "right_medial": "left_inferior_lingular",
    "right_superior": "left_superior", "right_medial_basal": "left_medial_basal",
    "right_anterior_basal": "left_anterior_basal", "right_lateral_basal": "left_lateral_basal",
    "right_posterior_basal": "left_posterior_basal",
}
MIRROR.update({v: k for k, v in list(MIRROR.items())})


@_settings
@given(_masks, _masks)
def test_scores_swap_sides_under_left_right_mirroring(infection, high):
    labels = _small_lungs()
    volume = _small_volume(high)
    lungs = LungMasks(labels=labels)
    segments = partition(volume, lungs).regions
    s = compute_scores(volume, lungs, InfectionResult(infection=infection), region_map=segments,
                       region_map_kind="segments")

    swap = np.array([0, 2, 1], np.uint8)
    m_labels = swap[labels[:, :, ::-1]]
    lut = np.zeros(21, np.uint8)
    for name in REGIONS:
        lut[REGION_LABEL[name]] = REGION_LABEL[MIRROR[name]]
    m_volume = _small_volume(high[:, :, ::-1])
    m_lungs = LungMasks(labels=m_labels)
    m = compute_scores(m_volume, m_lungs, InfectionResult(infection=infection[:, :, ::-1].copy()),
                       region_map=lut[segments[:, :, ::-1]], region_map_kind="segments")
    assert m.percent_involved_right == s.percent_involved_left
    assert m.percent_involved_left == s.percent_involved_right
    assert m.percent_high_opacity_right == s.percent_high_opacity_left
    assert m.percent_high_opacity_left == s.percent_high_opacity_right
    assert m.percent_involved_total == pytest.approx(s.percent_involved_total)
    assert {r: m.regions[MIRROR[r]] for r in REGIONS} == s.regions
    assert m.ctss_total == s.ctss_total and m.severity == s.severity
    # the geometric partition: per-lung numbers swap as well
    g, gm = compute_scores(volume, lungs, InfectionResult(infection=infection)), \
        compute_scores(m_volume, m_lungs, InfectionResult(infection=infection[:, :, ::-1].copy()))
    assert (gm.percent_involved_right, gm.percent_involved_left) == (g.percent_involved_left,
                                                                     g.percent_involved_right)


def test_result_text_renders_region_table():
    import json

    from node.reports import _region_lines
    labels = _box_lungs((10, 24, 40))
    infection = np.zeros(labels.shape, bool)
    infection[5:, 2:10, 2:18] = True
    s = compute_scores(_volume(np.full(labels.shape, -850.0)), LungMasks(labels=labels),
                       InfectionResult(infection=infection))
    text = "\n".join(_region_lines(json.loads(json.dumps(s.as_dict()))))   # as stored in the database
    assert "geometric approximation" in text
    assert all(name in text for name in REGIONS) and all(name in text for name in ZONES)
    assert f"CT-SS total {s.ctss_total}/40" in text and f"severity {s.severity}" in text
