"""Training samples as a pure function of (seed, step, micro-step, rank, slot).

Nothing depends on what came before, so a resumed run sees exactly the samples an uninterrupted run would, and
every rank draws its own samples without a shared sampler.

Whether a sample is a positive or a negative is drawn from (seed, step, micro-step, slot) *without* the rank,
so in every micro-step all ranks hold the same mix. That keeps the backward graph the same on every rank, which
ZeRO-2 requires: it fills its gradient buckets in the order gradients arrive, and a rank that skips the mask
decoder (a micro-batch of negatives only) while another runs it would have its gradients summed into the wrong
parameters, silently (measured with DeepSpeed 0.19 on gloo: parameters unused on one rank received the other
rank's gradients of a different layer).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from r1seg_core import prompting
from r1seg_core.errors import InvalidInputError

from ..recipe import StageConfig
from .augment import augment
from .crops import Crop, sample_crop
from .prepared import PreparedSource
from .questions import existence_qa, segmentation_qa

_PLAN_STREAM, _SAMPLE_STREAM = 1, 2


@dataclass(frozen=True)
class SampleKey:
    step: int
    micro: int
    rank: int
    slot: int


def source_weights(config: StageConfig, sources: list[PreparedSource]) -> np.ndarray:
    """Normalised sampling probabilities; "size" weighs a source by its (case, structure) pairs."""
    raw = []
    for source in sources:
        weight = config.sources[source.name]
        raw.append(float(source.pair_count()) if weight == "size" else float(weight))
    total = sum(raw)
    if total <= 0 or any(w < 0 for w in raw):
        raise InvalidInputError(f"stage {config.stage}: source weights {config.sources} must be non-negative, not all 0")
    return np.array(raw) / total


def structure_holders(config: StageConfig, sources: list[PreparedSource]) -> dict[str, list[tuple[PreparedSource, object]]]:
    """Each of `crops.targets` -> the (source, case) pairs that hold it; targets no case holds are left out."""
    holders: dict[str, list] = {}
    for source in sources:
        for case in source.cases:
            for structure in case.structures:
                if structure.name in config.crops.targets:
                    holders.setdefault(structure.name, []).append((source, case))
    return {name: holders[name] for name in config.crops.targets if name in holders}


class StageSamples(torch.utils.data.Dataset):
    def __init__(self, config: StageConfig, sources: list[PreparedSource], window: tuple[int, int, int]):
        self.config = config
        self.sources = [s for s in sources if s.cases]
        if len(self.sources) != len(sources):
            empty = sorted({s.name for s in sources} - {s.name for s in self.sources})
            raise InvalidInputError(f"stage {config.stage}: prepared datasets {empty} have no usable case")
        self.weights = source_weights(config, self.sources)
        self.window = tuple(window)
        self.trained = frozenset(config.crops.targets or ())
        if config.crops.balance == "structure":
            self.holders = structure_holders(config, self.sources)
            if not self.holders:
                raise InvalidInputError(f"stage {config.stage}: no prepared case holds any of crops.targets "
                                        f"{config.crops.targets}")
            raw = np.array([config.crops.target_weights.get(name, 1.0) for name in self.holders])
            self.target_probabilities = raw / raw.sum()

    def is_positive(self, key: SampleKey) -> bool:
        plan = np.random.default_rng([self.config.seed, _PLAN_STREAM, key.step, key.micro, key.slot])
        return plan.random() >= self.config.questions.negative_ratio

    def __getitem__(self, key: SampleKey) -> dict:
        rng = np.random.default_rng([self.config.seed, _SAMPLE_STREAM, key.step, key.micro, key.rank, key.slot])
        positive = self.is_positive(key)
        # Several masks per crop start from a present centre target; their empty masks come from extra slots.
        wants_present = positive or self.config.crops.masks_per_crop > 1
        if self.config.crops.balance == "structure":
            source, crop = self._structure_crop(wants_present, rng)
        else:
            source = self.sources[rng.choice(len(self.sources), p=self.weights)]
            crop = self._crop(source, wants_present, rng)
        text_rng = random.Random(int(rng.integers(2 ** 63)))
        if self.config.stage == 1:
            targets = self._stage1_targets(crop, positive, text_rng)
            return self._finish(source, crop, targets, targets, rng, {"names": targets})
        make = existence_qa if self.config.stage == 2 else segmentation_qa
        qa = make(text_rng, positive, crop.present, self._negatives(crop, text_rng), self.config.questions)
        return self._finish(source, crop, qa.targets, qa.about, rng,
                            {"question": qa.question, "answer": qa.answer, "targets": qa.targets})

    def _negatives(self, crop: Crop, text_rng: random.Random) -> list[str]:
        """The names a negative question may ask about: trained targets the crop lacks with probability
        `trained_negative_ratio` (when there are any), else any annotated structure it lacks."""
        trained_absent = [name for name in crop.absent if name in self.trained]
        if trained_absent and text_rng.random() < self.config.questions.trained_negative_ratio:
            return trained_absent
        return crop.absent

    def _stage1_targets(self, crop: Crop, positive: bool, text_rng: random.Random) -> list[str]:
        """Stage 1's `masks_per_crop` target names: with one, a present target (or, for a negative, an absent one
        with an empty mask: the original's collator zero-filled absent classes). With more, the first is the
        centre target, and each further slot is an absent structure with probability `negative_ratio` (an empty
        mask: the decoder learns to answer nothing) or another present trained target."""
        count = self.config.crops.masks_per_crop
        if count == 1:
            return [text_rng.choice(sorted(crop.present if positive else crop.absent))]
        present = sorted(crop.present)
        targets = [crop.centre if crop.centre in crop.present else text_rng.choice(present)]
        others = [name for name in present if name != targets[0]]
        text_rng.shuffle(others)
        while len(targets) < count:
            negatives = self._negatives(crop, text_rng)
            if negatives and (not others or text_rng.random() < self.config.questions.negative_ratio):
                targets.append(text_rng.choice(sorted(negatives)))
            else:
                targets.append(others.pop() if others else targets[0])
        return targets

    def _structure_crop(self, positive: bool, rng: np.random.Generator) -> tuple[PreparedSource, Crop]:
        """A trained target drawn by its weight, a case that holds it, and a crop centred on it that holds a
        present target (`positive`) or lacks an annotated structure."""
        names = list(self.holders)
        for _ in range(self.config.crops.tries):
            name = names[rng.choice(len(names), p=self.target_probabilities)]
            source, case = self.holders[name][rng.integers(len(self.holders[name]))]
            crop = sample_crop(case, self.window, self.config.crops, rng, centre_on=name)
            if crop.present if positive else crop.absent:
                return source, crop
        kind = "a present" if positive else "an absent"
        raise InvalidInputError(f"stage {self.config.stage}: no structure-centred crop with {kind} target in "
                                f"{self.config.crops.tries} tries; lower its negative_ratio or check its labels")

    def _crop(self, source: PreparedSource, positive: bool, rng: np.random.Generator) -> Crop:
        for _ in range(self.config.crops.tries):
            case = source.cases[rng.integers(len(source.cases))]
            crop = sample_crop(case, self.window, self.config.crops, rng)
            if crop.present if positive else crop.absent:
                return crop
        kind = "a present" if positive else "an absent"
        raise InvalidInputError(f"stage {self.config.stage}: no crop with {kind} target in {self.config.crops.tries} "
                                f"tries from dataset {source.name!r}; lower its negative_ratio or check its labels")

    def _finish(self, source: PreparedSource, crop: Crop, targets: list[str], about: list[str], rng,
                fields: dict) -> dict:
        """Masks of the targets (in [SEG] order), augmented with the image; `about` decides the left/right rule.

        A whole-volume crop trains its answer text only, unless `crops.whole_volume_masks`: its masks are left
        empty, which the loss skips (the predictor's default path never decodes a whole-CT mask)."""
        if crop.whole and not self.config.crops.whole_volume_masks:
            masks = np.zeros((len(targets), *self.window), dtype=np.uint8) if targets else None
        else:
            masks = np.stack([crop.mask(name) for name in targets]).astype(np.uint8) if targets else None
        settings = self.config.augment
        # The noise is sized on the source's HU window too, so the window goes along whatever else is on.
        phase = {"hu_window": source.hu_window}
        if settings.contrast_phase_prob > 0:
            phase["structures"] = crop.structure_masks()
        image, masks = augment(crop.image, masks, about, settings, int(rng.integers(2 ** 31)), **phase)
        if masks is None:
            masks = np.zeros((0, *self.window), dtype=np.uint8)
        return {"image": torch.from_numpy(image)[None], "masks": torch.from_numpy(masks), **fields}


class Collate:
    """Samples -> one model batch: stacked windows, and for the LLM stages the teacher-forced token batch."""

    def __init__(self, stage: int, tokenizer=None, num_visual_tokens: int = 0, token_ids: dict | None = None):
        self.stage = stage
        self.tokenizer = tokenizer
        self.num_visual_tokens = num_visual_tokens
        self.token_ids = token_ids

    def __call__(self, samples: list[dict]) -> dict:
        images = torch.stack([s["image"] for s in samples])
        if self.stage == 1:
            # Every target of a crop shares its image's encoder pass: `rows` maps each mask to its image.
            return {"images": images, "names": [name for s in samples for name in s["names"]],
                    "masks": torch.cat([s["masks"] for s in samples]).unsqueeze(1).float(),
                    "rows": torch.tensor([i for i, s in enumerate(samples) for _ in s["names"]])}
        prompts = [prompting.prompt_ids(self.tokenizer, s["question"], self.num_visual_tokens) for s in samples]
        answers = [prompting.answer_ids(self.tokenizer, s["answer"], self.token_ids["eos"]) for s in samples]
        tokens = prompting.build_teacher_forced_batch(prompts, answers, self.token_ids["pad"])
        most = max(len(s["masks"]) for s in samples)
        targets = None
        if most:
            targets = torch.zeros((len(samples), most, *images.shape[2:]))
            for i, sample in enumerate(samples):
                targets[i, :len(sample["masks"])] = sample["masks"]
        return {"images": images, "input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask,
                "labels": tokens.labels, "target_masks": targets, "target_names": [s["targets"] for s in samples]}


class StepBatches(torch.utils.data.Sampler):
    """The keys of one rank's micro-batches, from `start_step` on; a DataLoader turns them into batches."""

    def __init__(self, start_step: int, total_steps: int, accumulation: int, rank: int, micro_batch: int):
        self.start_step, self.total_steps = start_step, total_steps
        self.accumulation, self.rank, self.micro_batch = accumulation, rank, micro_batch

    def __iter__(self):
        for step in range(self.start_step, self.total_steps):
            for micro in range(self.accumulation):
                yield [SampleKey(step, micro, self.rank, slot) for slot in range(self.micro_batch)]

    def __len__(self) -> int:
        return (self.total_steps - self.start_step) * self.accumulation
