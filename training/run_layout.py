"""Where a run keeps its files (run_stages.sh checks the same export paths to skip finished stages).

    <output>/data/                     prepared datasets (unless --data points elsewhere)
    <output>/stage<N>/checkpoints/     DeepSpeed checkpoints (trained weights and optimizer state only)
    <output>/stage<N>/metrics.csv      loss, validation Dice, throughput, ETA and memory; tensorboard/ next to it
    <output>/stage<N>/validation.npz   the latest validation's windows, labels and predicted masks
    <output>/stage<N>/model/           stage N's exported model folder, the next stage's starting point
    <output>/final/                    stage 4's export: the trained model for `r1seg ask --model`
    <output>/CHECKPOINT_NOW            a request: the running stage checkpoints after its current step, then deletes it
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

FINGERPRINT_NAME = "frozen_fingerprint.json"
PLAN_NAME = "run_plan.json"
CHECKPOINT_REQUEST_NAME = "CHECKPOINT_NOW"


@dataclass(frozen=True)
class StagePaths:
    output: Path
    stage: int

    @property
    def root(self) -> Path:
        return self.output / f"stage{self.stage}"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def fingerprint(self) -> Path:
        return self.checkpoints / FINGERPRINT_NAME

    @property
    def plan(self) -> Path:
        """The rank count and batch split the checkpoints were written with (a resume must use the same)."""
        return self.checkpoints / PLAN_NAME

    @property
    def checkpoint_request(self) -> Path:
        """Created by anyone (slurm/two_nodes.sbatch on the pre-timeout signal) who wants a checkpoint now."""
        return self.output / CHECKPOINT_REQUEST_NAME

    @property
    def validation(self) -> Path:
        return self.root / "validation.npz"

    @property
    def export(self) -> Path:
        return self.output / "final" if self.stage == 4 else self.root / "model"

    @property
    def init(self) -> Path | None:
        """The folder this stage starts from: the previous stage's export."""
        return StagePaths(self.output, self.stage - 1).export if self.stage > 1 else None
