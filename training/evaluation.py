"""Evaluation of a network on COVID-SemiSeg slices through the node's engine path, and slice-bootstrap intervals.

Every figure comes from :meth:`models.predict.InfNetPredictor.predict_crops`, the code the node's Inf-Net engine
runs: the slice (an 8-bit lung-window crop, as [0, 1]) is resized bilinearly without anti-aliasing to the
network size, normalised, run in the engine's precision (CUDA fp16, CPU fp32) with the engine's flip TTA when
asked, and the map resized back to the slice. Infection is ``probability >= 0.5`` (the engine's threshold);
consolidation is infection where the multi-class network (fed the binarised infection map as its prior) says
consolidation; GGO is infection minus consolidation: the node's definitions (node.pipeline.engines.infnet).

Single-class rows hold the Inf-Net toolbox's metrics (:mod:`training.toolbox`) and Dice@0.5; multi-class rows
hold per-slice toolbox mean Dice of the GGO and consolidation maps and the counts that pooled Dice sums.
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from models.predict import InfNetPredictor

from .toolbox import GT_LEVEL, toolbox_metrics

GGO_LABEL, CONSOLIDATION_LABEL = 1, 2
N_BOOTSTRAP = 2000
CI_LEVEL = 0.95


def engine_predictor(model: torch.nn.Module, size: int, device: str, tta: bool,
                     multi: torch.nn.Module | None = None, multi_size: int | None = None) -> InfNetPredictor:
    """The engine's predictor around in-memory networks (copies: the engine casts them to its precision)."""
    return InfNetPredictor(model=copy.deepcopy(model), meta={"name": "evaluated", "input": {"size": size}},
                           multiclass=None, device=device, tta=tta,
                           multi_model=copy.deepcopy(multi) if multi is not None else None,
                           multi_meta={"name": "evaluated", "input": {"size": multi_size or size}})


def _crops(images: list[np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(a, np.float32) / 255.0 for a in images]


def predict(predictor: InfNetPredictor, images: list[np.ndarray], batch: int = 8):
    """(probability maps, label maps or None) of 8-bit slices, each at its slice's size."""
    probs: list[np.ndarray] = []
    labels: list[np.ndarray] | None = [] if predictor.multi is not None else None
    for i in range(0, len(images), batch):
        p, lab = predictor.predict_crops(_crops(images[i:i + batch]))
        probs += p
        if labels is not None:
            labels += lab
    return probs, labels


def single_rows(predictor: InfNetPredictor, images: list[np.ndarray], masks: list[np.ndarray]) -> list[dict]:
    """Per slice: the toolbox metrics of the probability map and Dice@threshold (two empty masks: 1.0)."""
    probs, _ = predict(predictor, images)
    rows = []
    for p, m in zip(probs, masks):
        gt = np.asarray(m) > GT_LEVEL
        b = p >= predictor.threshold
        tp, den = int((b & gt).sum()), int(b.sum() + gt.sum())
        rows.append({**toolbox_metrics(p, gt), "dice": 1.0 if den == 0 else 2 * tp / den, "tp_infection": tp,
                     "den_infection": den})
    return rows


def multi_rows(predictor: InfNetPredictor, images: list[np.ndarray], labels: list[np.ndarray]) -> list[dict]:
    """Per slice, for GGO and consolidation as the node defines them: the toolbox mean Dice of the binary map
    (what the toolbox gives for a saved binary map) and the TP / |P| + |G| counts of pooled Dice."""
    probs, pred_labels = predict(predictor, images)
    if pred_labels is None:
        raise ValueError("multi-class evaluation needs the predictor's multi-class network")
    rows = []
    for p, lab, g in zip(probs, pred_labels, labels):
        infection = p >= predictor.threshold
        consolidation = infection & (lab == CONSOLIDATION_LABEL)
        pred = {"ggo": infection & ~consolidation, "consolidation": consolidation}
        g = np.asarray(g)
        truth = {"ggo": g == GGO_LABEL, "consolidation": g == CONSOLIDATION_LABEL}
        row = {}
        for k in pred:
            row[f"mean_dice_{k}"] = toolbox_metrics(pred[k].astype(np.float32), truth[k])["mean_dice"]
            row[f"tp_{k}"] = int((pred[k] & truth[k]).sum())
            row[f"den_{k}"] = int(pred[k].sum() + truth[k].sum())
        rows.append(row)
    return rows


def _statistic(rows: list[dict], key: str, idx: np.ndarray) -> float:
    if key.startswith("pooled_"):
        cls = key.removeprefix("pooled_dice_")
        tp = sum(rows[i][f"tp_{cls}"] for i in idx)
        den = sum(rows[i][f"den_{cls}"] for i in idx)
        return 2 * tp / den if den else float("nan")
    return float(np.mean([rows[i][key] for i in idx]))


def summarise(rows: list[dict], keys: list[str], n_boot: int = N_BOOTSTRAP, seed: int = 0) -> dict:
    """Each key's data set figure (mean over slices; ``pooled_dice_CLASS``: pooled Dice) with a percentile
    slice-bootstrap interval: {key: {"value", "ci_low", "ci_high"}}."""
    rng = np.random.default_rng(seed)
    n = len(rows)
    draws = rng.integers(0, n, size=(n_boot, n))
    lo, hi = (1 - CI_LEVEL) / 2 * 100, (1 + CI_LEVEL) / 2 * 100
    out = {}
    for k in keys:
        boot = np.array([_statistic(rows, k, d) for d in draws])
        out[k] = {"value": _statistic(rows, k, np.arange(n)), "ci_low": float(np.nanpercentile(boot, lo)),
                  "ci_high": float(np.nanpercentile(boot, hi))}
    return out
