"""Contributing Equipment of the SEG and the SR (PS3.3 C.12.1, SOP Common Module).

IHE Radiology AI Results (AIR) asks an Evidence Creator to name the algorithm that produced a result
as contributing equipment with Purpose of Reference (Newcode1, 99IHE, "Processing Algorithm"), with
its manufacturer, model, software version and a Device UID that identifies the algorithm *and its
trained weights*: :func:`algorithm_device_uid` derives it from the engine identity, so new weights
give a new UID and the same weights always the same one. The source CT's equipment stays in the
sequence as (109101, DCM, "Acquisition Equipment") (highdicom adds it from the first source header).
"""
from __future__ import annotations

import highdicom as hd
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

import node
from node.pipeline.types import EngineIdentity

MANUFACTURER = "ctnode"
#: IHE RAD TF-3 AIR: Purpose of Reference of the equipment item that describes the algorithm.
PROCESSING_ALGORITHM = hd.sr.CodedConcept("Newcode1", "99IHE", "Processing Algorithm")


def algorithm_device_uid(engine: EngineIdentity, lung_weights_sha256: str = "") -> str:
    """Deterministic Device UID of an engine (and of the lung network's weights when the lungs came from it):
    the same name, version and weights give the same UID, other weights another."""
    sources = ["ctnode algorithm", engine.name, engine.version, engine.weights_sha256]
    return generate_uid(entropy_srcs=sources + ([lung_weights_sha256] if lung_weights_sha256 else []))


def algorithm_model_name(engine: EngineIdentity) -> str:
    """Manufacturer's Model Name of the algorithm (LO, 64 chars)."""
    return f"ctnode {engine.name}"[:64]


def processing_algorithm(engine: EngineIdentity, lung_weights_sha256: str = "") -> hd.ContributingEquipment:
    """The AIR "Processing Algorithm" item for ``engine``; ``lung_weights_sha256``: the lung network's weights
    when the lungs came from it (their hash is a software version and changes the Device UID too)."""
    versions = [f"ctnode {node.__version__}", f"{engine.name} {engine.version}"]
    if engine.weights_sha256:
        versions.append(f"weights sha256:{engine.weights_sha256[:16]}")
    if lung_weights_sha256:
        versions.append(f"lungnet sha256:{lung_weights_sha256[:16]}")
    item = hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        # highdicom accepts only CID 7005 purposes; the AIR code replaces this one below
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=algorithm_model_name(engine),
        software_versions=[v[:64] for v in versions],
        contribution_description=(engine.description or f"ctnode {engine.name} engine")[:1024],  # ST
    )
    item.PurposeOfReferenceCodeSequence = [PROCESSING_ALGORITHM]
    item.DeviceUID = algorithm_device_uid(engine, lung_weights_sha256)
    return item
