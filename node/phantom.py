"""Procedural chest CT phantom with COVID-19-like lesions and exact ground truth.

What it models (patient LPS, standard axial orientation, head-first supine):

* body ellipse with skin, subcutaneous fat and muscle, a curved scanner table below the back;
* ribs (ring segments that slope down anteriorly), costal cartilage, sternum, thoracic spine
  (cortex, marrow, discs, canal, posterior arch);
* heart with epicardial fat (anterior, to the patient's left), ascending aorta, arch, descending
  aorta, pulmonary trunk and arteries, SVC, arch branches, esophagus, mediastinal fat;
* trachea (midline, upper chest) bifurcating at the carina into two main bronchi that enter
  each hilum; liver under the right diaphragm dome;
* two lungs (right lung at small column index) that narrow to an apex and sit on diaphragm
  domes (right higher, deep posterior recesses), with a dependent density gradient and
  branching vessel trees that thin out peripherally (partial-volume rendered);
* ground-glass opacities (about -700..-400 HU) and consolidation (about -90..+30 HU; denser on
  request: ``consolidation_hu``), 70/30
  by volume, as thresholded smooth random fields with peripheral (subpleural) and posterior
  predominance, placed to an exact per-zone burden; Gaussian image noise.

Limits: this is a procedural phantom, not an anatomical atlas. Shapes are ellipses, tubes and
smooth random fields; anatomy is scaled to fill the field of view (in-plane by the smaller
half-extent, craniocaudally by the scanned length), so small grids give small bodies. Lobes
are not modelled: the five burden zones are a geometric split of each lung along z into
equal-volume slabs. There is no contrast, no beam hardening, no correlated noise and no
intrapulmonary bronchi.

Pixel storage in :func:`write_phantom_study`: signed 16-bit (PixelRepresentation 1,
BitsStored 16) with RescaleSlope 1 and RescaleIntercept 0, so stored values are HU.
"""
from __future__ import annotations

import datetime as _dt
import json
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid
from scipy import ndimage

if TYPE_CHECKING:
    from node.pipeline.types import Volume

ZONES: tuple[str, ...] = ("right_upper", "right_middle", "right_lower", "left_upper", "left_lower")
CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
GROUND_TRUTH_FILE = "ground_truth.npz"

# Tissue labels of Phantom.labels and their nominal HU.
TISSUES: dict[str, int] = {
    "air": 0, "fat": 1, "muscle": 2, "bone": 3, "marrow": 4, "lung": 5, "heart": 6, "blood": 7,
    "liver": 8, "soft": 9, "airway": 10, "csf": 11, "table": 12, "disc": 13, "cartilage": 14, "effusion": 15,
}
TISSUE_HU: dict[str, float] = {
    "air": -1000, "fat": -100, "muscle": 45, "bone": 700, "marrow": 230, "lung": -850, "heart": 40,
    "blood": 40, "liver": 60, "soft": 35, "airway": -1000, "csf": 10, "table": 100, "disc": 85,
    "cartilage": 120, "effusion": 15,
}
_T = TISSUES
_HU_LUT = np.array([TISSUE_HU[name] for name in TISSUES], dtype=np.float32)
_BONY = (_T["bone"], _T["marrow"], _T["disc"], _T["cartilage"])

VESSEL_HU = 40.0
GGO_HU = (-700.0, -400.0)
CONSOLIDATION_HU = (-90.0, 30.0)
DENSE_CONSOLIDATION_HU = (-30.0, 90.0)  # airless consolidation / atelectasis, up to contrast-enhanced
CONSOLIDATION_FRACTION = 0.3          # of the infected volume, by voxel count
_SLAB = 16                            # slices per chunk when assembling HU (bounds memory)
_Z_TOP = -40.0                        # patient z (mm) of the most cranial slice (arbitrary origin)


@dataclass
class Phantom:
    """A generated study: HU volume, geometry (see node.pipeline.types) and ground truth."""

    hu: np.ndarray                      # (slices, rows, cols) int16 HU, k ascending in patient z
    positions: np.ndarray               # (slices, 3) float64 ImagePositionPatient
    orientation: np.ndarray             # (6,) float64, [1,0,0,0,1,0]
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) mm
    slice_spacing: float                # mm
    masks: dict[str, np.ndarray]        # bool, same shape as hu (see make_phantom)
    regions: np.ndarray | None          # uint8, 0 outside the lungs, i + 1 for ZONES[i]
    seed: int
    requested_burden: dict[str, float] = field(default_factory=dict)
    achieved_burden: dict[str, float] = field(default_factory=dict)  # infected fraction per zone
    labels: np.ndarray | None = None    # uint8 tissue label map, codes in TISSUES
    noise_hu: float = 0.0

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]

    def as_volume(self) -> Volume:
        """The phantom as a :class:`node.pipeline.types.Volume` (its HU as they are, placeholder UIDs), for
        running pipeline steps on it without writing DICOM files."""
        from node.pipeline.types import Volume

        return Volume(hu=self.hu, positions=self.positions, orientation=self.orientation,
                      pixel_spacing=self.pixel_spacing, slice_spacing=self.slice_spacing,
                      sop_instance_uids=[str(i) for i in range(self.shape[0])], series_instance_uid="1.2.3",
                      study_instance_uid="1.2")

    @property
    def lung_labels(self) -> np.ndarray:
        """0 outside, 1 right lung, 2 left lung (the LungMasks convention)."""
        out = self.masks["right_lung"].astype(np.uint8)
        out[self.masks["left_lung"]] = 2
        return out

    @property
    def lung_burden(self) -> dict[str, float]:
        """Infected fraction of the right lung, the left lung and both lungs."""
        inf = self.masks["infection"]
        right, left = self.masks["right_lung"], self.masks["left_lung"]
        frac = lambda m: float((inf & m).sum() / max(int(m.sum()), 1))  # noqa: E731
        return {"right": frac(right), "left": frac(left), "total": frac(right | left)}


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Grid:
    """Voxel grid in phantom millimetres: X to patient left, Y posterior (0 at the image centre),
    Z up from the lowest slice. Anatomy is given in normalised units x = X/R, y = Y/R, w = Z/Zext."""

    slices: int
    rows: int
    cols: int
    ps: float
    dz: float

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.slices, self.rows, self.cols)

    @property
    def R(self) -> float:  # noqa: N802 - anatomical scale (mm)
        return min(self.rows, self.cols) * self.ps / 2.0

    @property
    def zext(self) -> float:
        return (self.slices - 1) * self.dz

    def xs(self) -> np.ndarray:
        return ((np.arange(self.cols) - (self.cols - 1) / 2.0) * self.ps).astype(np.float32)

    def ys(self) -> np.ndarray:
        return ((np.arange(self.rows) - (self.rows - 1) / 2.0) * self.ps).astype(np.float32)

    def mm(self, x: float, y: float, w: float) -> np.ndarray:
        """Normalised anatomy coordinates to phantom mm."""
        return np.array([x * self.R, y * self.R, w * self.zext])

    def index(self, p: np.ndarray) -> np.ndarray:
        """Phantom mm (X, Y, Z) to fractional voxel index (k, r, c)."""
        return np.array([p[2] / self.dz, p[1] / self.ps + (self.rows - 1) / 2.0,
                         p[0] / self.ps + (self.cols - 1) / 2.0])


