"""Everything R1Seg3D does to an MRML scene, with nothing but slicer, vtk and numpy.

The engine never sees a node and this file never sees the engine: the logic reads a volume node
into plain arrays here, hands them to the engine, and brings the answer back as `SegmentSpec`s.
That keeps the scene code testable with the PyPI `slicer-core` wheel (no Qt, no application) and
lets the same calls run inside Slicer, from `batch.py`, and in pytest.

Coordinate conventions
    Slicer stores a volume's geometry as IJKToRAS. The engine's `Volume` uses ITK's LPS
    convention (origin in LPS mm, direction columns = LPS direction of the array axes i, j, k).
    LPS and RAS differ only in the signs of the first two world axes, so the conversion is the
    diagonal matrix diag(-1, -1, 1) applied on the left, in both directions.
    Arrays are indexed (k, j, i), exactly like `slicer.util.arrayFromVolume`.

Geometry is always the volume's *local* geometry (before any parent transform). The model sees
the image as it was acquired, and the segmentation is placed under the same parent transform, so
segments follow the volume wherever a registration moves it.

Undo
    Each question's changes are a `SceneChange`; `revert_change` removes exactly the segments (and
    the segmentation node, if that question created it) and works everywhere, headless included.
    When the scene's own undo is switched on (it is off by default in Slicer;
    `slicer.mrmlScene.SetUndoOn()`), `write_segments` also saves one scene undo state before
    touching anything and lets the segmentation take part in undo, so Ctrl+Z takes the whole
    answer back in one step. Headless, `vtkMRMLScene.Undo()` does the same (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer

from .terminology import CONTEXT_NAME, TERMINOLOGY_FILE

# Flips the first two world axes: RAS <-> LPS (its own inverse).
_RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0])

# The volume points at the segmentation that holds R1Seg3D's answers for it. A node reference
# (rather than a name or an attribute holding an ID) survives scene save/load and ID remapping.
SEGMENTATION_REFERENCE_ROLE = "R1Seg3DSegmentation"
SEGMENTATION_NAME_SUFFIX = " R1Seg3D"

# The segmentation context of Resources/R1Seg3D.term.json, which holds every code of the project vocabulary
# (half of them are in neither of Slicer's built-in contexts). The anatomic region stays empty, so the
# anatomic context is Slicer's default one.
TERMINOLOGY_CONTEXT = CONTEXT_NAME
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"

# A segment that the vocabulary does not know gets this colour (Slicer's own "unknown" grey is
# (127, 127, 127), which is too close to CT soft tissue to see).
FALLBACK_COLOR = (230, 159, 0)


@dataclass(frozen=True)
class VolumeData:
    """A volume node's voxels and geometry in the engine's conventions (see the module docstring)."""

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    name: str


@dataclass(frozen=True)
class Code:
    """One coded concept, e.g. Code("SCT", "64033007", "Kidney")."""

    scheme: str
    value: str
    meaning: str


@dataclass(frozen=True)
class SegmentTerminology:
    category: Code
    type: Code
    type_modifier: Code | None = None


@dataclass(frozen=True)
class SegmentSpec:
    """One segment to add: `mask` is (k, j, i) on the volume's grid, non-zero inside."""

    name: str
    mask: np.ndarray
    color: tuple[int, int, int] = FALLBACK_COLOR
    terminology: SegmentTerminology | None = None


@dataclass(frozen=True)
class SceneChange:
    """What one `write_segments` call added, so that it can be shown, revisited and reverted."""

    segmentation_node_id: str
    created_segmentation: bool
    segment_ids: tuple[str, ...]
    segment_names: tuple[str, ...] = field(default=())
    # The answer's provenance record (a text node, see provenance.py), taken back with the segments.
    record_node_id: str | None = None


# --------------------------------------------------------------------------------------------
# Headless scene (tests and batch.py under plain Python)
# --------------------------------------------------------------------------------------------


@dataclass
class HeadlessScene:
    """A scene with the module logics that Slicer's application would otherwise register.

    The logics are kept as attributes because the scene only holds weak references to them.
    """

    scene: object
    application_logic: object
    colors_logic: object
    volumes_logic: object
    segmentations_logic: object
    subject_hierarchy_logic: object


