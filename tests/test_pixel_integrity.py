"""Compressed pixel data are verified when decoded, and their decoded size is bounded before decoding.

A corrupt or truncated JPEG 2000, JPEG-LS or RLE frame fails its series with the reason (another series of
the study is tried); a header that declares more decoded pixel data than ``[processing]
max_decoded_instance_mb`` / ``max_decoded_mb`` is refused before anything is decoded, whatever the transfer
syntax; a worker's memory is capped by default.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from node.config import ConfigError, ProcessingSettings
from node.pipeline import volume as volume_module
from node.pipeline.volume import DecodeLimits, VolumeError, assemble_volume
from node.processing import analyse
from tests.nodes import make_settings
from tests.builders import ct_slice, write

pytestmark = pytest.mark.unit

SHARED_J2K = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom" / "abdomen-j2k-series"
SIZE = 64
SLICES = 6


def _pixels(k: int) -> np.ndarray:
    """A textured 16-bit slice (compresses to a codestream of a few kB, like real CT)."""
    rng = np.random.default_rng(k)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return (np.sin(xx / 5 + k) * np.cos(yy / 7) * 400 - 300 + rng.normal(0, 20, (SIZE, SIZE))).astype(np.int16)


def _series(folder: Path, syntax: str) -> list[Path]:
    """SLICES compressed CT slices of one series, 1 mm apart."""
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    paths = []
    for k in range(SLICES):
        ds = ct_slice(study_uid=study, series_uid=series, z=float(k), size=SIZE)
        arr = _pixels(k)
        ds.PixelData = arr.tobytes()
        ds.compress(syntax, arr, generate_instance_uid=False)
        paths.append(write(ds, folder, f"s{k:02d}.dcm"))
    return paths


def _replace_frame(path: Path, change) -> None:
    """Rewrite the single encapsulated frame of ``path`` with ``change(frame)``."""
    ds = pydicom.dcmread(path)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([change(frame)])
    ds.save_as(path, enforce_file_format=True)


def _garbage_tail(frame: bytes, keep: float = 0.6) -> bytes:
    """The first ``keep`` of the frame, then random bytes up to its length (the end marker is lost)."""
    n = int(len(frame) * keep)
    tail = bytearray(np.random.default_rng(1).integers(0, 256, len(frame) - n, dtype=np.uint8).tobytes())
    if tail[-2:] == b"\xff\xd9":
        tail[-1] = 0
    return frame[:n] + bytes(tail)


def _truncated(frame: bytes) -> bytes:
    return frame[: int(len(frame) * 0.6) & ~1]


SYNTAXES = [JPEG2000Lossless, JPEGLSLossless, RLELossless]


@pytest.mark.parametrize("syntax", SYNTAXES, ids=lambda s: s.name)
def test_intact_compressed_series_decodes_exactly(tmp_path, syntax):
    volume = assemble_volume(_series(tmp_path, syntax))
    assert volume.hu.shape == (SLICES, SIZE, SIZE)
    for k in range(SLICES):  # lossless: exactly the encoded values (slice k is at z = k)
        assert np.array_equal(volume.hu[k], np.maximum(_pixels(k), -1024).astype(np.float32))


@pytest.mark.parametrize("syntax, change, reason", [
    (JPEG2000Lossless, _garbage_tail, "does not end with the FFD9 end marker"),
    (JPEG2000Lossless, _truncated, "does not end with the FFD9 end marker"),
    (JPEGLSLossless, _truncated, "does not end with the FFD9 end marker"),
    (JPEGLSLossless, _garbage_tail, "does not end with the FFD9 end marker"),
    (RLELossless, _garbage_tail, "cannot be decoded"),  # the decoder overruns the segment (a Rust panic)
    (RLELossless, _truncated, "cannot be decoded"),
    (RLELossless, lambda f: b"\x03" + f[1:], "RLE header declares 3 segments where the image needs 2"),
    (RLELossless, lambda f: f[:8] + (10**6).to_bytes(4, "little") + f[12:], "RLE segment offsets"),
], ids=["j2k-garbage-tail", "j2k-truncated", "jpegls-truncated", "jpegls-garbage-tail", "rle-garbage-tail",
        "rle-truncated", "rle-segment-count", "rle-segment-offset"])
def test_corrupt_frame_fails_the_series_with_the_reason(tmp_path, syntax, change, reason):
    paths = _series(tmp_path, syntax)
    _replace_frame(paths[3], change)
    with pytest.raises(VolumeError) as err:
        assemble_volume(paths)
    assert str(paths[3]) in str(err.value) and reason in str(err.value)


def test_decoder_warning_about_corrupt_data_fails_the_slice(tmp_path):
    """pydicom's own RLE decoder decodes a segment that overruns the image and only warns about it."""
    paths = _series(tmp_path, RLELossless)
    _replace_frame(paths[0], _garbage_tail)
    ds = pydicom.dcmread(paths[0])
    ds.pixel_array_options(decoding_plugin="pydicom")
    with pytest.raises(VolumeError, match="pixel data corrupt: the decoder reports: The decoded RLE segment"):
        volume_module.decode_pixels(ds, "slice")


@pytest.mark.skipif(not SHARED_J2K.is_dir(), reason="shared JPEG 2000 series not present")
def test_real_jpeg2000_series_passes_the_checks():
    files = sorted(p for p in SHARED_J2K.rglob("*") if p.is_file())
    for path in files[:20]:
        ds = pydicom.dcmread(path)
        assert volume_module.decode_pixels(ds, path.name).shape == (ds.Rows, ds.Columns)