def _chest_width(w: float) -> float:
    """Lateral scale of the thoracic cage: the upper thorax narrows towards the inlet."""
    return 1.0 - 0.25 * min(max((w - 0.45) / 0.5, 0.0), 1.0)


def _apex_scale(w: float) -> float:
    """Lung cross-section scale: 1 below w = 0.62, a dome closing at the apex (w = 0.90)."""
    if w < 0.62:
        return 1.0
    return float(np.sqrt(max(0.0, 1.0 - ((w - 0.62) / 0.28) ** 2)))


class _Plane:
    """In-plane 2D maps (normalised coordinates) reused for every slice."""

    def __init__(self, g: _Grid):
        x = (g.xs() / g.R)[None, :]
        y = (g.ys() / g.R)[:, None]
        x, y = np.broadcast_arrays(x, y)
        self.x, self.y = x, y
        q_body = (x / 0.86) ** 2 + ((y - 0.02) / 0.64) ** 2
        self.body = q_body <= 1.0
        self.is_right = x < 0.02                                  # patient right = small column
        # Mediastinum: wide at the hila, narrow anterior junction; the spine zone closes it behind.
        self.band = np.abs(x - 0.02) < 0.05 + 0.10 * np.exp(-((y + 0.02) / 0.25) ** 2)
        self.spine_zone = x ** 2 + (y - 0.30) ** 2 < 0.15 ** 2
        # Lung "side" ellipses; shrinking them towards the apex shapes the lung tops.
        self.q_side = np.where(self.is_right, ((x + 0.40) / 0.34) ** 2, ((x - 0.40) / 0.34) ** 2) \
            + ((y - 0.06) / 0.50) ** 2
        # Diaphragm: lung exists above w_d; domes peak mid-hemithorax, recesses lower and posterior.
        dome = np.where(self.is_right, 0.30, 0.27)
        self.w_diaphragm = dome - 0.16 * np.minimum(self.q_side, 1.5) - 0.10 * np.clip(y, 0, None)
        # Heart: ellipse with its long axis pointing left and anterior.
        dx, dy = x - 0.11, y + 0.14
        ca, sa = np.cos(np.deg2rad(35)), np.sin(np.deg2rad(35))
        self.q_heart = ((dx * ca - dy * sa) / 0.32) ** 2 + ((dx * sa + dy * ca) / 0.23) ** 2
        self.base = self._base_labels(x, y, q_body)
        self._bones(x, y)
        self._cavities: dict[float, tuple] = {}

    def _base_labels(self, x: np.ndarray, y: np.ndarray, q_body: np.ndarray) -> np.ndarray:
        lab = np.full(x.shape, _T["air"], np.uint8)
        y_table = 0.69 + 0.12 * x ** 2
        lab[(y >= y_table) & (y <= y_table + 0.025) & (np.abs(x) < 0.65)] = _T["table"]
        lab[self.body] = _T["fat"]
        lab[self.body & (q_body > 0.985 ** 2)] = _T["muscle"]    # skin
        lab[(x / 0.80) ** 2 + ((y - 0.02) / 0.595) ** 2 <= 1.0] = _T["muscle"]
        return lab

    def cavity(self, w: float) -> tuple[np.ndarray, np.ndarray, tuple, np.ndarray, np.ndarray]:
        """Thoracic cavity at height w: (cavity, inner cavity, rib-ring pixel indices, rib drop
        per ring pixel in R units, cartilage flag per ring pixel); cached per chest width."""
        c = round(_chest_width(w) * 200) / 200                   # cache in steps of 0.005
        if c not in self._cavities:
            x, y = self.x, self.y
            q = (x / (0.70 * c)) ** 2 + (y / (0.50 * (1 - 0.4 * (1 - c)))) ** 2
            ring = (q > 1.0) & (q <= 1.07 ** 2) & ~((np.abs(x) < 0.10) & (y < 0))
            ring &= ~((np.abs(x) < 0.12) & (y > 0))              # spine, not ribs, posteriorly
            idx = np.nonzero(ring)
            theta = np.arctan2(y[idx], x[idx])
            drop = 0.45 * (np.sin(theta) - 1.0) / 2.0             # ribs descend anteriorly
            cart = (np.abs(x[idx]) < 0.30) & (y[idx] < -0.2)      # costal cartilage
            self._cavities[c] = (q <= 1.0, q <= 0.97 ** 2, idx, drop, cart)
        return self._cavities[c]

    def _bones(self, x: np.ndarray, y: np.ndarray) -> None:
        q_vb = (x ** 2 + (y - 0.30) ** 2) / 0.10 ** 2
        self.vert_body = q_vb <= 1.0
        self.vert_cortex = self.vert_body & (q_vb > 0.85 ** 2)
        r2_canal = x ** 2 + (y - 0.45) ** 2
        self.canal = r2_canal <= 0.045 ** 2
        self.arch = ((r2_canal <= 0.075 ** 2) & ~self.canal) \
            | ((x / 0.022) ** 2 + ((y - 0.55) / 0.06) ** 2 <= 1.0) \
            | (((np.abs(x) - 0.10) / 0.065) ** 2 + ((y - 0.44) / 0.025) ** 2 <= 1.0)
        q_st = (x / 0.09) ** 2 + ((y + 0.545) / 0.03) ** 2
        self.sternum = q_st <= 1.0
        self.sternum_marrow = q_st <= 0.6 ** 2
        self.esophagus = (x - 0.02) ** 2 + (y - 0.16) ** 2 <= 0.035 ** 2


