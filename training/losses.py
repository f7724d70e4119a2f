"""Losses: Inf-Net structure loss (weighted IoU + lambda * weighted BCE), edge BCE, masked reconstruction
loss for inpainting, coach loss, multi-class loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def structure_loss(pred: torch.Tensor, mask: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """Inf-Net ``joint_loss``: pixel weights 1 + 5|avgpool31(mask) - mask|; wIoU + lam * wBCE (logits in)."""
    weit = 1 + 5 * torch.abs(F.avg_pool2d(mask, kernel_size=31, stride=1, padding=15) - mask)
    wbce = F.binary_cross_entropy_with_logits(pred, mask, reduction="none")
    wbce = (weit * wbce).sum(dim=(2, 3)) / weit.sum(dim=(2, 3))
    p = torch.sigmoid(pred)
    inter = ((p * mask) * weit).sum(dim=(2, 3))
    union = ((p + mask) * weit).sum(dim=(2, 3))
    wiou = 1 - (inter + 1) / (union - inter + 1)
    return (wiou + lam * wbce).mean()


def seg_loss(outputs, mask, edge=None, lam: float = 1.0) -> torch.Tensor:
    """Sum of structure losses on S_g, S_5, S_4, S_3 plus BCE on the edge output (when edges are given)."""
    s_g, s_5, s_4, s_3, e = outputs
    loss = sum(structure_loss(o, mask, lam) for o in (s_g, s_5, s_4, s_3))
    if edge is not None:
        loss = loss + F.binary_cross_entropy_with_logits(e, edge)
    return loss


def sobel_edges(img01: torch.Tensor) -> torch.Tensor:
    """Gradient magnitude of a (N,1,H,W) image scaled to [0, 1] per image: inpainting target of the edge head."""
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], device=img01.device).view(1, 1, 3, 3)
    gx = F.conv2d(img01, kx, padding=1)
    gy = F.conv2d(img01, kx.transpose(2, 3), padding=1)
    g = torch.sqrt(gx ** 2 + gy ** 2 + 1e-12)
    return g / g.amax(dim=(2, 3), keepdim=True).clamp_min(1e-6)


def masked_l1(pred: torch.Tensor, target: torch.Tensor, keep_mask: torch.Tensor) -> torch.Tensor:
    """L1 on the erased region (weights 1 - M), per image normalised, mean over the batch. In [0, 1] for [0, 1]
    images."""
    w = (1 - keep_mask)
    per = (w * (pred - target).abs()).sum(dim=(1, 2, 3)) / (w.sum(dim=(1, 2, 3)) * pred.shape[1]).clamp_min(1e-6)
    return per.mean()


def recon_loss(outputs, img01, keep_mask, edge_target=None) -> torch.Tensor:
    """Mean masked L1 over the image-reconstruction outputs and (if given) the edge-map reconstruction."""
    if isinstance(outputs, torch.Tensor):
        return masked_l1(outputs, img01, keep_mask)
    imgs, e = outputs[:4], outputs[4]
    losses = [masked_l1(o, img01, keep_mask) for o in imgs]
    if edge_target is not None:
        losses.append(masked_l1(e, edge_target, keep_mask))
    return sum(losses) / len(losses)


def coach_loss(rec: torch.Tensor) -> torch.Tensor:
    """Singh et al.: the coach maximises the inpainter's reconstruction error: L_coach = 1 - L_rec."""
    return 1 - rec


def multiclass_loss(logits: torch.Tensor, label: torch.Tensor, dice_weight: float = 1.0) -> torch.Tensor:
    """Cross-entropy + soft Dice on the two lesion classes. ``label`` (N,1,H,W) float class ids."""
    tgt = label[:, 0].long()
    ce = F.cross_entropy(logits, tgt)
    if dice_weight <= 0:
        return ce
    p = torch.softmax(logits, 1)
    oh = F.one_hot(tgt, logits.shape[1]).permute(0, 3, 1, 2).float()
    inter = (p * oh).sum(dim=(0, 2, 3))[1:]
    den = (p + oh).sum(dim=(0, 2, 3))[1:]
    dice = (2 * inter + 1) / (den + 1)
    return ce + dice_weight * (1 - dice).mean()
