"""COVID-SemiSeg crops as CT slices (torch-free; used by bench/lungs_on_semiseg.py and training/lungnet.py).

The slices are 8-bit lung-window crops around the lungs, not DICOM. :func:`as_ct` maps the 8-bit values back
to HU through the training images' window (``models.predict``: centre -400, width 1300; values outside it are
clipped, so bone reads as +250 HU) and pads the crop with a 24 mm soft-tissue wall (+30 HU) and air, so that
the lung steps find a body, a wall and outside air. The pixel size is not recorded in the data set:
``SPACING_MM`` is assumed.
"""
from __future__ import annotations

import numpy as np

WINDOW = (-400.0, 1300.0)  # models.predict.DEFAULT_WINDOW, repeated so that this module does not import torch
WALL_MM, AIR_MM, WALL_HU = 24.0, 30.0, 30.0
SPACING_MM = 0.75
AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]     # columns run along patient x
ROTATED = [0.0, 1.0, 0.0, 1.0, 0.0, 0.0]   # rows run along patient x (crop rotated by 90 degrees)


def as_ct(image8: np.ndarray, spacing: float = SPACING_MM) -> tuple[np.ndarray, int]:
    """The 8-bit crop as HU, padded with a soft-tissue wall and air; returns (hu, pad in pixels)."""
    centre, width = WINDOW
    return with_wall(image8.astype(np.float32) / 255.0 * width + (centre - width / 2), spacing)


def with_wall(hu: np.ndarray, spacing: float) -> tuple[np.ndarray, int]:
    """``hu`` (r, c) or (k, r, c) padded in plane with a ``WALL_MM`` soft-tissue wall (``WALL_HU``) and
    ``AIR_MM`` of air, at ``spacing`` mm per pixel; returns (hu, pad in pixels on each side)."""
    wall, air = int(round(WALL_MM / spacing)), int(round(AIR_MM / spacing))
    plane = [(0, 0)] * (hu.ndim - 2)
    hu = np.pad(hu, plane + [(wall, wall)] * 2, constant_values=WALL_HU)
    return np.pad(hu, plane + [(air, air)] * 2, constant_values=-1000.0), wall + air


def volume_of(hu: np.ndarray, orientation: list[float], spacing: float = SPACING_MM):
    """One padded slice as a :class:`node.pipeline.types.Volume`."""
    from node.pipeline.types import Volume

    return Volume(hu=hu[None], positions=np.zeros((1, 3)), orientation=np.array(orientation),
                  pixel_spacing=(spacing, spacing), slice_spacing=0.0, sop_instance_uids=["1"],
                  series_instance_uid="1", study_instance_uid="1")
