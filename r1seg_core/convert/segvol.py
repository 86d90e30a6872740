"""The encoder start point made from SegVol's `ViT_pretrain.ckpt`, which stage 1 of the original began from.

Format: a folder with `image_encoder.safetensors` (the encoder's tensors under this project's names, without the
`image_encoder.` prefix), `encoder.json` (the EncoderConfig and the provenance card) and a README.md card.
It is deliberately not a full model folder: a SAM-mode model also needs a text tower (CLIP), a prompt encoder
and a mask decoder, none of which SegVol's pretraining file holds. Stage 1 builds its model as usual and calls
`load_encoder_start_point(model, folder)` to start the encoder from these weights.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..config import EncoderConfig
from ..errors import CheckpointError
from ..model_card import WRITTEN_CARD_NAME, card_heading

ENCODER_WEIGHTS = "image_encoder.safetensors"
ENCODER_CONFIG = "encoder.json"
ENCODER_PREFIX = "image_encoder."


def write_encoder_start_point(folder: Path, state: dict[str, torch.Tensor], encoder: EncoderConfig, card: dict) -> Path:
    """state: project names with the `image_encoder.` prefix, already checked against the encoder's shapes."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k[len(ENCODER_PREFIX):]: v.contiguous() for k, v in state.items()}
    save_file(tensors, str(folder / ENCODER_WEIGHTS), metadata={"format": "pt"})
    (folder / ENCODER_CONFIG).write_text(json.dumps({"encoder": dataclasses.asdict(encoder), "card": card}, indent=2) + "\n")
    lines = card_heading(card)
    lines.append(f"- encoder: window {tuple(encoder.image_size)}, patch {tuple(encoder.patch_size)}, hidden {encoder.hidden_size}, "
                 f"depth {encoder.depth}, heads {encoder.num_heads}, MLP {encoder.mlp_dim}")
    (folder / WRITTEN_CARD_NAME).write_text("\n".join(lines) + "\n")
    return folder


def read_encoder_start_point(folder: Path) -> tuple[EncoderConfig, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_path, weights_path = folder / ENCODER_CONFIG, folder / ENCODER_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise CheckpointError(f"{folder} is not an encoder start point: it needs {ENCODER_CONFIG} and {ENCODER_WEIGHTS}")
    try:
        sizes = json.loads(config_path.read_text())["encoder"]
        encoder = EncoderConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in sizes.items()})
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"{config_path} is not a valid encoder description: {error}") from error
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"weight file {weights_path} is truncated or corrupt: {error}") from error
    return encoder, state


def load_encoder_start_point(model, folder: Path) -> None:
    """Start `model.image_encoder` from a converted SegVol encoder; the sizes must be the model's."""
    encoder, state = read_encoder_start_point(Path(folder))
    if encoder != model.config.encoder:
        raise CheckpointError(f"the encoder in {folder} has sizes {encoder} but the model has {model.config.encoder}")
    model.image_encoder.load_state_dict(state, strict=True)
