"""Tests of the procedural chest CT phantom (node/phantom.py)."""
from __future__ import annotations

import os
import shutil
import subprocess
import time

import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless, generate_uid
from scipy import ndimage

from node.phantom import (
    CT_IMAGE_STORAGE, DENSE_CONSOLIDATION_HU, TISSUES, ZONES, load_ground_truth, make_phantom, save_ground_truth,
    write_phantom_study,
)

pytestmark = pytest.mark.unit

# Small but physically sized: 128 x 2.8 mm = 358 mm field of view, 60 x 5 mm = 300 mm scan length.
SMALL = dict(rows=128, cols=128, slices=60, pixel_spacing=2.8, slice_spacing=5.0)


@pytest.fixture(scope="module")
def ph():
    return make_phantom(**SMALL, seed=7, burden=0.2)


def lungs(p):
    return p.masks["right_lung"] | p.masks["left_lung"]


def centroid(mask):
    return np.array(np.nonzero(mask)).mean(axis=1)  # (k, r, c)


def test_shapes_dtypes_and_geometry(ph):
    assert ph.hu.shape == (60, 128, 128) and ph.hu.dtype == np.int16
    assert ph.positions.shape == (60, 3)
    np.testing.assert_allclose(np.diff(ph.positions[:, 2]), 5.0)  # ascending z, inferior -> superior
    assert np.ptp(ph.positions[:, 0]) == 0 and np.ptp(ph.positions[:, 1]) == 0
    np.testing.assert_array_equal(ph.orientation, [1, 0, 0, 0, 1, 0])
    assert ph.pixel_spacing == (2.8, 2.8) and ph.slice_spacing == 5.0
    # The image centre is the isocentre: first pixel at -(n-1)/2 * spacing.
    np.testing.assert_allclose(ph.positions[0, :2], [-63.5 * 2.8, -63.5 * 2.8])
    for name in ("right_lung", "left_lung", "ggo", "consolidation", "infection", "airways", "body"):
        assert ph.masks[name].dtype == bool and ph.masks[name].shape == ph.hu.shape
    assert ph.regions.dtype == np.uint8 and set(np.unique(ph.regions)) == set(range(6))


def test_tissue_hu(ph):
    hu, lab = ph.hu, ph.labels
    assert abs(np.median(hu[~ph.masks["body"] & (lab == TISSUES["air"])]) + 1000) < 5
    assert abs(np.median(hu[lab == TISSUES["fat"]]) + 100) < 10
    assert abs(np.median(hu[lab == TISSUES["muscle"]]) - 45) < 10
    assert np.median(hu[lab == TISSUES["bone"]]) > 500
    assert abs(np.median(hu[lab == TISSUES["heart"]]) - 40) < 10
    assert np.median(hu[ph.masks["airways"]]) < -950
    parenchyma = lungs(ph) & ~ph.masks["infection"] & ~ph.masks["vessels"]
    assert -870 < np.median(hu[parenchyma]) < -830
    assert np.median(hu[ph.masks["vessels"] & ~ph.masks["infection"]]) > -300


def test_lesion_hu(ph):
    ggo = ph.hu[ph.masks["ggo"] & ~ph.masks["vessels"]]
    cons = ph.hu[ph.masks["consolidation"]]
    assert -700 < np.median(ggo) < -400
    lo, hi = np.percentile(ggo, [5, 95])
    assert lo > -760 and hi < -340
    assert -100 < np.median(cons) < 40
    lo, hi = np.percentile(cons, [5, 95])
    assert lo > -130 and hi < 70


