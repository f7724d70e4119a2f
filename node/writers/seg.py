"""DICOM Segmentation (SEG) writer: lungs and COVID-19 infection as a BINARY multi-segment SEG.

One segment per structure, in a fixed order so that the SR (and anything else) can refer to
segments by number (:data:`SEGMENT_LABELS`; numbers, keys, labels and codes are
:data:`node.pipeline.segments.NODE_SEGMENTS`, which every reader of a SEG classifies segments with):

==  ====================  ==================================  =========================================
#   label                 segmented property category         segmented property type (+ modifier)
==  ====================  ==================================  =========================================
1   Right lung            SCT 91723000 Anatomical Structure   SCT 39607008 Lung + SCT 24028007 Right
2   Left lung             SCT 91723000 Anatomical Structure   SCT 39607008 Lung + SCT 7771000 Left
3   Infection             SCT 49755003 Morph. Abnormal Str.   DCM 112001 Opacity
4   Ground-glass opacity  SCT 49755003 Morph. Abnormal Str.   DCM 112120 Ground glass opacity
5   Consolidation         SCT 49755003 Morph. Abnormal Str.   SCT 9656002 Consolidation
==  ====================  ==================================  =========================================

Segments 4 and 5 exist only when the engine separates classes (``InfectionResult.ggo`` or
``.consolidation`` is set); if only one of the two is given the other is written empty, so that the
numbers never shift.

Code sources:

* category codes: DICOM PS3.16 CID 7150 "Segmentation Property Categories" (as shipped in pydicom's
  ``pydicom.sr.codedict``, which is generated from PS3.16);
* SCT 39607008 "Lung": CID 7151 "Segmentation Property Types"; laterality goes in the Segmented
  Property Type Modifier Code Sequence (0062,0011), CID 244 "Laterality" (PS3.3 C.8.20.2). The
  pre-coordinated SNOMED concepts "Right lung" 3341006 / "Left lung" 44029006 are in no DICOM
  context group, so Lung + modifier is the form that DICOM-terminology-aware viewers (3D Slicer,
  dcmqi, IDC) recognise; viewers that ignore codes show the SegmentLabel anyway;
* DCM 112001 "Opacity" and DCM 112120 "Ground glass opacity": CID 6104 "Abnormal Opacity Finding or
  Feature". "Opacity" is the generic parent of GGO and consolidation, which is exactly what the
  engines call "infection" (a disorder concept such as "Infectious disease" is not a structure);
* SCT 9656002 "Consolidation" (morphologic abnormality): used by HL7 FHIR's BodyStructure example
  "right lung consolidation"; DICOM has no consolidation code in CID 6102/6104. SCT 95436008
  "Lung consolidation" is a *disorder* and therefore unsuitable as a segmented structure;
* algorithm families: CID 7162 "Surface Processing Algorithm Families": DCM 123110 "Artificial
  Intelligence" (not 113037, which is "Rejected for Patient Safety Reasons") and DCM 123105
  "Histogram Analysis" for the HU-threshold engine (CID 7162 has no "thresholding" concept).

Highdicom derives plane positions, orientation, pixel spacing, the ReferencedSeriesSequence and the
per-frame DerivationImageSequence from the source headers alone: PixelData is not needed.
"""
from __future__ import annotations

import copy
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

import node
from node.pipeline.segments import NODE_SEGMENTS, Concept, SegmentKey
from node.pipeline.types import EngineIdentity, InfectionResult, LungMasks, Volume

MANUFACTURER = "ctnode"
SEG_SERIES_DESCRIPTION = "ctnode lungs and infection"
SEG_CONTENT_LABEL = "CTNODE_LUNG_INF"  # CS, max 16 chars, upper case

# Algorithm families (CID 7162); the segments' own codes are in node.pipeline.segments.NODE_SEGMENTS.
FAMILY_AI = codes.DCM.ArtificialIntelligence          # 123110, CID 7162
FAMILY_HISTOGRAM = codes.DCM.HistogramAnalysis        # 123105, CID 7162


@dataclass(frozen=True)
class SegmentSpec:
    """Fixed description of one segment of the ctnode SEG."""

    number: int
    key: SegmentKey              # stable identifier used by the SR writer and scores
    label: str                   # SegmentLabel (what most viewers display)
    category: hd.sr.CodedConcept
    property_type: hd.sr.CodedConcept
    laterality: hd.sr.CodedConcept | None
    rgb: tuple[int, int, int]    # recommended display colour, converted to CIELab


def _cc(code) -> hd.sr.CodedConcept:
    """pydicom ``Code`` or a :class:`node.pipeline.segments.Concept` -> highdicom ``CodedConcept``."""
    if isinstance(code, Concept):
        return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)
    return code if isinstance(code, hd.sr.CodedConcept) else hd.sr.CodedConcept.from_code(code)


