"""One-off analysis: which HU window makes real DICOM axial slices look like the COVID-SemiSeg training images?

Method (results in docs/results.md, "Lung window"):
1. Training images (8-bit, already windowed): pooled histogram of the 50 doctor-labelled slices; find the two
   modes -- aerated lung parenchyma (dark mode, searched in 10..120) and soft tissue (bright mode, searched
   in 150..245; 248..255 is the saturated bone/contrast pile-up).
2. Real axial slices (../shared/data/dicom/ny-sbu/*/axial/*.dcm, HU = stored * slope + intercept): body =
   largest connected component of HU > -500, holes filled; lung = HU < -500 inside the filled body; pooled
   histograms give the parenchyma mode (in -1000..-600 HU) and the soft-tissue mode (in -100..150 HU).
   (muscle mode searched in 0..150 HU: fat dominates the body outside the lungs and is not the target.)
   Also the pooled HU of each slice's lung bounding-box crop (as the training images are crops to the lungs).
3. Mode method (used): the window is the linear map sending the two HU modes to the two 8-bit modes:
   v = 255 * (HU - lo) / W  ->  W = 255 * (hu_st - hu_lung) / (v_st - v_lung),  lo = hu_lung - v_lung * W / 255.

4. Quantile method (reported, not used: it is confounded by how much body tissue each crop holds): least-squares line through the (HU, 8-bit) pairs of the 5th..90th percentiles of
   the DICOM lung-box crops and of the training images; the rms error of candidate windows is printed.

Imports pydicom lazily (only this script needs it); the node and training packages never do.
Usage: python -m training.hu_window_analysis [--dicom DIR (default $CTNODE_DATA/dicom/ny-sbu)] [--data DIR]
"""
from __future__ import annotations

import argparse
import glob
import json

import numpy as np
from scipy import ndimage

from .data import load_split
from .paths import data_root, semiseg_root


def smooth_mode(hist: np.ndarray, lo: int, hi: int, sigma: float = 2.0) -> int:
    h = ndimage.gaussian_filter1d(hist.astype(float), sigma)
    return lo + int(np.argmax(h[lo:hi]))


def training_modes(root=None):
    d = load_split("doctor", root)
    v = np.concatenate([a.ravel() for a in d.images])
    hist = np.bincount(v, minlength=256)
    return smooth_mode(hist, 10, 120), smooth_mode(hist, 150, 246), hist


def dicom_modes(pattern):
    import pydicom  # lazy: analysis only

    lung_vals, body_vals, used, crops = [], [], [], []
    for f in sorted(glob.glob(pattern)):
        ds = pydicom.dcmread(f)
        hu = ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1)) + float(
            getattr(ds, "RescaleIntercept", 0))
        lab, n = ndimage.label(hu > -500)
        if n == 0:
            continue
        body = lab == (1 + np.argmax(ndimage.sum(np.ones_like(hu), lab, range(1, n + 1))))
        body = ndimage.binary_fill_holes(body)
        lung = body & (hu < -500)
        if lung.sum() < 0.03 * body.sum():  # abdomen slices: no lung
            continue
        used.append(f)
        lung_vals.append(hu[lung])
        body_vals.append(hu[body & ~lung])
        # crop to the lung bounding box, as the training images are
        lung_o = ndimage.binary_opening(lung, iterations=2)
        rr, cc = np.flatnonzero(lung_o.any(1)), np.flatnonzero(lung_o.any(0))
        crops.append(hu[rr[0]:rr[-1] + 1, cc[0]:cc[-1] + 1].ravel())
    lv = np.concatenate(lung_vals)
    bv = np.concatenate(body_vals)
    hl, el = np.histogram(lv, bins=np.arange(-1024, -399, 4))
    hb, eb = np.histogram(bv, bins=np.arange(-200, 301, 4))
    m_l = el[smooth_mode(hl, 0, np.searchsorted(el, -600))] + 2
    m_b = eb[smooth_mode(hb, np.searchsorted(eb, 0), np.searchsorted(eb, 150))] + 2
    return float(m_l), float(m_b), used, np.concatenate(crops)


QUANTILES = np.arange(5, 91, 5)


def quantile_fit(train_hist, crop_hu):
    """Least-squares linear map HU -> 8-bit matching the quantiles of the pooled lung-box crops of the DICOM
    slices to the quantiles of the training images (5th..90th percentile, below the 255 saturation)."""
    cdf = np.cumsum(train_hist) / train_hist.sum()
    qv = np.array([np.searchsorted(cdf, q / 100) for q in QUANTILES], float)
    qh = np.percentile(crop_hu, QUANTILES)
    a, b = np.polyfit(qh, qv, 1)
    W = 255 / a
    lo = -b / a
    resid = float(np.sqrt(np.mean((a * qh + b - qv) ** 2)))
    return lo, W, resid, qh, qv


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--dicom", default=str(data_root() / "dicom" / "ny-sbu"))
    p.add_argument("--data", default=str(semiseg_root()))
    a = p.parse_args(argv)
    v_lung, v_st, hist = training_modes(a.data)
    hu_lung, hu_st, used, crop_hu = dicom_modes(f"{a.dicom}/*/axial/*.dcm")
    W = 255 * (hu_st - hu_lung) / (v_st - v_lung)
    lo = hu_lung - v_lung * W / 255
    res = {"train_mode_lung_8bit": v_lung, "train_mode_soft_tissue_8bit": v_st, "dicom_mode_lung_hu": hu_lung,
           "dicom_mode_soft_tissue_hu": hu_st, "n_dicom_slices_used": len(used), "window_lo_hu": lo,
           "window_hi_hu": lo + W, "window_width": W, "window_centre": lo + W / 2}
    qlo, qW, resid, qh, qv = quantile_fit(hist, crop_hu)
    res["quantile_fit"] = {"window_lo_hu": qlo, "window_width": qW, "window_centre": qlo + qW / 2,
                           "rms_residual_8bit": resid, "quantiles": QUANTILES.tolist(),
                           "dicom_hu": np.round(qh, 1).tolist(), "train_8bit": qv.tolist()}
    for c, w in ((-600, 1500), (-500, 1400), (-600, 1200), (res["quantile_fit"]["window_centre"], qW)):
        v = np.clip((np.percentile(crop_hu, QUANTILES) - (c - w / 2)) / w * 255, 0, 255)
        res[f"rms_8bit_quantile_error_C{c:.0f}_W{w:.0f}"] = float(np.sqrt(np.mean((v - qv) ** 2)))
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