def _phantom_study(folder: Path, slices: int, syntax: str, study_uid: str) -> list[Path]:
    from node.phantom import make_phantom, write_phantom_study

    phantom = make_phantom(rows=96, cols=96, slices=slices, pixel_spacing=3.5, slice_spacing=10.0, seed=1,
                           burden=0.2)
    return write_phantom_study(phantom, folder, study_instance_uid=study_uid, transfer_syntax=syntax)


def test_corrupt_series_is_skipped_for_an_intact_one(tmp_path):
    """The preferred series (more slices) has one corrupt JPEG 2000 slice: the study is analysed on the
    other series, and the decision says why the first was not used."""
    study = pydicom.uid.generate_uid()
    corrupt = _phantom_study(tmp_path / "a", 26, JPEG2000Lossless, study)
    intact = _phantom_study(tmp_path / "b", 24, RLELossless, study)
    _replace_frame(corrupt[12], _garbage_tail)
    analysis = analyse([*corrupt, *intact], engine="threshold")
    assert analysis.status == "done"
    chosen = pydicom.dcmread(intact[0], stop_before_pixels=True).SeriesInstanceUID
    assert analysis.pipeline.chosen_series_uid == chosen
    rejected = next(d for d in analysis.pipeline.decisions if d.series_uid != chosen)
    assert "pixel data corrupt" in rejected.reason and "FFD9" in rejected.reason

    only = analyse(corrupt, engine="threshold")
    assert only.status == "failed" and "pixel data corrupt" in only.reason and str(corrupt[12]) in only.reason


# ------------------------------------------------------------------------------------ decompression bombs

BOMB_SIDE = 12000


def _rle_bomb(folder: Path) -> Path:
    """An RLE Lossless CT slice declaring 12000 x 12000 16-bit pixels: two segments of 'repeat 0x00 128
    times' packets, 4.5 MB that decode to 288 MB."""
    ds = ct_slice(size=16)
    ds.Rows = ds.Columns = BOMB_SIDE
    segment = b"\x81\x00" * (BOMB_SIDE * BOMB_SIDE // 128)
    header = (2).to_bytes(4, "little") + (64).to_bytes(4, "little") + (64 + len(segment)).to_bytes(4, "little")
    ds.PixelData = encapsulate([header + bytes(52) + segment + segment])
    ds.file_meta.TransferSyntaxUID = RLELossless
    return write(ds, folder, "bomb.dcm")


def test_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    bomb = _rle_bomb(tmp_path)
    assert bomb.stat().st_size < 5 * 1024**2

    def must_not_decode(*args, **kwargs):
        raise AssertionError("pixel data decoded")

    monkeypatch.setattr(volume_module, "decode_pixels", must_not_decode)
    with pytest.raises(VolumeError, match=r"declares 275 MB of decoded pixel data, above "
                                          r"processing.max_decoded_instance_mb = 64 MB \(not decoded\)"):
        assemble_volume([bomb])
    analysis = analyse([bomb], engine="threshold")
    assert analysis.status == "failed" and "processing.max_decoded_instance_mb" in analysis.reason


def test_series_total_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(volume_module, "decode_pixels", lambda *a: pytest.fail("pixel data decoded"))
    series = pydicom.uid.generate_uid()
    paths = [write(ct_slice(series_uid=series, z=float(k), size=256), tmp_path, f"s{k}.dcm") for k in range(3)]
    with pytest.raises(VolumeError, match=r"the series declare \d+ MB of decoded pixel data, above processing.max_decoded_mb = 0.25 MB"):
        assemble_volume(paths, DecodeLimits(instance_mb=0.2, series_mb=0.25))  # 3 x 128 kB = 0.375 MB


def test_decoded_size_comes_from_the_header():
    ds = ct_slice(size=16)
    ds.NumberOfFrames = None  # present but empty: one frame
    assert volume_module.decoded_bytes(ds) == 16 * 16 * 2
    ds.NumberOfFrames, ds.SamplesPerPixel, ds.BitsAllocated = 3, 3, 12
    assert volume_module.decoded_bytes(ds) == 16 * 16 * 3 * 3 * 2
    ds.Rows = "many"
    with pytest.raises(VolumeError, match="Rows 'many' is missing or not a number"):
        volume_module.decoded_bytes(ds)


def test_decode_limit_defaults_and_validation(tmp_path):
    settings = make_settings(tmp_path)
    assert (settings.processing.max_decoded_mb, settings.processing.max_decoded_instance_mb) == (
        DecodeLimits().series_mb, DecodeLimits().instance_mb)
    with pytest.raises(ConfigError, match="processing.max_decoded_instance_mb"):
        make_settings(tmp_path, processing={"max_decoded_instance_mb": 2048.0})
    with pytest.raises(ConfigError, match="processing.max_decoded_mb"):
        make_settings(tmp_path, processing={"max_decoded_mb": 0})


def test_worker_memory_is_capped_by_default():
    assert ProcessingSettings().worker_memory_gb == 8.0
    code = ("import resource; from node.config import ProcessingSettings; from node.worker import limit_memory; "
            "limit_memory(ProcessingSettings().worker_memory_gb); print(resource.getrlimit(resource.RLIMIT_DATA)[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(out) == 8 * 1024**3
