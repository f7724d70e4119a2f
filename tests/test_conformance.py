"""Conformance of the SEG and the severity SR with real third-party readers.

1. dicom3tools ``dciodvfy``: the SR with region groups and severity has no IOD errors;
2. highdicom reads the SR back and every number of the scores dict is there (nested regions/zones
   included), with the coded severity and the region-group finding sites;
3. dcmqi ``segimage2itkimage`` converts the node's SEG to NRRD and every segment matches the node's
   mask voxel for voxel in PATIENT space (NRRD space origin/directions vs the volume geometry).

Peer tests are marked ``peer``: they skip when the tool is missing, and fail under ``CI=true``.
"""
from __future__ import annotations

import gzip
import io
import json
import re
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from node.pipeline.regions import REGIONS, ZONES
from node.pipeline.scores import compute_scores
from node.pipeline.types import LungMasks
from node.writers.seg import build_segmentation, segment_numbers
from node.writers.sr import DECIMALS, MEASUREMENTS, build_report, flatten_scores, read_report_measurements
from tests import peers
from tests.builders import INFNET, OBLIQUE, expected_segments, make_masks, make_volume

pytestmark = pytest.mark.unit


def _case(orientation=None, *, region_map=None, kind="lobes"):
    volume = make_volume() if orientation is None else make_volume(orientation=orientation)
    lungs, infection = make_masks(volume)
    volume.hu[infection.consolidation] = 0.0     # high opacity (> -200 HU)
    volume.hu[infection.ggo] = -500.0
    scores = compute_scores(volume, lungs, infection, region_map=region_map, region_map_kind=kind)
    seg = build_segmentation(volume, lungs, infection, INFNET, series_number=905)
    return volume, lungs, infection, scores, seg


def _roundtrip(ds) -> pydicom.Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


@pytest.fixture(scope="module")
def case():
    return _case()


# --------------------------------------------------------------------------- highdicom read-back

def test_sr_every_number_reads_back_with_highdicom(case):
    volume, _, _, scores, seg = case
    d = scores.as_dict()
    assert {"regions", "zones", "ctss_total", "zone_score_total", "severity",
            "percent_high_opacity_total"} <= set(d)
    sr = _roundtrip(build_report(volume, seg, d, INFNET, strict=True))
    back = read_report_measurements(sr)
    flat_in = {k: v for k, v in flatten_scores(d).items() if k not in ("volumetric", "severity", "region_method")}
    flat_out = {k: v for k, v in flatten_scores(back).items()
                if k not in ("volumetric", "severity", "region_method")}
    assert set(flat_out) == set(flat_in)
    units = {m.key: m.unit.value for m in MEASUREMENTS}
    for key, value in flat_in.items():   # rounded to the precision of the unit (DECIMALS)
        assert flat_out[key] == round(float(value), DECIMALS[units[key]]), key
    assert back["severity"] == d["severity"] and back["region_method"] == "geometric"
    assert set(back["regions"]) == set(REGIONS) and set(back["zones"]) == set(ZONES)

    report = hd.sr.Comprehensive3DSR.from_dataset(sr)
    numbers = segment_numbers(seg)
    groups = [g for g in report.content.get_volumetric_roi_measurement_groups()
              if g.tracking_identifier.startswith(("CT-SS region", "Zone"))]
    assert len(groups) == len(REGIONS) + len(ZONES)
    for group in groups:
        (site,) = group.finding_sites
        assert site.value.CodeValue in ("45653009", "72481006", "90572001")  # CID 6170 lobes
        assert site.laterality.value in ("24028007", "7771000")
        assert group.method.scheme_designator == "99CTNODE"
        # on the lung segment of the region's side
        side = "right_lung" if site.laterality.value == "24028007" else "left_lung"
        assert group.referenced_segment.referenced_segment_numbers == [numbers[side]]
    statements = [i.TextValue for i in sr.ContentSequence[-1].ContentSequence if i.ValueType == "TEXT"]
    assert any("geometric approximations" in t for t in statements)     # geometric partition, said once
    (severity,) = [i for i in sr.ContentSequence[-1].ContentSequence if i.ValueType == "CODE"]
    assert severity.ConceptNameCodeSequence[0].CodeValue == "246112005"
    assert severity.ConceptCodeSequence[0].CodeValue == {"mild": "255604002", "moderate": "6736007",
                                                         "severe": "24484000"}[d["severity"]]


def test_sr_lobe_map_method_is_recorded(case):
    volume, lungs, _, _, _ = case
    lobes = np.where(lungs.right, 1, np.where(lungs.left, 4, 0)).astype(np.uint8)
    volume2, _, _, scores, seg = _case(region_map=lobes)
    back = read_report_measurements(build_report(volume2, seg, scores.as_dict(), INFNET))
    assert back["region_method"] == "lobes"
    assert set(back["zones"]) == set(ZONES)        # empty zones still carry their score (0)
    assert "percent" not in back["zones"]["right_middle"] and back["zones"]["right_middle"]["score"] == 0


