"""Lung segmentation: HU thresholds and rules, optionally with a learned lung network (:class:`LungMethod`).

Method "hu" runs every step below; method "aerated" steps 1-5 and 7; method "net" every step and, after 6b,
step 6n (:func:`net_refine`): the lung probability of the network of models/lungnet.py (the body box of the
slices with lung, in batches, on the device given) adds dense disease that the rules miss and removes dense
tissue that the rules took but the network does not see as lung (docs/lungs.md). The network starts after
step 2, on a thread of its own while steps 2-5 run, and steps 6-6b skip the dense tissue it gives under
``NET_PREFILTER_PROBABILITY`` (step 6n would return it).

Every step runs on the working grid (:mod:`node.pipeline.workgrid`): blocks of source pixels averaged to
at most ``workgrid.MAX_WORK_PIXEL_MM`` (2 x 2 blocks of 1.4 mm for 0.7 mm pixels; slices are not combined);
the labels then return to the source grid, where source pixels place the outline of aerated lung. Steps:

1. body: largest connected region above -500 HU after a small per-slice opening (drops the table, cables,
   sheets), holes filled slice by slice;
2. air inside the body: below -320 HU inside the filled body; regions that touch the image border (air
   outside the patient) are dropped;
3. airways: the trachea is found on the most cranial slices near the midline and followed caudally
   (lumen below -900 HU) with a leak guard; the trachea and main bronchi are removed;
4. lung components: bowel/stomach gas (near-pure air without vessels), slivers (air in skin folds) and
   components under 5 % of the largest are dropped; every remaining
   component is assigned to the patient's right or left from its position relative to the midline
   (computed from ImageOrientationPatient, so any in-plane orientation works); a component straddling the
   midline (lungs touching at the anterior/posterior junction, or joined through an unremoved airway) is
   split by iterative erosion and nearest-seed assignment, falling back on the midline itself;
5. per lung: the outline is closed slice by slice (radius ``CLOSING_MM``, which also takes back thin dense
   lesions at the pleura), then holes are filled (vessels, enclosed lesions), except large holes that
   open onto non-lung tissue on a neighbouring slice (liver under a diaphragm dome, hilum);
6. dense peripheral recovery: consolidation or effusion against the chest wall is as dense as muscle, so
   the -320 HU threshold leaves a "bite" in the lung outline that the closing of step 5 only takes back
   when it is thin. Per slice, pixels of consolidation/effusion density (``DENSE_HU``, liver excluded)
   are taken into a lung when they lie (a) deeper under the skin than the inner chest wall, whose
   thickness is read from where aerated lung touches it around the body, (b) between that lung and the
   wall: towards the nearest skin there is no lung, away from it there is, and (c) on that lung's side of
   the body midline; thin rims (extrapleural fat, partial volume) are opened away. The heart, mediastinum
   and the liver under a dome fail (b) or the density range. Holes are then filled again, this time also
   large ones open to a neighbouring slice when their median HU is that of a lesion (``LESION_MEDIAN_HU``);
6a. air bronchograms: consolidation that fills the dependent lung over a wide arc leaves no aerated lung
   against the wall to read its thickness from, so step 6 cannot judge it; its air bronchograms mark it as
   lung. Clusters of small air pockets (``POCKET_MAX_MM2``; at least ``POCKET_CLUSTER`` within
   ``POCKET_CLUSTER_MM``) in dense tissue, away from the midline (esophagus, airways) and deep under the
   skin, take the dense tissue within ``POCKET_REACH_MM`` of them, up to the convex hull of the lung and
   its pockets (not into the chest wall beyond the outermost ones), into the lung they touch, where no lung
   lies between it and the skin (so not the hilum, whose bronchi look alike, nor the abdomen inside a
   diaphragm dome, where bowel gas does);
6b. between slices: dense pixels that are lung on both neighbouring slices join that lung (repeated until
   stable): consolidation against the mediastinum or a diaphragm dome, where the chest-wall rays of step 6
   do not apply; the top of the heart or a dome rising into the lung is lung on one neighbour only;
7. one connected component per lung (on a single slice: pieces under 10 % of the largest are dropped).
   ``LungMasks.notes`` say how much was recovered or dropped.

A single slice goes through the same steps in 2D. ``partial_coverage`` is set for one slice, or when lung
reaches the first or last slice; the note then says which end is cut (apex, base or both). It is also set,
with ``fov_cut_cm2`` and a note, when lung reaches the in-plane edge of the image (a field of view narrower
than the chest, :func:`lung_cut_by_fov`): series selection skips such a series.

Modules: :mod:`.body` (step 1, the midline, the field-of-view check), :mod:`.airways` (3), :mod:`.aerated` (4, 5
and 7), :mod:`.chestwall` (the inner chest wall of steps 6, 6a and 6n), :mod:`.recovery` (6, 6a, 6b), :mod:`.net`
(6n), :mod:`.notes` (what the notes say), :mod:`.density` and :mod:`.shapes` (shared thresholds and mask
helpers); this package runs them (:func:`segment_lungs`).

Speed: the steps that work slice by slice (the body opening and hole filling, the closings of step 5, steps
6, 6a and 6n's chest-wall limit) run on all CPUs on worker threads (:mod:`node.pipeline.slicewise`), with the
result of one loop; docs/performance.md gives the times.
"""
from __future__ import annotations

