"""The R1Seg-3D network, one module per box of the paper's Fig. 2."""
from .builder import PRESETS, build_from_preset, build_model, preset_config
from .r1seg3d import R1Seg3D, R1Seg3DOutput, SegmentationOutput
from .stages import set_trainable

__all__ = ["PRESETS", "R1Seg3D", "R1Seg3DOutput", "SegmentationOutput", "build_from_preset", "build_model",
           "preset_config", "set_trainable"]
