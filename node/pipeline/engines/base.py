"""Infection engines: the interface, the registry of factories, and the choice behind ``engine = "auto"``.

An engine takes the assembled :class:`Volume` and its :class:`LungMasks` and returns an
:class:`InfectionResult` on the same voxel grid. Engines are registered by name with a factory that builds
one from keyword options; the built-in factories import their engine's module only when called, so listing
or choosing engines loads neither torch nor weights::

    engine = get_engine("infnet", device="cuda")
    choice = build_engine("auto", device="cuda")   # Inf-Net if it loads, else the threshold engine
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ..types import EngineIdentity, InfectionResult, LungMasks, Volume

log = logging.getLogger(__name__)

AUTO = "auto"
PREFERRED = "infnet"      # what "auto" builds when it loads
FALLBACK = "threshold"    # what "auto" builds otherwise: needs no weights
GENERIC_OPTIONS = ("device",)  # options every engine accepts; the only ones the fallback is given


@runtime_checkable
class InfectionEngine(Protocol):
    """What the pipeline needs from an infection segmentation engine."""

    identity: EngineIdentity

    def segment(self, volume: Volume, lungs: LungMasks) -> InfectionResult: ...


EngineFactory = Callable[..., InfectionEngine]


class EngineUnavailable(RuntimeError):
    """An engine that exists cannot be built here (its weights are missing or broken, torch is absent)."""


def _threshold(**options: Any) -> InfectionEngine:
    from .threshold import ThresholdEngine

    return ThresholdEngine(**options)


def _infnet(**options: Any) -> InfectionEngine:
    try:
        from .infnet import InfNetEngine
    except ImportError as exc:
        raise EngineUnavailable(f"the Inf-Net engine cannot be imported ({type(exc).__name__}: {exc})") from exc
    return InfNetEngine(**options)


_REGISTRY: dict[str, EngineFactory] = {"threshold": _threshold, "infnet": _infnet}


def register_engine(name: str, factory: EngineFactory) -> None:
    """Register (or replace) the factory that builds engine ``name`` from keyword options."""
    if not name or name == AUTO or not callable(factory):
        raise ValueError(f"register_engine needs a name other than {AUTO!r} and a callable factory")
    _REGISTRY[name] = factory


def available_engines() -> list[str]:
    return sorted(_REGISTRY)


def get_engine(name: str, **options: Any) -> InfectionEngine:
    """Build engine ``name`` with ``options``; ValueError names the available engines when unknown,
    :class:`EngineUnavailable` says why a known one cannot be built."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown infection engine {name!r} (available: {', '.join(available_engines())})") from None
    return factory(**options)


@dataclass
class EngineChoice:
    """The engine built for a name, and why "auto" fell back ("" when it did not)."""

    engine: InfectionEngine
    fallback: str = ""


def build_engine(name: str, **options: Any) -> EngineChoice:
    """:func:`get_engine`, plus ``"auto"``: the Inf-Net engine when it actually loads, otherwise the threshold
    engine (built with the generic options only), with a WARNING and the reason in :attr:`EngineChoice.fallback`.
    An engine asked for by name is never replaced: its failure propagates."""
    if name != AUTO:
        return EngineChoice(get_engine(name, **options))
    try:
        return EngineChoice(get_engine(PREFERRED, **options))
    except EngineUnavailable as exc:
        reason = f"{exc}; the {FALLBACK} engine was used instead (engine \"auto\")"
    log.warning("%s", reason)
    generic = {k: v for k, v in options.items() if k in GENERIC_OPTIONS}
    return EngineChoice(get_engine(FALLBACK, **generic), fallback=reason)
