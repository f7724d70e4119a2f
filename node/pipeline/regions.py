"""Lung regions for the CT severity score (20 regions) and the lobe/zone score (5 zones).

No lobe or segment model is available offline, so by default each lung is partitioned GEOMETRICALLY
into 10 regions that approximate the bronchopulmonary segments used by the CT severity score (CT-SS,
Yang et al., Radiology: Cardiothoracic Imaging 2020). The partition is an approximation: real fissures
are oblique and segments are not slabs or quadrants. Reports say so.

Coordinates are PATIENT coordinates (DICOM LPS: +x patient left, +y posterior, +z superior) computed
from the volume geometry (:mod:`node.pipeline.types`), so the partition does not depend on the slice
order, row/column flips or the in-plane orientation of the series.

Volume-balanced splits
----------------------
Every split below orders a set of lung voxels by one coordinate ``v`` and cuts it into ``n`` parts
of equal VOLUME: a voxel's fraction ``f`` is the share of the set whose ``v`` is below it, counting
voxels with the same ``v`` (rounded to 0.001 mm) as half below, and its part is
``min(floor(f * n), n - 1)``. Voxels with the same coordinate always land in the same part (whole
axial slices for the cranio-caudal splits), and mirroring the patient left-right mirrors the result.

The rule, per lung (voxels of ``LungMasks.right`` / ``.left``)
---------------------------------------------------------------
1. Levels (= ZONES, the lobes of the lobe/zone score): the lung's voxels are split along ``z`` into
   equal-volume slabs, right lung 3 (lower, middle, upper from the base), left lung 2 (lower, upper).
   This is exactly the zone definition of the procedural phantom (:func:`node.phantom._zone_map`).
2. Within each level (``z`` again counted within the level; "AP" = split along ``y`` into an anterior
   and a posterior half; "ML" = split along the lateral distance (``-x`` for the right lung, ``+x`` for
   the left) into a medial and a lateral half):

   ====================  =========================================================================
   level                 regions (segment each one stands for)
   ====================  =========================================================================
   right upper (RUL)     cranial 1/3 of the level -> apical (S1); the caudal 2/3 by AP ->
                         anterior (S3) / posterior (S2)
   right middle (RML)    ML -> medial (S5) / lateral (S4)
   right lower (RLL)     cranial 1/5 -> superior (S6); the caudal 4/5 (basal) by AP, then each half
                         by ML: anterior-medial -> medial basal (S7), anterior-lateral -> anterior
                         basal (S8), posterior-lateral -> lateral basal (S9), posterior-medial ->
                         posterior basal (S10)
   left upper (LUL)      5 equal slabs along z, cranial to caudal: 1 -> apical (S1 of the
                         apicoposterior S1+2), 2-3 by AP -> anterior (S3) / posterior (S2 of S1+2),
                         4 -> superior lingular (S4), 5 -> inferior lingular (S5)
   left lower (LLL)      as the right lower level: superior (S6), medial basal (S7 of the
                         anteromedial S7+8), anterior basal (S8 of S7+8), lateral basal (S9),
                         posterior basal (S10)
   ====================  =========================================================================

External label maps (``compute_scores(..., region_map=..., region_map_kind=...)``), on the volume
grid, 0 = unlabelled:

* ``"lobes"``: 1 right upper, 2 right middle, 3 right lower, 4 left upper, 5 left lower lobe
  (:data:`ZONES` order + 1, the same as ``Phantom.regions``). The lobes replace step 1; step 2 still
  splits each lobe geometrically into its CT-SS regions.
* ``"segments"``: 1..20 in :data:`REGIONS` order (+1). Zones are the unions of their regions.

Only voxels inside the lung masks count; lung voxels that an external map leaves at 0 (or labels
with a lobe of the other lung) belong to no region and no zone (they still count for PO/PHO).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .types import LungMasks, Volume

#: The five zones of the lobe/zone score (Pan et al. 2020); label value = index + 1.
ZONES: tuple[str, ...] = ("right_upper", "right_middle", "right_lower", "left_upper", "left_lower")

#: The 20 CT-SS regions (Yang et al. 2020); label value = index + 1.
REGIONS: tuple[str, ...] = (
    "right_apical", "right_posterior", "right_anterior",
    "right_lateral", "right_medial",
    "right_superior", "right_medial_basal", "right_anterior_basal", "right_lateral_basal",
    "right_posterior_basal",
    "left_apical", "left_posterior", "left_anterior", "left_superior_lingular", "left_inferior_lingular",
    "left_superior", "left_anterior_basal", "left_medial_basal", "left_lateral_basal",
    "left_posterior_basal",
)

#: Zone (lobe) of each CT-SS region.
REGION_ZONE: dict[str, str] = {
    **{r: "right_upper" for r in ("right_apical", "right_posterior", "right_anterior")},
    **{r: "right_middle" for r in ("right_lateral", "right_medial")},
    **{r: "right_lower" for r in ("right_superior", "right_medial_basal", "right_anterior_basal",
                                  "right_lateral_basal", "right_posterior_basal")},
    **{r: "left_upper" for r in ("left_apical", "left_posterior", "left_anterior",
                                 "left_superior_lingular", "left_inferior_lingular")},
    **{r: "left_lower" for r in ("left_superior", "left_anterior_basal", "left_medial_basal",
                                 "left_lateral_basal", "left_posterior_basal")},
}

#: Human-readable name of the segment each region stands for.
REGION_NAMES: dict[str, str] = {
    "right_apical": "apical segment of right upper lobe",
    "right_posterior": "posterior segment of right upper lobe",
    "right_anterior": "anterior segment of right upper lobe",
    "right_lateral": "lateral segment of right middle lobe",
    "right_medial": "medial segment of right middle lobe",
    "right_superior": "superior segment of right lower lobe",
    "right_medial_basal": "medial basal segment of right lower lobe",
    "right_anterior_basal": "anterior basal segment of right lower lobe",
    "right_lateral_basal": "lateral basal segment of right lower lobe",
    "right_posterior_basal": "posterior basal segment of right lower lobe",
    "left_apical": "apical part of apicoposterior segment of left upper lobe",
    "left_posterior": "posterior part of apicoposterior segment of left upper lobe",
    "left_anterior": "anterior segment of left upper lobe",
    "left_superior_lingular": "superior lingular segment of left upper lobe",
    "left_inferior_lingular": "inferior lingular segment of left upper lobe",
    "left_superior": "superior segment of left lower lobe",
    "left_anterior_basal": "anterior part of anteromedial basal segment of left lower lobe",
    "left_medial_basal": "medial part of anteromedial basal segment of left lower lobe",
    "left_lateral_basal": "lateral basal segment of left lower lobe",
    "left_posterior_basal": "posterior basal segment of left lower lobe",
}
ZONE_NAMES: dict[str, str] = {
    "right_upper": "right upper lobe", "right_middle": "right middle lobe", "right_lower": "right lower lobe",
    "left_upper": "left upper lobe", "left_lower": "left lower lobe",
}

REGION_LABEL: dict[str, int] = {r: i + 1 for i, r in enumerate(REGIONS)}
ZONE_LABEL: dict[str, int] = {z: i + 1 for i, z in enumerate(ZONES)}

#: How the regions were obtained (``RegionMap.method``; also in the scores and the SR).
METHOD_GEOMETRIC = "geometric"
METHOD_LOBES = "lobes"
METHOD_SEGMENTS = "segments"

_ROUND_MM = 3  # coordinates rounded to 0.001 mm before ranking, so float noise never breaks ties


@dataclass
class RegionMap:
    """Region and zone labels on the volume grid (uint8; 0 = no region)."""

    regions: np.ndarray   # 1..20, REGIONS order
    zones: np.ndarray     # 1..5, ZONES order
    method: str           # METHOD_GEOMETRIC, METHOD_LOBES or METHOD_SEGMENTS


def patient_coordinates(volume: Volume, flat_index: np.ndarray) -> np.ndarray:
    """(n, 3) LPS patient coordinates (mm) of the voxels with the given flat indices."""
    k, r, c = np.unravel_index(flat_index, volume.shape)
    o = np.asarray(volume.orientation, np.float64)
    pos = np.asarray(volume.positions, np.float64)
    # per axis: slice position + column offset + row offset, the offsets looked up per column and row
    # (the same products and sums, in the same order, as on every voxel)
    col_mm = np.arange(volume.shape[2]) * float(volume.pixel_spacing[1])
    row_mm = np.arange(volume.shape[1]) * float(volume.pixel_spacing[0])
    xyz = np.empty((flat_index.size, 3))
    for axis in range(3):
        xyz[:, axis] = pos[k, axis] + (col_mm * o[axis])[c] + (row_mm * o[3 + axis])[r]
    return xyz


def volume_fraction(values: np.ndarray) -> np.ndarray:
    """Share of the set below each value, ties counted half (see the module docstring)."""
    if values.size == 0:
        return np.zeros(0)
    _, inverse, counts = np.unique(np.round(values, _ROUND_MM), return_inverse=True, return_counts=True)
    below = (np.cumsum(counts) - counts / 2) / values.size
    return below[inverse.ravel()]


def split(values: np.ndarray, n: int) -> np.ndarray:
    """Part 0..n-1 of each value in an equal-volume split along ``values`` (ascending)."""
    return np.minimum((volume_fraction(values) * n).astype(np.int64), n - 1)


def _lower_level(labels: np.ndarray, sub: np.ndarray, xyz: np.ndarray, lateral: np.ndarray,
                 side: str) -> None:
    """Superior + four basal regions of a lower lobe (voxel positions ``sub`` into ``labels``)."""
    zpart = split(xyz[:, 2], 5)
    top = zpart == 4
    labels[sub[top]] = REGION_LABEL[f"{side}_superior"]
    basal = ~top
    b_sub, b_y, b_lat = sub[basal], xyz[basal, 1], lateral[basal]
    ap = split(b_y, 2)                       # 0 anterior, 1 posterior (+y is posterior)
    for half, (medial_name, lateral_name) in ((0, ("medial_basal", "anterior_basal")),
                                              (1, ("posterior_basal", "lateral_basal"))):
        sel = ap == half
        ml = split(b_lat[sel], 2)            # 0 medial, 1 lateral
        labels[b_sub[sel][ml == 0]] = REGION_LABEL[f"{side}_{medial_name}"]
        labels[b_sub[sel][ml == 1]] = REGION_LABEL[f"{side}_{lateral_name}"]


def _ap(labels: np.ndarray, sub: np.ndarray, y: np.ndarray, side: str) -> None:
    ap = split(y, 2)
    labels[sub[ap == 0]] = REGION_LABEL[f"{side}_anterior"]
    labels[sub[ap == 1]] = REGION_LABEL[f"{side}_posterior"]


def _split_level(labels: np.ndarray, zone: str, sub: np.ndarray, xyz: np.ndarray,
                 lateral: np.ndarray) -> None:
    """Write the CT-SS region labels of the voxels ``sub`` (flat lung-voxel positions) of one level."""
    if sub.size == 0:
        return
    side = zone.split("_")[0]
    if zone == "right_upper":
        zpart = split(xyz[:, 2], 3)
        labels[sub[zpart == 2]] = REGION_LABEL["right_apical"]
        rest = zpart < 2
        _ap(labels, sub[rest], xyz[rest, 1], side)
    elif zone == "right_middle":
        ml = split(lateral, 2)
        labels[sub[ml == 0]] = REGION_LABEL["right_medial"]
        labels[sub[ml == 1]] = REGION_LABEL["right_lateral"]
    elif zone == "left_upper":
        zpart = split(xyz[:, 2], 5)
        labels[sub[zpart == 4]] = REGION_LABEL["left_apical"]
        mid = (zpart == 2) | (zpart == 3)
        _ap(labels, sub[mid], xyz[mid, 1], side)
        labels[sub[zpart == 1]] = REGION_LABEL["left_superior_lingular"]
        labels[sub[zpart == 0]] = REGION_LABEL["left_inferior_lingular"]
    else:  # right_lower, left_lower
        _lower_level(labels, sub, xyz, lateral, side)


def _zones_from_regions(regions: np.ndarray) -> np.ndarray:
    lut = np.zeros(256, np.uint8)
    for r in REGIONS:
        lut[REGION_LABEL[r]] = ZONE_LABEL[REGION_ZONE[r]]
    return lut[regions]


def partition(volume: Volume, lungs: LungMasks, region_map: np.ndarray | None = None,
              kind: str = METHOD_LOBES) -> RegionMap:
    """CT-SS regions and zones of ``lungs`` on ``volume`` (rule in the module docstring).

    ``region_map``: optional external labels on the volume grid, ``kind`` "lobes" (1..5) or "segments"
    (1..20). Without it, the geometric partition is used.
    """
    shape = volume.shape
    if region_map is not None:
        region_map = np.asarray(region_map)
        if region_map.shape != shape:
            raise ValueError(f"region map shape {region_map.shape} differs from the volume {shape}")
        if kind not in (METHOD_LOBES, METHOD_SEGMENTS):
            raise ValueError(f"region map kind must be 'lobes' or 'segments', got {kind!r}")
        top = len(ZONES) if kind == METHOD_LOBES else len(REGIONS)
        if region_map.min(initial=0) < 0 or region_map.max(initial=0) > top:
            raise ValueError(f"{kind} map labels must be 0..{top}")
    if region_map is not None and kind == METHOD_SEGMENTS:
        regions = np.where(lungs.lungs, region_map, 0).astype(np.uint8)
        return RegionMap(regions=regions, zones=_zones_from_regions(regions), method=METHOD_SEGMENTS)

    regions = np.zeros(int(np.prod(shape)), np.uint8)
    sides = (("right", lungs.right, ("right_lower", "right_middle", "right_upper")),
             ("left", lungs.left, ("left_lower", "left_upper")))
    for side, mask, levels in sides:
        idx = np.flatnonzero(mask)
        if idx.size == 0:
            continue
        xyz = patient_coordinates(volume, idx)
        lateral = -xyz[:, 0] if side == "right" else xyz[:, 0]   # distance from the midline, + lateral
        if region_map is None:
            level = split(xyz[:, 2], len(levels))
            level_names = [levels[i] for i in range(len(levels))]
            level_of = {name: level == i for i, name in enumerate(level_names)}
        else:
            lobe = region_map.ravel()[idx]
            level_of = {name: lobe == ZONE_LABEL[name] for name in levels}
        for name, sel in level_of.items():
            _split_level(regions, name, idx[sel], xyz[sel], lateral[sel])
    regions = regions.reshape(shape)
    method = METHOD_GEOMETRIC if region_map is None else METHOD_LOBES
    return RegionMap(regions=regions, zones=_zones_from_regions(regions), method=method)
