"""An answer as a DICOM Segmentation (`r1seg ask DICOM_DIR "question" -o answer.dcm`), written with highdicom.

The SEG references the CT series the answer was computed on (each frame names its source slice), so PACS, OHIF
and Slicer overlay it on that series. Each found target is one BINARY segment with the vocabulary's SNOMED CT
category and type, its laterality as a type modifier, its display colour, and the algorithm (R1Seg3D, version,
model) that made it. A target the answer calls absent gets no segment (an empty segment would be read as "found,
with no voxels"); it is named in the content description and in the answer text. When nothing was found, no file
is written and the command says so.

A SEG needs the source series' UIDs. A NIfTI/NRRD input has none, and a series whose UIDs are empty (some
anonymisers blank them) cannot be referenced: both are refused before the model runs, naming the outputs that
work instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InvalidInputError
from .files import write_atomically

SUFFIX = ".dcm"
REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "FrameOfReferenceUID")
# A structure the vocabulary does not know is still an anatomical structure (SCT 91723000).
UNKNOWN_TYPE = ("SCT", "91723000", "Anatomical structure")
ANATOMICAL_STRUCTURE = ("SCT", "123037004", "Anatomical Structure")
POSITION_TOLERANCE_MM = 0.01
OTHER_OUTPUTS = "write .seg.nrrd, .nrrd or .nii.gz instead"


def is_dicom_seg(output: str | None) -> bool:
    return bool(output) and str(output).lower().endswith(SUFFIX)


def prepare_dicom_seg(args) -> "SourceSeries | None":
    """For `r1seg ask`: the source series when `-o` names a .dcm file, else None."""
    if not is_dicom_seg(args.output):
        return None
    if getattr(args, "server", None):
        raise InvalidInputError(f"-o {args.output}: a DICOM SEG is written only when the model runs here (without "
                                f"--server); {OTHER_OUTPUTS}")
    return source_series(args.ct)


@dataclass(frozen=True)
class SourceSeries:
    folder: Path
    datasets: tuple   # pydicom datasets of the CT series, with pixel data


def source_series(ct: str | Path) -> SourceSeries:
    """The DICOM series a SEG will reference; refuses what cannot be referenced, before any model work."""
    import pydicom

    folder = Path(ct)
    if not folder.is_dir():
        raise InvalidInputError(f"{ct}: a DICOM SEG references the DICOM series it segments, and a NIfTI/NRRD file "
                                f"has none; give the DICOM series folder, or {OTHER_OUTPUTS}")
    datasets = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            dataset = pydicom.dcmread(path)
        except (pydicom.errors.InvalidDicomError, OSError):
            continue
        if "ImagePositionPatient" in dataset and "PixelData" in dataset:
            if "SpecificCharacterSet" in dataset and not dataset.SpecificCharacterSet:
                del dataset.SpecificCharacterSet   # empty means the default repertoire; highdicom refuses ''
            datasets.append(dataset)
    if not datasets:
        raise InvalidInputError(f"{folder}: no DICOM images found")
    empty = sorted({uid for d in datasets for uid in REQUIRED_UIDS if not str(d.get(uid, "") or "").strip()})
    if empty:
        raise InvalidInputError(f"{folder}: the series has empty {', '.join(empty)} (blanked by an anonymiser?), so a "
                                f"DICOM SEG could not reference it; {OTHER_OUTPUTS}, or give the images valid UIDs first")
    return SourceSeries(folder, tuple(datasets))


def _slices_in_volume_order(series: SourceSeries, volume) -> list:
    """The source dataset of each z slice of `volume`, matched by position (the volume may be one of several series)."""
    step = volume.direction @ np.array([0.0, 0.0, volume.spacing[2]])
    positions = np.array([[float(v) for v in d.ImagePositionPatient] for d in series.datasets])   # read once
    by_slice = []
    for z in range(volume.array.shape[0]):
        position = np.asarray(volume.origin) + z * step
        at_position = np.isclose(positions, position, atol=POSITION_TOLERANCE_MM).all(axis=1)
        match = [series.datasets[index] for index in np.flatnonzero(at_position)]
        if len(match) != 1 or (match[0].Rows, match[0].Columns) != volume.array.shape[1:]:
            raise InvalidInputError(f"{series.folder}: slice {z} of the CT read has {len(match)} DICOM images at its "
                                    "position; the folder mixes series or sizes, so put the one series in a folder of its own")
        by_slice.append(match[0])
    uids = {d.SeriesInstanceUID for d in by_slice}
    if len(uids) != 1:
        raise InvalidInputError(f"{series.folder}: the slices belong to {len(uids)} series; put one series per folder")
    return by_slice


def _coded(code) -> "object":
    from highdicom.sr import CodedConcept

    scheme, value, meaning = (code.scheme, code.value, code.meaning) if hasattr(code, "scheme") else code
    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def write_dicom_seg(result, volume, series: SourceSeries, path: str | Path, model_name: str) -> Path | None:
    """Write the found targets of `result` as a DICOM SEG over `series`; None (no file) when nothing was found."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from . import __version__
    from .vocabulary import load_vocabulary

    found = [t for t in result.targets if t.present]
    if not found:
        return None
    sources = _slices_in_volume_order(series, volume)
    vocabulary = load_vocabulary()
    algorithm = hd.AlgorithmIdentificationSequence(
        name="R1Seg3D", family=codes.cid7162.ArtificialIntelligence, version=__version__[:64], source=model_name[:64],
        parameters={"question": result.question[:1024], "model": model_name[:1024]})
    descriptions, modifiers = [], []
    for number, target in enumerate(found, start=1):
        structure = vocabulary.lookup(target.name)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=(structure.display_name if structure else target.name)[:64],
            segmented_property_category=_coded(structure.category if structure else ANATOMICAL_STRUCTURE),
            segmented_property_type=_coded(structure.type if structure else UNKNOWN_TYPE),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*structure.color) if structure else None))
        modifiers.append(structure.type_modifier if structure else None)
    pixels = np.stack([t.mask > 0 for t in found], axis=-1).astype(np.uint8)
    absent = [t.name for t in result.targets if not t.present]
    description = "R1Seg3D answer" + (f"; absent: {', '.join(absent)}" if absent else "")
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=900, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="R1Seg3D", manufacturer_model_name=model_name[:64],
        software_versions=__version__, device_serial_number="none", content_description=description[:64],
        content_label="R1SEG3D", series_description=f"R1Seg3D: {result.question}"[:64])
    for item, modifier in zip(seg.SegmentSequence, modifiers):
        if modifier is not None:   # highdicom's SegmentDescription has no parameter for it
            item.SegmentedPropertyTypeModifierCodeSequence = [_coded(modifier)]
    return write_atomically(path, lambda stream: seg.save_as(stream, enforce_file_format=True))


def report_dicom_seg(result, volume, series: SourceSeries, path: str, predictor) -> str | None:
    """`r1seg ask`'s DICOM output: the SEG's path, or None after saying why no file was written."""
    import sys

    name = predictor.model.config.card.get("name") or "R1Seg3D model"
    if write_dicom_seg(result, volume, series, path, name) is None:
        print(f"no DICOM SEG written: no target was found ({', '.join(t.name for t in result.targets) or 'none named'}); "
              "a SEG without segments would not be valid", file=sys.stderr)
        return None
    return path
