"""TID 1500 Imaging Measurement Report (Comprehensive 3D SR) with the ctnode scores.

Every measurement group is a TID 1411 "Volumetric ROI Measurements" group that references one segment of
the ctnode SEG (``ReferencedSegment`` + source series): DICOM validators (PixelMed) choose one template
for all groups of the "Imaging Measurements" container, so TID 1411 and TID 1501 groups cannot be mixed.
Which score goes in which group is the table :data:`MEASUREMENTS`; adding a score is one row there (plus
a private code if no standard one fits). The groups:

* "Right lung" / "Left lung": the lung segment of that side (the SEG's lung segments exclude the
  infection, :mod:`node.writers.seg`); finding type Lung, finding site Lung + laterality, algorithm =
  the HU lung method. Measurements: the volume (area in 2D) of the whole lung of that side, and the
  involvement of that side: involved volume (area), percent involved (PO), percent with high opacity
  (PHO); these carry the infection engine as their own TID 4019 algorithm (HAS CONCEPT MOD), because
  the engine, not the lung method, found the infection;
* "Infection": the lung involvement of both lungs: total infection volume (area), PO, PHO, mean HU,
  CT-SS total and zone score total; algorithm = the infection engine;
* "Ground-glass opacity" / "Consolidation": the volume (area) of the class in both lungs.

  The SEG splits the infection by side and class (:mod:`node.writers.seg`), so these three findings are
  unions of segments, while TID 1411 references one: each references the first of its segments present
  (:data:`_ANCHORS`: the infection group the first infection segment in SEG order, a class group its
  right-lung segment, else its left-lung one), and its finding type, finding site (Lung, no laterality)
  and tracking identifier say what it covers. A finding with no segment at all (no infection found) has
  no group, and a report-level statement says so;
* "CT-SS region <name>" (20) and "Zone <name>" (5): the lung segment of the region's side, finding site
  the lobe (CID 6170) + laterality, measurement method the partition method (private code), percent
  involved and the region's score.

The lung groups, which describe exactly one SEG segment, have that segment's Tracking ID and Tracking UID;
the others have their own.

Report-level "Qualitative Evaluations" container (TID 1500 row 12): the severity (CODE: SCT 246112005
"Severity" = Mild/Moderate/Severe), the analysis notes (TEXT, DCM 121106 "Comment": what the lung
segmentation recovered or dropped, thresholds an adaptive engine settled on, ...) and ctnode's own
statements (TEXT, UMLS C0034375 "Qualitative Evaluations"): "2D, partial coverage" for a single slice,
a cut-lung warning, the geometric nature of the regions, segments omitted for being empty, and why no
severity category is given when the involvement is below :data:`node.pipeline.scores.MIN_SEVERITY_PERCENT`.

Numbers are rounded (:data:`DECIMALS`: 0.1 ml, 0.01 cm2, 0.01 %, 0.1 HU, whole scores).

Scores input (a plain mapping, e.g. the scorer's ``as_dict()``; every key is optional, ``volumetric``
defaults to ``volume.is_volumetric``, ``None``/NaN values are skipped, other keys are ignored)::

    volumetric                  bool   False for a single-slice (2D) analysis
    partial_coverage            bool   True for a volumetric series whose lungs are cut at its first or
                                       last slice
    right_lung_volume_ml        float  3D only (ml == cm3)
    left_lung_volume_ml         float  3D only
    infection_volume_ml         float  3D only
    right_infection_volume_ml   float  3D only, infection within the right lung
    left_infection_volume_ml    float  3D only
    ggo_volume_ml               float  3D only, needs the SEG's GGO segment
    consolidation_volume_ml     float  3D only, needs the SEG's consolidation segment
    right_lung_area_cm2, left_lung_area_cm2, infection_area_cm2, right_infection_area_cm2,
    left_infection_area_cm2, ggo_area_cm2, consolidation_area_cm2
                                float  2D only (same meaning, areas in cm2)
    percent_involved_right      float  % of the right lung that is infected
    percent_involved_left       float
    percent_involved_total      float
    mean_hu_infection           float  mean attenuation of the infection, HU
    percent_high_opacity_right  float  PHO: % of the right lung with infection above -200 HU
    percent_high_opacity_left   float
    percent_high_opacity_total  float
    ctss_total                  int    3D only, CT severity score 0-40 (Yang 2020)
    zone_score_total            int    3D only, lobe/zone score 0-25 (Pan 2020)
    severity                    str    "none", "mild", "moderate", "severe"
    region_method               str    "geometric", "lobes" or "segments": how the regions were made
    regions                     dict   3D only, {region: {"percent": float, "ctss": int}} for the 20
                                       CT-SS regions (node.pipeline.regions.REGIONS)
    zones                       dict   3D only, {zone: {"percent": float, "score": int}} for ZONES

Nested dicts are addressed by dotted keys in :data:`MEASUREMENTS` (``regions.right_apical.ctss``).
A score whose group cannot be written (its segment is not in the SEG) is left out and a statement says so.

Codes (verified against pydicom's PS3.16-generated code dictionary unless stated):

* LN 25045-6 "CT unspecified body region" (procedure reported): a member of CID 100 "Quantitative
  Diagnostic Imaging Procedures", which has no chest CT entry;
* SCT 118565006 "Volume", SCT 42798000 "Area" (CID 7469/7472), UCUM cm3 / cm2 / % / [hnsf'U];
* DCM 126030 "Sum of segmented voxel method for volume" (CID 7474), measurement method for volumes;
* DCM 112031 "Attenuation Coefficient" + derivation SCT 373098007 "Mean" for the mean HU (TID 300
  measurement with its Derivation concept modifier);
* UMLS C0034375 "Qualitative Evaluations" (TID 1500 row 12 container, and ctnode's TEXT statements);
* SCT 246112005 "Severity" with SCT 255604002 "Mild", 6736007 "Moderate", 24484000 "Severe";
* lobes: CID 6170 "Lobe of Lung": SCT 45653009 "Upper lobe of lung", 72481006 "Middle lobe of right
  lung", 90572001 "Lower lobe of lung", with laterality SCT 24028007 Right / 7771000 Left. Segments:
  DICOM has only three segment concepts (CID 6127) and the regions are approximations anyway, so the
  finding site stays at lobe level and the region is named by the tracking identifier;
* UCUM "1" (no units) for the scores;
* private scheme ``99CTNODE`` (declared in CodingSchemeIdentificationSequence) where no standard
  concept exists: CTN0001 "Percent of lung involved" (PO), CTN0002 "Percent of lung with high
  opacity" (PHO, > -200 HU), CTN0003 "CT severity score" (CT-SS, 20 regions, 0-2 each, Yang 2020),
  CTN0004 "Lung zone involvement score" (0-5 per lobe/zone, Pan 2020), the measurement methods
  CTN0005 "Geometric lung partition approximating segmental anatomy", CTN0006 "Lobe label map with
  geometric segment split", CTN0007 "Segment label map", and CTN0008 "Volume of involved lung" /
  CTN0009 "Area of involved lung" (the infected part of one lung, in that lung's group).

Contributing Equipment: the source CT's equipment (Acquisition Equipment), the infection engine as IHE
AIR "Processing Algorithm" (:mod:`node.writers.equipment`) and highdicom.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

import node
from node.pipeline.regions import REGION_NAMES, REGION_ZONE, REGIONS, ZONE_NAMES, ZONES
from node.pipeline.scores import MIN_SEVERITY_PERCENT
from node.pipeline.types import EngineIdentity, Volume
from node.writers.equipment import MANUFACTURER, processing_algorithm
from node.writers.seg import (
    EFFUSION_ALGORITHM_NAME,
    SEGMENT_BY_KEY,
    SEGMENTS,
    algorithm_family,
    algorithm_name,
    algorithm_version,
    device_serial_number,
    device_uid,
    lung_algorithm,
    lung_algorithm_version,
    lung_weights_sha256,
    segment_numbers,
    source_headers,
)

log = logging.getLogger(__name__)

SR_SERIES_DESCRIPTION = "ctnode measurements"
PARTIAL_COVERAGE_TEXT = "2D, partial coverage"
NO_EFFUSION_TEXT = "no pleural effusion found"   # followed by ": right", ": left" or ": right, left"
#: A volumetric series whose lungs are cut at its first or last slice (Scores.as_dict "partial_coverage").
PARTIAL_SCAN_TEXT = "partial coverage: lung cut at the edge of the scan, no region scores or severity"

PRIVATE_SCHEME = "99CTNODE"
PRIVATE_SCHEME_ITEM = hd.coding_schemes.CodingSchemeIdentificationItem(
    designator=PRIVATE_SCHEME,
    name="ctnode private codes",
    responsible_organization="ctnode",
)
#: Private concepts (scheme 99CTNODE). Never renumber: the values are stored in PACS archives.
PERCENT_INVOLVED = hd.sr.CodedConcept("CTN0001", PRIVATE_SCHEME, "Percent of lung involved")
PERCENT_HIGH_OPACITY = hd.sr.CodedConcept("CTN0002", PRIVATE_SCHEME, "Percent of lung with high opacity")
CT_SEVERITY_SCORE = hd.sr.CodedConcept("CTN0003", PRIVATE_SCHEME, "CT severity score")
ZONE_SCORE = hd.sr.CodedConcept("CTN0004", PRIVATE_SCHEME, "Lung zone involvement score")
REGION_METHODS: dict[str, hd.sr.CodedConcept] = {
    "geometric": hd.sr.CodedConcept("CTN0005", PRIVATE_SCHEME,
                                    "Geometric lung partition approximating segmental anatomy"),
    "lobes": hd.sr.CodedConcept("CTN0006", PRIVATE_SCHEME, "Lobe label map with geometric segment split"),
    "segments": hd.sr.CodedConcept("CTN0007", PRIVATE_SCHEME, "Segment label map"),
}
INVOLVED_VOLUME = hd.sr.CodedConcept("CTN0008", PRIVATE_SCHEME, "Volume of involved lung")
INVOLVED_AREA = hd.sr.CodedConcept("CTN0009", PRIVATE_SCHEME, "Area of involved lung")

#: CID 100 "Quantitative Diagnostic Imaging Procedures" has no chest CT concept.
PROCEDURE_CT = hd.sr.CodedConcept("25045-6", "LN", "CT unspecified body region")
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
COMMENT = hd.sr.CodedConcept.from_code(codes.DCM.Comment)
LUNG = hd.sr.CodedConcept.from_code(codes.SCT.Lung)
PLEURA = hd.sr.CodedConcept.from_code(codes.SCT.Pleura)          # finding site of the effusion groups
RIGHT = hd.sr.CodedConcept.from_code(codes.SCT.Right)
LEFT = hd.sr.CodedConcept.from_code(codes.SCT.Left)
VOLUME = hd.sr.CodedConcept.from_code(codes.SCT.Volume)
AREA = hd.sr.CodedConcept.from_code(codes.SCT.Area)
ATTENUATION = hd.sr.CodedConcept.from_code(codes.DCM.AttenuationCoefficient)
MEAN = hd.sr.CodedConcept.from_code(codes.SCT.Mean)
MEASUREMENT_METHOD = hd.sr.CodedConcept.from_code(codes.SCT.MeasurementMethod)
SUM_OF_VOXELS = hd.sr.CodedConcept.from_code(codes.DCM.SumOfSegmentedVoxelMethodForVolume)
UNIT_CM3 = hd.sr.CodedConcept.from_code(codes.UCUM.CubicCentimeter)
UNIT_CM2 = hd.sr.CodedConcept("cm2", "UCUM", "square centimeter")
UNIT_PERCENT = hd.sr.CodedConcept.from_code(codes.UCUM.Percent)
UNIT_HU = hd.sr.CodedConcept.from_code(codes.UCUM.HounsfieldUnit)
UNIT_SCORE = hd.sr.CodedConcept("1", "UCUM", "no units")
OPACITY = hd.sr.CodedConcept.from_code(codes.DCM.Opacity)
_MORPHOLOGIC = hd.sr.CodedConcept.from_code(codes.SCT.MorphologicallyAbnormalStructure)
SEVERITY = hd.sr.CodedConcept("246112005", "SCT", "Severity")
SEVERITY_VALUES: dict[str, hd.sr.CodedConcept] = {
    "mild": hd.sr.CodedConcept("255604002", "SCT", "Mild"),
    "moderate": hd.sr.CodedConcept("6736007", "SCT", "Moderate"),
    "severe": hd.sr.CodedConcept("24484000", "SCT", "Severe"),
}
SEVERITY_NONE_TEXT = (f"no severity category: lung involvement below {MIN_SEVERITY_PERCENT:g} %, "
                      "the minimum for one")
UPPER_LOBE = hd.sr.CodedConcept("45653009", "SCT", "Upper lobe of lung")
MIDDLE_LOBE = hd.sr.CodedConcept("72481006", "SCT", "Middle lobe of right lung")
LOWER_LOBE = hd.sr.CodedConcept("90572001", "SCT", "Lower lobe of lung")
#: Code meanings as PS3.16 spells them where highdicom's differ (validators compare them).
_MEANINGS = {("121232", "DCM"): "Source series for segmentation"}
#: Decimals kept per unit (UCUM code): 0.1 ml, 0.01 cm2, 0.01 %, 0.1 HU, whole scores.
DECIMALS: dict[str, int] = {"cm3": 1, "cm2": 2, "%": 2, "[hnsf'U]": 1, "1": 0}
#: Non-numeric score keys the writer understands.
TEXT_KEYS = frozenset({"volumetric", "partial_coverage", "severity", "region_method"})
#: The groups of the infection totals and of each class, and the SEG segments each may reference, in
#: order of preference (TID 1411 takes one segment; these findings are unions of several).
_ANCHORS: dict[str, tuple[str, ...]] = {
    "infection": tuple(spec.key for spec in SEGMENTS if spec.is_lesion),
    "ggo": ("right_ggo", "left_ggo"),
    "consolidation": ("right_consolidation", "left_consolidation"),
}
#: Finding type of the lesion groups.
_LESION_TYPES = {"infection": OPACITY, "ggo": SEGMENT_BY_KEY["right_ggo"].property_type,
                 "consolidation": SEGMENT_BY_KEY["right_consolidation"].property_type}


@dataclass(frozen=True)
class MeasurementDef:
    """Where one score goes in the SR and how it is coded."""

    key: str                                  # key in the scores mapping (and in read-back output);
                                              # dotted for nested dicts: "regions.right_apical.ctss"
    group: str                                # group key: a SEG segment key, "region:<name>" or "zone:<name>"
    name: hd.sr.CodedConcept
    unit: hd.sr.CodedConcept
    derivation: hd.sr.CodedConcept | None = None
    method: hd.sr.CodedConcept | None = None
    dimension: str = "any"                    # "3d", "2d" or "any"
    by_engine: bool = False                   # in a lung group, but measured by the infection engine

    def applies(self, volumetric: bool) -> bool:
        return self.dimension == "any" or (self.dimension == "3d") == volumetric


def _size(prefix: str, group: str, volume: hd.sr.CodedConcept = VOLUME, area: hd.sr.CodedConcept = AREA,
          by_engine: bool = False) -> list[MeasurementDef]:
    return [
        MeasurementDef(f"{prefix}_volume_ml", group, volume, UNIT_CM3, method=SUM_OF_VOXELS, dimension="3d",
                       by_engine=by_engine),
        MeasurementDef(f"{prefix}_area_cm2", group, area, UNIT_CM2, dimension="2d", by_engine=by_engine),
    ]


def _side(side: str) -> list[MeasurementDef]:
    group = f"{side}_lung"
    return [
        *_size(group, group),
        *_size(f"{side}_infection", group, INVOLVED_VOLUME, INVOLVED_AREA, by_engine=True),
        MeasurementDef(f"percent_involved_{side}", group, PERCENT_INVOLVED, UNIT_PERCENT, by_engine=True),
        MeasurementDef(f"percent_high_opacity_{side}", group, PERCENT_HIGH_OPACITY, UNIT_PERCENT,
                       by_engine=True),
    ]


#: Every score the SR can carry. Order = order in the report.
MEASUREMENTS: tuple[MeasurementDef, ...] = (
    *_side("right"),
    *_side("left"),
    *_size("infection", "infection"),
    MeasurementDef("percent_involved_total", "infection", PERCENT_INVOLVED, UNIT_PERCENT),
    MeasurementDef("percent_high_opacity_total", "infection", PERCENT_HIGH_OPACITY, UNIT_PERCENT),
    MeasurementDef("mean_hu_infection", "infection", ATTENUATION, UNIT_HU, derivation=MEAN),
    MeasurementDef("ctss_total", "infection", CT_SEVERITY_SCORE, UNIT_SCORE, dimension="3d"),
    MeasurementDef("zone_score_total", "infection", ZONE_SCORE, UNIT_SCORE, dimension="3d"),
    *_size("ggo", "ggo"),
    *_size("consolidation", "consolidation"),
    *_size("right_effusion", "right_effusion"),
    *_size("left_effusion", "left_effusion"),
    *(row for name in REGIONS for row in (
        MeasurementDef(f"regions.{name}.percent", f"region:{name}", PERCENT_INVOLVED, UNIT_PERCENT,
                       dimension="3d"),
        MeasurementDef(f"regions.{name}.ctss", f"region:{name}", CT_SEVERITY_SCORE, UNIT_SCORE,
                       dimension="3d"))),
    *(row for name in ZONES for row in (
        MeasurementDef(f"zones.{name}.percent", f"zone:{name}", PERCENT_INVOLVED, UNIT_PERCENT,
                       dimension="3d"),
        MeasurementDef(f"zones.{name}.score", f"zone:{name}", ZONE_SCORE, UNIT_SCORE, dimension="3d"))),
)
MEASUREMENT_KEYS = frozenset(m.key for m in MEASUREMENTS)


@dataclass(frozen=True)
class RegionGroupDef:
    """The TID 1411 group of one CT-SS region or zone, on the lung segment of its side."""

    key: str                          # "region:<name>" or "zone:<name>"
    label: str                        # tracking identifier
    lobe: hd.sr.CodedConcept
    laterality: hd.sr.CodedConcept
    segment: str                      # lung segment key of its side
    approximates: str                 # anatomy the geometric region stands for


def _lobe(zone: str) -> tuple[hd.sr.CodedConcept, hd.sr.CodedConcept, str]:
    side, level = zone.split("_")
    lobe = {"upper": UPPER_LOBE, "middle": MIDDLE_LOBE, "lower": LOWER_LOBE}[level]
    return lobe, RIGHT if side == "right" else LEFT, f"{side}_lung"


REGION_GROUPS: tuple[RegionGroupDef, ...] = (
    *(RegionGroupDef(f"region:{name}", f"CT-SS region {name}", *_lobe(REGION_ZONE[name]), REGION_NAMES[name])
      for name in REGIONS),
    *(RegionGroupDef(f"zone:{name}", f"Zone {name}", *_lobe(name), ZONE_NAMES[name]) for name in ZONES),
)
REGION_GROUP_BY_LABEL: dict[str, RegionGroupDef] = {g.label: g for g in REGION_GROUPS}
#: Tracking identifier of the group of each SEG segment key.
GROUP_LABELS: dict[str, str] = {"right_lung": "Right lung", "left_lung": "Left lung", "infection": "Infection",
                                "ggo": "Ground-glass opacity", "consolidation": "Consolidation",
                                "right_effusion": SEGMENT_BY_KEY["right_effusion"].label,
                                "left_effusion": SEGMENT_BY_KEY["left_effusion"].label}
EFFUSION_GROUPS = ("right_effusion", "left_effusion")


def _approximation_text(method: str) -> str | None:
    if method == "geometric":
        return "CT-SS regions and zones: geometric approximations of segments and lobes (no lobe or segment model)"
    if method == "lobes":
        return "CT-SS regions: geometric splits of the lobes of the lobe map (no segment model)"
    return None


def flatten_scores(scores: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> dotted keys (``{"regions": {"a": {"ctss": 1}}}`` -> ``{"regions.a.ctss": 1}``)."""
    out: dict[str, Any] = {}
    for key, value in scores.items():
        if isinstance(value, Mapping):
            out.update(flatten_scores(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node_ = out
        *parents, leaf = key.split(".")
        for part in parents:
            node_ = node_.setdefault(part, {})
        node_[leaf] = value
    return out


def _value(scores: Mapping[str, Any], key: str) -> float | None:
    value = scores.get(key)
    if value is None or isinstance(value, (str, Mapping, list, tuple)):
        return None
    value = float(value)
    return None if math.isnan(value) else value


def rounded(value: float, unit: hd.sr.CodedConcept) -> float:
    """``value`` at the precision of its unit (:data:`DECIMALS`); -0.0 becomes 0.0."""
    return round(value, DECIMALS.get(unit.value, 2)) + 0.0


def _algorithm_id(engine: EngineIdentity, *, manufacturer: bool = True) -> hd.sr.AlgorithmIdentification:
    """TID 4019 Algorithm Identification of the infection engine, same name/version/family as in the SEG.

    ``manufacturer=False`` for the copy on a measurement: TID 4019 as PixelMed's validator knows it (the
    form included by TID 300 measurements) has no Algorithm Manufacturer row."""
    parameters = [f"engine={engine.name}", f"engine_version={engine.version}"]
    if engine.weights_sha256:
        parameters.append(f"weights_sha256={engine.weights_sha256}")
    return hd.sr.AlgorithmIdentification(
        name=algorithm_name(engine),
        version=algorithm_version(engine),
        parameters=parameters,
        family=algorithm_family(engine),
        manufacturer=MANUFACTURER if manufacturer else None,
    )


def _lung_algorithm_id(method: str = "hu") -> hd.sr.AlgorithmIdentification:
    """TID 4019 of the lung method (the SEG's lung segments, :func:`node.writers.seg.lung_algorithm`)."""
    name, family, version = lung_algorithm(method)
    return hd.sr.AlgorithmIdentification(name=name, version=version, family=hd.sr.CodedConcept.from_code(family),
                                         manufacturer=MANUFACTURER)


def _effusion_algorithm_id() -> hd.sr.AlgorithmIdentification:
    """TID 4019 of the pleural effusion method (the SEG's effusion segments)."""
    return hd.sr.AlgorithmIdentification(
        name=EFFUSION_ALGORITHM_NAME, version=lung_algorithm_version(),
        family=hd.sr.CodedConcept.from_code(codes.DCM.MorphologicalOperations), manufacturer=MANUFACTURER)


@dataclass(frozen=True)
class _Context:
    """What every group builder needs."""

    seg: Dataset
    volume: Volume
    scores: Mapping[str, Any]
    volumetric: bool
    engine_algorithm: hd.sr.AlgorithmIdentification
    lung_algorithm: hd.sr.AlgorithmIdentification
    measurement_algorithm: hd.sr.AlgorithmIdentification  # the engine, on measurements of lung groups
    effusion_algorithm: hd.sr.AlgorithmIdentification

    def measurements(self, group: str) -> list[hd.sr.Measurement]:
        """The measurements of ``group`` that have a value; those of the infection engine in a lung group
        carry its TID 4019 (the group's own algorithm covers the rest)."""
        out = []
        for mdef in MEASUREMENTS:
            if mdef.group != group or not mdef.applies(self.volumetric):
                continue
            value = _value(self.scores, mdef.key)
            if value is None:
                continue
            out.append(hd.sr.Measurement(
                name=mdef.name, value=rounded(value, mdef.unit), unit=mdef.unit, derivation=mdef.derivation,
                method=mdef.method, algorithm_id=self.measurement_algorithm if mdef.by_engine else None))
        return out

    def segment_ref(self, number: int) -> hd.sr.ReferencedSegment:
        return hd.sr.ReferencedSegment(
            sop_class_uid=self.seg.SOPClassUID, sop_instance_uid=self.seg.SOPInstanceUID, segment_number=number,
            source_series=hd.sr.SourceSeriesForSegmentation(self.volume.series_instance_uid))


def _segment_item(seg: Dataset, number: int) -> Dataset:
    return next(item for item in seg.SegmentSequence if int(item.SegmentNumber) == number)


def _segment_group(ctx: _Context, key: str, number: int, *, own: bool
                   ) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | None:
    """Group ``key`` on segment ``number``; ``own``: the group describes exactly that segment (shares its
    tracking identifier and UID). None when it has no measurement."""
    measurements = ctx.measurements(key)
    if not measurements:
        return None
    item = _segment_item(ctx.seg, number)
    tracking = (hd.sr.TrackingIdentifier(uid=str(item.TrackingUID), identifier=str(item.TrackingID)) if own
                else hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=GROUP_LABELS[key]))
    site = LUNG
    if key in SEGMENT_BY_KEY:   # a lung or an effusion
        spec = SEGMENT_BY_KEY[key]
        category, finding, laterality = spec.category, spec.property_type, spec.laterality
        algorithm = ctx.effusion_algorithm if key in EFFUSION_GROUPS else ctx.lung_algorithm
        site = PLEURA if key in EFFUSION_GROUPS else LUNG
    else:
        category, finding, laterality = _MORPHOLOGIC, _LESION_TYPES[key], None
        algorithm = ctx.engine_algorithm
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_segment=ctx.segment_ref(number),
        finding_category=category,
        finding_type=finding,
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(anatomic_location=site, laterality=laterality)],
        measurements=measurements,
    )


