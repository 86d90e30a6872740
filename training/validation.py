"""Dice during training: a fixed set of held-out (case, structure) windows, scored every `validation_every_steps`.

The windows are drawn once, from the stage's seed, out of `validation_sources`: prepared datasets whose cases
training never sees (a data.yaml source that reads the `validation` part of a split file; a case that is also
in a training source of the stage, from the same data folder, is refused). Each window is centred on a voxel of
a structure the crop holds, without augmentation, and asks for that structure: stage 1 by its name through the
text encoder, stages 3-4 teacher-forced with the answer the predictor scores ("The liver is [SEG]."), as LISA
validates. The mask is the sigmoid thresholded at the predictor's default 0.5; Dice is the evaluation's
(r1seg_core/evaluation/metrics.py), averaged over the windows. Stage 2 trains no mask and is not validated.

Rank 0 scores the windows with the model in eval mode and without gradients while the other ranks wait: ZeRO-2
keeps the full weights on every rank. The latest validation's windows, labels and masks are kept in
stage<N>/validation.npz for a look (and for the test that recomputes the Dice).
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from r1seg_core import prompting
from r1seg_core.errors import InvalidInputError
from r1seg_core.evaluation.metrics import overlap_scores

from .data.crops import sample_crop
from .data.prepared import PreparedSource
from .recipe import StageConfig
from .stage_model import set_training_mode

VALIDATED_STAGES = (1, 3, 4)          # the stages whose loss trains a mask
THRESHOLD = 0.5                       # the predictor's default mask threshold
_VALIDATION_STREAM = 3                # next to samples.py's plan and sample streams


def _prepared_from(source: PreparedSource) -> str:
    """The data folder (or manifest) the source's cases were read from."""
    return source.index["prepared_with"]["source"]["path"]


def check_held_out(validation: list[PreparedSource], training: list[PreparedSource]) -> None:
    """A validation case must not be trained on: no case of a validation source may be in a training source that
    was prepared from the same data folder."""
    for held in validation:
        for trained in training:
            if _prepared_from(held) != _prepared_from(trained):
                continue
            shared = sorted({c.case_id for c in held.cases} & {c.case_id for c in trained.cases})
            if shared:
                raise InvalidInputError(
                    f"validation source {held.name!r} shares cases {shared[:5]} with training source {trained.name!r} "
                    f"(both from {_prepared_from(held)}): validation cases must be held out of training; read the "
                    "'validation' part of a split file for one and the 'train' part for the other "
                    "(data.yaml split_file)")


def validation_samples(config: StageConfig, sources: list[PreparedSource], window) -> list[dict]:
    """`config.validation_windows` samples, the same at every validation and on every resume."""
    rng = np.random.default_rng([config.seed, _VALIDATION_STREAM])
    settings = replace(config.crops, foreground_ratio=1.0, whole_volume_ratio=0.0)
    samples = []
    for i in range(config.validation_windows):
        source = sources[i % len(sources)]
        for _ in range(settings.tries):
            case = source.cases[rng.integers(len(source.cases))]
            crop = sample_crop(case, window, settings, rng)
            if crop.present:
                break
        else:
            raise InvalidInputError(f"stage {config.stage}: no validation window with a target in {settings.tries} "
                                    f"tries from dataset {source.name!r}; check its labels and crops.targets")
        name = sorted(crop.present)[rng.integers(len(crop.present))]
        samples.append({"image": torch.from_numpy(crop.image)[None],
                        "masks": torch.from_numpy(crop.mask(name)[None].astype(np.uint8)), "name": name, "names": [name],
                        "targets": [name],
                        "question": prompting.EXPLICIT_QUESTIONS[0].format(target=name),
                        "answer": prompting.positive_answer([name]), "case": f"{source.name}/{case.case_id}"})
    return samples


def predicted_masks(module, batch: dict, stage: int) -> np.ndarray:
    """(B, D, H, W) bool: each window's mask for its one target."""
    if stage == 1:
        segmentation, _ = module.segment_with_text(batch["images"], batch["names"], rows=batch["rows"])
        logits = segmentation.logits
    else:
        out = module(batch["images"], batch["input_ids"], batch["attention_mask"])
        # Teacher-forced answers hold one [SEG] each, so each window has exactly one prompted mask, in order.
        if [row for row, _ in out.prompt_rows] != list(range(len(batch["images"]))):
            raise RuntimeError(f"validation expected one [SEG] per window, got prompt rows {out.prompt_rows}")
        logits = out.segmentation.logits
    return (torch.sigmoid(logits[:, 0].float()) >= THRESHOLD).cpu().numpy()


class Validator:
    """`make_batch` turns a list of samples into a model batch on the training device (collate, then move)."""

    def __init__(self, samples: list[dict], make_batch, stage: int, batch_size: int, device_type: str,
                 autocast_bf16: bool, path: Path):
        self.samples, self.make_batch, self.stage, self.batch_size = samples, make_batch, stage, batch_size
        self.device_type, self.autocast_bf16, self.path = device_type, autocast_bf16, path

    def __call__(self, module, step: int) -> float:
        """The mean Dice of the windows at `step`; the windows and masks go to `self.path`."""
        predictions = []
        module.eval()
        try:
            with torch.no_grad():
                for first in range(0, len(self.samples), self.batch_size):
                    batch = self.make_batch(self.samples[first:first + self.batch_size])
                    with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.autocast_bf16):
                        predictions.append(predicted_masks(module, batch, self.stage))
        finally:
            set_training_mode(module)
        predictions = np.concatenate(predictions)
        truths = np.stack([s["masks"][0].numpy() for s in self.samples]).astype(bool)
        dice = [overlap_scores(p, t)["dice"] for p, t in zip(predictions, truths)]
        self._keep(step, predictions, truths, dice)
        return float(np.mean(dice))

    def _keep(self, step: int, predictions: np.ndarray, truths: np.ndarray, dice: list[float]) -> None:
        partial = self.path.with_name(self.path.name + ".partial")
        with partial.open("wb") as handle:
            np.savez_compressed(handle, step=step, dice=np.array(dice), predictions=predictions, labels=truths,
                                images=np.stack([s["image"][0].numpy() for s in self.samples]).astype(np.float16),
                                names=np.array([s["name"] for s in self.samples]),
                                cases=np.array([s["case"] for s in self.samples]))
        os.replace(partial, self.path)
