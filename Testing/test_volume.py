"""r1seg_core.volume: reading real CTs, validating them, and writing label maps Slicer can load."""
import hashlib
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from r1seg_core import sample_ct_path
from r1seg_core import volume as volume_module
from r1seg_core.errors import InvalidInputError
from r1seg_core.volume import (
    Volume,
    read_volume,
    validate_ct,
    validate_geometry,
    write_labelmap,
)

REAL_CTS = [
    "totalseg_example/example_ct.nii.gz",
    "totalseg_example/example_ct_sm.nii.gz",
    "totalseg_example/example_ct_dicom",
    "totalseg_aorta_report/ct_cropped.nii.gz",
    "totalseg_pulmonary_report/ct_cropped.nii.gz",
    "pyradiomics_lung/lung1_image.nrrd",
    "pyradiomics_lung/lung2_image.nrrd",
    "ibsi/STS_001/CT_image.nii.gz",
    "ibsi/STS_002/CT_image.nii.gz",
    "ibsi/STS_003/CT_image.nii.gz",
    "dcmqi_ct3slice/ct-3slice",
]
LABELMAP_SUFFIXES = [".nii.gz", ".nii", ".nrrd", ".mha", ".seg.nrrd"]


@pytest.fixture(scope="module")
def sample_ct() -> Volume:
    return read_volume(sample_ct_path())


@pytest.fixture(scope="module")
def oblique_ct(sample_ct) -> Volume:
    """The sample CT turned 20 degrees about z and 10 about x: a geometry no file format can fake."""
    direction = _rotation(20, 10) @ sample_ct.direction
    return Volume(sample_ct.array, sample_ct.spacing, sample_ct.origin, direction, "oblique")


def _rotation(degrees_about_z: float, degrees_about_x: float) -> np.ndarray:
    a, b = np.deg2rad(degrees_about_z), np.deg2rad(degrees_about_x)
    about_z = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    about_x = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return about_x @ about_z


def _two_organ_labels(reference: Volume) -> np.ndarray:
    labels = np.zeros(reference.shape, np.uint8)
    labels[10:20, 30:40, 50:60] = 5
    labels[50:52, 5:8, 9:12] = 2
    return labels


# --- reading -------------------------------------------------------------------------------------


