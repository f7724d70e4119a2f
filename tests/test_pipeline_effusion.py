"""Pleural effusion and dense tissue that is neither lung nor effusion (node.pipeline.effusion), on the phantom."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from pydicom.dataset import Dataset

from node import phantom as ph
from node.pipeline.effusion import dependent_axes, find_effusion
from node.pipeline.engines import build_engine
from node.pipeline.lungs import segment_lungs
from node.pipeline.run import PipelineResult
from node.pipeline.scores import compute_scores
from node.pipeline.types import Effusion, LungMasks, Volume
from tests.support import CHEST_AXIAL, shared_dicom

pytestmark = pytest.mark.unit

GRID = dict(rows=224, cols=224, slices=48, pixel_spacing=1.6, slice_spacing=6.0, seed=21)
#: Found / true effusion volume per side. The phantom's crescent thins to nothing at its front and along the
#: wall, where the mean over 3x3 pixels mixes it with lung or chest wall, so the coarser the grid the less is
#: found; measured (2026-12-04) on this grid: 0.69 right, 0.70 left (2.2 mm pixels: 0.48; 1.4 mm: 0.74; a
#: 512 x 512 x 300 grid of 0.7 x 0.7 x 1 mm: 0.76), and 96 % of what is found is effusion.
VOLUME_RATIO = (0.6, 1.1)


def right_half(volume: Volume) -> np.ndarray:
    """The patient's right half of the phantom's image (its columns run to the patient's left)."""
    out = np.zeros(volume.shape, bool)
    out[:, :, : volume.shape[2] // 2] = True
    return out


@pytest.fixture(scope="module")
def effusion_case():
    p = ph.make_phantom(**GRID, burden=0.0, effusion=0.15)
    volume = p.as_volume()
    lungs = segment_lungs(volume)
    return p, volume, lungs, find_effusion(volume, lungs)


@pytest.fixture(scope="module")
def healthy_case():
    p = ph.make_phantom(**GRID, burden=0.0)
    volume = p.as_volume()
    lungs = segment_lungs(volume)
    return p, volume, lungs


def test_effusion_is_found_per_side_close_to_the_truth(effusion_case):
    p, volume, lungs, effusion = effusion_case
    truth = p.labels == ph.TISSUES["effusion"]
    right = right_half(volume)
    found = effusion.as_dict()
    assert set(found) == {"right_effusion_volume_ml", "left_effusion_volume_ml"}
    for side, half in (("right", right), ("left", ~right)):
        true_ml = (truth & half).sum() * volume.voxel_volume_ml
        assert VOLUME_RATIO[0] * true_ml <= found[f"{side}_effusion_volume_ml"] <= VOLUME_RATIO[1] * true_ml, side
    on_effusion = effusion.labels > 0
    assert (on_effusion & truth).sum() >= 0.9 * on_effusion.sum()          # what is found is fluid
    assert not ((effusion.labels == LungMasks.LEFT) & right).any()         # and on its own side
    assert not ((effusion.labels == LungMasks.RIGHT) & ~right).any()


def test_effusion_is_neither_lung_nor_infection(effusion_case):
    p, volume, lungs, effusion = effusion_case
    truth = p.labels == ph.TISSUES["effusion"]
    assert not (lungs.lungs & (effusion.labels > 0)).any()
    assert (lungs.lungs & truth).sum() <= 0.01 * truth.sum()   # the lung step leaves the fluid out
    infection = build_engine("threshold").engine.segment(volume, lungs)
    assert not (infection.infection & (effusion.labels > 0)).any()


def test_no_effusion_no_segment_zero_volume_no_note(healthy_case):
    p, volume, lungs = healthy_case
    effusion = find_effusion(volume, lungs)
    assert not effusion.labels.any()
    assert effusion.as_dict() == {"right_effusion_volume_ml": 0.0, "left_effusion_volume_ml": 0.0}
    assert effusion.notes == []


def dense_against_the_wall(p: ph.Phantom, volume: Volume) -> tuple[Volume, np.ndarray]:
    """The phantom with the posterior third of the right lung's lower half made consolidation without air
    bronchograms (35 HU): dense tissue against the chest wall."""
    right = p.masks["right_lung"]
    rows = np.nonzero(right.any(axis=(0, 2)))[0]
    lower = np.zeros(right.shape[0], bool)
    ks = np.nonzero(right.any(axis=(1, 2)))[0]
    lower[ks[0]: ks[0] + (ks[-1] - ks[0]) // 2] = True
    dorsal = np.arange(right.shape[1]) >= rows[-1] - (rows[-1] - rows[0]) // 3
    dense = right & lower[:, None, None] & dorsal[None, :, None]
    hu = volume.hu.copy()
    hu[dense] = 35 + np.random.default_rng(0).normal(0, p.noise_hu, int(dense.sum())).round().astype(hu.dtype)
    return dataclasses.replace(volume, hu=hu), dense


@pytest.mark.parametrize("method", ["hu", "aerated"])
def test_dense_tissue_the_lung_mask_leaves_out_is_never_silent(healthy_case, method):
    """Consolidation against the wall is either taken into the lung or named in a note, without any
    infection engine. Measured (2026-12-04): the HU method takes back 1 % of it, the aerated method none; of
    the rest, 35 % is counted as dense unexplained tissue (the midline band and the inner chest wall are left
    out), and both get the note for the right hemithorax only."""
    p, volume, _ = healthy_case
    dense_volume, dense = dense_against_the_wall(p, volume)
    lungs = segment_lungs(dense_volume, method=method)
    effusion = find_effusion(dense_volume, lungs)
    left_out = dense & ~lungs.lungs
    assert left_out.sum() >= 0.5 * dense.sum()     # the case the note is for
    assert len(effusion.notes) == 1 and "in the right hemithorax" in effusion.notes[0], effusion.notes
    assert "neither lung nor effusion" in effusion.notes[0] and "not scored" in effusion.notes[0]
    found = effusion.dense_unexplained == LungMasks.RIGHT
    assert (found & left_out).sum() >= 0.3 * left_out.sum()
    assert (found & ~dense).sum() <= 0.15 * found.sum()
    assert not effusion.labels.any()               # consolidation density is not fluid


def test_a_rim_thinner_than_the_opening_goes_whether_alone_or_beside_more():
    """The rim opening drops a strip two pixels thick (partial volume at the pleura) also when nothing else is
    in the mask: the filters run in the mask's bounding box, and a border that mirrored the strip kept it."""
    from node.pipeline.effusion import _opened

    strip = np.zeros((1, 40, 40), bool)
    strip[0, 10:12, 5:35] = True
    assert not _opened(strip, (1.0, 1.0)).any()
    with_block = strip.copy()
    with_block[0, 20:35, 5:35] = True               # a piece wider than the opening stays whole
    assert (_opened(with_block, (1.0, 1.0)) == (with_block & ~strip)).all()


def test_single_slice_gives_areas_in_cm2(effusion_case):
    p, volume, lungs, _ = effusion_case
    k = int(np.argmax((p.labels == ph.TISSUES["effusion"]).sum(axis=(1, 2))))
    one = dataclasses.replace(volume, hu=volume.hu[k:k + 1], positions=volume.positions[k:k + 1], slice_spacing=0.0,
                              sop_instance_uids=volume.sop_instance_uids[k:k + 1])
    effusion = find_effusion(one, segment_lungs(one))
    found = effusion.as_dict()
    assert set(found) == {"right_effusion_area_cm2", "left_effusion_area_cm2"}
    truth_cm2 = ((p.labels[k] == ph.TISSUES["effusion"]) & right_half(one)[0]).sum() * np.prod(one.pixel_spacing) / 100
    assert VOLUME_RATIO[0] * truth_cm2 <= found["right_effusion_area_cm2"] <= VOLUME_RATIO[1] * truth_cm2


@pytest.mark.parametrize("position, orientation, expected", [
    (None, [1, 0, 0, 0, 1, 0], (1, False)),        # supine: posterior = increasing rows
    ("HFS", [1, 0, 0, 0, 1, 0], (1, False)),
    ("FFP", [1, 0, 0, 0, 1, 0], (1, True)),        # prone: anterior is down
    ("HFS", [0, 1, 0, 1, 0, 0], (2, False)),       # rows and columns swapped
    ("HFS", [-1, 0, 0, 0, -1, 0], (1, True)),      # rotated by 180 degrees
    ("HFDR", [1, 0, 0, 0, 1, 0], (2, True)),       # lying on the right side: patient right (-x) is down
])
def test_the_dependent_direction_follows_patient_position_and_orientation(position, orientation, expected):
    headers = []
    if position is not None:
        ds = Dataset()
        ds.PatientPosition = position
        headers = [ds]
    volume = Volume(hu=np.zeros((1, 4, 4), np.float32), positions=np.zeros((1, 3)),
                    orientation=np.asarray(orientation, float), pixel_spacing=(1.0, 1.0), slice_spacing=0.0,
                    sop_instance_uids=["1"], series_instance_uid="1", study_instance_uid="1", datasets=headers)
    assert dependent_axes(volume) == expected


@pytest.mark.parametrize("flip_columns", [False, True])
def test_a_transposed_study_gives_the_same_effusion(effusion_case, flip_columns):
    """Rows and columns swapped (gravity along the columns), and also mirrored: the same voxels."""
    p, volume, lungs, effusion = effusion_case

    def turn(a: np.ndarray) -> np.ndarray:
        t = np.swapaxes(a, 1, 2)
        return (t[:, :, ::-1] if flip_columns else t).copy()

    orientation = np.array([0, -1 if flip_columns else 1, 0, 1, 0, 0], float)
    turned = dataclasses.replace(volume, hu=turn(volume.hu), orientation=orientation)
    again = find_effusion(turned, dataclasses.replace(lungs, labels=turn(lungs.labels), body=turn(lungs.body)))
    assert dependent_axes(turned) == (2, flip_columns)
    np.testing.assert_array_equal(again.labels, turn(effusion.labels))
    np.testing.assert_array_equal(again.dense_unexplained, turn(effusion.dense_unexplained))


def test_prone_effusion_is_found_anteriorly(effusion_case):
    """The same study prone: the image upside down and PatientPosition FFP give the same effusion."""
    p, volume, lungs, effusion = effusion_case
    ds = Dataset()
    ds.PatientPosition = "FFP"
    flipped = dataclasses.replace(volume, hu=volume.hu[:, ::-1].copy(), datasets=[ds] * volume.shape[0])
    flipped_lungs = dataclasses.replace(lungs, labels=lungs.labels[:, ::-1].copy(), body=lungs.body[:, ::-1].copy())
    again = find_effusion(flipped, flipped_lungs)
    np.testing.assert_array_equal(again.labels[:, ::-1], effusion.labels)


def test_the_pipeline_result_carries_the_effusion_notes_and_measurements(effusion_case):
    """The effusion step's notes are segmentation notes (SR comments, the result's notes) and its volumes
    join the scores in what the SR and the database get."""
    p, volume, lungs, effusion = effusion_case
    noted = Effusion(labels=effusion.labels, dense_unexplained=effusion.dense_unexplained, volumetric=True,
                     voxel_mm3=effusion.voxel_mm3, notes=["dense tissue of 9 ml in the right hemithorax ..."])
    infection = build_engine("threshold").engine.segment(volume, lungs)
    result = PipelineResult(status="done", volume=volume, lungs=lungs, effusion=noted, infection=infection,
                            scores=compute_scores(volume, lungs, infection))
    assert noted.notes[0] in result.segmentation_notes
    measured = result.measurements()
    assert measured["right_effusion_volume_ml"] == effusion.as_dict()["right_effusion_volume_ml"] > 0
    assert measured["percent_involved_total"] == result.scores.percent_involved_total


@pytest.mark.parametrize("name", CHEST_AXIAL)
def test_real_slices_note_the_dense_tissue_only_the_aerated_mask_leaves_out(name):
    """On the shared real slices (no reference masks), with the HU lung method no dense tissue is left over
    behind the lungs (at most 1.2 cm2); the aerated-only mask leaves 12 and 20 cm2 of the right hemithorax of
    the two A046441 slices (consolidation filling the dependent lung) out, and the note says so."""
    from node.pipeline.select import select_series
    from node.pipeline.volume import assemble_volume

    _, decisions = select_series([str(shared_dicom() / "ny-sbu" / name)])
    volume = assemble_volume(decisions[0].headers)
    assert find_effusion(volume, segment_lungs(volume, method="hu")).notes == []
    notes = find_effusion(volume, segment_lungs(volume, method="aerated")).notes
    if name.startswith("A046441"):
        assert len(notes) == 1 and "cm2 in the right hemithorax" in notes[0], notes
    else:
        assert notes == []