EFFUSION_POSTERIOR_Y = -0.1   # (normalised) the fluid of a supine patient starts behind this and thickens backwards
EFFUSION_RAMP_Y = 0.5         # ... reaching its full depth this far behind it


def _effusion(p: _Plane, w: float, depth: float) -> np.ndarray:
    """Dependent pleural fluid at height w: the outer shell of the thoracic cavity, ``depth`` (share of the
    cavity's half-width) thick at the back, thinning to nothing anteriorly (a crescent against the wall)."""
    c = round(_chest_width(w) * 200) / 200                       # as :meth:`_Plane.cavity`
    q = (p.x / (0.70 * c * 0.97)) ** 2 + (p.y / (0.50 * (1 - 0.4 * (1 - c)) * 0.97)) ** 2
    ramp = np.clip((p.y - EFFUSION_POSTERIOR_Y) / EFFUSION_RAMP_Y, 0.0, 1.0)
    return (ramp > 0) & (np.sqrt(q) >= 1.0 - depth * ramp)


def _slice_labels(p: _Plane, g: _Grid, k: int, effusion: float = 0.0) -> np.ndarray:
    """Tissue labels of one axial slice (before the tubes are drawn); ``effusion``: see make_phantom."""
    w = k / (g.slices - 1)
    zr = w * g.zext / g.R                                         # height in R units
    cavity, inner, rib_idx, rib_drop, rib_cart = p.cavity(w)
    lab = p.base.copy()
    lab[cavity] = _T["soft"]
    above_diaphragm = w > p.w_diaphragm
    if w <= 0.93:
        lab[p.band & cavity & above_diaphragm] = _T["fat"]
    below = cavity & ~above_diaphragm
    lab[below & (p.x < 0.10)] = _T["liver"]
    lab[below & (p.x >= 0.10)] = _T["soft"]
    s = _apex_scale(w)
    if s > 0:
        lung = inner & above_diaphragm & (p.q_side <= s * s) & ~p.band & ~p.spine_zone
        lab[lung] = _T["lung"]
        if effusion > 0:
            lab[lung & _effusion(p, w, effusion)] = _T["effusion"]
    dw = (w - 0.32) / 0.14
    if abs(dw) < 1.0:
        rr = 1.0 - dw * dw
        lab[cavity & (p.q_heart <= 1.12 ** 2 * rr)] = _T["fat"]   # epicardial fat
        lab[p.q_heart <= rr] = _T["heart"]
    lab[p.esophagus] = _T["soft"]
    disc = (zr / 0.16) % 1.0 < 0.2
    lab[p.vert_body] = _T["disc"] if disc else _T["marrow"]
    if not disc:
        lab[p.vert_cortex] = _T["bone"]
    lab[p.arch] = _T["bone"]
    lab[p.canal] = _T["csf"]
    if 0.35 < w < 0.85:
        lab[p.sternum] = _T["bone"]
        lab[p.sternum_marrow] = _T["marrow"]
    if 0.06 < w < 0.95:
        on = np.cos(2 * np.pi * (zr - rib_drop) / 0.145) > 0.25
        vals = np.where(rib_cart, _T["cartilage"], _T["bone"]).astype(np.uint8)
        lab[rib_idx[0][on], rib_idx[1][on]] = vals[on]
    return lab


# --------------------------------------------------------------------------------------------
# Tubes (vessels, airways)
# --------------------------------------------------------------------------------------------

def _segment_field(g: _Grid, a: np.ndarray, b: np.ndarray, r_max: float
                   ) -> tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray] | None:
    """Distance (mm) of the voxels in the bounding box of segment a-b (phantom mm) to it, and the
    position t in [0, 1] of the nearest point. None when the box misses the grid."""
    pad = r_max + 2 * max(g.ps, g.dz)
    lo = g.index(np.minimum(a, b) - pad)
    hi = g.index(np.maximum(a, b) + pad)
    k0, r0, c0 = (max(int(np.floor(v)), 0) for v in lo)
    k1, r1, c1 = (min(int(np.ceil(v)) + 1, n) for v, n in zip(hi, g.shape))
    if k0 >= k1 or r0 >= r1 or c0 >= c1:
        return None
    zz = (np.arange(k0, k1, dtype=np.float32) * g.dz - a[2])[:, None, None]
    yy = ((np.arange(r0, r1, dtype=np.float32) - (g.rows - 1) / 2.0) * g.ps - a[1])[None, :, None]
    xx = ((np.arange(c0, c1, dtype=np.float32) - (g.cols - 1) / 2.0) * g.ps - a[0])[None, None, :]
    d = (b - a).astype(np.float32)
    t = np.clip((xx * d[0] + yy * d[1] + zz * d[2]) / max(float(d @ d), 1e-9), 0.0, 1.0)
    dist = np.sqrt((xx - t * d[0]) ** 2 + (yy - t * d[1]) ** 2 + (zz - t * d[2]) ** 2)
    return (slice(k0, k1), slice(r0, r1), slice(c0, c1)), dist, t