def create_headless_scene() -> HeadlessScene:
    """Build an MRML scene outside the Slicer application (slicer-core wheel, or `PythonSlicer`).

    Registering the Segmentations logic is what registers the segmentation converter rules;
    without them `AddEmptySegment` fails with "Unable to construct empty representation type".
    The Colors logic is registered first so that volume display nodes find their colour tables.
    """
    scene = slicer.vtkMRMLScene()
    application_logic = slicer.vtkSlicerApplicationLogic()
    application_logic.SetMRMLScene(scene)

    def register(name, logic):
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(application_logic)
        application_logic.SetModuleLogic(name, logic)
        return logic

    colors = register("Colors", slicer.vtkMRMLColorLogic())
    volumes = register("Volumes", slicer.vtkSlicerVolumesLogic())
    segmentations = register("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic())
    subject_hierarchy = register("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic())
    return HeadlessScene(scene, application_logic, colors, volumes, segmentations, subject_hierarchy)


def _ensure_segmentation_converter_rules() -> None:
    """Register the labelmap/surface converter rules when nothing has (a bare vtkMRMLScene).

    Inside Slicer the Segmentations module did it at startup, so this is a no-op there.
    """
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if factory.ConstructRepresentationObjectByRepresentation(
        slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    ):
        return
    factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
    factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


# --------------------------------------------------------------------------------------------
# Volume node <-> arrays
# --------------------------------------------------------------------------------------------


def _ijk_to_ras(volume_node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(row, col) for col in range(4)] for row in range(4)])


def _grid_dimensions(volume_node) -> tuple[int, int, int]:
    image = volume_node.GetImageData()
    if image is None:
        raise ValueError(f"Volume '{volume_node.GetName()}' has no voxels.")
    return image.GetDimensions()


def volume_grid_shape(volume_node) -> tuple[int, int, int]:
    """The (k, j, i) shape every mask written for this volume must have."""
    i, j, k = _grid_dimensions(volume_node)
    return (k, j, i)


def volume_data_from_node(volume_node) -> VolumeData:
    """Copy a scalar volume node's voxels and geometry out of the scene.

    The copy is deliberate: the engine runs on a worker thread and must not read VTK memory that
    the main thread may modify or free while it runs.
    """
    image = volume_node.GetImageData()
    if image is None:
        raise ValueError(f"Volume '{volume_node.GetName()}' has no voxels.")
    if image.GetNumberOfScalarComponents() != 1:
        raise ValueError(
            f"Volume '{volume_node.GetName()}' has {image.GetNumberOfScalarComponents()} components per voxel;"
            " R1Seg3D needs a single-channel CT volume."
        )
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    array = scalars.reshape(volume_grid_shape(volume_node)).copy()

    ijk_to_ras = _ijk_to_ras(volume_node)
    spacing = tuple(float(s) for s in volume_node.GetSpacing())
    direction_ras = ijk_to_ras[:3, :3] / np.asarray(spacing)[np.newaxis, :]
    return VolumeData(
        array=array,
        spacing=spacing,
        origin=tuple(float(v) for v in _RAS_FROM_LPS @ ijk_to_ras[:3, 3]),
        direction=_RAS_FROM_LPS @ direction_ras,
        name=volume_node.GetName() or "",
    )


def add_volume_node(scene, array: np.ndarray, spacing, origin, direction, name: str):
    """Add a scalar volume node from arrays in the engine's conventions (the inverse of
    `volume_data_from_node`)."""
    array = np.ascontiguousarray(array)
    if array.ndim != 3:
        raise ValueError(f"A volume needs a 3D (k, j, i) array, got shape {array.shape}.")
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    vtk_array = numpy_support.numpy_to_vtk(array.ravel(), deep=True)
    image.GetPointData().SetScalars(vtk_array)

    volume_node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    volume_node.SetSpacing(*[float(s) for s in spacing])
    volume_node.SetOrigin(*[float(v) for v in _RAS_FROM_LPS @ np.asarray(origin, dtype=float)])
    direction_ras = _RAS_FROM_LPS @ np.asarray(direction, dtype=float)
    volume_node.SetIJKToRASDirections([list(row) for row in direction_ras])
    volume_node.SetAndObserveImageData(image)
    volume_node.CreateDefaultDisplayNodes()
    return volume_node