#: Recommended display colours.
_RGB: dict[SegmentKey, tuple[int, int, int]] = {
    SegmentKey.RIGHT_LUNG: (80, 140, 230),      # blue
    SegmentKey.LEFT_LUNG: (80, 200, 120),       # green
    SegmentKey.INFECTION: (230, 40, 40),        # red
    SegmentKey.GGO: (250, 220, 40),             # yellow
    SegmentKey.CONSOLIDATION: (250, 140, 20),   # orange
}
SEGMENTS: tuple[SegmentSpec, ...] = tuple(
    SegmentSpec(s.number, s.key, s.label, _cc(s.category), _cc(s.property_type),
                _cc(s.laterality) if s.laterality is not None else None, _RGB[s.key])
    for s in NODE_SEGMENTS)
SEGMENT_BY_KEY: dict[str, SegmentSpec] = {s.key: s for s in SEGMENTS}
#: Segment number -> SegmentLabel, for every segment ctnode may write (4 and 5 only with classes).
SEGMENT_LABELS: dict[int, str] = {s.number: s.label for s in SEGMENTS}
#: Segment number for each stable key (``"right_lung"`` -> 1, ...).
SEGMENT_NUMBERS: dict[str, int] = {s.key: s.number for s in SEGMENTS}

# Type 2 patient/study attributes highdicom reads unconditionally from the first source header.
_REQUIRED_SOURCE_ATTRIBUTES = (
    "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber",
    "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName",
)


def device_serial_number() -> str:
    """Serial number written in SEG/SR General Equipment: stable per host (LO, max 64 chars)."""
    return f"ctnode-{socket.gethostname()}"[:64]


def device_uid(serial_number: str | None = None) -> str:
    """Deterministic Device Observer UID of this node (same input -> same UID)."""
    return generate_uid(entropy_srcs=["ctnode device", serial_number or device_serial_number()])


def algorithm_family(engine: EngineIdentity) -> hd.sr.CodedConcept:
    """Algorithm family (CID 7162) for an engine: AI when it runs learned weights, else histogram."""
    if engine.name.lower() == "threshold" or not engine.weights_sha256:
        return _cc(FAMILY_HISTOGRAM)
    return _cc(FAMILY_AI)


def algorithm_name(engine: EngineIdentity) -> str:
    return f"ctnode {engine.name}"


def algorithm_version(engine: EngineIdentity) -> str:
    """Engine version, with the first 12 hex digits of the weights hash so viewers show it (LO <= 64)."""
    version = engine.version
    if engine.weights_sha256:
        version = f"{version} weights sha256:{engine.weights_sha256[:12]}"
    return version[:64]


def algorithm_parameters(engine: EngineIdentity) -> dict[str, str]:
    params = {"engine": engine.name, "engine_version": engine.version}
    if engine.weights_sha256:
        params["weights_sha256"] = engine.weights_sha256
    return params


def algorithm_identification(engine: EngineIdentity) -> hd.AlgorithmIdentificationSequence:
    """Segmentation Algorithm Identification Sequence (PS3.3 C.8.20.2 / Algorithm Identification Macro)."""
    return hd.AlgorithmIdentificationSequence(
        name=algorithm_name(engine),
        family=algorithm_family(engine),
        version=algorithm_version(engine),
        source=MANUFACTURER,
        parameters=algorithm_parameters(engine),
    )


def active_segments(infection: InfectionResult) -> tuple[SegmentSpec, ...]:
    """Segments written for this result: 1-3 always, 4-5 when the engine separates classes."""
    if infection.ggo is None and infection.consolidation is None:
        return SEGMENTS[:3]
    return SEGMENTS


def _segment_description(spec: SegmentSpec,
                         algo: hd.AlgorithmIdentificationSequence) -> hd.seg.SegmentDescription:
    desc = hd.seg.SegmentDescription(
        segment_number=spec.number,
        segment_label=spec.label,
        segmented_property_category=spec.category,
        # a copy: the modifier below is added to this item and must not leak into SEGMENTS
        segmented_property_type=copy.deepcopy(spec.property_type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algo,
        tracking_uid=generate_uid(),
        tracking_id=spec.label,
        display_color=hd.color.CIELabColor.from_rgb(*spec.rgb),
    )
    if spec.laterality is not None:
        # Segmented Property Type Modifier Code Sequence (0062,0011), CID 244 Laterality, nested in
        # the Segmented Property Type Code Sequence item (PS3.3 Table 10-31); highdicom has no argument.
        desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            spec.laterality]
    return desc


def _source_images(volume: Volume) -> list[Dataset]:
    """Source headers in volume order; fills missing Type 2 patient/study attributes on a copy."""
    datasets = list(volume.datasets)
    if len(datasets) != volume.shape[0]:
        raise ValueError(
            f"volume.datasets has {len(datasets)} headers for {volume.shape[0]} slices; "
            "the SEG needs one source header per slice in slice order")
    for ds, uid in zip(datasets, volume.sop_instance_uids):
        if ds.SOPInstanceUID != uid:
            raise ValueError("volume.datasets is not in the order of volume.sop_instance_uids")
    first = datasets[0]
    missing = [kw for kw in _REQUIRED_SOURCE_ATTRIBUTES if kw not in first]
    if missing:
        first = copy.deepcopy(first)  # one header without pixels: cheap, and the caller's stays intact
        for kw in missing:
            setattr(first, kw, "")
        datasets[0] = first
    return datasets


