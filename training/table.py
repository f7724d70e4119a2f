"""Print the experiment table of a schedule root (``python -m training.table runs/cpu``) as markdown."""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROWS = [
    ("sinfnet", "SInfNet (compact Inf-Net, 50->40 labelled)"),
    ("sinfnet-aug02", "SInfNet + aug, cutout 0.2"),
    ("sinfnet-aug04", "SInfNet + aug, cutout 0.4"),
    ("sinfnet-aug05", "SInfNet + aug, cutout 0.5"),
    ("selfsup", "Self-supervised (coach+inpainting pretrain, fine-tune)"),
    ("selfsup-aug04", "Self-supervised + aug (cutout 0.4)"),
    ("semi", "Semi-Inf-Net (pseudo-label stage, fine-tune)"),
    ("selfsup-semi-aug04", "Self-supervised + Semi-Inf-Net pseudo stage + aug 0.4"),
    ("selfsup-semi-aug04", "the same, flip TTA; multi-class net trained on its prior (as the engine runs them)",
     "test_metrics_tta.json", "test_multi_ownprior_tta.json"),
]


def _load(p: Path):
    return json.loads(p.read_text()) if p.exists() else None


def _f(x, nd=3):
    return "—" if x is None else f"{x:.{nd}f}"


def rows(root: Path):
    out = []
    for key, label, *files in ROWS:
        d = root / key
        test_file, multi_file = files or ("test_metrics.json", "test_multi.json")
        m, t, mm, c = (_load(d / n) for n in ("metrics.json", test_file, multi_file, "config.json"))
        if m is None and t is None:
            continue
        wall = (m or {}).get("wall_s_this_session", 0.0)
        if key == "semi":
            wall += (_load(root / "semi-pseudo" / "metrics.json") or {}).get("wall_s_this_session", 0.0)
        if key.startswith("selfsup"):
            wall += (_load(root / "pretrain" / "metrics.json") or {}).get("wall_s_this_session", 0.0)
        if key == "selfsup-semi-aug04":
            wall += (_load(root / "selfsup-semi-pseudo" / "metrics.json") or {}).get("wall_s_this_session", 0.0)
        out.append(dict(key=key, label=label, seed=(c or {}).get("seed"), val=(m or {}).get("best_val") or {},
                        test=t or {}, multi=mm or {}, wall_min=wall / 60))
    return out


def markdown(root: Path) -> str:
    hdr = ("| row | val mDice (epoch) | test loss | Dice@0.5 | mean Dice | Sen | Spec | S-alpha | E-phi mean | MAE "
           "| multi test loss | GGO Dice (pooled / per-slice) | Cons. Dice (pooled / per-slice) | seed | wall (min) |")
    lines = [hdr, "|" + "---|" * 15]
    for r in rows(root):
        t, v, mm = r["test"], r["val"], r["multi"]
        lines.append(
            f"| {r['label']} | {_f(v.get('val_mean_dice'))} ({v.get('epoch', '—')}) | {_f(t.get('loss'))} | "
            f"{_f(t.get('dice'))} | {_f(t.get('mean_dice'))} | {_f(t.get('sensitivity'))} | "
            f"{_f(t.get('specificity'))} | {_f(t.get('s_alpha'))} | {_f(t.get('e_phi_mean'))} | {_f(t.get('mae'))} | "
            f"{_f(mm.get('loss'))} | {_f(mm.get('pooled_dice_ggo'))} / {_f(mm.get('dice_ggo'))} | "
            f"{_f(mm.get('pooled_dice_consolidation'))} / {_f(mm.get('dice_consolidation'))} | {r['seed']} | "
            f"{r['wall_min']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/cpu")))
