"""Volume assembly: sorting along the normal, per-slice rescale, spacing checks, real compressed series."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest

from node.pipeline.volume import VolumeError, assemble_volume
from tests.builders import AXIAL, write_series
from tests.support import shared_dicom

pytestmark = pytest.mark.unit


def slices_with_ids(n: int, size: int = 8) -> np.ndarray:
    """Slice k is filled with -1000 + 10 * k HU, so the order of a volume can be read from its values."""
    return np.stack([np.full((size, size), -1000.0 + 10 * k) for k in range(n)])


def slice_ids(hu: np.ndarray) -> list[int]:
    return [int(round((float(s.mean()) + 1000) / 10)) for s in hu]


def test_shuffled_files_are_sorted_along_the_normal(tmp_path):
    order = [3, 0, 5, 1, 4, 2]
    paths = write_series(tmp_path, slices_with_ids(6), step=2.5, order=order)
    vol = assemble_volume(paths)
    assert slice_ids(vol.hu) == list(range(6))
    np.testing.assert_allclose(vol.positions[:, 2], np.arange(6) * 2.5)
    assert vol.slice_spacing == pytest.approx(2.5)
    assert vol.hu.dtype == np.float32 and vol.shape == (6, 8, 8)
    # headers kept in slice order, without pixel data, matching the SOP Instance UIDs
    assert [str(d.SOPInstanceUID) for d in vol.datasets] == vol.sop_instance_uids
    assert all("PixelData" not in d for d in vol.datasets)
    assert [int(d.InstanceNumber) for d in vol.datasets] == list(range(1, 7))


def test_reversed_normal_sorts_by_projection_not_by_z(tmp_path):
    # Row direction mirrored: normal = -z, so the slice with the LOWEST z comes last.
    orientation = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    positions = np.array([[0.0, 0.0, -3.0 * k] for k in range(5)])
    paths = write_series(tmp_path, slices_with_ids(5), orientation=orientation, positions=positions,
                         order=[4, 2, 0, 3, 1])
    vol = assemble_volume(paths)
    assert slice_ids(vol.hu) == list(range(5))
    assert list(vol.positions[:, 2]) == [0.0, -3.0, -6.0, -9.0, -12.0]
    assert np.all(np.diff(vol.positions @ vol.normal) > 0)


def test_rescale_is_applied_per_slice(tmp_path):
    hu = slices_with_ids(3) + 500
    rescale = [(1.0, -1024.0), (2.0, -2048.0), (0.5, -1000.0)]
    vol = assemble_volume(write_series(tmp_path, hu, rescale=rescale))
    np.testing.assert_allclose(vol.hu, hu, atol=1.0)


def test_values_below_minus_1024_are_padding(tmp_path):
    hu = np.full((2, 8, 8), -3024.0)
    hu[:, 2:6, 2:6] = 40.0
    vol = assemble_volume(write_series(tmp_path, hu, rescale=[(1.0, -3024.0)] * 2))
    assert vol.hu.min() == -1024.0 and vol.hu.max() == 40.0


def test_datasets_in_memory_and_header_only_inputs(tmp_path):
    paths = write_series(tmp_path, slices_with_ids(4), order=[2, 0, 3, 1])
    full = [pydicom.dcmread(p) for p in paths]
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    a, b = assemble_volume(full), assemble_volume(headers)
    np.testing.assert_array_equal(a.hu, b.hu)
    assert slice_ids(a.hu) == [0, 1, 2, 3]
    assert "PixelData" in full[0]  # the caller's datasets are not modified


def test_duplicate_positions_are_an_error(tmp_path):
    positions = np.array([[0, 0, 0], [0, 0, 3.0], [0, 0, 3.0], [0, 0, 6.0]])
    paths = write_series(tmp_path, slices_with_ids(4), positions=positions)
    with pytest.raises(VolumeError, match="duplicate slice position"):
        assemble_volume(paths)


def test_missing_slices_are_a_gap_error(tmp_path):
    paths = write_series(tmp_path, slices_with_ids(8), step=2.0)
    del paths[4]
    with pytest.raises(VolumeError, match=r"gap in the series: 4.00 mm .* where 2.00 mm is expected; about 1"):
        assemble_volume(paths)


def test_irregular_spacing_is_an_error(tmp_path):
    positions = np.array([[0, 0, z] for z in (0.0, 2.0, 4.0, 5.3, 7.3, 9.3)])
    with pytest.raises(VolumeError, match="irregular slice spacing"):
        assemble_volume(write_series(tmp_path, slices_with_ids(6), positions=positions))


def test_mixed_geometry_is_an_error(tmp_path):
    a = write_series(tmp_path / "a", slices_with_ids(3))
    b = write_series(tmp_path / "b", slices_with_ids(2), spacing=(1.0, 1.0))
    with pytest.raises(VolumeError, match="pixel spacing"):
        assemble_volume(a + b)
    c = write_series(tmp_path / "c", slices_with_ids(2), orientation=(1.0, 0, 0, 0, 0, -1.0))
    with pytest.raises(VolumeError, match="orientation differs"):
        assemble_volume(a + c)


def test_gantry_tilt_is_kept_as_a_sheared_grid(tmp_path):
    # Positions move 3 mm along z and 0.5 mm along y per slice (about 9.5 degrees of tilt).
    positions = np.array([[0.0, 0.5 * k, 3.0 * k] for k in range(5)])
    vol = assemble_volume(write_series(tmp_path / "t", slices_with_ids(5), positions=positions))
    assert vol.slice_spacing == pytest.approx(3.0)  # measured along the normal
    np.testing.assert_allclose(vol.positions, positions)  # no resampling, real positions kept
    assert any("gantry tilt 9.5 degrees" in n for n in vol.notes)
    steep = np.array([[0.0, 3.0 * k, 3.0 * k] for k in range(4)])
    with pytest.raises(VolumeError, match="gantry tilt of 45.0 degrees"):
        assemble_volume(write_series(tmp_path / "s", slices_with_ids(4), positions=steep))


def test_single_slice_volume(tmp_path):
    vol = assemble_volume(write_series(tmp_path, slices_with_ids(1)))
    assert vol.shape == (1, 8, 8) and vol.slice_spacing == 0.0 and not vol.is_volumetric


def test_jpeg2000_series_decodes_and_assembles():
    folder = shared_dicom() / "abdomen-j2k-series"
    files = sorted(folder.iterdir())
    assert len(files) == 20
    assert pydicom.dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
    vol = assemble_volume(files)
    assert vol.shape == (20, 512, 512)
    # Slices are 3 mm thick but reconstructed every 2 mm (overlapping): spacing comes from the positions.
    assert float(vol.datasets[0].SliceThickness) == 3.0 and vol.slice_spacing == pytest.approx(2.0)
    assert np.all(np.diff(vol.positions[:, 2]) == pytest.approx(2.0))
    assert vol.hu.min() == -1024.0 and 1000.0 < vol.hu.max() < 3072.0  # bone in HU, rescale applied
    body = vol.hu[10] > -500
    assert 20.0 < float(np.median(vol.hu[10][body])) < 80.0  # soft tissue/liver around +40 HU
    assert vol.series_instance_uid == "" and vol.orientation.tolist() == list(AXIAL)


def test_malformed_geometry_is_reported_not_raised(tmp_path):
    """Geometry attributes with the wrong multiplicity or non-numeric text (what the fuzzer found):
    the series is skipped or failed with a reason, never a TypeError."""
    from pydicom.valuerep import DSfloat

    from node.pipeline.run import run_pipeline
    from tests.builders import ct_slice, write

    cases = {
        "spacing": lambda ds: setattr(ds, "PixelSpacing", DSfloat(0.7)),
        "position": lambda ds: setattr(ds, "ImagePositionPatient", [7.25, 7.5, 7.75]),  # made text below
        "orientation": lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0]),
    }
    for name, spoil in cases.items():
        files = []
        for z in range(3):
            ds = ct_slice(study_uid="1.2.3", series_uid="1.2.3.4", z=z, size=32)
            spoil(ds)
            path = write(ds, tmp_path / name, f"{z}.dcm")
            if name == "position":  # non-numeric text, as a broken modality writes it (same length)
                path.write_bytes(path.read_bytes().replace(b"7.25\\7.5\\7.75", b"7.2x\\7.y\\7.z5"))
            files.append(path)
        result = run_pipeline([str(f) for f in files], "threshold")
        assert result.status in ("skipped", "failed") and result.reason, name
