"""The HU-threshold infection engine (:class:`ThresholdEngine`) and the per-slice morphology it uses.

No network and no weights: GGO and consolidation are HU ranges inside the (eroded) lung mask, with thin
vessels removed; see :class:`ThresholdEngine` for the numbers and their sources.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from ..types import EngineIdentity, InfectionResult, LungMasks, Volume


# --------------------------------------------------------------------------------------------- helpers

_FAR_MM = 1.0e4  # spacing given to the slice axis so that distance transforms stay within each slice


def edt_2d(mask: np.ndarray, spacing_rc: tuple[float, float]) -> np.ndarray:
    """Per-slice Euclidean distance (mm) of every True voxel to the nearest False voxel of its slice.

    A slice without any False voxel gets distances of about ``_FAR_MM`` (treated as "far").
    """
    out = np.zeros(mask.shape, dtype=np.float32)
    for k in range(mask.shape[0]):
        sl = mask[k]
        if not sl.any():
            continue
        if sl.all():
            out[k] = _FAR_MM
            continue
        out[k] = ndi.distance_transform_edt(sl, sampling=spacing_rc)
    return out


def erode_2d(mask: np.ndarray, radius_mm: float, spacing_rc: tuple[float, float]) -> np.ndarray:
    if radius_mm <= 0:
        return mask.copy()
    return edt_2d(mask, spacing_rc) > radius_mm


def dilate_2d(mask: np.ndarray, radius_mm: float, spacing_rc: tuple[float, float]) -> np.ndarray:
    if radius_mm <= 0:
        return mask.copy()
    return edt_2d(~mask, spacing_rc) <= radius_mm


def open_2d(mask: np.ndarray, radius_mm: float, spacing_rc: tuple[float, float]) -> np.ndarray:
    """Per-slice opening with a disk: keeps the parts of ``mask`` at least 2 * radius_mm wide."""
    return dilate_2d(erode_2d(mask, radius_mm, spacing_rc), radius_mm, spacing_rc) & mask


def remove_small(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """Drop connected components (26-connected in 3D) smaller than ``min_voxels``."""
    if min_voxels <= 1 or not mask.any():
        return mask
    lab, n = ndi.label(mask, structure=np.ones((3,) * mask.ndim, bool))
    sizes = np.bincount(lab.ravel())
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[lab]


def _crop(mask: np.ndarray, margin: int = 2) -> tuple[slice, ...]:
    """Bounding box of ``mask`` with an in-plane margin (whole volume when empty)."""
    if not mask.any():
        return tuple(slice(0, s) for s in mask.shape)
    box = ndi.find_objects(mask.astype(np.uint8))[0]
    return (box[0],) + tuple(slice(max(b.start - margin, 0), min(b.stop + margin, s))
                             for b, s in zip(box[1:], mask.shape[1:]))


def aerated_peak(values: np.ndarray, window: tuple[float, float] = (-950.0, -600.0), min_voxels: int = 500) -> float | None:
    """Mode (HU) of the aerated-lung population in ``values``, or None when there is no clear peak.

    Histogram of 10 HU bins, smoothed over 50 HU; a maximum on the upper window edge means the lung is
    mostly denser than aerated lung, and no peak is reported.
    """
    sel = values[(values >= window[0]) & (values < window[1])]
    if sel.size < min_voxels:
        return None
    edges = np.arange(window[0], window[1] + 10.0, 10.0)
    hist, _ = np.histogram(sel, bins=edges)
    smooth = np.convolve(hist, np.ones(5) / 5.0, mode="same")
    i = int(np.argmax(smooth))
    if i >= len(smooth) - 2:
        return None
    return float(edges[i] + 5.0)


# --------------------------------------------------------------------------------------------- threshold


@dataclass
class ThresholdEngine:
    """Documented HU-threshold baseline for COVID-19 lung infection (GGO and consolidation).

    Inside the lung mask, eroded by ``erosion_mm`` to avoid the partial-volume rim at the pleura and
    mediastinum, after a light Gaussian smoothing (``smoothing_mm``, in-plane) against image noise:

    * **ground-glass opacity (GGO)**: ``ggo_range`` = [-700, -300) HU;
    * **consolidation**: ``consolidation_range`` = [-300, +100] HU, restricted to regions at least
      ``2 * vessel_radius_mm`` wide;
    * **vessels** (removed): voxels at or above -300 HU that vanish under a per-slice opening with a disk of
      ``vessel_radius_mm`` (thin bright tubes and dots) plus a ``vessel_halo_mm`` margin around them, whose
      partial-volume rim would otherwise read as GGO;
    * components smaller than ``min_lesion_mm3`` (``min_lesion_mm2`` on a single slice) are dropped; holes
      enclosed by infection on a slice (vessels crossing a lesion) count as infection (GGO).

    Why these numbers:

    * -700 HU as the lower GGO bound is the upper limit of "well-aerated lung" (-950 to -700 HU) used to
      quantify COVID-19 pneumonia by Colombi et al., Radiology 2020;296:E86-E96; normal parenchyma peaks
      around -850 HU, so -700 leaves room for noise and the dependent density gradient. Lower bounds of
      -750 HU are also used; they flag more of the normal dependent lung on noisy scans.
    * -300 HU between GGO and consolidation: the boundary that separated GGO best among eight thresholds
      tested (-400 to -250 HU) in "Quantitative CT for detecting COVID-19 pneumonia in suspected cases",
      BMC Infect Dis 2021 (doi:10.1186/s12879-021-06556-z); it is also close to the classic
      lung/soft-tissue threshold of HU lung masks (-320 HU here).
    * +100 HU as the upper consolidation bound: top of the "non-aerated" compartment (-100 to +100 HU)
      of the Gattinoni lung-aeration classification (Gattinoni et al., NEJM 2006;354:1775-1786), also
      used for "compromised lung" (-500 to +100 HU) in COVID-19 by Lanza et al., Eur Radiol
      2020;30:6770-6778. Higher values are contrast-filled vessels, calcification or bone.

    Known limits: dense lesions that the HU lung mask cut off at the pleura are not seen; dependent
    atelectasis, fibrosis, motion and beam hardening read as GGO; vessels wider than
    ``2 * vessel_radius_mm`` (hilar vessels inside the lung mask) read as consolidation.
    """

    ggo_range: tuple[float, float] = (-700.0, -300.0)
    consolidation_range: tuple[float, float] = (-300.0, 100.0)
    erosion_mm: float = 1.5
    smoothing_mm: float = 0.7
    vessel_radius_mm: float = 3.0
    vessel_halo_mm: float = 1.5
    ggo_opening_mm: float = 0.0
    min_lesion_mm3: float = 30.0
    min_lesion_mm2: float = 10.0
    adaptive: bool = True
    adaptive_offset_hu: float = 175.0
    adaptive_max_ggo_low: float = -550.0
    device: str | None = None  # accepted (and ignored) so that generic options such as device work

    NAME = "threshold"
    VERSION = "1.0"

    def __post_init__(self) -> None:
        if not (self.ggo_range[0] < self.ggo_range[1] <= self.consolidation_range[0] < self.consolidation_range[1]):
            raise ValueError("threshold engine: ranges must be ordered ggo_low < ggo_high <= cons_low < cons_high")
        self.identity = EngineIdentity(
            name=self.NAME, version=self.VERSION, weights_sha256="",
            description=(f"HU thresholds inside the lungs: GGO [{self.ggo_range[0]:g}, {self.ggo_range[1]:g}) HU, "
                         f"consolidation [{self.consolidation_range[0]:g}, {self.consolidation_range[1]:g}] HU, "
                         f"vessels thinner than {2 * self.vessel_radius_mm:g} mm removed"),
        )

    def segment(self, volume: Volume, lungs: LungMasks) -> InfectionResult:
        shape = volume.shape
        lung = lungs.lungs
        ggo = np.zeros(shape, bool)
        cons = np.zeros(shape, bool)
        if not lung.any():
            return InfectionResult(infection=ggo.copy(), ggo=ggo, consolidation=cons)

        box = _crop(lung, margin=4)
        sp = volume.pixel_spacing
        region = erode_2d(lung[box], self.erosion_mm, sp)
        hu = self._smoothed(volume.hu[box], sp)

        bright = region & (hu >= self.consolidation_range[0])
        solid = open_2d(bright, self.vessel_radius_mm, sp)          # blobs survive, thin tubes do not
        vessels = bright & ~solid
        # at least one pixel of rim, whatever the pixel size: the rim is where partial volume reads as GGO
        halo = dilate_2d(vessels, max(self.vessel_halo_mm, 1.01 * max(sp)), sp) if self.vessel_halo_mm > 0 else vessels

        ggo_low, note = self.ggo_lower_bound(hu[region & ~halo])
        g = region & (hu >= ggo_low) & (hu < self.ggo_range[1]) & ~halo
        c = solid & (hu <= self.consolidation_range[1])

        g = open_2d(g, self.ggo_opening_mm, sp)                     # thin shells around vessels, noise
        min_vox = self._min_voxels(volume)
        g = remove_small(g, min_vox)
        c = remove_small(c, min_vox)
        any_inf = g | c
        holes = np.zeros_like(any_inf)
        for k in range(any_inf.shape[0]):
            if any_inf[k].any():
                holes[k] = ndi.binary_fill_holes(any_inf[k]) & ~any_inf[k]
        g |= holes & lung[box]

        ggo[box] = g
        cons[box] = c
        return InfectionResult(infection=ggo | cons, ggo=ggo, consolidation=cons, notes=[note])

    def ggo_lower_bound(self, lung_hu: np.ndarray) -> tuple[float, str]:
        """The GGO lower bound for this scan and a note saying how it was chosen.

        Fixed ``ggo_range[0]`` unless ``adaptive``: then ``adaptive_offset_hu`` above the peak of aerated
        lung (the histogram mode between -950 and -600 HU), kept within
        [``ggo_range[0]``, ``adaptive_max_ggo_low``]. Without a clear aerated peak (lung mostly diseased,
        or too few voxels) the fixed bound is used.
        """
        fixed = float(self.ggo_range[0])
        if not self.adaptive:
            return fixed, f"GGO lower bound {fixed:g} HU (fixed)"
        peak = aerated_peak(lung_hu)
        if peak is None:
            return fixed, f"GGO lower bound {fixed:g} HU (fixed: no clear aerated-lung peak)"
        low = float(np.clip(peak + self.adaptive_offset_hu, fixed, max(fixed, self.adaptive_max_ggo_low)))
        return low, (f"GGO lower bound {low:g} HU (aerated lung peaks at {peak:g} HU; "
                     f"+{self.adaptive_offset_hu:g} HU, kept within [{fixed:g}, {self.adaptive_max_ggo_low:g}])")

    def _smoothed(self, hu: np.ndarray, spacing_rc: tuple[float, float]) -> np.ndarray:
        if self.smoothing_mm <= 0:
            return hu
        sigma = (0.0, self.smoothing_mm / spacing_rc[0], self.smoothing_mm / spacing_rc[1])
        return ndi.gaussian_filter(hu.astype(np.float32, copy=False), sigma=sigma, mode="nearest")

    def _min_voxels(self, volume: Volume) -> int:
        area = volume.pixel_spacing[0] * volume.pixel_spacing[1]
        if volume.is_volumetric:
            return max(int(np.ceil(self.min_lesion_mm3 / (area * volume.slice_spacing))), 1)
        return max(int(np.ceil(self.min_lesion_mm2 / area)), 1)

