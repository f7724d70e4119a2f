"""The whole pipeline for one study: select a series, assemble it, segment lungs, pleural effusion and
infection, score.

Acceptable series are tried best first: a series that cannot be assembled (VolumeError) or that shows
no lung is recorded as such and the next one is tried. Nothing analysable is not an error: the result
has status "skipped" with the reason, or "failed" when a series was acceptable but broken.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .effusion import find_effusion
from .engines import build_engine
from .lungs import lung_method as resolve_lung_method, segment_lungs
from .lungs.notes import missed_dense_note
from .regionmap import find_lobe_map
from .scores import Scores, compute_scores
from .select import (SeriesDecision, SeriesKind, check_lung_in_view, mark_chosen, patient_conflict,
                     rank_candidates, select_series)
from .types import Effusion, EngineIdentity, InfectionResult, LungMasks, Volume
from .volume import DecodeLimits, VolumeError, assemble_volume

log = logging.getLogger(__name__)

STAGES = ("select", "assemble", "lungs", "effusion", "infection", "scores")


@dataclass
class PipelineResult:
    """Outcome of :func:`run_pipeline`. ``status``: "done", "skipped" (nothing analysable) or "failed"."""

    status: str
    reason: str = ""
    decisions: list[SeriesDecision] = field(default_factory=list)
    chosen_series_uid: str | None = None
    volume: Volume | None = None
    lungs: LungMasks | None = None
    effusion: Effusion | None = None  # pleural effusion and dense tissue neither lung nor effusion
    infection: InfectionResult | None = None
    scores: Scores | None = None
    engine: EngineIdentity | None = None
    engine_fallback: str = ""        # why engine "auto" fell back to the threshold engine; "" when it did not
    timings: dict[str, float] = field(default_factory=lambda: {s: 0.0 for s in STAGES})
    notes: list[str] = field(default_factory=list)
    lobe_map_uid: str | None = None  # SOP Instance UID of the lobe SEG that gave the zones, if one did
    lobe_map_header: Any = None      # its identifying attributes (evidence for the SR)
    lobe_map_notes: list[str] = field(default_factory=list)  # lobe SEGs that were not used, and why

    @property
    def segmentation_notes(self) -> list[str]:
        """The notes of the volume, lung, effusion and infection steps: what the SR carries as comments (the
        scores' and the lobe map's own notes are said there by the measurement groups and their method names)."""
        return [*(self.volume.notes if self.volume else []), *(self.lungs.notes if self.lungs else []),
                *(self.effusion.notes if self.effusion else []),
                *([self.engine_fallback] if self.engine_fallback else []),
                *(self.infection.notes if self.infection else [])]

    def measurements(self) -> dict[str, Any]:
        """The scores (:meth:`.scores.Scores.as_dict`) and the effusion per side (:meth:`.types.Effusion.as_dict`):
        what the SR reports and the database keeps; empty before scoring."""
        if self.scores is None:
            return {}
        return {**self.scores.as_dict(), **(self.effusion.as_dict() if self.effusion is not None else {})}


class _Clock:
    """Adds the wall time of each ``with clock(stage):`` block to ``timings[stage]``."""

    def __init__(self, timings: dict[str, float]):
        self.timings = timings
        self.stage = ""
        self.t0 = 0.0

    def __call__(self, stage: str) -> "_Clock":
        self.stage = stage
        return self

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timings[self.stage] = self.timings.get(self.stage, 0.0) + time.perf_counter() - self.t0


def _nothing_reason(decisions: list[SeriesDecision]) -> str:
    if not decisions:
        return "no DICOM instances were given"
    parts = [f"{d.description or d.series_uid or '?'}: {d.reason}" for d in decisions[:10]]
    more = f"; and {len(decisions) - 10} more" if len(decisions) > 10 else ""
    return f"no analysable chest CT series among {len(decisions)} series ({'; '.join(parts)}{more})"


def run_pipeline(paths: Iterable[Any], engine_name: str = "threshold", *, min_slices: int = 1,
                 engine_options: dict[str, Any] | None = None, lobe_maps: Sequence[Any] = (),
                 decode_limits: DecodeLimits = DecodeLimits(), lung_method: str = "auto") -> PipelineResult:
    """Run the pipeline on the instances ``paths`` (files, folders or datasets) of one study.

    ``lobe_maps``: SEG files that may hold the lung lobes of the chosen series (:mod:`.regionmap`); the
    newest usable one replaces the geometric zones, the others are reported in the notes.
    ``decode_limits``: the largest decoded pixel data a series may declare (a larger one is not decoded).

    ``engine_name`` "auto": the Inf-Net engine when it loads, else the threshold engine, the reason in
    ``engine_fallback`` and in the notes (:func:`.engines.build_engine`). ``lung_method``: see
    :func:`node.pipeline.lungs.lung_method`; the lung network runs on the engine's device (the CPU for an
    engine without one).

    Raises ValueError for an unknown engine (a configuration error) and
    :class:`.engines.EngineUnavailable` for an engine asked for by name that cannot be built; everything
    about the data is reported in the result.
    """
    choice = build_engine(engine_name, **(engine_options or {}))
    engine = choice.engine
    method = resolve_lung_method(lung_method)
    predictor = getattr(engine, "predictor", None)
    lung_device = str(getattr(predictor, "device", None) or "cpu")
    result = PipelineResult(status="skipped", engine=engine.identity, engine_fallback=choice.fallback)
    clock = _Clock(result.timings)

    with clock("select"):
        _, decisions = select_series(paths, min_slices=min_slices)
    result.decisions = decisions
    conflict = patient_conflict(decisions)
    if conflict:
        result.status, result.reason = "failed", conflict
        return result
    candidates = rank_candidates(decisions)
    failures: list[str] = []

    for cand in candidates:
        with clock("assemble"):
            try:
                volume = assemble_volume(cand.headers, decode_limits)
            except VolumeError as exc:
                cand.reject(f"cannot be assembled: {exc}")
                failures.append(f"{cand.description or cand.series_uid}: {exc}")
                log.warning("series %s: %s", cand.series_uid, exc)
                continue
        with clock("lungs"):
            lungs = segment_lungs(volume, method=method, device=lung_device)
            no_lung = check_lung_in_view(volume, lungs)
        if no_lung:
            cand.reject(no_lung)
            continue
        mark_chosen(cand, [d for d in candidates if d.accepted])
        if cand.kind is SeriesKind.REFORMAT:  # said with the result (SR comments, report), not only in the log
            volume.notes.append(f"analysed series is a derived axial reformat (ImageType {cand.image_type}): no "
                                "original axial series of the study was usable")
        result.chosen_series_uid = cand.series_uid
        result.volume, result.lungs = volume, lungs
        break
    else:
        if failures:
            result.status = "failed"
            result.reason = "the series to analyse could not be assembled: " + "; ".join(failures)
        else:
            result.reason = _nothing_reason(decisions)
        return result

    with clock("effusion"):
        result.effusion = find_effusion(result.volume, result.lungs)
    with clock("infection"):
        result.infection = engine.segment(result.volume, result.lungs)
        missed = missed_dense_note(result.volume, result.lungs, result.infection.probability,
                                   result.infection.infection)
        if missed:
            result.lungs.notes.append(missed)
    with clock("scores"):
        lobe_map, result.lobe_map_notes = find_lobe_map(result.volume, list(lobe_maps)) if lobe_maps else (None, [])
        used = []
        if lobe_map is not None:
            result.lobe_map_uid, result.lobe_map_header = lobe_map.sop_instance_uid, lobe_map.header
            used = [f"zones are the lobes of SEG {lobe_map.sop_instance_uid} ({', '.join(lobe_map.lobes)})"]
        result.scores = compute_scores(result.volume, result.lungs, result.infection,
                                       region_map=lobe_map.labels if lobe_map is not None else None)
    result.status = "done"
    result.reason = next(d.reason for d in decisions if d.chosen)
    result.notes = [*result.segmentation_notes, *used, *result.lobe_map_notes, *result.scores.notes]
    return result