def test_airless_consolidation_only_changes_the_consolidation_hu(ph):
    """``consolidation_hu``: the same anatomy and lesions, consolidation at soft-tissue density (airless
    consolidation, atelectasis); an inverted range is refused."""
    dense = make_phantom(**SMALL, seed=7, burden=0.2, consolidation_hu=DENSE_CONSOLIDATION_HU)
    for name in ("right_lung", "left_lung", "ggo", "consolidation"):
        assert np.array_equal(dense.masks[name], ph.masks[name])
    cons = ph.masks["consolidation"]
    assert np.array_equal(dense.hu[~cons], ph.hu[~cons])
    # +60 HU on each voxel's nominal value (partial volume with vessels and noise as before)
    assert np.allclose(np.percentile(dense.hu[cons], [5, 50, 95]) - np.percentile(ph.hu[cons], [5, 50, 95]), 60,
                       atol=8)
    assert np.median(dense.hu[cons]) > -20  # soft-tissue density, above the partly aerated default
    with pytest.raises(ValueError):
        make_phantom(**SMALL, seed=7, consolidation_hu=(30.0, -30.0))


def test_masks_consistent(ph):
    m = ph.masks
    lung = lungs(ph)
    assert not (m["right_lung"] & m["left_lung"]).any()
    assert not (m["ggo"] & m["consolidation"]).any()
    np.testing.assert_array_equal(m["infection"], m["ggo"] | m["consolidation"])
    assert not (m["infection"] & ~lung).any()
    assert not (m["vessels"] & ~lung).any()
    assert m["airways"].any() and not (m["airways"] & lung).any()
    assert not ((lung | m["airways"]) & ~m["body"]).any()
    np.testing.assert_array_equal(ph.regions > 0, lung)
    labels = ph.lung_labels
    np.testing.assert_array_equal(labels == 1, m["right_lung"])
    np.testing.assert_array_equal(labels == 2, m["left_lung"])


def test_laterality_and_anatomy(ph):
    """LPS: columns run to patient left, rows run posterior. Patient right = small column."""
    mid = (ph.hu.shape[2] - 1) / 2
    right, left = centroid(ph.masks["right_lung"]), centroid(ph.masks["left_lung"])
    assert right[2] < mid < left[2]
    assert (np.nonzero(ph.masks["right_lung"])[2] < mid).all()
    assert (np.nonzero(ph.masks["left_lung"])[2] > mid).all()
    heart = centroid(ph.labels == TISSUES["heart"])
    liver = centroid(ph.labels == TISSUES["liver"])
    spine = centroid(ph.labels == TISSUES["marrow"])
    assert heart[2] > mid and liver[2] < mid           # heart to the left, liver to the right
    assert heart[1] < spine[1]                          # heart anterior (smaller row) to the spine
    assert liver[0] < right[0]                          # liver below the lung centre
    # Patient coordinates of the right lung centroid: x < 0 (patient right in LPS).
    k, r, c = right
    x = ph.positions[int(k)][0] + c * ph.pixel_spacing[1] * ph.orientation[0]
    assert x < 0


def test_lungs_do_not_cover_scan_range(ph):
    per_slice = lungs(ph).sum(axis=(1, 2))
    present = np.nonzero(per_slice)[0]
    assert present[0] >= 2 and present[-1] <= len(per_slice) - 3   # slices below bases, above apices
    widest = per_slice.argmax()
    assert per_slice[present[-1] - 1] < 0.3 * per_slice[widest]    # the apex is narrow
    assert per_slice[present[0]] < 0.3 * per_slice[widest]         # costophrenic recesses only
    # Trachea above the apex in the midline, two main bronchi below the carina.
    air = ph.masks["airways"]
    top = air[-1]
    assert top.any() and abs(centroid(top[None])[2] - (ph.hu.shape[2] - 1) / 2) < 3
    counts = [ndimage.label(air[k])[1] for k in range(len(air))]
    assert max(counts) == 2 and counts[-1] == 1


def test_float_burden(ph):
    for zone in ZONES:
        assert abs(ph.achieved_burden[zone] - 0.2) < 0.01
        sel = ph.regions == ZONES.index(zone) + 1
        assert abs(ph.masks["infection"][sel].mean() - 0.2) < 0.01
    for side in ("right", "left", "total"):
        assert abs(ph.lung_burden[side] - 0.2) < 0.01
    cons_share = ph.masks["consolidation"].sum() / ph.masks["infection"].sum()
    assert 0.25 < cons_share < 0.35


