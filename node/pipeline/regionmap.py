"""External lobe label maps: a DICOM SEG of the lung lobes for the analysed series replaces the geometric zones.

A lobe SEG (from a lobe segmentation tool, e.g. TotalSegmentator or lungmask exported with dcmqi or highdicom,
or drawn by hand) is recognised by its segments (:func:`node.pipeline.segments.classify_lobe`), codes first
(DICOM CID 6170 "Lobe of Lung": SCT 45653009 Upper lobe of lung and SCT 90572001 Lower lobe of lung with a
Right/Left laterality modifier, SCT 72481006 Middle lobe of right lung), then the label ("right upper lobe",
"RUL", "lung_upper_lobe_right", ...). It is used when it references the analysed series and shares its
frame of reference; it is decoded with highdicom per source instance onto the volume's slices (labels 1..5 in
:data:`node.pipeline.regions.ZONES` order) and handed to :func:`node.pipeline.scores.compute_scores`
(``region_map_kind="lobes"``), so the zones are real lobes and the CT-SS regions are geometric sub-divisions
of real lobes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from .regions import ZONES
from .segments import classify_lobe
from .types import Volume

# ZONES order: right_upper, right_middle, right_lower, left_upper, left_lower -> label = index + 1
_LOBE_LABEL = {name: i + 1 for i, name in enumerate(ZONES)}


class RegionMapError(ValueError):
    """A lobe SEG that cannot be used for this volume (the reason is reported, the zones stay geometric)."""


def lobe_segments(ds: Dataset) -> dict[str, list[int]]:
    """lobe -> segment numbers of a SEG header (several segments of one lobe are united)."""
    out: dict[str, list[int]] = {}
    for item in ds.get("SegmentSequence", None) or []:
        lobe = classify_lobe(item)
        if lobe is not None:
            out.setdefault(lobe, []).append(int(item.SegmentNumber))
    return out


def is_lobe_map(ds: Dataset) -> bool:
    """True for a SEG whose segments name at least two lung lobes (an anatomy map, not a finding)."""
    return str(ds.get("Modality", "")) == "SEG" and len(lobe_segments(ds)) >= 2


def referenced_series(ds: Dataset) -> set[str]:
    return {str(item.get("SeriesInstanceUID", "")) for item in ds.get("ReferencedSeriesSequence", None) or []}


@dataclass
class LobeMap:
    labels: np.ndarray       # (slices, rows, cols) uint8, 0 = none, 1..5 = ZONES order
    sop_instance_uid: str    # of the lobe SEG
    lobes: list[str]         # the lobes it contains
    header: Dataset | None = None  # the SEG without pixel data (the SR lists it as evidence)


def lobe_map_for(volume: Volume, seg: Any) -> LobeMap:
    """Decode the lobe SEG ``seg`` (highdicom Segmentation) onto ``volume``'s slices; raises RegionMapError."""
    if volume.series_instance_uid not in referenced_series(seg):
        raise RegionMapError("it does not reference the analysed series")
    frame_of_reference = str(volume.datasets[0].get("FrameOfReferenceUID", "")) if volume.datasets else ""
    if frame_of_reference and str(seg.get("FrameOfReferenceUID", "")) != frame_of_reference:
        raise RegionMapError("its FrameOfReferenceUID differs from the series'")
    lobes = lobe_segments(seg)
    if len(lobes) < 2:
        raise RegionMapError("it names fewer than two lung lobes")
    labels = np.zeros(volume.shape, np.uint8)
    for lobe, numbers in lobes.items():
        try:
            pixels = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=list(volume.sop_instance_uids), segment_numbers=numbers,
                assert_missing_frames_are_empty=True)
        except Exception as exc:  # frames without per-instance references, other geometry, ...
            raise RegionMapError(f"its frames cannot be placed on the series' slices ({type(exc).__name__}: {exc})")
        mask = (pixels >= 0.5).any(axis=-1)
        if mask.shape != labels.shape:
            raise RegionMapError(f"its frames are {mask.shape[1:]} pixels, the series' {labels.shape[1:]}")
        labels[mask & (labels == 0)] = _LOBE_LABEL[lobe]
    header = Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        setattr(header, keyword, seg.get(keyword))
    return LobeMap(labels, str(seg.SOPInstanceUID), sorted(lobes, key=ZONES.index), header)


def find_lobe_map(volume: Volume, paths: list[str | Path]) -> tuple[LobeMap | None, list[str]]:
    """The newest usable lobe SEG among ``paths`` for ``volume`` (by Content Date/Time, else file order),
    and notes on any that were not used and why."""
    import highdicom as hd

    notes: list[str] = []
    candidates = []
    for path in paths:
        try:
            header = dcmread(path, stop_before_pixels=True)
        except Exception as exc:
            notes.append(f"lobe map {Path(path).name} unreadable ({type(exc).__name__})")
            continue
        if is_lobe_map(header) and volume.series_instance_uid in referenced_series(header):
            stamp = f"{header.get('ContentDate', '')}{header.get('ContentTime', '')}"
            candidates.append((stamp, len(candidates), path))
    for _, _, path in sorted(candidates, reverse=True):
        try:
            return lobe_map_for(volume, hd.seg.segread(path)), notes
        except RegionMapError as exc:
            notes.append(f"lobe map {Path(path).name} not used: {exc}")
        except Exception as exc:
            notes.append(f"lobe map {Path(path).name} not used: {type(exc).__name__}: {exc}")
    return None, notes
