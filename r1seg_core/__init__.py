"""R1Seg3D engine: reasoning segmentation of CT (the R1Seg-3D method). No Slicer imports here.

Heavy modules (torch, transformers) load on first use, so `import r1seg_core` stays cheap for Slicer.
"""
import os
from pathlib import Path

__version__ = "0.1.0"

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "data" / "default_model"
SAMPLE_CT_PATH = Path(__file__).resolve().parent / "data" / "sample_ct.nii.gz"


def default_model_path() -> Path:
    """The model `r1seg ask` and the Slicer module use when none is given (ships with the package)."""
    return DEFAULT_MODEL_DIR


def cache_folder() -> Path:
    """Where R1Seg3D keeps what it derives or downloads (dequantised base weights, registry models):
    $R1SEG_CACHE, else ~/.cache/r1seg3d. Here so that listing models needs no torch (the Slicer panel's process)."""
    return Path(os.environ.get("R1SEG_CACHE") or Path.home() / ".cache" / "r1seg3d")


def sample_ct_path() -> Path:
    """The bundled abdominal CT (TotalSegmentator example, Apache-2.0; see data/README.md). Here rather than in
    volume.py so that Slicer can offer it in Sample Data at start-up without importing SimpleITK."""
    return SAMPLE_CT_PATH


def __getattr__(name):
    if name in ("R1Seg3D", "build_model", "preset_config"):
        from . import model
        return getattr(model, name)
    if name in ("Predictor", "Conversation", "AnswerResult", "TargetResult"):
        from . import inference
        return getattr(inference, name)
    if name in ("Volume", "read_volume"):
        from . import volume
        return getattr(volume, name)
    if name == "load_model":
        from .model import R1Seg3D
        return R1Seg3D.from_pretrained
    raise AttributeError(name)


__all__ = ["AnswerResult", "Conversation", "Predictor", "R1Seg3D", "TargetResult", "Volume", "build_model",
           "cache_folder", "default_model_path", "load_model", "preset_config", "read_volume", "sample_ct_path"]
