"""R1Seg3DSlicerLib.scene and .engine against a real MRML scene (PyPI slicer-core, no Qt, no Slicer app)."""
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "R1Seg3DSlicer"))

slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel")
vtk = pytest.importorskip("vtk")

from R1Seg3DSlicerLib import engine, scene  # noqa: E402

ABDOMEN_CT = "totalseg_example/example_ct.nii.gz"
ABDOMEN_LABELS = "totalseg_example/example_seg_fast_force_split.nii.gz"
TOTALSEG_LIVER, TOTALSEG_RIGHT_KIDNEY, TOTALSEG_LEFT_KIDNEY = 5, 2, 3
LUNG_CT = "pyradiomics_lung/lung2_image.nrrd"
LUNG_LABEL = "pyradiomics_lung/lung2_label.nrrd"

LIVER_CODES = scene.SegmentTerminology(
    category=scene.Code("SCT", "123037004", "Anatomical Structure"), type=scene.Code("SCT", "10200004", "Liver")
)
LEFT_KIDNEY_CODES = scene.SegmentTerminology(
    category=scene.Code("SCT", "123037004", "Anatomical Structure"),
    type=scene.Code("SCT", "64033007", "Kidney"),
    type_modifier=scene.Code("SCT", "7771000", "Left"),
)


@pytest.fixture
def headless():
    return scene.create_headless_scene()


@pytest.fixture(scope="module")
def abdomen_labels(shared_ct):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(shared_ct / ABDOMEN_LABELS)))


def load(headless, path):
    node = headless.volumes_logic.AddArchetypeVolume(str(path), Path(path).name.split(".")[0])
    assert node is not None, f"Slicer could not read {path}"
    return node


def rotation(axis, degrees):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    angle = np.deg2rad(degrees)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def oblique_volume(headless, shape=(14, 17, 20)):
    """Rotated about a skew axis, anisotropic, off-centre: every geometry term is non-trivial."""
    voxels = np.arange(np.prod(shape), dtype=np.int16).reshape(shape)
    return scene.add_volume_node(
        headless.scene, voxels, (0.7, 0.8, 2.5), (-12.5, 40.0, 101.0), rotation((1, 2, 3), 30), "oblique ct"
    )


def segment_names(segmentation_node):
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]


def ijk_to_ras(volume_node):
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


# ---- volume node <-> arrays -------------------------------------------------------------------


