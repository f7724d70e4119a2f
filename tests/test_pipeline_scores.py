"""Scores on hand-computable masks, in 3D and in 2D."""
from __future__ import annotations

import numpy as np
import pytest

from node.pipeline.scores import Scores, compute_scores
from node.pipeline.types import Effusion, InfectionResult, LungMasks, Volume

pytestmark = pytest.mark.unit


def make_volume(slices: int, *, pixel=(0.5, 0.8), step: float = 2.5, hu: float = -800.0) -> Volume:
    return Volume(hu=np.full((slices, 10, 10), hu, np.float32),
                  positions=np.array([[0.0, 0.0, k * step] for k in range(slices)]),
                  orientation=np.array([1.0, 0, 0, 0, 1.0, 0]), pixel_spacing=pixel,
                  slice_spacing=step if slices > 1 else 0.0, sop_instance_uids=[str(k) for k in range(slices)],
                  series_instance_uid="1", study_instance_uid="2")


def masks(shape):
    labels = np.zeros(shape, np.uint8)
    labels[:, 0:5, 0:4] = 1      # right: 20 voxels per slice
    labels[:, 0:5, 6:10] = 2     # left: 20 voxels per slice
    ggo = np.zeros(shape, bool)
    cons = np.zeros(shape, bool)
    ggo[:, 0:2, 0:4] = True      # 8 per slice in the right lung
    cons[:, 0:1, 6:10] = True    # 4 per slice in the left lung
    cons[:, 9, 9] = True         # outside the lungs: never counted
    return LungMasks(labels=labels), InfectionResult(infection=ggo | cons, ggo=ggo, consolidation=cons)


def test_volumetric_scores():
    vol = make_volume(4)
    vol.hu[:, 0:2, 0:4] = -500.0  # the GGO voxels
    lungs, inf = masks(vol.shape)
    s = compute_scores(vol, lungs, inf)
    voxel_ml = 0.5 * 0.8 * 2.5 / 1000.0  # 0.001 ml
    assert s.volumetric and s.basis == "volume" and s.slices == 4
    assert s.right_lung_volume_ml == pytest.approx(80 * voxel_ml)
    assert s.left_lung_volume_ml == pytest.approx(80 * voxel_ml)
    assert s.total_lung_volume_ml == pytest.approx(160 * voxel_ml)
    assert s.right_infection_volume_ml == pytest.approx(32 * voxel_ml)
    assert s.left_infection_volume_ml == pytest.approx(16 * voxel_ml)
    assert s.infection_volume_ml == pytest.approx(48 * voxel_ml)
    assert s.ggo_volume_ml == pytest.approx(32 * voxel_ml) and s.consolidation_volume_ml == pytest.approx(16 * voxel_ml)
    assert s.percent_involved_right == pytest.approx(40.0)
    assert s.percent_involved_left == pytest.approx(20.0)
    assert s.percent_involved_total == pytest.approx(30.0)
    assert s.mean_hu_infection == pytest.approx((32 * -500 + 16 * -800) / 48)
    assert s.mean_hu_lungs == pytest.approx((32 * -500 + 128 * -800) / 160)
    assert s.right_lung_area_cm2 is None and not s.partial_coverage


def test_single_slice_scores_are_areas_and_flagged():
    vol = make_volume(1)
    lungs, inf = masks(vol.shape)
    s = compute_scores(vol, lungs, inf)
    px_cm2 = 0.5 * 0.8 / 100.0
    assert not s.volumetric and s.partial_coverage and s.basis == "area"
    assert s.right_lung_volume_ml is None and s.infection_volume_ml is None and s.total_lung_volume_ml is None
    assert s.right_lung_area_cm2 == pytest.approx(20 * px_cm2)
    assert s.infection_area_cm2 == pytest.approx(12 * px_cm2)
    assert s.percent_involved_total == pytest.approx(30.0)
    assert any("2D, partial coverage" in n for n in s.notes)
    d = s.as_dict()
    assert d["volumetric"] is False and "right_lung_volume_ml" not in d and d["ggo_area_cm2"] > 0


def test_empty_lungs_and_engine_without_classes():
    vol = make_volume(3)
    lungs = LungMasks(labels=np.zeros(vol.shape, np.uint8))
    s = compute_scores(vol, lungs, InfectionResult(infection=np.ones(vol.shape, bool)))
    assert s.percent_involved_total is None and s.infection_volume_ml == 0.0
    assert s.ggo_volume_ml is None and s.mean_hu_infection is None


