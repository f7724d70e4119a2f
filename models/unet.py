"""Multi-class Inf-Net: a compact U-Net taking [image, single-class infection prior] (2 channels) and labelling
background / ground-glass opacity / consolidation (3 classes), as in Fan et al. (Semi-Inf-Net + multi-class
segmentation network; they used FCN8s/U-Net with the prior as extra input channel).

``set_mode("inpaint")`` swaps the last layer for a linear 1-channel reconstruction layer (self-supervised
pretraining); every other weight is shared.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _block(i, o):
    return nn.Sequential(
        nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True),
        nn.Conv2d(o, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True),
    )


class MultiClassInfNet(nn.Module):
    CLASS_NAMES = ("background", "ggo", "consolidation")

    def __init__(self, in_channels=2, n_class=3, base=16, depth=4, recon_channels=1):
        super().__init__()
        self.config = dict(in_channels=in_channels, n_class=n_class, base=base, depth=depth,
                           recon_channels=recon_channels)
        self.mode = "segment"
        ch = [base * 2 ** i for i in range(depth + 1)]
        self.downs = nn.ModuleList([_block(in_channels, ch[0])] + [_block(ch[i], ch[i + 1]) for i in range(depth)])
        self.ups = nn.ModuleList([nn.ConvTranspose2d(ch[i + 1], ch[i], 2, stride=2) for i in reversed(range(depth))])
        self.dec = nn.ModuleList([_block(2 * ch[i], ch[i]) for i in reversed(range(depth))])
        self.seg_head = nn.Conv2d(ch[0], n_class, 1)
        self.inp_head = nn.Conv2d(ch[0], recon_channels, 1)

    def set_mode(self, mode: str) -> "MultiClassInfNet":
        if mode not in ("segment", "inpaint"):
            raise ValueError(mode)
        self.mode = mode
        return self

    def reset_seg_heads(self) -> None:
        self.seg_head.reset_parameters()

    def forward(self, x):
        skips = []
        for i, d in enumerate(self.downs):
            x = d(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.ups, self.dec):
            s = skips.pop()
            x = up(x)
            if x.shape[-2:] != s.shape[-2:]:
                x = F.interpolate(x, size=s.shape[-2:], mode="bilinear", align_corners=False)
            x = dec(torch.cat((s, x), 1))
        return self.seg_head(x) if self.mode == "segment" else self.inp_head(x)
