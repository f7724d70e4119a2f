"""DICOM header helpers: reading numeric and code values that a sender may have malformed, SOP classes the
node knows, and the instance checks done at reception (before an instance is acknowledged).

No function here raises for a malformed header: a bad value reads as missing, or is a refusal reason.
"""
from __future__ import annotations

import re

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian)

from node.dicom.status import StoreStatus
from node.spool import is_valid_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_ENHANCED_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"
ENHANCED_CT_CLASSES = {ENHANCED_CT_STORAGE, LEGACY_ENHANCED_CT_STORAGE}
CT_CLASSES = {CT_IMAGE_STORAGE} | ENHANCED_CT_CLASSES
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"

#: Transfer syntaxes whose Pixel Data is stored uncompressed (its length is Rows x Columns x ... bytes).
UNDEFINED_LENGTH = 0xFFFFFFFF

NATIVE_SYNTAXES = {ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian}

Refusal = tuple[StoreStatus, str]

_CS_RE = re.compile(r"^[A-Z0-9_ ]{1,16}$")


def safe_code(value: object) -> str:
    """A code string (Modality...) for a log line or comment, or "invalid" when it is not a plain CS value:
    a sender could put anything in a refused element, including a patient's name."""
    text = str(value).strip()
    return text if _CS_RE.match(text) else "invalid"


def int_of(ds: Dataset, keyword: str, default: int | None = None) -> int | None:
    """An integer attribute; ``default`` when absent or empty, None when not a number."""
    value = ds.get(keyword, default)
    try:
        return int(value) if value is not None and value != "" else default
    except (TypeError, ValueError):
        return None


def numbers_of(ds: Dataset, keyword: str, n: int) -> np.ndarray | None:
    """A multi-valued numeric attribute as ``n`` finite floats, or None when absent or malformed
    (wrong multiplicity, a single value, text that is not a number): malformed headers are reported as
    missing geometry by the callers, never as a crash."""
    value = ds.get(keyword)
    if isinstance(value, (str, bytes)):  # unconverted text: iterating it would yield characters
        return None
    try:
        values = [float(x) for x in value]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    if len(values) != n or not np.all(np.isfinite(values)):
        return None
    return np.asarray(values, dtype=np.float64)


#: The header attributes that give the decoded size, with the standard's default where it has one.
DECODED_SIZE_ATTRIBUTES = (("Rows", None), ("Columns", None), ("NumberOfFrames", 1), ("SamplesPerPixel", 1),
                           ("BitsAllocated", None))


def decoded_size_problem(ds: Dataset) -> str | None:
    """Why the decoded size of ``ds`` cannot be computed from its header, or None."""
    for keyword, default in DECODED_SIZE_ATTRIBUTES:
        value = int_of(ds, keyword, default)
        if value is None:
            return f"{keyword} {ds.get(keyword)!r} is missing or not a number: the decoded size is unknown"
        if value < 1:
            return f"{keyword} {value} is not positive: the decoded size is unknown"
    return None