def test_as_dict_matches_the_sr_writer_keys():
    vol = make_volume(3)
    lungs, inf = masks(vol.shape)
    d = compute_scores(vol, lungs, inf).as_dict()
    assert set(Scores.SR_KEYS) >= set(d) - {"volumetric"}
    assert all(v is not None for v in d.values())
    from node.writers.sr import MEASUREMENT_KEYS, TEXT_KEYS, flatten_scores
    flat = set(flatten_scores(d))
    assert flat - TEXT_KEYS <= MEASUREMENT_KEYS
    # every SR row is a scores key (or a nested one) or an effusion key, every scalar SR key has a row
    assert {k.split(".")[0] for k in MEASUREMENT_KEYS} <= set(Scores.SR_KEYS) | set(Effusion.SR_KEYS)
    assert set(Effusion.SR_KEYS) <= MEASUREMENT_KEYS
    assert {k for k in Scores.SR_KEYS if k not in ("regions", "zones")} <= MEASUREMENT_KEYS | TEXT_KEYS
    details = compute_scores(vol, lungs, inf).details()
    assert {"total_lung_volume_ml", "mean_hu_lungs", "partial_coverage"} <= set(details)


def test_high_opacity_and_region_scores():
    vol = make_volume(6)
    lungs, inf = masks(vol.shape)
    vol.hu[:, 0:1, 6:10] = -100.0     # the left consolidation is high opacity (> -200 HU)
    vol.hu[:, 9, 9] = 0.0             # outside the lungs: never counted
    s = compute_scores(vol, lungs, inf)
    assert s.percent_high_opacity_left == pytest.approx(20.0)
    assert s.percent_high_opacity_right == pytest.approx(0.0)
    assert s.percent_high_opacity_total == pytest.approx(10.0)
    assert len(s.regions) == 20 and len(s.zones) == 5
    assert s.ctss_total == sum(r["ctss"] for r in s.regions.values())
    assert s.zone_score_total == sum(z["score"] for z in s.zones.values())
    assert s.severity == "moderate"   # PO 30 %
    d = s.as_dict()
    assert d["regions"]["right_apical"].keys() <= {"percent", "ctss"} and d["region_method"] == "geometric"


def test_single_slice_has_no_region_scores():
    vol = make_volume(1)
    lungs, inf = masks(vol.shape)
    s = compute_scores(vol, lungs, inf)
    assert s.regions is None and s.ctss_total is None and s.severity is None
    assert s.percent_high_opacity_total is not None
    assert "regions" not in s.as_dict()


def test_cut_lungs_get_no_region_scores_and_the_sr_says_partial(tmp_path):
    """A scan that misses the bases: volumes and PO of the lung in view, but no CT-SS, zone scores or
    severity (they are defined for whole lungs); every SR group carries the partial-coverage text."""
    from node import phantom as ph
    from node.pipeline.engines import get_engine
    from node.pipeline.lungs import segment_lungs
    from node.writers.seg import build_segmentation
    from node.writers.sr import PARTIAL_SCAN_TEXT, build_report, read_report_measurements

    p = ph.make_phantom(rows=128, cols=128, slices=40, pixel_spacing=2.75, slice_spacing=7.5, seed=1, burden=0.2)
    whole = p.as_volume()
    keep = slice(12, None)  # the first 12 slices (the bases: k ascends in z) are not in the scan
    cut = Volume(hu=whole.hu[keep], positions=whole.positions[keep], orientation=whole.orientation,
                 pixel_spacing=whole.pixel_spacing, slice_spacing=whole.slice_spacing,
                 sop_instance_uids=whole.sop_instance_uids[keep], series_instance_uid="1.2.3",
                 study_instance_uid="1.2")
    lungs = segment_lungs(cut)
    assert lungs.partial_coverage
    infection = get_engine("threshold").segment(cut, lungs)
    s = compute_scores(cut, lungs, infection)
    assert s.volumetric and s.partial_coverage and s.percent_involved_total > 0
    assert s.ctss_total is None and s.zone_score_total is None and s.regions is None and s.severity is None
    assert any("no CT-SS, zone scores or severity" in n for n in s.notes)
    assert s.as_dict()["partial_coverage"] is True

    from tests.builders import INFNET, make_volume  # headers for the writers (the phantom has none)

    volume = make_volume(n=cut.shape[0], rows=cut.shape[1], cols=cut.shape[2])
    seg = build_segmentation(volume, lungs, infection, INFNET)
    sr = build_report(volume, seg, s.as_dict(), INFNET, strict=True)
    back = read_report_measurements(sr)
    assert back["partial_coverage"] == 1.0 and "ctss_total" not in back and "severity" not in back

    def texts(item):
        for child in item.get("ContentSequence", []):
            if child.ValueType == "TEXT":
                yield child.TextValue
            yield from texts(child)

    assert list(texts(sr)).count(PARTIAL_SCAN_TEXT) == 1  # once, in the report-level evaluations
