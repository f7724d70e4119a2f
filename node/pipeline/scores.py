"""Lung involvement scores from the lung masks and the infection result.

Volumetric series give volumes (ml) and the percentage of each lung's VOLUME that is infected. A single
slice gives areas (cm2) and the percentage of lung AREA instead, flagged as 2D / partial coverage; its
volumes are None. Infection outside the lung mask is never counted.

:meth:`Scores.as_dict` returns exactly the keys the SR writer (``node.writers.sr.MEASUREMENTS`` plus
``volumetric``) understands; :meth:`Scores.details` adds the rest (total lung size, mean lung HU,
coverage flags) for reports and the database.

Severity scores (volumetric series that hold both lungs whole; None in 2D, where a single slice cannot be
scored by region, and None with partial coverage, where the lungs are cut at the first or last slice: the
20 regions, the zones and the CT-SS-based severity are defined for whole lungs, and a cut lung would be
partitioned and scored as if it were whole):

* PO, percentage of opacity = infection / lung volume (``percent_involved_*``), and PHO, percentage
  of high opacity = infection voxels above -200 HU / lung volume (``percent_high_opacity_*``), per
  lung and overall, as commercial CT pneumonia analysis tools report them;
* CT-SS (Yang R. et al., Radiology: Cardiothoracic Imaging 2020;2(2):e200047): 20 regions
  (:data:`node.pipeline.regions.REGIONS`), each 0 (no opacification), 1 (< 50 %) or 2 (>= 50 % of the
  region involved); total 0-40 (``ctss_total``); a region under 1 % involved
  (:data:`MIN_SCORED_PERCENT`, the node's noise floor) scores 0, as does a zone below;
* lobe/zone score (Pan F. et al., Radiology 2020;295:715-721): five zones (lobes), each 0 none,
  1 < 5 %, 2 5-25 %, 3 > 25 and < 50 %, 4 50-75 %, 5 > 75 %; total 0-25 (``zone_score_total``);
* ``severity``, :func:`severity_category`: "severe" when CT-SS >= 19.5 (Yang 2020: the cut-off for
  clinically severe disease, sensitivity 83.3 %, specificity 94 %) or PO >= 50 %; otherwise
  "moderate" when PO >= 25 %, "mild" when PO >= :data:`MIN_SEVERITY_PERCENT` (0.1 %), "none" below.
  The PO bands are those of the Moscow "CT 0-4" scale (Morozov S.P. et al., 2020: CT-1 < 25 %,
  CT-2 25-50 %, CT-3 50-75 %, CT-4 > 75 %): mild = CT-1, moderate = CT-2, severe = CT-3/CT-4.

Regions come from :func:`node.pipeline.regions.partition`: a documented geometric approximation of
the segmental anatomy unless an external lobe or segment label map is given.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .regions import (
    METHOD_LOBES,
    REGION_LABEL,
    REGIONS,
    ZONE_LABEL,
    ZONES,
    partition,
)
from .types import InfectionResult, LungMasks, Volume

#: Infection voxels above this attenuation count as high opacity (PHO).
HIGH_OPACITY_HU = -200.0
#: CT-SS total at or above which the study is severe (Yang et al. 2020).
CTSS_SEVERE = 19.5
#: PO (% of both lungs) bands of the Moscow CT 0-4 scale: >= 50 severe, >= 25 moderate.
PO_SEVERE = 50.0
PO_MODERATE = 25.0
#: PO (% of both lungs) below which no severity category is given ("none"): the scattered false-positive
#: voxels of automated segmentation on a clear scan stay below it (a phantom without disease: 0.045 %).
MIN_SEVERITY_PERCENT = 0.1
SEVERITY_RULE = ("severe if CT-SS >= 19.5 (Yang 2020) or PO >= 50 %; moderate if PO >= 25 %; mild if "
                 f"PO >= {MIN_SEVERITY_PERCENT:g} %; none otherwise (PO bands: Moscow CT 0-4 scale, Morozov 2020)")
SEVERITIES = ("none", "mild", "moderate", "severe")
#: A region or zone with less of its volume involved than this scores 0 (no opacification). Automated
#: segmentation leaves scattered false-positive voxels everywhere; without a floor every region would score
#: at least 1, CT-SS would reach 20 (>= 19.5: "severe") on an almost clear scan. The node's choice, not the
#: papers': readers score visible opacities, which are far above 1 % of a segment.
MIN_SCORED_PERCENT = 1.0


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
    # percent of the lung VOLUME (3D) or AREA (2D) with infection above -200 HU (PHO)
    percent_high_opacity_right: float | None = None
    percent_high_opacity_left: float | None = None
    percent_high_opacity_total: float | None = None
    mean_hu_lungs: float | None = None
    mean_hu_infection: float | None = None
    # region scores, volumetric only: {region: {"percent": float | None, "ctss": 0-2}} (REGIONS order),
    # {zone: {"percent": float | None, "score": 0-5}} (ZONES order); percent None for an empty region
    regions: dict[str, dict[str, Any]] | None = None
    zones: dict[str, dict[str, Any]] | None = None
    ctss_total: int | None = None          # 0-40
    zone_score_total: int | None = None    # 0-25
    severity: str | None = None            # SEVERITIES, None in 2D or without lungs
    region_method: str | None = None       # "geometric", "lobes" or "segments"
    basis: str = "volume"                 # "volume" or "area"
    notes: list[str] = field(default_factory=list)

    #: Keys shared with the SR writer; everything else is in :meth:`details` only.
    SR_KEYS = (
        "right_lung_volume_ml", "left_lung_volume_ml", "infection_volume_ml", "right_infection_volume_ml",
        "left_infection_volume_ml", "ggo_volume_ml", "consolidation_volume_ml",
        "right_lung_area_cm2", "left_lung_area_cm2", "infection_area_cm2", "right_infection_area_cm2",
        "left_infection_area_cm2", "ggo_area_cm2", "consolidation_area_cm2",
        "percent_involved_right", "percent_involved_left", "percent_involved_total", "mean_hu_infection",
        "percent_high_opacity_right", "percent_high_opacity_left", "percent_high_opacity_total",
        "ctss_total", "zone_score_total", "regions", "zones", "severity", "region_method",
    )

    def as_dict(self) -> dict[str, Any]:
        """``volumetric`` plus the SR measurement keys that have a value (None values left out, also
        inside the nested ``regions``/``zones`` dicts), and ``partial_coverage: True`` for a volumetric
        series whose lungs are cut (a 2D analysis is partial by definition: ``volumetric`` says it)."""
        out: dict[str, Any] = {"volumetric": self.volumetric}
        if self.volumetric and self.partial_coverage:
            out["partial_coverage"] = True
        for key in self.SR_KEYS:
            value = getattr(self, key)
            if isinstance(value, dict):
                value = {name: {k: v for k, v in item.items() if v is not None} for name, item in value.items()}
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


def ctss_region_score(percent: float | None) -> int:
    """CT-SS score of one region from its involved percentage: 0 none (below :data:`MIN_SCORED_PERCENT`),
    1 < 50 %, 2 >= 50 %."""
    if percent is None or percent < MIN_SCORED_PERCENT:
        return 0
    return 1 if percent < 50.0 else 2


def zone_score(percent: float | None) -> int:
    """Lobe/zone score (Pan 2020): 0 none (below :data:`MIN_SCORED_PERCENT`), 1 < 5 %, 2 5-25 %,
    3 > 25 and < 50 %, 4 50-75 %, 5 > 75 %."""
    if percent is None or percent < MIN_SCORED_PERCENT:
        return 0
    if percent < 5.0:
        return 1
    if percent <= 25.0:
        return 2
    if percent < 50.0:
        return 3
    if percent <= 75.0:
        return 4
    return 5


def severity_category(ctss_total: float | None, po_total: float | None) -> str | None:
    """Severity by :data:`SEVERITY_RULE`; None when the lung size is unknown (``po_total`` None)."""
    if po_total is None:
        return None
    if (ctss_total is not None and ctss_total >= CTSS_SEVERE) or po_total >= PO_SEVERE:
        return "severe"
    if po_total >= PO_MODERATE:
        return "moderate"
    return "mild" if po_total >= MIN_SEVERITY_PERCENT else "none"


def _region_scores(labels: np.ndarray, inf: np.ndarray, names: tuple[str, ...],
                   label_of: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """Voxels and infected voxels per label, from the labels and infection (bool) of the same voxels (1D)."""
    n_labels = max(label_of.values()) + 1
    total = np.bincount(labels, minlength=n_labels)
    infected = np.bincount(labels[inf], minlength=n_labels)
    return ({n: int(total[label_of[n]]) for n in names}, {n: int(infected[label_of[n]]) for n in names})


def compute_scores(volume: Volume, lungs: LungMasks, infection: InfectionResult, *,
                   region_map: np.ndarray | None = None, region_map_kind: str = METHOD_LOBES) -> Scores:
    """Scores of ``infection`` within ``lungs`` on ``volume`` (see the module docstring).

    ``region_map``: optional external lobe ("lobes", labels 1..5) or segment ("segments", 1..20) label
    map on the volume grid (:mod:`node.pipeline.regions`); without it the regions are geometric.
    """
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

    high = inf & (volume.hu > HIGH_OPACITY_HU)
    n_high = {"right": int((high & right).sum()), "left": int((high & left).sum())}

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
        percent_high_opacity_right=_percent(n_high["right"], n["right_lung"]),
        percent_high_opacity_left=_percent(n_high["left"], n["left_lung"]),
        percent_high_opacity_total=_percent(n_high["right"] + n_high["left"], n_lung),
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
    if not volumetric:
        s.notes.append("2D: no CT-SS, zone scores or severity (a single slice cannot be scored by region)")
    elif lungs.partial_coverage:
        s.notes.append("partial coverage: lung reaches the first or last slice, so volumes and percentages "
                       "cover only the lung in the field of view; no CT-SS, zone scores or severity (they "
                       "are defined for whole lungs)")
    else:
        _add_region_scores(s, volume, lungs, inf, region_map, region_map_kind)
    return s


def _add_region_scores(s: Scores, volume: Volume, lungs: LungMasks, inf: np.ndarray,
                       region_map: np.ndarray | None, region_map_kind: str) -> None:
    rmap = partition(volume, lungs, region_map, region_map_kind)
    s.region_method = rmap.method
    # regions and zones label lung voxels only (and ``inf`` lies in the lung): count over those
    lung = np.flatnonzero(lungs.lungs)
    inf_lung = inf.ravel()[lung]
    r_total, r_inf = _region_scores(rmap.regions.ravel()[lung], inf_lung, REGIONS, REGION_LABEL)
    z_total, z_inf = _region_scores(rmap.zones.ravel()[lung], inf_lung, ZONES, ZONE_LABEL)
    s.regions = {}
    for name in REGIONS:
        pct = _percent(r_inf[name], r_total[name])
        s.regions[name] = {"percent": pct, "ctss": ctss_region_score(pct)}
    s.zones = {}
    for name in ZONES:
        pct = _percent(z_inf[name], z_total[name])
        s.zones[name] = {"percent": pct, "score": zone_score(pct)}
    s.ctss_total = sum(v["ctss"] for v in s.regions.values())
    s.zone_score_total = sum(v["score"] for v in s.zones.values())
    s.severity = severity_category(s.ctss_total, s.percent_involved_total)
    empty = [name for name in REGIONS if r_total[name] == 0]
    if empty and s.percent_involved_total is not None:
        s.notes.append(f"{len(empty)} of 20 CT-SS regions contain no lung voxels (scored 0)")
    if rmap.method == "geometric":
        s.notes.append("CT-SS regions and zones are a geometric approximation of the segmental/lobar "
                       "anatomy (no lobe or segment model)")