def test_real_ct_matches_itk_in_lps(headless, shared_ct):
    path = shared_ct / ABDOMEN_CT
    data = scene.volume_data_from_node(load(headless, path))
    image = sitk.ReadImage(str(path))
    assert np.array_equal(data.array, sitk.GetArrayFromImage(image))
    np.testing.assert_allclose(data.spacing, image.GetSpacing())
    np.testing.assert_allclose(data.origin, image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(data.direction, np.reshape(image.GetDirection(), (3, 3)), atol=1e-6)


def test_lps_nrrd_matches_itk(headless, shared_ct):
    path = shared_ct / LUNG_CT
    data = scene.volume_data_from_node(load(headless, path))
    image = sitk.ReadImage(str(path))
    assert data.array.shape == sitk.GetArrayFromImage(image).shape
    np.testing.assert_allclose(data.origin, image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(data.direction, np.reshape(image.GetDirection(), (3, 3)), atol=1e-6)


def test_arrays_to_node_and_back_keep_oblique_geometry(headless):
    direction = rotation((1, 2, 3), 30)
    voxels = np.random.default_rng(0).integers(-1000, 1000, size=(5, 6, 7)).astype(np.int16)
    node = scene.add_volume_node(headless.scene, voxels, (0.7, 0.8, 2.5), (1.0, -2.0, 3.0), direction, "v")
    data = scene.volume_data_from_node(node)
    assert np.array_equal(data.array, voxels)
    np.testing.assert_allclose(data.spacing, (0.7, 0.8, 2.5))
    np.testing.assert_allclose(data.origin, (1.0, -2.0, 3.0))
    np.testing.assert_allclose(data.direction, direction, atol=1e-12)
    # In Slicer's own terms: RAS = flip(LPS), and column i of IJKToRAS is spacing_i * direction_i.
    expected = np.diag([-1.0, -1.0, 1.0]) @ direction * np.array([0.7, 0.8, 2.5])
    np.testing.assert_allclose(ijk_to_ras(node)[:3, :3], expected, atol=1e-12)


def test_engine_volume_is_the_same_grid(headless, shared_ct):
    pytest.importorskip("r1seg_core.volume")
    node = load(headless, shared_ct / ABDOMEN_CT)
    volume = engine.R1SegSession().volume_from_node(node)
    image = sitk.ReadImage(str(shared_ct / ABDOMEN_CT))
    assert volume.array.shape == (112, 101, 122)
    np.testing.assert_allclose(volume.origin, image.GetOrigin(), atol=1e-4)


def test_vector_volume_is_refused(headless):
    node = headless.scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    image = vtk.vtkImageData()
    image.SetDimensions(4, 4, 4)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    node.SetAndObserveImageData(image)
    with pytest.raises(ValueError, match="single-channel"):
        scene.volume_data_from_node(node)


# ---- masks -> segments -------------------------------------------------------------------------


def test_real_ct_segments_round_trip(headless, shared_ct, abdomen_labels):
    volume_node = load(headless, shared_ct / ABDOMEN_CT)
    liver = (abdomen_labels == TOTALSEG_LIVER).astype(np.uint8)
    kidney = (abdomen_labels == TOTALSEG_LEFT_KIDNEY).astype(np.uint8)
    change = scene.write_segments(
        volume_node,
        [scene.SegmentSpec("liver", liver, (221, 130, 101), LIVER_CODES), scene.SegmentSpec("left kidney", kidney)],
    )
    segmentation_node = headless.scene.GetNodeByID(change.segmentation_node_id)
    assert change.created_segmentation and change.segment_names == ("liver", "left kidney")
    for segment_id, expected in zip(change.segment_ids, (liver, kidney)):
        assert np.array_equal(scene.segment_mask(segmentation_node, segment_id, volume_node), expected)
    # README sanity value for this scan: liver about 1126 mL at 3 mm isotropic.
    assert liver.sum() * 27 / 1000 == pytest.approx(1126, abs=1)

    liver_segment = segmentation_node.GetSegmentation().GetSegment(change.segment_ids[0])
    np.testing.assert_allclose(liver_segment.GetColor(), (221 / 255, 130 / 255, 101 / 255))
    assert "SCT^10200004^Liver" in liver_segment.GetTerminology()
    # Linked to its CT: reference geometry, and found again by the volume's reference.
    reference_role = segmentation_node.GetReferenceImageGeometryReferenceRole()
    assert segmentation_node.GetNodeReferenceID(reference_role) == volume_node.GetID()
    assert scene.find_segmentation(volume_node) is segmentation_node


def test_written_segments_survive_seg_nrrd(headless, shared_ct, abdomen_labels, tmp_path):
    volume_node = load(headless, shared_ct / ABDOMEN_CT)
    kidney = (abdomen_labels == TOTALSEG_RIGHT_KIDNEY).astype(np.uint8)
    change = scene.write_segments(volume_node, [scene.SegmentSpec("right kidney", kidney)])
    storage = headless.scene.GetNodeByID(change.segmentation_node_id).CreateDefaultStorageNode()
    storage.SetFileName(str(tmp_path / "answer.seg.nrrd"))
    assert storage.WriteData(headless.scene.GetNodeByID(change.segmentation_node_id))

    reread = headless.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    reader = reread.CreateDefaultStorageNode()
    reader.SetFileName(str(tmp_path / "answer.seg.nrrd"))
    assert reader.ReadData(reread)
    segment_id = reread.GetSegmentation().GetNthSegmentID(0)
    assert np.array_equal(scene.segment_mask(reread, segment_id, volume_node), kidney)


def test_oblique_anisotropic_volume_keeps_exact_geometry(headless):
    volume_node = oblique_volume(headless)
    mask = np.zeros((14, 17, 20), np.uint8)
    mask[2:5, 3:9, 11:19] = 1  # deliberately asymmetric
    mask[9, 14, 2] = 1
    change = scene.write_segments(volume_node, [scene.SegmentSpec("lesion", mask)])
    segmentation_node = headless.scene.GetNodeByID(change.segmentation_node_id)
    assert np.array_equal(scene.segment_mask(segmentation_node, change.segment_ids[0], volume_node), mask)

    stored = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(change.segment_ids[0], stored)
    image_to_world = vtk.vtkMatrix4x4()
    stored.GetImageToWorldMatrix(image_to_world)
    stored_matrix = np.array([[image_to_world.GetElement(r, c) for c in range(4)] for r in range(4)])
    np.testing.assert_allclose(stored_matrix, ijk_to_ras(volume_node), atol=1e-9)

    # The lone voxel must sit where IJKToRAS says, in world coordinates.
    i, j, k = 2, 14, 9
    lone_ras = ijk_to_ras(volume_node) @ np.array([i, j, k, 1.0])
    lone = np.zeros_like(mask)
    lone[k, j, i] = 1
    single = scene.write_segments(volume_node, [scene.SegmentSpec("voxel", lone)])
    np.testing.assert_allclose(segmentation_node.GetSegmentCenterRAS(single.segment_ids[0]), lone_ras[:3], atol=1e-6)


def test_repeated_target_gets_a_suffix_and_original_is_untouched(headless):
    volume_node = oblique_volume(headless)
    first = np.zeros((14, 17, 20), np.uint8)
    first[1:6, 1:6, 1:6] = 1
    second = np.zeros_like(first)
    second[4:12, 4:12, 4:12] = 1  # overlaps the first
    change_one = scene.write_segments(volume_node, [scene.SegmentSpec("liver", first)])
    change_two = scene.write_segments(volume_node, [scene.SegmentSpec("liver", second)])
    change_three = scene.write_segments(volume_node, [scene.SegmentSpec("Liver", second)])

    assert change_two.segmentation_node_id == change_one.segmentation_node_id
    assert not change_two.created_segmentation
    segmentation_node = headless.scene.GetNodeByID(change_one.segmentation_node_id)
    assert segment_names(segmentation_node) == ["liver", "liver (2)", "Liver (3)"]
    assert change_three.segment_names == ("Liver (3)",)
    assert np.array_equal(scene.segment_mask(segmentation_node, change_one.segment_ids[0], volume_node), first)
    assert np.array_equal(scene.segment_mask(segmentation_node, change_two.segment_ids[0], volume_node), second)
    assert headless.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1


@pytest.mark.parametrize("bad_shape", [(17, 14, 20), (20, 17, 14), (14, 17, 21), (14, 17)])
def test_wrong_mask_shape_is_rejected_and_scene_unchanged(headless, bad_shape):
    volume_node = oblique_volume(headless)
    good = np.zeros((14, 17, 20), np.uint8)
    good[3:6, 3:6, 3:6] = 1
    scene.write_segments(volume_node, [scene.SegmentSpec("liver", good)])
    segmentation_node = scene.find_segmentation(volume_node)
    nodes_before = headless.scene.GetNumberOfNodes()
    mtime_before = segmentation_node.GetSegmentation().GetMTime()

    bad = np.ones(bad_shape, np.uint8)
    with pytest.raises(ValueError, match=r"shape .* nothing was written"):
        scene.write_segments(volume_node, [scene.SegmentSpec("spleen", good), scene.SegmentSpec("kidney", bad)])
    assert headless.scene.GetNumberOfNodes() == nodes_before
    assert segment_names(segmentation_node) == ["liver"]
    assert segmentation_node.GetSegmentation().GetMTime() == mtime_before


def test_wrong_shape_on_fresh_volume_creates_no_segmentation(headless):
    volume_node = oblique_volume(headless)
    with pytest.raises(ValueError):
        scene.write_segments(volume_node, [scene.SegmentSpec("liver", np.ones((17, 14, 20), np.uint8))])
    assert headless.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    assert volume_node.GetNodeReference(scene.SEGMENTATION_REFERENCE_ROLE) is None


def test_segmentation_sits_in_the_volume_study_and_transform(headless):
    volume_node = oblique_volume(headless)
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(headless.scene)
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "patient")
    study = hierarchy.CreateStudyItem(patient, "study")
    hierarchy.CreateItem(study, volume_node)
    transform = headless.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    volume_node.SetAndObserveTransformNodeID(transform.GetID())

    mask = np.zeros((14, 17, 20), np.uint8)
    mask[5, 5, 5] = 1
    change = scene.write_segments(volume_node, [scene.SegmentSpec("node", mask)])
    segmentation_node = headless.scene.GetNodeByID(change.segmentation_node_id)
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(segmentation_node)) == study
    assert segmentation_node.GetTransformNodeID() == transform.GetID()


