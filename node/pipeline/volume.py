"""Assemble one CT series into a :class:`~node.pipeline.types.Volume` in Hounsfield units.

The slices are sorted along the slice normal and stacked WITHOUT any resampling, so every voxel of the
volume (and of every mask computed on it) maps back to exactly one pixel of one source slice.
"""
from __future__ import annotations

import logging
import math
import struct
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.tag import Tag
from pydicom.uid import JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes, RLELossless

from node.dicom.headers import decoded_size, decoded_size_problem, int_of, numbers_of

from .types import Volume

log = logging.getLogger(__name__)

#: HU values below this are padding / outside the reconstruction circle (air is -1000 HU).
HU_FLOOR = -1024.0

#: Pixel data elements dropped from the headers kept in ``Volume.datasets``.
_PIXEL_TAGS = (Tag(0x7FE0, 0x0010), Tag(0x7FE0, 0x0008), Tag(0x7FE0, 0x0009))

#: Relative tolerance on slice steps (fraction of the nominal spacing) and absolute floor in mm.
SPACING_REL_TOL = 0.10
SPACING_ABS_TOL_MM = 0.05
#: A step this many times the nominal spacing (or more) is reported as missing slices.
GAP_FACTOR = 1.5
#: Angle (degrees) between the slice stacking direction and the normal above which the series is sheared.
TILT_NOTE_DEG = 0.5
TILT_MAX_DEG = 30.0
#: Angle (degrees) between two slice orientations still considered identical.
ORIENTATION_TOL_DEG = 0.5

Source = str | PathLike | Dataset

#: The marker that ends every JPEG, JPEG-LS (EOI) and JPEG 2000 (EOC) frame.
END_MARKER = b"\xff\xd9"
_END_MARKER_SYNTAXES = frozenset([*JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes, *JPEG2000TransferSyntaxes])
#: RLE Lossless frame header (PS3.5 G.5): the number of segments, then 15 segment offsets.
_RLE_HEADER = struct.Struct("<16I")
_RLE_HEADER_BYTES = _RLE_HEADER.size
#: Decoder warnings that mean the pixel data are corrupt (they fail the slice); others are passed on.
CORRUPTION_WARNINGS = ("non-conformant padding", "truncat", "corrupt", "premature", "end of the data",
                       "incomplete")
_MB = 1024**2


@dataclass(frozen=True)
class DecodeLimits:
    """Largest decoded pixel data accepted (MB), per instance and per series; checked from the headers
    (Rows x Columns x NumberOfFrames x SamplesPerPixel x bytes per sample) BEFORE anything is decoded,
    whatever the transfer syntax: a few kB of RLE can declare gigabytes. Defaults: those of
    ``[processing] max_decoded_instance_mb`` and ``max_decoded_mb`` (node.config)."""

    instance_mb: float = 64.0
    series_mb: float = 1024.0


class VolumeError(ValueError):
    """The instances of a series cannot be assembled into a consistent volume."""


# --------------------------------------------------------------------------------------------- helpers


def read_header(item: Source) -> Dataset:
    """Header of ``item`` without pixel data; a path is read with ``stop_before_pixels=True``."""
    if isinstance(item, Dataset):
        return item
    ds = pydicom.dcmread(item, stop_before_pixels=True)
    return ds


def strip_pixels(ds: Dataset) -> Dataset:
    """A shallow copy of ``ds`` without pixel data (elements are shared, not copied)."""
    out = Dataset()
    for elem in ds:
        if elem.tag not in _PIXEL_TAGS:
            out.add(elem)
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    filename = getattr(ds, "filename", None)
    if filename:
        out.filename = filename
    return out


def orientation_of(ds: Dataset) -> np.ndarray | None:
    """ImageOrientationPatient as a (6,) array with both cosines normalised, or None when absent/invalid."""
    v = numbers_of(ds, "ImageOrientationPatient", 6)
    if v is None:
        return None
    row, col = v[:3], v[3:]
    nr, nc = np.linalg.norm(row), np.linalg.norm(col)
    if nr < 1e-6 or nc < 1e-6 or np.linalg.norm(np.cross(row / nr, col / nc)) < 1e-3:
        return None  # missing or degenerate (parallel cosines)
    return np.concatenate([row / nr, col / nc])


