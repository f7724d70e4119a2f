"""Key images: Secondary Capture slices with the lung and infection overlay burned in.

For viewers and PACS without SEG support. Each image is a copy of one source CT slice in a lung window
(W 1500 / L -600) converted to RGB, with the colours of the SEG (:data:`node.writers.seg.DISPLAY_COLOURS`)
blended in and a one-line banner burned into the top of the image. They are *derived* images and say so
everywhere a viewer or a person looks: ImageType DERIVED\\SECONDARY, BurnedInAnnotation YES,
ConversionType WSD (workstation), a DerivationDescription, the SourceImageSequence pointing at the CT
slice, the series description, and the banner text in the pixels ("DERIVED ... not for primary diagnosis").

Slices are chosen by infected area (largest first, only slices with infection); a study without infection
gets the one slice with the largest lung area, so that the reader still sees what was segmented. The
images are ordered head to foot (by position along the slice normal) and keep the source's patient
geometry as far as the SC IOD carries it: pixel spacing and patient orientation.
"""
from __future__ import annotations

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from scipy import ndimage

from node.pipeline.types import EngineIdentity, InfectionResult, LungMasks, Volume
from node.writers.seg import DISPLAY_COLOURS, MANUFACTURER, algorithm_name, algorithm_version

KEY_IMAGES_SERIES_DESCRIPTION = "ctnode key images (DERIVED, overlay burned in)"
WINDOW = (-600.0, 1500.0)   # level, width: the usual lung window
ALPHA = 0.45                # opacity of the infection colours
BANNER_HEIGHT = 14


def choose_slices(lungs: LungMasks, infection: InfectionResult, count: int) -> list[int]:
    """Up to ``count`` slice indices: largest infected area first; with no infection, the largest lung slice."""
    if count <= 0:
        return []
    infected = infection.infection.reshape(infection.infection.shape[0], -1).sum(axis=1)
    order = [int(i) for i in np.argsort(-infected, kind="stable") if infected[i] > 0][:count]
    if not order:
        lung = (lungs.labels > 0).reshape(lungs.labels.shape[0], -1).sum(axis=1)
        order = [int(np.argmax(lung))] if lung.max() > 0 else []
    return order


def patient_orientation(orientation: np.ndarray) -> tuple[str, str]:
    """PatientOrientation (0020,0020) from ImageOrientationPatient: the dominant direction of the row and
    column cosines (PS3.3 C.7.6.1.1.1; e.g. axial supine -> ("L", "P"))."""
    def letter(v: np.ndarray) -> str:
        axis = int(np.argmax(np.abs(v)))
        return ("L", "P", "H")[axis] if v[axis] > 0 else ("R", "A", "F")[axis]
    return letter(orientation[:3]), letter(orientation[3:])


def render(hu: np.ndarray, labels: np.ndarray, infection: InfectionResult, index: int, banner: str) -> np.ndarray:
    """(rows, cols, 3) uint8: lung-window greyscale, lung outlines, infection colours, banner."""
    level, width = WINDOW
    grey = np.clip((hu.astype(np.float32) - (level - width / 2)) / width, 0.0, 1.0) * 255.0
    rgb = np.repeat(grey[..., None], 3, axis=2)
    layers: list[tuple[np.ndarray, str]] = []
    if infection.ggo is not None or infection.consolidation is not None:
        for key, mask in (("ggo", infection.ggo), ("consolidation", infection.consolidation)):
            if mask is not None:
                layers.append((mask[index], key))
    else:
        layers.append((infection.infection[index], "infection"))
    for mask, key in layers:
        colour = np.asarray(DISPLAY_COLOURS[key], dtype=np.float32)
        rgb[mask] = (1 - ALPHA) * rgb[mask] + ALPHA * colour
    for value, key in ((LungMasks.RIGHT, "right_lung"), (LungMasks.LEFT, "left_lung")):
        lung = labels == value
        outline = lung & ~ndimage.binary_erosion(lung)
        rgb[outline] = DISPLAY_COLOURS[key]
    image = Image.fromarray(rgb.round().astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, image.width, BANNER_HEIGHT), fill=(0, 0, 0))
    for text in (banner, "DERIVED: not for primary diagnosis", "DERIVED"):  # the longest that fits
        if draw.textlength(text) <= image.width - 4:
            break
    draw.text((2, 1), text, fill=(255, 255, 0))
    return np.asarray(image)


def _source_reference(ds: Dataset) -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID = ds.SOPClassUID
    ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    # CID 7202 "Source Image Purposes of Reference"
    ref.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)]
    return ref


def build_key_images(volume: Volume, lungs: LungMasks, infection: InfectionResult, engine: EngineIdentity,
                     *, count: int, series_number: int, percent_of_lung: float | None = None) -> list[hd.sc.SCImage]:
    """Secondary Capture key images (see the module docstring); ``count`` 0 gives none."""
    indices = sorted(choose_slices(lungs, infection, count),
                     key=lambda i: -float(np.dot(volume.positions[i], volume.normal)))  # head first
    if not indices:
        return []
    series_uid = generate_uid()
    involved = f"{percent_of_lung:.1f}% of lung involved, " if percent_of_lung is not None else ""
    banner = f"DERIVED {algorithm_name(engine)}: {involved}not for primary diagnosis"
    derivation = (f"Lung window W1500/L-600 of the source CT slice with the lung outlines and the infection of "
                  f"{algorithm_name(engine)} {algorithm_version(engine)} burned in")[:1024]
    images = []
    for number, index in enumerate(indices, start=1):
        source = volume.datasets[index]
        pixels = render(volume.hu[index], lungs.labels[index], infection, index, banner)
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=generate_uid(),
            instance_number=number,
            manufacturer=MANUFACTURER,
            pixel_spacing=tuple(float(x) for x in volume.pixel_spacing),
            patient_orientation=patient_orientation(volume.orientation),
            transfer_syntax_uid="1.2.840.10008.1.2.1",
        )
        # every Patient, General Study and Patient Study attribute of the source (from_ref_dataset copies a few)
        sc.copy_patient_and_study_information(source)
        sc.SeriesDescription = KEY_IMAGES_SERIES_DESCRIPTION
        sc.ImageType = ["DERIVED", "SECONDARY"]
        sc.ConversionType = "WSD"  # rendered by a workstation (software), not captured from a video interface
        sc.BurnedInAnnotation = "YES"
        sc.ImageLaterality = "B"  # both lungs: answers General Series Laterality's paired-body-part condition
        sc.DerivationDescription = derivation
        sc.ImageComments = "DERIVED image with a burned-in overlay; not for primary diagnosis"
        sc.SourceImageSequence = [_source_reference(source)]
        images.append(sc)
    return images
