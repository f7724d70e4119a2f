"""COVID-SemiSeg data (Inf-Net ``Dataset/`` layout), decoded once into memory.

Images are 8-bit lung-window crops of varying size; every split is loaded as lists of numpy arrays at the
original size (for evaluation at native resolution) and, for training, stacked once into tensors resized to a
fixed base size (Inf-Net resizes every slice to 352x352 regardless of aspect ratio; so do we).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .paths import DATA_ENV, semiseg_root

# image normalisation used by every network (the slices are already lung-windowed to 8 bit)
IMG_MEAN = 0.5
IMG_STD = 0.25

SPLITS = {
    "doctor": ("TrainingSet/LungInfection-Train/Doctor-label", "Imgs", "GT", "Edge", None),
    "pseudo": ("TrainingSet/LungInfection-Train/Pseudo-label", "Imgs", "GT", "Edge", None),
    "multi-train": ("TrainingSet/MultiClassInfection-Train", "Imgs", "GT", None, "Prior"),
    "test": ("TestingSet/LungInfection-Test", "Imgs", "GT", None, None),
    "multi-test": ("TestingSet/MultiClassInfection-Test", "Imgs", "GT", None, None),
}


@dataclass
class SliceSet:
    split: str
    names: list[str]
    images: list[np.ndarray]                 # uint8 (H, W)
    masks: list[np.ndarray]                  # uint8: binary 0/255 (single-class) or labels 0/1/2 (multi)
    edges: list[np.ndarray] | None = None
    priors: list[np.ndarray] | None = None
    meta: dict = field(default_factory=dict)

    def __len__(self):
        return len(self.names)

    def subset(self, idx) -> "SliceSet":
        pick = lambda lst: None if lst is None else [lst[i] for i in idx]  # noqa: E731
        return SliceSet(self.split, pick(self.names), pick(self.images), pick(self.masks), pick(self.edges),
                        pick(self.priors), dict(self.meta))


def _sort_key(name: str):
    stem = Path(name).stem
    return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)


def _read(path: Path, mode: str | None = "L") -> np.ndarray:
    with Image.open(path) as im:
        if mode == "P":  # palette label image: keep indices
            return np.array(im if im.mode in ("P", "L") else im.convert("L"), dtype=np.uint8)
        return np.array(im.convert(mode), dtype=np.uint8)


_CACHE: dict = {}


def load_split(split: str, root: str | os.PathLike | None = None, limit: int | None = None,
               seed: int = 0) -> SliceSet:
    """Load one split into memory (decoded once per process, cached). ``root``: the COVID-SemiSeg folder
    (default :func:`training.paths.semiseg_root`). ``limit`` takes a fixed random subset (seeded) of that many
    slices."""
    root = semiseg_root() if root is None else root
    key = (split, str(root), limit, seed)
    if key not in _CACHE:
        _CACHE[key] = _load_split(split, root, limit, seed)
    return _CACHE[key]


def _load_split(split, root, limit, seed) -> SliceSet:
    base, img_dir, gt_dir, edge_dir, prior_dir = SPLITS[split]
    base = Path(root) / base
    if not (base / img_dir).is_dir():
        raise FileNotFoundError(f"{base / img_dir} not found (set --data, or {DATA_ENV} to the shared data folder)")
    names = sorted(os.listdir(base / img_dir), key=_sort_key)
    if limit is not None and limit < len(names):
        rng = np.random.default_rng(seed)
        names = [names[i] for i in sorted(rng.choice(len(names), limit, replace=False))]
    multi = split.startswith("multi")
    images, masks, edges, priors = [], [], [], []
    for n in names:
        stem = Path(n).stem
        images.append(_read(base / img_dir / n))
        m = _read(base / gt_dir / f"{stem}.png", "P" if multi else "L")
        masks.append(m)
        if edge_dir:
            edges.append(_read(base / edge_dir / f"{stem}.png"))
        if prior_dir:
            priors.append(_read(base / prior_dir / f"{stem}.png"))
    return SliceSet(split, names, images, masks, edges if edge_dir else None, priors if prior_dir else None,
                    {"root": str(root)})


# Patient grouping of the labelled slices. COVID-SemiSeg names its slices by number only; slices of one patient
# (adjacent levels of one scan) are near-duplicates: nearly the same image, or a similar image with the same crop
# size. Two slices are linked when the normalised cross-correlation of their 32 x 32 thumbnails is at least
# GROUP_NCC, or at least GROUP_NCC_SAME_CROP with both crop sides within GROUP_CROP_TOLERANCE; a group is a
# connected set of links. On the 50 labelled slices this gives 43 groups ({4, 5, 17, 46}, {10, 43},
# {13, 31}, {24, 29}, {35, 67}, singletons): docs/protocol.md.
GROUP_THUMB = 32
GROUP_NCC = 0.88
GROUP_NCC_SAME_CROP = 0.80
GROUP_CROP_TOLERANCE = 0.03
N_VAL = 10
N_FOLDS = 5


def patient_groups(images: list[np.ndarray]) -> list[int]:
    """A group id per slice (slices of one group are taken to be one patient); ids are 0.. in slice order."""
    x = np.stack([resize_np(a, (GROUP_THUMB, GROUP_THUMB)).astype(np.float64).ravel() for a in images])
    x = (x - x.mean(1, keepdims=True)) / np.maximum(x.std(1, keepdims=True), 1e-9)
    ncc = x @ x.T / x.shape[1]
    shapes = np.array([a.shape for a in images], np.float64)
    rel = np.abs(shapes[:, None] - shapes[None]) / np.maximum(shapes[:, None], shapes[None])
    link = (ncc >= GROUP_NCC) | ((ncc >= GROUP_NCC_SAME_CROP) & (rel <= GROUP_CROP_TOLERANCE).all(-1))
    from scipy.sparse.csgraph import connected_components

    _, labels = connected_components(link, directed=False)
    first: dict[int, int] = {}
    return [first.setdefault(int(g), len(first)) for g in labels]


def grouped_folds(groups: list[int], k: int = N_FOLDS, seed: int = 0) -> list[list[int]]:
    """``k`` folds of slice indices, no group split across folds: groups in a seeded random order, each put in
    the fold with the fewest slices so far (ties: the lowest fold)."""
    ids = sorted(set(groups))
    order = np.random.default_rng(seed).permutation(len(ids))
    folds: list[list[int]] = [[] for _ in range(k)]
    for gi in order:
        members = [i for i, g in enumerate(groups) if g == ids[gi]]
        min(folds, key=len).extend(members)
    return [sorted(f) for f in folds]


def train_val_split(groups: list[int], n_val: int = N_VAL, seed: int = 0,
                    fold: int | None = None, k: int = N_FOLDS) -> tuple[list[int], list[int]]:
    """(train_idx, val_idx) of the labelled slices, by patient group. ``fold`` None: the fixed validation
    split (the first of ``k`` = len / ``n_val`` grouped folds); ``fold`` i: fold i of ``k`` grouped folds
    (cross-validation)."""
    n = len(groups)
    folds = grouped_folds(groups, k if fold is not None else max(2, round(n / n_val)), seed)
    val = folds[fold or 0]
    return sorted(set(range(n)) - set(val)), val


def labelled_split(ss: SliceSet, n_val: int = N_VAL, seed: int = 0,
                   fold: int | None = None) -> tuple[list[int], list[int]]:
    """:func:`train_val_split` of a labelled split (the 50 doctor-labelled slices, or the same slices of
    MultiClassInfection-Train), grouped by :func:`patient_groups` of its images."""
    if "groups" not in ss.meta:
        ss.meta["groups"] = patient_groups(ss.images)
    return train_val_split(ss.meta["groups"], n_val, seed, fold)


def resize_np(a: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Resize a 2-D uint8 array to (h, w)."""
    im = Image.fromarray(a)
    return np.array(im.resize((size[1], size[0]), Image.NEAREST if nearest else Image.BILINEAR))


def stack(ss: SliceSet, size: int) -> dict[str, torch.Tensor]:
    """Resize every slice to (size, size) once; returns float tensors in [0, 1] (labels as float class ids)."""
    multi = ss.split.startswith("multi")
    out = {"image": torch.from_numpy(np.stack([resize_np(a, (size, size)) for a in ss.images]))[:, None].float() / 255}
    if multi:
        out["label"] = torch.from_numpy(np.stack([resize_np(a, (size, size), True) for a in ss.masks]))[:, None].float()
    else:
        out["mask"] = torch.from_numpy(np.stack([resize_np(a, (size, size)) for a in ss.masks]))[:, None].float() / 255
    if ss.edges is not None:
        out["edge"] = torch.from_numpy(np.stack([resize_np(a, (size, size)) for a in ss.edges]))[:, None].float() / 255
    if ss.priors is not None:
        out["prior"] = torch.from_numpy(np.stack([resize_np(a, (size, size)) for a in ss.priors]))[:, None].float() / 255
    return out


def normalize(img01: torch.Tensor) -> torch.Tensor:
    return (img01 - IMG_MEAN) / IMG_STD
