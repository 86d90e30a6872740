"""What one question returns, and how it is written to disk."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..files import write_text_atomically
from ..volume import Volume, write_labelmap
from .decision import ABSENT, NOT_TRAINED, PRESENT, Decision

# The answer's status when the question named nothing the model could segment (it has no targets then).
NOT_UNDERSTOOD = "not_understood"


@dataclass
class TargetResult:
    name: str                          # canonical vocabulary name, e.g. "left kidney"
    mask: np.ndarray                   # uint8 (z, y, x) on the input volume's grid; empty unless present
    probability: np.ndarray | None     # float32 (z, y, x) in [0, 1], when asked for
    volume_ml: float
    voxel_count: int
    windows_positive: int = 0          # windows whose answer gave it a mask
    status: str = ""                   # decision.py's present / absent / not_trained; "" = from the mask
    marked_ml: float | None = None     # what the decoder marked before the decision (an absent target's was emptied)
    presence_min_ml: float = 0.0       # the presence volume the decision used
    global_answer: bool | None = None  # the whole-CT answer: found it, said "no", or made no claim

    def __post_init__(self):
        if not self.status:
            self.status = PRESENT if self.voxel_count > 0 else ABSENT

    @classmethod
    def from_decision(cls, decision: Decision, mask: np.ndarray, probability: np.ndarray | None,
                      voxel_volume_ml: float) -> "TargetResult":
        """The segment follows the decision: only a present target keeps its voxels."""
        if not decision.present:
            mask = np.zeros_like(mask)
        voxels = int(mask.sum())
        evidence = decision.evidence
        return cls(decision.name, mask, probability, voxels * voxel_volume_ml, voxels, evidence.windows_positive,
                   decision.status, evidence.marked_ml if decision.status != NOT_TRAINED else None,
                   decision.min_ml, evidence.said)

    @property
    def present(self) -> bool:
        return self.status == PRESENT

    def summary(self) -> dict:
        return {"name": self.name, "status": self.status, "present": self.present, "volume_ml": round(self.volume_ml, 3),
                "voxel_count": self.voxel_count, "windows_positive": self.windows_positive,
                "marked_ml": None if self.marked_ml is None else round(self.marked_ml, 3),
                "presence_min_ml": self.presence_min_ml, "global_answer": self.global_answer}


@dataclass
class AnswerResult:
    question: str
    answer: str                                    # the text shown to the user
    targets: list[TargetResult]
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    device: str = "cpu"
    model_text: str = ""                           # the LLM's own global answer (with [SEG]), when the global step ran
    windows: int = 0
    profile: str = "project"                       # the inference profile that produced it
    not_understood: list[str] = field(default_factory=list)  # words taken for targets that name no known structure
    answered_from: str = "model"                   # "model", or "conversation": a follow-up read the stored masks
    shape: tuple | None = None                     # the CT's (z, y, x), so an answer without targets still writes

    @property
    def present(self) -> bool:
        return any(t.present for t in self.targets)

    @property
    def status(self) -> str:
        """"present" when any target is; else "absent" when any trained target is not there; else "not_trained"
        (every target is one the model was not trained on); "not_understood" when the question named none."""
        statuses = {t.status for t in self.targets}
        for status in (PRESENT, ABSENT, NOT_TRAINED):
            if status in statuses:
                return status
        return NOT_UNDERSTOOD

    def to_dict(self) -> dict:
        return {"question": self.question, "answer": self.answer, "status": self.status, "present": self.present,
                "targets": [t.summary() for t in self.targets], "model_text": self.model_text,
                "not_understood": self.not_understood, "answered_from": self.answered_from,
                "windows": self.windows, "profile": self.profile, "device": self.device, "notes": self.notes,
                "timings_s": {k: round(v, 4) for k, v in self.timings.items()}}

    def labelmap(self) -> tuple[np.ndarray, dict[int, str]]:
        """One label value per target (1, 2, ...); where targets overlap the later one wins. A target that is not
        present keeps its value and name with no voxels, so a written file lists every segment asked about."""
        if not self.targets and self.shape is None:
            raise ValueError("the answer has no targets to write")
        labels = np.zeros(self.targets[0].mask.shape if self.targets else self.shape, dtype=np.uint8)
        names = {}
        for value, target in enumerate(self.targets, start=1):
            labels[target.mask > 0] = value
            names[value] = target.name
        return labels, names

    def write(self, path: str | Path, reference: Volume, colors: dict[int, tuple[int, int, int]] | None = None) -> Path:
        labels, names = self.labelmap()
        return write_labelmap(path, labels, reference, names, colors)

    def write_json(self, path: str | Path) -> Path:
        """Atomic, like the labelmap: a crash never leaves half a file."""
        return write_text_atomically(path, json.dumps(self.to_dict(), indent=2))
