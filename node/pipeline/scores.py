"""Lung involvement scores from the lung masks and the infection result.

Volumetric series give volumes (ml) and the percentage of each lung's VOLUME that is infected. A single
slice gives areas (cm2) and the percentage of lung AREA instead, flagged as 2D / partial coverage; its
volumes are None. Infection outside the lung mask is never counted.

:meth:`Scores.as_dict` returns exactly the keys the SR writer (``node.writers.sr.MEASUREMENTS`` plus
``volumetric``) understands; :meth:`Scores.details` adds the rest (total lung size, mean lung HU,
coverage flags) for reports and the database.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .types import InfectionResult, LungMasks, Volume


@dataclass
class Scores:
    """Scores of one analysed series. Sizes are None when they do not apply (volumes of a 2D analysis)."""

    volumetric: bool
    partial_coverage: bool
    slices: int
    # 3D (None in 2D)
    right_lung_volume_ml: float | None = None
    left_lung_volume_ml: float | None = None
    total_lung_volume_ml: float | None = None
    infection_volume_ml: float | None = None
    right_infection_volume_ml: float | None = None
    left_infection_volume_ml: float | None = None
    ggo_volume_ml: float | None = None
    consolidation_volume_ml: float | None = None
    # 2D (None in 3D)
    right_lung_area_cm2: float | None = None
    left_lung_area_cm2: float | None = None
    total_lung_area_cm2: float | None = None
    infection_area_cm2: float | None = None
    right_infection_area_cm2: float | None = None
    left_infection_area_cm2: float | None = None
    ggo_area_cm2: float | None = None
    consolidation_area_cm2: float | None = None
    # percent of the lung VOLUME (3D) or AREA (2D) that is infected; None when that lung is empty
    percent_involved_right: float | None = None
    percent_involved_left: float | None = None
    percent_involved_total: float | None = None
    mean_hu_lungs: float | None = None
    mean_hu_infection: float | None = None
    basis: str = "volume"                 # "volume" or "area"
    notes: list[str] = field(default_factory=list)

    #: Keys shared with the SR writer; everything else is in :meth:`details` only.
    SR_KEYS = (
        "right_lung_volume_ml", "left_lung_volume_ml", "infection_volume_ml", "right_infection_volume_ml",
        "left_infection_volume_ml", "ggo_volume_ml", "consolidation_volume_ml",
        "right_lung_area_cm2", "left_lung_area_cm2", "infection_area_cm2", "right_infection_area_cm2",
        "left_infection_area_cm2", "ggo_area_cm2", "consolidation_area_cm2",
        "percent_involved_right", "percent_involved_left", "percent_involved_total", "mean_hu_infection",
    )

    def as_dict(self) -> dict[str, Any]:
        """``volumetric`` plus the SR measurement keys that have a value (None values left out)."""
        out: dict[str, Any] = {"volumetric": self.volumetric}
        for key in self.SR_KEYS:
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    def details(self) -> dict[str, Any]:
        """Every field, None included."""
        return asdict(self)


def _percent(part: int, whole: int) -> float | None:
    return 100.0 * part / whole if whole > 0 else None


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean(dtype=np.float64)) if values.size else None


def compute_scores(volume: Volume, lungs: LungMasks, infection: InfectionResult) -> Scores:
    """Scores of ``infection`` within ``lungs`` on ``volume`` (see the module docstring)."""
    right, left = lungs.right, lungs.left
    lung = right | left
    inf = infection.infection.astype(bool, copy=False) & lung
    n = {
        "right_lung": int(right.sum()), "left_lung": int(left.sum()),
        "infection": int(inf.sum()),
        "right_infection": int((inf & right).sum()), "left_infection": int((inf & left).sum()),
    }
    n_lung = n["right_lung"] + n["left_lung"]
    ggo = infection.ggo.astype(bool, copy=False) & lung if infection.ggo is not None else None
    cons = infection.consolidation.astype(bool, copy=False) & lung if infection.consolidation is not None else None

    volumetric = volume.is_volumetric
    s = Scores(
        volumetric=volumetric,
        partial_coverage=bool(lungs.partial_coverage or not volumetric),
        slices=volume.shape[0],
        basis="volume" if volumetric else "area",
        percent_involved_right=_percent(n["right_infection"], n["right_lung"]),
        percent_involved_left=_percent(n["left_infection"], n["left_lung"]),
        percent_involved_total=_percent(n["infection"], n_lung),
        mean_hu_lungs=_mean(volume.hu[lung]),
        mean_hu_infection=_mean(volume.hu[inf]),
    )
    if volumetric:
        unit = volume.voxel_volume_ml
        for key, count in n.items():
            setattr(s, f"{key}_volume_ml", count * unit)
        s.total_lung_volume_ml = n_lung * unit
        s.ggo_volume_ml = int(ggo.sum()) * unit if ggo is not None else None
        s.consolidation_volume_ml = int(cons.sum()) * unit if cons is not None else None
    else:
        unit = volume.pixel_spacing[0] * volume.pixel_spacing[1] / 100.0  # mm2 -> cm2
        for key, count in n.items():
            setattr(s, f"{key}_area_cm2", count * unit)
        s.total_lung_area_cm2 = n_lung * unit
        s.ggo_area_cm2 = int(ggo.sum()) * unit if ggo is not None else None
        s.consolidation_area_cm2 = int(cons.sum()) * unit if cons is not None else None
        s.notes.append("2D, partial coverage: a single slice, areas and percent of lung area, no volumes")
    if volumetric and lungs.partial_coverage:
        s.notes.append("partial coverage: lung reaches the first or last slice, so volumes cover only "
                       "the lung in the field of view")
    return s