def _oriented_image_on_volume_grid(volume_node, voxels: np.ndarray | None = None):
    """A vtkOrientedImageData with the volume's local geometry; zero-filled unless voxels are given."""
    i, j, k = _grid_dimensions(volume_node)
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(i, j, k)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    target = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    if voxels is None:
        target[:] = 0
    else:
        target[:] = (voxels.reshape(-1) != 0).astype(np.uint8)
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    image.SetImageToWorldMatrix(matrix)
    return image


# --------------------------------------------------------------------------------------------
# Terminology
# --------------------------------------------------------------------------------------------


def _coded(code: Code | None) -> str:
    if code is None:
        return "^^"
    return f"{code.scheme}^{code.value}^{code.meaning}"


def terminology_entry_string(terminology: SegmentTerminology) -> str:
    """The 7-part string Slicer 5.x keeps in a segment's terminology tag.

    context ~ category ~ type ~ type modifier ~ anatomic context ~ region ~ region modifier; every
    coded part is `scheme^value^meaning`. Anatomic region is left empty: the type already names
    the organ, and the DICOM convention puts laterality in the type modifier.
    """
    return "~".join(
        [
            TERMINOLOGY_CONTEXT,
            _coded(terminology.category),
            _coded(terminology.type),
            _coded(terminology.type_modifier),
            ANATOMIC_CONTEXT,
            _coded(None),
            _coded(None),
        ]
    )


class R1Seg3DTerminology:
    """The R1Seg3D context loaded into a Terminologies module logic, which turns a structure's codes into
    the entry string Slicer stores and the colour the context recommends."""

    def __init__(self, logic, path=TERMINOLOGY_FILE):
        if logic.LoadTerminologyFromFile(str(path)) != TERMINOLOGY_CONTEXT:
            raise RuntimeError(f"Slicer could not load the R1Seg3D terminology from {path}.")
        self.logic = logic

    def style(self, terminology: SegmentTerminology):
        """(entry string, colour) for these codes, or None when the R1Seg3D context does not hold them."""
        entry = slicer.vtkSlicerTerminologyEntry()
        if not (
            self.logic.DeserializeTerminologyEntry(terminology_entry_string(terminology), entry)
            and self.logic.UpdateEntryFromLoadedTerminologies(entry, [TERMINOLOGY_CONTEXT], [])
        ):
            return None
        # Parsing the string fills only the codes; a label shows that the context has the entry, with its colour.
        coded = entry.GetTypeModifierObject() if terminology.type_modifier is not None else entry.GetTypeObject()
        if not coded.GetSlicerLabel():
            return None
        color = tuple(int(channel) for channel in coded.GetRecommendedDisplayRGBValue())
        return self.logic.SerializeTerminologyEntry(entry), color


@lru_cache(maxsize=1)
def r1seg3d_terminology() -> R1Seg3DTerminology:
    """The R1Seg3D context, loaded once into Slicer's Terminologies logic (headless: a logic of its own)."""
    try:
        logic = slicer.modules.terminologies.logic()
    except AttributeError:  # no application (slicer-core, batch.py under plain Python)
        logic = slicer.vtkSlicerTerminologiesModuleLogic()
    return R1Seg3DTerminology(logic)


# --------------------------------------------------------------------------------------------
# Segmentation node for a volume
# --------------------------------------------------------------------------------------------


def find_segmentation(volume_node):
    """The segmentation that holds earlier answers for this volume, or None."""
    segmentation_node = volume_node.GetNodeReference(SEGMENTATION_REFERENCE_ROLE)
    if segmentation_node is None or segmentation_node.GetScene() is None:
        return None
    return segmentation_node


def subject_hierarchy(scene):
    return slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)


