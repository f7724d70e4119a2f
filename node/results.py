"""The record of one analysis, built once: the worker stores it as a ``results`` row, ``ctnode process``
prints it as its report.

Both take the same fields from an :class:`node.processing.Analysis` through :meth:`ResultRecord.of`; an
analysis that stopped before choosing a series or an engine (``skipped``, ``failed``) has empty fields.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node.db.schema import Result
from node.storage import Storage

if TYPE_CHECKING:  # the worker imports this module before it loads the pipeline
    from node.pipeline.select import SeriesDecision
    from node.pipeline.types import EngineIdentity
    from node.processing import Analysis


#: The effusion measurements (node.pipeline.types.Effusion.SR_KEYS) and the results column of each.
EFFUSION_KEYS: dict[str, str] = {
    "right_effusion_volume_ml": "right_effusion_ml", "left_effusion_volume_ml": "left_effusion_ml",
    "right_effusion_area_cm2": "right_effusion_cm2", "left_effusion_area_cm2": "left_effusion_cm2",
}


def jsonable(obj: Any) -> Any:
    """``obj`` as JSON types: dataclasses as dicts, tuples as lists, numpy scalars as numbers, else str."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "item"):  # numpy scalar
        return obj.item()
    return str(obj)


def _scalars(obj: Any) -> dict[str, Any]:
    """The scalar fields of a dataclass (the short form the offline report prints)."""
    return {k: v for k, v in dataclasses.asdict(obj).items() if isinstance(v, (str, int, float, bool, type(None)))}


@dataclass(frozen=True)
class ResultRecord:
    """What an analysis decided and measured, independent of where it is kept."""

    status: str
    reason: str
    chosen_series_uid: str | None        # None when no series was analysed
    engine: EngineIdentity | None        # None when it did not get that far
    scores: dict[str, Any]
    timings: dict[str, float]
    decisions: list[SeriesDecision]      # every series considered, and why it was used or not
    lobe_map_uid: str | None             # the lobe SEG that gave the zones, if one did
    lobe_map_notes: list[str]            # lobe SEGs not used, and why
    notes: list[str]                     # what the analysis says about itself
    effusion: dict[str, float]           # pleural effusion per side: EFFUSION_KEYS present, {} before scoring

    @classmethod
    def of(cls, analysis: Analysis) -> ResultRecord:
        pipe = analysis.pipeline
        return cls(
            status=analysis.status, reason=analysis.reason,
            chosen_series_uid=pipe.chosen_series_uid if pipe is not None else None,
            engine=pipe.engine if pipe is not None else None,
            scores=analysis.scores, timings=dict(analysis.timings),
            decisions=list(pipe.decisions) if pipe is not None else [],
            lobe_map_uid=pipe.lobe_map_uid if pipe is not None else None,
            lobe_map_notes=list(pipe.lobe_map_notes) if pipe is not None else [],
            notes=list(pipe.notes) if pipe is not None else [],
            effusion={k: v for k, v in analysis.scores.items() if k in EFFUSION_KEYS})

    @property
    def engine_device(self) -> str:
        return self.engine.device if self.engine is not None else ""


def result_row(job_id: int, analysis: Analysis, outputs: Mapping[str, Path], files: Storage) -> Result:
    """The ``results`` row of ``job_id``: the record, plus the SOP Instance UIDs and files of its objects
    (``outputs``: key -> path, from :func:`node.processing.write_outputs`, stored as ``files`` names them)."""
    record = ResultRecord.of(analysis)
    engine = record.engine
    return Result(
        job_id=job_id, series_instance_uid=record.chosen_series_uid or "",
        engine_name=engine.name if engine else "", engine_version=engine.version if engine else "",
        weights_sha256=engine.weights_sha256 if engine else "",
        scores=jsonable(record.scores), timings=jsonable(record.timings),
        decisions={"series": jsonable(record.decisions), "engine_device": record.engine_device,
                   "lobe_map": record.lobe_map_uid, "lobe_map_notes": record.lobe_map_notes,
                   "notes": record.notes},
        seg_sop_instance_uid=str(analysis.seg.SOPInstanceUID) if analysis.seg is not None else "",
        sr_sop_instance_uid=str(analysis.sr.SOPInstanceUID) if analysis.sr is not None else "",
        seg_path=files.results_name(outputs["seg"]) if "seg" in outputs else "",
        sr_path=files.results_name(outputs["sr"]) if "sr" in outputs else "",
        key_images=[{"sop_instance_uid": str(ds.SOPInstanceUID), "path": files.results_name(outputs[key])}
                    for key, ds in analysis.objects() if key.startswith("key-")],
        **{EFFUSION_KEYS[key]: float(value) for key, value in record.effusion.items()},
    )


def process_report(analysis: Analysis, outputs: Mapping[str, Path]) -> dict[str, Any]:
    """The report of ``ctnode process``: the record, with the written files (``outputs``) and the engine when
    done."""
    record = ResultRecord.of(analysis)
    report: dict[str, Any] = {
        "status": record.status,
        "reason": record.reason,
        "series": [_scalars(d) for d in record.decisions],
        "chosen_series": record.chosen_series_uid,
        "lobe_map": record.lobe_map_uid,
        "lobe_map_notes": record.lobe_map_notes,
        "notes": record.notes,
        "scores": record.scores,
        "timings_s": {k: round(v, 3) for k, v in record.timings.items()},
    }
    if record.status == "done":
        report["outputs"] = {k: str(v) for k, v in outputs.items()}
        report["engine"] = _scalars(record.engine) if record.engine is not None else None
    return report