def _polyline(points: list[tuple[float, float, float]], n: int = 0) -> list[tuple]:
    """Consecutive segments of a polyline; with n > 0 the 3 points are a quadratic Bezier."""
    if n:
        t = np.linspace(0, 1, n + 1)[:, None]
        p0, p1, p2 = (np.array(q) for q in points)
        pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2
        pts[:, 2] += 0.05 * np.sin(np.pi * t[:, 0])               # the arch rises
        points = [tuple(q) for q in pts]
    return list(zip(points[:-1], points[1:]))


# Mediastinal vessels: (start, end, radius) in normalised (x, y, w), radius in R units.
def _mediastinal_vessels() -> list[tuple[tuple, tuple, float]]:
    tubes: list[tuple[tuple, tuple, float]] = [
        ((0.03, -0.10, 0.40), (0.03, -0.10, 0.62), 0.075),           # ascending aorta
        ((0.14, 0.20, 0.62), (0.12, 0.20, 0.0), 0.06),               # descending aorta
        ((0.08, -0.22, 0.42), (0.10, -0.10, 0.52), 0.07),            # pulmonary trunk
        ((0.10, -0.10, 0.52), (0.02, 0.0, 0.53), 0.05),              # right pulmonary artery
        ((0.02, 0.0, 0.53), (-0.22, 0.04, 0.52), 0.05),
        ((0.10, -0.10, 0.52), (0.24, 0.02, 0.55), 0.05),             # left pulmonary artery
        ((-0.12, -0.08, 0.45), (-0.12, -0.08, 0.80), 0.045),         # superior vena cava
        ((-0.12, -0.08, 0.80), (-0.20, -0.05, 1.0), 0.035),          # right brachiocephalic v.
        ((-0.10, -0.08, 0.78), (0.22, -0.06, 0.86), 0.03),           # left brachiocephalic v.
        ((-0.02, -0.05, 0.67), (-0.08, -0.02, 1.0), 0.035),          # brachiocephalic artery
        ((0.06, -0.02, 0.68), (0.08, 0.0, 1.0), 0.025),              # left common carotid
        ((0.13, 0.06, 0.67), (0.22, 0.04, 1.0), 0.028),              # left subclavian
    ]
    for a, b in _polyline([(0.03, -0.10, 0.62), (0.17, 0.0, 0.64), (0.14, 0.20, 0.62)], n=8):
        tubes.append((a, b, 0.065))                                  # aortic arch
    return tubes


_AIRWAYS = [  # (start, end, lumen radius), normalised; walls are 0.012 R thick
    ((0.0, 0.02, 1.0), (0.0, 0.07, 0.62), 0.055),                    # trachea
    ((0.0, 0.07, 0.62), (-0.21, 0.10, 0.555), 0.042),                # right main bronchus
    ((0.0, 0.07, 0.62), (0.23, 0.11, 0.53), 0.037),                  # left main bronchus
]
HILA = {"right": (-0.22, 0.04, 0.52), "left": (0.24, 0.02, 0.55)}


def _draw_tubes(labels: np.ndarray, g: _Grid) -> None:
    """Mediastinal vessels (with a fat margin cut out of the lungs), then the airways."""
    margin = 0.015 * g.R
    for a, b, r in _mediastinal_vessels():
        r *= g.R
        res = _segment_field(g, g.mm(*a), g.mm(*b), r + margin)
        if res is None:
            continue
        box, dist, _ = res
        sub = labels[box]
        sub[(dist <= r + margin) & (sub == _T["lung"])] = _T["fat"]
        sub[(dist <= r) & ~np.isin(sub, _BONY)] = _T["blood"]
    wall = 0.012 * g.R
    for paint_lumen in (False, True):
        for a, b, r in _AIRWAYS:
            r *= g.R
            res = _segment_field(g, g.mm(*a), g.mm(*b), r + wall)
            if res is None:
                continue
            box, dist, _ = res
            sub = labels[box]
            if paint_lumen:
                sub[dist <= r] = _T["airway"]
            else:
                sub[(dist <= r + wall) & (sub != _T["airway"])] = _T["soft"]


# Trunk directions from the right hilum (X to patient left, Y posterior, Z up); mirrored for the left.
_TRUNKS = [(-0.3, 0.1, 1.0), (-0.4, -0.6, 0.8), (-1.0, 0.0, 0.1), (-0.7, -0.7, -0.1),
           (-0.5, 0.1, -1.0), (-0.2, 0.7, -1.0), (-0.3, -0.5, -1.0), (-0.5, 0.9, 0.2)]


def _vessel_tree(g: _Grid, lung: np.ndarray, rng: np.random.Generator,
                 max_segments: int = 4000) -> np.ndarray:
    """Pulmonary vessel trees grown breadth-first from each hilum: each branch point gives a
    near-straight major child and a thinner, sharply angled minor child; a child whose end would
    leave the lung gets two more random directions, then is dropped. Returns the uint8
    partial-volume occupancy (255 = voxel fully inside a vessel)."""
    occ = np.zeros(g.shape, np.uint8)
    r_min = 0.4 * g.ps
    for side, mirror in (("right", 1.0), ("left", -1.0)):
        root = g.mm(*HILA[side])
        queue: deque = deque()
        for d in _TRUNKS:
            v = np.array([mirror * d[0], d[1], d[2]])
            queue.append((root, v / np.linalg.norm(v), 0.028 * g.R, 0.16 * g.R))
        n = 0
        while queue and n < max_segments:
            a, d, r, length = queue.popleft()
            b = a + d * length
            _paint_vessel(occ, g, a, b, r, 0.9 * r)
            n += 1
            away = b - root
            away /= max(float(np.linalg.norm(away)), 1e-6)
            for lo, hi, rf, lf in ((5, 20, 0.85, 0.85), (35, 65, 0.65, 0.75)):
                if r * rf < r_min:
                    continue
                for _ in range(3):
                    child = _turn(d, np.deg2rad(rng.uniform(lo, hi)), rng) + 0.2 * away
                    child /= np.linalg.norm(child)
                    if _inside(lung, g, b + child * length * lf):
                        queue.append((b, child, r * rf, length * lf))
                        break
    return occ


