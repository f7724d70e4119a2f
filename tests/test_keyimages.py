"""Key images (node/writers/keyimages.py): Secondary Capture slices with the overlay burned in."""
from __future__ import annotations

import numpy as np
import pytest
from pydicom.uid import SecondaryCaptureImageStorage

from node.pipeline.types import InfectionResult
from node.writers.keyimages import ALPHA, BANNER_HEIGHT, build_key_images, choose_slices, patient_orientation
from node.writers.seg import DISPLAY_COLOURS
from tests import peers
from tests.builders import INFNET, OBLIQUE, THRESHOLD, make_masks, make_volume, roundtrip

pytestmark = pytest.mark.unit


def lung_window_volume():
    volume = make_volume()
    volume.hu[:] = -1000.0
    lungs, infection = make_masks(volume)
    volume.hu[lungs.labels > 0] = -850.0
    volume.hu[infection.infection] = -400.0
    return volume, lungs, infection


def test_choose_slices_most_infected_first_and_a_lung_slice_without_infection():
    volume = make_volume()
    lungs, infection = make_masks(volume)
    area = infection.infection.sum(axis=(1, 2))
    chosen = choose_slices(lungs, infection, 3)
    assert len(chosen) == 3 and all(area[i] > 0 for i in chosen)
    assert [area[i] for i in chosen] == sorted(area[area > 0], reverse=True)[:3]
    assert choose_slices(lungs, infection, 0) == []
    _, empty = make_masks(volume, infection=False)
    lung_area = (lungs.labels > 0).sum(axis=(1, 2))
    assert choose_slices(lungs, empty, 3) == [int(np.argmax(lung_area))]


@pytest.mark.parametrize("classes", [True, False])
def test_key_images_are_derived_secondary_captures_of_the_chosen_slices(classes):
    volume, lungs, infection = lung_window_volume()
    if not classes:
        infection = InfectionResult(infection=infection.infection)
    images = [roundtrip(sc) for sc in build_key_images(volume, lungs, infection, INFNET, count=2, series_number=903,
                                                       percent_of_lung=4.1)]
    assert len(images) == 2
    chosen = set(choose_slices(lungs, infection, 2))
    index_of = {uid: i for i, uid in enumerate(volume.sop_instance_uids)}
    sources = [index_of[str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID)] for sc in images]
    assert set(sources) == chosen
    heights = [float(np.dot(volume.positions[i], volume.normal)) for i in sources]
    assert heights == sorted(heights, reverse=True)  # head first
    source_header = volume.datasets[0]
    for sc, index in zip(images, sources):
        assert sc.SOPClassUID == SecondaryCaptureImageStorage
        assert list(sc.ImageType) == ["DERIVED", "SECONDARY"] and sc.BurnedInAnnotation == "YES"
        assert sc.ConversionType == "WSD" and sc.Modality == "OT"
        assert "DERIVED" in sc.SeriesDescription and "not for primary diagnosis" in sc.ImageComments
        assert sc.StudyInstanceUID == volume.study_instance_uid and sc.SeriesInstanceUID != volume.series_instance_uid
        assert sc.PatientID == source_header.PatientID and sc.AccessionNumber == source_header.AccessionNumber
        assert sc.StudyDescription == source_header.StudyDescription == "CT CHEST"   # the whole study module
        assert [float(v) for v in sc.PixelSpacing] == list(volume.pixel_spacing)
        assert list(sc.PatientOrientation) == ["L", "P"]
        assert sc.SeriesNumber == 903 and sc.PhotometricInterpretation == "RGB"
        pixels = sc.pixel_array.astype(float)
        assert pixels.shape == (*volume.shape[1:], 3)
        # grey outside the lungs and overlays, below the banner
        body = (lungs.labels[index] == 0)
        body[:BANNER_HEIGHT + 1] = False
        assert np.all(pixels[body][:, 0] == pixels[body][:, 1])
        # an infected voxel away from the lung outline carries the blend of grey and the segment colour
        inner = infection.infection[index].copy()
        inner[:BANNER_HEIGHT + 1] = False
        from scipy import ndimage
        inner &= ndimage.binary_erosion(lungs.labels[index] > 0, iterations=2)
        if classes:
            inner &= infection.ggo[index]
        key = "ggo" if classes else "infection"
        grey = np.clip((-400.0 + 1350.0) / 1500.0, 0, 1) * 255.0
        expected = (1 - ALPHA) * grey + ALPHA * np.asarray(DISPLAY_COLOURS[key], float)
        assert inner.any()
        assert np.allclose(pixels[inner], expected, atol=1.0)
        banner = pixels[:BANNER_HEIGHT]
        assert np.any((banner[..., 0] > 200) & (banner[..., 1] > 200) & (banner[..., 2] < 50))  # yellow text


def test_no_key_images_when_not_asked():
    volume, lungs, infection = lung_window_volume()
    assert build_key_images(volume, lungs, infection, THRESHOLD, count=0, series_number=903) == []


def test_patient_orientation_from_the_cosines():
    assert patient_orientation(np.array([1.0, 0, 0, 0, 1.0, 0])) == ("L", "P")
    assert patient_orientation(np.array([-1.0, 0, 0, 0, 0, -1.0])) == ("R", "F")  # coronal, flipped
    assert patient_orientation(np.asarray(OBLIQUE)) == ("L", "P")


@pytest.mark.peer
def test_dciodvfy_key_images_have_no_errors(tmp_path):
    volume, lungs, infection = lung_window_volume()
    for classes in (True, False):
        inf = infection if classes else InfectionResult(infection=infection.infection)
        for n, sc in enumerate(build_key_images(volume, lungs, inf, INFNET, count=2, series_number=903)):
            path = tmp_path / f"sc-{classes}-{n}.dcm"
            sc.save_as(path, enforce_file_format=True)
            errors, _ = peers.dciodvfy(path)
            assert errors == [], errors