import dataclasses
import enum
import functools

import numpy as np

from .. import workgrid
from ..types import LungMasks, Volume
from .aerated import CLOSING_MM, assign_sides, one_component_per_lung, smooth_lungs
from .airways import find_airways
from .body import Midline, body_box, body_mask, cropped, lung_cut_by_fov, outside_air_removed
from .density import AIR_HU, dense_tissue
from .net import NET_PREFILTER_PROBABILITY, EarlyProbability, lung_probability_near, net_refine
from .notes import amount_text, coverage_note
from .recovery import recover_between_slices, recover_bronchograms, recover_dense_periphery


class LungMethod(str, enum.Enum):
    """How :func:`segment_lungs` decides what is lung."""

    HU = "hu"              # steps 1-7 of the module docstring (HU thresholds and rules only)
    AERATED = "aerated"    # steps 1-5 and 7: aerated lung only, no dense recovery (also the training labels'
                           # aerated part, training/lungnet.py)
    NET = "net"            # every step, then step 6n: the learned lung probability (models/lungnet.py) adds
                           # dense disease the rules miss and removes dense tissue they took wrongly


DEFAULT_METHOD = LungMethod.NET  # docs/lungs.md, "Default"


def lung_method(name: str) -> LungMethod:
    """The :class:`LungMethod` of a configuration value: "auto" is ``DEFAULT_METHOD``."""
    return DEFAULT_METHOD if name == "auto" else LungMethod(name)


def segment_lungs(volume: Volume, *, closing_mm: float | None = None,
                  method: LungMethod | str = DEFAULT_METHOD, device: str = "cpu") -> LungMasks:
    """Segment the right (1) and left (2) lungs of ``volume``; works on one slice (2D) too.

    ``method``: see :class:`LungMethod`; ``device``: where the lung network runs (method "net"; "cuda" or
    "cpu"). ``closing_mm``: radius of the per-slice outline closing of the HU methods (default ``CLOSING_MM``).
    Every step runs on the working grid (module docstring; ``labels``, ``airways`` and ``body`` come back on
    the source grid), and after the body mask inside the body's bounding box (:func:`body_box`): the air
    around the patient holds no lung, and a CT field of view is often half air.
    """
    method = LungMethod(method)
    factor = workgrid.working_factor(volume.pixel_spacing)
    work = workgrid.coarsened(volume, factor)
    # the body outline from each block's darkest pixel: a channel of outside air one source pixel wide (between
    # skin folds) stays open, and the air it leads to stays outside the body
    body = body_mask(workgrid.block_min(volume.hu, factor), work.pixel_spacing) if factor > 1 else None
    air = workgrid.padded(volume.hu, factor) < AIR_HU if factor > 1 else None  # step 6a's pockets
    masks = _segment_on_grid(work, closing_mm, method, device, body, air)
    if factor == 1:
        return masks
    airways = workgrid.upsampled(masks.airways, volume.shape, factor)
    labels = workgrid.upsampled_labels(masks.labels, volume.hu, work.hu, factor, AIR_HU, keep_out=masks.airways)
    labels[airways] = 0
    return dataclasses.replace(masks, labels=labels, airways=airways,
                               body=workgrid.upsampled(masks.body, volume.shape, factor))


def _segment_on_grid(volume: Volume, closing_mm: float | None, method: LungMethod, device: str,
                     body: np.ndarray | None = None, air: np.ndarray | None = None) -> LungMasks:
    """:func:`segment_lungs` on the grid of ``volume`` (the working grid); ``body``: its body mask, when made
    otherwise than from ``volume.hu``; ``air``: the source pixels below ``AIR_HU`` (``f`` times finer,
    :func:`recover_bronchograms`)."""
    body = body_mask(volume.hu, volume.pixel_spacing) if body is None else body
    rows, cols = body_box(body)
    f = 1 if air is None else air.shape[1] // volume.shape[1]
    inner = _segment_in_box(cropped(volume, rows, cols), body[:, rows, cols], closing_mm, method, device,
                            None if air is None else air[:, rows.start * f:rows.stop * f, cols.start * f:cols.stop * f])
    labels = np.zeros(volume.shape, np.uint8)
    labels[:, rows, cols] = inner.labels
    airways = np.zeros(volume.shape, bool)
    airways[:, rows, cols] = inner.airways
    cut_cm2 = lung_cut_by_fov(volume.hu, body, volume.pixel_spacing)
    notes = inner.notes
    if cut_cm2 > 0:
        notes = [*notes, f"lung reaches the edge of the reconstructed field of view (up to {cut_cm2:.1f} cm2 "
                         "of lung on one slice not segmented): the field of view is narrower than the chest"]
    return dataclasses.replace(inner, labels=labels, airways=airways, body=body, fov_cut_cm2=cut_cm2,
                               partial_coverage=inner.partial_coverage or cut_cm2 > 0, notes=notes,
                               method=method.value)


