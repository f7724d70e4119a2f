"""Real CT without dense disease as lung-network training examples (torch-free; used by training/lungnet.py).

The network was trained on COVID-SemiSeg crops, which show no real chest wall, and on phantoms; on real slices
it marked intercostal muscle, extrapleural and mediastinal fat and the axilla as lung. Two real series in the
shared data are not among the slices the lung step is judged on (bench/lungs_on_real_slices.py: the NY-SBU and
lungmask slices) and show no dense disease, so the HU method's aerated lung is their label:

* ``dicom/abdomen-j2k-series``: 20 slices at the liver dome, whole body in view: lung bases against ribs,
  intercostal muscle, diaphragm and liver, arms beside the chest;
* ``nifti/chest-crop-1.5mm.nii.gz``: a contrast-enhanced crop around the heart: sternum and anterior chest
  wall, heart, great vessels, mediastinal fat, hila. Its lungs reach the crop's sides, so, like the COVID-SemiSeg
  crops (training.semiseg_ct), each slice is padded with a soft-tissue wall and air before the HU method runs.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

ABDOMEN_SERIES = Path("dicom") / "abdomen-j2k-series"
CHEST_CROP = Path("nifti") / "chest-crop-1.5mm.nii.gz"


def read_nifti(path: Path):
    """A gzipped NIfTI-1 volume (int16, sform, axial, no rotation) as a :class:`node.pipeline.types.Volume` in
    the node's convention: NIfTI's RAS world turned into DICOM's LPS (x and y negated), array (k, rows, cols)."""
    from node.pipeline.types import Volume

    raw = gzip.open(path).read()
    dims = struct.unpack("<8h", raw[40:56])[1:4]
    datatype = struct.unpack("<h", raw[70:72])[0]
    offset, slope, intercept = struct.unpack("<3f", raw[108:120])
    srow = np.array(struct.unpack("<12f", raw[280:328]), dtype=np.float64).reshape(3, 4)
    assert datatype == 4 and struct.unpack("<h", raw[254:256])[0] > 0, "int16 with an sform expected"
    assert np.count_nonzero(srow[:, :3] - np.diag(np.diag(srow[:, :3]))) == 0, "no rotation expected"
    hu = np.frombuffer(raw, "<i2", count=int(np.prod(dims)), offset=int(offset)).reshape(dims[::-1])
    hu = hu.astype(np.float32) * (slope or 1.0) + intercept
    lps = np.diag([-1.0, -1.0, 1.0])
    axes = lps @ srow[:, :3]  # columns: world step (LPS, mm) of one voxel along i (column), j (row), k (slice)
    origin = lps @ srow[:, 3]
    orientation = np.concatenate([axes[:, 0] / np.linalg.norm(axes[:, 0]), axes[:, 1] / np.linalg.norm(axes[:, 1])])
    if axes[2, 2] < 0:  # slices in ascending order along the normal
        hu, origin = hu[::-1], origin + (dims[2] - 1) * axes[:, 2]
    step = float(np.linalg.norm(axes[:, 2]))
    positions = origin + np.arange(dims[2])[:, None] * np.array([0.0, 0.0, step])
    return Volume(hu=np.ascontiguousarray(hu), positions=positions, orientation=orientation,
                  pixel_spacing=(float(np.linalg.norm(axes[:, 1])), float(np.linalg.norm(axes[:, 0]))),
                  slice_spacing=step, sop_instance_uids=[str(k) for k in range(dims[2])],
                  series_instance_uid="1", study_instance_uid="1")


def padded(volume):
    """``volume`` with every slice padded by a soft-tissue wall and outside air (training.semiseg_ct.with_wall:
    the crop's lungs then lie in a body, as the COVID-SemiSeg crops do); its first pixel's position moves with
    the padding."""
    from dataclasses import replace

    from .semiseg_ct import with_wall

    hu, pad = with_wall(volume.hu, min(volume.pixel_spacing))
    orientation = np.asarray(volume.orientation, dtype=np.float64)
    shift = pad * (orientation[:3] * volume.pixel_spacing[1] + orientation[3:] * volume.pixel_spacing[0])
    return replace(volume, hu=np.ascontiguousarray(hu, dtype=np.float32), positions=volume.positions - shift)


def real_volumes(data_root: Path) -> list:
    """The two real series (module docstring) as volumes, the crop padded; those absent are left out."""
    from node.pipeline.volume import assemble_volume

    volumes = []
    series = data_root / ABDOMEN_SERIES
    if series.is_dir():
        volumes.append(assemble_volume(sorted(series.iterdir())))
    crop = data_root / CHEST_CROP
    if crop.is_file():
        volumes.append(padded(read_nifti(crop)))
    return volumes
