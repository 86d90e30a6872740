"""r1seg_core.preprocess: the canonical model grid is exact for oblique, flipped, anisotropic and DICOM inputs."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from r1seg_core.errors import InvalidInputError
from r1seg_core.preprocess import (
    ModelGrid,
    PreprocessConfig,
    _grid_image,
    _grid_sampling,
    _resample,
    _volume_sampling,
    canonical_grid,
    input_grid_tensor,
    is_axis_aligned,
    is_on_grid,
    model_space_tensor,
    resize_from_window,
    resize_to_window,
    scale_hounsfield,
    to_input_grid,
    to_model_grid,
    to_model_space,
)
from r1seg_core.volume import Volume, read_volume

LIVER = 5  # TotalSegmentator v2 "total" class id
DEFAULT = PreprocessConfig()


@pytest.fixture(scope="module")
def abdomen(shared_ct) -> tuple[Volume, np.ndarray]:
    """The 3 mm TotalSegmentator CT (RAS+ voxel axes) and its liver mask (1126 mL, median 46 HU)."""
    folder = shared_ct / "totalseg_example"
    ct = read_volume(folder / "example_ct.nii.gz")
    labels = read_volume(folder / "example_seg_fast_force_split.nii.gz")
    return ct, labels.array == LIVER


def _rotation(degrees_about_z: float, degrees_about_x: float) -> np.ndarray:
    a, b = np.deg2rad(degrees_about_z), np.deg2rad(degrees_about_x)
    about_z = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    about_x = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return about_x @ about_z


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _model_voxel_centres_lps(grid: ModelGrid, mask: np.ndarray) -> np.ndarray:
    k, j, i = np.nonzero(mask)
    return np.array(grid.origin) + np.stack([i, j, k], axis=1) * np.array(grid.spacing_zyx[::-1])


def _input_voxel_centres_lps(volume: Volume, mask: np.ndarray) -> np.ndarray:
    k, j, i = np.nonzero(mask)
    return np.array(volume.origin) + np.stack([i, j, k], axis=1) @ (volume.direction * np.array(volume.spacing)).T


def _check_round_trip(volume: Volume, mask: np.ndarray, cfg: PreprocessConfig, *, min_dice: float, expected_ml: float):
    """The mask follows its CT into model space and comes back onto the CT's own grid.

    Checks the model-space image (window, range), that mask and CT still overlay there (organ
    volume and position in mm), and the Dice of the round trip on the input grid.
    """
    image, grid = to_model_space(volume, cfg)
    assert image.dtype == np.float32 and image.shape == grid.shape_zyx
    assert image.min() >= 0.0 and image.max() <= 1.0
    model_mask = to_model_grid(mask, volume, grid) > 0.5
    assert np.count_nonzero(model_mask) * np.prod(grid.spacing_zyx) / 1000 == pytest.approx(expected_ml, rel=0.03)
    np.testing.assert_allclose(
        _model_voxel_centres_lps(grid, model_mask).mean(axis=0),
        _input_voxel_centres_lps(volume, mask).mean(axis=0),
        atol=0.5,  # mm
    )
    back = to_input_grid(model_mask.astype(np.float32), grid, volume)
    assert back.dtype == np.float32 and back.shape == volume.shape
    assert _dice(back > 0.5, mask) >= min_dice
    return image, grid, model_mask


# --- configuration -------------------------------------------------------------------------------


def test_config_survives_json_and_refuses_nonsense():
    cfg = PreprocessConfig(spacing_zyx=(3, 1.5, 1.5), hu_min=-200, hu_max=300)
    assert cfg.to_dict() == {"spacing_zyx": [3.0, 1.5, 1.5], "hu_min": -200.0, "hu_max": 300.0}
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg
    assert PreprocessConfig.from_dict({}) == DEFAULT == PreprocessConfig((2.0, 1.0, 1.0), -1000.0, 1000.0)
    for bad in [{"spacing": [1, 1, 1]}, {"spacing_zyx": [1, 1]}, {"spacing_zyx": [1, 0, 1]}, {"hu_max": -1000}]:
        with pytest.raises(InvalidInputError):
            PreprocessConfig.from_dict(bad)


def test_hounsfield_window_clips_and_scales():
    hounsfield = np.array([-3024, -1000, 0, 500, 1000, 3000], np.int16)
    np.testing.assert_allclose(scale_hounsfield(hounsfield, DEFAULT), [0, 0, 0.5, 0.75, 1, 1])
    assert scale_hounsfield(hounsfield, DEFAULT).dtype == np.float32


# --- geometry ------------------------------------------------------------------------------------


def test_grid_of_an_aligned_ct_at_model_spacing_is_its_own_grid(shared_ct):
    ct = read_volume(shared_ct / "totalseg_aorta_report" / "ct_cropped.nii.gz")  # 1.5 mm, identity direction
    cfg = PreprocessConfig(spacing_zyx=(1.5, 1.5, 1.5))
    image, grid = to_model_space(ct, cfg)
    assert grid == ModelGrid(ct.shape, (1.5, 1.5, 1.5), ct.origin)
    np.testing.assert_allclose(image, scale_hounsfield(ct.array, cfg), atol=1e-6)
    # There resampling is skipped both ways; SimpleITK's resampling gives the same voxels.
    assert is_on_grid(ct, grid)
    resampled = _resample(ct.to_sitk(), _grid_sampling(grid), fill=cfg.hu_min)
    np.testing.assert_allclose(image, scale_hounsfield(resampled, cfg), atol=1e-6)
    probabilities = np.random.default_rng(0).random(ct.shape, dtype=np.float32)
    np.testing.assert_allclose(to_input_grid(probabilities, grid, ct),
                               _resample(_grid_image(probabilities, grid), _volume_sampling(ct), fill=0.0), atol=1e-6)
    half_voxel_off = ModelGrid(ct.shape, grid.spacing_zyx, tuple(o + 0.75 for o in ct.origin))
    assert not is_on_grid(ct, half_voxel_off)
    assert not is_on_grid(ct, canonical_grid(ct, (1.5, 1.5, 1.0)))


def test_flipped_axes_come_out_in_canonical_order(abdomen):
    """The CT's x and y voxel axes run right and anterior; model axes run left and posterior."""
    ct, _ = abdomen
    cfg = PreprocessConfig(spacing_zyx=(3.0, 3.0, 3.0))
    image, grid = to_model_space(ct, cfg)
    np.testing.assert_allclose(image, scale_hounsfield(ct.array[:, ::-1, ::-1], cfg), atol=1e-6)
    assert grid.origin == pytest.approx(_input_voxel_centres_lps(ct, np.ones(ct.shape, bool)).min(axis=0))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_the_same_body_stored_mirrored_gives_the_same_model_input(abdomen, axis):
    """Reverse one voxel axis and its direction column (moving the origin to the far end): same physical image."""
    ct, _ = abdomen
    column = 2 - axis  # array axis 0 is z, direction column 2
    direction = ct.direction.copy()
    direction[:, column] *= -1
    far_end = np.array(ct.origin) + ct.direction[:, column] * ct.spacing[column] * (ct.shape[axis] - 1)
    mirrored = Volume(np.flip(ct.array, axis), ct.spacing, tuple(far_end), direction)
    cfg = PreprocessConfig(spacing_zyx=(3.0, 2.5, 2.5))
    original_image, original_grid = to_model_space(ct, cfg)
    mirrored_image, mirrored_grid = to_model_space(mirrored, cfg)
    assert mirrored_grid.shape_zyx == original_grid.shape_zyx
    assert mirrored_grid.origin == pytest.approx(original_grid.origin)
    np.testing.assert_allclose(mirrored_image, original_image, atol=1e-5)


