"""What the segments of a DICOM SEG are, in the node's terms: one classifier for every reader of a SEG.

* :func:`classify_segment`: a finding or lung segment of any SEG (a reference drawn by a radiologist, another
  tool's output, the node's own) -> a :class:`SegmentKey`; used to pair segments for agreement
  (:mod:`node.agreement`).
* :func:`classify_lobe`: a lung lobe segment -> its zone name (:data:`node.pipeline.regions.ZONES`); used to
  recognise and read lobe maps (:mod:`node.pipeline.regionmap`).
* :func:`lesion_side`: the lung a lesion segment lies in, from its Anatomic Region (as the node's label-map
  SEG says it, :mod:`node.writers.seg`), so that a whole lung can be rebuilt from its segments.

Codes decide first, then the label. Codes are compared as (coding scheme designator, code value) pairs, the
scheme upper-cased.
"""
from __future__ import annotations

import enum
import re
from typing import NamedTuple

from pydicom.dataset import Dataset

from .regions import ZONES

Code = tuple[str, str]  # (coding scheme designator, code value)


class Concept(NamedTuple):
    """A coded concept as DICOM writes it (PS3.16)."""

    scheme: str
    value: str
    meaning: str

    @property
    def code(self) -> Code:
        return self.scheme, self.value


class SegmentKey(enum.StrEnum):
    """The structures the node reports (the keys of agreement rows, scores and SR measurement groups); in the
    node's label-map SEG a lung is the union of its side's segments, the infection that of the lesions."""

    RIGHT_LUNG = "right_lung"
    LEFT_LUNG = "left_lung"
    INFECTION = "infection"
    GGO = "ggo"
    CONSOLIDATION = "consolidation"


# Segmented property categories (CID 7150).
ANATOMICAL_STRUCTURE = Concept("SCT", "91723000", "Anatomical Structure")
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = Concept("SCT", "49755003", "Morphologically Abnormal Structure")
# Segmented property types; see node.writers.seg for why these codes.
LUNG = Concept("SCT", "39607008", "Lung")                         # CID 7151, with a laterality modifier
OPACITY = Concept("DCM", "112001", "Opacity")                     # CID 6104: the engines' "infection"
GROUND_GLASS_OPACITY = Concept("DCM", "112120", "Ground glass opacity")  # CID 6104
CONSOLIDATION = Concept("SCT", "9656002", "Consolidation")        # morphologic abnormality
#: Laterality modifiers (CID 244).
RIGHT = Concept("SCT", "24028007", "Right")
LEFT = Concept("SCT", "7771000", "Left")
#: Lobes of lung (CID 6170); upper and lower take a laterality modifier.
UPPER_LOBE = Concept("SCT", "45653009", "Upper lobe of lung")
MIDDLE_LOBE = Concept("SCT", "72481006", "Middle lobe of right lung")
LOWER_LOBE = Concept("SCT", "90572001", "Lower lobe of lung")

# Codes other tools use for the same structures: pre-coordinated right/left lung, and the *disorder*
# "Lung consolidation" (unsuitable for writing, recognised when read).
_FINDING_CODES: dict[Code, SegmentKey] = {
    ("SCT", "3341006"): SegmentKey.RIGHT_LUNG, ("SCT", "44029006"): SegmentKey.LEFT_LUNG,
    OPACITY.code: SegmentKey.INFECTION, GROUND_GLASS_OPACITY.code: SegmentKey.GGO,
    CONSOLIDATION.code: SegmentKey.CONSOLIDATION, ("SCT", "95436008"): SegmentKey.CONSOLIDATION,
}
_LOBE_ABBREVIATIONS = {"rul": "right_upper", "rml": "right_middle", "rll": "right_lower", "lul": "left_upper",
                       "lll": "left_lower"}


def code_of(item: Dataset) -> Code:
    """(coding scheme designator, code value) of a code sequence item, the scheme upper-cased."""
    return str(item.get("CodingSchemeDesignator", "")).upper(), str(item.get("CodeValue", ""))


