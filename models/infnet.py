"""Inf-Net (Fan et al., "Inf-Net: Automatic COVID-19 Lung Infection Segmentation from CT Images", TMI 2020).

Follows the structure of the reference code (github.com/DengPingFan/Inf-Net, ``Code/model_lung_infection/
InfNet_Res2Net.py``): Res2Net backbone; RFB modules on the three high-level features; the parallel partial
decoder (``Aggregation``) giving the global map S_g; three reverse-attention modules (reverse attention
``-1 * sigmoid(upsampled map) + 1``) giving S_5, S_4, S_3; an explicit edge-attention branch on the low-level
feature whose 64-channel guidance is concatenated into every RA module and whose own output is the edge map.

Differences from the reference, all deliberate:
* the backbone and the decoder widths are configurable (``INFNET_CONFIGS``) so that a compact variant exists;
* the last layer of each of the five output heads lives in ``seg_heads``; ``inp_heads`` holds linear
  reconstruction layers of the same shape for self-supervised inpainting (``set_mode("inpaint")``); all other
  weights are shared (Fung et al., self-supervised Inf-Net);
* interpolation targets are feature sizes rather than scale factors (identical for inputs divisible by 32);
* no ImageNet weights (none can be downloaded here).

Outputs (logits, at input resolution), in order: ``S_g, S_5, S_4, S_3, edge``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .res2net import build_backbone

OUTPUT_NAMES = ("S_g", "S_5", "S_4", "S_3", "edge")


class BasicConv2d(nn.Module):
    """conv + BN (no ReLU, as in the reference code)."""

    def __init__(self, in_planes, out_planes, kernel_size, stride=1, padding=0, dilation=1):
        super().__init__()
        self.conv = nn.Conv2d(in_planes, out_planes, kernel_size, stride=stride, padding=padding,
                              dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(out_planes)

    def forward(self, x):
        return self.bn(self.conv(x))


class RFB(nn.Module):
    """RFB_modified of the reference code."""

    def __init__(self, in_channel, out_channel):
        super().__init__()
        self.relu = nn.ReLU(True)
        self.branch0 = BasicConv2d(in_channel, out_channel, 1)

        def branch(k):
            p = k // 2
            return nn.Sequential(
                BasicConv2d(in_channel, out_channel, 1),
                BasicConv2d(out_channel, out_channel, (1, k), padding=(0, p)),
                BasicConv2d(out_channel, out_channel, (k, 1), padding=(p, 0)),
                BasicConv2d(out_channel, out_channel, 3, padding=k, dilation=k),
            )

        self.branch1 = branch(3)
        self.branch2 = branch(5)
        self.branch3 = branch(7)
        self.conv_cat = BasicConv2d(4 * out_channel, out_channel, 3, padding=1)
        self.conv_res = BasicConv2d(in_channel, out_channel, 1)

    def forward(self, x):
        x_cat = self.conv_cat(torch.cat((self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)), 1))
        return self.relu(x_cat + self.conv_res(x))


def _up(x, ref):
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=True)


def _resize(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class Aggregation(nn.Module):
    """Parallel partial decoder (PPD). Returns 3*channel features; the 1x1 output layer is a head."""

    def __init__(self, channel):
        super().__init__()
        self.relu = nn.ReLU(True)
        self.conv_upsample1 = BasicConv2d(channel, channel, 3, padding=1)
        self.conv_upsample2 = BasicConv2d(channel, channel, 3, padding=1)
        self.conv_upsample3 = BasicConv2d(channel, channel, 3, padding=1)
        self.conv_upsample4 = BasicConv2d(channel, channel, 3, padding=1)
        self.conv_upsample5 = BasicConv2d(2 * channel, 2 * channel, 3, padding=1)
        self.conv_concat2 = BasicConv2d(2 * channel, 2 * channel, 3, padding=1)
        self.conv_concat3 = BasicConv2d(3 * channel, 3 * channel, 3, padding=1)
        self.conv4 = BasicConv2d(3 * channel, 3 * channel, 3, padding=1)

    def forward(self, x1, x2, x3):  # x1 deepest (stride 32), x3 stride 8
        x1_1 = x1
        x2_1 = self.conv_upsample1(_up(x1, x2)) * x2
        x3_1 = self.conv_upsample2(_up(x1, x3)) * self.conv_upsample3(_up(x2, x3)) * x3
        x2_2 = self.conv_concat2(torch.cat((x2_1, self.conv_upsample4(_up(x1_1, x2))), 1))
        x3_2 = self.conv_concat3(torch.cat((x3_1, self.conv_upsample5(_up(x2_2, x3))), 1))
        return self.conv4(x3_2)


# Named configurations. "reference" is the published Inf-Net; "compact" is what the node ships.
INFNET_CONFIGS = {
    "infnet-res2net50": dict(backbone="res2net50_v1b_26w_4s", channel=32, ra_channels=(256, 64, 64), edge_channels=64),
    "infnet-compact": dict(backbone="res2net_compact", channel=16, ra_channels=(64, 32, 32), edge_channels=16),
}


class InfNet(nn.Module):
    def __init__(self, backbone="res2net50_v1b_26w_4s", channel=32, ra_channels=(256, 64, 64), edge_channels=64,
                 n_class=1, recon_channels=1):
        super().__init__()
        self.config = dict(backbone=backbone, channel=channel, ra_channels=tuple(ra_channels),
                           edge_channels=edge_channels, n_class=n_class, recon_channels=recon_channels)
        self.backbone = build_backbone(backbone)
        c1, c2, c3, c4 = self.backbone.out_channels
        r4, r3, r2 = ra_channels
        e = edge_channels
        self.mode = "segment"
        self.rfb2_1 = RFB(c2, channel)
        self.rfb3_1 = RFB(c3, channel)
        self.rfb4_1 = RFB(c4, channel)
        self.ParDec = Aggregation(channel)
        # RA branch on x4 (reference: 2048 -> 256, 5x5 convs)
        self.ra4_conv1 = BasicConv2d(c4, r4, 1)
        self.ra4_conv2 = BasicConv2d(r4 + e, r4, 5, padding=2)
        self.ra4_conv3 = BasicConv2d(r4, r4, 5, padding=2)
        self.ra4_conv4 = BasicConv2d(r4, r4, 5, padding=2)
        # RA branch on x3
        self.ra3_conv1 = BasicConv2d(c3, r3, 1)
        self.ra3_conv2 = BasicConv2d(r3 + e, r3, 3, padding=1)
        self.ra3_conv3 = BasicConv2d(r3, r3, 3, padding=1)
        # RA branch on x2
        self.ra2_conv1 = BasicConv2d(c2, r2, 1)
        self.ra2_conv2 = BasicConv2d(r2 + e, r2, 3, padding=1)
        self.ra2_conv3 = BasicConv2d(r2, r2, 3, padding=1)
        # edge attention on the low-level feature x1
        self.edge_conv1 = BasicConv2d(c1, e, 1)
        self.edge_conv2 = BasicConv2d(e, e, 3, padding=1)
        self.edge_conv3 = BasicConv2d(e, e, 3, padding=1)

        def heads(out_ch, basic):
            mk = (lambda i, o, k, p: BasicConv2d(i, o, k, padding=p)) if basic else \
                (lambda i, o, k, p: nn.Conv2d(i, o, k, padding=p))
            return nn.ModuleDict({
                "g": nn.Conv2d(3 * channel, out_ch, 1),     # reference: ParDec.conv5
                "ra4": mk(r4, out_ch, 1, 0),                 # reference: ra4_conv5 (BasicConv2d)
                "ra3": mk(r3, out_ch, 3, 1),                 # reference: ra3_conv4
                "ra2": mk(r2, out_ch, 3, 1),                 # reference: ra2_conv4
                "edge": mk(e, out_ch, 3, 1),                 # reference: edge_conv4
            })

        self.seg_heads = heads(n_class, basic=True)
        # linear reconstruction layers (no BN, no activation) for inpainting the image / its edge map
        self.inp_heads = heads(recon_channels, basic=False)

    def set_mode(self, mode: str) -> "InfNet":
        if mode not in ("segment", "inpaint"):
            raise ValueError(mode)
        self.mode = mode
        return self

    def reset_seg_heads(self) -> None:
        """Re-initialise the segmentation heads (fine-tuning after inpainting pretraining)."""
        for m in self.seg_heads.modules():
            if hasattr(m, "reset_parameters") and m is not self.seg_heads:
                m.reset_parameters()

    def forward(self, x):
        h = self.seg_heads if self.mode == "segment" else self.inp_heads
        size = x.shape[-2:]
        x1, x2, x3, x4 = self.backbone(x)
        relu = F.relu

        eg = self.edge_conv3(self.edge_conv2(self.edge_conv1(x1)))  # edge guidance (stride 4)
        lateral_edge = _resize(h["edge"](eg), size)

        x2_rfb, x3_rfb, x4_rfb = self.rfb2_1(x2), self.rfb3_1(x3), self.rfb4_1(x4)
        ra5_feat = h["g"](self.ParDec(x4_rfb, x3_rfb, x2_rfb))  # stride 8
        s_g = _resize(ra5_feat, size)

        # RA 4 (stride 32)
        crop_4 = _up(ra5_feat, x4)
        a = -1 * torch.sigmoid(crop_4) + 1
        a = a.mean(1, keepdim=True).expand(-1, x4.shape[1], -1, -1).mul(x4)
        a = torch.cat((self.ra4_conv1(a), _up(eg, x4)), 1)
        a = relu(self.ra4_conv2(a))
        a = relu(self.ra4_conv3(a))
        a = relu(self.ra4_conv4(a))
        y = h["ra4"](a) + crop_4
        s_5 = _resize(y, size)

        # RA 3 (stride 16)
        crop_3 = _up(y, x3)
        a = (-1 * torch.sigmoid(crop_3) + 1).mean(1, keepdim=True).expand(-1, x3.shape[1], -1, -1).mul(x3)
        a = torch.cat((self.ra3_conv1(a), _up(eg, x3)), 1)
        a = relu(self.ra3_conv2(a))
        a = relu(self.ra3_conv3(a))
        y = h["ra3"](a) + crop_3
        s_4 = _resize(y, size)

        # RA 2 (stride 8)
        crop_2 = _up(y, x2)
        a = (-1 * torch.sigmoid(crop_2) + 1).mean(1, keepdim=True).expand(-1, x2.shape[1], -1, -1).mul(x2)
        a = torch.cat((self.ra2_conv1(a), _up(eg, x2)), 1)
        a = relu(self.ra2_conv2(a))
        a = relu(self.ra2_conv3(a))
        y = h["ra2"](a) + crop_2
        s_3 = _resize(y, size)
        return s_g, s_5, s_4, s_3, lateral_edge


def infnet(name: str = "infnet-compact", **overrides) -> InfNet:
    cfg = dict(INFNET_CONFIGS[name])
    cfg.update(overrides)
    return InfNet(**cfg)
