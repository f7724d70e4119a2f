"""Data passed between pipeline stages.

Array convention everywhere in the node: ``array[k, r, c]`` with ``k`` the slice index sorted along the
slice normal (ascending projection of ImagePositionPatient on the normal), ``r`` the DICOM row and ``c``
the DICOM column, exactly as the source frames are stored. The patient position of voxel (k, r, c) is::

    positions[k] + c * pixel_spacing[1] * orientation[:3] + r * pixel_spacing[0] * orientation[3:]

so masks computed on a :class:`Volume` map back to the source slices without any resampling.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Volume:
    """One CT series assembled in Hounsfield units with its patient geometry."""

    hu: np.ndarray                      # (slices, rows, cols) float32, HU
    positions: np.ndarray               # (slices, 3) float64, ImagePositionPatient of each slice (mm)
    orientation: np.ndarray             # (6,) float64, ImageOrientationPatient (row cosine, column cosine)
    pixel_spacing: tuple[float, float]  # (spacing between rows, spacing between columns) in mm
    slice_spacing: float                # mm between slice centres along the normal; 0.0 for a single slice
    sop_instance_uids: list[str]        # per slice, same order as ``hu``
    series_instance_uid: str
    study_instance_uid: str
    # Source headers (pixel data removed) in slice order; the SEG and SR writers reference them.
    datasets: list[Any] = field(default_factory=list)
    # Human-readable remarks from assembly (e.g. a gantry tilt kept as a sheared grid).
    notes: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.orientation[:3], self.orientation[3:])

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (cm3); for a single slice, a 1 mm slab is NOT assumed: 0."""
        return float(self.pixel_spacing[0] * self.pixel_spacing[1] * self.slice_spacing) / 1000.0

    @property
    def is_volumetric(self) -> bool:
        return self.hu.shape[0] > 1 and self.slice_spacing > 0


@dataclass
class LungMasks:
    """Lung segmentation: ``labels`` 0 = outside, 1 = right lung, 2 = left lung (patient right/left)."""

    labels: np.ndarray                   # (slices, rows, cols) uint8
    airways: np.ndarray | None = None    # bool, trachea and main bronchi that were removed
    body: np.ndarray | None = None       # bool
    partial_coverage: bool = False       # apex, bases or (fov_cut_cm2) a side not in the field of view
    # Largest area (cm2, one slice) of lung that the edge of the reconstructed field of view cuts off
    # (:func:`node.pipeline.lungs.lung_cut_by_fov`); such lung is outside the body outline and not in ``labels``.
    fov_cut_cm2: float = 0.0
    notes: list[str] = field(default_factory=list)
    method: str = "hu"                   # node.pipeline.lungs.LungMethod value that made ``labels``

    RIGHT = 1
    LEFT = 2

    @property
    def right(self) -> np.ndarray:
        return self.labels == self.RIGHT

    @property
    def left(self) -> np.ndarray:
        return self.labels == self.LEFT

    @property
    def lungs(self) -> np.ndarray:
        return self.labels > 0


@dataclass
class Effusion:
    """Pleural effusion and dense tissue that is neither lung nor effusion (:mod:`node.pipeline.effusion`), on the
    volume's grid; side labels as :class:`LungMasks`."""

    labels: np.ndarray                        # uint8: 0 none, 1 right effusion, 2 left effusion
    dense_unexplained: np.ndarray             # uint8: 0 none, 1 right, 2 left hemithorax
    volumetric: bool
    voxel_mm3: float                          # volume of one voxel (3D) or area of one pixel in mm2 (2D)
    notes: list[str] = field(default_factory=list)

    SIDES = {LungMasks.RIGHT: "right", LungMasks.LEFT: "left"}
    #: The keys of :meth:`as_dict` (ml for a volume, cm2 for a single slice), rows of the SR writer.
    SR_KEYS = tuple(f"{side}_effusion_{unit}" for unit in ("volume_ml", "area_cm2") for side in ("right", "left"))

    def amount(self, labels: np.ndarray, value: int) -> float:
        """ml (3D) or cm2 (a single slice) of ``labels == value``."""
        n = int(np.count_nonzero(labels == value))
        return n * self.voxel_mm3 / (1000.0 if self.volumetric else 100.0)

    def as_dict(self) -> dict[str, float]:
        """The effusion per side: ``right_effusion_volume_ml``/``left_effusion_volume_ml`` for a volume,
        ``..._area_cm2`` for a single slice (the SR measurement keys)."""
        unit = "volume_ml" if self.volumetric else "area_cm2"
        return {f"{name}_effusion_{unit}": self.amount(self.labels, value) for value, name in self.SIDES.items()}


@dataclass
class InfectionResult:
    """Output of an infection engine, on the same voxel grid as the volume."""

    infection: np.ndarray                # (slices, rows, cols) bool, any infection (GGO or consolidation)
    ggo: np.ndarray | None = None        # bool, ground-glass opacity, when the engine separates classes
    consolidation: np.ndarray | None = None
    # float32 0..1, optional: the engine's map wherever it looked (the Inf-Net engine: each slice's lung box,
    # also just outside the lung mask, which is how a lung mask that misses dense disease is noticed)
    probability: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)  # e.g. the thresholds an adaptive engine settled on


@dataclass
class EngineIdentity:
    """What the SEG/SR and the database record about the algorithm that produced a result."""

    name: str            # e.g. "threshold", "infnet"
    version: str         # engine code version
    weights_sha256: str  # "" when the engine has no weights
    description: str = ""
    device: str = ""     # where a network ran and in which precision ("cuda float16", "cpu float32"); "" if none
