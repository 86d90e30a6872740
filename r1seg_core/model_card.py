"""A model folder's card: what a person reads before using the model.

`save_model` writes README.md from config.json: who made the model, from what, under which licence, and its
architecture. A folder may also hold MODEL_CARD.md, written by people (the default model's states its measured
quality), which is then the card. Standard library only: the server and the Slicer panel read cards without torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import R1Seg3DConfig

WRITTEN_CARD_NAME = "README.md"
PEOPLES_CARD_NAME = "MODEL_CARD.md"
# config.json's `card` fields a card lists, in this order.
_CARD_FIELDS = ("description", "source", "source_commit", "converted_on", "trained_on", "licence")


def card_heading(card: dict) -> list[str]:
    """The lines a card opens with, from config.json's `card`: name, the placeholder warning, provenance, licence."""
    lines = [f"# {card.get('name') or 'R1Seg3D model'}", ""]
    if card.get("untrained"):
        lines += ["**Untrained placeholder**: random weights. It runs the whole pipeline, but its masks mean nothing.", ""]
    return lines + [f"- {key.replace('_', ' ')}: {card[key]}" for key in _CARD_FIELDS if card.get(key)]


def model_card(config: R1Seg3DConfig) -> str:
    """README.md of a saved model: its card's heading, then what it is built from."""
    enc = config.encoder
    lines = card_heading(config.card)
    lines += [f"- window (D,H,W): {tuple(enc.image_size)}, patch {tuple(enc.patch_size)}",
              f"- encoder: hidden {enc.hidden_size}, depth {enc.depth}, heads {enc.num_heads}",
              f"- refinement loops: {config.refine_loops}",
              f"- preprocessing: {config.preprocess}"]
    if config.language_model is not None:
        hf = config.language_model.hf_config or {}
        lines.append(f"- language model: {hf.get('model_type', config.language_model.path)}, hidden {hf.get('hidden_size', '?')}, "
                     f"layers {hf.get('num_hidden_layers', '?')}")
    if config.text_encoder is not None:
        lines.append("- SAM mode: prompted by a frozen text encoder")
    if config.known_structures:
        lines.append(f"- trained to segment: {', '.join(config.known_structures)} (other structures are answered "
                     "\"not trained\")")
    compat = config.compatibility
    lines.append(f"- [SEG] state: {compat.seg_state} the token; several [SEG]: "
                 f"{'averaged into one mask' if compat.average_seg_states else 'one mask each'}; "
                 f"visual tokens placed {compat.image_insertion.replace('_', ' ')}")
    return "\n".join(lines) + "\n"


def read_card(folder: Path, card: dict) -> str:
    """The card of a model folder: MODEL_CARD.md, else the written README.md, else the heading of config's `card`."""
    for name in (PEOPLES_CARD_NAME, WRITTEN_CARD_NAME):
        if (Path(folder) / name).is_file():
            return (Path(folder) / name).read_text(encoding="utf-8", errors="replace")
    return "\n".join(card_heading(card)) + "\n"
