"""r1seg_core.inference.windows: MONAI-compatible tiling, padding and Gaussian blending."""
import pytest
import torch

from r1seg_core.inference.windows import (
    WindowStitcher,
    extract_windows,
    gaussian_importance_map,
    pad_to_roi,
    window_region,
    window_starts,
)

ODD_SHAPES = [(33, 100, 97), (17, 65, 64), (40, 70, 91), (16, 32, 32)]


def _stitch(volume: torch.Tensor, roi, overlap: float, model=lambda windows: windows) -> torch.Tensor:
    """Tile, run a per-window `model` on (N, 1, d, h, w), blend: the whole sliding-window loop."""
    padded, crop = pad_to_roi(volume, roi)
    starts = window_starts(padded.shape, roi, overlap)
    stitcher = WindowStitcher(padded.shape, roi, gaussian_importance_map(roi))
    for first in range(0, len(starts), 4):
        batch = starts[first : first + 4]
        stitcher.add(model(extract_windows(padded, batch, roi))[:, 0], batch)
    return stitcher.result()[crop]


# --- tiling --------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlap, expected", [(0.5, 126), (0.25, 40), (0.0, 32)])
def test_window_counts_for_a_typical_ct(overlap, expected):
    assert len(window_starts((225, 410, 410), (32, 256, 256), overlap)) == expected


@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.625])
def test_tiling_matches_monai(shape, overlap):
    from monai.data.utils import dense_patch_slices

    roi = (16, 32, 32)
    strides = [max(int(length * (1 - overlap)), 1) for length in roi]
    monai_slices = dense_patch_slices(shape, roi, strides)
    assert window_starts(shape, roi, overlap) == [tuple(s.start for s in slices) for slices in monai_slices]


@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.9])
def test_windows_cover_every_voxel_and_stay_inside(shape, overlap):
    roi = (16, 32, 32)
    covered = torch.zeros(shape, dtype=torch.bool)
    for start in window_starts(shape, roi, overlap):
        assert all(0 <= corner and corner + length <= size for corner, length, size in zip(start, roi, shape))
        covered[window_region(start, roi)] = True
    assert covered.all()


def test_tiling_refuses_short_axes_and_bad_overlap():
    with pytest.raises(ValueError, match="pad"):
        window_starts((15, 64, 64), (16, 32, 32), 0.5)
    for overlap in (-0.1, 1.0):
        with pytest.raises(ValueError, match="overlap"):
            window_starts((16, 32, 32), (16, 32, 32), overlap)


def test_padding_is_symmetric_and_crops_back():
    volume = torch.arange(5 * 40 * 7, dtype=torch.float32).reshape(5, 40, 7)
    padded, crop = pad_to_roi(volume, (16, 32, 32), value=-1.0)
    assert padded.shape == (16, 40, 32)
    assert crop == (slice(5, 10), slice(0, 40), slice(12, 19))  # 11 short: 5 before, 6 after
    assert torch.equal(padded[crop], volume)
    assert (padded == -1.0).sum() == padded.numel() - volume.numel()
    unchanged, crop = pad_to_roi(padded, (16, 32, 32))
    assert unchanged is padded and unchanged[crop].shape == padded.shape


def test_extract_windows_returns_a_model_batch():
    volume = torch.rand(20, 40, 40)
    starts = window_starts(volume.shape, (16, 32, 32), 0.5)
    windows = extract_windows(volume, starts, (16, 32, 32))
    assert windows.shape == (len(starts), 1, 16, 32, 32)
    z, y, x = starts[-1]
    assert torch.equal(windows[-1, 0], volume[z : z + 16, y : y + 32, x : x + 32])


# --- blending ------------------------------------------------------------------------------------


@pytest.mark.parametrize("roi", [(16, 32, 32), (5, 7, 9)])
def test_gaussian_map_equals_monai(roi):
    from monai.data.utils import compute_importance_map

    ours = gaussian_importance_map(roi)
    assert ours.dtype == torch.float32 and ours.shape == roi
    torch.testing.assert_close(ours, compute_importance_map(roi, "gaussian", 0.125, device="cpu"))
    assert ours.min() == pytest.approx(1e-3) and ours.max() <= 1.0
    assert torch.equal(ours, ours.flip(0, 1, 2))
    assert gaussian_importance_map(roi, dtype=torch.float16).dtype == torch.float16


@pytest.mark.parametrize("shape", [(40, 70, 91), (10, 20, 33)], ids=["larger-than-roi", "smaller-than-roi"])
def test_constant_windows_stitch_to_the_constant(shape):
    result = _stitch(torch.zeros(shape), (16, 32, 32), 0.5, model=lambda windows: torch.full_like(windows, 0.7))
    assert result.shape == shape
    torch.testing.assert_close(result, torch.full(shape, 0.7))


@pytest.mark.parametrize("shape", [(32, 64, 64), (33, 70, 91), (10, 20, 33)])
def test_without_overlap_the_input_comes_back_exactly(shape):
    volume = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    # Exact up to float32 rounding of (value * weight) / weight, i.e. one unit in the last place.
    torch.testing.assert_close(_stitch(volume, (16, 32, 32), 0.0), volume, rtol=2.5e-7, atol=0.0)


@pytest.mark.parametrize("shape", [(37, 45, 50), (10, 45, 50)], ids=["larger-than-roi", "smaller-than-roi"])
def test_blending_matches_monai_sliding_window_inference(shape):
    """A window-dependent model (each voxel times its window's mean) tells wrong weights apart."""
    from monai.inferers import sliding_window_inference

    def model(windows):
        return windows * windows.mean(dim=(1, 2, 3, 4), keepdim=True)

    volume = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    expected = sliding_window_inference(volume[None, None], (16, 32, 32), 4, model, overlap=0.5, mode="gaussian")
    torch.testing.assert_close(_stitch(volume, (16, 32, 32), 0.5, model), torch.as_tensor(expected[0, 0]))


def test_background_windows_count_as_zero():
    roi, shape = (4, 4, 4), (4, 4, 6)
    importance = torch.ones(roi)
    stitcher = WindowStitcher(shape, roi, importance)
    stitcher.add(torch.ones(1, *roi), [(0, 0, 0)])  # covers x 0..3
    stitcher.add_background([(0, 0, 2)])  # covers x 2..5 and says "absent"
    result = stitcher.result()
    assert torch.equal(result[..., :2], torch.ones(4, 4, 2))
    assert torch.equal(result[..., 2:4], torch.full((4, 4, 2), 0.5))
    assert torch.equal(result[..., 4:], torch.zeros(4, 4, 2))


def test_uncovered_voxels_are_zero_and_bad_windows_are_refused():
    roi = (4, 4, 4)
    stitcher = WindowStitcher((8, 8, 8), roi, gaussian_importance_map(roi))
    stitcher.add(torch.ones(1, *roi, dtype=torch.float16), [(0, 0, 0)])
    result = stitcher.result()
    assert result.dtype == torch.float32
    assert torch.equal(result[:4, :4, :4], torch.ones(roi)) and result.sum() == 64
    with pytest.raises(ValueError, match="does not fit"):
        stitcher.add_background([(5, 0, 0)])
    with pytest.raises(ValueError, match="expected values"):
        stitcher.add(torch.ones(2, *roi), [(0, 0, 0)])
    with pytest.raises(ValueError, match="importance map"):
        WindowStitcher((8, 8, 8), roi, torch.ones(3, 3, 3))