def _no_effusion(scores: Mapping[str, Any]) -> list[str]:
    """The sides whose effusion the scores give as zero."""
    return [key.split("_")[0] for key in EFFUSION_GROUPS
            if any(_value(scores, f"{key}_{unit}") == 0 for unit in ("volume_ml", "area_cm2"))]


def _region_group(ctx: _Context, gdef: RegionGroupDef, number: int
                  ) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | None:
    """Group of one CT-SS region or zone on its side's lung segment; None when it has no value."""
    measurements = ctx.measurements(gdef.key)
    if not measurements:
        return None
    method_name = str(ctx.scores.get("region_method", "geometric"))
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=gdef.label),
        referenced_segment=ctx.segment_ref(number),
        finding_type=OPACITY,
        method=REGION_METHODS.get(method_name, REGION_METHODS["geometric"]),
        algorithm_id=ctx.engine_algorithm,
        finding_sites=[hd.sr.FindingSite(anatomic_location=gdef.lobe, laterality=gdef.laterality)],
        measurements=measurements,
    )
    # TID 1419 row 1: the group's Measurement Method modifies the group (highdicom writes CONTAINS)
    for item in group[0].ContentSequence:
        if item.ValueType == "CODE" and _same_code(item.ConceptNameCodeSequence[0], MEASUREMENT_METHOD):
            item.RelationshipType = hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD.value
    return group


