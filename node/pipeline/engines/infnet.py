"""The Inf-Net infection engine: :class:`models.predict.InfNetPredictor` behind the node's engine interface.

The predictor turns the HU volume and the lung mask into a probability map (and, with the multi-class
network, a consolidation mask); this adapter keeps infection inside the lungs, splits it into GGO and
consolidation, and says which networks, weights and device produced it (:class:`EngineIdentity`).
"""
from __future__ import annotations

from typing import Any

from models.predict import VERSION, InfNetPredictor

from ..types import EngineIdentity, InfectionResult, LungMasks, Volume
from .base import EngineUnavailable

NAME = "infnet"
ENGINE_VERSION = VERSION


class InfNetEngine:
    """Options: those of :class:`models.predict.InfNetPredictor` (weights, multiclass, device, batch, threshold,
    window, size, weights_dir, model, meta, tta). Weights that cannot be loaded raise
    :class:`EngineUnavailable` with the reason."""

    def __init__(self, **options: Any):
        try:
            self.predictor = InfNetPredictor(**options)
        except TypeError:
            raise  # an option this engine does not have: a configuration error, not an unavailable engine
        except Exception as exc:  # missing or corrupt weights, a GPU out of memory while loading them
            raise EngineUnavailable(f"the Inf-Net engine could not be loaded ({type(exc).__name__}: {exc})") from exc
        p = self.predictor
        self.identity = EngineIdentity(name=NAME, version=ENGINE_VERSION, weights_sha256=p.meta.get("sha256", ""),
                                       description=p.description, device=p.device_label)

    def segment(self, volume: Volume, lungs: LungMasks) -> InfectionResult:
        lung = lungs.labels > 0
        pred = self.predictor.predict(volume.hu, lung)
        infection = (pred.probability >= self.predictor.threshold) & lung  # probability stays unmasked
        ggo = consolidation = None
        if pred.consolidation is not None:
            consolidation = infection & pred.consolidation
            ggo = infection & ~consolidation
        return InfectionResult(infection=infection, ggo=ggo, consolidation=consolidation,
                               probability=pred.probability)
