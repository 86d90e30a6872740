"""Multi-turn state: earlier questions and answers, the CT they are about, and each target's last decided mask.

A follow-up about the last targets ("how big is it?") is answered from the stored masks, so it never changes a
volume the user has already been given. `save`/`load` keep a conversation in a JSON file, with the masks beside it
in a NumPy `.npz` archive read with `allow_pickle=False` (bit-packed, so a CT-sized mask takes an eighth).
Plain Python and NumPy: importing it does not import torch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InvalidInputError
from ..files import write_atomically, write_text_atomically
from .fingerprint import ct_fingerprint

# Older turns are dropped from the prompt first: the LLM's context also has to hold the visual tokens.
MAX_HISTORY_TURNS = 4
FILE_FORMAT = 1
MASKS_SUFFIX = ".masks.npz"


@dataclass
class StoredTarget:
    """One target's decided answer, as a later turn reads it back."""
    name: str
    status: str
    volume_ml: float
    voxel_count: int
    shape: tuple[int, int, int]
    bits: np.ndarray | None = None            # np.packbits of the mask; None when it is empty

    @classmethod
    def from_result(cls, target) -> "StoredTarget":
        bits = np.packbits(target.mask.reshape(-1) > 0) if target.voxel_count else None
        return cls(target.name, target.status, float(target.volume_ml), int(target.voxel_count),
                   tuple(int(n) for n in target.mask.shape), bits)

    def mask(self) -> np.ndarray:
        """The uint8 0/1 mask, byte for byte the one that was answered."""
        if self.bits is None:
            return np.zeros(self.shape, dtype=np.uint8)
        return np.unpackbits(self.bits, count=int(np.prod(self.shape))).reshape(self.shape)

    def summary(self) -> dict:
        return {"name": self.name, "status": self.status, "volume_ml": round(self.volume_ml, 3),
                "voxel_count": self.voxel_count}


@dataclass
class Turn:
    question: str
    answer: str                                # what the model reads back in the history (its own words)
    targets: list[str]
    shown: str = ""                            # what the user read
    results: list[dict] = field(default_factory=list)   # each target's name, status and volume


@dataclass
class Conversation:
    turns: list[Turn] = field(default_factory=list)
    fingerprint: str | None = None             # the CT the stored masks are on (fingerprint.ct_fingerprint)
    stored: dict[str, StoredTarget] = field(default_factory=dict)   # name -> its latest decided answer

    def add(self, question: str, answer: str, targets: list[str], results=(), shown: str = "") -> None:
        """One turn; `results` (TargetResult) are kept as the latest answer about each of their names."""
        results = list(results)
        for target in results:
            self.stored[target.name] = StoredTarget.from_result(target)
        self.turns.append(Turn(question, answer, list(targets), shown,
                               [self.stored[t.name].summary() for t in results]))

    def clear(self) -> None:
        self.turns.clear()
        self.stored.clear()
        self.fingerprint = None

    def is_about(self, volume) -> bool:
        """False when the stored masks belong to another CT (a new conversation has none and is about any CT)."""
        return self.fingerprint is None or self.fingerprint == ct_fingerprint(volume)

    def bind(self, fingerprint: str) -> bool:
        """Attach the conversation to the CT being asked about; True when it was about another CT, whose stored
        masks are then dropped (the turns stay: they are what was said)."""
        other = self.fingerprint is not None and self.fingerprint != fingerprint
        if other:
            self.stored.clear()
        self.fingerprint = fingerprint
        return other

    def history_text(self) -> str:
        """Earlier turns the model answered, as plain text placed between the image tokens and the new question."""
        recent = [turn for turn in self.turns if turn.answer][-MAX_HISTORY_TURNS:]
        return " ".join(f"{turn.question} {turn.answer}" for turn in recent)

    def last_targets(self) -> list[str]:
        """The targets of the latest turn that had any, for follow-ups such as "how large is it?"."""
        for turn in reversed(self.turns):
            if turn.targets:
                return list(turn.targets)
        return []

    # ---- the conversation file -----------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """The JSON at `path` and the masks beside it (`masks_path(path)`), each written atomically."""
        path = Path(path)
        masks = {f"mask_{k}": target.bits for k, target in enumerate(self.stored.values()) if target.bits is not None}
        keys = iter(masks)
        stored = []
        for target in self.stored.values():
            entry = {**target.summary(), "shape": list(target.shape), "mask": None}
            if target.bits is not None:
                entry["mask"] = next(keys)
            stored.append(entry)
        data = {"format": FILE_FORMAT, "fingerprint": self.fingerprint, "masks_file": masks_path(path).name,
                "turns": [{"question": t.question, "answer": t.answer, "shown": t.shown, "targets": t.targets,
                           "results": t.results} for t in self.turns],
                "stored": stored}
        write_atomically(masks_path(path), lambda stream: np.savez_compressed(stream, **masks))
        write_text_atomically(path, json.dumps(data, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Conversation":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise InvalidInputError(f"{path}: no such conversation file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise InvalidInputError(f"{path} is not a conversation file (not JSON: {error}); "
                                    "give a new file name to start a conversation") from None
        if not isinstance(data, dict) or data.get("format") != FILE_FORMAT:
            raise InvalidInputError(f"{path} is not an R1Seg3D conversation file of format {FILE_FORMAT}; "
                                    "give a new file name to start a conversation")
        try:
            turns = [Turn(t["question"], t["answer"], list(t["targets"]), t.get("shown", ""), list(t.get("results", [])))
                     for t in data["turns"]]
            conversation = cls(turns, data.get("fingerprint"))
            arrays = {}
            if any(entry["mask"] for entry in data["stored"]):
                with np.load(masks_path(path), allow_pickle=False) as archive:
                    arrays = {key: archive[key] for key in archive.files}
            for entry in data["stored"]:
                shape = tuple(int(n) for n in entry["shape"])
                bits = arrays[entry["mask"]] if entry["mask"] else None
                if bits is not None and (bits.dtype != np.uint8 or bits.size != -(-int(np.prod(shape)) // 8)):
                    raise ValueError(f"the mask of {entry['name']!r} does not fit its shape {shape}")
                conversation.stored[entry["name"]] = StoredTarget(entry["name"], entry["status"], float(entry["volume_ml"]),
                                                                  int(entry["voxel_count"]), shape, bits)
        except FileNotFoundError:
            raise InvalidInputError(f"{masks_path(path)} is missing: the conversation's masks are stored there; "
                                    "give a new file name to start a conversation") from None
        except (KeyError, TypeError, ValueError) as error:
            raise InvalidInputError(f"{path} is damaged ({error}); give a new file name to start a conversation") from None
        return conversation


def masks_path(path: str | Path) -> Path:
    """Where a conversation file's masks are: `chat.json` -> `chat.masks.npz`."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".json") + MASKS_SUFFIX)