# --------------------------------------------------------------------------- dciodvfy

@pytest.mark.peer
def test_dciodvfy_severity_sr_has_no_errors(tmp_path, case):
    peers.require_peer("dciodvfy")
    volume, _, _, scores, seg = case
    objects = {"sr_regions": build_report(volume, seg, scores.as_dict(), INFNET)}
    v2, _, _, s2, seg2 = _case(OBLIQUE)
    objects["sr_oblique"] = build_report(v2, seg2, s2.as_dict(), INFNET)
    errors = {}
    for name, ds in objects.items():
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        errors[name] = peers.dciodvfy(path)[0]
    assert errors == {name: [] for name in objects}


# --------------------------------------------------------------------------- dcmqi

def _segimage2itkimage() -> str:
    """Path of dcmqi's converter (verified by its banner), else skip (fail under CI=true)."""
    return peers.require_peer("segimage2itkimage")


_NRRD_TYPES = {"short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2", "uchar": "u1",
               "unsigned char": "u1", "uint8": "u1", "char": "i1", "signed char": "i1", "int8": "i1",
               "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4"}


def read_nrrd(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Minimal NRRD reader (attached data, raw or gzip): (array[k, j, i], origin (3,), directions (3, 3)
    with ``directions[a]`` the patient step of axis a = i, j, k). Space must be LPS."""
    raw = path.read_bytes()
    head, _, data = raw.partition(b"\n\n")
    fields = {}
    for line in head.decode("ascii").splitlines()[1:]:
        if line.startswith("#") or ":" not in line:
            continue
        key, _, value = line.partition(":")
        fields[key.strip()] = value.lstrip("=").strip()
    assert fields["space"] in ("left-posterior-superior", "LPS"), fields["space"]
    sizes = [int(v) for v in fields["sizes"].split()]
    vectors = re.findall(r"\(([^)]*)\)", fields["space directions"])
    directions = np.array([[float(x) for x in v.split(",")] for v in vectors])
    origin = np.array([float(x) for x in re.findall(r"\(([^)]*)\)", fields["space origin"])[0].split(",")])
    if fields.get("encoding", "raw") in ("gzip", "gz"):
        data = gzip.decompress(data)
    else:
        assert fields.get("encoding", "raw") == "raw", fields.get("encoding")
    endian = ">" if fields.get("endian") == "big" else "<"
    dtype = np.dtype(endian + _NRRD_TYPES[fields["type"]])
    array = np.frombuffer(data, dtype=dtype, count=int(np.prod(sizes))).reshape(sizes[::-1])
    return array, origin, directions


def _positions(volume, mask: np.ndarray) -> set[tuple[float, float, float]]:
    k, r, c = np.nonzero(mask)
    o = volume.orientation
    p = (volume.positions[k] + (c * volume.pixel_spacing[1])[:, None] * o[:3]
         + (r * volume.pixel_spacing[0])[:, None] * o[3:])
    return {tuple(v) for v in np.round(p, 2)}


def _nrrd_positions(array: np.ndarray, origin: np.ndarray, directions: np.ndarray) -> set:
    k, j, i = np.nonzero(array)
    p = origin + i[:, None] * directions[0] + j[:, None] * directions[1] + k[:, None] * directions[2]
    return {tuple(v) for v in np.round(p, 2)}


@pytest.mark.peer
@pytest.mark.parametrize("orientation", [None, OBLIQUE], ids=["axial", "oblique"])
def test_dcmqi_seg_roundtrip_matches_masks_in_patient_space(tmp_path, orientation):
    tool = _segimage2itkimage()
    volume, lungs, infection, _, seg = _case(orientation)
    seg_path = tmp_path / "seg.dcm"
    seg.save_as(seg_path, enforce_file_format=True)
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([tool, "--inputDICOM", str(seg_path), "--outputDirectory", str(out),
                           "--outputType", "nrrd"], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads((out / "meta.json").read_text())
    labels = {item["labelID"]: item["SegmentLabel"] for group in meta["segmentAttributes"] for item in group}
    numbers = segment_numbers(seg)
    expected = {numbers[key]: mask for key, mask in expected_segments(lungs, infection).items()}
    files = {int(p.stem): p for p in out.glob("*.nrrd")}
    assert set(files) == set(expected) == set(labels)
    for number, mask in expected.items():
        array, origin, directions = read_nrrd(files[number])
        got = _nrrd_positions(array, origin, directions)
        want = _positions(volume, mask)
        assert len(want) == int(mask.sum()) > 0
        assert int(np.count_nonzero(array)) == len(got)
        assert got == want, f"segment {number} ({labels[number]}): {len(got ^ want)} voxels differ"


def test_masks_helper_positions_are_distinct():
    volume = make_volume()
    lungs = LungMasks(labels=np.ones(volume.shape, np.uint8))
    assert len(_positions(volume, lungs.lungs)) == int(np.prod(volume.shape))
