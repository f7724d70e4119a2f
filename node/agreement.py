"""Agreement of the node's SEG with a reference SEG (e.g. a radiologist's correction): Dice and volumes.

A reference SEG (``reference_segs``, recorded by the listener) is matched to the node's latest *done*
result whose series is the SEG's referenced series (ReferencedSeriesSequence). Segments are paired by
meaning, not by number (:func:`node.pipeline.segments.classify_segment`: codes first, then the label; in
a label-map SEG such as the node's, a lung is its lung segment plus the lesion segments in it,
:func:`whole_structure_map`), both SEGs are decoded with highdicom over the union of the source instances
either one references, and for each structure present in both, the Dice coefficient
(:func:`models.metrics.dice`: undefined, stored as NULL, when both masks are empty) and the volumes are
stored in ``agreements`` (one row per structure). When the
series gets a newer result (a new version of the study), the reference is compared again with it; the rows
of earlier results stay, so the audit trail shows how each version compared.

A reference for a series the node has no result for (yet) is ``unmatched`` with the reason, and is tried
again on every tick until a result appears; one that cannot be read or compared is ``failed`` with why.

A SEG of the lung lobes (:func:`node.pipeline.regionmap.is_lobe_map`) is anatomy, not a reference: the
worker uses it for the zones of its series (:mod:`node.pipeline.regionmap`). Here it waits (``unmatched``)
for the series' result; when that result used it, it becomes ``anatomy``; when the result was made without
it (the map came later), the study is processed again once (:func:`node.registry.reopen_study`), and the
map becomes ``anatomy`` when the new result used it, ``failed`` with the worker's reason when it did not.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom import dcmread
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from models.metrics import dice
from node.db.schema import Agreement, Instance, Job, ReferenceSeg, Result, Series, utcnow
from node.db.states import REFERENCE_OPEN, JobState, ReferenceState, transition
from node.pipeline.regionmap import is_lobe_map
from node.pipeline.segments import SegmentKey, classify_segment, lesion_side
from node.registry import add_event, reopen_study
from node.storage import Storage

log = logging.getLogger(__name__)

#: Structure keys compared, in report order (lungs by side, the whole infection and its classes).
KEYS: tuple[SegmentKey, ...] = tuple(SegmentKey)


def segment_map(seg: Any) -> dict[SegmentKey, list[tuple[int, str]]]:
    """key -> [(segment number, label), ...] for a highdicom Segmentation (several segments: their union)."""
    out: dict[str, list[tuple[int, str]]] = {}
    for item in seg.SegmentSequence:
        key = classify_segment(item)
        if key is not None:
            out.setdefault(key, []).append((int(item.SegmentNumber), str(item.get("SegmentLabel", ""))))
    return out


#: Lesion keys that are parts of the infection.
_INFECTION_PARTS = (SegmentKey.GGO, SegmentKey.CONSOLIDATION)


def whole_structure_map(seg: Any) -> dict[SegmentKey, list[tuple[int, str]]]:
    """:func:`segment_map` completed for label-map SEGs (the node's, SegmentsOverlap NO), where each voxel
    is in one segment: a lung is its lung segment plus the lesion segments in that lung, the infection all
    lesion segments (GGO, consolidation). For a SEG whose lungs already contain the lesions the union
    changes nothing."""
    out = {key: list(items) for key, items in segment_map(seg).items()}
    for item in seg.SegmentSequence:
        key = classify_segment(item)
        entry = (int(item.SegmentNumber), str(item.get("SegmentLabel", "")))
        if key in (SegmentKey.INFECTION, *_INFECTION_PARTS):
            side = lesion_side(item)
            if side is not None and side in out and entry not in out[side]:
                out[side].append(entry)
        if key in _INFECTION_PARTS and entry not in out.setdefault(SegmentKey.INFECTION, []):
            out[SegmentKey.INFECTION].append(entry)
    return out


def source_sop_uids(seg: Any) -> list[str]:
    """SOP Instance UIDs of the source images a SEG references (ReferencedSeriesSequence), in file order."""
    return [str(sop) for _, _, sop in seg.get_source_image_uids()]


def masks(seg: Any, sops: Sequence[str], numbers: Sequence[int]) -> np.ndarray:
    """Union of ``numbers`` as a bool (len(sops), rows, cols) mask over the source instances ``sops``."""
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=list(sops), segment_numbers=list(numbers),
                                               assert_missing_frames_are_empty=True)
    return (pixels >= 0.5).any(axis=-1)  # BINARY is 0/1; FRACTIONAL is rescaled to 0..1


def _seg_voxel_ml(seg: Any) -> float | None:
    """Voxel volume from the SEG's shared PixelMeasuresSequence (SpacingBetweenSlices, else SliceThickness)."""
    try:
        pm = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        step = pm.get("SpacingBetweenSlices") or pm.get("SliceThickness")
        return float(pm.PixelSpacing[0]) * float(pm.PixelSpacing[1]) * float(step) / 1000.0 if step else None
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return None


@dataclass
class SourceGrid:
    """The source series as the node saw it: slice order and voxel volume (None when unknown)."""

    sop_uids: list[str]
    voxel_ml: float | None
    origin: str


def source_grid(session: Session, series_uid: str, files: Storage) -> SourceGrid:
    """Slice order and voxel volume of ``series_uid`` from its CT headers still in the spool."""
    from node.pipeline.volume import series_geometry

    paths = session.scalars(select(Instance.path).join(Series, Instance.series_id == Series.id).where(
        Series.series_instance_uid == series_uid, Instance.purged_at.is_(None)))
    try:
        headers = [dcmread(files.spool_file(p), stop_before_pixels=True) for p in paths]
        geo = series_geometry(headers)
    except Exception as exc:  # purged, unreadable or not one stack: the SEG's own pixel measures are used
        log.debug("no spool geometry for the series: %s", exc)
        return SourceGrid([], None, "")
    sops = [str(headers[i].SOPInstanceUID) for i in geo.order]
    voxel = geo.pixel_spacing[0] * geo.pixel_spacing[1] * geo.slice_spacing / 1000.0
    return SourceGrid(sops, voxel if voxel > 0 else None, "CT headers")


@dataclass
class SegmentAgreement:
    key: SegmentKey
    node_numbers: list[tuple[int, str]]
    reference_numbers: list[tuple[int, str]]
    dice: float | None
    volume_node_ml: float
    volume_reference_ml: float


def compare(node_seg: Any, reference_seg: Any, grid: SourceGrid) -> tuple[list[SegmentAgreement], str]:
    """Dice and volumes for every segment key both SEGs have; returns them and a note (voxel size origin,
    segments only one side has)."""
    node_map, ref_map = whole_structure_map(node_seg), whole_structure_map(reference_seg)
    keys = [k for k in KEYS if k in node_map and k in ref_map]
    if not keys:
        raise ValueError("no segment of the reference SEG matches a node segment (labels: "
                         + ", ".join(str(s.get("SegmentLabel", "?")) for s in reference_seg.SegmentSequence) + ")")
    sops = list(grid.sop_uids)
    known = set(sops)
    for uid in source_sop_uids(node_seg) + source_sop_uids(reference_seg):
        if uid not in known:
            sops.append(uid)
            known.add(uid)
    voxel, origin = grid.voxel_ml, grid.origin
    if voxel is None:
        voxel, origin = _seg_voxel_ml(node_seg) or _seg_voxel_ml(reference_seg), "SEG pixel measures"
    if voxel is None:
        raise ValueError("voxel size unknown: no CT headers in the spool and no SEG pixel measures")
    out = []
    for key in keys:
        a = masks(node_seg, sops, [n for n, _ in node_map[key]])
        b = masks(reference_seg, sops, [n for n, _ in ref_map[key]])
        out.append(SegmentAgreement(key, node_map[key], ref_map[key], dice(a, b),
                                    float(a.sum()) * voxel, float(b.sum()) * voxel))
    notes = [f"{len(sops)} source slices, voxel {voxel * 1000:.3f} mm3 from {origin}"]
    only_ref = [k for k in ref_map if k not in node_map]
    if only_ref:
        notes.append("reference segments without a node segment: " + ", ".join(only_ref))
    return out, "; ".join(notes)


def latest_result(session: Session, series_uid: str) -> Result | None:
    """The node's latest done result for ``series_uid`` with a SEG file."""
    return session.scalars(
        select(Result).join(Job, Result.job_id == Job.id)
        .where(Result.series_instance_uid == series_uid, Job.state == JobState.DONE, Result.seg_path != "")
        .order_by(Job.version.desc(), Result.id.desc()).limit(1)).first()


def take_lobe_map(session: Session, ref: ReferenceSeg) -> ReferenceState:
    """A lobe map (see the module docstring); updates ``ref`` and returns its new state."""
    result = latest_result(session, ref.source_series_uid)
    if result is None:
        transition(ref, ReferenceState.UNMATCHED)
        ref.reason = f"lobe map: waiting for the node's result for series {ref.source_series_uid}"
        return ref.state
    if ref.job_id is not None and result.job_id < ref.job_id:
        return ref.state  # the study is being processed again for this map: wait for that result
    decisions = result.decisions or {}
    if decisions.get("lobe_map") == ref.sop_instance_uid:
        transition(ref, ReferenceState.ANATOMY)
        ref.reason, ref.job_id, ref.computed_at = f"lobe map used by job {result.job_id}", result.job_id, utcnow()
        add_event(session, "lobe_map_used", f"SEG {ref.sop_instance_uid} gave the zones of job {result.job_id}",
                  study_uid=ref.study_instance_uid, job_id=result.job_id)
        return ref.state
    if ref.job_id is not None and result.job_id >= ref.job_id:  # reprocessed for it once already: not usable
        why = "; ".join(decisions.get("lobe_map_notes", []))
        transition(ref, ReferenceState.FAILED)
        ref.reason = f"lobe map not used by job {result.job_id}: {why or 'see the job'}"[:4000]
        ref.computed_at = utcnow()
        add_event(session, "lobe_map_failed", f"SEG {ref.sop_instance_uid}: {ref.reason}",
                  study_uid=ref.study_instance_uid, job_id=result.job_id)
        return ref.state
    job = reopen_study(session, session.get(Job, result.job_id).study_id,
                       f"lobe map SEG {ref.sop_instance_uid} received after job {result.job_id}")
    transition(ref, ReferenceState.UNMATCHED)
    ref.reason, ref.job_id = f"lobe map: study reprocessed as job {job.id} to use it", job.id
    return ref.state


def compute_agreement(session: Session, ref: ReferenceSeg, files: Storage) -> ReferenceState:
    """Compare one reference SEG with the node's result; updates ``ref`` and returns its new state."""
    import highdicom as hd

    try:
        lobe_map = is_lobe_map(dcmread(files.spool_file(ref.path), stop_before_pixels=True))
    except Exception:
        lobe_map = False  # unreadable: reported as failed by the comparison below
    if lobe_map:
        return take_lobe_map(session, ref)
    result = latest_result(session, ref.source_series_uid)
    if result is None:
        reason = f"no node result for series {ref.source_series_uid} yet"
        if ref.state != ReferenceState.UNMATCHED:
            add_event(session, "reference_unmatched", f"reference SEG {ref.sop_instance_uid}: {reason}",
                      study_uid=ref.study_instance_uid)
        transition(ref, ReferenceState.UNMATCHED)
        ref.reason = reason
        return ref.state
    try:
        node_seg = hd.seg.segread(files.results_file(result.seg_path))
        reference_seg = hd.seg.segread(files.spool_file(ref.path))
        rows, note = compare(node_seg, reference_seg, source_grid(session, ref.source_series_uid, files))
    except Exception as exc:
        transition(ref, ReferenceState.FAILED)
        ref.reason, ref.job_id, ref.computed_at = f"{type(exc).__name__}: {exc}"[:4000], result.job_id, utcnow()
        add_event(session, "agreement_failed", f"reference SEG {ref.sop_instance_uid}: {ref.reason}",
                  study_uid=ref.study_instance_uid, job_id=result.job_id)
        return ref.state
    now = utcnow()
    # rows for earlier results stay: the audit trail of how each version compared
    ref.agreements[:] = [a for a in ref.agreements if a.job_id != result.job_id]
    for r in rows:
        ref.agreements.append(Agreement(
            job_id=result.job_id, reference_sop_instance_uid=ref.sop_instance_uid,
            reference_series_uid=ref.series_instance_uid, segment_key=str(r.key),
            node_segment_number=r.node_numbers[0][0], node_segment_label=r.node_numbers[0][1][:64],
            reference_segment_numbers=",".join(str(n) for n, _ in r.reference_numbers)[:64],
            reference_segment_label=" + ".join(label for _, label in r.reference_numbers)[:64],
            dice=r.dice, volume_node_ml=r.volume_node_ml, volume_reference_ml=r.volume_reference_ml,
            volume_difference_ml=r.volume_reference_ml - r.volume_node_ml, computed_at=now, detail=note))
    transition(ref, ReferenceState.DONE)
    ref.reason, ref.job_id, ref.computed_at = note, result.job_id, now
    summary = ", ".join(f"{r.key} Dice {'-' if r.dice is None else f'{r.dice:.3f}'}" for r in rows)
    add_event(session, "agreement_computed", f"reference SEG {ref.sop_instance_uid}: {summary}",
              study_uid=ref.study_instance_uid, job_id=result.job_id)
    return ref.state


#: References waiting to be compared (a done one is compared again only when its series got a newer result).
_WAITING = (ReferenceState.PENDING, ReferenceState.UNMATCHED)


def _outdated(session: Session, ref: ReferenceSeg) -> bool:
    """A compared reference whose series has a newer node result (a new study version): compare again."""
    result = latest_result(session, ref.source_series_uid)
    return result is not None and result.job_id != ref.job_id


def compute_pending(sessions: Any, files: Storage, limit: int = 5) -> int:
    """One scheduler tick: compare pending references, retry unmatched ones, and compare done ones again
    when their series has a newer result; returns how many were compared (done or failed). Each
    reference is its own transaction."""
    # a newer result has a larger job id: versions of a study are jobs created one after the other
    newer_result = (select(Result.id).join(Job, Result.job_id == Job.id)
                    .where(Result.series_instance_uid == ReferenceSeg.source_series_uid, Job.state == JobState.DONE,
                           Result.seg_path != "", Result.job_id > ReferenceSeg.job_id).exists())
    with sessions() as session:
        ids = list(session.scalars(
            select(ReferenceSeg.id).where(or_(ReferenceSeg.state.in_(_WAITING),
                                              and_(ReferenceSeg.state == ReferenceState.DONE, newer_result)))
            .order_by(ReferenceSeg.id)))
    compared = 0
    for ref_id in ids:
        with sessions.begin() as session:
            ref = session.get(ReferenceSeg, ref_id)
            if ref is None or ref.state not in REFERENCE_OPEN:
                continue
            if ref.state == ReferenceState.UNMATCHED and latest_result(session, ref.source_series_uid) is None:
                continue  # still nothing to compare with: no write, no event
            if ref.state == ReferenceState.DONE and not _outdated(session, ref):
                continue
            compared += compute_agreement(session, ref, files) in (ReferenceState.DONE, ReferenceState.FAILED)
        if compared >= limit:
            break
    return compared
