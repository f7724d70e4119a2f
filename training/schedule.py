"""The experiment table of docs/protocol.md in ONE process (data decoded once), runs in priority order under a
wall-clock budget; each finished single-class row is evaluated once on the test slices (engine path, flip TTA).

    python -m training.schedule --preset gpu-full --root runs/gpu --seeds 0 1 2 --budget-min 7 [--device cuda]

Layout: ROOT/stages/STAGE/ (pretraining and pseudo-label stages, trained once with seed 0 and shared by every
seed's rows: the seeds vary the fine-tuning) and ROOT/seedS/ROW/ (metrics.json, best.pt, test_metrics.json).
Each run is the ``python -m training ...``
command printed in the log. A run whose metrics.json exists is skipped, and one stopped part-way (last.pt
without metrics.json) resumes from its last epoch, so a second call continues the table.
``python -m training.table ROOT`` prints the table with seed spread and intervals.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from .cli import main as cli
from .data import N_FOLDS

# single-class rows: name -> (training arguments, the stage it starts from or None)
ROWS: dict[str, tuple[list[str], str | None]] = {
    "sinfnet": ([], None),
    "sinfnet-aug04": (["--aug", "--cutout", "0.4"], None),
    "selfsup": ([], "pretrain/pretrained.pt"),
    "selfsup-aug04": (["--aug", "--cutout", "0.4"], "pretrain/pretrained.pt"),
    "semi": ([], "semi-pseudo/best.pt"),
    "selfsup-semi-aug04": (["--aug", "--cutout", "0.4"], "selfsup-semi-pseudo/best.pt"),
    "selfsup-raw-aug04": (["--aug", "--cutout", "0.4"], "pretrain-raw/pretrained.pt"),
}
# stages the rows start from
STAGES: dict[str, list[str]] = {
    "pretrain": ["pretrain"],                                   # the coach as docs/protocol.md specifies
    "pretrain-raw": ["pretrain", "--coach-scale", "0"],         # ablation: the coach's raw scores
    "semi-pseudo": ["train", "--train-set", "pseudo"],
    "selfsup-semi-pseudo": ["train", "--train-set", "pseudo", "--aug", "--cutout", "0.4",
                            "--init", "{S}/pretrain/pretrained.pt"],
}
# priority order: (index into --seeds, item); items are rows, stages, "multi:ROW"
# (the multi-class net on ROW's prior) and "cv:ROW" (ROW's fine-tuning on each grouped fold)
PLAN: list[tuple[int, str]] = [
    (0, "pretrain"), (0, "sinfnet"), (0, "sinfnet-aug04"), (0, "selfsup"), (0, "selfsup-aug04"),
    (1, "sinfnet-aug04"), (1, "selfsup-aug04"), (2, "sinfnet-aug04"), (2, "selfsup-aug04"),
    (1, "sinfnet"), (1, "selfsup"), (2, "sinfnet"), (2, "selfsup"),
    (0, "selfsup-semi-pseudo"), (0, "selfsup-semi-aug04"), (0, "multi:selfsup-semi-aug04"),
    (0, "multi:selfsup-aug04"), (0, "multi:sinfnet-aug04"),
    (0, "semi-pseudo"), (0, "semi"), (0, "pretrain-raw"), (0, "selfsup-raw-aug04"),
    (0, "cv:sinfnet-aug04"), (0, "cv:selfsup-aug04"), (0, "cv:selfsup-semi-aug04"),
    (1, "selfsup-semi-aug04"), (2, "selfsup-semi-aug04"), (1, "semi"), (2, "semi"),
]


def _seed_dir(root: str, seed: int) -> str:
    return f"{root}/seed{seed}"


def commands(item: str, R: str, S: str) -> list[list[str]]:
    """The training (and test) commands of one plan item: rows in the seed folder ``R``, stages in ``S``."""
    if item in STAGES:
        args = [a.replace("{S}", S) for a in STAGES[item]]
        return [[args[0], "--run-dir", f"{S}/{item}", *args[1:]]]
    if item.startswith("multi:"):
        row = item.split(":", 1)[1]
        prior = f"{R}/{row}/best.pt"
        return [["train-multi", "--run-dir", f"{R}/multi-{row}", "--prior-ckpt", prior],
                ["evaluate", "--ckpt", f"{R}/multi-{row}/best.pt", "--prior-ckpt", prior, "--tta",
                 "--out", f"{R}/multi-{row}/test_metrics.json"]]
    if item.startswith("cv:"):
        row = item.split(":", 1)[1]
        args, start = ROWS[row]
        init = ["--init", f"{S}/{start}"] if start else []
        return [["train", "--run-dir", f"{R}/cv-{row}/fold{k}", "--fold", str(k), *args, *init]
                for k in range(N_FOLDS)]
    args, start = ROWS[item]
    init = ["--init", f"{S}/{start}"] if start else []
    return [["train", "--run-dir", f"{R}/{item}", *args, *init],
            ["evaluate", "--ckpt", f"{R}/{item}/best.pt", "--tta", "--out", f"{R}/{item}/test_metrics.json"]]


def _done(cmd: list[str]) -> bool:
    if cmd[0] == "evaluate":
        return Path(cmd[cmd.index("--out") + 1]).exists()
    return (Path(cmd[cmd.index("--run-dir") + 1]) / "metrics.json").exists()


def _interrupted(cmd: list[str]) -> bool:
    """A training run that stopped before its end (its last.pt exists, its metrics.json not): it resumes."""
    return cmd[0] != "evaluate" and (Path(cmd[cmd.index("--run-dir") + 1]) / "last.pt").exists()


def _ready(cmd: list[str]) -> bool:
    """Whatever the command starts from exists (a stage skipped for lack of time leaves its rows out)."""
    for flag in ("--init", "--prior-ckpt", "--ckpt"):
        if flag in cmd and not Path(cmd[cmd.index(flag) + 1]).exists():
            return False
    return True


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="gpu-full")
    p.add_argument("--root", default="runs/gpu")
    p.add_argument("--device")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budget-min", type=float, default=None, help="start no run after this many minutes")
    p.add_argument("--only", nargs="+", help="plan items to run (default: all, in priority order)")
    a = p.parse_args(argv)
    P = ["--preset", a.preset] + (["--device", a.device] if a.device else [])
    t0 = time.time()
    for seed_i, item in PLAN:
        if a.only and item not in a.only:
            continue
        seeds = [a.seeds[seed_i]] if seed_i < len(a.seeds) else []
        if item in STAGES:
            seeds = [a.seeds[0]]
        for seed in seeds:
            R = _seed_dir(a.root, seed)
            for cmd in commands(item, R, f"{a.root}/stages"):
                if _done(cmd) or not _ready(cmd):
                    continue
                elapsed = (time.time() - t0) / 60
                if a.budget_min is not None and elapsed > a.budget_min:
                    print(f"budget of {a.budget_min} min spent at {elapsed:.1f} min: stopping", flush=True)
                    return 0
                full = cmd + P + ["--seed", str(seed)] + (["--resume"] if _interrupted(cmd) else [])
                print(f"== [{elapsed * 60:.0f}s] python -m training {' '.join(full)}", flush=True)
                cli(full)
    print(f"total wall {time.time() - t0:.0f}s ({a.preset})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
