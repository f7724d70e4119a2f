"""Inf-Net prediction on a CT volume: HU volume + lung mask in, probability map (and consolidation) out.

Preprocessing makes DICOM slices look like the COVID-SemiSeg training images (see docs/results.md,
"Lung window"): HU -> lung window -> [0, 1]; crop to the bounding box of the lung mask on that slice (plus a
margin, as the training crops are cropped to the lungs); resize the crop to the model size (352); predict;
resize the probability map back to the crop's exact size and paste it at the crop's exact position, so the
result is on the source voxel grid. The probability map covers each slice's whole lung box (not only the
lung mask). Only slices that contain lung are run, in batches. CUDA half precision when available, else CPU
fp32.

Imports numpy and torch only: the node wraps :class:`InfNetPredictor` into its engine interface
(``node.pipeline.engines.infnet``).
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .registry import load_shipped
from .tta import final_probability

VERSION = "0.1.0"  # of this prediction code: the node records it as the engine version
# Lung window measured against the training images (training/hu_window_analysis.py, docs/results.md).
DEFAULT_WINDOW = (-400.0, 1300.0)  # (centre, width) in HU: maps air -1000 -> 10, lung -822 -> 45, muscle 30 -> 211 (8-bit)
IMG_MEAN, IMG_STD = 0.5, 0.25
CONSOLIDATION_LABEL = 2  # multi-class network output: 0 background, 1 GGO, 2 consolidation

log = logging.getLogger(__name__)
_warned_cpu = False


def choose_device(requested: str | None) -> torch.device:
    """CUDA when asked for or available ("auto"/None), otherwise the CPU; falling back to the CPU without being
    asked to logs one warning per process (with CUDA's reason when it has one), so a missing GPU is seen once,
    not per slice or per study batch."""
    global _warned_cpu
    if requested == "cpu":
        return torch.device("cpu")
    with warnings.catch_warnings(record=True) as caught:  # torch says why CUDA failed to start as a warning
        warnings.simplefilter("always")
        if torch.cuda.is_available():
            return torch.device("cuda")
    if not _warned_cpu:
        asked = "processing.device is \"cuda\" but " if requested == "cuda" else ""
        why = str(caught[0].message).split(" (Triggered internally")[0] if caught else "no CUDA GPU is available"
        log.warning("%sCUDA cannot be used (%s): the Inf-Net engine runs on the CPU in fp32 (slower; set "
                    "processing.device = \"cpu\" to make this the intended setting)", asked, why)
        _warned_cpu = True
    return torch.device("cpu")


def window_hu(hu: np.ndarray, centre: float, width: float) -> np.ndarray:
    lo = centre - width / 2
    return np.clip((hu.astype(np.float32) - lo) / width, 0.0, 1.0)


def lung_bbox(mask2d: np.ndarray, margin: float = 0.05, min_margin: int = 4):
    """(r0, r1, c0, c1), half-open, of the mask plus a margin of ``margin`` * extent (at least min_margin)."""
    rows = np.flatnonzero(mask2d.any(1))
    cols = np.flatnonzero(mask2d.any(0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    mr = max(min_margin, int(round(margin * (r1 - r0))))
    mc = max(min_margin, int(round(margin * (c1 - c0))))
    h, w = mask2d.shape
    return max(0, r0 - mr), min(h, r1 + mr), max(0, c0 - mc), min(w, c1 + mc)


@dataclass
class Prediction:
    """What :meth:`InfNetPredictor.predict` returns, on the input's voxel grid."""

    probability: np.ndarray             # float32 0..1 over each slice's lung box, 0 elsewhere
    consolidation: np.ndarray | None    # bool, where the multi-class network says consolidation; None without it


class InfNetPredictor:
    """Options: ``weights`` (shipped name), ``multiclass`` (shipped name or None/"" to disable), ``device``
    ("cuda"/"cpu"/None=auto), ``batch``, ``threshold``, ``window`` (centre, width), ``size`` (model input),
    ``tta`` (average the map over four flips, :mod:`models.tta`; None = as the weights' sidecar says)."""

    def __init__(self, weights: str = "infnet-compact", multiclass: str | None = "infnet-multiclass",
                 device: str | None = None, batch: int = 8, threshold: float = 0.5,
                 window: tuple[float, float] = DEFAULT_WINDOW, size: int | None = None, weights_dir=None,
                 model=None, meta=None, tta: bool | None = None, multi_model=None, multi_meta=None):
        self.device = choose_device(device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        if model is None:
            model, meta = load_shipped(weights, weights_dir, self.device, self.dtype)
        else:
            model = model.to(self.device, self.dtype).eval()
            meta = meta or {"name": "custom", "sha256": ""}
        self.model, self.meta = model, meta
        self.multi, self.multi_meta = None, None
        if multi_model is not None:  # an in-memory multi-class network (evaluation of a training run)
            self.multi = multi_model.to(self.device, self.dtype).eval()
            self.multi_meta = multi_meta or {"name": "custom", "sha256": ""}
        elif multiclass:
            try:
                self.multi, self.multi_meta = load_shipped(multiclass, weights_dir, self.device, self.dtype)
            except FileNotFoundError:
                self.multi = None
        self.size = int(size or (meta.get("input") or {}).get("size") or 352)
        # each network runs at the size it was trained at; ``size`` overrides the single-class one only
        self.multi_size = int(((self.multi_meta or {}).get("input") or {}).get("size") or self.size)
        self.tta = ((meta.get("inference") or {}).get("tta") == "flips") if tta is None else tta
        self.batch = batch
        self.threshold = threshold
        self.window = tuple(window)

    @property
    def description(self) -> str:
        """The networks, their weights and the TTA, in one line."""
        meta = self.meta
        desc = f"Inf-Net ({meta.get('arch', '?')}, weights {meta.get('name', '?')}{', flip TTA' if self.tta else ''})"
        if self.multi is not None:
            desc += f"; multi-class {self.multi_meta.get('name')} sha256 {self.multi_meta.get('sha256', '')[:16]}"
        return desc

    @property
    def device_label(self) -> str:
        """Where the networks run and in which precision: "cuda float16" or "cpu float32"."""
        return f"{self.device.type} {str(self.dtype).removeprefix('torch.')}"

    # --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_crops(self, crops: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        """Windowed [0, 1] 2-D crops of any size -> (probability maps, multi-class label maps or None), each at
        its crop's size. The one implementation of resize, normalisation, precision, TTA and the multi-class
        prior: :meth:`predict` runs it on lung boxes, training's evaluation on the data set's slices."""
        s = self.size
        x = torch.stack([F.interpolate(torch.from_numpy(c)[None, None], size=(s, s), mode="bilinear",
                                       align_corners=False)[0] for c in crops])
        x = ((x - IMG_MEAN) / IMG_STD).to(self.device, self.dtype)
        prob_s = final_probability(self.model, x, self.tta)
        labels_s = None
        if self.multi is not None:
            xm, pm = x, prob_s
            if self.multi_size != s:
                m = (self.multi_size, self.multi_size)
                xm = F.interpolate(x, size=m, mode="bilinear", align_corners=False)
                pm = F.interpolate(prob_s, size=m, mode="bilinear", align_corners=False)
            labels_s = self.multi(torch.cat([xm, (pm >= self.threshold).to(self.dtype)], 1)).float()
        probs, labels = [], []
        for i, c in enumerate(crops):
            p = F.interpolate(prob_s[i:i + 1], size=c.shape, mode="bilinear", align_corners=False)[0, 0]
            probs.append(p.cpu().numpy())
            if labels_s is not None:
                lg = F.interpolate(labels_s[i:i + 1], size=c.shape, mode="bilinear", align_corners=False)
                labels.append(lg.argmax(1)[0].cpu().numpy().astype(np.uint8))
        return probs, (labels if labels_s is not None else None)

    def predict(self, hu: np.ndarray, lung: np.ndarray) -> Prediction:
        """``hu`` (slices, rows, cols) in HU and the boolean ``lung`` mask of the same shape -> :class:`Prediction`."""
        if lung.shape != hu.shape:
            raise ValueError(f"lung mask {lung.shape} does not match volume {hu.shape}")
        prob = np.zeros(hu.shape, np.float32)
        cons = np.zeros(hu.shape, bool) if self.multi is not None else None
        ks = [k for k in range(hu.shape[0]) if lung[k].any()]
        for i in range(0, len(ks), self.batch):
            chunk = ks[i:i + self.batch]
            boxes = [lung_bbox(lung[k]) for k in chunk]
            crops = [window_hu(hu[k, r0:r1, c0:c1], *self.window) for k, (r0, r1, c0, c1) in zip(chunk, boxes)]
            probs, labels = self.predict_crops(crops)
            for j, (k, (r0, r1, c0, c1)) in enumerate(zip(chunk, boxes)):
                prob[k, r0:r1, c0:c1] = probs[j]
                if labels is not None:
                    cons[k, r0:r1, c0:c1] = labels[j] == CONSOLIDATION_LABEL
        return Prediction(probability=prob, consolidation=cons)
