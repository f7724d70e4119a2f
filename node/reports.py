"""Read-only views of the database for ``ctnode results`` and ``ctnode jobs`` (plus ``jobs retry``)."""
from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.db.schema import Agreement, Export, Job, ReferenceSeg, Result, utcnow
from node.db.states import ExportState, JobState, ReferenceState, transition
from node.pipeline.segments import SegmentKey
from node.registry import add_event, set_job_state
from node.storage import Storage

CSV_FIELDS = [
    "job_id", "study_instance_uid", "version", "state", "reason", "series_instance_uid", "engine_name",
    "engine_version", "weights_sha256", "right_lung_volume_ml", "left_lung_volume_ml", "infection_volume_ml",
    "percent_involved_right", "percent_involved_left", "percent_involved_total", "right_effusion_volume_ml",
    "left_effusion_volume_ml", "right_effusion_area_cm2", "left_effusion_area_cm2", "volumetric", "finished_at",
    "notes",
]


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.1f}" if isinstance(v, float) else ("" if v is None else str(v))


def _pct(v: Any) -> str:
    return "-" if v is None else f"{float(v):.1f}"


def _region_lines(scores: dict[str, Any]) -> list[str]:
    """Per-region table (%, CT-SS score, zone score), zone table, totals and severity."""
    from node.pipeline.regions import REGION_ZONE

    regions = scores.get("regions") or {}
    zones = scores.get("zones") or {}
    if not regions and not zones:
        return []
    method = scores.get("region_method", "geometric")
    out = ["  regions (" + ("geometric approximation of the segmental anatomy" if method == "geometric"
                            else f"external {method} map") + "):"]
    rows = []
    for name, item in regions.items():
        zone = REGION_ZONE.get(name, "")
        rows.append([name, zone, _pct(item.get("percent")), item.get("ctss", ""),
                     (zones.get(zone) or {}).get("score", "")])
    if rows:
        out.extend("    " + line for line in
                   _table(["region", "zone", "% involved", "CT-SS", "zone score"], rows).splitlines())
    zrows = [[name, _pct(item.get("percent")), item.get("score", "")] for name, item in zones.items()]
    if zrows:
        out.extend("    " + line for line in _table(["zone", "% involved", "score"], zrows).splitlines())
    out.append(f"    CT-SS total {scores.get('ctss_total', '-')}/40, zone score total "
               f"{scores.get('zone_score_total', '-')}/25, severity {scores.get('severity', '-')}")
    return out


_SHORT = {SegmentKey.RIGHT_LUNG: "right lung", SegmentKey.LEFT_LUNG: "left lung",
          SegmentKey.INFECTION: "infection", SegmentKey.GGO: "GGO", SegmentKey.CONSOLIDATION: "consolidation"}


def agreement_lines(session: Session, job_id: int) -> list[str]:
    """One line per reference SEG compared with this job's result: Dice per segment, infection volume
    difference (reference - node), and a detail line per segment."""
    refs = session.scalars(select(ReferenceSeg).join(Agreement, Agreement.reference_id == ReferenceSeg.id)
                           .where(Agreement.job_id == job_id).distinct().order_by(ReferenceSeg.id))
    out: list[str] = []
    for ref in refs:
        rows = [a for a in ref.agreements if a.job_id == job_id]
        dices = ", ".join(f"{_SHORT.get(a.segment_key, a.segment_key)} Dice "
                          + ("n/a (both empty)" if a.dice is None else f"{a.dice:.2f}") for a in rows)
        main = next((a for a in rows if a.segment_key == SegmentKey.INFECTION), rows[0])
        out.append(f"  agreement with reference SEG {ref.sop_instance_uid} (received {ref.received_at:%Y-%m-%d %H:%M:%S} "
                   f"UTC): {dices}, {_SHORT.get(main.segment_key, main.segment_key)} volume difference "
                   f"{main.volume_difference_ml:+.1f} ml")
        for a in rows:
            out.append(f"    {a.node_segment_label} (#{a.node_segment_number}) vs {a.reference_segment_label} "
                       f"(#{a.reference_segment_numbers}): node {a.volume_node_ml:.1f} ml, reference "
                       f"{a.volume_reference_ml:.1f} ml, difference {a.volume_difference_ml:+.1f} ml")
    failed = session.scalars(select(ReferenceSeg).where(ReferenceSeg.job_id == job_id,
                                                        ReferenceSeg.state == ReferenceState.FAILED))
    out.extend(f"  reference SEG {ref.sop_instance_uid}: not compared: {ref.reason}" for ref in failed)
    return out


def result_rows(session: Session) -> list[dict[str, Any]]:
    rows = []
    for job in session.scalars(select(Job).order_by(Job.id)):
        res = job.result
        scores = res.scores if res else {}
        row = {"job_id": job.id, "study_instance_uid": job.study.study_instance_uid, "version": job.version,
               "state": job.state, "reason": job.reason, "finished_at": job.finished_at}
        if res:
            row.update(series_instance_uid=res.series_instance_uid, engine_name=res.engine_name,
                       engine_version=res.engine_version, weights_sha256=res.weights_sha256)
            row.update({k: scores.get(k) for k in CSV_FIELDS if k in scores})
            row["notes"] = " | ".join(res.decisions.get("notes", []))
        rows.append(row)
    return rows


