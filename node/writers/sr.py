"""TID 1500 Imaging Measurement Report (Comprehensive 3D SR) with the ctnode scores.

One TID 1411 "Volumetric ROI Measurements" group per SEG segment present in the SEG, each referencing
its segment (``ReferencedSegment`` + source series) and carrying the algorithm identification
(TID 4019), finding category/type (the segment's codes) and finding site (Lung, with laterality for
the lungs). Which score goes where is the table :data:`MEASUREMENTS`; adding a score (CT severity
score, zone scores, ...) is one row there (plus a private code if no standard one fits).

Scores input (a plain mapping, e.g. the scorer's ``as_dict()``; every key is optional, ``volumetric``
defaults to ``volume.is_volumetric``, ``None``/NaN values are skipped, other keys are ignored)::

    volumetric                  bool   False for a single-slice (2D) analysis
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

In 2D, ``*_volume_ml`` keys are not written (a single slice has no volume) and every group gets the
TEXT qualitative evaluation "2D, partial coverage".

Codes (verified against pydicom's PS3.16-generated code dictionary unless stated):

* SCT 169069000 "CT of chest" (procedure reported; CID 100 has no chest CT entry; SNOMED preferred
  term of "Computed tomography of chest (procedure)"). SCT 418023006 is "CT of
  chest, abdomen and pelvis" and is *not* used;
* SCT 118565006 "Volume", SCT 42798000 "Area" (CID 7469/7472), UCUM cm3 / cm2 / % / [hnsf'U];
* DCM 126030 "Sum of segmented voxel method for volume" (CID 7474), measurement method for volumes;
* DCM 112031 "Attenuation Coefficient" + derivation SCT 373098007 "Mean" for the mean HU (TID 300
  measurement with its Derivation concept modifier);
* UMLS C0034375 "Qualitative Evaluations" (TID 1501/1411 TEXT row) for the 2D note;
* private scheme ``99CTNODE`` (declared in CodingSchemeIdentificationSequence) for
  "Percent of lung involved": no standard concept exists.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

import node
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

PRIVATE_SCHEME = "99CTNODE"
PRIVATE_SCHEME_ITEM = hd.coding_schemes.CodingSchemeIdentificationItem(
    designator=PRIVATE_SCHEME,
    name="ctnode private codes",
    responsible_organization="ctnode",
)
#: Private concepts (scheme 99CTNODE). Never renumber: the values are stored in PACS archives.
PERCENT_INVOLVED = hd.sr.CodedConcept("CTN0001", PRIVATE_SCHEME, "Percent of lung involved")

PROCEDURE_CT_CHEST = hd.sr.CodedConcept("169069000", "SCT", "CT of chest")
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
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


@dataclass(frozen=True)
class MeasurementDef:
    """Where one score goes in the SR and how it is coded."""

    key: str                                  # key in the scores mapping (and in read-back output)
    segment: str                              # SEG segment key (node.writers.seg.SEGMENTS)
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
)
MEASUREMENT_KEYS = frozenset(m.key for m in MEASUREMENTS)


def _value(scores: Mapping[str, Any], key: str) -> float | None:
    value = scores.get(key)
    if value is None:
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
    by_label = {spec.label: spec.key for spec in SEGMENTS}
    found: dict[str, int] = {}
    for item in seg.SegmentSequence:
        key = by_label.get(str(item.SegmentLabel))
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
    )
    if not volumetric:
        # TID 1501/1411 "Qualitative Evaluations" TEXT row; highdicom only builds the CODE variant.
        group[0].ContentSequence.append(hd.sr.TextContentItem(
            name=QUALITATIVE_EVALUATIONS, value=PARTIAL_COVERAGE_TEXT,
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
) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 measurement report for ``seg`` (built from ``volume``) and ``scores``.

    Keys that no row of :data:`MEASUREMENTS` describes are not reported (logged at debug level), so the
    scorer may carry more than the SR; with ``strict=True`` they raise ``KeyError`` instead (catches
    typos in tests). Scores for a segment the SEG lacks (e.g. GGO from an engine without classes) raise
    ``ValueError``.
    """
    unknown = set(scores) - MEASUREMENT_KEYS - {"volumetric"}
    if unknown and strict:
        raise KeyError(f"unknown score keys: {sorted(unknown)}")
    if unknown:
        log.debug("scores not reported in the SR: %s", sorted(unknown))
    volumetric = bool(scores.get("volumetric", volume.is_volumetric))
    segment_numbers = _seg_segments(seg)
    needed = {m.segment for m in MEASUREMENTS
              if m.applies(volumetric) and _value(scores, m.key) is not None}
    if needed - set(segment_numbers):
        raise ValueError(f"scores need SEG segments {sorted(needed - set(segment_numbers))} "
                         "that the SEG does not contain")

    serial = device_serial or device_serial_number()
    algorithm = _algorithm_id(engine)
    groups = [
        _measurement_group(spec, segment_numbers[spec.key], seg, volume, scores, volumetric, algorithm)
        for spec in SEGMENTS if spec.key in segment_numbers
    ]
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
    # evidence[0] supplies patient/study attributes: the SEG has them all (highdicom copied them from
    # the source) even when an anonymised source header lacks a Type 2 attribute.
    return hd.sr.Comprehensive3DSR(
        evidence=[seg, *volume.datasets],
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
    """(segment key, group) for each ctnode measurement group, identified by its tracking identifier."""
    by_label = {spec.label: spec.key for spec in SEGMENTS}
    for group in sr.content.get_volumetric_roi_measurement_groups():
        segment_key = by_label.get(group.tracking_identifier)
        if segment_key is not None:
            yield segment_key, group


def read_report_measurements(sr_dataset: Dataset) -> dict[str, float]:
    """Extract ctnode's numbers from a ctnode SR (pydicom Dataset or highdicom SR).

    Returns ``{score key: value}`` with the keys of the scores mapping given to :func:`build_report`
    (only those present in the SR), plus ``"volumetric"``: 1.0, or 0.0 when the report carries the
    "2D, partial coverage" note. Measurements no row of :data:`MEASUREMENTS` describes are ignored.
    """
    out: dict[str, float] = {}
    volumetric = True
    for segment_key, group in _ctnode_groups(_as_sr(sr_dataset)):
        for item in group[0].ContentSequence:
            if (item.ValueType == "TEXT"
                    and _same_code(item.ConceptNameCodeSequence[0], QUALITATIVE_EVALUATIONS)
                    and item.TextValue == PARTIAL_COVERAGE_TEXT):
                volumetric = False
        for measurement in group.get_measurements():
            sites = measurement.finding_sites
            laterality = sites[0].laterality if sites else None
            derivation = measurement.derivation
            for mdef in MEASUREMENTS:
                if (mdef.segment == segment_key
                        and _same_code(measurement.name, mdef.name)
                        and _same_code(measurement.unit, mdef.unit)
                        and (mdef.laterality is None) == (laterality is None)
                        and (laterality is None or _same_code(laterality, mdef.laterality))
                        and (mdef.derivation is None) == (derivation is None)
                        and (derivation is None or _same_code(derivation, mdef.derivation))):
                    out[mdef.key] = float(measurement.value)
                    break
    out["volumetric"] = 1.0 if volumetric else 0.0
    return out


def read_report_segment_references(sr_dataset: Dataset) -> dict[str, tuple[str, int]]:
    """``{segment key: (SEG SOPInstanceUID, segment number)}`` referenced by the measurement groups."""
    refs: dict[str, tuple[str, int]] = {}
    for segment_key, group in _ctnode_groups(_as_sr(sr_dataset)):
        ref = group.referenced_segment
        if ref is not None and ref.referenced_segment_numbers:
            refs[segment_key] = (str(ref.referenced_sop_instance_uid), int(ref.referenced_segment_numbers[0]))
    return refs
