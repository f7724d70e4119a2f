"""``ctnode demo``: the whole product on one machine with embedded defaults.

It starts a node (SQLite and spool in a temporary folder), a built-in receiving "PACS" (a pynetdicom storage
SCP), writes a phantom chest CT study, sends it to the node over DICOM, waits for the SEG and SR to arrive at
the receiver, prints a one-screen summary and writes a PNG overlay preview.
"""
from __future__ import annotations

import logging
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage, CTImageStorage, SegmentationStorage, Verification,
)

from node.config import load_settings

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Receiver:
    """A minimal storage SCP standing in for the PACS: stores whatever it is sent into ``folder``."""

    def __init__(self, folder: Path, ae_title: str = "DEMOPACS", port: int | None = None):
        self.folder, self.ae_title, self.port = folder, ae_title, port or free_port()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.received: list[Path] = []
        ae = AE(ae_title=ae_title)
        for sop in (SegmentationStorage, Comprehensive3DSRStorage, CTImageStorage):
            ae.add_supported_context(sop, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        ae.add_supported_context(Verification)
        self.ae = ae
        self._server = None

    def _on_store(self, event) -> int:
        path = self.folder / f"{event.request.AffectedSOPInstanceUID}.dcm"
        path.write_bytes(event.encoded_dataset())
        with self._lock:
            self.received.append(path)
        return 0x0000

    def __enter__(self) -> "Receiver":
        self._server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                            evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()


def send_study(files: list[Path], host: str, port: int, called_aet: str, calling_aet: str = "DEMOSCU",
               progress: bool = True) -> int:
    """C-STORE ``files`` in one association; returns how many were acknowledged with success."""
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(host, port, ae_title=called_aet)
    if not assoc.is_established:
        raise RuntimeError(f"the node at {host}:{port} refused the association")
    ok = 0
    try:
        for i, path in enumerate(files, 1):
            status = assoc.send_c_store(path)
            ok += int(getattr(status, "Status", -1) == 0)
            if progress and (i % 20 == 0 or i == len(files)):
                print(f"\r  sent {i}/{len(files)} instances", end="", flush=True)
    finally:
        assoc.release()
    if progress:
        print()
    return ok


def write_preview(seg_path: Path, ct_files: list[Path], out_png: Path) -> Path:
    """A PNG of the axial slice with most infection: CT in the lung window, lungs and infection outlined."""
    import highdicom as hd
    from PIL import Image

    seg = hd.seg.segread(seg_path)
    by_uid = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in ct_files}
    numbers = {s.SegmentLabel: s.SegmentNumber for s in seg.SegmentSequence}
    # the infection segments (by side and class: "Infection, right lung", "Ground-glass opacity, left lung", ...)
    lesions = [i for i, label in enumerate(numbers)
               if label.lower().startswith(("infection", "ground", "consolidation"))]
    uids = [u for u in seg.get_source_image_uids() if u[2] in by_uid]
    best, best_count, best_masks = None, -1, None
    step = max(1, len(uids) // 60)
    for _, _, sop_uid in uids[::step]:
        masks = seg.get_pixels_by_source_instance(source_sop_instance_uids=[sop_uid], assert_missing_frames_are_empty=True,
                                                  segment_numbers=list(numbers.values()))[0]
        count = int(masks[..., lesions].sum())
        if count > best_count:
            best, best_count, best_masks = sop_uid, count, masks
    ds = dcmread(by_uid[best])
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    grey = np.clip((hu + 1350) / 1500, 0, 1) * 255  # lung window: centre -600, width 1500
    rgb = np.stack([grey] * 3, axis=-1).astype(np.float32)
    colours = {"right": (60, 120, 255), "left": (60, 220, 120), "infection": (255, 40, 40),
               "ground": (255, 220, 0), "consolidation": (255, 130, 0)}
    for idx, label in enumerate(numbers):
        key = next((k for k in colours if label.lower().startswith(k)), None)
        if key is None:
            continue
        m = best_masks[..., idx] > 0
        alpha = 0.45 if key in ("infection", "ground", "consolidation") else 0.18
        rgb[m] = (1 - alpha) * rgb[m] + alpha * np.array(colours[key], dtype=np.float32)
    Image.fromarray(rgb.astype(np.uint8)).save(out_png)
    return out_png


def run_demo(size: int = 512, slices: int = 240, out: Path | None = None, engine: str = "auto") -> int:
    from node.db.schema import Job
    from node.phantom import make_phantom, write_phantom_study
    from node.reports import result_text
    from node.service import Node

    logging.getLogger().setLevel(logging.WARNING)
    work = Path(out) if out else Path(tempfile.mkdtemp(prefix="ctnode-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"ctnode demo: working folder {work}")
    with Receiver(work / "pacs") as pacs:
        node_port = free_port()
        settings = load_settings(overrides={
            "node": {"ae_title": "CTNODE", "port": node_port, "allowed_calling_aets": ["DEMOSCU"]},
            "storage": {"spool_dir": str(work / "spool"), "results_dir": str(work / "results"),
                        "database_url": f"sqlite:///{work / 'ctnode.db'}"},
            "processing": {"stable_after": 2.0, "engine": engine, "check_interval": 0.5},
            "http": {"enabled": False},
            "destinations": [{"name": "demo-pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}],
        })
        node = Node(settings)
        node.start()
        try:
            t0 = time.perf_counter()
            print(f"1/4 making a {slices}-slice {size}x{size} phantom chest CT ...", flush=True)
            phantom = make_phantom(rows=size, cols=size, slices=slices, seed=0)
            files = write_phantom_study(phantom, work / "phantom")
            truth = phantom.lung_burden
            del phantom  # the node reads the study from DICOM like any other
            t_phantom = time.perf_counter() - t0
            print(f"2/4 sending {len(files)} instances to CTNODE at 127.0.0.1:{node_port} ...", flush=True)
            t0 = time.perf_counter()
            acked = send_study(files, "127.0.0.1", node_port, "CTNODE")
            t_send = time.perf_counter() - t0
            print(f"3/4 waiting for the study to be stable ({settings.processing.stable_after:g} s) and processed ...",
                  flush=True)
            t0 = time.perf_counter()
            state = ""
            while time.perf_counter() - t0 < 1800:
                with node.sessions() as session:
                    job = session.query(Job).order_by(Job.id.desc()).first()
                    state = job.state if job else "waiting"
                if state in ("failed", "skipped") or len(pacs.received) >= 2:
                    break
                print(f"\r  job state: {state:12s} {time.perf_counter() - t0:5.0f} s", end="", flush=True)
                time.sleep(0.5)
            print()
            t_wait = time.perf_counter() - t0
        finally:
            node.stop()
        with node.sessions() as session:
            job = session.query(Job).order_by(Job.id.desc()).first()
            summary = result_text(session, job.id, settings.files) if job else "no job"
        print("4/4 summary\n" + summary)
        print(f"  phantom ground truth: {100 * truth['right']:.1f} % of the right lung, {100 * truth['left']:.1f} % of "
              f"the left, {100 * truth['total']:.1f} % overall involved (compare percent_involved_* above)")
        print(f"  acknowledged {acked}/{len(files)} instances; phantom {t_phantom:.1f} s, send {t_send:.1f} s, "
              f"stable + process + export {t_wait:.1f} s")
        if len(pacs.received) < 2:
            print(f"demo FAILED: the receiver got {len(pacs.received)} of 2 objects (job state {state})", file=sys.stderr)
            return 1
        print("  objects at the receiving PACS:")
        for p in pacs.received:
            ds = dcmread(p, stop_before_pixels=True)
            print(f"    {ds.Modality:3s} {ds.SeriesDescription!s:32s} {p}")
        seg_path = next(p for p in pacs.received if dcmread(p, stop_before_pixels=True).Modality == "SEG")
        preview = write_preview(seg_path, files, work / "preview.png")
        print(f"  overlay preview: {preview}")
    return 0
