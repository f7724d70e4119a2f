"""Scanner-made axial reformats: analysed when no original axial series is usable, never a projection.

Vendor ImageType patterns of "CHEST AX" reformats: GE DERIVED\\SECONDARY\\REFORMATTED\\AVERAGE, Canon/Toshiba
and Siemens DERIVED\\PRIMARY\\MPR, Siemens DERIVED\\SECONDARY\\CSA MPR, Philips DERIVED\\SECONDARY\\MPR.
The real slices are the shared NY-SBU axial chest slices with only their ImageType rewritten.
"""
from __future__ import annotations

import pydicom
import pytest
from pydicom.uid import generate_uid

from node.pipeline.run import run_pipeline
from node.pipeline.select import SeriesKind, evaluate_series, select_series
from tests.builders import CORONAL, ct_series
from tests.support import shared_dicom

pytestmark = pytest.mark.unit

REFORMATS = {
    "GE average": ["DERIVED", "SECONDARY", "REFORMATTED", "AVERAGE"],
    "Canon/Toshiba MPR": ["DERIVED", "PRIMARY", "MPR"],
    "Siemens MPR": ["DERIVED", "PRIMARY", "MPR"],
    "Siemens CSA MPR": ["DERIVED", "SECONDARY", "CSA MPR"],
    "Philips MPR": ["DERIVED", "SECONDARY", "MPR"],
}
PROJECTIONS = {
    "GE MIP": ["DERIVED", "SECONDARY", "REFORMATTED", "MIP"],
    "GE MinIP": ["DERIVED", "SECONDARY", "REFORMATTED", "MINIP"],
    "Siemens CSA MIP": ["DERIVED", "PRIMARY", "CSA MIP"],
    "volume rendering": ["DERIVED", "SECONDARY", "VRT"],
    "surface shaded display": ["DERIVED", "SECONDARY", "SSD"],
    "curved reformat": ["DERIVED", "SECONDARY", "CURVED"],
    "projection": ["DERIVED", "PRIMARY", "PROJECTION IMAGE"],
}
REAL_CHEST_SLICE = "ny-sbu/A046441/axial/19010101-23.dcm"


def _real_slice(image_type: list[str], series_uid: str | None = None) -> pydicom.Dataset:
    ds = pydicom.dcmread(shared_dicom() / REAL_CHEST_SLICE)
    ds.ImageType = image_type
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


@pytest.mark.parametrize("vendor", sorted(REFORMATS))
def test_a_study_whose_only_axial_series_is_a_vendor_reformat_is_analysed(vendor):
    image_type = REFORMATS[vendor]
    result = run_pipeline([_real_slice(image_type)], "threshold")
    assert result.status == "done", result.reason
    chosen = next(d for d in result.decisions if d.chosen)
    assert chosen.kind is SeriesKind.REFORMAT and chosen.image_type == "\\".join(image_type)
    assert "no original axial series is usable, so a derived axial reformat is analysed" in result.reason
    note = f"analysed series is a derived axial reformat (ImageType {chosen.image_type})"
    assert any(n.startswith(note) for n in result.notes)
    assert any(n.startswith(note) for n in result.segmentation_notes)  # what the SR carries as comments
    assert chosen.as_dict()["kind"] == "derived reformat"


@pytest.mark.parametrize("kind", sorted(PROJECTIONS))
def test_projections_renderings_and_curved_reformats_are_never_analysed(kind):
    result = run_pipeline([_real_slice(PROJECTIONS[kind])], "threshold")
    assert result.status == "skipped"
    (decision,) = result.decisions
    assert not decision.accepted and "projection or rendering" in decision.reason


def test_an_original_series_is_ranked_before_a_reformat_with_more_and_thinner_slices():
    original = ct_series(40, step=5.0, thickness=5.0, series_uid="1.7.1")
    reformat = ct_series(200, step=1.0, thickness=1.0, series_uid="1.7.2",
                         ImageType=["DERIVED", "SECONDARY", "REFORMATTED", "AVERAGE"])
    chosen, decisions = select_series(reformat + original)
    assert chosen.series_uid == "1.7.1" and chosen.kind is SeriesKind.ORIGINAL
    assert "an original acquisition, ranked before derived reformats" in chosen.reason
    other = next(d for d in decisions if d.series_uid == "1.7.2")
    assert other.accepted and not other.chosen
    assert "a derived reformat, and series 1.7.1 is an original acquisition" in other.reason


def test_among_reformats_the_thinnest_is_chosen_even_with_fewer_slices():
    mpr = ["DERIVED", "PRIMARY", "MPR"]
    thick = ct_series(120, step=2.5, thickness=2.5, series_uid="1.8.1", ImageType=mpr)
    thin = ct_series(100, step=1.0, thickness=1.0, series_uid="1.8.2", ImageType=mpr)
    chosen, decisions = select_series(thick + thin)
    assert chosen.series_uid == "1.8.2" and "thinnest reformat (1 vs 2.5 mm)" in chosen.reason
    other = next(d for d in decisions if d.series_uid == "1.8.1")
    assert "thicker slices (2.5 vs 1 mm)" in other.reason


def test_a_reformat_is_used_when_the_original_series_is_not_usable():
    """The original series is a coronal acquisition here (not axial): the axial reformat is analysed."""
    coronal = ct_series(40, series_uid="1.9.1", orientation=CORONAL)
    reformat = ct_series(40, series_uid="1.9.2", ImageType=["DERIVED", "SECONDARY", "CSA MPR"])
    chosen, decisions = select_series(coronal + reformat)
    assert chosen.series_uid == "1.9.2" and "derived axial reformat" in chosen.reason


def test_other_derived_images_and_mixed_projections_stay_refused():
    d = evaluate_series(ct_series(10, ImageType=["DERIVED", "SECONDARY", "SCREEN SAVE"]))
    assert not d.accepted and "neither the original acquisition nor an averaging/MPR reformat" in d.reason
    d = evaluate_series(ct_series(10, ImageType=["DERIVED", "SECONDARY", "MPR", "MIP"]))
    assert not d.accepted and "MIP" in d.reason