# ---- terminology --------------------------------------------------------------------------------


def test_terminology_string_is_what_slicer_parses(headless):
    text = scene.terminology_entry_string(LEFT_KIDNEY_CODES)
    entry = slicer.vtkSlicerTerminologyEntry()
    assert slicer.vtkSlicerTerminologiesModuleLogic().DeserializeTerminologyEntry(text, entry)
    assert entry.GetCategoryObject().GetCodeValue() == "123037004"
    assert entry.GetTypeObject().GetCodeMeaning() == "Kidney"
    assert entry.GetTypeModifierObject().GetCodeMeaning() == "Left"
    assert entry.GetTerminologyContextName() == scene.TERMINOLOGY_CONTEXT
    assert slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(entry) == text


class FakeVocabulary:
    """The vocabulary contract (case-insensitive, side-specific lookup) with two entries."""

    def __init__(self):
        kidney = scene.Code("SCT", "64033007", "Kidney")
        organ = scene.Code("SCT", "123037004", "Anatomical Structure")
        self.structures = {
            "kidney": SimpleNamespace(name="kidney", category=organ, type=kidney, type_modifier=None, color=(185, 102, 83)),
            "left kidney": SimpleNamespace(
                name="left kidney", category=organ, type=kidney, type_modifier=scene.Code("SCT", "7771000", "Left"),
                color=(185, 102, 83),
            ),
        }

    def lookup(self, text):
        return self.structures.get(text.strip().lower())


