"""The whole pipeline: real shared slices, synthetic studies written as DICOM, and the phantom."""
from __future__ import annotations

import numpy as np
import pytest

from node.pipeline.run import STAGES, run_pipeline
from node.pipeline.select import NO_LUNG_REASON
from tests.builders import dice, synthetic_chest, write_series
from tests.support import ABDOMEN_AXIAL, CHEST_AXIAL, shared_dicom

pytestmark = pytest.mark.unit


# --------------------------------------------------------------------------------------------- real slices


@pytest.mark.parametrize("name", CHEST_AXIAL)
def test_real_axial_chest_slice_is_analysed_in_2d(name):
    r = run_pipeline([shared_dicom() / "ny-sbu" / name])
    assert r.status == "done", r.reason
    assert r.volume.shape[0] == 1 and r.lungs.partial_coverage
    s = r.scores
    assert not s.volumetric and s.partial_coverage and s.right_lung_volume_ml is None
    assert s.right_lung_area_cm2 > 20 and s.left_lung_area_cm2 > 15  # both lungs found
    assert 0 < s.percent_involved_total < 85  # COVID-19 patients: some, not all, lung involved (A046441 23: 60 %)
    assert set(r.timings) == set(STAGES) and r.engine.name == "threshold"


@pytest.mark.parametrize("name", ABDOMEN_AXIAL)
def test_real_abdomen_slice_is_skipped_no_lung(name):
    r = run_pipeline([shared_dicom() / "ny-sbu" / name])
    assert r.status == "skipped" and r.chosen_series_uid is None and r.scores is None
    (d,) = r.decisions
    assert not d.accepted and d.reason.startswith(NO_LUNG_REASON)
    assert NO_LUNG_REASON in r.reason


def test_real_patient_folder_chooses_the_thinner_axial_chest_slice():
    r = run_pipeline([shared_dicom() / "ny-sbu" / "A002304"])
    assert r.status == "done"
    assert len(r.decisions) == 6
    chosen = [d for d in r.decisions if d.chosen]
    assert len(chosen) == 1 and chosen[0].slice_thickness == 1.25
    assert "thinner slices (1.25 vs 2.5 mm)" in chosen[0].reason
    other = next(d for d in r.decisions if d.accepted and not d.chosen)
    assert other.reason.startswith("acceptable but not chosen: thicker slices")
    rejected = [d for d in r.decisions if not d.accepted]
    assert sorted(d.orientation for d in rejected) == ["coronal", "coronal", "sagittal", "sagittal"]


def test_real_abdomen_patient_is_skipped_with_every_reason():
    r = run_pipeline([shared_dicom() / "ny-sbu" / "A058062"])
    assert r.status == "skipped"
    reasons = sorted(d.reason for d in r.decisions)
    assert sum(x.startswith(NO_LUNG_REASON) for x in reasons) == 2
    assert sum("reformat" in x for x in reasons) == 4
    assert r.reason.startswith("no analysable chest CT series among 6 series")


def test_real_lungmask_slices_without_modality():
    r = run_pipeline([shared_dicom() / "lungmask-slices"])
    assert r.status == "done"
    assert r.volume.shape == (2, 512, 512) and r.lungs.partial_coverage and r.scores.partial_coverage
    assert r.scores.volumetric and r.scores.right_lung_volume_ml > 0 and r.scores.left_lung_volume_ml > 0


def test_real_jpeg2000_abdomen_series_decodes_and_is_skipped_no_lung():
    r = run_pipeline([shared_dicom() / "abdomen-j2k-series"])
    (d,) = r.decisions
    assert d.n_instances == 20 and d.slice_spacing == pytest.approx(2.0)
    assert r.timings["assemble"] > 0 and r.timings["lungs"] > 0  # decoded and looked at
    assert r.status == "skipped" and d.reason.startswith(NO_LUNG_REASON)


# --------------------------------------------------------------------------------------------- synthetic studies


