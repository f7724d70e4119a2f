"""Where the tests find the shared data sets, and how a missing one is reported.

The shared data folder is ``$CTNODE_DATA`` when that is set, else ``../shared/data`` next to the checkout.
Outside CI a missing data set or peer skips the test; under ``CI=true`` it fails it.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI") == "true"
DATA_ENV = "CTNODE_DATA"
REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get(DATA_ENV) or REPO.parent / "shared" / "data")

# Found by looking at the images: these ny-sbu axial slices are abdomen (liver/kidneys/bowel, no lung).
ABDOMEN_AXIAL = ["A027284/axial/19000925-116.dcm", "A027284/axial/19001231-131.dcm",
                 "A058062/axial/19001231-084.dcm", "A058062/axial/19010108-078.dcm"]
CHEST_AXIAL = ["A002304/axial/19001231-076.dcm", "A002304/axial/19010112-135.dcm",
               "A046441/axial/19001111-045.dcm", "A046441/axial/19010101-23.dcm",
               "A048383/axial/19001231-30.dcm", "A048383/axial/19010410-30.dcm",
               "A056642/axial/19001229-053.dcm", "A056642/axial/19010107-111.dcm"]


def skip_or_fail(reason: str) -> None:
    """Outside CI a missing peer or data set skips the test; under CI=true it is a failure."""
    if IN_CI:
        pytest.fail(f"{reason} (required under CI=true)")
    pytest.skip(reason)


def shared_dicom() -> Path:
    """The shared real-DICOM folder; skips (fails under CI=true) when it is absent."""
    folder = SHARED_DATA / "dicom"
    if not folder.is_dir():
        skip_or_fail(f"shared DICOM folder {folder} is absent")
    return folder
