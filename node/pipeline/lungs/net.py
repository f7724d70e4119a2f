"""Step 6n (method "net"): the lung network (models/lungnet.py) corrects the HU method where its rules are weak."""
from __future__ import annotations

import functools
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
from scipy import ndimage as ndi

from .. import morphology
from ..types import LungMasks
from .aerated import smooth_lungs
from .body import Midline
from .chestwall import within_chest_wall
from .density import AIR_HU, RIM_MM
from .shapes import disk, piece_means

NET_WEIGHTS = "lungnet"         # models/weights/<name>.safetensors
NET_LUNG_PROBABILITY = 0.5      # a pixel is lung for the net from this probability
NET_PREFILTER_PROBABILITY = 0.05  # steps 6-6b skip dense tissue below this (0.2, the veto, cost 0.01 of
                                  # phantom consolidation recall: pieces that joined others to the lung)
NET_VETO_PROBABILITY = 0.2     # dense tissue the HU rules recovered leaves the lung below this probability
FAT_HU = (-190.0, -30.0)        # adipose tissue (the usual CT body-composition range)
FAT_SHARE = 0.8                 # a piece of dense tissue at least this much in FAT_HU ...
FAT_MEDIAN_HU = -90.0           # ... with its median at most this is fat, not the partly aerated edge of consolidation
NET_COMPONENT_PROBABILITY = 0.3  # a connected piece of lung whose mean probability is lower leaves it (bowel gas,
                                 # air in the chest wall)
NET_THREAD_SLICES = 16          # the early network's slices per step (one batch of models.lungnet.INFERENCE_BATCH);
                                # between steps it reads which slices are still needed


@functools.lru_cache(maxsize=2)
def _lung_net(device: str):
    """The shipped lung network on ``device``, batch normalisation folded, and its input size (loaded once per
    process and device)."""
    from models.lungnet import folded
    from models.registry import load_shipped

    model, meta = load_shipped(NET_WEIGHTS, device=device)
    return folded(model), int(meta["input"]["size"])


def lung_probability(hu: np.ndarray, device: str = "cpu") -> np.ndarray:
    """Lung probability (float32) of every voxel of ``hu`` (k, r, c), from the lung network (models/lungnet.py),
    all slices in batches on ``device``. ``hu`` should be the body box (:func:`body_box`): the network saw
    slices cropped so."""
    import torch

    from models.lungnet import lung_probability as net_probability

    model, size = _lung_net(device)
    with torch.inference_mode():
        prob = net_probability(model, torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32)), size)
    return prob.cpu().numpy()


def slices_near(mask: np.ndarray) -> slice | None:
    """The slices from the one before the first that holds ``mask`` to the one after the last (None: none)."""
    ks = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
    if not ks.size:
        return None
    return slice(max(int(ks[0]) - 1, 0), min(int(ks[-1]) + 2, mask.shape[0]))


class EarlyProbability:
    """:func:`lung_probability`, started on a thread of its own before the aerated lung is known: the network
    needs only ``hu``, so it runs while the HU steps find the aerated lung (on a CPU torch's threads fill the
    cores those steps leave idle). The thread works through the slices near those that hold ``air`` (the
    body's air, of which the aerated lung is a part), ``NET_THREAD_SLICES`` at a time from the first; once the
    caller says which slices it needs (:meth:`probability`, :meth:`stop`), it skips the others (an abdomen
    below the lungs). A network's probability of a slice does not depend on the other slices of its batch."""

    def __init__(self, hu: np.ndarray, air: np.ndarray, device: str = "cpu"):
        self._hu, self._device = hu, device
        self._prob = np.zeros(hu.shape, np.float32)
        self._done = np.zeros(hu.shape[0], bool)
        self._wanted: slice | None = None  # set once by the caller; the thread reads it before each batch
        pool = ThreadPoolExecutor(1, thread_name_prefix="lungnet")
        self._future = pool.submit(self._run, slices_near(air))
        pool.shutdown(wait=False)  # the thread ends with its one task

    def _run(self, near: slice | None) -> None:
        if near is None:
            return
        for k0 in range(near.start, near.stop, NET_THREAD_SLICES):
            k1 = min(k0 + NET_THREAD_SLICES, near.stop)
            wanted = self._wanted
            if wanted is not None and (k1 <= wanted.start or k0 >= wanted.stop):
                continue
            self._prob[k0:k1] = lung_probability(self._hu[k0:k1], self._device)
            self._done[k0:k1] = True

    def probability(self, near: slice) -> np.ndarray:
        """The probability of the slices ``near``, 0 on the others (the whole volume's array): the thread's,
        once it has ended, and the slices it did not compute (beyond the body's air, or skipped) computed here."""
        self._wanted = near
        self._future.result()
        prob = self._prob
        prob[:near.start], prob[near.stop:] = 0.0, 0.0
        todo = np.flatnonzero(~self._done[near]) + near.start
        for run in np.split(todo, np.flatnonzero(np.diff(todo) > 1) + 1) if todo.size else ():
            k0, k1 = int(run[0]), int(run[-1]) + 1
            prob[k0:k1] = lung_probability(self._hu[k0:k1], self._device)
        return prob

    def stop(self) -> None:
        """No slice is needed: the thread skips the rest."""
        self._wanted = slice(0, 0)


