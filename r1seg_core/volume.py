"""CT volumes in memory and on disk: one `Volume` type that the CLI, Slicer and training all share.

Conventions (the same as SimpleITK's and Slicer's `arrayFromVolume`):
  * `array` is indexed [k, j, i] = (z, y, x);
  * `spacing` and `origin` are in ITK order (x, y, z), in mm, with the origin in LPS;
  * `direction` column c is the LPS direction of voxel axis i, j, k (ITK's GetDirection as 3x3).
Slicer works in RAS: a caller coming from a MRML node flips the first two rows of its IJK-to-RAS
direction and the first two origin coordinates before building a `Volume`.
"""
from __future__ import annotations

import colorsys
import gzip
import os
import secrets
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import SimpleITK as sitk

from .errors import InvalidInputError


# Longest suffix first: ".seg.nrrd" must win over ".nrrd".
_LABELMAP_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")
_VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")

# NIfTI's descrip field holds 80 bytes including the terminating NUL.
_NIFTI_DESCRIPTION_LENGTH = 79

# NIfTI stores the direction as float32, so a matrix read back is orthonormal only to ~1e-6.
_ORTHONORMAL_TOLERANCE = 1e-3

# A human body is under 2 m long and a CT scanner's field of view under 80 cm across: a CT that spans more was
# written with a wrong spacing, and resampling it onto the model's grid would ask for gigabytes (a 512^3 CT read
# at 10 mm spacing: a 23.9 GB grid).
MAX_CT_LENGTH_MM = 2000.0
MAX_CT_WIDTH_MM = 800.0

# A CT in Hounsfield units spans at least fat (-100) to soft tissue (+40); data whose whole
# range is narrower than this has been normalised (to [0, 1], [-1, 1], z-scores...).
_MIN_HU_RANGE = 50.0