def _missing(scores: Mapping[str, Any], numbers: Mapping[str, int]) -> list[str]:
    """What the SEG lacks for want of voxels: a lung, all infection, a class the scores give a size of."""
    missing = [GROUP_LABELS[k] for k in ("right_lung", "left_lung") if k not in numbers]
    for key, anchors in _ANCHORS.items():
        wanted = key == "infection" or any(k in scores for k in (f"{key}_volume_ml", f"{key}_area_cm2"))
        if wanted and not any(k in numbers for k in anchors):
            missing.append(GROUP_LABELS[key])
    return missing


def _statements(scores: Mapping[str, Any], volumetric: bool, numbers: Mapping[str, int],
                groups_left_out: Sequence[str]) -> list[str]:
    """ctnode's TEXT statements of the report-level Qualitative Evaluations."""
    out = []
    if not volumetric:
        out.append(PARTIAL_COVERAGE_TEXT)
    elif scores.get("partial_coverage"):
        out.append(PARTIAL_SCAN_TEXT)
    missing = _missing(scores, numbers)
    if missing:
        out.append("not in the SEG (no voxel): " + ", ".join(missing))
    if groups_left_out:
        out.append("not reported (their segment is not in the SEG): " + ", ".join(groups_left_out))
    no_effusion = _no_effusion(scores)
    if no_effusion:
        out.append(f"{NO_EFFUSION_TEXT}: {', '.join(no_effusion)}")
    if volumetric and any(k.startswith(("regions.", "zones.")) for k in scores):
        text = _approximation_text(str(scores.get("region_method", "geometric")))
        if text:
            out.append(text)
    if scores.get("severity") == "none":
        out.append(SEVERITY_NONE_TEXT)
    return out


