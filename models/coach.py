"""Coach network (Singh et al., "Learning to Inpaint ..." / "Self-supervised feature learning for semantic
segmentation of overhead imagery", BMVC 2018), as used by Fung et al. for self-supervised Inf-Net.

A small encoder-decoder gives a score map B(x); the erase mask is
``M = sigmoid(alpha * (B(x) - t_k))`` with ``t_k`` the k-th largest value of B(x) per image and
``k = round(keep * H * W)``: the ``keep`` fraction of pixels with the highest scores have M > 0.5 (kept), the
others M < 0.5 (erased). alpha = 1 as specified. The seed's "the region that has scores lesser than the
k-th element will be erased" needs B on a scale where most scores lie far from t_k: a freshly initialised
network's raw B spans a few tenths, so sigmoid(B - t_k) sits between 0.3 and 0.7 and almost nothing is erased.
With ``score_scale`` S, B is standardised per image and multiplied by S before the sigmoid (B' = S (B - mean) /
std): with S = 8 a pixel a quarter of a standard deviation below t_k has M < 0.12. ``score_scale`` None keeps
the raw B (the ablation).
The coach is trained adversarially against the inpainting network: ``L_coach = 1 - L_rec(x * M)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SCORE_SCALE = 8.0    # B standardised per image, times this (None: raw scores)
ERASED_BELOW = 0.1   # M below this counts as erased, above KEPT_ABOVE as kept, in the training log
KEPT_ABOVE = 0.9


def erasure(m: torch.Tensor) -> dict[str, float]:
    """Share of mask values erased (M < ERASED_BELOW) and kept (M > KEPT_ABOVE)."""
    return {"erased": float((m < ERASED_BELOW).float().mean()), "kept": float((m > KEPT_ABOVE).float().mean())}


def _cbr(i, o, stride=1):
    return nn.Sequential(nn.Conv2d(i, o, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(o),
                         nn.ReLU(inplace=True))


class CoachNet(nn.Module):
    def __init__(self, in_channels=1, base=16, keep=0.75, alpha=1.0, score_scale: float | None = SCORE_SCALE):
        super().__init__()
        self.config = dict(in_channels=in_channels, base=base, keep=keep, alpha=alpha, score_scale=score_scale)
        self.keep = keep
        self.alpha = alpha
        self.score_scale = score_scale
        self.enc = nn.Sequential(_cbr(in_channels, base), _cbr(base, base * 2, 2), _cbr(base * 2, base * 4, 2),
                                 _cbr(base * 4, base * 4, 2))
        self.dec = nn.Sequential(_cbr(base * 4, base * 2), nn.Upsample(scale_factor=2, mode="bilinear"),
                                 _cbr(base * 2, base), nn.Upsample(scale_factor=2, mode="bilinear"),
                                 _cbr(base, base), nn.Conv2d(base, 1, 3, padding=1))

    def scores(self, x):
        b = self.dec(self.enc(x))
        return F.interpolate(b, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, x, keep: float | None = None, alpha: float | None = None):
        """Returns the soft keep-mask M (N,1,H,W) in (0, 1)."""
        return coach_mask(self.scores(x), self.keep if keep is None else keep,
                          self.alpha if alpha is None else alpha, self.score_scale)


def coach_mask(b: torch.Tensor, keep: float = 0.75, alpha: float = 1.0,
               score_scale: float | None = None) -> torch.Tensor:
    """M = sigmoid(alpha * (B - kth largest of B)), per image. ``keep`` = fraction of pixels with M > 0.5;
    ``score_scale``: B standardised per image and scaled by it first (see the module's docstring)."""
    n = b.shape[0]
    if score_scale is not None:
        flat = b.reshape(n, -1)
        mean, std = flat.mean(1).view(n, 1, 1, 1), flat.std(1).clamp_min(1e-6).view(n, 1, 1, 1)
        b = (b - mean) / std * score_scale
    flat = b.reshape(n, -1)
    k = max(1, min(flat.shape[1], int(round(keep * flat.shape[1]))))
    kth = torch.topk(flat, k, dim=1).values[:, -1]  # k-th largest
    # shift by half the gap to the next value so that exactly k pixels are > threshold (ties aside)
    if k < flat.shape[1]:
        nxt = torch.topk(flat, k + 1, dim=1).values[:, -1]
        thr = (kth + nxt) / 2
    else:
        thr = kth - 1.0
    return torch.sigmoid(alpha * (b - thr.view(n, 1, 1, 1)))