def test_dict_burden():
    p = make_phantom(**SMALL, seed=3, burden={"right_lower": 0.4})
    assert abs(p.achieved_burden["right_lower"] - 0.4) < 0.01
    assert all(p.achieved_burden[z] == 0 for z in ZONES if z != "right_lower")
    inf = p.masks["infection"]
    assert not inf[p.regions != ZONES.index("right_lower") + 1].any()
    assert not (inf & p.masks["left_lung"]).any()
    assert p.lung_burden["left"] == 0 and 0.1 < p.lung_burden["right"] < 0.2
    # Zones: right_lower is caudal to right_upper.
    assert centroid(p.regions == 3)[0] < centroid(p.regions == 2)[0] < centroid(p.regions == 1)[0]


def test_zero_and_invalid_burden():
    p = make_phantom(rows=64, cols=64, slices=24, pixel_spacing=5.6, slice_spacing=12.5, burden=0.0)
    assert not p.masks["infection"].any()
    with pytest.raises(ValueError):
        make_phantom(rows=64, cols=64, slices=24, burden={"right_apex": 0.1})
    with pytest.raises(ValueError):
        make_phantom(rows=64, cols=64, slices=24, burden=1.5)


def wall_depth(p):
    """In-plane distance (mm) to the chest wall (muscle, rib, cartilage)."""
    wall = np.isin(p.labels, [TISSUES["muscle"], TISSUES["bone"], TISSUES["cartilage"]])
    return np.stack([ndimage.distance_transform_edt(~w, sampling=p.pixel_spacing) for w in wall])


def test_lesions_peripheral_vessels_central(ph):
    """Infection is commoner near the chest wall (subpleural predominance); vessels are thicker
    and denser centrally, thinning out towards the periphery."""
    depth = wall_depth(ph)
    lung, inf, ves = lungs(ph), ph.masks["infection"], ph.masks["vessels"]
    shallow, deep = lung & (depth < 20), lung & (depth > 40)
    assert shallow.sum() > 1000 and deep.sum() > 1000
    assert inf[shallow].mean() > 1.5 * inf[deep].mean()
    assert 0.005 < ves.sum() / lung.sum() < 0.15
    assert ves[deep].mean() > 1.5 * ves[shallow].mean()


def test_deterministic_by_seed(ph):
    again = make_phantom(**SMALL, seed=7, burden=0.2)
    np.testing.assert_array_equal(again.hu, ph.hu)
    for name, m in ph.masks.items():
        np.testing.assert_array_equal(again.masks[name], m)
    other = make_phantom(**SMALL, seed=8, burden=0.2)
    assert not np.array_equal(other.masks["infection"], ph.masks["infection"])


def read_series(paths):
    return [pydicom.dcmread(p) for p in paths]


def test_written_study(ph, tmp_path):
    study_uid = generate_uid()
    paths = write_phantom_study(ph, tmp_path, study_instance_uid=study_uid, extra_series=True)
    assert len(paths) == 61
    assert [p.name for p in paths[:2]] == ["CT0001.dcm", "CT0002.dcm"] and paths[-1].name == "LOC0001.dcm"
    axial, loc = read_series(paths[:-1]), pydicom.dcmread(paths[-1])
    ds = axial[0]
    assert ds.SOPClassUID == CT_IMAGE_STORAGE and ds.Modality == "CT"
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert ds.PatientPosition == "HFS" and ds.BodyPartExamined == "CHEST"
    assert ds.PatientID == "PHANTOM-0001" and str(ds.PatientName) == "Phantom^Chest"
    assert ds.StudyInstanceUID == study_uid and ds.Manufacturer == "ctnode phantom"
    assert len({d.SOPInstanceUID for d in axial}) == 60
    assert len({(d.SeriesInstanceUID, d.FrameOfReferenceUID) for d in axial}) == 1
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert [float(v) for v in ds.PixelSpacing] == [2.8, 2.8] and float(ds.SliceThickness) == 5.0
    axial.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    z = np.array([float(d.ImagePositionPatient[2]) for d in axial])
    np.testing.assert_allclose(np.diff(z), 5.0)
    np.testing.assert_allclose([[float(v) for v in d.ImagePositionPatient] for d in axial], ph.positions,
                               atol=1e-3)
    np.testing.assert_allclose([float(d.SliceLocation) for d in axial], z)
    vol = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in axial])
    np.testing.assert_array_equal(vol, ph.hu)
    # The localizer: separate series, same study and frame of reference.
    assert list(loc.ImageType)[2] == "LOCALIZER"
    assert loc.StudyInstanceUID == study_uid and loc.SeriesInstanceUID != ds.SeriesInstanceUID
    assert loc.FrameOfReferenceUID == ds.FrameOfReferenceUID
    assert loc.pixel_array.shape == (60, 128)