def _turn(d: np.ndarray, angle: float, rng: np.random.Generator) -> np.ndarray:
    """Unit vector at `angle` from d, random azimuth."""
    perp = rng.standard_normal(3)
    perp -= (perp @ d) * d
    perp /= max(float(np.linalg.norm(perp)), 1e-9)
    return np.cos(angle) * d + np.sin(angle) * perp


def _inside(mask: np.ndarray, g: _Grid, p: np.ndarray) -> bool:
    k, r, c = np.rint(g.index(p)).astype(int)
    return bool(0 <= k < g.slices and 0 <= r < g.rows and 0 <= c < g.cols and mask[k, r, c])


def _paint_vessel(occ: np.ndarray, g: _Grid, a: np.ndarray, b: np.ndarray, r0: float, r1: float) -> None:
    res = _segment_field(g, a, b, max(r0, r1))
    if res is None:
        return
    box, dist, t = res
    frac = np.clip((r0 + (r1 - r0) * t - dist) / g.ps + 0.5, 0.0, 1.0)   # partial volume
    np.maximum(occ[box], (frac * 255).astype(np.uint8), out=occ[box])


# --------------------------------------------------------------------------------------------
# Zones and lesions
# --------------------------------------------------------------------------------------------

def _zone_map(right: np.ndarray, left: np.ndarray) -> np.ndarray:
    """Split each lung along z into equal-volume slabs: right 3 zones, left 2 (upper = cranial)."""
    regions = np.zeros(right.shape, np.uint8)
    for mask, codes in ((right, (3, 2, 1)), (left, (5, 4))):   # bottom-up: lower ... upper
        counts = mask.sum(axis=(1, 2)).astype(np.float64)
        if counts.sum() == 0:
            continue
        below = (np.cumsum(counts) - counts / 2) / counts.sum()   # lung fraction below slice centre
        part = np.minimum((below * len(codes)).astype(int), len(codes) - 1)
        per_slice = np.asarray(codes, np.uint8)[part]
        np.copyto(regions, per_slice[:, None, None], where=mask)
    return regions


def _normalise_burden(burden: float | dict[str, float]) -> dict[str, float]:
    if isinstance(burden, dict):
        unknown = set(burden) - set(ZONES)
        if unknown:
            raise ValueError(f"unknown burden zones {sorted(unknown)}; valid: {ZONES}")
        out = {z: float(burden.get(z, 0.0)) for z in ZONES}
    else:
        out = {z: float(burden) for z in ZONES}
    for z, b in out.items():
        if not 0.0 <= b <= 1.0:
            raise ValueError(f"burden for {z} must be in [0, 1], got {b}")
    return out


