"""Coach network (Singh et al., "Learning to Inpaint ..." / "Self-supervised feature learning for semantic
segmentation of overhead imagery", BMVC 2018), as used by Fung et al. for self-supervised Inf-Net.

A small encoder-decoder gives a score map B(x); the erase mask is
``M = sigmoid(alpha * (B(x) - t_k))`` with ``t_k`` the k-th largest value of B(x) per image and
``k = round(keep * H * W)``: the ``keep`` fraction of pixels with the highest scores have M > 0.5 (kept), the
others M < 0.5 (erased). alpha = 1 as specified (a soft mask); larger alpha gives a harder one.
The coach is trained adversarially against the inpainting network: ``L_coach = 1 - L_rec(x * M)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _cbr(i, o, stride=1):
    return nn.Sequential(nn.Conv2d(i, o, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(o),
                         nn.ReLU(inplace=True))


class CoachNet(nn.Module):
    def __init__(self, in_channels=1, base=16, keep=0.75, alpha=1.0):
        super().__init__()
        self.config = dict(in_channels=in_channels, base=base, keep=keep, alpha=alpha)
        self.keep = keep
        self.alpha = alpha
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
                          self.alpha if alpha is None else alpha)


def coach_mask(b: torch.Tensor, keep: float = 0.75, alpha: float = 1.0) -> torch.Tensor:
    """M = sigmoid(alpha * (B - kth largest of B)), per image. ``keep`` = fraction of pixels with M > 0.5."""
    n = b.shape[0]
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