def _property_codes(segment: Dataset) -> list[tuple[Code, set[Code]]]:
    """(property type code, its modifier codes) of each SegmentedPropertyTypeCodeSequence item."""
    return [(code_of(prop), {code_of(m) for m in prop.get("SegmentedPropertyTypeModifierCodeSequence", None) or []})
            for prop in segment.get("SegmentedPropertyTypeCodeSequence", None) or []]


def _words(label: str) -> set[str]:
    return set(re.split(r"[^a-z]+", label.lower()))


def _side_from_label(label: str) -> str | None:
    words = _words(label)
    if "right" in words:
        return "right"
    if "left" in words:
        return "left"
    return None


def classify_segment(segment: Dataset) -> SegmentKey | None:
    """The key of a SegmentSequence item of any SEG, or None when it is none of the node's structures.

    Codes decide first (Lung + laterality modifier, SCT right/left lung, DCM 112001 Opacity, DCM 112120
    Ground glass opacity, SCT Consolidation); otherwise the label: "right"/"left" + "lung", "ground
    glass"/"GGO", "consolidation", then "infection"/"lesion"/"opacity".
    """
    label = str(segment.get("SegmentLabel", "")).lower().replace("-", " ")
    for code, modifiers in _property_codes(segment):
        if code in _FINDING_CODES:
            return _FINDING_CODES[code]
        if code == LUNG.code:
            if RIGHT.code in modifiers or (not modifiers and "right" in label):
                return SegmentKey.RIGHT_LUNG
            if LEFT.code in modifiers or (not modifiers and "left" in label):
                return SegmentKey.LEFT_LUNG
    if "lung" in label and "right" in label:
        return SegmentKey.RIGHT_LUNG
    if "lung" in label and "left" in label:
        return SegmentKey.LEFT_LUNG
    if "ground glass" in label or "ggo" in label.split():
        return SegmentKey.GGO
    if "consolidation" in label:
        return SegmentKey.CONSOLIDATION
    if any(word in label for word in ("infection", "lesion", "opacity")):
        return SegmentKey.INFECTION
    return None


def classify_lobe(segment: Dataset) -> str | None:
    """The lobe (a :data:`ZONES` name) a SegmentSequence item shows, or None when it is not a lobe.

    Codes first (CID 6170: upper/lower lobe of lung with a Right/Left modifier, else the side from the
    label; middle lobe of right lung), then the label ("RUL", "right upper lobe", "lung_upper_lobe_right").
    """
    label = str(segment.get("SegmentLabel", "")).lower()
    for code, modifiers in _property_codes(segment):
        if code == MIDDLE_LOBE.code:
            return "right_middle"
        if code in (UPPER_LOBE.code, LOWER_LOBE.code):
            side = ("right" if RIGHT.code in modifiers else "left" if LEFT.code in modifiers
                    else _side_from_label(label))
            if side is not None:
                return f"{side}_{'upper' if code == UPPER_LOBE.code else 'lower'}"
    words = _words(label)
    for abbreviation, lobe in _LOBE_ABBREVIATIONS.items():
        if abbreviation in words:
            return lobe
    side = _side_from_label(label)
    if "lobe" in words and side is not None:
        for level in ("upper", "middle", "lower"):
            if level in words and f"{side}_{level}" in ZONES:
                return f"{side}_{level}"
    return None


def lesion_side(segment: Dataset) -> SegmentKey | None:
    """The lung (:attr:`SegmentKey.RIGHT_LUNG` / :attr:`SegmentKey.LEFT_LUNG`) a lesion segment says it lies in
    (Anatomic Region Sequence: Lung with a laterality modifier), else None."""
    for region in segment.get("AnatomicRegionSequence", None) or []:
        if code_of(region) != LUNG.code:
            continue
        modifiers = {code_of(m) for m in region.get("AnatomicRegionModifierSequence", None) or []}
        if RIGHT.code in modifiers:
            return SegmentKey.RIGHT_LUNG
        if LEFT.code in modifiers:
            return SegmentKey.LEFT_LUNG
    return None