def position_of(ds: Dataset) -> np.ndarray | None:
    return numbers_of(ds, "ImagePositionPatient", 3)


def pixel_spacing_of(ds: Dataset) -> tuple[float, float] | None:
    ps = numbers_of(ds, "PixelSpacing", 2)
    if ps is None or np.any(ps <= 0):
        return None
    return float(ps[0]), float(ps[1])


def normal_of(orientation: np.ndarray) -> np.ndarray:
    n = np.cross(orientation[:3], orientation[3:])
    return n / np.linalg.norm(n)


def angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    """Angle between two vectors in degrees (0..180)."""
    c = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


def orientations_agree(a: np.ndarray, b: np.ndarray, tol_deg: float = ORIENTATION_TOL_DEG) -> bool:
    return angle_deg(a[:3], b[:3]) <= tol_deg and angle_deg(a[3:], b[3:]) <= tol_deg


def check_slice_steps(offsets: np.ndarray) -> float:
    """Check sorted slice offsets along the normal and return the nominal spacing in mm.

    Raises :class:`VolumeError` for duplicate positions, missing slices (gaps) or irregular spacing.
    ``offsets`` must be sorted ascending; a single offset gives 0.0.
    """
    if offsets.size < 2:
        return 0.0
    steps = np.diff(offsets)
    nominal = float(np.median(steps))
    dup = np.flatnonzero(steps < max(0.01, 0.01 * nominal))
    if dup.size:
        i = int(dup[0])
        raise VolumeError(
            f"{dup.size} duplicate slice position(s): slices {i} and {i + 1} are both at "
            f"{offsets[i]:.2f} mm along the slice normal (duplicated instances or two series mixed?)"
        )
    if nominal <= 0:
        raise VolumeError("cannot determine the slice spacing")
    gaps = np.flatnonzero(steps >= GAP_FACTOR * nominal)
    if gaps.size:
        i = int(gaps[0])
        raise VolumeError(
            f"gap in the series: {steps[i]:.2f} mm between slices {i} and {i + 1} (at "
            f"{offsets[i]:.2f} and {offsets[i + 1]:.2f} mm) where {nominal:.2f} mm is expected; "
            f"about {round(steps[i] / nominal) - 1} slice(s) missing ({gaps.size} gap(s) in total)"
        )
    tol = max(SPACING_ABS_TOL_MM, SPACING_REL_TOL * nominal)
    bad = np.flatnonzero(np.abs(steps - nominal) > tol)
    if bad.size:
        i = int(bad[0])
        raise VolumeError(
            f"irregular slice spacing: {steps[i]:.2f} mm between slices {i} and {i + 1} where "
            f"{nominal:.2f} mm is expected (tolerance {tol:.2f} mm)"
        )
    return nominal


def slice_tilt_deg(positions: np.ndarray, normal: np.ndarray) -> float:
    """Angle between the stacking direction (first to last position) and the slice normal (gantry tilt)."""
    if len(positions) < 2:
        return 0.0
    d = positions[-1] - positions[0]
    if np.linalg.norm(d) < 1e-6:
        return 0.0
    a = angle_deg(d, normal)
    return min(a, 180.0 - a)


def is_multiframe(ds: Dataset) -> bool:
    try:
        return int(ds.get("NumberOfFrames", 1) or 1) > 1
    except (TypeError, ValueError):
        return False


def rescale_of(ds: Dataset) -> tuple[float, float]:
    """(slope, intercept); absent values mean stored values are already HU (slope 1, intercept 0).

    Raises :class:`VolumeError` when either is not a single finite number (e.g. multi-valued): HU could
    not be computed."""
    values = []
    for keyword, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
        value = ds.get(keyword)
        if value is None or value == "":
            values.append(default)
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise VolumeError(f"{keyword} {value!r} is not a single number: HU cannot be computed") from None
        if not math.isfinite(number):
            raise VolumeError(f"{keyword} {value!r} is not finite: HU cannot be computed")
        values.append(number)
    return values[0], values[1]


# --------------------------------------------------------------------------------------------- decoding


def decoded_bytes(ds: Dataset) -> int:
    """Size of the decoded pixel data of ``ds`` from its header alone (:func:`node.dicom.headers.decoded_size`);
    VolumeError when the header does not give it."""
    size = decoded_size(ds)
    if size is None:
        raise VolumeError(decoded_size_problem(ds) or "the decoded size is unknown")
    return size