def _segment_in_box(volume: Volume, body: np.ndarray, closing_mm: float | None,
                    method: LungMethod = LungMethod.HU, device: str = "cpu",
                    source_air: np.ndarray | None = None) -> LungMasks:
    """Steps 2-7 of the module docstring on ``volume`` with its ``body`` mask (step 1); see :class:`LungMethod`."""
    hu = volume.hu
    air = outside_air_removed((hu < AIR_HU) & body)
    # step 6n's network needs only the image: it starts now and runs while steps 2-5 find the aerated lung
    started = EarlyProbability(hu, air, device) if method is LungMethod.NET else None
    try:
        return _segment_from_air(volume, body, air, method, device, closing_mm, source_air, started)
    finally:
        if started is not None:
            started.stop()  # a step that raised leaves no network running on (the worker would wait for it)


def _segment_from_air(volume: Volume, body: np.ndarray, air: np.ndarray, method: LungMethod, device: str,
                      closing_mm: float | None, source_air: np.ndarray | None,
                      started: EarlyProbability | None) -> LungMasks:
    """Steps 2-7 once the body's ``air`` is known; ``started``: step 6n's network, already running."""
    hu = volume.hu
    spacing_rc = volume.pixel_spacing
    area_px = spacing_rc[0] * spacing_rc[1]
    notes: list[str] = []
    midline = Midline(volume, body)
    airways, airway_notes = find_airways(hu, air, midline, volume)
    notes += airway_notes
    right_side = midline.right_side()

    recovered = taken = vetoed = 0
    labels, side_notes = assign_sides(air & ~airways, hu, right_side, spacing_rc)
    notes += side_notes
    labels = smooth_lungs(labels, spacing_rc, CLOSING_MM if closing_mm is None else closing_mm)
    if method in (LungMethod.HU, LungMethod.NET):
        aerated = labels > 0
        dense = dense_tissue(hu, spacing_rc)
        prob = None
        if method is LungMethod.NET:
            # the network first: dense tissue it gives under NET_PREFILTER_PROBABILITY (far below the veto of
            # step 6n) would leave the lung there anyway, so steps 6-6b need not trace it (most of their
            # candidates are chest wall and heart)
            prob = lung_probability_near(hu, aerated, device, started)
            dense &= prob >= NET_PREFILTER_PROBABILITY
        labels, recovered = recover_dense_periphery(labels, hu, body, right_side, spacing_rc, dense=dense,
                                                    trunk=midline.trunk)
        labels, bronchograms = recover_bronchograms(labels, hu, body, airways, midline, spacing_rc, dense=dense,
                                                    air=source_air)
        labels, between = recover_between_slices(labels, hu, body, right_side, spacing_rc, dense=dense)
        recovered += bronchograms + between
        # fill again: the recovered rim may now enclose lesions, which count even when open on the next slice
        labels = smooth_lungs(labels, spacing_rc, 0.0, hu=hu)
        if method is LungMethod.NET:
            labels, taken, vetoed = net_refine(labels, aerated, hu, body, airways, right_side, spacing_rc, device,
                                               trunk=midline.trunk, midline=midline, prob=prob)
    labels[airways] = 0
    dropped = one_component_per_lung(labels, volumetric=volume.is_volumetric)
    amount = functools.partial(amount_text, volume=volume)
    if recovered:
        notes.append(f"recovered {amount(recovered)} of dense peripheral tissue (consolidation/effusion at "
                     "the chest wall) into the lungs")
    if taken:
        notes.append(f"the lung network took {amount(taken)} of dense tissue (consolidation, atelectasis) "
                     "into the lungs")
    if vetoed:
        notes.append(f"the lung network returned {amount(vetoed)} of tissue that the HU rules had "
                     "taken into the lungs (heart border, mediastinum, effusion, bowel gas)")
    if dropped * area_px * max(volume.slice_spacing, 1.0) >= 1000.0:  # at least 1 ml (1 cm3)
        notes.append(f"dropped {amount(dropped)} of lung-like pieces detached from the main lung components")

    if not (labels == LungMasks.RIGHT).any() or not (labels == LungMasks.LEFT).any():
        if labels.any():
            notes.append("only one lung found")
    partial = volume.shape[0] == 1 or bool(labels[0].any() or labels[-1].any())
    if volume.shape[0] == 1:
        notes.append("single slice: 2D segmentation, partial coverage")
    elif partial:
        notes.append(coverage_note(labels, volume))
    return LungMasks(labels=labels, airways=airways, body=body, partial_coverage=partial, notes=notes)

