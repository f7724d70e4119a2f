"""TID 1500 Imaging Measurement Report (Comprehensive 3D SR) with the ctnode scores.

One TID 1411 "Volumetric ROI Measurements" group per SEG segment present in the SEG, each referencing
its segment (``ReferencedSegment`` + source series) and carrying the algorithm identification
(TID 4019), finding category/type (the segment's codes) and finding site (Lung, with laterality for
the lungs). Which score goes where is the table :data:`MEASUREMENTS`; adding a score (CT severity
score, zone scores, ...) is one row there (plus a private code if no standard one fits).

Scores input (a plain mapping, e.g. the scorer's ``as_dict()``; every key is optional, ``volumetric``
defaults to ``volume.is_volumetric``, ``None``/NaN values are skipped, other keys are ignored)::

    volumetric                  bool   False for a single-slice (2D) analysis
    partial_coverage            bool   True for a volumetric series whose lungs are cut at its first or
                                       last slice: a TEXT qualitative evaluation says so in every group
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
    severity                    str    "mild", "moderate", "severe" (written); "none" is not written
    region_method               str    "geometric", "lobes" or "segments": how the regions were made
    regions                     dict   3D only, {region: {"percent": float, "ctss": int}} for the 20
                                       CT-SS regions (node.pipeline.regions.REGIONS)
    zones                       dict   3D only, {zone: {"percent": float, "score": int}} for ZONES

Nested dicts are addressed by dotted keys in :data:`MEASUREMENTS` (``regions.right_apical.ctss``).
Each CT-SS region and each zone gets its own TID 1501 "Measurement Group" (no SEG segment: the regions
are not in the SEG) with tracking identifier ``CT-SS region <name>`` / ``Zone <name>``, finding type
Opacity, finding site = the lobe (CID 6170) + laterality, measurement method = the partition method
(private code), the algorithm identification, and for the geometric partition a TEXT "Qualitative
Evaluations" row saying which segment the region approximates. The totals, PHO and the severity
(TID 1411 qualitative evaluation "Severity" = Mild/Moderate/Severe) are in the Infection group.

In 2D, ``*_volume_ml`` keys are not written (a single slice has no volume) and every group gets the
TEXT qualitative evaluation "2D, partial coverage".

The analysis notes (what the lung segmentation recovered or dropped, the GGO threshold an adaptive engine
settled on, a gantry tilt, ...) are TEXT items (DCM 121106 "Comment") in the report-level "Qualitative
Evaluations" container of TID 1500, so that a reader sees how the numbers came about.

Codes (verified against pydicom's PS3.16-generated code dictionary unless stated):

* SCT 169069000 "CT of chest" (procedure reported; CID 100 has no chest CT entry; SNOMED preferred
  term of "Computed tomography of chest (procedure)"). SCT 418023006 is "CT of
  chest, abdomen and pelvis" and is *not* used;
* SCT 118565006 "Volume", SCT 42798000 "Area" (CID 7469/7472), UCUM cm3 / cm2 / % / [hnsf'U];
* DCM 126030 "Sum of segmented voxel method for volume" (CID 7474), measurement method for volumes;
* DCM 112031 "Attenuation Coefficient" + derivation SCT 373098007 "Mean" for the mean HU (TID 300
  measurement with its Derivation concept modifier);
* UMLS C0034375 "Qualitative Evaluations" (TID 1501/1411 TEXT row) for the 2D note;
* SCT 246112005 "Severity" with SCT 255604002 "Mild", 6736007 "Moderate", 24484000 "Severe"
  (pydicom's PS3.16 dictionary; the severity qualifier values of CID 3716 style severity lists);
* lobes: CID 6170 "Lobe of Lung": SCT 45653009 "Upper lobe of lung", 72481006 "Middle lobe of right
  lung", 90572001 "Lower lobe of lung", with laterality SCT 24028007 Right / 7771000 Left. Segments:
  DICOM has only three segment concepts (CID 6127) and the regions are approximations anyway, so the
  finding site stays at lobe level and the region is named by the tracking identifier (and TEXT);
* UCUM "1" (no units) for the scores;
* private scheme ``99CTNODE`` (declared in CodingSchemeIdentificationSequence) where no standard
  concept exists: CTN0001 "Percent of lung involved" (PO), CTN0002 "Percent of lung with high
  opacity" (PHO, > -200 HU), CTN0003 "CT severity score" (CT-SS, 20 regions, 0-2 each, Yang 2020),
  CTN0004 "Lung zone involvement score" (0-5 per lobe/zone, Pan 2020), and the measurement methods
  CTN0005 "Geometric lung partition approximating segmental anatomy", CTN0006 "Lobe label map with
  geometric segment split", CTN0007 "Segment label map".
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
from node.pipeline.segments import SegmentKey, node_segment_key
from node.pipeline.types import EngineIdentity, Volume
from node.writers.seg import (
    MANUFACTURER,
    SEGMENTS,
    SegmentSpec,
    algorithm_family,
    algorithm_name,
    algorithm_version,
    device_serial_number,
    device_uid,
)

log = logging.getLogger(__name__)

SR_SERIES_DESCRIPTION = "ctnode measurements"
PARTIAL_COVERAGE_TEXT = "2D, partial coverage"
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

PROCEDURE_CT_CHEST = hd.sr.CodedConcept("169069000", "SCT", "CT of chest")
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
COMMENT = hd.sr.CodedConcept.from_code(codes.DCM.Comment)
LUNG = hd.sr.CodedConcept.from_code(codes.SCT.Lung)
RIGHT = hd.sr.CodedConcept.from_code(codes.SCT.Right)
LEFT = hd.sr.CodedConcept.from_code(codes.SCT.Left)
VOLUME = hd.sr.CodedConcept.from_code(codes.SCT.Volume)
AREA = hd.sr.CodedConcept.from_code(codes.SCT.Area)
ATTENUATION = hd.sr.CodedConcept.from_code(codes.DCM.AttenuationCoefficient)
MEAN = hd.sr.CodedConcept.from_code(codes.SCT.Mean)
SUM_OF_VOXELS = hd.sr.CodedConcept.from_code(codes.DCM.SumOfSegmentedVoxelMethodForVolume)
UNIT_CM3 = hd.sr.CodedConcept.from_code(codes.UCUM.CubicCentimeter)
UNIT_CM2 = hd.sr.CodedConcept("cm2", "UCUM", "square centimeter")
UNIT_PERCENT = hd.sr.CodedConcept.from_code(codes.UCUM.Percent)
UNIT_HU = hd.sr.CodedConcept.from_code(codes.UCUM.HounsfieldUnit)
UNIT_SCORE = hd.sr.CodedConcept("1", "UCUM", "no units")
OPACITY = hd.sr.CodedConcept.from_code(codes.DCM.Opacity)
SEVERITY = hd.sr.CodedConcept("246112005", "SCT", "Severity")
SEVERITY_VALUES: dict[str, hd.sr.CodedConcept] = {
    "mild": hd.sr.CodedConcept("255604002", "SCT", "Mild"),
    "moderate": hd.sr.CodedConcept("6736007", "SCT", "Moderate"),
    "severe": hd.sr.CodedConcept("24484000", "SCT", "Severe"),
}
UPPER_LOBE = hd.sr.CodedConcept("45653009", "SCT", "Upper lobe of lung")
MIDDLE_LOBE = hd.sr.CodedConcept("72481006", "SCT", "Middle lobe of right lung")
LOWER_LOBE = hd.sr.CodedConcept("90572001", "SCT", "Lower lobe of lung")
#: Non-numeric score keys the writer understands.
TEXT_KEYS = frozenset({"volumetric", "partial_coverage", "severity", "region_method"})


@dataclass(frozen=True)
class MeasurementDef:
    """Where one score goes in the SR and how it is coded."""

    key: str                                  # key in the scores mapping (and in read-back output);
                                              # dotted for nested dicts: "regions.right_apical.ctss"
    segment: str                              # SEG segment key (node.writers.seg.SEGMENTS), or a
                                              # region group key "region:<name>" / "zone:<name>"
    name: hd.sr.CodedConcept
    unit: hd.sr.CodedConcept
    laterality: hd.sr.CodedConcept | None = None  # measurement-level finding site Lung + laterality
    derivation: hd.sr.CodedConcept | None = None
    method: hd.sr.CodedConcept | None = None
    dimension: str = "any"                    # "3d", "2d" or "any"

    def applies(self, volumetric: bool) -> bool:
        return self.dimension == "any" or (self.dimension == "3d") == volumetric


def _size(prefix: str, segment: str, laterality: hd.sr.CodedConcept | None = None) -> list[MeasurementDef]:
    return [
        MeasurementDef(f"{prefix}_volume_ml", segment, VOLUME, UNIT_CM3, laterality,
                       method=SUM_OF_VOXELS, dimension="3d"),
        MeasurementDef(f"{prefix}_area_cm2", segment, AREA, UNIT_CM2, laterality, dimension="2d"),
    ]


#: Every score the SR can carry. Order = order in the report.
MEASUREMENTS: tuple[MeasurementDef, ...] = (
    *_size("right_lung", "right_lung"),
    *_size("left_lung", "left_lung"),
    *_size("infection", "infection"),
    *_size("right_infection", "infection", RIGHT),
    *_size("left_infection", "infection", LEFT),
    MeasurementDef("percent_involved_total", "infection", PERCENT_INVOLVED, UNIT_PERCENT),
    MeasurementDef("percent_involved_right", "infection", PERCENT_INVOLVED, UNIT_PERCENT, RIGHT),
    MeasurementDef("percent_involved_left", "infection", PERCENT_INVOLVED, UNIT_PERCENT, LEFT),
    MeasurementDef("mean_hu_infection", "infection", ATTENUATION, UNIT_HU, derivation=MEAN),
    *_size("ggo", "ggo"),
    *_size("consolidation", "consolidation"),
    MeasurementDef("percent_high_opacity_total", "infection", PERCENT_HIGH_OPACITY, UNIT_PERCENT),
    MeasurementDef("percent_high_opacity_right", "infection", PERCENT_HIGH_OPACITY, UNIT_PERCENT, RIGHT),
    MeasurementDef("percent_high_opacity_left", "infection", PERCENT_HIGH_OPACITY, UNIT_PERCENT, LEFT),
    MeasurementDef("ctss_total", "infection", CT_SEVERITY_SCORE, UNIT_SCORE, dimension="3d"),
    MeasurementDef("zone_score_total", "infection", ZONE_SCORE, UNIT_SCORE, dimension="3d"),
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
    """A TID 1501 measurement group for one CT-SS region or zone (not a SEG segment)."""

    key: str                          # "region:<name>" or "zone:<name>"
    label: str                        # tracking identifier
    lobe: hd.sr.CodedConcept
    laterality: hd.sr.CodedConcept
    approximates: str                 # anatomy the geometric region stands for


def _lobe(zone: str) -> tuple[hd.sr.CodedConcept, hd.sr.CodedConcept]:
    side, level = zone.split("_")
    lobe = {"upper": UPPER_LOBE, "middle": MIDDLE_LOBE, "lower": LOWER_LOBE}[level]
    return lobe, RIGHT if side == "right" else LEFT


REGION_GROUPS: tuple[RegionGroupDef, ...] = (
    *(RegionGroupDef(f"region:{name}", f"CT-SS region {name}", *_lobe(REGION_ZONE[name]), REGION_NAMES[name])
      for name in REGIONS),
    *(RegionGroupDef(f"zone:{name}", f"Zone {name}", *_lobe(name), ZONE_NAMES[name]) for name in ZONES),
)
REGION_GROUP_BY_LABEL: dict[str, RegionGroupDef] = {g.label: g for g in REGION_GROUPS}


def _approximation_text(group: RegionGroupDef) -> str:
    return f"geometric approximation of the {group.approximates} (no lobe or segment model)"


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


def _algorithm_id(engine: EngineIdentity) -> hd.sr.AlgorithmIdentification:
    """TID 4019 Algorithm Identification, same name/version/family as in the SEG."""
    parameters = [f"engine={engine.name}", f"engine_version={engine.version}"]
    if engine.weights_sha256:
        parameters.append(f"weights_sha256={engine.weights_sha256}")
    return hd.sr.AlgorithmIdentification(
        name=algorithm_name(engine),
        version=algorithm_version(engine),
        parameters=parameters,
        family=algorithm_family(engine),
        manufacturer=MANUFACTURER,
    )


def _seg_segments(seg: Dataset) -> dict[str, int]:
    """SEG segment key -> segment number, matched on SegmentLabel (what ctnode's SEG writes)."""
    found: dict[str, int] = {}
    for item in seg.SegmentSequence:
        key = node_segment_key(str(item.SegmentLabel))
        if key is not None:
            found[key] = int(item.SegmentNumber)
    return found


def _group_finding_site(spec: SegmentSpec) -> hd.sr.FindingSite:
    return hd.sr.FindingSite(anatomic_location=LUNG, laterality=spec.laterality)


def _measurement_group(
    spec: SegmentSpec,
    segment_number: int,
    seg: Dataset,
    volume: Volume,
    scores: Mapping[str, Any],
    volumetric: bool,
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    measurements = []
    for mdef in MEASUREMENTS:
        if mdef.segment != spec.key or not mdef.applies(volumetric):
            continue
        value = _value(scores, mdef.key)
        if value is None:
            continue
        sites = ([hd.sr.FindingSite(anatomic_location=LUNG, laterality=mdef.laterality)]
                 if mdef.laterality is not None else None)
        measurements.append(hd.sr.Measurement(
            name=mdef.name, value=value, unit=mdef.unit, derivation=mdef.derivation,
            method=mdef.method, finding_sites=sites))
    evaluations = None
    severity = SEVERITY_VALUES.get(str(scores.get("severity", "")))
    if spec.key == "infection" and severity is not None and volumetric:
        evaluations = [hd.sr.QualitativeEvaluation(name=SEVERITY, value=severity)]
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=spec.label),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=segment_number,
            source_series=hd.sr.SourceSeriesForSegmentation(volume.series_instance_uid),
        ),
        finding_category=spec.category,
        finding_type=spec.property_type,
        algorithm_id=algorithm,
        finding_sites=[_group_finding_site(spec)],
        measurements=measurements or None,
        qualitative_evaluations=evaluations,
    )
    partial_text = (PARTIAL_COVERAGE_TEXT if not volumetric
                    else PARTIAL_SCAN_TEXT if scores.get("partial_coverage") else None)
    if partial_text:
        # TID 1501/1411 "Qualitative Evaluations" TEXT row; highdicom only builds the CODE variant.
        group[0].ContentSequence.append(hd.sr.TextContentItem(
            name=QUALITATIVE_EVALUATIONS, value=partial_text,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return group


def _region_group(
    gdef: RegionGroupDef,
    scores: Mapping[str, Any],
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.MeasurementsAndQualitativeEvaluations | None:
    """TID 1501 group of one CT-SS region or zone; None when it has no value."""
    measurements = []
    for mdef in MEASUREMENTS:
        if mdef.segment != gdef.key:
            continue
        value = _value(scores, mdef.key)
        if value is not None:
            measurements.append(hd.sr.Measurement(name=mdef.name, value=value, unit=mdef.unit))
    if not measurements:
        return None
    method_name = str(scores.get("region_method", "geometric"))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=gdef.label),
        finding_type=OPACITY,
        method=REGION_METHODS.get(method_name, REGION_METHODS["geometric"]),
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(anatomic_location=gdef.lobe, laterality=gdef.laterality)],
        measurements=measurements,
    )
    if method_name == "geometric" or (method_name == "lobes" and gdef.key.startswith("region:")):
        group[0].ContentSequence.append(hd.sr.TextContentItem(
            name=QUALITATIVE_EVALUATIONS, value=_approximation_text(gdef),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return group


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
) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 measurement report for ``seg`` (built from ``volume``) and ``scores``.

    ``other_evidence``: headers of further objects the scores rest on (the lobe SEG that gave the zones),
    listed in the SR's evidence sequences with the SEG and the source images. ``notes``: analysis notes,
    one TEXT "Comment" each in the report's "Qualitative Evaluations" container.

    Keys that no row of :data:`MEASUREMENTS` describes are not reported (logged at debug level), so the
    scorer may carry more than the SR; with ``strict=True`` they raise ``KeyError`` instead (catches
    typos in tests). Scores for a segment the SEG lacks (e.g. GGO from an engine without classes) raise
    ``ValueError``.
    """
    scores = flatten_scores(scores)
    unknown = set(scores) - MEASUREMENT_KEYS - TEXT_KEYS
    if unknown and strict:
        raise KeyError(f"unknown score keys: {sorted(unknown)}")
    if unknown:
        log.debug("scores not reported in the SR: %s", sorted(unknown))
    volumetric = bool(scores.get("volumetric", volume.is_volumetric))
    segment_numbers = _seg_segments(seg)
    needed = {m.segment for m in MEASUREMENTS
              if m.applies(volumetric) and _value(scores, m.key) is not None and ":" not in m.segment}
    if scores.get("severity") in SEVERITY_VALUES and volumetric:
        needed.add("infection")
    if needed - set(segment_numbers):
        raise ValueError(f"scores need SEG segments {sorted(needed - set(segment_numbers))} "
                         "that the SEG does not contain")

    serial = device_serial or device_serial_number()
    algorithm = _algorithm_id(engine)
    groups = [
        _measurement_group(spec, segment_numbers[spec.key], seg, volume, scores, volumetric, algorithm)
        for spec in SEGMENTS if spec.key in segment_numbers
    ]
    if volumetric:
        groups.extend(g for g in (_region_group(gdef, scores, algorithm) for gdef in REGION_GROUPS)
                      if g is not None)
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
        procedure_reported=PROCEDURE_CT_CHEST,
        imaging_measurements=groups,
    )
    if notes:
        # TID 1500's report-level container of TEXT (any concept name) and CODE evaluations; highdicom's
        # MeasurementReport has no parameter for it
        evaluations = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS,
                                                 relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        evaluations.ContentSequence = hd.sr.ContentSequence([
            hd.sr.TextContentItem(name=COMMENT, value=note, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
            for note in notes])
        report[0].ContentSequence.append(evaluations)
    # evidence[0] supplies patient/study attributes: the SEG has them all (highdicom copied them from
    # the source) even when an anonymised source header lacks a Type 2 attribute.
    return hd.sr.Comprehensive3DSR(
        evidence=[seg, *volume.datasets, *other_evidence],
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
    """(segment key, group) for each ctnode measurement group, identified by its tracking identifier (the
    segment's label)."""
    for group in sr.content.get_volumetric_roi_measurement_groups():
        segment_key = node_segment_key(group.tracking_identifier)
        if segment_key is not None:
            yield segment_key, group


def _match(measurement: Any, group_key: str) -> str | None:
    """Key of the :data:`MEASUREMENTS` row that ``measurement`` (in group ``group_key``) is."""
    sites = measurement.finding_sites
    laterality = sites[0].laterality if sites else None
    derivation = measurement.derivation
    for mdef in MEASUREMENTS:
        if (mdef.segment == group_key
                and _same_code(measurement.name, mdef.name)
                and _same_code(measurement.unit, mdef.unit)
                and (mdef.laterality is None) == (laterality is None)
                and (laterality is None or _same_code(laterality, mdef.laterality))
                and (mdef.derivation is None) == (derivation is None)
                and (derivation is None or _same_code(derivation, mdef.derivation))):
            return mdef.key
    return None


def read_report_measurements(sr_dataset: Dataset) -> dict[str, Any]:
    """Extract ctnode's numbers from a ctnode SR (pydicom Dataset or highdicom SR).

    Returns the scores mapping given to :func:`build_report`, restricted to what the SR carries:
    numbers as floats (nested ``regions``/``zones`` dicts rebuilt), ``"severity"`` and
    ``"region_method"`` as strings when present, plus ``"volumetric"``: 1.0, or 0.0 when the report
    carries the "2D, partial coverage" note. Measurements no row of :data:`MEASUREMENTS` describes are
    ignored.
    """
    flat: dict[str, Any] = {}
    volumetric = True
    sr = _as_sr(sr_dataset)
    for segment_key, group in _ctnode_groups(sr):
        for item in group[0].ContentSequence:
            if (item.ValueType == "TEXT"
                    and _same_code(item.ConceptNameCodeSequence[0], QUALITATIVE_EVALUATIONS)):
                if item.TextValue == PARTIAL_COVERAGE_TEXT:
                    volumetric = False
                elif item.TextValue == PARTIAL_SCAN_TEXT:
                    flat["partial_coverage"] = 1.0
        for measurement in group.get_measurements():
            key = _match(measurement, segment_key)
            if key is not None:
                flat[key] = float(measurement.value)
        if segment_key == SegmentKey.INFECTION:
            for evaluation in group.get_qualitative_evaluations():
                if _same_code(evaluation.name, SEVERITY):
                    for label, code in SEVERITY_VALUES.items():
                        if _same_code(evaluation.value, code):
                            flat["severity"] = label
    for group in sr.content.get_image_measurement_groups():
        gdef = REGION_GROUP_BY_LABEL.get(group.tracking_identifier)
        if gdef is None:
            continue
        method = group.method
        for label, code in REGION_METHODS.items():
            if _same_code(method, code):
                flat["region_method"] = label
        for measurement in group.get_measurements():
            key = _match(measurement, gdef.key)
            if key is not None:
                flat[key] = float(measurement.value)
    out = _unflatten(flat)
    out["volumetric"] = 1.0 if volumetric else 0.0
    return out


def read_report_notes(sr_dataset: Dataset) -> list[str]:
    """The analysis notes of a ctnode SR (the TEXT items of its report-level "Qualitative Evaluations")."""
    notes: list[str] = []
    for item in _as_sr(sr_dataset).content[0].ContentSequence:
        if item.ValueType == "CONTAINER" and _same_code(item.ConceptNameCodeSequence[0], QUALITATIVE_EVALUATIONS):
            notes.extend(str(child.TextValue) for child in item.ContentSequence if child.ValueType == "TEXT")
    return notes


def read_report_segment_references(sr_dataset: Dataset) -> dict[str, tuple[str, int]]:
    """``{segment key: (SEG SOPInstanceUID, segment number)}`` referenced by the measurement groups."""
    refs: dict[str, tuple[str, int]] = {}
    for segment_key, group in _ctnode_groups(_as_sr(sr_dataset)):
        ref = group.referenced_segment
        if ref is not None and ref.referenced_segment_numbers:
            refs[segment_key] = (str(ref.referenced_sop_instance_uid), int(ref.referenced_segment_numbers[0]))
    return refs
