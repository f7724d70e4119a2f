"""Where the training data is: ``CTNODE_DATA`` when set, else ``shared/data`` next to the checkout.

The shared data folder holds ``covid-semiseg/`` (the COVID-SemiSeg slices, Inf-Net ``Dataset/`` layout) and
``dicom/`` (real CT slices). Every command that reads data also takes ``--data``.
"""
from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "CTNODE_DATA"
CHECKOUT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data from the repository


def data_root() -> Path:
    """The shared data folder: ``$CTNODE_DATA``, else ``../shared/data`` relative to the checkout."""
    return Path(os.environ.get(DATA_ENV) or CHECKOUT_DATA)


def semiseg_root() -> Path:
    """The COVID-SemiSeg data set inside :func:`data_root`."""
    return data_root() / "covid-semiseg"