def _lesion_field(g: _Grid, idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Lesion propensity at the flat voxel indices idx: smooth random blobs (two scales, on a
    coarse grid, trilinearly interpolated) + subpleural and posterior (dependent) bias."""
    cs = max(g.R / 60.0, min(g.ps, g.dz))                         # coarse spacing, mm
    cshape = (int(g.zext / cs) + 2, int(g.rows * g.ps / cs) + 2, int(g.cols * g.ps / cs) + 2)
    coarse = np.zeros(cshape, np.float32)
    for sigma_r, weight in ((0.05, 1.0), (0.018, 0.45)):
        n = ndimage.gaussian_filter(rng.standard_normal(cshape).astype(np.float32), sigma_r * g.R / cs)
        coarse += weight * n / max(float(n.std()), 1e-6)
    widths = np.array([_chest_width(k / (g.slices - 1)) for k in range(g.slices)], np.float32)
    out = np.empty(idx.size, np.float32)
    step = 1 << 21
    for s in range(0, idx.size, step):
        k, r, c = np.unravel_index(idx[s:s + step], g.shape)
        coords = np.stack([k * (g.dz / cs), r * (g.ps / cs), c * (g.ps / cs)])
        v = ndimage.map_coordinates(coarse, coords, order=1, mode="nearest")
        x = ((c - (g.cols - 1) / 2.0) * g.ps / g.R).astype(np.float32)
        y = ((r - (g.rows - 1) / 2.0) * g.ps / g.R).astype(np.float32)
        c_w = widths[k]
        depth = (1.0 - np.sqrt((x / (0.70 * c_w)) ** 2 + (y / 0.50) ** 2)) * 0.5   # ~ to ribs, R units
        out[s:s + step] = v + 1.3 * np.exp(-np.clip(depth, 0, None) / 0.07) + 0.7 * y
    return out


@dataclass
class _Lesions:
    ggo: np.ndarray            # positions in the lung voxel index array
    ggo_hu: np.ndarray
    cons: np.ndarray
    cons_hu: np.ndarray
    achieved: dict[str, float]


def _place_lesions(regions: np.ndarray, propensity: np.ndarray, idx: np.ndarray,
                   burden: dict[str, float], consolidation_hu: tuple[float, float] = CONSOLIDATION_HU) -> _Lesions:
    """Per zone, the round(burden * zone volume) lung voxels of highest propensity are
    infected; the top CONSOLIDATION_FRACTION of them are consolidation (``consolidation_hu``, densest
    where the propensity is highest), the rest GGO."""
    zone = regions.ravel()[idx]
    parts: dict[str, list[np.ndarray]] = {"ggo": [], "ggo_hu": [], "cons": [], "cons_hu": []}
    achieved: dict[str, float] = {}
    for code, name in enumerate(ZONES, start=1):
        sel = np.flatnonzero(zone == code)
        n_inf = int(round(burden[name] * sel.size))
        achieved[name] = n_inf / sel.size if sel.size else 0.0
        if n_inf == 0:
            continue
        f = propensity[sel]
        inf = np.argpartition(-f, n_inf - 1)[:n_inf]
        n_cons = int(round(CONSOLIDATION_FRACTION * n_inf))
        order = np.argsort(-f[inf], kind="stable")
        cons, ggo = inf[order[:n_cons]], inf[order[n_cons:]]
        lo, hi = float(f[inf].min()), float(f.max())
        mid = float(f[cons].min()) if n_cons else hi                # GGO/consolidation boundary
        u = np.clip((f[ggo] - lo) / max(mid - lo, 1e-6), 0, 1)
        v = np.clip((f[cons] - mid) / max(hi - mid, 1e-6), 0, 1)
        parts["ggo"].append(sel[ggo])
        parts["ggo_hu"].append(GGO_HU[0] + (GGO_HU[1] - GGO_HU[0]) * u)
        parts["cons"].append(sel[cons])
        parts["cons_hu"].append(consolidation_hu[0] + (consolidation_hu[1] - consolidation_hu[0]) * v)
    cat = {k: np.concatenate(v) if v else np.zeros(0, np.float32 if k.endswith("hu") else np.int64)
           for k, v in parts.items()}
    return _Lesions(cat["ggo"], cat["ggo_hu"], cat["cons"], cat["cons_hu"], achieved)


# --------------------------------------------------------------------------------------------
# Assembly
# --------------------------------------------------------------------------------------------

def _render_hu(labels: np.ndarray, g: _Grid, idx: np.ndarray, occ: np.ndarray, les: _Lesions,
               noise_hu: float, rng: np.random.Generator) -> np.ndarray:
    """Tissue HU + noise slab by slab, then the lung voxels: dependent gradient, lesions and
    partial-volume vessels replace the nominal lung value."""
    hu = np.empty(g.shape, np.int16)
    for k0 in range(0, g.slices, _SLAB):
        lab = labels[k0:k0 + _SLAB]
        h = _HU_LUT[lab]
        if noise_hu > 0:
            h += np.float32(noise_hu) * rng.standard_normal(lab.shape, dtype=np.float32)
        hu[k0:k0 + _SLAB] = np.clip(np.rint(h), -1024, 3071)
    flat = hu.reshape(-1)
    r = (idx // g.cols) % g.rows
    y = ((r - (g.rows - 1) / 2.0) * g.ps / g.R).astype(np.float32)
    bg = TISSUE_HU["lung"] + 25.0 * np.clip(y / 0.5, -1, 1)        # denser posteriorly (supine)
    bg[les.ggo] = les.ggo_hu
    bg[les.cons] = les.cons_hu
    o = occ.reshape(-1)[idx].astype(np.float32) / 255.0
    val = bg * (1 - o) + VESSEL_HU * o
    flat[idx] = np.clip(flat[idx] + np.rint(val - TISSUE_HU["lung"]), -1024, 3071).astype(np.int16)
    return hu


def make_phantom(*, rows: int = 512, cols: int = 512, slices: int = 240, slice_spacing: float = 1.25,
                 pixel_spacing: float = 0.7, seed: int = 0, burden: float | dict[str, float] = 0.15,
                 noise_hu: float = 15.0, effusion: float = 0.0,
                 consolidation_hu: tuple[float, float] = CONSOLIDATION_HU) -> Phantom:
    """Generate a chest CT phantom.

    ``burden``: infected fraction of each zone (a float for all five ZONES, or a dict zone ->
    fraction, missing zones 0). Masks: right_lung, left_lung (parenchyma with its vessels and
    lesions, without trachea and main bronchi), ggo, consolidation, infection, airways (trachea
    and main bronchi lumen), body (inside the skin, table excluded), vessels (intrapulmonary
    vessels, >= 50 % occupancy).
    ``effusion``: depth of a bilateral dependent pleural effusion (tissue "effusion", 15 HU, not lung) as a
    share of the thoracic cavity's half-width at the back (0: none; 0.15 is a moderate one).
    ``consolidation_hu``: HU range of the consolidation (default ``CONSOLIDATION_HU``, partly aerated
    consolidation); ``DENSE_CONSOLIDATION_HU`` models airless consolidation and atelectasis (soft-tissue
    density, more with contrast enhancement).
    """
    if consolidation_hu[0] > consolidation_hu[1]:
        raise ValueError("consolidation_hu must be (low, high)")
    if rows < 32 or cols < 32 or slices < 8:
        raise ValueError("phantom needs at least 32 x 32 pixels and 8 slices")
    if pixel_spacing <= 0 or slice_spacing <= 0:
        raise ValueError("spacings must be positive")
    if not 0.0 <= effusion < 1.0:
        raise ValueError("effusion must be in [0, 1)")
    requested = _normalise_burden(burden)
    g = _Grid(slices, rows, cols, float(pixel_spacing), float(slice_spacing))
    rng = np.random.default_rng(seed)

    plane = _Plane(g)
    labels = np.empty(g.shape, np.uint8)
    for k in range(g.slices):
        labels[k] = _slice_labels(plane, g, k, effusion)
    _draw_tubes(labels, g)

    lung = labels == _T["lung"]
    right = lung & plane.is_right[None]
    left = lung & ~plane.is_right[None]
    regions = _zone_map(right, left)
    occ = _vessel_tree(g, lung, rng)

    idx = np.flatnonzero(regions)
    les = _place_lesions(regions, _lesion_field(g, idx, rng), idx, requested, consolidation_hu)
    hu = _render_hu(labels, g, idx, occ, les, noise_hu, rng)

    ggo = np.zeros(g.shape, bool)
    ggo.reshape(-1)[idx[les.ggo]] = True
    cons = np.zeros(g.shape, bool)
    cons.reshape(-1)[idx[les.cons]] = True
    masks = {
        "right_lung": right, "left_lung": left, "ggo": ggo, "consolidation": cons,
        "infection": ggo | cons, "airways": labels == _T["airway"],
        "body": np.repeat(plane.body[None], g.slices, axis=0),
        "vessels": (occ >= 128) & lung,
    }
    x0, y0 = float(g.xs()[0]), float(g.ys()[0])
    z = _Z_TOP - (g.slices - 1 - np.arange(g.slices)) * g.dz
    positions = np.stack([np.full(g.slices, x0), np.full(g.slices, y0), z], axis=1).astype(np.float64)
    return Phantom(hu=hu, positions=positions, orientation=np.array([1.0, 0, 0, 0, 1.0, 0]),
                   pixel_spacing=(g.ps, g.ps), slice_spacing=g.dz, masks=masks, regions=regions,
                   seed=seed, requested_burden=requested, achieved_burden=les.achieved,
                   labels=labels, noise_hu=float(noise_hu))


# --------------------------------------------------------------------------------------------
# DICOM output and ground truth
# --------------------------------------------------------------------------------------------

_STUDY_DATE = "20240115"
_STUDY_TIME = "101500"
_BIRTH_DATE = "19700101"


def _age(birth: str, on: str) -> str:
    """DICOM AS age at date `on` (both DA strings)."""
    b = _dt.datetime.strptime(birth, "%Y%m%d").date()
    d = _dt.datetime.strptime(on, "%Y%m%d").date()
    years = d.year - b.year - ((d.month, d.day) < (b.month, b.day))
    return f"{years:03d}Y"


def _common_dataset(*, patient_id: str, patient_name: str, study_uid: str, frame_uid: str,
                    series_uid: str, series_number: int, series_description: str, seed: int,
                    study_date: str, study_time: str) -> Dataset:
    """Patient, study, series, frame of reference, equipment and CT acquisition attributes."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study_date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = study_time
    ds.AccessionNumber = f"PH{seed % 10**8:08d}"
    ds.Modality = "CT"
    ds.Manufacturer = "ctnode phantom"
    ds.InstitutionName = "ctnode"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT CHEST WITHOUT CONTRAST"
    ds.SeriesDescription = series_description
    ds.ManufacturerModelName = "procedural chest phantom"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = _BIRTH_DATE
    ds.PatientSex = "O"
    ds.PatientAge = _age(_BIRTH_DATE, study_date)
    ds.BodyPartExamined = "CHEST"
    ds.SoftwareVersions = _software_version()
    ds.ProtocolName = "CHEST"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500"
    ds.DistanceSourceToDetector = "1085.6"
    ds.DistanceSourceToPatient = "595"
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "160"
    ds.RotationDirection = "CW"
    ds.XRayTubeCurrent = 200
    ds.ExposureTime = 500
    ds.Exposure = 100
    ds.FilterType = "BODY"
    ds.GeneratorPower = 24
    ds.FocalSpots = "1.2"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.BurnedInAnnotation = "NO"
    return ds


def _software_version() -> str:
    try:
        from node import __version__
        return f"ctnode {__version__}"
    except ImportError:  # pragma: no cover
        return "ctnode"


def _finish(ds: Dataset, pixels: np.ndarray, transfer_syntax: UID, path: Path) -> Path:
    """Attach pixel data and file meta, encode if the transfer syntax is compressed, write."""
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.ContentDate, ds.ContentTime
    ds.Rows, ds.Columns = pixels.shape
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    arr = np.ascontiguousarray(pixels, dtype=np.int16)
    ds.PixelData = arr.tobytes()
    ds["PixelData"].VR = "OW"
    transfer_syntax = UID(transfer_syntax)
    if transfer_syntax.is_compressed:
        ds.compress(transfer_syntax, arr, generate_instance_uid=False)
    else:
        meta.TransferSyntaxUID = transfer_syntax
    ds.save_as(path, enforce_file_format=True)
    return path


def write_phantom_study(phantom: Phantom, out_dir: Path, *, patient_id: str = "PHANTOM-0001",
                        patient_name: str = "Phantom^Chest", study_instance_uid: str | None = None,
                        series_instance_uid: str | None = None,
                        transfer_syntax: str = ExplicitVRLittleEndian, extra_series: bool = False,
                        study_date: str = _STUDY_DATE, study_time: str = _STUDY_TIME) -> list[Path]:
    """Write the phantom as a CT Image Storage series, one file per slice ``CT{instance:04d}.dcm``
    (instance 1 = most cranial slice, as scanners number head-first scans), stored as signed
    int16 HU (slope 1, intercept 0). ``extra_series`` adds a 1-image AP localizer series
    (``LOC0001.dcm``, series 1) to the same study and frame of reference. UIDs not given are
    generated. Compressed transfer syntaxes are encoded with pydicom's encoders (RLE Lossless
    always works). Returns the axial files in instance order, then the localizer."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = study_instance_uid or generate_uid()
    frame_uid = generate_uid()
    common = dict(patient_id=patient_id, patient_name=patient_name, study_uid=study_uid,
                  frame_uid=frame_uid, seed=phantom.seed, study_date=study_date, study_time=study_time)
    n = phantom.hu.shape[0]
    thickness = f"{phantom.slice_spacing:g}"
    template = _common_dataset(series_uid=series_instance_uid or generate_uid(), series_number=2,
                               series_description=f"CHEST {thickness}mm LUNG", **common)
    template.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    template.ImageOrientationPatient = [f"{v:g}" for v in phantom.orientation]
    template.PixelSpacing = [f"{v:g}" for v in phantom.pixel_spacing]
    template.SliceThickness = thickness
    template.SpacingBetweenSlices = thickness
    template.ReconstructionDiameter = f"{phantom.hu.shape[2] * phantom.pixel_spacing[1]:g}"
    template.ConvolutionKernel = "LUNG"
    template.ScanOptions = "HELICAL MODE"
    template.SpiralPitchFactor = 1.0
    template.CTDIvol = 8.0
    phantom_code = Dataset()
    phantom_code.CodeValue, phantom_code.CodingSchemeDesignator = "113691", "DCM"
    phantom_code.CodeMeaning = "IEC Body Dosimetry Phantom"
    template.CTDIPhantomTypeCodeSequence = [phantom_code]
    template.RescaleType = "HU"
    template.WindowCenter = ["-600", "40"]
    template.WindowWidth = ["1500", "400"]
    template.WindowCenterWidthExplanation = ["LUNG", "MEDIASTINUM"]
    paths = []
    for instance, k in enumerate(range(n - 1, -1, -1), start=1):
        ds = Dataset()
        ds.update(template)
        ds.InstanceNumber = instance
        ds.ImagePositionPatient = [f"{v:.6g}" for v in phantom.positions[k]]
        ds.SliceLocation = f"{phantom.positions[k][2]:.6g}"
        paths.append(_finish(ds, phantom.hu[k], UID(transfer_syntax), out_dir / f"CT{instance:04d}.dcm"))
    if extra_series:
        paths.append(_write_localizer(phantom, out_dir, common, UID(transfer_syntax)))
    return paths


def _write_localizer(phantom: Phantom, out_dir: Path, common: dict[str, Any], ts: UID) -> Path:
    """AP projection radiograph (coronal plane, head at the top) as a CT LOCALIZER image; its
    pixel values are scaled path lengths, not HU."""
    mu = np.clip(phantom.hu.astype(np.float32) + 1000.0, 0, None) / 1000.0
    proj = mu.sum(axis=1) * phantom.pixel_spacing[0]               # (slices, cols) path length, mm
    img = (proj / max(float(proj.max()), 1e-6) * 2000.0 - 1000.0)[::-1]   # row 0 = most cranial
    ds = _common_dataset(series_uid=generate_uid(), series_number=1,
                         series_description="TOPOGRAM AP", **common)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.InstanceNumber = 1
    top = phantom.positions[-1]
    ds.ImagePositionPatient = [f"{top[0]:.6g}", "0", f"{top[2]:.6g}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
    ds.PixelSpacing = [f"{phantom.slice_spacing:g}", f"{phantom.pixel_spacing[1]:g}"]
    ds.SliceThickness = ""
    ds.ConvolutionKernel = "STANDARD"
    ds.ScanOptions = "SCOUT MODE"
    ds.WindowCenter = "0"
    ds.WindowWidth = "2000"
    return _finish(ds, np.rint(img), ts, out_dir / "LOC0001.dcm")


def save_ground_truth(phantom: Phantom, out_dir: Path) -> Path:
    """Compressed ``ground_truth.npz``: every mask (mask_<name>), regions, tissue labels,
    geometry, and a JSON string with seed, zones and requested/achieved burden."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {f"mask_{k}": v for k, v in phantom.masks.items()}
    if phantom.regions is not None:
        arrays["regions"] = phantom.regions
    if phantom.labels is not None:
        arrays["labels"] = phantom.labels
    meta = {"seed": phantom.seed, "zones": list(ZONES), "requested_burden": phantom.requested_burden,
            "achieved_burden": phantom.achieved_burden, "tissues": TISSUES, "noise_hu": phantom.noise_hu}
    path = out_dir / GROUND_TRUTH_FILE
    np.savez_compressed(path, positions=phantom.positions, orientation=phantom.orientation,
                        pixel_spacing=np.asarray(phantom.pixel_spacing),
                        slice_spacing=np.float64(phantom.slice_spacing), meta=np.array(json.dumps(meta)),
                        **arrays)
    return path


def load_ground_truth(path: Path) -> dict[str, Any]:
    """Inverse of :func:`save_ground_truth`: {"masks": {...}, "regions", "labels", "positions",
    "orientation", "pixel_spacing", "slice_spacing", plus the JSON metadata keys}."""
    with np.load(Path(path)) as z:
        out: dict[str, Any] = {"masks": {k[5:]: z[k] for k in z.files if k.startswith("mask_")}}
        for key in ("regions", "labels", "positions", "orientation"):
            if key in z.files:
                out[key] = z[key]
        out["pixel_spacing"] = tuple(float(v) for v in z["pixel_spacing"])
        out["slice_spacing"] = float(z["slice_spacing"])
        out.update(json.loads(str(z["meta"])))
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m node.phantom OUT_DIR [--seed N] [--burden F] [--size N] [--slices N]``."""
    import argparse
    import time

    ap = argparse.ArgumentParser(description="Write a procedural chest CT phantom study.")
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--burden", type=float, default=0.15)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--slices", type=int, default=240)
    ap.add_argument("--extra-series", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    ph = make_phantom(rows=args.size, cols=args.size, slices=args.slices, seed=args.seed,
                      burden=args.burden, pixel_spacing=0.7 * 512 / args.size)
    files = write_phantom_study(ph, args.out_dir, extra_series=args.extra_series)
    gt = save_ground_truth(ph, args.out_dir)
    print(f"{len(files)} files and {gt.name} in {args.out_dir} ({time.perf_counter() - t0:.1f} s); "
          f"achieved burden {ph.lung_burden}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
