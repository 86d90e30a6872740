"""The model's card as the panel shows it: name, licence, the card's text, and the caveat where it applies.

A local model's card is read from its folder by the engine's torch-free `r1seg_core.model_card` (config.json's
`card`, and MODEL_CARD.md or README.md), without loading the model; a remote server's comes from its `GET /model`.
The caveat "demonstration model, not for clinical use" is shown whenever the card says so (the default model's
does), or the weights are an untrained placeholder.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from r1seg_core.model_card import card_heading, read_card

from .i18n import tr as _

# Phrases by which a card marks a model that must not be used on patients.
_NOT_CLINICAL_MARKS = ("not for clinical use", "demonstration model", "untrained placeholder")


@dataclass(frozen=True)
class ModelCard:
    name: str
    licence: str
    text: str           # the card itself (Markdown)
    caveat: str         # "" when none applies
    source: str         # the model folder, or the server that holds the model


def _caveat(card: dict, text: str) -> str:
    said = " ".join([str(card.get("name", "")), str(card.get("description", "")), text]).lower()
    if card.get("untrained"):
        return _("Untrained placeholder: its masks mean nothing. Demonstration only, not for clinical use.")
    if any(mark in said for mark in _NOT_CLINICAL_MARKS):
        return _("Demonstration model, not for clinical use.")
    return ""


def make_card(card: dict, text: str, source: str) -> ModelCard:
    card = card if isinstance(card, dict) else {}
    text = text or "\n".join(card_heading(card)) + "\n"
    return ModelCard(str(card.get("name") or _("R1Seg3D model")), str(card.get("licence") or _("not stated in its card")),
                     text, _caveat(card, text), source)


def local_model_card(model_dir: str | None) -> ModelCard:
    """The card of a model folder (None: the default model that ships with the engine)."""
    if model_dir:
        folder = Path(model_dir).expanduser()
    else:
        from r1seg_core import default_model_path  # the package's __init__ only: no torch

        folder = default_model_path()
    try:
        card = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("card", {})
    except (OSError, ValueError, AttributeError):
        return ModelCard(folder.name, _("unknown"), _("{folder} has no readable config.json.").format(folder=folder),
                         "", str(folder))
    card = card if isinstance(card, dict) else {}
    return make_card(card, read_card(folder, card), str(folder))


def server_model_card(client) -> ModelCard:
    """The card of the model a server holds (its GET /model)."""
    reply = client.model_card()
    card = dict(reply.get("card") or {})
    if reply.get("placeholder"):
        card["untrained"] = True
    return make_card(card, str(reply.get("text") or ""), client.url)


def summary(card: ModelCard) -> str:
    """One line for the panel: name, licence and the caveat."""
    line = _("{name} - licence: {licence}").format(name=card.name, licence=card.licence)
    return f"{line}. {card.caveat}" if card.caveat else line