def test_segment_style_uses_vocabulary_codes_and_colour():
    vocabulary = FakeVocabulary()
    color, kidney = engine.segment_style("Kidney", vocabulary)
    assert color == (185, 102, 83) and kidney.type.meaning == "Kidney" and kidney.type_modifier is None
    _, left = engine.segment_style("left kidney", vocabulary)
    assert left.type_modifier == scene.Code("SCT", "7771000", "Left")
    assert engine.segment_style("the tumour thing", vocabulary) == (scene.FALLBACK_COLOR, None)


def test_real_vocabulary_terminology_is_case_insensitive_and_side_specific():
    from r1seg_core.vocabulary import load_vocabulary

    vocabulary = load_vocabulary()
    _, lower = engine.segment_style("left kidney", vocabulary)
    _, mixed = engine.segment_style("Left Kidney", vocabulary)
    _, right = engine.segment_style("right kidney", vocabulary)
    _, plain = engine.segment_style("Kidney", vocabulary)
    assert lower is not None and lower == mixed
    assert lower.type.meaning.lower() == "kidney" and lower.type_modifier.meaning.lower() == "left"
    assert right.type_modifier.meaning.lower() == "right"
    assert plain == engine.segment_style("kidney", vocabulary)[1]
    assert plain is None or plain.type_modifier is None or plain.type_modifier.meaning.lower() not in ("left", "right")


# ---- engine -> scene ------------------------------------------------------------------------------


def answer(*targets, text="Done.", notes=()):
    return SimpleNamespace(answer=text, present=any(t.voxel_count for t in targets), targets=list(targets),
                           timings={}, notes=list(notes), device="cpu", profile="project")


def target(name, mask):
    return SimpleNamespace(name=name, mask=mask, probability=None, volume_ml=float(mask.sum()) * 0.0014,
                           voxel_count=int(mask.sum()))


def test_write_answer_adds_non_empty_targets_only(headless):
    volume_node = oblique_volume(headless)
    kidney = np.zeros((14, 17, 20), np.uint8)
    kidney[2:6, 2:6, 2:6] = 1
    session = engine.R1SegSession(vocabulary_loader=FakeVocabulary)
    change, found = session.write_answer(
        volume_node, answer(target("left kidney", kidney), target("right kidney", np.zeros_like(kidney)))
    )
    assert [t.name for t in found] == ["left kidney", "right kidney"]
    assert found[0].in_scene and not found[1].in_scene
    segmentation_node = headless.scene.GetNodeByID(change.segmentation_node_id)
    segment = segmentation_node.GetSegmentation().GetSegment(found[0].segment_id)
    assert "SCT^7771000^Left" in segment.GetTerminology()

    _, again = session.write_answer(volume_node, answer(target("left kidney", kidney)))
    assert again[0].name == "left kidney (2)"


def test_nothing_found_writes_nothing(headless):
    volume_node = oblique_volume(headless)
    change, found = engine.R1SegSession(vocabulary_loader=FakeVocabulary).write_answer(volume_node, answer())
    assert change is None and found == []
    assert headless.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


