"""Reading the original weight files without ever running code stored in them.

safetensors files hold only tensors. `.bin`, `.pth`, `.pt` and `.ckpt` files are Python pickles; they are read
with `torch.load(weights_only=True)`, which rebuilds tensors and plain containers only and refuses any other
object, because unpickling an arbitrary object can execute code chosen by whoever wrote the file.
"""
from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..model.checkpoint import INDEX_NAME, WEIGHTS_NAME, read_weights, weight_file_names

PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")
HF_PICKLE_NAME = "pytorch_model.bin"
HF_PICKLE_INDEX = "pytorch_model.bin.index.json"
# Where training frameworks put the weights inside a checkpoint dict (SegVol's .ckpt uses "state_dict").
_NESTED_STATE_KEYS = ("state_dict", "model", "module")


@dataclass
class SourceWeights:
    tensors: dict[str, torch.Tensor]
    files: list[Path]
    # Top-level entries of a training checkpoint that are not weights (epoch counters, optimizer state...).
    ignored_entries: list[str] = field(default_factory=list)


def read_weight_file(path: Path) -> SourceWeights:
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; this source type takes a single weight file")
    if not path.is_file():
        raise CheckpointError(f"weight file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return SourceWeights(_read_safetensors(path), [path])
    if suffix in PICKLE_SUFFIXES:
        tensors, ignored = _tensor_dict(_load_pickle(path), path)
        return SourceWeights(tensors, [path], ignored)
    raise CheckpointError(f"{path}: unknown weight file type {suffix!r}; expected .safetensors or one of {', '.join(PICKLE_SUFFIXES)}")


def read_hf_folder(folder: Path) -> SourceWeights:
    """The weights of a Hugging Face `save_pretrained` folder: safetensors (single or sharded) or pytorch_model.bin."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; this source type takes the original Hugging Face folder")
    safetensors = weight_file_names(folder, INDEX_NAME, WEIGHTS_NAME)
    if safetensors:
        return SourceWeights(read_weights(folder), [folder / n for n in safetensors])
    names = weight_file_names(folder, HF_PICKLE_INDEX, HF_PICKLE_NAME)
    if not names:
        raise CheckpointError(f"{folder} has no weights: expected {WEIGHTS_NAME}, {INDEX_NAME} or {HF_PICKLE_NAME}")
    tensors = {}
    for name in names:
        tensors.update(read_weight_file(folder / name).tensors)
    return SourceWeights(tensors, [folder / n for n in names])


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"weight file {path} is truncated or not a safetensors file: {error}") from error


def _load_pickle(path: Path):
    try:
        # Memory-mapping keeps an 8B-parameter file out of RAM until tensors are used; it needs the zip format.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower():
            lines = str(error).strip().splitlines()
            # torch's own advice that follows ("allowlist this global if you trust it") is left out on purpose.
            detail = next((line for line in lines if "Unsupported" in line), lines[0]).split(" Please use")[0].strip()
            raise CheckpointError(
                f"{path} was refused: besides tensors it stores Python objects whose loading can run arbitrary code, "
                f"and only plain weights are read ({detail}). Export its state dict to safetensors in an environment "
                "you trust, then convert that file.") from error
        raise CheckpointError(f"weight file {path} is truncated or corrupt: {error}") from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise CheckpointError(f"weight file {path} is truncated or corrupt: {error}") from error


def _tensor_dict(loaded, path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The flat name -> tensor mapping inside a loaded pickle, and the top-level entries left aside."""
    if _is_state_dict(loaded):
        return dict(loaded), []
    if isinstance(loaded, dict):
        for key in _NESTED_STATE_KEYS:
            if _is_state_dict(loaded.get(key)):
                return dict(loaded[key]), sorted(str(k) for k in loaded if k != key)
    shown = sorted(str(k) for k in loaded)[:10] if isinstance(loaded, dict) else type(loaded).__name__
    raise CheckpointError(f"{path} holds no state dict (a mapping of names to tensors); found {shown}")


def _is_state_dict(value) -> bool:
    return (isinstance(value, dict) and bool(value)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()))
