"""Res2Net backbone (Gao et al., TPAMI 2019), v1b variant as used by Inf-Net (res2net50_v1b_26w_4s).

Width and depth are configurable so the same code gives the reference Res2Net-50 (26w4s) and a narrow
compact backbone. Pure torch; no pretrained weights are downloaded (none can be fetched offline, and the
node must not reach out): the reference Inf-Net uses ImageNet-pretrained weights, ours start from scratch or
from our own self-supervised pretraining.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class Bottle2neck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, base_width=26, scale=4, stype="normal"):
        super().__init__()
        width = int(math.floor(planes * (base_width / 64.0)))
        self.conv1 = nn.Conv2d(inplanes, width * scale, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width * scale)
        self.nums = 1 if scale == 1 else scale - 1
        if stype == "stage":
            self.pool = nn.AvgPool2d(kernel_size=3, stride=stride, padding=1)
        self.convs = nn.ModuleList(
            [nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1, bias=False) for _ in range(self.nums)]
        )
        self.bns = nn.ModuleList([nn.BatchNorm2d(width) for _ in range(self.nums)])
        self.conv3 = nn.Conv2d(width * scale, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stype = stype
        self.scale = scale
        self.width = width

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        spx = torch.split(out, self.width, 1)
        sp = None
        for i in range(self.nums):
            sp = spx[i] if (i == 0 or self.stype == "stage") else sp + spx[i]
            sp = self.relu(self.bns[i](self.convs[i](sp)))
            out = sp if i == 0 else torch.cat((out, sp), 1)
        if self.scale != 1 and self.stype == "normal":
            out = torch.cat((out, spx[self.nums]), 1)
        elif self.scale != 1 and self.stype == "stage":
            out = torch.cat((out, self.pool(spx[self.nums])), 1)
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        return self.relu(out + residual)


class Res2Net(nn.Module):
    """Res2Net v1b: deep 3-conv stem, avg-pool shortcut downsampling.

    ``forward`` returns the four stage outputs (strides 4, 8, 16, 32); ``out_channels`` lists their widths.
    Reference (Inf-Net): layers=(3, 4, 6, 3), base=64, stem_width=32, base_width=26, scale=4
    -> channels (256, 512, 1024, 2048).
    """

    def __init__(self, layers=(3, 4, 6, 3), base=64, stem_width=32, base_width=26, scale=4, in_channels=3):
        super().__init__()
        self.in_channels = in_channels
        self.base_width = base_width
        self.scale = scale
        self.inplanes = 2 * stem_width
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, stem_width, 3, 2, 1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(inplace=True),
            nn.Conv2d(stem_width, stem_width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(inplace=True),
            nn.Conv2d(stem_width, 2 * stem_width, 3, 1, 1, bias=False),
        )
        self.bn1 = nn.BatchNorm2d(2 * stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(base, layers[0])
        self.layer2 = self._make_layer(base * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(base * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(base * 8, layers[3], stride=2)
        self.out_channels = tuple(base * m * Bottle2neck.expansion for m in (1, 2, 4, 8))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottle2neck.expansion:
            downsample = nn.Sequential(
                nn.AvgPool2d(kernel_size=stride, stride=stride, ceil_mode=True, count_include_pad=False),
                nn.Conv2d(self.inplanes, planes * Bottle2neck.expansion, kernel_size=1, stride=1, bias=False),
                nn.BatchNorm2d(planes * Bottle2neck.expansion),
            )
        layers = [Bottle2neck(self.inplanes, planes, stride, downsample, self.base_width, self.scale, "stage")]
        self.inplanes = planes * Bottle2neck.expansion
        for _ in range(1, blocks):
            layers.append(Bottle2neck(self.inplanes, planes, base_width=self.base_width, scale=self.scale))
        return nn.Sequential(*layers)

    def forward(self, x):
        if x.shape[1] == 1 and self.in_channels == 3:  # grey CT slice -> replicate, as Inf-Net does (RGB convert)
            x = x.expand(-1, 3, -1, -1)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x1 = self.layer1(x)
        x2 = self.layer2(x1)
        x3 = self.layer3(x2)
        x4 = self.layer4(x3)
        return x1, x2, x3, x4


BACKBONES = {
    # the published Inf-Net backbone
    "res2net50_v1b_26w_4s": dict(layers=(3, 4, 6, 3), base=64, stem_width=32, base_width=26, scale=4, in_channels=3),
    # compact: same block type, quarter width, fewer blocks, grey input
    "res2net_compact": dict(layers=(1, 1, 2, 1), base=16, stem_width=16, base_width=26, scale=4, in_channels=1),
}


def build_backbone(name: str) -> Res2Net:
    if name not in BACKBONES:
        raise KeyError(f"unknown backbone {name!r}; known: {sorted(BACKBONES)}")
    return Res2Net(**BACKBONES[name])