def test_rle_transfer_syntax(tmp_path):
    p = make_phantom(rows=64, cols=64, slices=16, pixel_spacing=5.6, slice_spacing=18.0, seed=1)
    paths = write_phantom_study(p, tmp_path, transfer_syntax=RLELossless)
    ds = pydicom.dcmread(paths[0])  # instance 1 = most cranial slice
    assert ds.file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(ds.pixel_array, p.hu[-1])


def test_ground_truth_roundtrip(ph, tmp_path):
    gt = load_ground_truth(save_ground_truth(ph, tmp_path))
    for name, m in ph.masks.items():
        np.testing.assert_array_equal(gt["masks"][name], m)
    np.testing.assert_array_equal(gt["regions"], ph.regions)
    np.testing.assert_allclose(gt["positions"], ph.positions)
    assert gt["pixel_spacing"] == ph.pixel_spacing and gt["slice_spacing"] == ph.slice_spacing
    assert gt["achieved_burden"] == ph.achieved_burden and gt["seed"] == 7


@pytest.mark.peer
def test_dciodvfy(ph, tmp_path):
    exe = shutil.which("dciodvfy")
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("dciodvfy (Debian dicom3tools) is required under CI")
        pytest.skip("dciodvfy (Debian package dicom3tools) not installed")
    paths = write_phantom_study(ph, tmp_path, extra_series=True)
    for path in (paths[0], paths[-1]):
        res = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
        report = res.stdout + res.stderr
        errors = [line for line in report.splitlines() if line.startswith("Error")]
        assert not errors, report


@pytest.mark.slow
def test_default_size(tmp_path):
    t0 = time.perf_counter()
    p = make_phantom(seed=0)
    elapsed = time.perf_counter() - t0
    assert p.hu.shape == (240, 512, 512)
    assert elapsed < 60, f"default phantom took {elapsed:.1f} s"
    present = np.nonzero(lungs(p).any(axis=(1, 2)))[0]
    assert present[0] > 5 and present[-1] < 234
    for zone in ZONES:
        assert abs(p.achieved_burden[zone] - 0.15) < 0.01
    parenchyma = lungs(p) & ~p.masks["infection"] & ~p.masks["vessels"]
    assert -870 < np.median(p.hu[parenchyma]) < -830
    assert centroid(p.masks["right_lung"][::4])[2] < 255.5 < centroid(p.masks["left_lung"][::4])[2]


def test_effusion_is_dependent_fluid_against_the_wall_and_not_lung():
    p = make_phantom(**SMALL, seed=7, burden=0.0, effusion=0.2)
    fluid = p.labels == TISSUES["effusion"]
    assert fluid.any() and not (fluid & lungs(p)).any()
    assert abs(np.median(p.hu[fluid]) - 15) < 10
    # dependent (rows grow posteriorly): behind the centre of the lungs; taken from the lungs of the same phantom
    assert centroid(fluid)[1] > centroid(lungs(p))[1]
    healthy = make_phantom(**SMALL, seed=7, burden=0.0)
    np.testing.assert_array_equal(lungs(healthy), lungs(p) | fluid)
    with pytest.raises(ValueError):
        make_phantom(**SMALL, effusion=1.0)