def check_decoded_size(headers: Sequence[Dataset], names: Sequence[str], limits: DecodeLimits) -> int:
    """Refuse a series whose decoded pixel data would exceed ``limits`` (per instance or in all), before
    anything is decoded; returns the total in bytes. Raises :class:`VolumeError` naming the limit."""
    total = 0
    for ds, name in zip(headers, names):
        size = decoded_bytes(ds)
        if size > limits.instance_mb * _MB:
            raise VolumeError(f"{name}: its header declares {size / _MB:.0f} MB of decoded pixel data, above "
                              f"processing.max_decoded_instance_mb = {limits.instance_mb:g} MB (not decoded)")
        total += size
    if total > limits.series_mb * _MB:
        raise VolumeError(f"the headers of the series declare {total / _MB:.0f} MB of decoded pixel data, above "
                          f"processing.max_decoded_mb = {limits.series_mb:g} MB (not decoded)")
    return total


def _rle_frame_problem(frame: bytes, ds: Dataset) -> str | None:
    """What is wrong with the header of an RLE Lossless frame (PS3.5 Annex G), or None."""
    if len(frame) <= _RLE_HEADER_BYTES:
        return f"RLE frame of {len(frame)} bytes has no segment data"
    count, *offsets = _RLE_HEADER.unpack_from(frame)
    problem = decoded_size_problem(ds)
    if problem is not None:
        return problem
    expected = int_of(ds, "SamplesPerPixel", 1) * ((int_of(ds, "BitsAllocated") + 7) // 8)  # type: ignore[operator]
    if count != expected:
        return f"RLE header declares {count} segments where the image needs {expected}"
    used = offsets[:count]
    if used[0] != _RLE_HEADER_BYTES or any(b <= a for a, b in zip(used, used[1:])) or used[-1] >= len(frame):
        return f"RLE segment offsets {used} are inconsistent with a frame of {len(frame)} bytes"
    return None


def frame_problem(frame: bytes, transfer_syntax: str, ds: Dataset) -> str | None:
    """Why the encapsulated ``frame`` cannot be complete, or None: a JPEG, JPEG-LS or JPEG 2000 frame must end
    with the FFD9 marker (EOI / EOC; the fragment's trailing padding ignored), an RLE frame needs a consistent
    header. Corruption inside a frame that keeps its structure is left to the decoder."""
    if transfer_syntax in _END_MARKER_SYNTAXES:
        if not frame.rstrip(b"\x00").endswith(END_MARKER):
            return "the codestream does not end with the FFD9 end marker: truncated or corrupt"
        return None
    if transfer_syntax == RLELossless:
        return _rle_frame_problem(frame, ds)
    return None


_passed_on: dict[Any, Any] = {}  # warnings.warn_explicit's registry: each decoder warning is shown once


def decode_pixels(ds: Dataset, name: str) -> np.ndarray:
    """The pixel array of ``ds``, verified: encapsulated frames must be complete (:func:`frame_problem`), the
    decoder must neither fail (an exception, or a panic of a decoder written in Rust) nor warn about corrupt
    data (:data:`CORRUPTION_WARNINGS`); other decoder warnings are passed on. Raises :class:`VolumeError`
    naming ``name``; a MemoryError propagates (it is the worker's memory cap, not corrupt data)."""
    transfer_syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    if transfer_syntax in _END_MARKER_SYNTAXES or transfer_syntax == RLELossless:
        frames = int(ds.NumberOfFrames) if is_multiframe(ds) else 1
        try:
            problems = [frame_problem(frame, transfer_syntax, ds)
                        for frame in generate_frames(ds.PixelData, number_of_frames=frames)]
        except (ValueError, KeyError, TypeError) as exc:
            raise VolumeError(f"{name}: encapsulated pixel data cannot be read ({exc})") from exc
        for index, problem in enumerate(problems):
            if problem:
                raise VolumeError(f"{name}: pixel data corrupt (frame {index + 1}): {problem}")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            arr = ds.pixel_array
    except MemoryError:
        raise
    except Exception as exc:  # no decoder, or the decoder failed on corrupt data
        raise VolumeError(f"{name}: pixel data cannot be decoded ({exc})") from exc
    except BaseException as exc:  # pyo3's PanicException (pylibjpeg-rle on corrupt data) is a BaseException
        if type(exc).__name__ != "PanicException":
            raise
        raise VolumeError(f"{name}: pixel data cannot be decoded (the decoder failed: {exc})") from exc
    for w in caught:
        text = str(w.message)
        if any(marker in text.lower() for marker in CORRUPTION_WARNINGS):
            raise VolumeError(f"{name}: pixel data corrupt: the decoder reports: {text}")
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, registry=_passed_on)
    return arr


