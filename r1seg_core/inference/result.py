"""What one question returns, and how it is written to disk."""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..volume import Volume, write_labelmap


@dataclass
class TargetResult:
    name: str                          # canonical vocabulary name, e.g. "left kidney"
    mask: np.ndarray                   # uint8 (z, y, x) on the input volume's grid
    probability: np.ndarray | None     # float32 (z, y, x) in [0, 1], when asked for
    volume_ml: float
    voxel_count: int
    windows_positive: int = 0          # windows whose answer was "present"

    @property
    def present(self) -> bool:
        return self.voxel_count > 0

    @property
    def status(self) -> str:
        return "present" if self.present else "absent"

    def summary(self) -> dict:
        return {"name": self.name, "status": self.status, "present": self.present, "volume_ml": round(self.volume_ml, 3),
                "voxel_count": self.voxel_count, "windows_positive": self.windows_positive}


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

    @property
    def present(self) -> bool:
        return any(t.present for t in self.targets)

    @property
    def status(self) -> str:
        """"present" when any target has voxels, else "absent" (the file then holds empty, named segments)."""
        return "present" if self.present else "absent"

    def to_dict(self) -> dict:
        return {"question": self.question, "answer": self.answer, "status": self.status, "present": self.present,
                "targets": [t.summary() for t in self.targets], "model_text": self.model_text,
                "windows": self.windows, "profile": self.profile, "device": self.device, "notes": self.notes,
                "timings_s": {k: round(v, 4) for k, v in self.timings.items()}}

    def labelmap(self) -> tuple[np.ndarray, dict[int, str]]:
        """One label value per target (1, 2, ...); where targets overlap the later one wins. An absent target keeps
        its value and name with no voxels, so a written file lists every segment asked about, found or not."""
        if not self.targets:
            raise ValueError("the answer has no targets to write")
        labels = np.zeros(self.targets[0].mask.shape, dtype=np.uint8)
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
        path = Path(path)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        with os.fdopen(handle, "w") as stream:
            json.dump(self.to_dict(), stream, indent=2)
        os.replace(temporary, path)
        return path
