"""One study in, one SEG and one SR out: the pipeline plus the DICOM writers.

Shared by the worker process (``ctnode serve``) and the offline ``ctnode process`` command, so both produce
identical objects from identical input.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from node.pipeline.volume import DecodeLimits


@dataclass
class Analysis:
    status: str                      # "done", "skipped" or "failed"
    reason: str = ""
    pipeline: Any = None             # node.pipeline.run.PipelineResult
    seg: Any = None                  # highdicom Segmentation
    sr: Any = None                   # highdicom Comprehensive3DSR
    key_images: list[Any] = field(default_factory=list)  # highdicom SCImage, when configured
    timings: dict[str, float] = field(default_factory=dict)

    def objects(self) -> list[tuple[str, Any]]:
        """(key, dataset) of every DICOM object created: "seg", "sr", then "key-1", "key-2", ..."""
        if self.status != "done":
            return []
        return [("seg", self.seg), ("sr", self.sr)] + [(f"key-{i}", sc) for i, sc in enumerate(self.key_images, 1)]

    @property
    def engine_fallback(self) -> str:
        """Why engine "auto" fell back to the threshold engine ("" when it did not or never got that far)."""
        return self.pipeline.engine_fallback if self.pipeline is not None else ""

    @property
    def scores(self) -> dict[str, Any]:
        return self.pipeline.measurements() if self.pipeline is not None else {}


def analyse(paths: list[str | Path], *, engine: str = "auto", min_slices: int = 1,
            seg_series_number: int = 901, sr_series_number: int = 902, key_images: int = 0,
            key_images_series_number: int = 903, engine_options: dict[str, Any] | None = None,
            lobe_maps: list[str | Path] = (), decode_limits: DecodeLimits | None = None,
            lung_method: str = "auto") -> Analysis:
    """Select a series among ``paths``, segment and score it, and build the SEG, the SR and (``key_images``
    > 0) up to that many Secondary Capture key images in memory. ``lobe_maps``: SEG files that may hold the
    lobes of the chosen series (see :mod:`node.pipeline.regionmap`). ``engine`` "auto": the Inf-Net engine
    when it loads, else the threshold engine (:attr:`Analysis.engine_fallback` says why). ``decode_limits``:
    the largest decoded pixel data a series may declare (:class:`node.pipeline.volume.DecodeLimits`; None: its
    defaults)."""
    from node.pipeline.run import run_pipeline
    from node.pipeline.volume import DecodeLimits
    from node.writers.keyimages import build_key_images
    from node.writers.seg import build_segmentation
    from node.writers.sr import build_report

    options = {k: v for k, v in (engine_options or {}).items() if not (k == "device" and v == "auto")}
    result = run_pipeline([str(p) for p in paths], engine, min_slices=min_slices,
                          engine_options=options, lobe_maps=lobe_maps,
                          decode_limits=decode_limits or DecodeLimits(), lung_method=lung_method)
    timings = dict(result.timings)
    if result.status != "done":
        return Analysis(status=result.status, reason=result.reason, pipeline=result, timings=timings)
    t0 = time.perf_counter()
    seg = build_segmentation(result.volume, result.lungs, result.infection, result.engine,
                             series_number=seg_series_number, effusion=result.effusion)
    timings["seg"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = result.measurements()
    sr = build_report(result.volume, seg, scores, result.engine, series_number=sr_series_number,
                      other_evidence=[result.lobe_map_header] if result.lobe_map_header is not None else [],
                      notes=result.segmentation_notes, lung_method=result.lungs.method)
    timings["sr"] = time.perf_counter() - t0
    scs = []
    if key_images > 0:
        t0 = time.perf_counter()
        scs = build_key_images(result.volume, result.lungs, result.infection, result.engine, count=key_images,
                               series_number=key_images_series_number,
                               percent_of_lung=scores.get("percent_involved_total"))
        timings["key_images"] = time.perf_counter() - t0
    return Analysis(status="done", pipeline=result, seg=seg, sr=sr, key_images=scs, timings=timings)


def analyse_with(settings: Any, paths: list[str | Path], *, engine: str | None = None,
                 lobe_maps: list[str | Path] = ()) -> Analysis:
    """:func:`analyse` with the options of a ``[processing]`` section (``node.config.ProcessingSettings``)."""
    from node.pipeline.volume import DecodeLimits

    return analyse(paths, engine=engine or settings.engine, min_slices=settings.min_slices,
                   seg_series_number=settings.seg_series_number, sr_series_number=settings.sr_series_number,
                   key_images=settings.key_images, key_images_series_number=settings.key_images_series_number,
                   engine_options={"device": settings.device}, lobe_maps=lobe_maps,
                   decode_limits=DecodeLimits(instance_mb=settings.max_decoded_instance_mb,
                                              series_mb=settings.max_decoded_mb),
                   lung_method=settings.lung_method)


def write_outputs(analysis: Analysis, out_dir: Path) -> dict[str, Path]:
    """Save every object of :meth:`Analysis.objects` as a DICOM file under ``out_dir`` (atomically); returns
    key -> path."""
    from io import BytesIO

    from node.spool import atomic_write

    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for key, ds in analysis.objects():
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        path = out_dir / f"{key}-{ds.SOPInstanceUID}.dcm"
        atomic_write(path, [buf.getvalue()])
        paths[key] = path
    return paths
