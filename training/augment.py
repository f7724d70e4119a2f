"""Batch augmentation on tensors: one affine resampling per sample (h/v flip, random crop, rotation by a
multiple of 90 degrees plus a small random angle) to the output size, then random cutout on the image only.

Continuous channels (image, mask, edge, prior) are resampled bilinearly, label maps with nearest neighbour.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugConfig:
    flip: bool = True
    rot90: bool = True
    max_angle: float = 15.0       # degrees, on top of the multiple of 90
    crop_min: float = 0.8         # random crop side fraction in [crop_min, 1]
    cutout: float = 0.0           # cutout area ratio (0 = off); Fung et al.: 0.2 / 0.4 / 0.5
    cutout_p: float = 0.5         # probability of cutout per sample
    enabled: bool = True


def _theta(n, cfg: AugConfig, gen: torch.Generator):
    r = lambda *s: torch.rand(*s, generator=gen)  # noqa: E731
    if not cfg.enabled:
        return torch.eye(2, 3).repeat(n, 1, 1)
    fx = torch.where(r(n) < 0.5, -1.0, 1.0) if cfg.flip else torch.ones(n)
    fy = torch.where(r(n) < 0.5, -1.0, 1.0) if cfg.flip else torch.ones(n)
    ang = torch.zeros(n)
    if cfg.rot90:
        ang = ang + torch.randint(0, 4, (n,), generator=gen).float() * (math.pi / 2)
    ang = ang + (r(n) * 2 - 1) * math.radians(cfg.max_angle)
    s = cfg.crop_min + (1 - cfg.crop_min) * r(n)
    tx = (r(n) * 2 - 1) * (1 - s)
    ty = (r(n) * 2 - 1) * (1 - s)
    c, si = torch.cos(ang), torch.sin(ang)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = s * c * fx
    theta[:, 0, 1] = -s * si * fy
    theta[:, 1, 0] = s * si * fx
    theta[:, 1, 1] = s * c * fy
    theta[:, 0, 2] = tx
    theta[:, 1, 2] = ty
    return theta


def cutout(img: torch.Tensor, ratio: float, p: float, gen: torch.Generator, value: float = 0.0) -> torch.Tensor:
    """Erase one square of area ``ratio`` * H * W (clipped at the border) with probability ``p`` per sample."""
    if ratio <= 0:
        return img
    n, _, h, w = img.shape
    img = img.clone()
    side_h = max(1, int(round(math.sqrt(ratio) * h)))
    side_w = max(1, int(round(math.sqrt(ratio) * w)))
    for i in range(n):
        if torch.rand(1, generator=gen).item() >= p:
            continue
        cy = int(torch.randint(0, h, (1,), generator=gen))
        cx = int(torch.randint(0, w, (1,), generator=gen))
        y0, x0 = max(0, cy - side_h // 2), max(0, cx - side_w // 2)
        img[i, :, y0:y0 + side_h, x0:x0 + side_w] = value
    return img


def augment(batch: dict[str, torch.Tensor], size: int, cfg: AugConfig, gen: torch.Generator) -> dict:
    """Returns a new dict with every tensor resampled to (size, size); cutout on ``image`` only."""
    n = batch["image"].shape[0]
    theta = _theta(n, cfg, gen).to(batch["image"].device)
    grid = F.affine_grid(theta, (n, 1, size, size), align_corners=False)
    out = {}
    for k, v in batch.items():
        mode = "nearest" if k == "label" else "bilinear"
        out[k] = F.grid_sample(v, grid, mode=mode, padding_mode="zeros", align_corners=False)
    if cfg.enabled and cfg.cutout > 0:
        out["image"] = cutout(out["image"], cfg.cutout, cfg.cutout_p, gen)
    return out