# --------------------------------------------------------------------------------------------- assembly


def _load_full(item: Source) -> Dataset:
    """The dataset of ``item`` with its pixel data (re-read from disk when only a header is at hand)."""
    if isinstance(item, Dataset):
        if "PixelData" in item or "FloatPixelData" in item or "DoubleFloatPixelData" in item:
            return item
        filename = getattr(item, "filename", None)
        if not filename:
            raise VolumeError(f"instance {item.get('SOPInstanceUID', '?')} has no pixel data")
        return pydicom.dcmread(filename)
    return pydicom.dcmread(item)


def _describe(item: Source) -> str:
    if isinstance(item, Dataset):
        return str(getattr(item, "filename", None) or item.get("SOPInstanceUID", "dataset"))
    return str(item)


@dataclass
class SeriesGeometry:
    """Geometry of a series after sorting along the slice normal."""

    order: np.ndarray                   # indices into the input, in slice order
    positions: np.ndarray               # (n, 3) sorted ImagePositionPatient
    orientation: np.ndarray             # (6,)
    pixel_spacing: tuple[float, float]
    size: tuple[int, int]               # (rows, columns)
    slice_spacing: float                # 0.0 for one slice
    tilt_deg: float
    notes: list[str] = field(default_factory=list)


def series_geometry(headers: Sequence[Dataset], names: Sequence[str] | None = None) -> SeriesGeometry:
    """Check that ``headers`` form one consistent stack and sort them along the slice normal.

    Raises :class:`VolumeError` for multi-frame images, missing geometry, differing orientations, pixel
    spacings or sizes, duplicate positions, gaps, irregular spacing, or a tilt above ``TILT_MAX_DEG``.
    """
    if not headers:
        raise VolumeError("no instances")
    names = list(names) if names is not None else [_describe(h) for h in headers]
    if any(is_multiframe(ds) for ds in headers):
        raise VolumeError("Enhanced CT (multi-frame) is not supported yet")
    orientation = orientation_of(headers[0])
    spacing = pixel_spacing_of(headers[0])
    size = (int(headers[0].get("Rows", 0) or 0), int(headers[0].get("Columns", 0) or 0))
    if orientation is None:
        raise VolumeError(f"{names[0]}: no valid ImageOrientationPatient, the slice geometry is unknown")
    if spacing is None:
        raise VolumeError(f"{names[0]}: no PixelSpacing, distances and volumes cannot be measured")
    positions = np.empty((len(headers), 3), dtype=np.float64)
    for i, (ds, name) in enumerate(zip(headers, names)):
        o, p, s = orientation_of(ds), position_of(ds), pixel_spacing_of(ds)
        if p is None:
            raise VolumeError(f"{name}: no ImagePositionPatient, the slice cannot be placed")
        if o is None or not orientations_agree(o, orientation):
            raise VolumeError(f"{name}: slice orientation differs from the rest of the series")
        if s is None or not np.allclose(s, spacing, rtol=1e-3, atol=1e-4):
            raise VolumeError(f"{name}: pixel spacing {s} differs from {spacing} in the rest of the series")
        sz = (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
        if sz != size:
            raise VolumeError(f"{name}: image size {sz[0]}x{sz[1]} differs from {size[0]}x{size[1]} "
                              f"in the rest of the series")
        positions[i] = p

    normal = normal_of(orientation)
    offsets = positions @ normal
    order = np.argsort(offsets, kind="stable")
    slice_spacing = check_slice_steps(offsets[order])
    positions = positions[order]
    tilt = slice_tilt_deg(positions, normal)
    notes: list[str] = []
    if tilt > TILT_MAX_DEG:
        raise VolumeError(f"gantry tilt of {tilt:.1f} degrees is above the supported {TILT_MAX_DEG:.0f} degrees")
    if tilt > TILT_NOTE_DEG:
        notes.append(
            f"gantry tilt {tilt:.1f} degrees: the voxel grid is sheared and kept as acquired (no resampling); "
            f"the slice spacing is measured along the normal"
        )
    return SeriesGeometry(order=order, positions=positions, orientation=orientation, pixel_spacing=spacing,
                          size=size, slice_spacing=slice_spacing, tilt_deg=tilt, notes=notes)


def assemble_volume(items: Iterable[Source], limits: DecodeLimits = DecodeLimits()) -> Volume:
    """Decode, rescale to HU and stack the instances of ONE series, sorted along the slice normal.

    ``items`` are file paths or pydicom datasets (full, or headers read with ``stop_before_pixels`` that
    still carry their ``filename``). Pixel data are decoded one slice at a time straight into the output
    array, so memory stays at about one float32 copy of the series. Per-slice RescaleSlope/Intercept are
    honoured; values below -1024 HU (padding outside the reconstruction circle) are raised to -1024.

    Raises :class:`VolumeError` with an explanation for pixel data above ``limits`` (checked from the headers
    before anything is decoded), pixel data that are incomplete, corrupt or do not decode to the declared
    size (:func:`decode_pixels`), and for inconsistent input: mixed orientations, sizes or pixel spacings, missing geometry, duplicate slice positions, missing slices, irregular spacing,
    multi-frame images, or a gantry tilt above ``TILT_MAX_DEG``. A tilt below it is accepted: the volume
    keeps the real (sheared) positions, which the voxel-to-patient mapping of :class:`Volume` honours, and
    the spacing is measured along the normal, so volumes stay correct; a note says so.
    """
    items = list(items)
    if not items:
        raise VolumeError("no instances to assemble")
    names = [_describe(it) for it in items]
    headers = [read_header(it) for it in items]
    geo = series_geometry(headers, names)
    check_decoded_size(headers, names, limits)
    rows, cols = geo.size
    order = geo.order

    hu = np.empty((len(items), rows, cols), dtype=np.float32)
    kept: list[Dataset] = []
    for k, idx in enumerate(order):
        ds = _load_full(items[idx])
        arr = decode_pixels(ds, names[idx])
        if arr.shape != (rows, cols):
            raise VolumeError(f"{names[idx]}: decoded pixel array has shape {arr.shape}, expected {(rows, cols)}")
        slope, intercept = rescale_of(ds)
        out = hu[k]
        np.multiply(arr, slope, out=out, casting="unsafe")
        out += intercept
        np.maximum(out, HU_FLOOR, out=out)
        kept.append(strip_pixels(ds))
        del arr, ds

    first = kept[0]
    volume = Volume(
        hu=hu,
        positions=geo.positions,
        orientation=geo.orientation,
        pixel_spacing=geo.pixel_spacing,
        slice_spacing=geo.slice_spacing,
        sop_instance_uids=[str(d.get("SOPInstanceUID", "") or "") for d in kept],
        series_instance_uid=str(first.get("SeriesInstanceUID", "") or ""),
        study_instance_uid=str(first.get("StudyInstanceUID", "") or ""),
        datasets=kept,
    )
    volume.notes.extend(geo.notes)
    for n in geo.notes:
        log.info("series %s: %s", volume.series_instance_uid, n)
    return volume


def voxel_to_patient(volume: Volume, k: np.ndarray | int, r: np.ndarray | float, c: np.ndarray | float) -> np.ndarray:
    """Patient coordinates (mm, LPS) of voxel indices; broadcasts over array inputs, result (..., 3)."""
    k = np.asarray(k)
    r = np.asarray(r, dtype=np.float64)[..., None]
    c = np.asarray(c, dtype=np.float64)[..., None]
    row_cos, col_cos = volume.orientation[:3], volume.orientation[3:]
    return (volume.positions[k] + c * volume.pixel_spacing[1] * row_cos
            + r * volume.pixel_spacing[0] * col_cos)


def as_paths(items: Iterable[Any]) -> list[Any]:
    """Expand directories into the files below them (sorted); keep files and datasets as they are."""
    out: list[Any] = []
    for it in items:
        if isinstance(it, (str, PathLike)) and Path(it).is_dir():
            out.extend(sorted(p for p in Path(it).rglob("*") if p.is_file()))
        else:
            out.append(it)
    return out