def place_in_same_study(node, reference_node) -> None:
    """Give `node` the subject-hierarchy parent (study) of `reference_node`."""
    hierarchy = subject_hierarchy(reference_node.GetScene())
    reference_item = hierarchy.GetItemByDataNode(reference_node)
    parent_item = hierarchy.GetItemParent(reference_item) if reference_item else hierarchy.GetSceneItemID()
    item = hierarchy.GetItemByDataNode(node)
    if item:
        hierarchy.SetItemParent(item, parent_item)
    else:
        # Inside Slicer a subject-hierarchy plugin creates the item when the node is added;
        # a headless scene has no plugins, so the item is created here.
        hierarchy.CreateItem(parent_item, node)


def _place_beside(segmentation_node, volume_node) -> None:
    """Same subject-hierarchy parent (study) and same parent transform as the volume."""
    place_in_same_study(segmentation_node, volume_node)
    segmentation_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())


def new_segmentation_beside(volume_node, name: str):
    """A new, empty segmentation node named after `name` (made unique), on the volume's grid, in its study and under
    its transform."""
    scene = volume_node.GetScene()
    segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(name))
    segmentation_node.CreateDefaultDisplayNodes()
    # Reference geometry: the segments live on the CT grid, and DICOM SEG export needs the link.
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    segmentation_node.SetNodeReferenceID(
        segmentation_node.GetReferenceImageGeometryReferenceRole(), volume_node.GetID()
    )
    _place_beside(segmentation_node, volume_node)
    return segmentation_node


def _create_segmentation(volume_node):
    """The answers' segmentation of a volume, which the volume then references."""
    segmentation_node = new_segmentation_beside(volume_node, volume_node.GetName() + SEGMENTATION_NAME_SUFFIX)
    volume_node.SetNodeReferenceID(SEGMENTATION_REFERENCE_ROLE, segmentation_node.GetID())
    return segmentation_node


def unique_segment_name(segmentation, name: str) -> str:
    """`name` if no segment has it (ignoring case), else "name (2)", "name (3)", ..."""
    taken = {
        segmentation.GetNthSegment(index).GetName().casefold()
        for index in range(segmentation.GetNumberOfSegments())
    }
    if name.casefold() not in taken:
        return name
    suffix = 2
    while f"{name} ({suffix})".casefold() in taken:
        suffix += 1
    return f"{name} ({suffix})"


def check_mask_shapes(volume_node, segments) -> None:
    """Raise ValueError unless every mask is exactly on the volume's (k, j, i) grid.

    A transposed mask with the same number of voxels would otherwise be imported silently and
    land in the wrong place, so the shape is compared, not the size.
    """
    expected = volume_grid_shape(volume_node)
    for spec in segments:
        shape = tuple(np.shape(spec.mask))
        if shape != expected:
            raise ValueError(
                f"Mask for '{spec.name}' has shape {shape}, but volume '{volume_node.GetName()}'"
                f" has (k, j, i) shape {expected}; nothing was written."
            )


