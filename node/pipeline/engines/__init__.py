"""Infection segmentation engines: interface and registry (:mod:`.base`), the HU-threshold engine
(:mod:`.threshold`) and the Inf-Net engine (:mod:`.infnet`, imported only when it is built: it needs torch)."""
from .base import (AUTO, EngineChoice, EngineFactory, EngineUnavailable, InfectionEngine, available_engines,
                   build_engine, get_engine, register_engine)
from .threshold import ThresholdEngine, aerated_peak

__all__ = ["AUTO", "EngineChoice", "EngineFactory", "EngineUnavailable", "InfectionEngine", "ThresholdEngine",
           "aerated_peak", "available_engines", "build_engine", "get_engine", "register_engine"]
