"""Dense-disease recovery of the HU method: step 6 (dense tissue between the lung and the chest wall), 6a (air
bronchograms) and 6b (between slices)."""
from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import Delaunay

from .. import morphology, workgrid
from ..slicewise import by_slabs
from ..types import LungMasks
from .body import Midline
from .chestwall import SkinGeometry, WALL_RAY_MM, between_lung_and_wall, ray_hits, wall_depth_ok
from .density import AIR_HU, RIM_MM, dense_tissue
from .shapes import disk, joined_to, largest_per_slice, per_lung_slice, touching_lung, within_mm

POCKET_MAX_MM2 = 100.0          # air bronchogram cross-sections; lobar bronchi and bowel loops are larger
POCKET_CLUSTER = 3              # pockets (itself included) within POCKET_CLUSTER_MM for a pocket to count:
POCKET_CLUSTER_MM = 15.0        #   consolidation shows several bronchograms, a hilum one or two bronchi
POCKET_REACH_MM = 10.0          # dense tissue this close to a counted pocket is taken
POCKET_MIDLINE_MM = 25.0        # pockets nearer the body midline (esophagus, airways) do not count
POCKET_DEPTH_MM = 20.0          # nor pockets shallower under the skin (air in the chest wall)
PERIPHERAL_RAY_MM = 80.0        # step 6a: no lung may lie this far towards the skin from a taken pixel


