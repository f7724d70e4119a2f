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


def train_val_split(n: int, n_val: int = 10, seed: int = 0):
    """Fixed split of the 50 doctor-labelled slices: returns (train_idx, val_idx)."""
    perm = np.random.default_rng(seed).permutation(n)
    return sorted(perm[n_val:].tolist()), sorted(perm[:n_val].tolist())


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
