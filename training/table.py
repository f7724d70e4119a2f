"""The tables of a schedule root (``python -m training.table runs/gpu``) as markdown: test figures as mean +- sd
over seeds with the seed-0 model's 95 % slice-bootstrap interval, the cross-validation of the candidates, and
the coach's erasure per pretraining epoch. Layout: training/schedule.py."""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import numpy as np

from .evaluation import CI_LEVEL, N_BOOTSTRAP

ROWS = [
    ("sinfnet", "SInfNet (compact Inf-Net, 40 labelled slices)"),
    ("sinfnet-aug04", "SInfNet + aug, cutout 0.4"),
    ("selfsup", "Self-supervised (coach + inpainting), fine-tuned"),
    ("selfsup-aug04", "Self-supervised + aug 0.4"),
    ("selfsup-raw-aug04", "Self-supervised, coach on raw scores (ablation) + aug 0.4"),
    ("semi", "Semi-Inf-Net (pseudo-label stage, fine-tuned) [pseudo labels saw validation]"),
    ("selfsup-semi-aug04", "Self-supervised + Semi-Inf-Net stage + aug 0.4 [pseudo labels saw validation]"),
]
SINGLE = [("mean_dice", "mean Dice"), ("dice", "Dice@0.5"), ("mean_sen", "Sen"), ("mean_spec", "Spec"),
          ("s_alpha", "S-alpha"), ("mean_e_phi", "E-phi"), ("mae", "MAE")]
MULTI = [("mean_dice_ggo", "GGO mean Dice"), ("mean_dice_consolidation", "Cons. mean Dice"),
         ("pooled_dice_ggo", "GGO pooled"), ("pooled_dice_consolidation", "Cons. pooled")]
CV_CANDIDATES = ("sinfnet-aug04", "selfsup-aug04", "selfsup-semi-aug04")
# (row, row it is compared with, the question): does pretraining help, does the coach's scaling matter
COMPARISONS = [
    ("selfsup", "sinfnet", "self-supervised pretraining, no augmentation"),
    ("selfsup-aug04", "sinfnet-aug04", "self-supervised pretraining, with augmentation"),
    ("selfsup-aug04", "selfsup-raw-aug04", "coach scores standardised x 8 against raw (ablation)"),
    ("selfsup-semi-aug04", "selfsup-aug04", "Semi-Inf-Net pseudo-label stage [pseudo labels saw validation]"),
]


def _load(p: Path) -> dict | None:
    return json.loads(p.read_text()) if p.exists() else None


def _seeds(root: Path) -> list[Path]:
    return sorted(root.glob("seed*"), key=lambda p: int(p.name[4:]))


def cell(values: list[float], seed0: dict | None) -> str:
    """mean +- sd over seeds (n), and the seed-0 model's interval."""
    if not values:
        return "—"
    text = f"{statistics.mean(values):.3f}"
    if len(values) > 1:
        text += f" ± {statistics.stdev(values):.3f} (n={len(values)})"
    if seed0:
        text += f" [{seed0['ci_low']:.3f}-{seed0['ci_high']:.3f}]"
    return text


def _figures(root: Path, folder: str, section: str, keys) -> list[str] | None:
    found = [(s, _load(s / folder / "test_metrics.json")) for s in _seeds(root)]
    found = [(s, t) for s, t in found if t and section in t]
    if not found:
        return None
    seed0 = next((t for s, t in found if s.name == "seed0"), None)
    return [cell([t[section][k]["value"] for _, t in found], seed0[section][k] if seed0 else None)
            for k, _ in keys]


