"""The tables of a schedule root (``python -m training.table runs/gpu``) as markdown: test figures as mean +- sd
over seeds with the seed-0 model's 95 % slice-bootstrap interval, the cross-validation of the candidates, and
the coach's erasure per pretraining epoch. Layout: training/schedule.py."""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

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
    lines += ["", "| pretraining | epoch: share of mask values < 0.1 / > 0.9 (requested erased 0.25) |", "|---|---|"]
    for stage in ("pretrain", "pretrain-raw"):
        m = _load(root / "stages" / stage / "metrics.json")
        if m:
            hist = ", ".join(f"{h['epoch']}: {h['share_erased']:.2f} / {h['share_kept']:.2f}" for h in m["history"])
            lines.append(f"| {stage} | {hist} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/gpu")))
