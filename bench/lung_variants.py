"""Lung-step variants the lung benches compare (bench/lungs_on_*.py): a step of node.pipeline.lungs switched off
for the duration of a ``with`` block, the node's code otherwise."""
from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator


def _no_recovery(labels, *args, **kwargs):
    return labels.copy(), 0


def _no_limit(cand, *args, **kwargs):
    return cand.copy()


# step -> (module, function, stand-in): "6", "6a", "6b" take nothing; "wall" keeps every candidate of step 6n
STEPS = {"6": ("node.pipeline.lungs", "recover_dense_periphery", _no_recovery),
         "6a": ("node.pipeline.lungs", "recover_bronchograms", _no_recovery),
         "6b": ("node.pipeline.lungs", "recover_between_slices", _no_recovery),
         "wall": ("node.pipeline.lungs.net", "within_chest_wall", _no_limit)}


@contextlib.contextmanager
def steps_off(*steps: str) -> Iterator[None]:
    """The lung steps ``steps`` (keys of ``STEPS``) switched off inside the block."""
    saved = []
    try:
        for step in steps:
            module_name, name, stand_in = STEPS[step]
            module = importlib.import_module(module_name)
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, stand_in)
        yield
    finally:
        for module, name, fn in reversed(saved):
            setattr(module, name, fn)
