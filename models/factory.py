"""Build any of the project's networks from a name + config dict (used by training, registry and engine)."""
from __future__ import annotations

from torch import nn

from .coach import CoachNet
from .infnet import INFNET_CONFIGS, InfNet
from .lungnet import LungNet
from .unet import MultiClassInfNet

ARCHS = ("infnet-res2net50", "infnet-compact", "multiclass-unet", "coach", "lungnet")


def build_model(arch: str, config: dict | None = None) -> nn.Module:
    config = dict(config or {})
    if arch in INFNET_CONFIGS:
        cfg = dict(INFNET_CONFIGS[arch])
        cfg.update(config)
        return InfNet(**cfg)
    if arch == "multiclass-unet":
        return MultiClassInfNet(**config)
    if arch == "coach":
        return CoachNet(**config)
    if arch == "lungnet":
        return LungNet(**config)
    raise KeyError(f"unknown architecture {arch!r}; known: {ARCHS}")


def model_config(model: nn.Module) -> dict:
    cfg = dict(getattr(model, "config", {}))
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