def test_round_trip_of_the_liver_at_default_spacing(abdomen):
    ct, liver = abdomen
    _check_round_trip(ct, liver, DEFAULT, min_dice=0.99, expected_ml=1126)


def test_round_trip_through_an_oblique_ct(abdomen):
    ct, liver = abdomen
    oblique = Volume(ct.array, ct.spacing, ct.origin, _rotation(20, 10) @ ct.direction)
    image, grid, model_liver = _check_round_trip(
        oblique, liver, PreprocessConfig(spacing_zyx=(2.0, 1.5, 1.5)), min_dice=0.97, expected_ml=1126
    )
    # CT and mask still overlay in model space: liver parenchyma at ~46 HU.
    assert np.median(image[model_liver]) * 2000 - 1000 == pytest.approx(46, abs=10)
    # The rotated box leaves model-grid corners outside the scan, filled with hu_min (0 after scaling).
    assert image[0, 0, 0] == 0.0 and image[-1, -1, -1] == 0.0


def test_round_trip_of_an_anisotropic_lung_scan(shared_ct):
    """0.63 x 0.63 x 5 mm slices; the left-lower-lobe mass is 48.4 mL."""
    ct = read_volume(shared_ct / "pyradiomics_lung" / "lung2_image.nrrd")
    mass = read_volume(shared_ct / "pyradiomics_lung" / "lung2_label.nrrd").array == 1
    _check_round_trip(ct, mass, DEFAULT, min_dice=0.95, expected_ml=48.4)