def test_sample_ct_is_a_byte_exact_copy_of_the_totalsegmentator_example(shared_ct):
    def digest(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()

    assert digest(sample_ct_path()) == digest(shared_ct / "totalseg_example" / "example_ct.nii.gz")
    assert "0e65a448d557382b1e925276212b3bec7f5aff83" in (sample_ct_path().parent / "README.md").read_text()


def test_nifti_keeps_its_integer_type_and_itk_geometry(sample_ct):
    image = sitk.ReadImage(str(sample_ct_path()))
    assert sample_ct.array.dtype == np.int32
    assert sample_ct.shape == (112, 101, 122)
    assert sample_ct.name == "sample_ct"
    assert sample_ct.spacing == image.GetSpacing()
    assert sample_ct.origin == image.GetOrigin()
    np.testing.assert_array_equal(sample_ct.direction, np.diag([-1.0, -1.0, 1.0]))
    np.testing.assert_array_equal(sample_ct.array, sitk.GetArrayFromImage(image))


def test_dicom_series_with_empty_uids_and_no_extensions(shared_ct):
    ct = read_volume(shared_ct / "totalseg_example" / "example_ct_dicom")
    assert ct.shape == (20, 512, 512)
    assert ct.array.dtype == np.int16
    assert ct.spacing == pytest.approx((0.9765625, 0.9765625, 2.0))
    assert ct.origin == pytest.approx((-249.51171875, -437.51171875, -804.5))
    np.testing.assert_array_equal(ct.direction, np.eye(3))
    assert (ct.array.min(), ct.array.max()) == (-1024, 1839)


def test_a_folder_with_two_series_gives_the_largest(shared_ct, tmp_path):
    for source in [shared_ct / "totalseg_example" / "example_ct_dicom", shared_ct / "dcmqi_ct3slice" / "ct-3slice"]:
        for file in source.iterdir():
            shutil.copy(file, tmp_path / file.name)
    assert read_volume(tmp_path).shape == (20, 512, 512)


def test_three_slice_ct_with_padding_is_valid(shared_ct):
    ct = read_volume(shared_ct / "dcmqi_ct3slice" / "ct-3slice")
    assert ct.shape == (3, 512, 512)
    assert ct.array.min() == -3024
    validate_ct(ct)


@pytest.mark.parametrize("relative_path", REAL_CTS)
def test_every_real_ct_passes_validation(shared_ct, relative_path):
    ct = read_volume(shared_ct / relative_path)
    validate_ct(ct)
    assert ct.array.dtype in (np.int16, np.int32, np.float32)


def test_reading_problems_name_the_path(shared_ct, tmp_path):
    empty_folder = tmp_path / "empty"
    empty_folder.mkdir()
    not_an_image = tmp_path / "notes.nii.gz"
    not_an_image.write_text("not an image")
    whole = (shared_ct / "totalseg_example" / "example_ct_sm.nii.gz").read_bytes()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(whole[: len(whole) * 2 // 3])   # ITK alone would read it and zero-fill the rest
    for path, expected in [
        (tmp_path / "missing.nii.gz", "no such file"),
        (truncated, "truncated or corrupt"),
        (not_an_image, "cannot read"),
        (empty_folder, "no DICOM series"),
        (shared_ct / "README.md", "cannot read"),
    ]:
        with pytest.raises(InvalidInputError, match=expected) as caught:
            read_volume(path)
        assert str(path) in str(caught.value)


@pytest.mark.parametrize(
    "image, expected",
    [
        (sitk.Image([8, 8], sitk.sitkInt16), "2D image"),
        (sitk.Image([8, 8, 4, 3], sitk.sitkInt16), "4D image"),
        (sitk.Image([8, 8, 4], sitk.sitkVectorUInt8, 3), "3 values per voxel"),
    ],
    ids=["2d", "4d", "rgb"],
)
def test_files_that_are_not_3d_scalar_images_are_refused(tmp_path, image, expected):
    path = tmp_path / "image.nrrd"
    sitk.WriteImage(image, str(path))
    with pytest.raises(InvalidInputError, match=expected) as caught:
        read_volume(path)
    assert str(path) in str(caught.value)


# --- the Volume type -----------------------------------------------------------------------------


def test_sitk_round_trip_and_properties(oblique_ct):
    back = Volume.from_sitk(oblique_ct.to_sitk(), name="again")
    np.testing.assert_array_equal(back.array, oblique_ct.array)
    assert back.spacing == oblique_ct.spacing and back.origin == oblique_ct.origin
    np.testing.assert_allclose(back.direction, oblique_ct.direction, atol=1e-12)
    assert oblique_ct.voxel_volume_ml == pytest.approx(0.027)
    assert oblique_ct.shape == (112, 101, 122)


def test_with_array_keeps_geometry_and_checks_shape(sample_ct):
    mask = sample_ct.with_array(sample_ct.array > 0)
    assert mask.origin == sample_ct.origin and mask.name == sample_ct.name
    assert mask.to_sitk().GetPixelID() == sitk.sitkUInt8  # SimpleITK has no bool pixels
    with pytest.raises(InvalidInputError, match="shape"):
        sample_ct.with_array(np.zeros((3, 3, 3)))


def test_big_endian_voxels_become_native_and_reach_simpleitk(sample_ct):
    # Some NRRD readers hand over big-endian arrays, which neither SimpleITK nor torch accept.
    big_endian = sample_ct.array.astype(sample_ct.array.dtype.newbyteorder(">"))
    volume = Volume(big_endian, sample_ct.spacing, sample_ct.origin, sample_ct.direction)
    assert volume.array.dtype.isnative
    np.testing.assert_array_equal(sitk.GetArrayFromImage(volume.to_sitk()), sample_ct.array)


def test_geometry_from_slicer_accepts_flat_direction_and_returns_plain_values():
    array = np.zeros((2, 3, 4), np.int16)
    spacing, origin, direction = validate_geometry(array, np.array([1, 1, 2]), [0, 0, 0], range(9))
    assert spacing == (1.0, 1.0, 2.0) and type(spacing[0]) is float
    assert origin == (0.0, 0.0, 0.0)
    assert direction.shape == (3, 3) and not direction.flags.writeable


@pytest.mark.parametrize(
    "array, spacing, origin, direction, expected",
    [
        ([[[0]]], (1, 1, 1), (0, 0, 0), np.eye(3), "numpy array"),
        (np.zeros((4, 4)), (1, 1, 1), (0, 0, 0), np.eye(3), "3D"),
        (np.zeros((2, 4, 4, 3)), (1, 1, 1), (0, 0, 0), np.eye(3), "3D"),
        (np.zeros((0, 4, 4)), (1, 1, 1), (0, 0, 0), np.eye(3), "empty"),
        (np.zeros((2, 4, 4), complex), (1, 1, 1), (0, 0, 0), np.eye(3), "integer or floating"),
        (np.zeros((2, 4, 4)), (1, 1), (0, 0, 0), np.eye(3), "spacing"),
        (np.zeros((2, 4, 4)), (1, -1, 1), (0, 0, 0), np.eye(3), "positive"),
        (np.zeros((2, 4, 4)), (1, 1, 1), (0, np.nan, 0), np.eye(3), "origin"),
        (np.zeros((2, 4, 4)), (1, 1, 1), (0, 0, 0), np.eye(2), "direction"),
        (np.zeros((2, 4, 4)), (1, 1, 1), (0, 0, 0), "identity", "direction"),
    ],
)
def test_volume_refuses_malformed_geometry(array, spacing, origin, direction, expected):
    with pytest.raises(InvalidInputError, match=expected):
        Volume(array, spacing, origin, direction)


# --- validate_ct ---------------------------------------------------------------------------------


def _nan_voxel(ct):
    array = ct.array.astype(np.float32)
    array[5, 5, 5] = np.nan
    return ct.with_array(array)


def _inf_voxel(ct):
    array = ct.array.astype(np.float32)
    array[5, 5, 5] = np.inf
    return ct.with_array(array)


def _with_geometry(ct, **changes):
    values = {"array": ct.array, "spacing": ct.spacing, "origin": ct.origin, "direction": ct.direction, "name": ct.name}
    return Volume(**{**values, **changes})


@pytest.mark.parametrize(
    "make_bad, expected",
    [
        (_nan_voxel, "NaN or infinite"),
        (_inf_voxel, "NaN or infinite"),
        (lambda ct: ct.with_array(np.full(ct.shape, 40, np.int16)), "same value"),
        (lambda ct: _with_geometry(ct, spacing=(0.05, 0.05, 3.0)), "spacing"),
        (lambda ct: _with_geometry(ct, spacing=(1.0, 1.0, 12.0)), "spacing"),
        (lambda ct: _with_geometry(ct, direction=[[1, 0.3, 0], [0, 1, 0], [0, 0, 1]]), "not orthonormal"),
        (lambda ct: _with_geometry(ct, array=ct.array[40:41]), "single voxel"),
        (lambda ct: ct.with_array((ct.array - ct.array.min()) / np.ptp(ct.array)), "normalised"),
        (lambda ct: ct.with_array(np.clip(ct.array / 1000.0, -1, 1)), "normalised"),
        (lambda ct: ct.with_array(np.minimum(ct.array, 0) - 5), "below 0 HU"),
        (lambda ct: ct.with_array(((ct.array + 1024) // 16).clip(0, 255).astype(np.uint8)), r"\[0, 255\]"),
    ],
    ids=["nan", "inf", "constant", "too-fine", "too-coarse", "sheared", "one-slice", "unit", "symmetric-unit",
         "negative", "8-bit"],
)
def test_validate_ct_refuses_what_cannot_be_a_ct(sample_ct, make_bad, expected):
    with pytest.raises(InvalidInputError, match=expected) as caught:
        validate_ct(make_bad(sample_ct))
    assert str(caught.value).startswith("sample_ct: ")


def test_validate_ct_accepts_oblique_and_custom_spacing_limits(oblique_ct):
    validate_ct(oblique_ct)
    with pytest.raises(InvalidInputError, match="spacing"):
        validate_ct(oblique_ct, max_spacing=2.0)


# --- write_labelmap ------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", LABELMAP_SUFFIXES)
def test_labelmap_round_trips_voxels_and_oblique_geometry(oblique_ct, tmp_path, suffix):
    labels = _two_organ_labels(oblique_ct)
    path = write_labelmap(tmp_path / f"organs{suffix}", labels, oblique_ct, {5: "liver", 2: "spleen"})
    assert path == tmp_path / f"organs{suffix}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary left behind
    image = sitk.ReadImage(str(path))
    assert image.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), labels)
    np.testing.assert_allclose(image.GetSpacing(), oblique_ct.spacing, rtol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), oblique_ct.origin, atol=1e-4)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), oblique_ct.direction, atol=1e-6)


def test_seg_nrrd_header_has_slicer_segment_keys(sample_ct, tmp_path):
    path = write_labelmap(
        tmp_path / "organs.seg.nrrd", _two_organ_labels(sample_ct), sample_ct, {5: "liver", 3: "gall\nbladder"},
        colors={5: (255, 0, 51)},
    )
    header = path.read_bytes().split(b"\n\n", 1)[0].decode()
    keys = dict(line.split(":=", 1) for line in header.splitlines() if ":=" in line)
    assert keys["Segmentation_MasterRepresentation"] == "Binary labelmap"
    assert keys["Segmentation_ReferenceImageExtentOffset"] == "0 0 0"
    # One segment per named or present value, in value order; unnamed values get a default name.
    assert [keys[f"Segment{n}_Name"] for n in range(3)] == ["label 2", "gall bladder", "liver"]
    assert [keys[f"Segment{n}_LabelValue"] for n in range(3)] == ["2", "3", "5"]
    assert keys["Segment2_ID"] == "Segment_5" and keys["Segment2_Layer"] == "0"
    assert keys["Segment2_Color"] == "1 0 0.2"
    assert keys["Segment2_Extent"] == "50 59 30 39 10 19"  # i0 i1 j0 j1 k0 k1, inclusive
    assert keys["Segment1_Extent"] == "0 -1 0 -1 0 -1"  # named but empty


def test_seg_nrrd_loads_as_named_segments_in_slicer(oblique_ct, tmp_path):
    slicer = pytest.importorskip("slicer")
    vtk = pytest.importorskip("vtk")
    from vtk.util.numpy_support import vtk_to_numpy

    labels = _two_organ_labels(oblique_ct)
    path = write_labelmap(tmp_path / "organs.seg.nrrd", labels, oblique_ct, {5: "liver", 2: "spleen"}, {5: (255, 0, 0)})

    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    segmentation = node.GetSegmentation()
    liver = segmentation.GetSegment("Segment_5")
    assert (liver.GetName(), liver.GetLabelValue(), liver.GetColor()) == ("liver", 5, (1.0, 0.0, 0.0))
    assert segmentation.GetSegment("Segment_2").GetName() == "spleen"

    # Slicer's voxel-to-world matrix is ours (LPS) with the first two rows negated (RAS).
    labelmap = liver.GetRepresentation("Binary labelmap")
    image_to_world = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(image_to_world)
    image_to_ras = np.array([[image_to_world.GetElement(row, col) for col in range(4)] for row in range(3)])
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(image_to_ras[:, 3], lps_to_ras @ oblique_ct.origin, atol=1e-4)
    np.testing.assert_allclose(image_to_ras[:, :3], lps_to_ras @ oblique_ct.direction * oblique_ct.spacing, atol=1e-5)
    voxels = vtk_to_numpy(labelmap.GetPointData().GetScalars())
    assert np.count_nonzero(voxels == 5) == np.count_nonzero(labels == 5)


def test_nifti_carries_names_in_its_description(sample_ct, tmp_path):
    labels = _two_organ_labels(sample_ct)
    path = write_labelmap(tmp_path / "organs.nii.gz", labels, sample_ct, {5: "liver", 2: "spleen"})
    assert sitk.ReadImage(str(path)).GetMetaData("descrip") == "2=spleen;5=liver"
    many = {value: f"structure number {value}" for value in range(1, 40)}
    path = write_labelmap(tmp_path / "many.nii", labels, sample_ct, many)
    description = sitk.ReadImage(str(path)).GetMetaData("descrip")
    assert description.startswith("1=structure number 1;2=") and len(description) <= 79
    assert description.split(";")[-1].startswith(tuple("0123456789"))  # only whole entries


def test_labelmap_refusals_name_the_file(sample_ct, tmp_path):
    labels = _two_organ_labels(sample_ct)
    cases = [
        (tmp_path / "a.nii.gz", labels[:-1], {}, "shape"),
        (tmp_path / "a.png", labels, {}, "unsupported"),
        (tmp_path / "a.nrrd", labels.astype(np.float32), {}, "integers"),
        (tmp_path / "a.nrrd", labels.astype(np.int16) * 100, {}, "0 … 255"),
        (tmp_path / "a.nrrd", labels, {0: "background"}, "1 … 255"),
        (tmp_path / "a.nrrd", labels, {5: " "}, "empty"),
        (tmp_path / "missing" / "a.nrrd", labels, {}, "does not exist"),
    ]
    for path, bad_labels, names, expected in cases:
        with pytest.raises(InvalidInputError, match=expected) as caught:
            write_labelmap(path, bad_labels, sample_ct, names)
        assert str(path) in str(caught.value)
    with pytest.raises(InvalidInputError, match="colour"):
        write_labelmap(tmp_path / "a.nrrd", labels, sample_ct, {5: "liver"}, {5: (300, 0, 0)})


def test_failed_write_leaves_the_previous_file_and_no_partial_one(sample_ct, tmp_path, monkeypatch):
    target = tmp_path / "organs.seg.nrrd"
    target.write_bytes(b"previous result")

    def write_half_then_fail(image, filename, useCompression=False):
        with open(filename, "wb") as partial:
            partial.write(b"NRRD0004\ntype: unsig")
        raise RuntimeError("Exception thrown in SimpleITK WriteImage: sitk::ERROR: disk full")

    monkeypatch.setattr(volume_module.sitk, "WriteImage", write_half_then_fail)
    with pytest.raises(InvalidInputError, match="disk full"):
        write_labelmap(target, _two_organ_labels(sample_ct), sample_ct, {5: "liver"})
    assert target.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