# ---- provenance ----------------------------------------------------------------------------------


def box_mask(shape, low, high):
    mask = np.zeros(shape, np.uint8)
    mask[low:high, low:high, low:high] = 1
    return mask


def record_answer(session, volume_node, question, result, options, elapsed_s):
    record = engine.answer_record(volume_node, question, result, options, elapsed_s)
    return session.write_answer(volume_node, result, record)


def load_mrb(path, folder):
    """A fresh scene from a .mrb, the way trame-slicer reads one: unzip, then import its .mrml."""
    import zipfile

    with zipfile.ZipFile(path) as bundle:
        bundle.extractall(folder)
    (mrml,) = Path(folder).rglob("*.mrml")
    loaded = scene.create_headless_scene()
    loaded.scene.SetURL(str(mrml))
    assert loaded.scene.Import() == 1, f"Slicer could not import {mrml}"
    return loaded


def test_provenance_record_survives_saving_and_loading_the_scene(headless, tmp_path):
    import hashlib
    import json
    from datetime import datetime

    from R1Seg3DSlicerLib import provenance
    from r1seg_core import default_model_path

    volume_node = oblique_volume(headless)
    session = engine.R1SegSession(vocabulary_loader=FakeVocabulary)
    result = answer(target("liver", box_mask((14, 17, 20), 2, 9)), target("spleen", box_mask((14, 17, 20), 10, 13)),
                    text="The liver is [liver]; the spleen — «rate» — is [spleen].\nSecond line & <b>.")
    options = engine.AskOptions(device="cpu", dtype="bfloat16", overlap=0.3, loops=2, profile="project",
                                sliding_window=False)
    change, _ = record_answer(session, volume_node, "Segment the liver; and the spleen?", result, options, 12.3456)

    headless.scene.SetRootDirectory(str(tmp_path))
    assert headless.scene.WriteToMRB(str(tmp_path / "answers.mrb"))
    loaded = load_mrb(tmp_path / "answers.mrb", tmp_path / "unpacked")

    segmentation_node = loaded.scene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
    (record,) = provenance.records(segmentation_node)
    config = (default_model_path() / "config.json").read_bytes()
    assert record.question == "Segment the liver; and the spleen?"
    assert record.answer == result.answer
    assert record.model_folder == str(default_model_path())
    assert record.model_name == json.loads(config)["card"]["name"]
    assert record.config_sha256 == hashlib.sha256(config).hexdigest()
    assert (record.profile, record.overlap, record.loops, record.sliding_window) == ("project", 0.3, 2, False)
    assert (record.device, record.precision, record.elapsed_s, record.volume) == ("cpu", "bfloat16", 12.346, "oblique ct")
    assert abs((datetime.now().astimezone() - datetime.fromisoformat(record.date)).total_seconds()) < 60
    # The record names the segments, and the loaded segmentation still has them under those IDs and names.
    assert record.segment_ids == change.segment_ids and record.segment_names == ("liver", "spleen")
    segmentation = segmentation_node.GetSegmentation()
    assert [segmentation.GetSegment(i).GetName() for i in record.segment_ids] == ["liver", "spleen"]
    assert provenance.record_for_segment(segmentation_node, record.segment_ids[1]) == record


def test_each_answer_appends_its_own_record_and_never_touches_others(headless):
    from R1Seg3DSlicerLib import provenance

    volume_node = oblique_volume(headless)
    session = engine.R1SegSession(vocabulary_loader=FakeVocabulary)
    liver = target("liver", box_mask((14, 17, 20), 2, 9))
    first_change, _ = record_answer(session, volume_node, "segment the liver", answer(liver), engine.AskOptions(), 1.0)
    segmentation_node = headless.scene.GetNodeByID(first_change.segmentation_node_id)
    first_text = headless.scene.GetNodeByID(first_change.record_node_id).GetText()
    # A segment the user draws is nobody's answer.
    user_segment = segmentation_node.GetSegmentation().AddEmptySegment("", "my tumour")

    second_change, _ = record_answer(session, volume_node, "and again", answer(liver), engine.AskOptions(loops=0), 2.0)
    first, second = provenance.records(segmentation_node)
    assert headless.scene.GetNodeByID(first_change.record_node_id).GetText() == first_text
    assert (first.question, first.segment_names, first.loops) == ("segment the liver", ("liver",), None)
    assert (second.question, second.segment_names, second.loops) == ("and again", ("liver (2)",), 0)
    assert provenance.record_for_segment(segmentation_node, first_change.segment_ids[0]) == first
    assert provenance.record_for_segment(segmentation_node, user_segment) is None

    # Undoing the second answer takes its record with it; the first stays.
    scene.revert_change(headless.scene, second_change)
    assert provenance.records(segmentation_node) == [first]


