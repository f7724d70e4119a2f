"""The densities the lung steps tell apart, aerated lung and dense tissue (consolidation, effusion), and the
opening that drops thin rims of dense tissue (extrapleural fat, partial volume) before dense tissue is taken."""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .shapes import odd_pixels

AIR_HU = -320.0         # lung parenchyma (with mild disease) vs soft tissue, as in classic lung thresholding
DENSE_HU = (-320.0, 45.0)       # consolidation / effusion after a 3x3 mean; liver (>= 50 HU unenhanced) stays out
DENSE_SMOOTH_MM = 2.2    # side of the in-plane mean filter of dense_tissue and rib_mask (noise down)
RIM_MM = 2.5                    # opening radius (at least one pixel): drops rims of extrapleural fat and
                                # partial volume thinner than about twice this


def dense_tissue(hu: np.ndarray, spacing_rc: tuple[float, float]) -> np.ndarray:
    """Pixels of consolidation / effusion density (``DENSE_HU``) after a small in-plane mean filter
    (``DENSE_SMOOTH_MM``: noise down), of one slice (r, c) or of every slice of (k, r, c)."""
    size = odd_pixels(DENSE_SMOOTH_MM, spacing_rc)
    smooth = ndi.uniform_filter(hu, (1,) * (hu.ndim - 2) + (size, size)) if size > 1 else hu
    return (smooth > DENSE_HU[0]) & (smooth <= DENSE_HU[1])