def write_segments(volume_node, segments, segmentation_node=None) -> SceneChange:
    """Add one segment per spec to the volume's R1Seg3D segmentation; never overwrite.

    The segmentation is `segmentation_node` when given, else the one found for the volume, else a
    new one. A name that is already used gets a numbered suffix. All masks are checked before the
    scene is touched, so a wrong shape leaves the scene exactly as it was.
    """
    segments = list(segments)
    check_mask_shapes(volume_node, segments)
    _ensure_segmentation_converter_rules()
    scene = volume_node.GetScene()

    # Scene undo (when on) takes the whole answer back in one step. MRML saves and restores only nodes whose
    # UndoEnabled is on, both when the state is saved and when Undo runs (measured with slicer-core 5.13), so the
    # flag goes on before the save for an existing segmentation (else Undo would delete it, earlier answers
    # included) and stays on: turned off again, Undo would skip the node and leave this answer in place.
    if segmentation_node is None:
        segmentation_node = find_segmentation(volume_node)
    undo = bool(scene.GetUndoFlag())
    if undo and segmentation_node is not None:
        segmentation_node.SetUndoEnabled(True)
    if undo:
        scene.SaveStateForUndo()

    created = False
    if segmentation_node is None:
        segmentation_node = _create_segmentation(volume_node)  # created after the save: Undo removes it
        created = True
        if undo:
            segmentation_node.SetUndoEnabled(True)

    segmentation = segmentation_node.GetSegmentation()
    segment_ids = []
    segment_names = []
    for spec in segments:
        name = unique_segment_name(segmentation, spec.name)
        entry, color = None, spec.color
        if spec.terminology is not None:
            # Codes outside the R1Seg3D context (another model's vocabulary) are stored as given.
            entry, color = r1seg3d_terminology().style(spec.terminology) or (
                terminology_entry_string(spec.terminology), spec.color)
        segment_id = segmentation.AddEmptySegment("", name, [channel / 255.0 for channel in color])
        if not segment_id:
            raise RuntimeError(f"Slicer could not add segment '{name}'.")
        labelmap = _oriented_image_on_volume_grid(volume_node, spec.mask)
        if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            labelmap, segmentation_node, segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE
        ):
            segmentation.RemoveSegment(segment_id)
            raise RuntimeError(f"Slicer could not import the mask of segment '{name}'.")
        if entry is not None:
            segmentation.GetSegment(segment_id).SetTerminology(entry)
        segment_ids.append(segment_id)
        segment_names.append(name)

    return SceneChange(
        segmentation_node_id=segmentation_node.GetID(),
        created_segmentation=created,
        segment_ids=tuple(segment_ids),
        segment_names=tuple(segment_names),
    )


def revert_change(scene, change: SceneChange) -> None:
    """Take one answer back: remove its segments and its provenance record, and its segmentation if it made it
    and it is now empty. Segments the user already deleted are skipped."""
    record_node = scene.GetNodeByID(change.record_node_id) if change.record_node_id else None
    if record_node is not None:
        scene.RemoveNode(record_node)
    segmentation_node = scene.GetNodeByID(change.segmentation_node_id)
    if segmentation_node is None:
        return
    segmentation = segmentation_node.GetSegmentation()
    for segment_id in change.segment_ids:
        if segmentation.GetSegment(segment_id) is not None:
            segmentation.RemoveSegment(segment_id)
    if change.created_segmentation and segmentation.GetNumberOfSegments() == 0:
        scene.RemoveNode(segmentation_node)


# --------------------------------------------------------------------------------------------
# Reading back and viewing
# --------------------------------------------------------------------------------------------


def segment_mask(segmentation_node, segment_id: str, volume_node) -> np.ndarray:
    """A segment as a uint8 0/1 (k, j, i) array on the volume's grid."""
    stored = slicer.vtkOrientedImageData()
    if not segmentation_node.GetBinaryLabelmapRepresentation(segment_id, stored):
        raise ValueError(f"Segment '{segment_id}' has no binary labelmap.")
    reference = _oriented_image_on_volume_grid(volume_node)
    resampled = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        stored, reference, resampled
    )
    voxels = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars())
    return (voxels.reshape(volume_grid_shape(volume_node)) != 0).astype(np.uint8)


def set_segment_visibility(segmentation_node, segment_id: str, visible: bool) -> None:
    display_node = segmentation_node.GetDisplayNode()
    if display_node is None:
        segmentation_node.CreateDefaultDisplayNodes()
        display_node = segmentation_node.GetDisplayNode()
    display_node.SetSegmentVisibility(segment_id, bool(visible))


def segment_visibility(segmentation_node, segment_id: str) -> bool:
    display_node = segmentation_node.GetDisplayNode()
    return bool(display_node is not None and display_node.GetSegmentVisibility(segment_id))


def center_views_on_segment(segmentation_node, segment_id: str):
    """Move every slice view to the segment's centre; return that centre (world RAS) or None.

    `GetSegmentCenterRAS` returns a voxel inside the segment (not the bounding-box centre, which
    may fall outside a curved organ) and already applies the parent transform.
    """
    if segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
        return None
    center = segmentation_node.GetSegmentCenterRAS(segment_id)
    if center is None:
        return None
    center = tuple(float(v) for v in center)
    slicer.vtkMRMLSliceNode.JumpAllSlices(
        segmentation_node.GetScene(), *center, slicer.vtkMRMLSliceNode.CenteredJumpSlice
    )
    return center