def paired_difference(rows_a: list[list[dict]], rows_b: list[list[dict]], key: str = "mean_dice",
                      n_boot: int = N_BOOTSTRAP, seed: int = 0) -> dict | None:
    """Test figure ``key`` of row a minus row b, paired by seed (``rows_a[i]``, ``rows_b[i]``: the per-slice
    rows of one seed's models, the same slices in the same order): the per-seed differences, and the 95 %
    slice-bootstrap interval of the difference averaged over those seeds (slices resampled, paired)."""
    pairs = [(a, b) for a, b in zip(rows_a, rows_b) if a and b]
    if not pairs:
        return None
    per_slice = np.mean([[ra[key] - rb[key] for ra, rb in zip(a, b)] for a, b in pairs], axis=0)
    draws = np.random.default_rng(seed).integers(0, per_slice.size, size=(n_boot, per_slice.size))
    boot = per_slice[draws].mean(axis=1)
    lo, hi = (1 - CI_LEVEL) / 2 * 100, (1 + CI_LEVEL) / 2 * 100
    return {"per_seed": [float(np.mean([ra[key] for ra in a]) - np.mean([rb[key] for rb in b])) for a, b in pairs],
            "value": float(per_slice.mean()), "ci_low": float(np.percentile(boot, lo)),
            "ci_high": float(np.percentile(boot, hi))}


def _slice_rows(root: Path, folder: str) -> dict[str, list[dict]]:
    """Per seed folder name: the single-class test rows of ``folder``."""
    found = {s.name: _load(s / folder / "test_metrics.json") for s in _seeds(root)}
    return {name: t["single_rows"] for name, t in found.items() if t and "single_rows" in t}


def comparisons(root: Path) -> list[str]:
    lines = ["| comparison (test mean Dice, a - b) | per seed | mean | 95 % interval (paired slices) |",
             "|---|---|---|---|"]
    for a, b, question in COMPARISONS:
        rows_a, rows_b = _slice_rows(root, a), _slice_rows(root, b)
        seeds = sorted(set(rows_a) & set(rows_b), key=lambda n: int(n[4:]))
        diff = paired_difference([rows_a[n] for n in seeds], [rows_b[n] for n in seeds])
        if diff:
            per_seed = " ".join(f"{d:+.3f}" for d in diff["per_seed"])
            lines.append(f"| {a} - {b}: {question} | {per_seed} | {diff['value']:+.3f} | "
                         f"{diff['ci_low']:+.3f} to {diff['ci_high']:+.3f} |")
    return lines


def markdown(root: Path) -> str:
    lines = ["| row | " + " | ".join(h for _, h in SINGLE) + " |", "|---" * (len(SINGLE) + 1) + "|"]
    for key, label in ROWS:
        cells = _figures(root, key, "single", SINGLE)
        if cells:
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| multi-class net on the prior of | " + " | ".join(h for _, h in MULTI) + " |",
              "|---" * (len(MULTI) + 1) + "|"]
    for key, label in ROWS:
        cells = _figures(root, f"multi-{key}", "multi", MULTI)
        if cells:
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| candidate (5 grouped folds, seed 0) | fold validation mean Dice | mean |", "|---|---|---|"]
    for key in CV_CANDIDATES:
        scores = [(_load(f / "metrics.json") or {}).get("best_val", {}).get("val_mean_dice")
                  for f in sorted((root / "seed0" / f"cv-{key}").glob("fold*"))]
        scores = [s for s in scores if s is not None]
        if scores:
            mean = f"{statistics.mean(scores):.3f}" + (" (incomplete)" if len(scores) < 5 else "")
            lines.append(f"| {key} | {' '.join(f'{s:.3f}' for s in scores)} | {mean} |")
    lines += [""] + comparisons(root)
    lines += ["", "| pretraining | epoch: share of mask values < 0.1 / > 0.9 (requested erased 0.25) |", "|---|---|"]
    for stage in ("pretrain", "pretrain-raw"):
        m = _load(root / "stages" / stage / "metrics.json")
        if m:
            hist = ", ".join(f"{h['epoch']}: {h['share_erased']:.2f} / {h['share_kept']:.2f}" for h in m["history"])
            lines.append(f"| {stage} | {hist} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/gpu")))