@dataclass(frozen=True, eq=False)  # eq=False: comparing voxel arrays with == is ambiguous in numpy
class Volume:
    """A 3D scalar image with its physical geometry (see the module docstring for the axes)."""

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    name: str = ""

    def __post_init__(self) -> None:
        spacing, origin, direction = validate_geometry(self.array, self.spacing, self.origin, self.direction)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "direction", direction)
        if not self.array.dtype.isnative:
            # Big-endian voxels (from some NRRD readers) are read by neither SimpleITK nor torch: one native copy.
            object.__setattr__(self, "array", self.array.astype(self.array.dtype.newbyteorder("=")))

    @classmethod
    def from_sitk(cls, image: sitk.Image, name: str = "") -> Volume:
        _require_scalar_3d(image)
        return cls(
            array=sitk.GetArrayFromImage(image),
            spacing=image.GetSpacing(),
            origin=image.GetOrigin(),
            direction=np.reshape(image.GetDirection(), (3, 3)),
            name=name,
        )

    def to_sitk(self) -> sitk.Image:
        # SimpleITK has no boolean pixel type; a mask becomes 0/1 bytes.
        array = self.array.astype(np.uint8) if self.array.dtype == bool else self.array
        image = sitk.GetImageFromArray(array, isVector=False)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(tuple(self.direction.ravel()))
        return image

    def with_array(self, array: np.ndarray) -> Volume:
        """The same geometry and name with other voxels (a mask, probabilities...)."""
        if np.shape(array) != self.shape:
            raise InvalidInputError(
                f"{_display_name(self)}: an array of shape {np.shape(array)} "
                f"cannot replace voxels of shape {self.shape}"
            )
        return replace(self, array=array)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(z, y, x) voxel counts."""
        return tuple(self.array.shape)

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0


def _display_name(volume: Volume) -> str:
    return volume.name or "volume"


def validate_geometry(array, spacing, origin, direction):
    """Cheap checks of a raw (array, spacing, origin, direction) as handed over by Slicer or a reader.

    Returns the geometry as plain values: (spacing tuple, origin tuple, read-only 3x3 float64
    direction); the direction may be given as 3x3 or as ITK's flat 9 values. Raises
    InvalidInputError for anything that is not a 3D scalar array with finite, positive geometry.
    The slower checks that decide whether the voxels are a usable CT live in `validate_ct`.
    """
    _check_voxel_array(array)
    return (
        _float_triple(spacing, "spacing", positive=True),
        _float_triple(origin, "origin"),
        _direction_matrix(direction),
    )


def _check_voxel_array(array) -> None:
    if not isinstance(array, np.ndarray):
        raise InvalidInputError(f"voxels must be a numpy array, not {type(array).__name__}")
    if array.ndim != 3:
        raise InvalidInputError(
            f"voxels must be a 3D (z, y, x) array, not {array.ndim}D with shape {array.shape}: "
            "2D slices, 4D series and colour/vector images are not CT volumes"
        )
    if array.size == 0:
        raise InvalidInputError(f"voxel array is empty (shape {array.shape})")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating) or array.dtype == bool):
        raise InvalidInputError(f"voxels must be integer or floating point, not {array.dtype}")


def _float_triple(values, what: str, *, positive: bool = False) -> tuple[float, float, float]:
    try:
        triple = tuple(float(value) for value in values)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{what} must be 3 numbers, got {values!r}") from None
    if len(triple) != 3 or not all(np.isfinite(triple)):
        raise InvalidInputError(f"{what} must be 3 finite numbers, got {values!r}")
    if positive and min(triple) <= 0:
        raise InvalidInputError(f"{what} must be positive, got {triple}")
    return triple


def _direction_matrix(direction) -> np.ndarray:
    try:
        matrix = np.array(direction, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidInputError(f"direction must be a 3x3 matrix, got {direction!r}") from None
    if matrix.shape not in ((3, 3), (9,)) or not np.all(np.isfinite(matrix)):
        raise InvalidInputError(f"direction must be a finite 3x3 matrix (or 9 values), got shape {matrix.shape}")
    matrix = matrix.reshape(3, 3)
    matrix.flags.writeable = False
    return matrix


def _require_scalar_3d(image: sitk.Image) -> None:
    dimension = image.GetDimension()
    if dimension == 2:
        raise InvalidInputError(
            "this is a 2D image (a single slice), not a CT volume; for DICOM, give the folder of the series"
        )
    if dimension != 3:
        raise InvalidInputError(f"this is a {dimension}D image (a time series or stacked volumes); give one 3D CT")
    components = image.GetNumberOfComponentsPerPixel()
    if components != 1:
        raise InvalidInputError(
            f"this image has {components} values per voxel (colour or vector data); a CT has one intensity per voxel"
        )


def read_volume(path) -> Volume:
    """Read a CT from NIfTI, NRRD, MetaImage or a DICOM series folder (the largest series in it).

    Voxels keep their stored integer type (int16/int32 HU); floating-point data become float32.
    Every problem raises InvalidInputError naming `path`.
    """
    path = Path(path)
    if not path.exists():
        raise InvalidInputError(f"{path}: no such file or folder")
    image = _read_dicom_series(path) if path.is_dir() else _read_image_file(path)
    try:
        return Volume.from_sitk(_float64_to_float32(image), name=_volume_name(path))
    except InvalidInputError as error:
        raise InvalidInputError(f"{path}: {error}") from None


def _check_gzip_is_whole(path: Path) -> None:
    """ITK reads a truncated .nii.gz without complaint and fills the missing voxels with zeros."""
    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(1 << 24):
                pass
    except (OSError, EOFError, zlib.error) as error:
        raise InvalidInputError(f"{path}: cannot read it, the file is truncated or corrupt ({error})") from None


def _read_image_file(path: Path) -> sitk.Image:
    if path.name.lower().endswith(".gz"):
        _check_gzip_is_whole(path)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise InvalidInputError(
            f"{path}: cannot read it as an image ({_itk_reason(error)}); "
            "expected NIfTI (.nii, .nii.gz), NRRD, MetaImage (.mha, .mhd) or a DICOM series folder"
        ) from None


def _read_dicom_series(folder: Path) -> sitk.Image:
    # GDCM groups files by SeriesInstanceUID; files whose UID is empty form one series with id "".
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise InvalidInputError(f"{folder}: no DICOM series in this folder")
    largest = max(
        (sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_id) for series_id in series_ids),
        key=len,
    )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(largest)
    try:
        return reader.Execute()
    except RuntimeError as error:
        raise InvalidInputError(f"{folder}: cannot read the DICOM series ({_itk_reason(error)})") from None


def _float64_to_float32(image: sitk.Image) -> sitk.Image:
    # HU never need double precision; halving the memory matters for large scans.
    if image.GetPixelID() == sitk.sitkFloat64:
        return sitk.Cast(image, sitk.sitkFloat32)
    return image


def _volume_name(path: Path) -> str:
    name = path.name
    for suffix in _VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _itk_reason(error: RuntimeError) -> str:
    """The one informative line of an ITK exception, without the C++ file and line noise."""
    message = str(error)
    if "ERROR:" in message:
        message = message.rsplit("ERROR:", 1)[1]
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"


def validate_ct(volume: Volume, *, min_spacing: float = 0.1, max_spacing: float = 10.0) -> None:
    """Raise InvalidInputError unless `volume` is a usable 3D CT in Hounsfield units.

    Rejected: an axis with a single voxel (a 2D slice; a 3-slice CT is fine), NaN or infinite
    voxels, constant intensity, a spacing outside [min_spacing, max_spacing] mm, an extent beyond
    a human body's (`check_physical_size`), a direction
    matrix that is not orthonormal, and intensities that cannot be HU. The HU rule is lenient
    on purpose (padding of -3024, float data clipped at -1000 and crops all pass); it rejects only
      * a maximum below 0 HU (no tissue at all),
      * a total range under 50 HU (normalised data: [0, 1], [-1, 1], z-scores),
      * all values within [0, 255] (an 8-bit or rescaled image: a CT in HU has fat or air below 0).
    """
    label = _display_name(volume)
    _check_extent(volume.shape, label)
    _check_spacing(volume.spacing, min_spacing, max_spacing, label)
    check_physical_size(volume.shape, volume.spacing, label)
    _check_orthonormal(volume.direction, label)
    _check_hounsfield(volume.array, label)


def _check_extent(shape_zyx, label: str) -> None:
    if min(shape_zyx) < 2:
        raise InvalidInputError(
            f"{label}: shape (z, y, x) = {shape_zyx} has an axis of a single voxel; this is a 2D image, "
            "not a CT volume (for DICOM, give the folder of the series)"
        )


def check_physical_size(shape_zyx, spacing_xyz, label: str) -> None:
    """Refuse a CT longer than MAX_CT_LENGTH_MM along its longest axis or wider than MAX_CT_WIDTH_MM along the
    others, before anything is resampled (the server checks an upload's header with this too)."""
    sizes_xyz = tuple(int(n) for n in shape_zyx[::-1])
    extents = [n * float(s) for n, s in zip(sizes_xyz, spacing_xyz)]
    longest, middle = sorted(extents, reverse=True)[:2]
    if longest > MAX_CT_LENGTH_MM or middle > MAX_CT_WIDTH_MM:
        raise InvalidInputError(
            f"{label}: {' x '.join(map(str, sizes_xyz))} voxels at a spacing of "
            f"{' x '.join(f'{float(s):g}' for s in spacing_xyz)} mm span {' x '.join(f'{e:.0f}' for e in extents)} mm; "
            f"a CT spans at most {MAX_CT_LENGTH_MM:.0f} mm along one axis and {MAX_CT_WIDTH_MM:.0f} mm along the "
            "others, so the file's spacing is probably wrong (check its header)"
        )


def _check_spacing(spacing_xyz, min_spacing: float, max_spacing: float, label: str) -> None:
    if not all(min_spacing <= value <= max_spacing for value in spacing_xyz):
        shown = " x ".join(f"{value:g}" for value in spacing_xyz)
        raise InvalidInputError(
            f"{label}: voxel spacing {shown} mm is outside [{min_spacing:g}, {max_spacing:g}] mm; "
            "the file's spacing is probably wrong (check its header)"
        )


def _check_orthonormal(direction: np.ndarray, label: str) -> None:
    if not np.allclose(direction.T @ direction, np.eye(3), atol=_ORTHONORMAL_TOLERANCE):
        raise InvalidInputError(
            f"{label}: direction matrix {np.round(direction, 4).tolist()} is not orthonormal (sheared or scaled axes)"
        )


def _check_hounsfield(array: np.ndarray, label: str) -> None:
    # min and max propagate NaN and reveal inf, so two reductions check finiteness without a mask copy.
    low, high = float(array.min()), float(array.max())
    if not (np.isfinite(low) and np.isfinite(high)):
        raise InvalidInputError(f"{label}: some voxels are NaN or infinite")
    if low == high:
        raise InvalidInputError(f"{label}: every voxel has the same value ({low:g}); the image is blank")
    reason = _why_not_hounsfield(low, high)
    if reason:
        raise InvalidInputError(
            f"{label}: intensities {low:g} … {high:g} do not look like a CT in Hounsfield units ({reason})"
        )


def _why_not_hounsfield(low: float, high: float) -> str:
    if high < 0:
        return "every voxel is below 0 HU, so there is no tissue"
    if high - low < _MIN_HU_RANGE:
        return "the range is too narrow; the data look normalised"
    if low >= 0 and high <= 255:
        return "all values lie in [0, 255], like an 8-bit image; a CT has air and fat below 0 HU"
    return ""


def resample_labels(labels: Volume, reference: Volume) -> np.ndarray:
    """Integer labels moved onto `reference`'s grid by physical position, never by array index.

    Nearest neighbour, so label values never blend; voxels of `reference` outside the labels' extent get 0.
    Returns a uint16 (z, y, x) array of `reference`'s shape.
    """
    return resample_labels_to_grid(labels, reference.shape, reference.spacing, reference.origin, reference.direction)


# The share of a label's foreground volume that may go missing when it is moved onto a CT's grid (partial voxels at
# the edges); more means the label belongs to another scan or crop.
LOST_FOREGROUND_TOLERANCE = 0.1


def lost_foreground(labels: Volume, resampled: np.ndarray, spacing_xyz) -> float:
    """The share of `labels`' foreground volume (mm3) missing from `resampled`, its copy on a grid of `spacing_xyz`."""
    before = np.count_nonzero(labels.array) * float(np.prod(labels.spacing))
    if before == 0:
        return 0.0
    after = np.count_nonzero(resampled) * float(np.prod(spacing_xyz))
    return max(0.0, 1.0 - after / before)


def resample_labels_to_grid(labels: Volume, shape_zyx, spacing_xyz, origin, direction) -> np.ndarray:
    """`resample_labels` onto a grid given by its geometry (z, y, x shape; x, y, z spacing; LPS origin, direction)."""
    grid = sitk.Image([int(n) for n in shape_zyx[::-1]], sitk.sitkUInt16)
    grid.SetSpacing([float(s) for s in spacing_xyz])
    grid.SetOrigin([float(o) for o in origin])
    grid.SetDirection([float(d) for d in np.asarray(direction).ravel()])
    source = labels.with_array(labels.array.astype(np.uint16, copy=False)).to_sitk()
    resampled = sitk.Resample(source, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16)
    return sitk.GetArrayFromImage(resampled)


class _Segment(NamedTuple):
    value: int
    name: str
    color: tuple[int, int, int]


def write_labelmap(
    path,
    labels: np.ndarray,
    reference: Volume,
    names: dict[int, str],
    colors: dict[int, tuple[int, int, int]] | None = None,
) -> Path:
    """Write a (z, y, x) label array on `reference`'s grid; the extension picks the format.

    .nii/.nii.gz, .nrrd, .mha, or .seg.nrrd (a 3D Slicer segmentation that loads as named
    segments). NRRD and MetaImage headers carry Slicer's Segment*/Segmentation_* keys; NIfTI
    carries "value=name" pairs in its 79-character description. Label values present in
    `labels` but missing from `names` are named "label <value>". The file appears atomically:
    it is written under a temporary name in the same folder and then renamed over `path`.
    """
    path = Path(path)
    suffix = _labelmap_suffix(path)
    labels = _checked_labels(labels, reference, path)
    if not path.parent.is_dir():
        raise InvalidInputError(f"{path}: the output folder {path.parent} does not exist")
    image = reference.with_array(labels).to_sitk()
    extents = _label_extents(image)
    segments = _segments(extents.keys(), names, colors or {}, path)
    metadata = _nifti_metadata(segments) if suffix.startswith(".nii") else _slicer_metadata(segments, extents)
    for key, value in metadata.items():
        image.SetMetaData(key, value)
    _write_atomically(image, path, suffix)
    return path


def _labelmap_suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in _LABELMAP_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise InvalidInputError(f"{path}: unsupported label map format; use one of {', '.join(_LABELMAP_SUFFIXES)}")


def _checked_labels(labels, reference: Volume, path: Path) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != reference.shape:
        raise InvalidInputError(
            f"{path}: labels have shape {labels.shape} but the reference volume has {reference.shape} (z, y, x)"
        )
    if labels.dtype == np.uint8:
        return labels
    if not (labels.dtype == bool or np.issubdtype(labels.dtype, np.integer)):
        raise InvalidInputError(f"{path}: labels must be integers, not {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise InvalidInputError(f"{path}: label values must lie in 0 … 255, got {labels.min()} … {labels.max()}")
    return labels.astype(np.uint8)


def _segments(present_values, names: dict, colors: dict, path: Path) -> list[_Segment]:
    for value in list(names) + list(colors):
        if not (isinstance(value, (int, np.integer)) and 1 <= value <= 255):
            raise InvalidInputError(f"{path}: segment label values must be integers in 1 … 255, got {value!r}")
    values = sorted(set(int(value) for value in names) | set(present_values))
    return [
        _Segment(
            value,
            _header_safe_name(names.get(value, f"label {value}"), path),
            _segment_color(value, colors, path),
        )
        for value in values
    ]


def _label_extents(image: sitk.Image) -> dict[int, str]:
    """Each present non-zero label's voxel bounding box as Slicer writes it: "i0 i1 j0 j1 k0 k1" (inclusive)."""
    statistics = sitk.LabelStatisticsImageFilter()
    statistics.Execute(image, image)
    return {
        int(value): " ".join(str(bound) for bound in statistics.GetBoundingBox(value))
        for value in statistics.GetLabels()
        if value != 0
    }


def _header_safe_name(name, path: Path) -> str:
    # Header values are single lines: newlines or tabs inside a name would corrupt the file.
    cleaned = " ".join(str(name).split())
    if not cleaned:
        raise InvalidInputError(f"{path}: segment names must not be empty")
    return cleaned


def _segment_color(value: int, colors: dict, path: Path) -> tuple[int, int, int]:
    if value not in colors:
        return _default_color(value)
    color = tuple(colors[value])
    if len(color) != 3 or not all(isinstance(c, (int, np.integer)) and 0 <= c <= 255 for c in color):
        raise InvalidInputError(f"{path}: the colour of label {value} must be 3 integers in 0 … 255, got {color!r}")
    return tuple(int(c) for c in color)


def _default_color(value: int) -> tuple[int, int, int]:
    # Golden-ratio hue steps keep neighbouring label values visually distinct.
    hue = (value * 0.618033988749895) % 1.0
    return tuple(round(channel * 255) for channel in colorsys.hsv_to_rgb(hue, 0.65, 0.9))


def _slicer_metadata(segments: list[_Segment], extents: dict[int, str]) -> dict[str, str]:
    """The header keys 3D Slicer writes for a one-layer segmentation, so Slicer reads names back."""
    metadata = {
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
    }
    for index, segment in enumerate(segments):
        key = f"Segment{index}_"
        metadata[key + "ID"] = f"Segment_{segment.value}"
        metadata[key + "Name"] = segment.name
        metadata[key + "NameAutoGenerated"] = "0"
        metadata[key + "Color"] = " ".join(f"{channel / 255:.6g}" for channel in segment.color)
        metadata[key + "ColorAutoGenerated"] = "0"
        metadata[key + "LabelValue"] = str(segment.value)
        metadata[key + "Layer"] = "0"
        metadata[key + "Extent"] = extents.get(segment.value, "0 -1 0 -1 0 -1")
    return metadata


def _nifti_metadata(segments: list[_Segment]) -> dict[str, str]:
    # ITK's NIfTI writer puts ITK_FileNotes into the header's descrip field, the only free text NIfTI has.
    description = ""
    for segment in segments:
        entry = f"{';' if description else ''}{segment.value}={segment.name}"
        if len(description) + len(entry) > _NIFTI_DESCRIPTION_LENGTH:
            break
        description += entry
    return {"ITK_FileNotes": description}


def _write_atomically(image: sitk.Image, path: Path, suffix: str) -> None:
    # Same folder (so the rename is atomic) and same suffix (SimpleITK picks the writer by it).
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial{suffix}")
    try:
        sitk.WriteImage(image, str(temporary), useCompression=True)
        os.replace(temporary, path)
    except RuntimeError as error:
        raise InvalidInputError(f"{path}: cannot write the label map ({_itk_reason(error)})") from None
    except OSError as error:
        raise InvalidInputError(f"{path}: cannot write the label map ({error.strerror})") from None
    finally:
        temporary.unlink(missing_ok=True)


