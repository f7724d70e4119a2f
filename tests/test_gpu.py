"""What needs a CUDA GPU: the Inf-Net engine there (half precision) against the CPU (fp32), and the node's
worker process on the GPU under its memory cap.

CI machines have no GPU, so these tests skip there and on any machine without CUDA; run them on a GPU
machine with ``python -m pytest -q tests/test_gpu.py`` (docs/performance.md, "Processing on a GPU", says
when they last ran and what they gave).
"""
from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import select

from node.agreement import dice
from node.db.schema import Event, Job
from node.demo import send_study
from node.phantom import make_phantom, write_phantom_study
from node.processing import analyse
from node.service import Node
from tests.nodes import make_settings, wait_first_job_finished

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="no CUDA GPU on this machine (CI has none): run on a GPU machine")]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> list[Path]:
    phantom = make_phantom(rows=256, cols=256, slices=60, pixel_spacing=1.4, slice_spacing=5.0, seed=5)
    return write_phantom_study(phantom, tmp_path_factory.mktemp("gpu") / "study")


def test_infnet_on_cuda_agrees_with_the_cpu(study):
    """fp16 on the GPU may flip voxels whose probability is within rounding of the threshold, no more."""
    cpu = analyse(study, engine="infnet", engine_options={"device": "cpu"})
    gpu = analyse(study, engine="infnet", engine_options={"device": "cuda"})
    assert cpu.status == gpu.status == "done"
    assert cpu.pipeline.engine.device == "cpu float32" and gpu.pipeline.engine.device == "cuda float16"
    a, b = cpu.pipeline.infection, gpu.pipeline.infection
    assert a.infection.sum() > 1000  # the phantom's lesions are found at all
    assert dice(a.infection, b.infection) >= 0.99
    if a.consolidation is not None:
        agreement = dice(a.consolidation, b.consolidation)
        assert agreement is None or agreement >= 0.98  # None: neither found consolidation
    for key in ("percent_involved_right", "percent_involved_left", "percent_involved_total"):
        assert abs(cpu.scores[key] - gpu.scores[key]) < 0.1, key  # percentage points


def _engine_under_cap(gigabytes: float) -> tuple[str, bool]:
    """In a fresh process, as the worker does: cap the memory, then build and run the engine on CUDA;
    then check the cap still stops an allocation larger than itself."""
    from node.pipeline.engines.infnet import InfNetEngine
    from node.pipeline.types import LungMasks
    from node.worker import limit_memory

    limit_memory(gigabytes)
    engine = InfNetEngine(device="cuda")
    phantom = make_phantom(rows=128, cols=128, slices=8, pixel_spacing=2.8, slice_spacing=10.0, seed=7)
    engine.segment(phantom.as_volume(), LungMasks(labels=phantom.lung_labels))
    try:
        np.ones(int(gigabytes * 1.5 * 1024**3), np.uint8)
        capped = False
    except MemoryError:
        capped = True
    return engine.identity.device, capped


def test_worker_memory_cap_leaves_cuda_usable():
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        device, capped = pool.submit(_engine_under_cap, 8.0).result(timeout=300)
    assert device == "cuda float16"
    assert capped, "an allocation above processing.worker_memory_gb did not fail"


def test_node_worker_processes_a_study_on_the_gpu(tmp_path, study):
    settings = make_settings(tmp_path, processing={"engine": "infnet", "device": "cuda", "worker_memory_gb": 8.0,
                                                   "stable_after": 0.5})
    node = Node(settings)
    node.start()
    try:
        assert send_study(study, "127.0.0.1", node.listener.port, "CTNODE", progress=False) == len(study)

        wait_first_job_finished(node, 300)
        with node.sessions() as s:
            job = s.scalars(select(Job)).one()
            assert job.state == "done", job.reason
            assert job.result.decisions["engine_device"] == "cuda float16"
            assert not s.scalars(select(Event).where(Event.kind == "engine_on_cpu")).all()
    finally:
        node.stop()
