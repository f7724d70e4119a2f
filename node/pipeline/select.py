"""Series selection: which series of a study can be scored, and why the others cannot.

Header rules (:func:`evaluate_series`) decide from the DICOM attributes alone; the pixel rule
(:func:`check_lung_in_view`) runs after assembly and lung segmentation, in :mod:`node.pipeline.run`.
Every decision carries a reason written for an administrator, not for a programmer.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from node.dicom.headers import CT_CLASSES, ENHANCED_CT_CLASSES, MEDIA_STORAGE_DIRECTORY

from .types import LungMasks, Volume
from .volume import (
    VolumeError,
    angle_deg,
    as_paths,
    is_multiframe,
    normal_of,
    orientation_of,
    orientations_agree,
    series_geometry,
)

log = logging.getLogger(__name__)

#: Maximum angle between the slice normal and the patient head-foot axis for an "axial" series.
AXIAL_MAX_DEG = 10.0

#: BodyPartExamined values (DICOM PS3.16 CID 4031 and common vendor spellings) that include the lungs.
CHEST_BODY_PARTS = {
    "CHEST", "LUNG", "LUNGS", "THORAX", "THORACIC", "TORSO", "CHESTABDOMEN", "CHESTABDPELVIS", "CHEST_ABDOMEN",
    "NECKCHEST", "NECKCHESTABDOMEN", "NECKCHESTABDPELV", "HEADNECKCHEST", "WHOLEBODY", "BREAST", "HEART", "TSPINE",
}
#: Values that exclude the lungs (a lung base might still be in view, but these are not chest studies).
NON_CHEST_BODY_PARTS = {
    "ABDOMEN", "PELVIS", "ABDOMENPELVIS", "ABDPELVIS", "ABD", "HEAD", "BRAIN", "SKULL", "HEADNECK", "NECK", "FACE",
    "SINUS", "IAC", "ORBIT", "JAW", "TMJ", "CSPINE", "LSPINE", "SSPINE", "SPINE", "KIDNEY", "LIVER", "PROSTATE",
    "BLADDER", "COLON", "EXTREMITY", "ARM", "LEG", "KNEE", "HIP", "FOOT", "ANKLE", "HAND", "WRIST", "ELBOW",
    "SHOULDER", "FEMUR", "TIBIA", "HUMERUS", "PANCREAS",
}

#: ImageType words (each value split at spaces and underscores) of projections, renderings and scouts:
#: never analysed, whatever else the ImageType says (a MIP/MinIP slab changes the densities, a rendering or a
#: curved reformat has no slice geometry to score).
SCOUT_IMAGE_TYPE_WORDS = {"LOCALIZER", "SCOUT", "TOPOGRAM", "SCANOGRAM", "SURVIEW"}
REFUSED_IMAGE_TYPE_WORDS = SCOUT_IMAGE_TYPE_WORDS | {
    "MIP", "MINIP", "MAXIP", "MAXIMUM", "MINIMUM", "PROJECTION",
    "VR", "VRT", "RENDERING", "SSD", "SURFACE", "3D", "VP", "CURVED", "CPR",
}
#: ImageType words of averaging or multiplanar reformats, which keep the densities of the acquisition
#: (GE REFORMATTED\AVERAGE, Siemens MPR / CSA MPR, Canon and Philips MPR, resampled stacks).
REFORMAT_IMAGE_TYPE_WORDS = {"MPR", "CSAMPR", "REFORMATTED", "REFORMAT", "AVERAGE", "AVG", "MEAN", "RESAMPLED",
                             "CSAPARALLEL", "PARALLEL"}


class SeriesKind(str, Enum):
    """What a series is, by its ImageType: the original acquisition, or a derived axial reformat that
    keeps its densities (analysed only when no original axial series of the study is usable)."""

    ORIGINAL = "original"
    REFORMAT = "derived reformat"


#: Pixel check: minimum lung area (cm2) in the best slice and minimum lung fraction of the body section there.
LUNG_MIN_AREA_CM2 = 10.0
LUNG_MIN_BODY_FRACTION = 0.05
NO_LUNG_REASON = "no lung in field of view (abdomen?)"


@dataclass
class SeriesDecision:
    """Whether one series can be analysed, with a human-readable reason."""

    series_uid: str
    accepted: bool
    reason: str
    n_instances: int
    description: str = ""
    modality: str = ""
    body_part: str = ""
    orientation: str = ""                 # "axial", "coronal", "sagittal", "oblique", "mixed", "unknown"
    kind: SeriesKind = SeriesKind.ORIGINAL
    image_type: str = ""                  # the first instance's ImageType, as sent ("" when absent)
    slice_thickness: float | None = None  # mm, from SliceThickness
    slice_spacing: float | None = None    # mm between slice centres, when the stack is consistent
    chosen: bool = False
    problems: list[str] = field(default_factory=list)  # every blocking reason (``reason`` joins them)
    flags: list[str] = field(default_factory=list)     # non-blocking remarks (single slice, missing tags...)
    # The instances (headers, or datasets as given). Deliberately NOT a dataclass field, so that
    # dataclasses.asdict() and JSON dumps of decisions never copy or print DICOM headers.
    headers: ClassVar[list[Any]] = []

    def reject(self, problem: str) -> None:
        """Mark the series as not analysable (used for the checks that run after assembly)."""
        self.accepted = False
        self.chosen = False
        self.problems.append(problem)
        self.reason = "; ".join(self.problems)

    def as_dict(self) -> dict[str, Any]:
        return {
            "series_uid": self.series_uid, "accepted": self.accepted, "chosen": self.chosen,
            "reason": self.reason, "n_instances": self.n_instances, "description": self.description,
            "modality": self.modality, "body_part": self.body_part, "orientation": self.orientation,
            "kind": self.kind.value, "image_type": self.image_type,
            "slice_thickness": self.slice_thickness, "slice_spacing": self.slice_spacing,
            "problems": list(self.problems), "flags": list(self.flags),
        }


# ------------------------------------------------------------------------------------------- grouping


def _series_key(ds: Dataset) -> str:
    uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
    if uid:
        return uid
    # Some exports blank the UIDs; group what plausibly belongs together instead of failing.
    parts = [str(ds.get(k, "") or "").strip() for k in ("FrameOfReferenceUID", "SeriesNumber", "SeriesDescription",
                                                       "Modality")]
    return "no-series-uid:" + "|".join(parts)


def group_series(items: Iterable[Any], unreadable: list[tuple[str, str]] | None = None) -> dict[str, list[Dataset]]:
    """Group instances by SeriesInstanceUID.

    ``items``: file paths, folders (searched recursively) or pydicom datasets. Paths are read with
    ``stop_before_pixels=True`` (the dataset keeps its ``filename`` so pixels can be read later); datasets
    are kept as given. Files that are not DICOM are appended to ``unreadable`` as (path, error) when a list
    is passed. Instances without a SeriesInstanceUID are grouped by frame of reference, series number and
    description under a key starting with ``no-series-uid:``.
    """
    groups: dict[str, list[Dataset]] = {}
    for item in as_paths(items):
        if isinstance(item, Dataset):
            ds = item
        else:
            try:
                ds = pydicom.dcmread(item, stop_before_pixels=True)
            except Exception as exc:  # not DICOM, truncated, unreadable: reported, never fatal
                log.warning("skipping %s: %s", item, exc)
                if unreadable is not None:
                    unreadable.append((str(item), str(exc)))
                continue
        media_class = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "") or "")
        if media_class == MEDIA_STORAGE_DIRECTORY:
            continue  # a DICOMDIR index, not an instance
        groups.setdefault(_series_key(ds), []).append(ds)
    return groups


# ------------------------------------------------------------------------------------------- header rules


def classify_orientation(orientation: np.ndarray) -> tuple[str, float]:
    """("axial" | "coronal" | "sagittal" | "oblique", angle in degrees between the normal and patient z)."""
    n = normal_of(orientation)
    tilt = angle_deg(n, np.array([0.0, 0.0, 1.0]))
    tilt = min(tilt, 180.0 - tilt)
    if tilt <= AXIAL_MAX_DEG:
        return "axial", tilt
    axis = int(np.argmax(np.abs(n)))
    if np.abs(n[axis]) >= np.cos(np.radians(AXIAL_MAX_DEG)):
        return ("sagittal" if axis == 0 else "coronal"), tilt
    return "oblique", tilt


def _image_type(ds: Dataset) -> list[str]:
    it = ds.get("ImageType")
    if it is None:
        return []
    if isinstance(it, str):
        return [v.strip().upper() for v in it.split("\\")]
    return [str(v).strip().upper() for v in it]


def _modality_problems(headers: Sequence[Dataset], d: SeriesDecision) -> None:
    modalities = {str(h.get("Modality", "") or "").upper() for h in headers}
    sop_classes = {str(h.get("SOPClassUID", "") or "") for h in headers}
    if sop_classes & ENHANCED_CT_CLASSES or any(is_multiframe(h) for h in headers):
        d.problems.append("Enhanced CT (multi-frame) is not supported yet")
    known = modalities - {""}
    if known - {"CT"}:
        d.problems.append(f"modality {'/'.join(sorted(known))} is not CT")
        d.modality = "/".join(sorted(known))
        return
    if known == {"CT"} and "" not in modalities:
        d.modality = "CT"
        return
    # Modality missing (stripped or anonymised files): fall back on CT-specific attributes.
    if sop_classes & CT_CLASSES:
        d.modality = "CT"
        d.flags.append("Modality missing: treated as CT because the SOP class is CT Image Storage")
    elif all("RescaleIntercept" in h for h in headers) and all(str(h.get("RescaleType", "HU") or "HU").upper() == "HU"
                                                              for h in headers):
        d.modality = "CT"
        d.flags.append("Modality and CT SOP class missing: treated as CT because the images carry a HU rescale")
    else:
        d.problems.append("not a CT image (no Modality, no CT SOP class, no HU rescale)")


def _words(image_type: list[str]) -> set[str]:
    return {w for value in image_type for w in value.replace("_", " ").split()}


def _image_type_problems(headers: Sequence[Dataset], d: SeriesDecision) -> None:
    """Original acquisitions are accepted; derived series only as averaging/MPR reformats (ranked after
    every original series); projections, renderings, curved reformats and scouts never."""
    types = [_image_type(h) for h in headers]
    d.image_type = "\\".join(types[0]) if types else ""
    if not any(types):
        d.flags.append("ImageType missing: assumed to be original axial images")
        return
    refused = sorted(set().union(*(_words(t) for t in types)) & REFUSED_IMAGE_TYPE_WORDS)
    if SCOUT_IMAGE_TYPE_WORDS.intersection(refused):
        d.problems.append("localizer (scout) image, not a cross-sectional slice")
        return
    if refused:
        example = next(t for t in types if _words(t) & REFUSED_IMAGE_TYPE_WORDS)
        d.problems.append(
            f"projection or rendering (ImageType {chr(92).join(example)}: {', '.join(refused)}): "
            "MIP, MinIP, volume/surface renderings, projections and curved reformats are never analysed"
        )
        return
    derived = [t for t in types if (t and t[0] == "DERIVED") or (len(t) > 1 and t[1] == "SECONDARY")]
    if not derived:
        if not all(t and t[0] == "ORIGINAL" for t in types):
            d.problems.append("ImageType is not ORIGINAL for every image")
        return
    if all(_words(t) & REFORMAT_IMAGE_TYPE_WORDS for t in derived):
        d.kind = SeriesKind.REFORMAT
        d.flags.append(f"derived reformat (ImageType {chr(92).join(derived[0])}): analysed only when no original "
                       "axial series of the study is usable")
        return
    d.problems.append(
        f"derived image (ImageType {chr(92).join(derived[0])}): a post-processed copy that is neither the original "
        "acquisition nor an averaging/MPR reformat"
    )


def _orientation_problems(headers: Sequence[Dataset], d: SeriesDecision) -> bool:
    """Set d.orientation; return True when the orientation is usable (axial and consistent)."""
    orients = [orientation_of(h) for h in headers]
    if any(o is None for o in orients):
        d.orientation = "unknown"
        d.problems.append("no ImageOrientationPatient: the slice orientation is unknown")
        return False
    labels = {classify_orientation(o)[0] for o in orients}
    consistent = all(orientations_agree(o, orients[0]) for o in orients[1:])
    if len(labels) > 1 or not consistent:
        d.orientation = "mixed"
        d.problems.append(f"mixed slice orientations within the series ({', '.join(sorted(labels))})")
        return False
    label, tilt = classify_orientation(orients[0])
    d.orientation = label
    if label != "axial":
        kind = "reformat" if label in ("coronal", "sagittal") else "slices"
        d.problems.append(
            f"{label} {kind} (slice normal {tilt:.0f} degrees from the head-foot axis): only axial slices are analysed"
        )
        return False
    if tilt > 1.0:
        d.flags.append(f"axial slices tilted {tilt:.1f} degrees from the head-foot axis")
    return True


def _body_part_problems(headers: Sequence[Dataset], d: SeriesDecision) -> None:
    parts = {str(h.get("BodyPartExamined", "") or "").strip().upper() for h in headers} - {""}
    d.body_part = "/".join(sorted(parts))
    if not parts:
        d.flags.append("BodyPartExamined absent: lung presence is checked on the image")
        return
    compact = {p.replace(" ", "").replace("-", "") for p in parts}
    if compact & CHEST_BODY_PARTS or any("CHEST" in p or "THORA" in p or "LUNG" in p for p in compact):
        return
    if compact <= NON_CHEST_BODY_PARTS:
        d.problems.append(f"body part examined is {d.body_part}, not the chest")
        return
    d.flags.append(f"BodyPartExamined {d.body_part} does not say whether the chest is included: "
                   f"lung presence is checked on the image")


def _float_or_none(v: Any) -> float | None:
    try:
        return float(v) if v not in (None, "") else None
    except (TypeError, ValueError):
        return None


def evaluate_series(headers: Sequence[Dataset], *, min_slices: int = 1, series_uid: str | None = None) -> SeriesDecision:
    """Apply the header rules to the instances of one series.

    Rules: CT (Modality, else the CT SOP class or a HU rescale), not Enhanced/multi-frame CT, ImageType
    ORIGINAL (no DERIVED/SECONDARY, no LOCALIZER/SCOUT), axial (normal within ``AXIAL_MAX_DEG`` of the
    patient z axis), one orientation, pixel spacing and size for all slices, regular spacing along the
    normal without duplicates or gaps, at least ``min_slices`` slices, BodyPartExamined not a non-chest
    region. Every failing rule is listed in ``problems``; ``reason`` joins them.
    """
    headers = list(headers)
    first = headers[0] if headers else Dataset()
    d = SeriesDecision(
        series_uid=series_uid if series_uid is not None else _series_key(first),
        accepted=False, reason="", n_instances=len(headers),
        description=" ".join(x for x in (str(first.get("SeriesNumber", "") or ""),
                                         str(first.get("SeriesDescription", "") or "")) if x).strip(),
        slice_thickness=_float_or_none(first.get("SliceThickness")),
    )
    d.headers = headers
    if not headers:
        d.reject("no instances")
        return d

    _modality_problems(headers, d)
    axial = _orientation_problems(headers, d)
    _image_type_problems(headers, d)
    _body_part_problems(headers, d)

    if axial:
        try:
            geo = series_geometry(headers)
            d.slice_spacing = geo.slice_spacing if len(headers) > 1 else None
            d.flags.extend(geo.notes)
        except VolumeError as exc:
            if not any("multi-frame" in p for p in d.problems):
                d.problems.append(str(exc))
    if len(headers) < min_slices:
        d.problems.append(f"only {len(headers)} slice(s); at least {min_slices} are needed for volumetric analysis")
    elif len(headers) == 1:
        d.flags.append("single slice: analysed in 2D only (partial coverage, no volumetric score)")
    if not str(first.get("SOPInstanceUID", "") or "").strip():
        d.flags.append("SOPInstanceUID missing: results cannot reference the source images")
    if d.series_uid.startswith("no-series-uid:"):
        d.flags.append("SeriesInstanceUID missing: instances grouped by frame of reference, number and description")

    if d.problems:
        d.reason = "; ".join(d.problems)
    else:
        d.accepted = True
        d.reason = "acceptable: " + _summary(d)
    return d


def _summary(d: SeriesDecision) -> str:
    kind = "original" if d.kind is SeriesKind.ORIGINAL else f"derived reformat ({d.image_type})"
    s = f"axial {kind} CT, {d.n_instances} slice{'s' if d.n_instances != 1 else ''}"
    if d.slice_thickness:
        s += f", {d.slice_thickness:g} mm thick"
    if d.slice_spacing:
        s += f", every {d.slice_spacing:g} mm"
    return s


# ------------------------------------------------------------------------------------------- choice


def _thickness(d: SeriesDecision) -> float:
    return d.slice_thickness or d.slice_spacing or float("inf")


def _rank_key(d: SeriesDecision) -> tuple:
    if d.kind is SeriesKind.ORIGINAL:  # the acquisition: most slices, then thinnest
        return (0, -d.n_instances, _thickness(d), d.series_uid)
    return (1, _thickness(d), -d.n_instances, d.series_uid)  # reformats: thinnest, then most slices


def rank_candidates(decisions: Iterable[SeriesDecision]) -> list[SeriesDecision]:
    """Accepted series, best first: original acquisitions (most slices, then thinnest slices), then derived
    axial reformats (thinnest, then most slices); series UID last (deterministic)."""
    return sorted((d for d in decisions if d.accepted), key=_rank_key)


def _why_first(chosen: SeriesDecision, nxt: SeriesDecision) -> str:
    if chosen.kind is SeriesKind.ORIGINAL and nxt.kind is not SeriesKind.ORIGINAL:
        return "an original acquisition, ranked before derived reformats"
    if chosen.kind is not SeriesKind.ORIGINAL:
        if _thickness(chosen) < _thickness(nxt):
            return f"thinnest reformat ({_thickness(chosen):g} vs {_thickness(nxt):g} mm)"
        if chosen.n_instances > nxt.n_instances:
            return f"as thin as the next best and more slices ({chosen.n_instances} vs {nxt.n_instances})"
    elif chosen.n_instances > nxt.n_instances:
        return f"most slices ({chosen.n_instances} vs {nxt.n_instances} in the next best)"
    elif _thickness(chosen) < _thickness(nxt):
        return (f"as many slices as the next best ({chosen.n_instances}) and thinner slices "
                f"({_thickness(chosen):g} vs {_thickness(nxt):g} mm)")
    return "equal to the next best in slice count and thickness; taken first by series UID"


def _why_not(d: SeriesDecision, chosen: SeriesDecision) -> str:
    than = f"than series {chosen.series_uid}"
    if d.kind is not SeriesKind.ORIGINAL and chosen.kind is SeriesKind.ORIGINAL:
        return f"a derived reformat, and series {chosen.series_uid} is an original acquisition"
    if d.kind is SeriesKind.ORIGINAL and d.n_instances < chosen.n_instances:
        return f"fewer slices ({d.n_instances} vs {chosen.n_instances}) {than}"
    if _thickness(d) > _thickness(chosen):
        return f"thicker slices ({_thickness(d):g} vs {_thickness(chosen):g} mm) {than}"
    if d.n_instances < chosen.n_instances:
        return f"fewer slices ({d.n_instances} vs {chosen.n_instances}) {than}"
    return f"series {chosen.series_uid}, an equivalent series, was taken first"


def mark_chosen(chosen: SeriesDecision, ranked: Sequence[SeriesDecision]) -> None:
    """Flag ``chosen`` and explain, for it and for every other acceptable series, why it was (not) chosen."""
    others = [d for d in ranked if d is not chosen and d.accepted]
    for d in ranked:
        d.chosen = False
    chosen.chosen = True
    fallback = ""
    if chosen.kind is not SeriesKind.ORIGINAL:
        fallback = "no original axial series is usable, so a derived axial reformat is analysed; "
    if not others:
        chosen.reason = f"chosen: {fallback}the only acceptable series ({_summary(chosen)})"
    else:
        chosen.reason = (f"chosen among {len(others) + 1} acceptable series: {fallback}"
                         f"{_why_first(chosen, others[0])} ({_summary(chosen)})")
    for d in others:
        d.reason = f"acceptable but not chosen: {_why_not(d, chosen)} ({_summary(d)})"


def select_series(items: Iterable[Any], *, min_slices: int = 1) -> tuple[SeriesDecision | None, list[SeriesDecision]]:
    """Group ``items`` into series, evaluate each, and choose the best acceptable one.

    Returns (chosen decision or None, all decisions). Unreadable files get a decision of their own with an
    empty series UID. The pixel-based lung check comes later (:func:`check_lung_in_view`).
    """
    unreadable: list[tuple[str, str]] = []
    groups = group_series(items, unreadable)
    decisions = [evaluate_series(h, min_slices=min_slices, series_uid=uid) for uid, h in groups.items()]
    for path, err in unreadable:
        decisions.append(SeriesDecision(series_uid="", accepted=False, n_instances=1, description=path,
                                        reason=f"not a readable DICOM file ({err})",
                                        problems=[f"not a readable DICOM file ({err})"]))
    ranked = rank_candidates(decisions)
    if ranked:
        mark_chosen(ranked[0], ranked)
    return (ranked[0] if ranked else None), decisions


# ------------------------------------------------------------------------------------------- one patient


def patient_conflict(decisions: list[SeriesDecision]) -> str | None:
    """The reason not to analyse a study whose instances name more than one patient, else None.

    Among all instances of all series: more than one non-empty PatientID, PatientName (case and spacing
    ignored) or PatientBirthDate is a conflict (a misfiled series, a merge at the sender, or a reused
    StudyInstanceUID); a result built from such a study could be filed under the wrong patient. Empty
    values are not a conflict (anonymised series). The reason names no identifier: it is logged.
    """
    seen: dict[str, set[str]] = {"PatientID": set(), "PatientName": set(), "PatientBirthDate": set()}
    for decision in decisions:
        for header in getattr(decision, "headers", []):
            for keyword, values in seen.items():
                value = " ".join(str(header.get(keyword, "") or "").upper().split())
                if value:
                    values.add(value)
    differing = [keyword for keyword, values in seen.items() if len(values) > 1]
    if not differing:
        return None
    return (f"instances of more than one patient under one StudyInstanceUID ({', '.join(differing)} differ): "
            "not analysed, so that no result is filed under the wrong patient; correct the study at the "
            "sender and send it again")


# ------------------------------------------------------------------------------------------- pixel rule


def check_lung_in_view(volume: Volume, lungs: LungMasks) -> str | None:
    """Pixel rule after segmentation: None when lung is in view, else the reason to skip the series.

    Lung is "in view" when, on its best slice, the segmented lung covers at least ``LUNG_MIN_AREA_CM2``
    and at least ``LUNG_MIN_BODY_FRACTION`` of the body cross-section. Bowel gas of an abdomen slice is
    kept out of the lung mask by :func:`node.pipeline.lungs.segment_lungs` (pure-gas HU, size rules), and
    what remains is small relative to the body, so abdomen slices are skipped. A series whose field of view
    cuts the lungs (:attr:`~node.pipeline.types.LungMasks.fov_cut_cm2`) is skipped with that reason.
    """
    if lungs.fov_cut_cm2 > 0:
        # A lung that reaches the image edge is lost on that slice, and the edge is where COVID-19 opacities
        # are most common (subpleural): no score of such a series would mean what it says.
        return (f"lungs cut by the reconstructed field of view (up to {lungs.fov_cut_cm2:.1f} cm2 of lung on one "
                "slice reaches the image edge): not analysed; send a series reconstructed with a full field of view")
    return _no_lung_reason(volume, lungs)


def _no_lung_reason(volume: Volume, lungs: LungMasks) -> str | None:
    lung = lungs.lungs
    pixel_cm2 = volume.pixel_spacing[0] * volume.pixel_spacing[1] / 100.0
    per_slice = lung.reshape(lung.shape[0], -1).sum(axis=1)
    if per_slice.max(initial=0) == 0:
        return NO_LUNG_REASON
    k = int(np.argmax(per_slice))
    area = per_slice[k] * pixel_cm2
    body = lungs.body[k].sum() if lungs.body is not None else lung[k].size
    fraction = per_slice[k] / max(int(body), 1)
    if area < LUNG_MIN_AREA_CM2 or fraction < LUNG_MIN_BODY_FRACTION:
        return f"{NO_LUNG_REASON}: at most {area:.1f} cm2 of lung on a slice ({100 * fraction:.1f}% of the body section)"
    return None