# ---- undo, visibility, centring -----------------------------------------------------------------


def test_revert_change_takes_one_answer_back(headless):
    volume_node = oblique_volume(headless)
    mask = np.zeros((14, 17, 20), np.uint8)
    mask[3:7, 3:7, 3:7] = 1
    first = scene.write_segments(volume_node, [scene.SegmentSpec("liver", mask)])
    second = scene.write_segments(volume_node, [scene.SegmentSpec("spleen", mask), scene.SegmentSpec("liver", mask)])
    segmentation_node = scene.find_segmentation(volume_node)

    scene.revert_change(headless.scene, second)
    assert segment_names(segmentation_node) == ["liver"]
    scene.revert_change(headless.scene, first)
    assert headless.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    scene.revert_change(headless.scene, first)  # already gone: a no-op, not an error


def test_scene_undo_takes_an_answer_back_in_one_step(headless):
    volume_node = oblique_volume(headless)
    mask = np.zeros((14, 17, 20), np.uint8)
    mask[3:7, 3:7, 3:7] = 1
    headless.scene.SetUndoOn()
    scene.write_segments(volume_node, [scene.SegmentSpec("liver", mask)])
    scene.write_segments(volume_node, [scene.SegmentSpec("spleen", mask), scene.SegmentSpec("kidney", mask)])
    headless.scene.Undo()
    segmentation_node = headless.scene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
    assert segment_names(segmentation_node) == ["liver"]
    headless.scene.Undo()
    assert headless.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


def test_scene_undo_of_an_answer_into_a_segmentation_made_while_undo_was_off_keeps_earlier_answers(headless):
    """A segmentation written while scene undo was off (or loaded from a file) has UndoEnabled off; the next answer
    must still be one undo step that takes back only itself, not the whole node with the earlier answers."""
    volume_node = oblique_volume(headless)
    mask = np.zeros((14, 17, 20), np.uint8)
    mask[3:7, 3:7, 3:7] = 1
    scene.write_segments(volume_node, [scene.SegmentSpec("liver", mask)])
    segmentation_node = headless.scene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
    assert not segmentation_node.GetUndoEnabled()  # written with undo off: the flag was left alone
    headless.scene.SetUndoOn()
    scene.write_segments(volume_node, [scene.SegmentSpec("spleen", mask)])
    assert segment_names(segmentation_node) == ["liver", "spleen"]
    headless.scene.Undo()
    assert headless.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    assert segment_names(headless.scene.GetFirstNodeByClass("vtkMRMLSegmentationNode")) == ["liver"]


def test_visibility_and_centre_on_segment(headless):
    volume_node = oblique_volume(headless)
    mask = np.zeros((14, 17, 20), np.uint8)
    mask[6:9, 6:9, 6:9] = 1
    change = scene.write_segments(volume_node, [scene.SegmentSpec("liver", mask)])
    segmentation_node = headless.scene.GetNodeByID(change.segmentation_node_id)
    segment_id = change.segment_ids[0]

    assert scene.segment_visibility(segmentation_node, segment_id)
    scene.set_segment_visibility(segmentation_node, segment_id, False)
    assert not scene.segment_visibility(segmentation_node, segment_id)

    red = headless.scene.AddNewNodeByClass("vtkMRMLSliceNode")
    red.SetLayoutName("Red")
    red.SetOrientationToAxial()
    center = scene.center_views_on_segment(segmentation_node, segment_id)
    expected = ijk_to_ras(volume_node) @ np.array([7, 7, 7, 1.0])
    np.testing.assert_allclose(center, expected[:3], atol=1e-6)
    slice_to_ras = red.GetSliceToRAS()
    np.testing.assert_allclose([slice_to_ras.GetElement(r, 3) for r in range(3)], expected[:3], atol=1e-6)
    assert scene.center_views_on_segment(segmentation_node, "no such segment") is None