def test_abdomen_series_with_more_slices_falls_back_to_the_chest_series(tmp_path):
    chest = synthetic_chest(ggo=True)
    abdomen = synthetic_chest(slices=24)
    abdomen.volume.hu[abdomen.right | abdomen.left] = 40.0
    write_series(tmp_path / "chest", chest.volume.hu, order=list(range(16))[::-1], BodyPartExamined=None)
    write_series(tmp_path / "abd", abdomen.volume.hu, BodyPartExamined=None)
    r = run_pipeline([tmp_path])
    assert r.status == "done" and r.volume.shape[0] == 16
    by_n = {d.n_instances: d for d in r.decisions}
    assert by_n[24].reason.startswith(NO_LUNG_REASON) and not by_n[24].accepted
    assert by_n[16].chosen and r.chosen_series_uid == by_n[16].series_uid
    assert dice(r.lungs.right, chest.right) > 0.9 and dice(r.lungs.left, chest.left) > 0.9
    assert r.scores.volumetric and not r.scores.partial_coverage
    assert r.scores.percent_involved_right > r.scores.percent_involved_left
    assert any("GGO lower bound" in n for n in r.notes)


def test_a_series_whose_field_of_view_cuts_the_lungs_gives_way_to_a_full_one(tmp_path):
    full = synthetic_chest(ggo=True)
    narrow = synthetic_chest(slices=24)  # more slices: ranked first
    write_series(tmp_path / "full", full.volume.hu, BodyPartExamined=None)
    write_series(tmp_path / "narrow", narrow.volume.hu[:, :, 22:74], BodyPartExamined=None)  # lungs cut
    r = run_pipeline([tmp_path])
    assert r.status == "done" and r.volume.shape[0] == 16
    by_n = {d.n_instances: d for d in r.decisions}
    assert by_n[24].reason.startswith("lungs cut by the reconstructed field of view") and not by_n[24].accepted
    assert by_n[16].chosen and r.chosen_series_uid == by_n[16].series_uid


def test_undecodable_series_fails_with_a_reason(tmp_path):
    import pydicom

    paths = write_series(tmp_path, synthetic_chest(slices=6).volume.hu)
    ds = pydicom.dcmread(paths[2])
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(paths[2], enforce_file_format=True)
    r = run_pipeline(paths)
    assert r.status == "failed" and "could not be assembled" in r.reason and "img0002.dcm" in r.reason
    assert "cannot be assembled" in r.decisions[0].reason


def test_nothing_given_and_unknown_engine(tmp_path):
    r = run_pipeline([])
    assert r.status == "skipped" and r.reason == "no DICOM instances were given"
    with pytest.raises(ValueError, match="unknown infection engine"):
        run_pipeline([], "no-such-engine")


# --------------------------------------------------------------------------------------------- phantom


def test_phantom_study_end_to_end(tmp_path):
    phantom_mod = pytest.importorskip("node.phantom")
    ph = phantom_mod.make_phantom(rows=160, cols=160, slices=60, pixel_spacing=2.0, slice_spacing=5.0, seed=1,
                                  burden=0.2)
    files = phantom_mod.write_phantom_study(ph, tmp_path / "study", extra_series=True)
    r = run_pipeline(files)
    assert r.status == "done", r.reason
    assert sum(1 for d in r.decisions if "localizer" in d.reason) == 1
    assert r.volume.shape == ph.hu.shape
    np.testing.assert_allclose(r.volume.positions, ph.positions, atol=1e-3)
    np.testing.assert_array_equal(r.volume.hu, ph.hu.astype(np.float32))
    assert dice(r.lungs.right, ph.masks["right_lung"]) > 0.9
    assert dice(r.lungs.left, ph.masks["left_lung"]) > 0.9
    inf_dice = dice(r.infection.infection, ph.masks["infection"])
    assert inf_dice > 0.65, inf_dice  # about 0.75 with the default threshold engine
    truth = ph.lung_burden["total"] * 100
    assert r.scores.percent_involved_total == pytest.approx(truth, abs=8.0)
