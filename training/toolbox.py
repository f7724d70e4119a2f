"""The Inf-Net evaluation toolbox's per-image metrics (Fan et al., IEEE TMI 2020; the MATLAB ``EvaluationTool``
published with Inf-Net), in numpy. The anchors' figures (Inf-Net 0.682 Dice, Semi-Inf-Net 0.739) are these.

For one prediction map and one ground truth, exactly as the toolbox computes them:

* the map is stored as an 8-bit image (the test script writes PNGs), read back, and min-max normalised to
  [0, 1] (``mapminmax``); a constant map becomes all zeros. The ground truth is ``gt > 128`` of the 8-bit mask.
* 256 thresholds ``t = 1, 1 - 1/255, ..., 0``; the binary map is ``map >= t``. At each threshold, with TP the
  pixels predicted and true, **Dice, sensitivity and specificity are 0 when TP is 0** (also when both the
  map and the ground truth are empty), else 2TP / (|P| + |G|), TP / |G| and TN / (TN + FP).
  "Mean Dice", "mean Sen", "mean Spec" and "mean E-phi" are the means over the 256 thresholds.
* S-alpha (structure measure, alpha 0.5) and MAE are computed on the normalised map.

The data set figure is the mean of the per-image values over the test images.
"""
from __future__ import annotations

import numpy as np

from .metrics import mean_e_measure_counts, s_measure

N_THRESHOLDS = 256
THRESHOLDS = np.linspace(1.0, 0.0, N_THRESHOLDS)  # MATLAB 1:-1/255:0
GT_LEVEL = 128                                     # the toolbox's ``gt > 128`` on the 8-bit mask
METRICS = ("mean_dice", "mean_sen", "mean_spec", "s_alpha", "mean_e_phi", "mae")


def as_saved_map(probability: np.ndarray) -> np.ndarray:
    """A probability map as the toolbox reads it: quantised to 8 bits, then min-max normalised to [0, 1]."""
    q = np.round(np.clip(np.asarray(probability, np.float64), 0.0, 1.0) * 255.0)
    lo, hi = q.min(), q.max()
    return np.zeros_like(q) if hi == lo else (q - lo) / (hi - lo)


def _counts(sal: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """TP and FP at each of :data:`THRESHOLDS` (pixels with ``sal >= t`` inside / outside the truth)."""
    inside = np.sort(sal[gt])
    outside = np.sort(sal[~gt])
    tp = inside.size - np.searchsorted(inside, THRESHOLDS, side="left")
    fp = outside.size - np.searchsorted(outside, THRESHOLDS, side="left")
    return tp.astype(np.float64), fp.astype(np.float64)


def toolbox_metrics(probability: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """The toolbox's metrics of one image: ``probability`` in [0, 1], ``gt`` a boolean mask of the same shape."""
    gt = np.asarray(gt, bool)
    if gt.shape != np.shape(probability):
        raise ValueError(f"shape mismatch {np.shape(probability)} vs {gt.shape}")
    sal = as_saved_map(probability)
    tp, fp = _counts(sal, gt)
    n_gt, n = float(gt.sum()), float(gt.size)
    tn = (n - n_gt) - fp
    hit = tp > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        dice = np.where(hit, 2 * tp / (n_gt + tp + fp), 0.0)
        sen = np.where(hit, tp / max(n_gt, 1.0), 0.0)
        spec = np.where(hit, tn / np.maximum(tn + fp, 1.0), 0.0)
    return {
        "mean_dice": float(dice.mean()),
        "mean_sen": float(sen.mean()),
        "mean_spec": float(spec.mean()),
        "s_alpha": s_measure(sal, gt),
        "mean_e_phi": float(mean_e_measure_counts(tp, fp, n_gt, n).mean()),
        "mae": float(np.abs(sal - gt).mean()),
    }
