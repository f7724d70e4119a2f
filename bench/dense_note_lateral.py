"""A candidate not shipped (docs/protocol.md, "Lung network", version 15): the dense-tissue note of
node/pipeline/effusion.py also looking in each lung's *lateral pocket*, beyond its most lateral voxel along the
patient's left-right axis, before the rib line. The candidate is ``bench/dense_note_lateral.patch``, applied to a
temporary git worktree of ``PATCH_BASE`` (the commit it was written against); the same measurement runs in that
tree and in an unpatched worktree of ``PATCH_BASE``, each in a child process.

Per phantom of bench/lungs_on_phantom.py (lung network): the share of the consolidation the lung mask leaves out
found in the note's mask, shipped and candidate; the voxels the candidate adds, by the phantom's tissue labels;
the sides a note names. ``--dense``: airless consolidation. ``--real``: the real axial slices, the chest crop and
the dome series instead (what the candidate adds per side, and the sides named).

    python bench/dense_note_lateral.py [--dense] [--real]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PATCH = Path(__file__).with_suffix(".patch")
PATCH_BASE = "3118c65"


def cases(dense: bool, real: bool) -> dict:
    """name -> a function giving (volume, phantom or None), in the tree on ``sys.path``."""
    from node import phantom as ph

    if not real:
        from bench.lungs_on_phantom import CASES

        hu = ph.DENSE_CONSOLIDATION_HU if dense else ph.CONSOLIDATION_HU
        return {name: (lambda kw=kw: ph.make_phantom(**kw, consolidation_hu=hu)) for name, kw in CASES.items()}
    from node.pipeline.volume import assemble_volume
    from tests.support import SHARED_DATA
    from training.real_ct import read_nifti

    data = SHARED_DATA / "dicom"
    slices = sorted(data.glob("ny-sbu/*/axial/*.dcm")) + sorted(data.glob("lungmask-slices/*.dcm"))
    out = {p.relative_to(data).as_posix(): (lambda p=p: assemble_volume([p])) for p in slices}
    out["abdomen-j2k-series"] = lambda: assemble_volume(sorted((data / "abdomen-j2k-series").glob("*")))
    out["nifti/chest-crop-1.5mm.nii.gz"] = lambda: read_nifti(SHARED_DATA / "nifti" / "chest-crop-1.5mm.nii.gz")
    return out


def child(out: Path, dense: bool, real: bool) -> None:
    """The note's mask (side labels) and the sides it names, per case, with this tree's node."""
    from node.pipeline.effusion import SIDE_NAMES, find_effusion
    from node.pipeline.lungs import segment_lungs

    logging.disable(logging.WARNING)
    sides, masks = {}, {}
    for i, (name, make) in enumerate(cases(dense, real).items()):
        made = make()
        volume = made if real else made.as_volume()
        effusion = find_effusion(volume, segment_lungs(volume, method="net"))
        masks[f"m{i}"] = effusion.dense_unexplained
        sides[name] = [n for n in SIDE_NAMES.values() if any(f"the {n} hemithorax" in t for t in effusion.notes)]
    np.savez_compressed(out / "masks.npz", **masks)
    (out / "sides.json").write_text(json.dumps(sides))


def run_tree(tree: Path, out: Path, args: argparse.Namespace) -> tuple[dict, np.lib.npyio.NpzFile]:
    out.mkdir()
    flags = [f"--{f}" for f in ("dense", "real") if getattr(args, f)]
    # this script, run in ``tree``: the child imports that tree's ``node`` and ``bench``
    subprocess.run([sys.executable, __file__, "--child", str(out), *flags], cwd=tree, check=True,
                   env={**os.environ, "PYTHONPATH": str(tree)})
    return json.loads((out / "sides.json").read_text()), np.load(out / "masks.npz")


def report(args: argparse.Namespace, shipped: tuple, candidate: tuple) -> None:
    sys.path.insert(0, str(REPO))
    from node import phantom as ph
    from node.pipeline.lungs import segment_lungs
    from node.pipeline.lungs.notes import amount_text

    logging.disable(logging.WARNING)
    (sides_0, masks_0), (sides_1, masks_1) = shipped, candidate
    names = {code: name for name, code in ph.TISSUES.items()}
    if args.real:
        print("| series | candidate adds, right | left | sides named, shipped -> candidate |\n|---|---|---|---|")
    else:
        print("| phantom | left-out consolidation in the note's mask, shipped -> candidate | candidate adds (voxels by "
              "tissue) | sides named, shipped -> candidate |\n|---|---|---|---|")
    for i, (name, make) in enumerate(cases(args.dense, args.real).items()):
        before, after = masks_0[f"m{i}"], masks_1[f"m{i}"]
        added = (after > 0) & (before == 0)
        named = f"{', '.join(sides_0[name]) or 'none'} -> {', '.join(sides_1[name]) or 'none'}"
        made = make()
        if args.real:
            amounts = [amount_text(int((added & (after == side)).sum()), made) for side in (1, 2)]
            print(f"| {name} | {amounts[0]} | {amounts[1]} | {named} |")
            continue
        volume = made.as_volume()
        missed = made.masks["consolidation"] & (segment_lungs(volume, method="net").labels == 0)
        share = (lambda m: f"{(missed & (m > 0)).sum() / missed.sum():.2f}" if missed.any() else "-")  # noqa: E731
        counts = np.bincount(made.labels[added], minlength=max(names) + 1)
        tissues = ", ".join(f"{names[t]} {n}" for t, n in enumerate(counts) if n and t in names)
        consolidation = int((added & made.masks["consolidation"]).sum())
        print(f"| {name} | {share(before)} -> {share(after)} | {tissues or 'none'} (of them consolidation "
              f"{consolidation}) | {named} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dense", action="store_true", help="airless consolidation (DENSE_CONSOLIDATION_HU)")
    ap.add_argument("--real", action="store_true", help="the real series instead of the phantoms")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        sys.path.insert(0, str(Path.cwd()))
        child(args.child, args.dense, args.real)
        return
    flags = "".join(f" --{f}" for f in ("dense", "real") if getattr(args, f))
    print(f"{time.strftime('%Y-%m-%d')}  python bench/dense_note_lateral.py{flags}  (base {PATCH_BASE})")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        trees = {"shipped": work / "shipped", "candidate": work / "candidate"}
        try:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(tree), PATCH_BASE],
                               check=True)
            subprocess.run(["git", "-C", str(trees["candidate"]), "apply", str(PATCH)], check=True)
            shipped, candidate = (run_tree(tree, work / f"out-{name}", args) for name, tree in trees.items())
            report(args, shipped, candidate)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)


if __name__ == "__main__":
    main()
