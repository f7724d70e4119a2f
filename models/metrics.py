"""Overlap of two segmentation masks, numpy only (no torch), for the node and for training alike.

Two empty masks have no Dice coefficient: 2|A&B| / (|A| + |B|) is 0/0. :func:`dice` returns ``None`` for
them unless the caller says what that case counts as (``empty=``): the node stores ``None`` ("undefined",
shown as n/a) for a segment both SEGs leave empty; the training metrics follow the Inf-Net evaluation
toolbox and count it as a perfect match (``empty=1.0``), so that an image without infection predicted
without infection scores 1 in the per-image mean.
"""
from __future__ import annotations

from typing import overload

import numpy as np
from numpy.typing import ArrayLike


@overload
def dice(a: ArrayLike, b: ArrayLike) -> float | None: ...
@overload
def dice(a: ArrayLike, b: ArrayLike, *, empty: float) -> float: ...
@overload
def dice(a: ArrayLike, b: ArrayLike, *, empty: None) -> float | None: ...


def dice(a: ArrayLike, b: ArrayLike, *, empty: float | None = None) -> float | None:
    """Dice coefficient 2|A&B| / (|A| + |B|) of two boolean masks of the same shape.

    Values are taken as booleans (non-zero = inside). When both masks are empty the coefficient is
    undefined and ``empty`` is returned: ``None`` by default, or the value the caller aggregates it as.
    """
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    if total == 0:
        return empty
    return 2.0 * int(np.count_nonzero(a & b)) / total
