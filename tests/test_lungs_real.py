"""Lung segmentation on real axial chest CT slices (COVID-19-NY-SBU, lungmask test slices).

No masks exist for these slices, so the checks are plausibility checks: no crash, two lungs of chest-slice
size, the right lung on the patient's right. With ``CTNODE_OVERLAY_DIR`` set, every slice is also written
as a PNG (CT in lung window, right lung outlined in red, left lung in green, recovered dense tissue in
yellow) for a look by eye; see :func:`write_overlay`.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from node.pipeline.lungs import segment_lungs
from node.pipeline.lungs.body import Midline
from node.pipeline.volume import assemble_volume
from tests.support import ABDOMEN_AXIAL, SHARED_DATA, skip_or_fail
from training.real_ct import read_nifti

pytestmark = pytest.mark.unit

NY_SBU = SHARED_DATA / "dicom" / "ny-sbu"
LUNGMASK = SHARED_DATA / "dicom" / "lungmask-slices"
ABDOMEN = set(ABDOMEN_AXIAL)
LUNG_AREA_CM2 = (20.0, 350.0)


def chest_slices() -> list[Path]:
    """Axial chest slices of the shared data (abdomen slices left out); empty when the folder is absent."""
    paths = sorted(p for p in NY_SBU.glob("*/axial/*.dcm") if p.relative_to(NY_SBU).as_posix() not in ABDOMEN)
    return paths + sorted(LUNGMASK.glob("*.dcm"))


def slice_id(path: Path) -> str:
    return path.relative_to(SHARED_DATA / "dicom").as_posix()


def write_overlay(hu: np.ndarray, labels: np.ndarray, path: Path, dense: np.ndarray | None = None) -> None:
    """PNG of one slice in lung window (W 1500, L -600) with the lung outlines (right red, left green);
    ``dense`` (optional) marks the lung pixels denser than -320 HU (lesions, vessels) in yellow."""
    from PIL import Image

    gray = (np.clip((hu + 1350.0) / 1500.0, 0.0, 1.0) * 255).astype(np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    if dense is not None:
        edge = dense & ~ndi.binary_erosion(dense)
        rgb[edge] = (230, 200, 0)
    for value, colour in ((1, (255, 40, 40)), (2, (40, 255, 40))):
        m = labels == value
        rgb[m & ~ndi.binary_erosion(m)] = colour
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


@pytest.fixture(scope="module")
def real_slices() -> list[Path]:
    if not SHARED_DATA.is_dir():
        skip_or_fail(f"shared data folder {SHARED_DATA} is absent")
    paths = chest_slices()
    if len(paths) < 8:
        skip_or_fail(f"expected the NY-SBU axial chest slices and the lungmask slices under {SHARED_DATA / 'dicom'}")
    return paths


def test_two_plausible_lungs_on_every_real_chest_slice(real_slices):
    overlay_dir = os.environ.get("CTNODE_OVERLAY_DIR")
    problems = []
    for path in real_slices:
        volume = assemble_volume([path])
        lungs = segment_lungs(volume)
        px_cm2 = volume.pixel_spacing[0] * volume.pixel_spacing[1] / 100.0
        areas = {name: float(m.sum()) * px_cm2 for name, m in (("right", lungs.right), ("left", lungs.left))}
        if overlay_dir:
            png = Path(overlay_dir) / (slice_id(path).replace("/", "_") + ".png")
            write_overlay(volume.hu[0], lungs.labels[0], png, dense=lungs.lungs[0] & (volume.hu[0] > -320))
        for name, area in areas.items():
            if not LUNG_AREA_CM2[0] <= area <= LUNG_AREA_CM2[1]:
                problems.append(f"{slice_id(path)}: {name} lung {area:.0f} cm2")
        # the right lung lies on the patient's right of the body midline (patient x < midline)
        signed = Midline(volume, lungs.body).signed(0)
        if lungs.right.any() and lungs.left.any():
            if not (signed[lungs.right[0]].mean() < 0 < signed[lungs.left[0]].mean()):
                problems.append(f"{slice_id(path)}: right/left lungs on the wrong sides")
        if lungs.fov_cut_cm2:
            problems.append(f"{slice_id(path)}: {lungs.fov_cut_cm2:.1f} cm2 of lung taken as cut by the field of view")
        assert lungs.labels.shape == volume.shape and lungs.partial_coverage
    assert not problems, problems


def test_severe_peripheral_disease_stays_inside_the_lungs(real_slices):
    """A046441 (second date) has dense consolidation against the chest wall: recovery must take some back."""
    path = NY_SBU / "A046441" / "axial" / "19010101-23.dcm"
    if path not in real_slices:
        skip_or_fail(f"{path} is absent")
    volume = assemble_volume([path])
    lungs = segment_lungs(volume, method="hu")
    assert any("recovered" in n for n in lungs.notes), lungs.notes
    # dense (> -320 HU) tissue forms a real share of the lungs, not only vessels
    dense = (lungs.lungs[0] & (volume.hu[0] > -320)).sum() / lungs.lungs[0].sum()
    assert dense > 0.05


def test_air_bronchograms_bring_back_dependent_consolidation(real_slices, monkeypatch):
    """Step 6a on real CT: A046441 has consolidation with air bronchograms filling the dependent lungs, which
    steps 6 and 6b leave out; 6a takes a large part of it back (measured with bench/lungs_on_real_slices.py:
    +31 % and +53 % of the lung area, mean -201 and -160 HU). Slices without such disease gain at most 1 %."""
    import node.pipeline.lungs as lungs_mod

    step_6a = lungs_mod.recover_bronchograms
    gains = {}
    for path in real_slices:
        volume = assemble_volume([path])
        after = segment_lungs(volume, method="hu").lungs[0]
        monkeypatch.setattr(lungs_mod, "recover_bronchograms", lambda labels, *a, **k: (labels.copy(), 0))
        before = segment_lungs(volume, method="hu").lungs[0]
        monkeypatch.setattr(lungs_mod, "recover_bronchograms", step_6a)
        assert not (before & ~after).any()  # the step only adds
        added = after & ~before
        gains[slice_id(path)] = (added.sum() / before.sum(), float(np.median(volume.hu[0][added])) if added.any() else None)
    for name in ("ny-sbu/A046441/axial/19001111-045.dcm", "ny-sbu/A046441/axial/19010101-23.dcm"):
        share, median_hu = gains[name]
        assert share > 0.2 and -320 < median_hu < 45, (name, gains[name])
    for name in ("ny-sbu/A048383/axial/19001231-30.dcm", "ny-sbu/A048383/axial/19010410-30.dcm",
                 "ny-sbu/A056642/axial/19010107-111.dcm", "lungmask-slices/0.dcm"):
        assert gains[name][0] <= 0.01, (name, gains[name])


def test_under_segmentation_note_on_real_slices(real_slices):
    """With the shipped Inf-Net engine, the slices whose lung mask leaves out dense disease next to the lungs
    (A046441: consolidation filling the dependent lungs; measured 10 % and 30 % of the lung) get the
    under-segmentation note; slices without dense disease at the lung edge (A048383, 0-1 %) do not."""
    from node.pipeline.run import run_pipeline

    def notes(name: str) -> list[str]:
        result = run_pipeline([SHARED_DATA / "dicom" / name], "infnet", lung_method="hu")
        assert result.status == "done", result.reason
        return [n for n in result.notes if "under-segmentation" in n]

    for name in ("ny-sbu/A046441/axial/19001111-045.dcm", "ny-sbu/A046441/axial/19010101-23.dcm"):
        assert notes(name), name
    for name in ("ny-sbu/A048383/axial/19001231-30.dcm", "ny-sbu/A048383/axial/19010410-30.dcm"):
        assert not notes(name), name


def test_a_real_chest_crop_whose_field_of_view_cuts_the_lungs_is_skipped_with_that_reason():
    """The shared real chest CT crop around the heart (TotalSegmentator tests, 1.5 mm) shows both lungs,
    cut by the image edges: it must be skipped as cut by the field of view, not as "no lung (abdomen?)"."""
    from node.pipeline.select import check_lung_in_view

    path = SHARED_DATA / "nifti" / "chest-crop-1.5mm.nii.gz"
    if not path.is_file():
        skip_or_fail(f"{path} is absent")
    volume = read_nifti(path)
    assert volume.shape == (112, 102, 122) and volume.pixel_spacing == (1.5, 1.5)
    lungs = segment_lungs(volume)
    assert lungs.fov_cut_cm2 > 50, lungs.notes  # most of each lung's cross-section lies at the edge
    reason = check_lung_in_view(volume, lungs)
    assert reason and reason.startswith("lungs cut by the reconstructed field of view"), reason


def test_the_lung_network_adds_no_bowel_gas_to_the_hu_method():
    """A058062 (second date) is an abdomen slice with gas-filled bowel loops against the anterior wall; the HU
    method keeps 1.1 cm2 of one loop as lung, and the network (mean probability 0.55 there) does not remove
    it (docs/lungs.md): the net method finds no more than the HU method and the result says one lung only."""
    path = NY_SBU / "A058062" / "axial" / "19010108-078.dcm"
    if not path.is_file():
        skip_or_fail(f"{path} is absent")
    volume = assemble_volume([path])
    net = segment_lungs(volume, method="net")
    assert net.lungs.sum() <= segment_lungs(volume, method="hu").lungs.sum()
    assert net.lungs.sum() * volume.pixel_spacing[0] * volume.pixel_spacing[1] < 200.0  # under 2 cm2
    assert "only one lung found" in net.notes


def test_ribs_let_dependent_consolidation_in_but_not_the_chest_wall(real_slices, monkeypatch):
    """Method "net" with and without the rib bound of its chest-wall limit (lungs.rib_depths). A046441 (second
    date): consolidation fills the dependent lungs inside the ribs, with no aerated lung against the posterior
    wall; the bound lets the network's lung there in (measured +14.1 cm2, bench/lungs_on_real_slices.py and
    docs/lungs-overlays). A056642 (second date), where the network also marks intercostal muscle between the
    ribs, gains nothing; the healthy lungmask slice gains 1.5 cm2 of partly aerated dependent lung filling two
    notches of the posterior outline (judged at full size in lung and soft-tissue windows), nothing more."""
    from node.pipeline.lungs import chestwall

    rib_mask = chestwall.rib_mask
    gains = {}
    for name in ("ny-sbu/A046441/axial/19010101-23.dcm", "ny-sbu/A056642/axial/19010107-111.dcm",
                 "lungmask-slices/0.dcm"):
        volume = assemble_volume([SHARED_DATA / "dicom" / name])
        with_ribs = segment_lungs(volume, method="net").lungs[0]
        monkeypatch.setattr(chestwall, "rib_mask", lambda hu, *a: np.zeros(hu.shape, bool))
        without = segment_lungs(volume, method="net").lungs[0]
        monkeypatch.setattr(chestwall, "rib_mask", rib_mask)
        added = with_ribs & ~without
        assert not (without & ~with_ribs).any(), name  # the bound only lets more in
        px_cm2 = volume.pixel_spacing[0] * volume.pixel_spacing[1] / 100.0
        gains[name] = (added.sum() * px_cm2, float(np.median(volume.hu[0][added])) if added.any() else None)
    area, median_hu = gains["ny-sbu/A046441/axial/19010101-23.dcm"]
    assert area >= 10.0 and -320 < median_hu < 45, gains
    assert gains["ny-sbu/A056642/axial/19010107-111.dcm"][0] < 0.5, gains
    assert gains["lungmask-slices/0.dcm"][0] < 2.0, gains


def test_contrast_in_lung_vessels_is_not_a_rib(real_slices, monkeypatch):
    """The rib bound of method "net" leaves out bone in the lung (chestwall.rib_mask). On the contrast-enhanced
    lungmask slice and A056642 (second date), pieces of bone density lie in the lung (contrast in its vessels);
    those and only those leave the rib mask: every pixel it drops lies in the aerated lung. With a network that
    gave every pixel lung probability 1 the ribs stay, because the rays from them towards the skin meet no
    aerated lung: what it drops lies in the lung, deeper than the inner chest wall (contrast at the heart's
    border and in the aorta, whose rays to the skin cross the lung; no rib, so dropping it is right too) or in
    pieces under ``RIB_MIN_MM2`` (their directions take the depth of the ribs beside them)."""
    from node.pipeline.lungs import chestwall, net

    within_chest_wall = net.within_chest_wall
    seen = []

    def spy(cand, aerated, trunk, spacing_rc, hu=None, midline=None, prob=None):
        for k in range(hu.shape[0]):
            skin = chestwall.SkinGeometry(trunk[k], spacing_rc)
            ribs = chestwall.rib_mask(hu[k], trunk[k], midline.signed(k), spacing_rc)
            lab, n = ndi.label(ribs)
            large = np.bincount(lab.ravel(), minlength=n + 1) * np.prod(spacing_rc) >= chestwall.RIB_MIN_MM2
            for p in (prob[k], np.ones_like(prob[k])):
                kept = chestwall.rib_mask(hu[k], trunk[k], midline.signed(k), spacing_rc, (p, aerated[k], skin))
                rows, cols = np.nonzero(ribs & ~kept & ~aerated[k] & large[lab] & (lab > 0))
                in_wall = ~chestwall.wall_depth_ok(aerated[k], skin, rows, cols, interpolate=True)
                seen.append((ribs.sum(), (ribs & ~kept).sum(), (ribs & ~kept & ~aerated[k]).sum(), in_wall.sum()))
        return within_chest_wall(cand, aerated, trunk, spacing_rc, hu=hu, midline=midline, prob=prob)

    monkeypatch.setattr(net, "within_chest_wall", spy)
    for name in ("lungmask-slices/0.dcm", "ny-sbu/A056642/axial/19010107-111.dcm"):
        seen.clear()
        segment_lungs(assemble_volume([SHARED_DATA / "dicom" / name]), method="net")
        (ribs, dropped, outside, _), (_, dropped_1, _, in_wall_1) = seen
        assert dropped >= 50 and outside == 0 and ribs - dropped >= 500, (name, seen)
        assert dropped_1 >= dropped and in_wall_1 == 0 and ribs - dropped_1 >= 500, (name, seen)


def test_fat_beside_the_heart_does_not_join_the_lung(real_slices, monkeypatch):
    """Method "net" with and without its fat-piece rule (lungs.net.fat_pieces). A002304 (second date): the lung
    network takes a strip of fat at the right heart border and a blob at the left one for lung (judged at full
    size in a soft-tissue window; measured 5.1 cm2, bench/lungs_on_real_slices.py); the rule leaves them out and
    takes nothing else away. A046441 (second date), whose dependent consolidation is soft tissue, keeps it."""
    from node.pipeline.lungs import net

    fat_pieces = net.fat_pieces
    removed = {}
    for name in ("ny-sbu/A002304/axial/19010112-135.dcm", "ny-sbu/A046441/axial/19010101-23.dcm"):
        volume = assemble_volume([SHARED_DATA / "dicom" / name])
        with_rule = segment_lungs(volume, method="net").lungs[0]
        monkeypatch.setattr(net, "fat_pieces", lambda mask, hu: np.zeros_like(mask))
        without = segment_lungs(volume, method="net").lungs[0]
        monkeypatch.setattr(net, "fat_pieces", fat_pieces)
        assert not (with_rule & ~without).any(), name  # the rule only takes away
        gone = without & ~with_rule
        px_cm2 = volume.pixel_spacing[0] * volume.pixel_spacing[1] / 100.0
        removed[name] = (gone.sum() * px_cm2, volume.hu[0][gone], with_rule.sum() * px_cm2)
    area, hu, _ = removed["ny-sbu/A002304/axial/19010112-135.dcm"]
    assert area >= 3.0 and -150 < np.median(hu) < -90, (area, np.median(hu))
    assert ((hu >= -190) & (hu <= -30)).mean() >= 0.8
    area, _, lung = removed["ny-sbu/A046441/axial/19010101-23.dcm"]
    assert area < 0.02 * lung
