"""Test-time augmentation for Inf-Net: the final map averaged over flipped copies of the input.

The training augmentation flips images horizontally and vertically, so the network has seen all four
flips of a slice; averaging its probability over them cancels part of its orientation-dependent error.
Chosen on the validation split for each shipped model (docs/results.md, "Test-time augmentation" and
"Larger input size"): Dice@0.5 0.674 -> 0.699 and 0.689 -> 0.706 for the 160 px models, 0.729 -> 0.735 for
the 256 px model shipped now (``python -m training validate --ckpt ... [--eval-size N] --tta``). The
sidecar's ``inference.tta`` tells the engine to apply it.
"""
from __future__ import annotations

import torch

FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))  # none, horizontal, vertical, both


def final_probability(model: torch.nn.Module, x: torch.Tensor, tta: bool) -> torch.Tensor:
    """sigmoid(S_3) for a batch ``x`` (N, C, H, W); with ``tta`` the mean over the four flips of ``x``."""
    if not tta:
        return torch.sigmoid(model(x)[3].float())
    total = torch.zeros((), device=x.device)
    for dims in FLIPS:
        p = torch.sigmoid(model(torch.flip(x, dims) if dims else x)[3].float())
        total = total + (torch.flip(p, dims) if dims else p)
    return total / len(FLIPS)