def _evaluations_container(severity: hd.sr.CodedConcept | None, statements: Sequence[str],
                           notes: Sequence[str]) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12: severity (CODE), ctnode statements and analysis notes (TEXT)."""
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    items: list[Dataset] = []
    if severity is not None:
        items.append(hd.sr.CodeContentItem(name=SEVERITY, value=severity, relationship_type=contains))
    items += [hd.sr.TextContentItem(name=QUALITATIVE_EVALUATIONS, value=text, relationship_type=contains)
              for text in statements]
    items += [hd.sr.TextContentItem(name=COMMENT, value=note, relationship_type=contains) for note in notes]
    container = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS, relationship_type=contains)
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def _fix_meanings(items: Sequence[Dataset]) -> None:
    for item in items:
        for concept in item.get("ConceptNameCodeSequence", []):
            meaning = _MEANINGS.get((str(concept.CodeValue), str(concept.CodingSchemeDesignator)))
            if meaning:
                concept.CodeMeaning = meaning
        _fix_meanings(item.get("ContentSequence", []))


def build_report(
    volume: Volume,
    seg: hd.seg.Segmentation,
    scores: Mapping[str, Any],
    engine: EngineIdentity,
    *,
    series_number: int = 902,
    instance_number: int = 1,
    manufacturer_model_name: str = "ctnode",
    software_version: str = node.__version__,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    device_serial: str | None = None,
    strict: bool = False,
    other_evidence: Sequence[Dataset] = (),
    notes: Sequence[str] = (),
    lung_method: str = "hu",
) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 measurement report for ``seg`` (built from ``volume``) and ``scores``.

    ``other_evidence``: headers of further objects the scores rest on (the lobe SEG that gave the zones),
    listed in the SR's evidence sequences with the SEG and the source images. ``notes``: analysis notes,
    one TEXT "Comment" each in the report's "Qualitative Evaluations" container. ``lung_method``: the
    LungMasks.method of the SEG's lung segments (their algorithm).

    Keys that no row of :data:`MEASUREMENTS` describes are not reported (logged at debug level), so the
    scorer may carry more than the SR; with ``strict=True`` they raise ``KeyError`` instead (catches
    typos in tests). Scores of a class segment the SEG lacks while the engine has no such class (GGO from
    an engine without classes) raise ``ValueError``; scores whose segment was left out for being empty are
    not reported and a statement says so.
    """
    scores = flatten_scores(scores)
    unknown = set(scores) - MEASUREMENT_KEYS - TEXT_KEYS
    if unknown and strict:
        raise KeyError(f"unknown score keys: {sorted(unknown)}")
    if unknown:
        log.debug("scores not reported in the SR: %s", sorted(unknown))
    volumetric = bool(scores.get("volumetric", volume.is_volumetric))
    numbers = segment_numbers(seg)
    for key in ("ggo", "consolidation"):
        if (not any(k in numbers for k in _ANCHORS[key])
                and (_value(scores, f"{key}_volume_ml") or _value(scores, f"{key}_area_cm2"))):
            raise ValueError(f"scores give a {key} size but the SEG has no {key} segment")

    ctx = _Context(seg, volume, scores, volumetric, _algorithm_id(engine), _lung_algorithm_id(lung_method),
                   _algorithm_id(engine, manufacturer=False), _effusion_algorithm_id())
    no_effusion = {f"{side}_effusion" for side in _no_effusion(scores)}
    groups: list[Dataset] = []
    left_out: list[str] = []
    for key in GROUP_LABELS:
        segment = next((k for k in _ANCHORS.get(key, (key,)) if k in numbers), None)
        if segment is None:
            if ctx.measurements(key) and key not in no_effusion:  # no effusion: a statement says so
                left_out.append(GROUP_LABELS[key])
            continue
        group = _segment_group(ctx, key, numbers[segment], own=segment == key)
        if group is not None:
            groups.append(group)
    if volumetric:
        for gdef in REGION_GROUPS:
            if gdef.segment in numbers:
                group = _region_group(ctx, gdef, numbers[gdef.segment])
                if group is not None:
                    groups.append(group)
            elif ctx.measurements(gdef.key):
                left_out.append(gdef.label)

    serial = device_serial or device_serial_number()
    observation_context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=device_uid(serial),
                name="ctnode",
                manufacturer_name=MANUFACTURER,
                model_name=manufacturer_model_name,
                serial_number=serial,
            ),
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=PROCEDURE_CT,
        imaging_measurements=groups,
    )
    severity = SEVERITY_VALUES.get(str(scores.get("severity", ""))) if volumetric else None
    statements = _statements(scores, volumetric, numbers, left_out)
    if severity is not None or statements or notes:
        # TID 1500's report-level container of TEXT and CODE evaluations; highdicom's MeasurementReport
        # has no parameter for it
        report[0].ContentSequence.append(_evaluations_container(severity, statements, notes))
    _fix_meanings(report)
    # evidence[0] supplies patient/study attributes and the acquisition equipment: a source header (with
    # missing Type 2 patient/study attributes filled, as in the SEG).
    sources = source_headers(volume)
    return hd.sr.Comprehensive3DSR(
        evidence=[*sources, seg, *other_evidence],
        content=report,
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=manufacturer_model_name,
        software_versions=software_version,
        device_serial_number=serial,
        series_description=SR_SERIES_DESCRIPTION,
        coding_schemes=[PRIVATE_SCHEME_ITEM],
        contributing_equipment=[processing_algorithm(engine, lung_weights_sha256(lung_method))],
        is_complete=True,
        is_final=False,      # PreliminaryFlag PRELIMINARY: machine output awaiting a reader
        is_verified=False,   # VerificationFlag UNVERIFIED
    )


