"""Export as DICOM SEG (R1Seg3DSlicerLib/dicom_export.py, issue 22): when an answer can be exported and which segments
go, against a real MRML scene (PyPI slicer-core). Slicer's DICOM module and the Quantitative Reporting exporter are
not in slicer-core; the call into them is the thin Logic.exportDicomSeg.

The DICOM CT is the real 3-slice series of dcmqi (shared/data/ct/dcmqi_ct3slice): its SOP Instance UIDs are read
with pydicom, as Slicer's DICOM module sets them on the volume it loads."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "R1Seg3DSlicer"))

slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel")
pydicom = pytest.importorskip("pydicom")

from R1Seg3DSlicerLib import dicom_export, scene  # noqa: E402
from test_slicer_scene import LIVER_CODES  # noqa: E402

SERIES = "dcmqi_ct3slice/ct-3slice"


def box(shape, low, high):
    mask = np.zeros(shape, np.uint8)
    mask[tuple(slice(a, b) for a, b in zip(low, high))] = 1
    return mask


@pytest.fixture
def dicom_ct(shared_ct):
    """The series loaded as Slicer's DICOM module leaves it: UIDs on the node, the node under its patient and study."""
    headless = scene.create_headless_scene()
    files = sorted((shared_ct / SERIES).glob("*.dcm"))
    volume = headless.volumes_logic.AddArchetypeVolume(str(files[0]), "CT")
    assert volume is not None
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    volume.SetAttribute(dicom_export.INSTANCE_UIDS_ATTRIBUTE, " ".join(uids))
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(headless.scene)
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "patient")
    study = hierarchy.CreateStudyItem(patient, "study")
    hierarchy.CreateItem(study, volume)
    return headless, volume, study, dict(zip(uids, map(str, files)))


def tag(segment, name: str) -> str:
    import vtk

    value = vtk.mutable("")
    assert segment.GetTag(name, value), name
    return str(value)


def two_answers(volume):
    """Answer 1: a liver (with terminology) and an empty spleen; answer 2: a spine. Returns both changes."""
    shape = scene.volume_grid_shape(volume)
    liver = box(shape, (0, 100, 120), (3, 260, 300))
    first = scene.write_segments(volume, [scene.SegmentSpec("liver", liver, (200, 100, 80), LIVER_CODES),
                                          scene.SegmentSpec("spleen", np.zeros(shape, np.uint8), (120, 60, 60), None)])
    second = scene.write_segments(volume, [scene.SegmentSpec("spine", box(shape, (0, 300, 240), (3, 360, 280)),
                                                             (240, 240, 200), None)])
    return liver, first, second


def test_an_answer_about_a_dicom_ct_exports_its_non_empty_segments_in_the_study(dicom_ct):
    headless, volume, study, files = dicom_ct
    liver, first, second = two_answers(volume)
    source = headless.scene.GetNodeByID(first.segmentation_node_id)
    export = dicom_export.check_exportable(volume, source, first.segment_ids, files.get)
    assert export.segment_ids == first.segment_ids[:1]            # the empty spleen is left out, the spine is not asked
    assert export.instance_uids == tuple(files)

    node = dicom_export.build_export_segmentation(export, headless.scene, "R1Seg3D answer 1", "R1Seg3D default")
    copy = node.GetSegmentation()
    assert copy.GetNumberOfSegments() == 1
    segment = copy.GetNthSegment(0)
    assert segment.GetName() == "liver"
    assert np.array_equal(scene.segment_mask(node, copy.GetNthSegmentID(0), volume), liver)
    terminology = source.GetSegmentation().GetSegment(first.segment_ids[0]).GetTerminology()
    assert "10200004" in terminology and segment.GetTerminology() == terminology
    assert (tag(segment, dicom_export.ALGORITHM_TYPE_TAG), tag(segment, dicom_export.ALGORITHM_NAME_TAG)) == (
        "AUTOMATIC", "R1Seg3D default")   # what the DICOMSegmentationPlugin reads
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(headless.scene)
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == study
    assert node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) is volume
    assert source.GetSegmentation().GetNumberOfSegments() == 3     # the answers' segmentation is untouched


def refuse(volume, segmentation, segment_ids, file_for_instance=None) -> str:
    with pytest.raises(dicom_export.ExportRefused) as refused:
        dicom_export.check_exportable(volume, segmentation, segment_ids, file_for_instance)
    return str(refused.value)


def test_a_ct_opened_from_nifti_is_refused_with_what_to_do(shared_ct):
    headless = scene.create_headless_scene()
    volume = headless.volumes_logic.AddArchetypeVolume(str(shared_ct / "totalseg_example/example_ct_sm.nii.gz"), "CT")
    shape = scene.volume_grid_shape(volume)
    change = scene.write_segments(volume, [scene.SegmentSpec("liver", box(shape, (5, 30, 20), (20, 60, 50)),
                                                             (200, 100, 80), LIVER_CODES)])
    message = refuse(volume, headless.scene.GetNodeByID(change.segmentation_node_id), change.segment_ids)
    assert "was not loaded from DICOM" in message and dicom_export.LOAD_FROM_DICOM in message


@pytest.mark.parametrize("case, expected", [
    ("empty UIDs", "was not loaded from DICOM"),            # the held-out patient's series: its UIDs are empty
    ("not in a study", "is not in a DICOM study"),
    ("files gone", "1 of the 3 DICOM files"),
    ("nothing found", "has no segment to export"),
])
def test_each_reason_an_export_cannot_be_made_is_said(dicom_ct, case, expected):
    headless, volume, study, files = dicom_ct
    liver, first, second = two_answers(volume)
    source = headless.scene.GetNodeByID(first.segmentation_node_id)
    segment_ids, file_for_instance = first.segment_ids, files.get
    if case == "empty UIDs":
        volume.SetAttribute(dicom_export.INSTANCE_UIDS_ATTRIBUTE, "  ")
    elif case == "not in a study":
        hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(headless.scene)
        hierarchy.SetItemParent(hierarchy.GetItemByDataNode(volume), hierarchy.GetSceneItemID())
    elif case == "files gone":
        gone = next(iter(files))
        file_for_instance = lambda uid: "" if uid == gone else files[uid]  # noqa: E731
    else:
        source.GetSegmentation().RemoveSegment(first.segment_ids[0])   # the liver deleted, the empty spleen left
    assert expected in refuse(volume, source, segment_ids, file_for_instance)