def decoded_size(ds: Dataset) -> int | None:
    """Bytes the Pixel Data takes once decoded (Rows x Columns x frames x samples x bytes per sample, with
    BitsAllocated rounded up to whole bytes as decoders return it), whatever the transfer syntax; None when
    a value is missing, not a number or not positive (:func:`decoded_size_problem` says which)."""
    if decoded_size_problem(ds) is not None:
        return None
    rows, cols, frames, samples, bits = (int_of(ds, k, d) for k, d in DECODED_SIZE_ATTRIBUTES)
    return rows * cols * frames * samples * ((bits + 7) // 8)  # type: ignore[operator]


def _pixel_data_problem(ds: Dataset, transfer_syntax: str, expected: int) -> Refusal | None:
    """Pixel Data cut short (a file truncated with its element length intact), of the wrong size for the
    image (uncompressed), or not a valid sequence of fragments (compressed)."""
    element = ds.get_item("PixelData")
    declared = getattr(element, "length", None)  # a raw element's declared length
    value = element.value
    present = len(value) if isinstance(value, (bytes, bytearray)) else None
    if present is not None and declared not in (None, UNDEFINED_LENGTH) and present < declared:
        return StoreStatus.CANNOT_UNDERSTAND, f"Pixel Data cut short ({present} of {declared} bytes)"
    if transfer_syntax in NATIVE_SYNTAXES:
        length = present if present is not None else declared
        if not length:
            return StoreStatus.CANNOT_UNDERSTAND, "Pixel Data is empty"
        if length != UNDEFINED_LENGTH and not expected <= length <= expected + 1:
            word = "shorter" if length < expected else "longer"
            return (StoreStatus.CANNOT_UNDERSTAND,
                    f"Pixel Data {word} than Rows x Columns ({length} vs {expected} bytes)")
        return None
    try:
        fragments = sum(1 for _ in generate_fragments(value))
    except Exception:
        fragments = 0
    if not fragments:
        return StoreStatus.CANNOT_UNDERSTAND, "compressed Pixel Data is not a valid fragment sequence"
    return None


def validate_instance(ds: Dataset, sop_class: str, transfer_syntax: str, *,
                      max_decoded: int | None = None) -> Refusal | None:
    """Instance-level checks done before an instance is stored: (status, reason) to refuse it, or None.
    ``max_decoded``: the largest decoded Pixel Data accepted, in bytes (any transfer syntax).

    Only what no series could ever use is refused here (cheap header checks; the listener stays fast).
    Geometry and series consistency (positions, orientation, spacing, tilt, duplicates) are judged later
    by series selection, where the job ends "skipped" or "failed" with the reason. Raises nothing for any
    header (a malformed value is a refusal, not an exception).
    """
    try:
        return _validate_instance(ds, sop_class, transfer_syntax, max_decoded)
    except Exception as exc:  # a value pydicom cannot convert: the instance is not understood
        return StoreStatus.CANNOT_UNDERSTAND, f"cannot read header values: {type(exc).__name__}"


def _identity_problem(ds: Dataset, sop_class: str, modality: str) -> Refusal | None:
    """Checks every stored object passes (CT and reference SEG alike): SOP class, Modality, UIDs usable
    for spool paths, Pixel Data present."""
    if str(ds.get("SOPClassUID", "")) != sop_class:
        return StoreStatus.DOES_NOT_MATCH_SOP_CLASS, "SOPClassUID does not match the context"
    found = str(ds.get("Modality", ""))
    if found != modality:
        return (StoreStatus.DOES_NOT_MATCH_SOP_CLASS,
                f"Modality {safe_code(found) if found else 'missing'}, expected {modality}")
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if not is_valid_uid(str(ds.get(key, ""))):
            return StoreStatus.CANNOT_UNDERSTAND, f"invalid {key}"
    if "PixelData" not in ds:
        return StoreStatus.DOES_NOT_MATCH_SOP_CLASS, "no Pixel Data"
    return None


def _too_big(ds: Dataset, max_decoded: int | None) -> Refusal | None:
    size = decoded_size(ds)
    if max_decoded is not None and size is not None and size > max_decoded:
        return StoreStatus.OUT_OF_RESOURCES, f"decoded Pixel Data {size / 1024**2:.0f} MB above node.max_instance_mb"
    return None


def _validate_instance(ds: Dataset, sop_class: str, transfer_syntax: str, max_decoded: int | None) -> Refusal | None:
    if sop_class == ENHANCED_CT_STORAGE:
        return StoreStatus.SOP_CLASS_NOT_SUPPORTED, "Enhanced CT not supported: send CT Image Storage"
    problem = _identity_problem(ds, sop_class, "CT")
    if problem is not None:
        return problem
    samples = int_of(ds, "SamplesPerPixel", 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return StoreStatus.DOES_NOT_MATCH_SOP_CLASS, (f"not a greyscale image (SamplesPerPixel {samples}, "
                                                      f"{safe_code(photometric)}); CT must be MONOCHROME")
    rows, cols, bits = int_of(ds, "Rows"), int_of(ds, "Columns"), int_of(ds, "BitsAllocated")
    if not rows or not cols or rows < 0 or cols < 0:
        return StoreStatus.CANNOT_UNDERSTAND, "Rows/Columns missing, zero or malformed"
    if bits not in (8, 16, 32):
        return StoreStatus.CANNOT_UNDERSTAND, f"BitsAllocated {bits} not supported (8, 16 or 32)"
    for keyword, count in (("ImagePositionPatient", 3), ("ImageOrientationPatient", 6), ("PixelSpacing", 2)):
        # Absent or degenerate geometry is a series-level question (the job is skipped with the reason);
        # a present element that is not `count` finite numbers is a malformed instance.
        if keyword in ds and ds[keyword].value not in (None, "") and numbers_of(ds, keyword, count) is None:
            return StoreStatus.CANNOT_UNDERSTAND, f"{keyword} is not {count} numbers"
    frames = int_of(ds, "NumberOfFrames", 1)
    if frames is None or frames < 1:
        return StoreStatus.CANNOT_UNDERSTAND, "NumberOfFrames is not a positive number"
    # the data's own consistency first: uncompressed Pixel Data of the declared size is no larger than the
    # instance, already bounded; compressed data can decode to far more than was sent
    return _pixel_data_problem(ds, transfer_syntax, rows * cols * frames * bits // 8) or _too_big(ds, max_decoded)


def referenced_series_uid(ds: Dataset) -> str:
    """The source series a SEG segments: the first valid SeriesInstanceUID of its ReferencedSeriesSequence."""
    for item in ds.get("ReferencedSeriesSequence", None) or []:
        uid = str(item.get("SeriesInstanceUID", ""))
        if is_valid_uid(uid):
            return uid
    return ""


def validate_reference(ds: Dataset, sop_class: str, *, max_decoded: int | None = None) -> Refusal | None:
    """Checks for a reference Segmentation before it is stored: (status, reason) to refuse it, or None."""
    try:
        problem = _identity_problem(ds, sop_class, "SEG") or _too_big(ds, max_decoded)
        if problem is not None:
            return problem
        if not referenced_series_uid(ds):
            return StoreStatus.CANNOT_UNDERSTAND, "SEG without ReferencedSeriesSequence"
    except Exception as exc:
        return StoreStatus.CANNOT_UNDERSTAND, f"cannot read header values: {type(exc).__name__}"
    return None
