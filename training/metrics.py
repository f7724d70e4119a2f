"""Segmentation metric building blocks, pure numpy: Dice at one threshold (empty vs empty counts 1.0),
sensitivity, specificity, the structure measure S-alpha and the enhanced-alignment measure E-phi. The Inf-Net
toolbox's per-image figures, which the anchors report, are assembled from them in :mod:`training.toolbox`.
"""
from __future__ import annotations

import numpy as np

from models.metrics import dice as _dice

EPS = np.finfo(np.float64).eps


def _prep(pred, gt):
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt) > 0.5
    if pred.shape != gt.shape:
        raise ValueError(f"shape mismatch {pred.shape} vs {gt.shape}")
    return pred, gt


def confusion(binary, gt):
    binary = np.asarray(binary, bool)
    gt = np.asarray(gt) > 0.5
    tp = float(np.sum(binary & gt))
    fp = float(np.sum(binary & ~gt))
    fn = float(np.sum(~binary & gt))
    tn = float(np.sum(~binary & ~gt))
    return tp, fp, fn, tn


def dice(binary, gt) -> float:
    """2TP / (2TP + FP + FN) (:func:`models.metrics.dice`, ground truth binarised at 0.5); 1.0 when both
    are empty, as in the Inf-Net toolbox."""
    return _dice(np.asarray(binary, bool), np.asarray(gt) > 0.5, empty=1.0)


def sensitivity(binary, gt) -> float:
    tp, _, fn, _ = confusion(binary, gt)
    return 1.0 if tp + fn == 0 else tp / (tp + fn)


def specificity(binary, gt) -> float:
    _, fp, _, tn = confusion(binary, gt)
    return 1.0 if tn + fp == 0 else tn / (tn + fp)


def mae(pred, gt) -> float:
    pred, gt = _prep(pred, gt)
    return float(np.mean(np.abs(pred - gt)))


def _ssim_region(pred, gt):
    n = pred.size
    if n <= 1:
        return 1.0 if n == 0 else float(1 - abs(pred.mean() - gt.mean()))
    x, y = pred.mean(), gt.mean()
    sx = ((pred - x) ** 2).sum() / (n - 1)
    sy = ((gt - y) ** 2).sum() / (n - 1)
    sxy = ((pred - x) * (gt - y)).sum() / (n - 1)
    a = 4 * x * y * sxy
    b = (x ** 2 + y ** 2) * (sx + sy)
    if a != 0:
        return a / (b + EPS)
    if a == 0 and b == 0:
        return 1.0
    return 0.0


def _object(pred, gt):
    x = pred[gt]
    if x.size == 0:
        return 0.0
    mu = x.mean()
    sigma = x.std(ddof=1) if x.size > 1 else 0.0
    return 2 * mu / (mu ** 2 + 1 + sigma + EPS)


def s_measure(pred, gt, alpha: float = 0.5) -> float:
    """Structure measure S-alpha (Fan et al., ICCV 2017), as in the Inf-Net / SOD toolboxes."""
    pred, gt = _prep(pred, gt)
    y = gt.mean()
    if y == 0:
        return float(1 - pred.mean())
    if y == 1:
        return float(pred.mean())
    # object-aware
    fg = np.where(gt, pred, 0.0)
    bg = np.where(~gt, 1 - pred, 0.0)
    s_obj = y * _object(fg, gt) + (1 - y) * _object(bg, ~gt)
    # region-aware: split at the GT centroid (MATLAB 1-based rounding)
    h, w = gt.shape
    total = gt.sum()
    X = int(np.round((gt.sum(0) * np.arange(1, w + 1)).sum() / total))
    Y = int(np.round((gt.sum(1) * np.arange(1, h + 1)).sum() / total))
    area = h * w
    w1 = X * Y / area
    w2 = (w - X) * Y / area
    w3 = X * (h - Y) / area
    w4 = 1 - w1 - w2 - w3
    g = gt.astype(np.float64)
    q = (w1 * _ssim_region(pred[:Y, :X], g[:Y, :X]) + w2 * _ssim_region(pred[:Y, X:], g[:Y, X:])
         + w3 * _ssim_region(pred[Y:, :X], g[Y:, :X]) + w4 * _ssim_region(pred[Y:, X:], g[Y:, X:]))
    s = alpha * s_obj + (1 - alpha) * q
    return float(max(s, 0.0))


def e_measure_binary(fm, gt) -> float:
    """Enhanced-alignment measure of a binary map (Fan et al., IJCAI 2018)."""
    fm = np.asarray(fm, bool)
    gt = np.asarray(gt) > 0.5
    if gt.sum() == 0:
        enhanced = 1.0 - fm
    elif (~gt).sum() == 0:
        enhanced = fm.astype(np.float64)
    else:
        dfm = fm - fm.mean()
        dgt = gt - gt.mean()
        align = 2 * dgt * dfm / (dgt ** 2 + dfm ** 2 + EPS)
        enhanced = (align + 1) ** 2 / 4
    return float(enhanced.sum() / (gt.size - 1 + EPS))


def mean_e_measure_counts(tp: np.ndarray, fp: np.ndarray, n_gt: float, n: float) -> np.ndarray:
    """E-phi of the binary maps of several thresholds from their TP and FP counts (arrays), exactly: for a
    binary map the enhanced-alignment value of a pixel depends only on its (prediction, truth) pair, so the sum
    over pixels is a sum over the four confusion cells (checked against :func:`e_measure_binary` in the
    tests). ``n_gt`` pixels are true of ``n``."""
    tp, fp = np.asarray(tp, np.float64), np.asarray(fp, np.float64)
    fn = n_gt - tp
    tn = (n - n_gt) - fp
    if n_gt == 0:
        total = tn + fn  # pixels predicted 0
    elif n_gt == n:
        total = tp + fp
    else:
        mu_f = (tp + fp) / n
        mu_g = n_gt / n
        total = np.zeros_like(tp)
        for f, g, cnt in ((1, 1, tp), (1, 0, fp), (0, 1, fn), (0, 0, tn)):
            dfm = f - mu_f
            dgt = g - mu_g
            align = 2 * dgt * dfm / (dgt ** 2 + dfm ** 2 + EPS)
            total = total + cnt * (align + 1) ** 2 / 4
    return total / (n - 1 + EPS)


def multiclass_dice(label_pred, label_gt, classes=(1, 2)) -> dict:
    label_pred = np.asarray(label_pred)
    label_gt = np.asarray(label_gt)
    return {int(c): dice(label_pred == c, label_gt == c) for c in classes}


def average(rows: list[dict]) -> dict:
    keys = rows[0].keys() if rows else []
    return {k: float(np.mean([r[k] for r in rows])) for k in keys}