def _same_code(a: Any, b: hd.sr.CodedConcept) -> bool:
    return a is not None and a.value == b.value and a.scheme_designator == b.scheme_designator


def _as_sr(sr_dataset: Dataset) -> hd.sr.Comprehensive3DSR:
    # from_dataset also for highdicom objects: only then is ``.content`` parsed as a MeasurementReport
    return hd.sr.Comprehensive3DSR.from_dataset(sr_dataset, copy=True)


def _ctnode_groups(sr: hd.sr.Comprehensive3DSR):
    """(group key, group) for each ctnode measurement group, identified by its tracking identifier."""
    by_label = {label: key for key, label in GROUP_LABELS.items()}
    for group in sr.content.get_volumetric_roi_measurement_groups():
        identifier = group.tracking_identifier
        if identifier in by_label:
            yield by_label[identifier], group
        elif identifier in REGION_GROUP_BY_LABEL:
            yield REGION_GROUP_BY_LABEL[identifier].key, group


def _match(measurement: Any, group_key: str) -> str | None:
    """Key of the :data:`MEASUREMENTS` row that ``measurement`` (in group ``group_key``) is."""
    derivation = measurement.derivation
    for mdef in MEASUREMENTS:
        if (mdef.group == group_key
                and _same_code(measurement.name, mdef.name)
                and _same_code(measurement.unit, mdef.unit)
                and (mdef.derivation is None) == (derivation is None)
                and (derivation is None or _same_code(derivation, mdef.derivation))):
            return mdef.key
    return None