def _stack_masks(volume: Volume, lungs: LungMasks, infection: InfectionResult,
                 segments: Sequence[SegmentSpec]) -> np.ndarray:
    """Masks as highdicom's stacked form ``(slices, rows, cols, segments)``, in ``volume.datasets`` order.

    Stored segment-first and returned as a ``moveaxis`` view: each (slice, segment) frame highdicom
    extracts is then a contiguous 2D block (about 10x faster per frame than a segment-last array).
    """
    shape = volume.shape
    if lungs.labels.shape != shape:
        raise ValueError(f"lung labels shape {lungs.labels.shape} != volume shape {shape}")
    out = np.zeros((len(segments), *shape), dtype=bool)
    for i, spec in enumerate(segments):
        if spec.key == SegmentKey.RIGHT_LUNG:
            np.equal(lungs.labels, LungMasks.RIGHT, out=out[i])
        elif spec.key == SegmentKey.LEFT_LUNG:
            np.equal(lungs.labels, LungMasks.LEFT, out=out[i])
        else:
            mask = {SegmentKey.INFECTION: infection.infection, SegmentKey.GGO: infection.ggo,
                    SegmentKey.CONSOLIDATION: infection.consolidation}[spec.key]
            if mask is None:
                continue  # class not produced by the engine: empty segment
            if mask.shape != shape:
                raise ValueError(f"{spec.key} mask shape {mask.shape} != volume shape {shape}")
            out[i] = mask
    return np.moveaxis(out, 0, -1)


def _segments_overlap(stacked: np.ndarray) -> bool:
    """Whether any voxel belongs to two segments; pairwise boolean ops, no int64 temporaries."""
    seen = np.zeros(stacked.shape[:-1], dtype=bool)
    for i in range(stacked.shape[-1]):
        channel = stacked[..., i]
        if np.logical_and(seen, channel).any():
            return True
        seen |= channel
    return False


class _Segmentation(hd.seg.Segmentation):
    """highdicom Segmentation with a cheaper pixel-array check for ctnode's boolean stacks.

    highdicom's generic check sums the 4D stack over segments into an int64 array (for a 300x512x512
    study with 5 segments: ~0.6 GB and ~2-3 s) only to decide SegmentsOverlap. For a 4D bool array the
    binary check is trivially satisfied and the overlap can be found with in-place boolean ops. Any
    other input falls through to highdicom. Relies on a private hook: if highdicom renames it, this
    override simply stops being called (slower, still correct).
    """

    @classmethod
    def _check_and_cast_pixel_array(cls, pixel_array, segment_numbers, segmentation_type, *args, **kwargs):
        if (isinstance(pixel_array, np.ndarray) and pixel_array.ndim == 4 and pixel_array.dtype == bool
                and segmentation_type == hd.seg.SegmentationTypeValues.BINARY
                and pixel_array.shape[-1] == len(segment_numbers)):
            overlap = _segments_overlap(pixel_array)
            return pixel_array, (hd.seg.SegmentsOverlapValues.YES if overlap
                                 else hd.seg.SegmentsOverlapValues.NO)
        return super()._check_and_cast_pixel_array(
            pixel_array, segment_numbers, segmentation_type, *args, **kwargs)


def build_segmentation(
    volume: Volume,
    lungs: LungMasks,
    infection: InfectionResult,
    engine: EngineIdentity,
    *,
    series_number: int = 901,
    instance_number: int = 1,
    manufacturer_model_name: str = "ctnode",
    software_version: str = node.__version__,
    workers: int = 0,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    device_serial: str | None = None,
) -> hd.seg.Segmentation:
    """Build the BINARY SEG for one analysed series.

    Frames are taken in ``volume.datasets`` order, so highdicom copies each source slice's
    ImagePositionPatient into the matching SEG frame and references it in the frame's
    DerivationImageSequence. Empty frames are omitted (``omit_empty_frames=True``); a segment that is
    empty everywhere (e.g. no infection) stays in the SegmentSequence with zero frames, which
    the standard allows and highdicom reads back as an all-zero mask. If *every* segment is empty,
    highdicom keeps all frames (all zero) because a SEG needs at least one frame.

    ``workers`` is passed to highdicom, which only uses it for compressed transfer syntaxes; with the
    uncompressed 1-bit BINARY encoding used here (the one every viewer reads) it has no effect.
    """
    if not volume.datasets:
        raise ValueError("volume.datasets is empty: the SEG needs the source headers")
    source_images = _source_images(volume)
    segments = active_segments(infection)
    algo = algorithm_identification(engine)
    pixel_array = _stack_masks(volume, lungs, infection, segments)

    seg = _Segmentation(
        source_images=source_images,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_segment_description(s, algo) for s in segments],
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=manufacturer_model_name,
        software_versions=software_version,
        device_serial_number=device_serial or device_serial_number(),
        content_label=SEG_CONTENT_LABEL,
        content_description=f"Lungs and COVID-19 lung involvement ({engine.name})"[:64],
        series_description=SEG_SERIES_DESCRIPTION,
        omit_empty_frames=True,
        workers=workers,
    )
    return seg
