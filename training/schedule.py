"""The whole experiment table in ONE process (data decoded once, shared by all runs), then the table.

    python -m training.schedule --preset gpu-full --root runs/gpu [--device cuda]

Same runs as training/schedule.sh (each equals the ``python -m training ...`` command printed in the log).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from .cli import main as cli
from .table import markdown


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="gpu-full")
    p.add_argument("--root", default="runs/gpu")
    p.add_argument("--device")
    a = p.parse_args(argv)
    R, P = a.root, ["--preset", a.preset] + (["--device", a.device] if a.device else [])
    t0 = time.time()
    plan = [
        ("sinfnet", ["train", "--run-dir", f"{R}/sinfnet"]),
        ("sinfnet-aug04", ["train", "--run-dir", f"{R}/sinfnet-aug04", "--aug", "--cutout", "0.4"]),
        ("multi", ["train-multi", "--run-dir", f"{R}/multi"]),
        ("sinfnet-aug02", ["train", "--run-dir", f"{R}/sinfnet-aug02", "--aug", "--cutout", "0.2"]),
        ("sinfnet-aug05", ["train", "--run-dir", f"{R}/sinfnet-aug05", "--aug", "--cutout", "0.5"]),
        ("pretrain", ["pretrain", "--run-dir", f"{R}/pretrain"]),
        ("selfsup", ["train", "--run-dir", f"{R}/selfsup", "--init", f"{R}/pretrain/pretrained.pt"]),
        ("selfsup-aug04", ["train", "--run-dir", f"{R}/selfsup-aug04", "--init", f"{R}/pretrain/pretrained.pt",
                           "--aug", "--cutout", "0.4"]),
        ("semi-pseudo", ["train", "--run-dir", f"{R}/semi-pseudo", "--train-set", "pseudo"]),
        ("semi", ["train", "--run-dir", f"{R}/semi", "--init", f"{R}/semi-pseudo/best.pt"]),
        # the best recipe of the CPU tables (docs/results.md): self-supervised pretraining, Semi-Inf-Net's
        # pseudo-label stage with augmentation, fine-tuning with augmentation; then the multi-class net on the
        # prior that model gives (what the engine feeds it)
        ("selfsup-semi-pseudo", ["train", "--run-dir", f"{R}/selfsup-semi-pseudo", "--train-set", "pseudo",
                                 "--aug", "--cutout", "0.4", "--init", f"{R}/pretrain/pretrained.pt"]),
        ("selfsup-semi-aug04", ["train", "--run-dir", f"{R}/selfsup-semi-aug04", "--aug", "--cutout", "0.4",
                                "--init", f"{R}/selfsup-semi-pseudo/best.pt"]),
        ("multi-ownprior", ["train-multi", "--run-dir", f"{R}/multi-ownprior",
                            "--prior-ckpt", f"{R}/selfsup-semi-aug04/best.pt"]),
    ]
    for name, args in plan:
        if (Path(R) / name / "metrics.json").exists():
            continue
        print(f"== {name}: python -m training {' '.join(args + P)}  [{time.time() - t0:.0f}s]", flush=True)
        cli(args + P)
    for r in ("sinfnet", "sinfnet-aug02", "sinfnet-aug04", "sinfnet-aug05", "selfsup", "selfsup-aug04", "semi",
              "selfsup-semi-aug04"):
        ck = Path(R) / r / "best.pt"
        if not ck.exists():
            continue
        if not (Path(R) / r / "test_metrics.json").exists():
            cli(["evaluate", "--ckpt", str(ck)] + P)
        if (Path(R) / "multi" / "best.pt").exists() and not (Path(R) / r / "test_multi.json").exists():
            cli(["evaluate", "--ckpt", f"{R}/multi/best.pt", "--prior-ckpt", str(ck), "--out",
                 f"{R}/{r}/test_multi.json"] + P)
    best = Path(R) / "selfsup-semi-aug04"
    if (best / "best.pt").exists() and not (best / "test_metrics_tta.json").exists():  # as the engine runs it
        cli(["evaluate", "--ckpt", str(best / "best.pt"), "--tta", "--out", str(best / "test_metrics_tta.json")] + P)
        cli(["evaluate", "--ckpt", f"{R}/multi-ownprior/best.pt", "--prior-ckpt", str(best / "best.pt"), "--tta",
             "--out", str(best / "test_multi_ownprior_tta.json")] + P)
    print(f"total wall {time.time() - t0:.0f}s ({a.preset})")
    print(markdown(Path(R)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