def _evaluation_items(sr: hd.sr.Comprehensive3DSR) -> list[Dataset]:
    """Children of the report-level "Qualitative Evaluations" container."""
    for item in sr.content[0].ContentSequence:
        if item.ValueType == "CONTAINER" and _same_code(item.ConceptNameCodeSequence[0], QUALITATIVE_EVALUATIONS):
            return list(item.ContentSequence)
    return []


def read_report_measurements(sr_dataset: Dataset) -> dict[str, Any]:
    """Extract ctnode's numbers from a ctnode SR (pydicom Dataset or highdicom SR).

    Returns the scores mapping given to :func:`build_report`, restricted to what the SR carries:
    numbers as floats (nested ``regions``/``zones`` dicts rebuilt; rounded as written), ``"severity"``
    ("none" when the SR says no category applies) and ``"region_method"`` as strings when present, plus
    ``"volumetric"``: 1.0, or 0.0 when the report carries the "2D, partial coverage" statement.
    Measurements no row of :data:`MEASUREMENTS` describes are ignored.
    """
    flat: dict[str, Any] = {}
    volumetric = True
    sr = _as_sr(sr_dataset)
    for item in _evaluation_items(sr):
        concept = item.ConceptNameCodeSequence[0]
        if item.ValueType == "TEXT" and _same_code(concept, QUALITATIVE_EVALUATIONS):
            if item.TextValue == PARTIAL_COVERAGE_TEXT:
                volumetric = False
            elif item.TextValue == PARTIAL_SCAN_TEXT:
                flat["partial_coverage"] = 1.0
            elif item.TextValue == SEVERITY_NONE_TEXT:
                flat["severity"] = "none"
        elif item.ValueType == "CODE" and _same_code(concept, SEVERITY):
            value = item.ConceptCodeSequence[0]
            for label, code in SEVERITY_VALUES.items():
                if _same_code(value, code):
                    flat["severity"] = label
    for group_key, group in _ctnode_groups(sr):
        if ":" in group_key and group.method is not None:
            for label, code in REGION_METHODS.items():
                if _same_code(group.method, code):
                    flat["region_method"] = label
        for measurement in group.get_measurements():
            key = _match(measurement, group_key)
            if key is not None:
                flat[key] = float(measurement.value)
    out = _unflatten(flat)
    out["volumetric"] = 1.0 if volumetric else 0.0
    return out


def read_report_notes(sr_dataset: Dataset) -> list[str]:
    """The analysis notes of a ctnode SR (the "Comment" TEXT items of its report-level "Qualitative
    Evaluations")."""
    return [str(item.TextValue) for item in _evaluation_items(_as_sr(sr_dataset))
            if item.ValueType == "TEXT" and _same_code(item.ConceptNameCodeSequence[0], COMMENT)]


def read_report_segment_references(sr_dataset: Dataset) -> dict[str, tuple[str, int]]:
    """``{group key: (SEG SOPInstanceUID, segment number)}`` referenced by the segment groups (not the
    region and zone groups)."""
    refs: dict[str, tuple[str, int]] = {}
    for group_key, group in _ctnode_groups(_as_sr(sr_dataset)):
        ref = group.referenced_segment
        if ":" not in group_key and ref is not None and ref.referenced_segment_numbers:
            refs[group_key] = (str(ref.referenced_sop_instance_uid), int(ref.referenced_segment_numbers[0]))
    return refs
