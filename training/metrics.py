"""Segmentation metrics, pure numpy. Conventions follow the Inf-Net evaluation toolbox (MATLAB) where it
defines one: prediction maps in [0, 1], ground truth binarised at 0.5, "mean" metrics over the 256 thresholds
of the 8-bit map (t = 0/255 ... 255/255, positive where pred >= t).
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


def thresholds_8bit():
    return np.arange(256) / 255.0


def mean_dice(pred, gt) -> float:
    """Mean Dice over the 256 thresholds of the 8-bit map (Inf-Net toolbox 'mean Dice')."""
    pred, gt = _prep(pred, gt)
    q = np.round(pred * 255).astype(np.int64).clip(0, 255)
    # histogram trick: counts of predicted levels inside / outside the GT
    h_in = np.bincount(q[gt], minlength=256)
    h_out = np.bincount(q[~gt], minlength=256)
    tp = np.cumsum(h_in[::-1])[::-1]   # pixels of GT with level >= t
    fp = np.cumsum(h_out[::-1])[::-1]
    fn = gt.sum() - tp
    den = 2 * tp + fp + fn
    d = np.where(den == 0, 1.0, 2 * tp / np.maximum(den, 1))
    return float(d.mean())


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


def mean_e_measure(pred, gt) -> float:
    """Mean E-phi over the 256 thresholds of the 8-bit map. Exact and vectorised: for a binary map the
    enhanced-alignment value of a pixel depends only on its (prediction, GT) pair, so the sum over pixels is a
    sum over the four confusion cells (checked against :func:`e_measure_binary` in the tests)."""
    pred, gt = _prep(pred, gt)
    q = np.round(pred * 255).astype(np.int64).clip(0, 255)
    h_in = np.bincount(q[gt], minlength=256)
    h_out = np.bincount(q[~gt], minlength=256)
    tp = np.cumsum(h_in[::-1])[::-1].astype(np.float64)
    fp = np.cumsum(h_out[::-1])[::-1].astype(np.float64)
    n_gt = float(gt.sum())
    n = float(gt.size)
    fn = n_gt - tp
    tn = (n - n_gt) - fp
    if n_gt == 0:
        total = tn + fn  # pixels predicted 0
    elif n_gt == n:
        total = tp + fp
    else:
        mu_f = (tp + fp) / n
        mu_g = n_gt / n
        total = np.zeros(256)
        for f, g, cnt in ((1, 1, tp), (1, 0, fp), (0, 1, fn), (0, 0, tn)):
            dfm = f - mu_f
            dgt = g - mu_g
            align = 2 * dgt * dfm / (dgt ** 2 + dfm ** 2 + EPS)
            total = total + cnt * (align + 1) ** 2 / 4
    return float(np.mean(total / (n - 1 + EPS)))


def binary_metrics(pred, gt, threshold: float = 0.5) -> dict:
    pred, gt = _prep(pred, gt)
    b = pred >= threshold
    return {
        "dice": dice(b, gt),
        "mean_dice": mean_dice(pred, gt),
        "sensitivity": sensitivity(b, gt),
        "specificity": specificity(b, gt),
        "s_alpha": s_measure(pred, gt),
        "e_phi_mean": mean_e_measure(pred, gt),
        "mae": mae(pred, gt),
    }


def multiclass_dice(label_pred, label_gt, classes=(1, 2)) -> dict:
    label_pred = np.asarray(label_pred)
    label_gt = np.asarray(label_gt)
    return {int(c): dice(label_pred == c, label_gt == c) for c in classes}


def average(rows: list[dict]) -> dict:
    keys = rows[0].keys() if rows else []
    return {k: float(np.mean([r[k] for r in rows])) for k in keys}