def results_table(session: Session) -> str:
    rows = [[r["job_id"], r["study_instance_uid"], r["version"], r["state"], r.get("engine_name", ""),
             _fmt(r.get("percent_involved_total")), (r["reason"] or "")[:60]] for r in result_rows(session)]
    return _table(["job", "study", "v", "state", "engine", "% involved", "reason"], rows)


def _effusion_line(res: Result) -> str | None:
    """The pleural effusion per side (volume, or area on a single slice); None for results without it."""
    amount = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    for unit, right, left in (("ml", res.right_effusion_ml, res.left_effusion_ml),
                              ("cm2", res.right_effusion_cm2, res.left_effusion_cm2)):
        if right is not None or left is not None:
            area = " (area on the single slice)" if unit == "cm2" else ""
            return f"  pleural effusion: right {amount(right)} {unit}, left {amount(left)} {unit}{area}"
    return None


def result_text(session: Session, job_id: int, files: Storage | None = None) -> str | None:
    """What ``results show`` prints for ``job_id``; the files where this host finds them when ``files`` is
    given (as the database stores them otherwise: relative to the results folder)."""
    job = session.get(Job, job_id)

    def where(stored: str) -> str:
        return str(files.results_file(stored)) if files is not None and stored else stored

    if job is None:
        return None
    lines = [f"Job {job.id}: study {job.study.study_instance_uid}, version {job.version}, {job.state}"
             + (f" ({job.reason})" if job.reason else ""),
             f"  received {job.study.first_received_at:%Y-%m-%d %H:%M:%S} UTC, finished "
             + (f"{job.finished_at:%Y-%m-%d %H:%M:%S} UTC" if job.finished_at else "-")]
    res = job.result
    if res:
        lines.append(f"  series {res.series_instance_uid or '-'}")
        if res.engine_name:
            lines.append(f"  engine {res.engine_name} {res.engine_version}"
                         + (f", weights sha256 {res.weights_sha256[:16]}..." if res.weights_sha256 else "")
                         + (f", on {res.decisions['engine_device']}" if res.decisions.get("engine_device") else ""))
        if res.decisions.get("lobe_map"):
            lines.append(f"  zones: the lobes of SEG {res.decisions['lobe_map']}")
        for d in res.decisions.get("series", []):
            verdict = "used" if d.get("series_uid") == res.series_instance_uid else ("ok" if d.get("accepted") else "skipped")
            lines.append(f"    series {d.get('series_uid', '?')}: {verdict}: {d.get('reason', '')}")
        # what the analysis says about itself: tissue recovered into the lungs, thresholds chosen, coverage,
        # approximations; results recorded before notes were kept have the lobe-map notes only
        notes = res.decisions.get("notes", res.decisions.get("lobe_map_notes", []))
        if notes:
            lines.append("  notes:")
            lines.extend(f"    {note}" for note in notes)
        effusion = _effusion_line(res)
        if effusion:
            lines.append(effusion)
        if res.scores:
            lines.append("  scores:")
            lines.extend(f"    {k:32s} {_fmt(v)}" for k, v in res.scores.items() if not isinstance(v, (dict, list)))
            lines.extend(_region_lines(res.scores))
        if res.timings:
            lines.append("  time per stage (s): " + ", ".join(f"{k} {v:.2f}" for k, v in res.timings.items()))
        if res.seg_path:
            lines.append(f"  SEG {res.seg_sop_instance_uid}: {where(res.seg_path)}")
            lines.append(f"  SR  {res.sr_sop_instance_uid}: {where(res.sr_path)}")
        for key_image in res.key_images or []:
            lines.append(f"  key image (Secondary Capture, DERIVED) {key_image['sop_instance_uid']}: "
                         f"{where(key_image['path'])}")
    lines.extend(agreement_lines(session, job.id))
    for ex in job.exports:
        lines.append(f"  export to {ex.destination}: {ex.state}, {ex.attempts} attempt(s)"
                     + (f", last error: {ex.last_error}" if ex.last_error else ""))
    return "\n".join(lines)


def jobs_table(session: Session) -> str:
    rows = []
    for job in session.scalars(select(Job).order_by(Job.id)):
        exports = ", ".join(f"{e.destination}:{e.state}" for e in job.exports)
        held_by = job.owner.rsplit("/", 2)[0] if job.owner else ""  # the node name of node.lease.Owner
        rows.append([job.id, job.study.study_instance_uid, job.version, job.state, job.attempts, held_by,
                     exports, (job.reason or "")[:60]])
    return _table(["job", "study", "v", "state", "tries", "held by", "exports", "reason"], rows)


def retry(session: Session, job_id: int | None) -> int:
    """Queue a failed job again and/or its dead exports (all dead exports when ``job_id`` is None)."""
    n = 0
    query = select(Export).where(Export.state == ExportState.DEAD)
    if job_id is not None:
        query = query.where(Export.job_id == job_id)
        job = session.get(Job, job_id)
        if job is not None and job.state == JobState.FAILED:
            job.attempts = 0
            set_job_state(session, job, JobState.READY, "retry requested by an operator")
            n += 1
    for ex in session.scalars(query):
        transition(ex, ExportState.PENDING)
        ex.attempts, ex.next_attempt_at = 0, utcnow()
        add_event(session, "export_retry", f"to {ex.destination} requested by an operator", job_id=ex.job_id)
        n += 1
    return n
