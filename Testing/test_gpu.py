"""What only a CUDA GPU can check; skipped without one. `benchmarks/device_check.sh` runs these on a lent GPU.

They use only what ships with the project (the default model and the sample CT), since ../shared does not
travel to the GPU machine.
"""
import numpy as np
import pytest
import torch

from r1seg_core.inference import Predictor
from r1seg_core.preprocess import PreprocessConfig, input_grid_tensor, model_space_tensor, to_input_grid, to_model_space
from r1seg_core import sample_ct_path
from r1seg_core.volume import Volume, read_volume

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def sample_ct() -> Volume:
    return read_volume(sample_ct_path())


@pytest.fixture(scope="module")
def cpu_answer(sample_ct):
    return Predictor(device="cpu").ask(sample_ct, "segment the liver", keep_probability=True)


@pytest.mark.parametrize("dtype,mean_tolerance", [("float32", 1e-4), ("bfloat16", 0.01)])
def test_the_gpu_gives_the_cpus_answer(sample_ct, cpu_answer, dtype, mean_tolerance):
    predictor = Predictor(device="cuda", dtype=dtype)
    assert predictor.resample_on_device
    answer = predictor.ask(sample_ct, "segment the liver", keep_probability=True)
    assert answer.device.startswith("cuda")
    assert [t.present for t in answer.targets] == [t.present for t in cpu_answer.targets]
    difference = np.abs(answer.targets[0].probability - cpu_answer.targets[0].probability)
    assert difference.mean() < mean_tolerance
    assert abs(answer.targets[0].voxel_count - cpu_answer.targets[0].voxel_count) <= 0.01 * cpu_answer.targets[0].voxel_count


def test_resampling_on_the_gpu_gives_simpleitks_voxels(sample_ct):
    cfg = PreprocessConfig()
    expected, grid = to_model_space(sample_ct, cfg)
    image, _ = model_space_tensor(sample_ct, cfg, "cuda", separable=True)
    assert image.is_cuda
    np.testing.assert_allclose(image.cpu().numpy(), expected, atol=1e-5)
    probabilities = np.random.default_rng(0).random(grid.shape_zyx, dtype=np.float32)
    back = input_grid_tensor(torch.from_numpy(probabilities).cuda(), grid, sample_ct, separable=True)
    np.testing.assert_allclose(back.cpu().numpy(), to_input_grid(probabilities, grid, sample_ct), atol=1e-5)