def recover_dense_periphery(labels: np.ndarray, hu: np.ndarray, body: np.ndarray, right_side: np.ndarray,
                            spacing_rc: tuple[float, float], *, dense: np.ndarray | None = None,
                            trunk: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Take back consolidation / effusion between each lung and the inner chest wall (step 6), per slice.

    Candidates are unlabelled trunk pixels of ``DENSE_HU`` density after a 3x3 mean (noise down), at least
    as deep as the inner chest wall (:func:`wall_depth_ok`) and, for one lung, between that lung and the
    wall (:func:`between_lung_and_wall`) and on that lung's side of the body midline (``right_side``:
    a lesion never crosses it, the mediastinum does). An opening (``RIM_MM``) drops thin rims along the
    pleura (extrapleural fat, partial volume); what remains and touches the lung joins it. ``dense``
    (:func:`dense_tissue` of ``hu``) and ``trunk`` (the largest ``body`` region of each slice) are computed
    when not given. Returns the new labels and the number of voxels taken.
    """
    dense = dense_tissue(hu, spacing_rc) if dense is None else dense
    trunk = by_slabs(largest_per_slice, body) if trunk is None else trunk
    rim = disk(max(RIM_MM, max(spacing_rc)), spacing_rc)[0]
    return per_lung_slice(labels, lambda k, lab: _dense_periphery_slice(lab, dense[k] & trunk[k], trunk[k],
                                                                         right_side[k], rim, spacing_rc))


def _dense_periphery_slice(labels: np.ndarray, dense: np.ndarray, trunk: np.ndarray, right_side: np.ndarray,
                           rim: np.ndarray, spacing_rc: tuple[float, float]) -> int:
    """Step 6 on one slice: ``labels`` (r, c) updated in place; returns the number of pixels taken."""
    lungs = labels > 0
    # the rim opening below keeps whole disks, and a disk of the pixels that pass every test lies in the opened
    # candidates: only those need the tests (none on many slices, where no skin distances are needed at all)
    dense = morphology.binary_opening(dense & ~lungs, rim)
    if not dense.any():
        return 0
    before = labels.copy()
    skin = SkinGeometry(trunk, spacing_rc)
    rr, cc = np.nonzero(dense)
    keep = wall_depth_ok(lungs, skin, rr, cc)
    deep = np.zeros_like(lungs)
    deep[rr[keep], cc[keep]] = True
    rr, cc = np.nonzero(morphology.binary_opening(deep, rim))
    recovered = 0
    for value in (LungMasks.RIGHT, LungMasks.LEFT):
        lung = before == value
        if not lung.any() or rr.size == 0:
            continue
        # only pixels on this lung's side and within ray reach of it can pass the ray test, and only those
        # joined to it through such pixels can touch it after the opening (which acts on each piece alone)
        near = right_side[rr, cc] == (value == LungMasks.RIGHT)
        near &= within_mm(lung, rr, cc, WALL_RAY_MM, spacing_rc)
        near[near] = joined_to(lung, rr[near], cc[near])
        r1, c1 = rr[near], cc[near]
        keep = between_lung_and_wall(lung, r1, c1, skin, spacing_rc)
        taken = np.zeros_like(lung)
        taken[r1[keep], c1[keep]] = True
        taken = touching_lung(morphology.binary_opening(taken, rim) & (labels == 0), lung)
        labels[taken] = value
        recovered += int(taken.sum())
    return recovered


def bronchogram_pockets(air: np.ndarray, where: np.ndarray, midline_mm: np.ndarray,
                        depth: Callable[[], np.ndarray], spacing_rc: tuple[float, float]) -> np.ndarray:
    """Air bronchograms on one slice: small pockets of ``air`` (below ``AIR_HU``; ``POCKET_MAX_MM2``) among the
    pixels ``where`` (trunk, not lung, airways or next to them), at least ``POCKET_MIDLINE_MM`` from the
    midline and ``POCKET_DEPTH_MM`` under the skin, that have at least ``POCKET_CLUSTER`` such pockets
    (themselves included) within ``POCKET_CLUSTER_MM``. ``depth`` (under the skin, mm) is called only on
    slices with enough candidates (most slices have none)."""
    none = np.zeros_like(where)
    lab, n = ndi.label(air & where)
    if n < POCKET_CLUSTER:
        return none
    area = np.bincount(lab.ravel()) * spacing_rc[0] * spacing_rc[1]
    small = area <= POCKET_MAX_MM2
    small[0] = False
    pocket = small[lab] & (np.abs(midline_mm) >= POCKET_MIDLINE_MM)
    if np.unique(lab[pocket]).size < POCKET_CLUSTER:
        return none
    pocket &= depth() >= POCKET_DEPTH_MM
    ids = np.unique(lab[pocket])
    if ids.size < POCKET_CLUSTER:
        return none
    centres = np.array(ndi.center_of_mass(pocket, lab, ids)) * np.asarray(spacing_rc)
    dist = np.sqrt(((centres[:, None, :] - centres[None, :, :]) ** 2).sum(-1))
    counted = ids[(dist <= POCKET_CLUSTER_MM).sum(axis=1) >= POCKET_CLUSTER]
    return np.isin(lab, counted)


def recover_bronchograms(labels: np.ndarray, hu: np.ndarray, body: np.ndarray, airways: np.ndarray,
                         midline: Midline, spacing_rc: tuple[float, float], *,
                         dense: np.ndarray | None = None, air: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Take back consolidated lung marked by air bronchograms (step 6a), per slice.

    The pockets of :func:`bronchogram_pockets` and the :func:`dense_tissue` within ``POCKET_REACH_MM`` of
    them join the lung they touch (8-connected, on its side of the midline, inside the convex hull of that
    lung and its pockets), except pixels with lung within ``PERIPHERAL_RAY_MM`` towards their nearest skin
    point: tissue enclosed by aerated lung on its skin side is the hilum or, inside a diaphragm dome, the
    abdomen. ``dense`` (:func:`dense_tissue` of ``hu``) is computed when not given; ``body`` is that of
    ``midline``, whose trunk (largest region of each slice) is used. ``air``: the source pixels below
    ``AIR_HU``, on a grid ``f`` times finer than ``hu`` (the working grid's blocks, :func:`segment_lungs`):
    bronchograms a pixel or two wide vanish in a block's mean, so the pockets are found on the source grid;
    ``hu < AIR_HU`` when not given. Returns the new labels and the number of voxels taken.
    """
    dense = dense_tissue(hu, spacing_rc) if dense is None else dense
    air = hu < AIR_HU if air is None else air
    trunk = midline.trunk
    return per_lung_slice(labels, lambda k, lab: _bronchograms_slice(lab, air[k], dense[k], trunk[k], airways[k],
                                                                     midline.signed(k), spacing_rc))