def test_round_trip_on_the_dicom_series_with_its_y_flipped_label_file(shared_ct):
    folder = shared_ct / "totalseg_example"
    ct = read_volume(folder / "example_ct_dicom")
    labels = sitk.ReadImage(str(folder / "example_seg_dicom.nii.gz"))  # LAS: y runs the other way
    on_ct_grid = sitk.Resample(labels, ct.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    liver = sitk.GetArrayFromImage(on_ct_grid) == LIVER
    # Matched by position, the label file is the DICOM grid mirrored in y, and the liver is enhanced.
    np.testing.assert_array_equal(liver, sitk.GetArrayFromImage(labels)[:, ::-1, :] == LIVER)
    assert np.median(ct.array[liver]) == pytest.approx(93, abs=5)
    expected_ml = np.count_nonzero(liver) * ct.voxel_volume_ml
    _check_round_trip(ct, liver, DEFAULT, min_dice=0.97, expected_ml=expected_ml)


def test_output_outside_the_model_grid_is_zero(abdomen):
    ct, _ = abdomen
    grid = canonical_grid(ct, (3.0, 3.0, 3.0))
    far_away = ModelGrid(grid.shape_zyx, grid.spacing_zyx, tuple(np.array(grid.origin) + 10_000))
    back = to_input_grid(np.ones(grid.shape_zyx, np.float32), far_away, ct)
    assert back.shape == ct.shape and not back.any()


def test_shape_mismatches_are_refused(abdomen):
    ct, liver = abdomen
    grid = canonical_grid(ct, DEFAULT.spacing_zyx)
    with pytest.raises(InvalidInputError, match="model grid"):
        to_input_grid(np.zeros((4, 4, 4), np.float32), grid, ct)
    with pytest.raises(InvalidInputError, match="shape"):
        to_model_grid(liver[1:], ct, grid)


# --- global window -------------------------------------------------------------------------------


def test_resize_to_window_and_back():
    z, y, x = np.meshgrid(np.linspace(0, 1, 45), np.linspace(0, 1, 80), np.linspace(0, 1, 70), indexing="ij")
    smooth = (z + 2 * y + 3 * x).astype(np.float32)
    small = resize_to_window(smooth, (16, 32, 32))
    assert isinstance(small, np.ndarray) and small.shape == (16, 32, 32) and small.dtype == np.float32
    back = resize_from_window(small, smooth.shape)
    assert back.shape == smooth.shape
    interior = (slice(3, -3),) * 3  # edge cells extrapolate nothing, so only the interior is linear
    np.testing.assert_allclose(back[interior], smooth[interior], atol=0.05)
    constant = resize_to_window(torch.full((9, 10, 11), 0.25, dtype=torch.float16), (4, 4, 4))
    assert isinstance(constant, torch.Tensor) and constant.dtype == torch.float32
    assert torch.allclose(constant, torch.tensor(0.25))
    with pytest.raises(InvalidInputError):
        resize_to_window(np.zeros((4, 4)), (2, 2, 2))


@pytest.mark.parametrize("source", ["abdomen RAS", "lung 0.63x0.63x5 mm", "DICOM series", "axes permuted"])
def test_separable_resampling_on_torch_gives_simpleitks_voxels(shared_ct, abdomen, source):
    # The predictor resamples this way on a GPU; here on the CPU, against SimpleITK, both ways, borders included.
    if source == "abdomen RAS":
        ct = abdomen[0]
    elif source == "lung 0.63x0.63x5 mm":
        ct = read_volume(shared_ct / "pyradiomics_lung" / "lung2_image.nrrd")
    elif source == "DICOM series":
        ct = read_volume(shared_ct / "totalseg_example" / "example_ct_dicom")
    else:
        ct = abdomen[0]
        ct = Volume(ct.array, ct.spacing, ct.origin, ct.direction[:, [1, 2, 0]])   # x runs along z, and so on
    assert is_axis_aligned(ct.direction)
    expected, grid = to_model_space(ct, DEFAULT)
    image, same_grid = model_space_tensor(ct, DEFAULT, "cpu", separable=True)
    assert same_grid == grid
    np.testing.assert_allclose(image.numpy(), expected, atol=1e-5)
    probabilities = np.random.default_rng(0).random(grid.shape_zyx, dtype=np.float32)
    back = input_grid_tensor(torch.from_numpy(probabilities), grid, ct, separable=True)
    np.testing.assert_allclose(back.numpy(), to_input_grid(probabilities, grid, ct), atol=1e-5)


def test_an_oblique_ct_is_left_to_simpleitk(abdomen):
    ct = abdomen[0]
    oblique = Volume(ct.array, ct.spacing, ct.origin, _rotation(20, 10) @ ct.direction)
    assert not is_axis_aligned(oblique.direction)
    image, grid = model_space_tensor(oblique, PreprocessConfig(spacing_zyx=(3.0, 3.0, 3.0)), "cpu", separable=True)
    expected, _ = to_model_space(oblique, PreprocessConfig(spacing_zyx=(3.0, 3.0, 3.0)))
    np.testing.assert_array_equal(image.numpy(), expected)