def lung_probability_near(hu: np.ndarray, aerated: np.ndarray, device: str = "cpu",
                          started: EarlyProbability | None = None) -> np.ndarray:
    """:func:`lung_probability` on the slices from the first to the last that hold ``aerated`` lung or lie next
    to one; 0 on the others. Steps 6-6n use the probability only there: a slice gains lung only beside lung
    on the same slice (6, 6a, 6n) or between two neighbours with lung (6b), and step 6n keeps nothing on a
    slice without aerated lung (:func:`within_chest_wall`). ``started``: the network started early, which
    gives those slices."""
    near = slices_near(aerated)
    if near is not None and started is not None:
        return started.probability(near)
    if started is not None:
        started.stop()
    prob = np.zeros(hu.shape, np.float32)
    if near is not None:
        prob[near] = lung_probability(hu[near], device)
    return prob


def net_refine(labels: np.ndarray, aerated: np.ndarray, hu: np.ndarray, body: np.ndarray, airways: np.ndarray,
               right_side: np.ndarray, spacing_rc: tuple[float, float], device: str,
               trunk: np.ndarray | None = None, midline: Midline | None = None,
               prob: np.ndarray | None = None) -> tuple[np.ndarray, int, int]:
    """Step 6n (method "net"): the lung network's probability corrects the HU method where the HU rules are weak.

    Dense tissue that the HU rules recovered (steps 5-6b: not ``aerated``) and the network gives less than
    ``NET_VETO_PROBABILITY`` leaves the lung (a strip of mediastinum or heart border the rays took), and so does
    a connected piece whose mean probability is under ``NET_COMPONENT_PROBABILITY`` (bowel gas). Dense
    tissue of the body that the network gives at least ``NET_LUNG_PROBABILITY`` joins the lung it touches (3D),
    when at least as deep under the skin as the inner chest wall (:func:`within_chest_wall`: the network,
    trained without real chest walls, also marks muscle between the ribs; with ``midline``, the ribs' inner
    surface bounds that depth where consolidation hides the wall, and bone the network gives lung is no rib),
    after an opening of ``RIM_MM`` per slice (thin rims at the pleura, the network's blurred edge), on the side
    of the body midline, unless the piece is fat (:func:`fat_pieces`): consolidation and atelectasis that no HU
    rule reaches. Holes are then filled as in step 6, not those open onto an organ on a neighbouring slice (a
    liver dome ringed by lung stays out).
    Aerated lung is the HU method's. ``prob``: the network's probability of ``hu``, computed (on ``device``)
    when not given. Returns the labels, the voxels taken and the voxels removed.
    """
    prob = lung_probability(hu, device) if prob is None else prob
    labels = labels.copy()
    vetoed = (labels > 0) & ~aerated & (prob < NET_VETO_PROBABILITY)
    lab, n = ndi.label(labels > 0)
    if n:  # a whole piece of "lung" the network does not see as lung: bowel gas, air in the chest wall
        unlike = piece_means(lab, n, prob) < NET_COMPONENT_PROBABILITY
        unlike[0] = False
        vetoed |= unlike[lab]
    labels[vetoed] = 0
    lung = labels > 0
    rim = disk(max(RIM_MM, max(spacing_rc)), spacing_rc)
    dense = (prob >= NET_LUNG_PROBABILITY) & body & ~airways & ~lung & (hu >= AIR_HU)
    # an opening keeps whole disks, and a disk of what the chest-wall limit keeps lies in the opened candidates:
    # so the limit is asked only about those (on most slices none: the network's blurred edge is a thin rim)
    dense = morphology.binary_opening(dense, rim)
    dense = morphology.binary_opening(within_chest_wall(dense, aerated, body if trunk is None else trunk,
                                                        spacing_rc, hu=hu, midline=midline, prob=prob), rim)
    lab, n = ndi.label(dense | lung)
    touching = np.zeros(n + 1, bool)
    touching[np.unique(lab[lung])] = True
    touching[0] = False
    dense &= touching[lab]
    dense &= ~fat_pieces(dense, hu)
    labels[dense] = np.where(right_side[dense], LungMasks.RIGHT, LungMasks.LEFT)
    # holes enclosed now: filled as in step 6, not those open onto an organ on the next slice (a liver dome)
    return smooth_lungs(labels, spacing_rc, 0.0, hu=hu), int(dense.sum()), int(vetoed.sum())


def fat_pieces(mask: np.ndarray, hu: np.ndarray) -> np.ndarray:
    """The connected pieces of ``mask`` (3D) that are fat: at least ``FAT_SHARE`` of the piece in ``FAT_HU`` and
    its median at most ``FAT_MEDIAN_HU``. The lung network takes pericardial, mediastinal and extrapleural fat
    for lung; consolidation is soft tissue (its partly aerated edge lies above -90 HU) and dense ground glass
    holds air (below the range), so neither is fat by this rule."""
    lab, n = ndi.label(mask)
    if not n:
        return np.zeros_like(mask)
    fat = piece_means(lab, n, (hu >= FAT_HU[0]) & (hu <= FAT_HU[1])) >= FAT_SHARE  # background (0) is not
    pieces = np.flatnonzero(fat)
    if pieces.size:  # the median over the voxels of those pieces only (over the whole box it costs seconds)
        sel = fat[lab]
        fat[pieces] = np.asarray(ndi.median(hu[sel], lab[sel], pieces)) <= FAT_MEDIAN_HU
    return fat[lab]