def _bronchograms_slice(labels: np.ndarray, air: np.ndarray, dense: np.ndarray, trunk: np.ndarray,
                        airways: np.ndarray, signed: np.ndarray, spacing_rc: tuple[float, float]) -> int:
    """Step 6a on one slice: ``labels`` (r, c) updated in place; returns the number of pixels taken. ``air``:
    see :func:`recover_bronchograms`."""
    lungs = labels > 0
    skin_of = functools.cache(lambda: SkinGeometry(trunk, spacing_rc))  # made once, and only when needed
    # air touching the lung is its edge; on the working grid, the air of the blocks on its outline
    where = trunk & ~morphology.binary_dilation(lungs | airways, morphology.NEIGHBOURS)
    f = air.shape[0] // labels.shape[0]
    if f == 1:
        pockets = bronchogram_pockets(air, where, signed, lambda: skin_of().depth, spacing_rc)
    else:  # found among the source pixels of the blocks that hold air; a block with a pocket pixel is a pocket
        pockets = np.zeros_like(lungs)
        rows, cols = np.nonzero(where & workgrid.block_any(air, f))
        if rows.size:
            box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
            source = tuple(slice(s.start * f, s.stop * f) for s in box)
            fine = functools.partial(workgrid.upsampled, shape=air[source].shape, factor=f)
            found = bronchogram_pockets(air[source], fine(where[box]), fine(signed[box]),
                                        lambda: fine(skin_of().depth[box]), (spacing_rc[0] / f, spacing_rc[1] / f))
            pockets[box] = workgrid.block_any(found, f)
    if not pockets.any():
        return 0
    skin = skin_of()
    near = ndi.distance_transform_edt(~pockets, sampling=spacing_rc) <= POCKET_REACH_MM
    rr, cc = np.nonzero(near & (dense | pockets) & trunk & ~lungs)
    keep = ~ray_hits(lungs, rr, cc, skin, spacing_rc, True, PERIPHERAL_RAY_MM)
    rr, cc = rr[keep], cc[keep]
    recovered = 0
    for value in (LungMasks.RIGHT, LungMasks.LEFT):
        lung = labels == value
        side = (signed < 0) == (value == LungMasks.RIGHT)
        on_side = side[rr, cc]
        if not lung.any() or not on_side.any():
            continue
        r1, c1 = rr[on_side], cc[on_side]
        # not beyond the outermost bronchograms: inside the convex hull of the lung and its pockets
        hull = Delaunay(np.argwhere((lung & ~ndi.binary_erosion(lung)) | (pockets & side)))
        inside = hull.find_simplex(np.stack([r1, c1], axis=1)) >= 0
        cand = np.zeros_like(lung)
        cand[r1[inside], c1[inside]] = True
        taken = touching_lung(cand, lung) & (labels == 0)
        labels[taken] = value
        recovered += int(taken.sum())
    return recovered


def recover_between_slices(labels: np.ndarray, hu: np.ndarray, body: np.ndarray, right_side: np.ndarray,
                           spacing_rc: tuple[float, float], *,
                           dense: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Take back dense tissue that is lung on both neighbouring slices (step 6b).

    A pixel of :func:`dense_tissue` on slice k joins a lung when that lung covers the same
    pixel on slice k-1 and on slice k+1, on its side of the midline, after the same rim opening as step 6;
    repeated until nothing changes, so a lesion is taken back from its edges inwards. Consolidation
    against the mediastinum or a diaphragm dome, which the chest-wall rays of step 6 cannot judge, is
    caught this way where the lung around it was found above and below. Organs that rise into the lung's
    footprint from one side (the top of the heart, a diaphragm dome) are lung on one neighbour only and
    stay out. ``dense`` (:func:`dense_tissue` of ``hu``) is computed when not given. Returns the new labels
    and the number of voxels taken.
    """
    out = labels.copy()
    if out.shape[0] < 3:
        return out, 0
    dense = dense_tissue(hu, spacing_rc) if dense is None else dense
    rim = disk(max(RIM_MM, max(spacing_rc)), spacing_rc)[0]
    taken_total = 0
    while True:
        taken_now = 0
        for k in range(1, out.shape[0] - 1):
            for value in (LungMasks.RIGHT, LungMasks.LEFT):
                both = (out[k - 1] == value) & (out[k + 1] == value) & (out[k] == 0)
                if not both.any():
                    continue
                side = right_side[k] == (value == LungMasks.RIGHT)
                taken = morphology.binary_opening(both & dense[k] & body[k] & side, rim)
                out[k][taken] = value
                taken_now += int(taken.sum())
        taken_total += taken_now
        if not taken_now:
            return out, taken_total

