"""A recipe is a folder of plain files: the model, the data, one file per stage and the DeepSpeed settings.

    model.yaml      preset + overrides of the model config, and `sam_mode`: what stage 1's model changes
    data.yaml       the datasets to prepare (see data/cases.py SourceSpec)
    stage1.yaml .. stage4.yaml   one stage each: epochs, batch, learning rate, data mixture, questions, crops
    ds_config.json  the DeepSpeed engine: ZeRO stage, precision, clipping, communication buckets

Every key is checked, so a typo fails loudly instead of training with a default.
"""
from __future__ import annotations

import json
from copy import deepcopy
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from r1seg_core.config import R1Seg3DConfig
from r1seg_core.errors import InvalidInputError
from r1seg_core.model.builder import preset_config
from r1seg_core.model.stages import trainable_groups

from .data.cases import SourceSpec, expand_variables

STAGES = (1, 2, 3, 4)
EPOCH_COUNTS = ("auto", "original")      # samples_per_epoch's named counts (train.py samples_per_epoch)


@dataclass
class CropSettings:
    foreground_ratio: float = 2 / 3      # crops centred on a structure's voxel vs anywhere (2:1, the reference)
    present_min_voxels: int = 64         # a structure counts as present with this many voxels (or half of it) in a crop
    tries: int = 20                      # crops drawn before a sample's source is asked for another case
    # Only these structures are centred on and asked for as targets (None: all); any annotated structure missing
    # from a crop is still a safe negative. Keeps a few organs from drowning in dozens of muscles and ribs.
    targets: list[str] | None = None
    # Crops that are the whole case resized to one window, as the predictor's global step sees a CT (and as the
    # original trained on whole CTs resized to 32x256x256).
    whole_volume_ratio: float = 0.0
    # Whether a whole-volume crop also trains its masks. The predictor decodes a whole-CT mask only without the
    # sliding window (the paper's Fig. 4 ablation); by default such crops train the answer text alone.
    whole_volume_masks: bool = False
    # How a sample's crop is chosen. "case": a source by its weight, then a case, then a centre (the reference).
    # "structure": a target by `target_weights` (1 when unnamed), then a case that holds it, and the crop is centred
    # on it, so every trained organ gets a comparable share whatever the number of cases that hold it.
    balance: str = "case"
    target_weights: dict[str, float] = field(default_factory=dict)
    # Stage 1: masks decoded from one encoder pass of each crop: its centre target, other trained targets it holds,
    # and, with probability `questions.negative_ratio` per extra slot, an absent structure with an empty mask.
    masks_per_crop: int = 1


@dataclass
class AugmentSettings:
    rotate90_prob: float = 0.2           # each of `rotate90_repeats` axial-plane quarter turns; not for left/right targets
    rotate90_repeats: int = 3
    flip_z_prob: float = 0.1             # head-feet flip: keeps left on the left
    scale_intensity: float = 0.1
    scale_intensity_prob: float = 0.5
    shift_intensity: float = 0.1
    shift_intensity_prob: float = 0.5
    # Contrast phases: each labelled structure's HU moved on its own (augment.py PHASE_OFFSETS_HU), so that
    # non-contrast, arterial and portal-venous scans all look like training data.
    contrast_phase_prob: float = 0.0
    # Small affine changes that keep left on the left: scale 1 +- affine_scale, axial rotation +- degrees.
    affine_prob: float = 0.0
    affine_scale: float = 0.15
    affine_rotate_degrees: float = 15.0
    # Gaussian noise with a standard deviation drawn up to noise_hu (low-dose CTs).
    noise_prob: float = 0.0
    noise_hu: float = 20.0


@dataclass
class QuestionSettings:
    negative_ratio: float = 0.0          # samples asking for a target absent from the crop (stage 1: an empty mask; 2: "no")
    implicit_ratio: float = 0.0          # single-target questions that describe the target instead of naming it
    multi_target_ratio: float = 0.0      # positive questions naming 2..max_targets present targets
    max_targets: int = 3
    unnamed_answer_ratio: float = 0.0    # implicit questions answered without the name ("It is [SEG].")
    # Of the negatives, the share that names a trained target (crops.targets) absent from the crop; the rest name
    # any annotated structure absent from it. With only untrained names as negatives, the name alone tells the
    # answer and the model learns to ignore the image.
    trained_negative_ratio: float = 0.0
    # Implicit questions also draw from training/data/instructions.json: more descriptions and synonyms per organ.
    instructions: bool = False


@dataclass
class StageConfig:
    stage: int
    epochs: float
    micro_batch_size: int                # per GPU
    learning_rate: float
    weight_decay: float
    sources: dict[str, float | str]      # prepared dataset -> sampling weight, or "size" for its (case, structure) pairs
    # What one epoch counts: "auto", the (case, structure) pairs present in the prepared cases; "original", as the
    # released code counted (every annotated pair, absent ones included, times its prompt variants; train.py
    # samples_per_epoch); or a number of samples.
    samples_per_epoch: int | str = "auto"
    max_steps: int | None = None         # stop after this many optimizer steps (smoke runs)
    gradient_accumulation: int = 1
    warmup_ratio: float = 0.03
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    gradient_checkpointing: bool = False
    save_every_steps: int = 500
    keep_checkpoints: int = 2
    log_every_steps: int = 10
    seed: int = 42
    num_workers: int = 2
    init_from: str | None = None         # stage 1 only: a model folder or encoder start point to begin from
    embedding_rows: str = "all"          # "new": of the token embeddings and LM head, only the added tokens' rows train
    # The module groups this stage trains (r1seg_core.model.stages.TRAINABLE_GROUPS); None: the stage's default set.
    trainable: list[str] | None = None
    autocast_bf16: bool = False          # bf16 autocast around the forward (CPUs with bf16 instructions); weights stay fp32
    # Stages 3-4: weight of a loss that pulls each [SEG] prompt towards stage 1's text prompt for the same structure
    # (squared distance), so the segment projector learns what the decoder was trained on. 0: off (the paper).
    seg_prompt_alignment: float = 0.0
    threads: int | None = None           # CPU threads per rank (default: the cores split between the ranks)
    # Dice on `validation_windows` fixed held-out (case, structure) windows every this many optimizer steps and at
    # the end (0: never; stages with a mask decoder only). The windows come from `validation_sources`: prepared
    # datasets of cases kept out of training (a data.yaml source reading the `validation` part of a split file).
    validation_every_steps: int = 0
    validation_sources: list[str] = field(default_factory=list)
    validation_windows: int = 8
    crops: CropSettings = field(default_factory=CropSettings)
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    questions: QuestionSettings = field(default_factory=QuestionSettings)
    deepspeed: dict = field(default_factory=dict)   # merged over ds_config.json for this stage


@dataclass
class Recipe:
    folder: Path
    model: dict
    sources: list[SourceSpec]
    stages: dict[int, StageConfig]
    deepspeed: dict

    def model_config(self) -> R1Seg3DConfig:
        """The full model of stages 2-4 (and of the exported folder)."""
        config = preset_config(self.model["preset"]).to_dict()
        return R1Seg3DConfig.from_dict(deep_merge(config, self.model.get("overrides", {})))

    def sam_config(self) -> R1Seg3DConfig:
        """Stage 1's model: the full model's encoder, decoder and preprocessing with a frozen text encoder."""
        return R1Seg3DConfig.from_dict(deep_merge(self.model_config().to_dict(), self.model["sam_mode"]))

    def stage_deepspeed(self, stage: int) -> dict:
        return deep_merge(self.deepspeed, self.stages[stage].deepspeed)

    def bf16(self, stage: int) -> bool:
        return bool(self.stage_deepspeed(stage).get("bf16", {}).get("enabled", False))


def deep_merge(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` written over it, recursing into dicts (a None replaces a whole section)."""
    merged = deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = deepcopy(value)
    return merged


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise InvalidInputError(f"recipe file {path} is missing")
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise InvalidInputError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(content, dict):
        raise InvalidInputError(f"{path} must hold a mapping of settings")
    return content


def _build(cls, values: dict, where: str):
    """A settings dataclass from a mapping; unknown keys are an error that names the file."""
    names = {f.name for f in fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise InvalidInputError(f"{where}: unknown settings {sorted(unknown)}; known: {sorted(names)}")
    try:
        return cls(**values)
    except TypeError as error:
        raise InvalidInputError(f"{where}: {error}") from error


def _stage(path: Path, stage: int) -> StageConfig:
    values = _read_yaml(path)
    if values.get("stage", stage) != stage:
        raise InvalidInputError(f"{path} says stage {values['stage']}, expected {stage}")
    values["stage"] = stage
    for key, cls in (("crops", CropSettings), ("augment", AugmentSettings), ("questions", QuestionSettings)):
        values[key] = _build(cls, values.get(key) or {}, f"{path} [{key}]")
    if values.get("init_from"):
        values["init_from"] = str((path.parent / expand_variables(values["init_from"], str(path), "init_from")).resolve())
    if "adam_betas" in values:
        values["adam_betas"] = tuple(values["adam_betas"])
    config = _build(StageConfig, values, str(path))
    try:
        trainable_groups(stage, config.trainable)
    except InvalidInputError as error:
        raise InvalidInputError(f"{path}: {error}") from None
    if config.samples_per_epoch not in EPOCH_COUNTS and not (
            type(config.samples_per_epoch) is int and config.samples_per_epoch > 0):
        raise InvalidInputError(f"{path}: samples_per_epoch must be one of {list(EPOCH_COUNTS)} or a positive number "
                                f"of samples; got {config.samples_per_epoch!r}")
    crops = config.crops
    if crops.balance not in ("case", "structure"):
        raise InvalidInputError(f"{path}: crops.balance must be 'case' or 'structure', got {crops.balance!r}")
    if crops.balance == "structure" and not crops.targets:
        raise InvalidInputError(f"{path}: crops.balance 'structure' needs crops.targets, the structures to balance")
    if set(crops.target_weights) - set(crops.targets or ()):
        raise InvalidInputError(f"{path}: crops.target_weights names structures that are not crops.targets: "
                                f"{sorted(set(crops.target_weights) - set(crops.targets or ()))}")
    if crops.masks_per_crop < 1 or (crops.masks_per_crop > 1 and stage != 1):
        raise InvalidInputError(f"{path}: crops.masks_per_crop must be 1, or more in stage 1 only")
    if stage == 1 and crops.whole_volume_ratio > 0 and not crops.whole_volume_masks:
        raise InvalidInputError(f"{path}: stage 1 trains masks only, so its whole-volume crops need "
                                "crops.whole_volume_masks: true (or whole_volume_ratio: 0)")
    if config.seg_prompt_alignment and stage < 3:
        raise InvalidInputError(f"{path}: seg_prompt_alignment needs [SEG] prompts: stages 3 and 4 only")
    if not config.sources:
        raise InvalidInputError(f"{path}: 'sources' names no prepared dataset")
    if config.validation_every_steps and not (config.validation_sources and config.validation_windows > 0):
        raise InvalidInputError(f"{path}: validation_every_steps needs validation_sources and validation_windows > 0")
    if config.init_from is not None and stage != 1:
        raise InvalidInputError(f"{path}: init_from is for stage 1; later stages start from the previous stage's export")
    return config


def _expand_paths(node, where: str, keys: str = ""):
    """Environment variables in path settings ($MODELS/Phi-3-mini...), so one recipe serves several clusters."""
    if isinstance(node, dict):
        return {k: expand_variables(v, where, f"{keys}{k}") if k == "path" and isinstance(v, str)
                else _expand_paths(v, where, f"{keys}{k}.") for k, v in node.items()}
    return node


def load_recipe(folder: Path | str) -> Recipe:
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise InvalidInputError(f"recipe folder {folder} does not exist")
    model = _expand_paths(_read_yaml(folder / "model.yaml"), str(folder / "model.yaml"))
    unknown = set(model) - {"preset", "overrides", "sam_mode"}
    if unknown or "preset" not in model or "sam_mode" not in model:
        raise InvalidInputError(f"{folder / 'model.yaml'}: needs 'preset' and 'sam_mode' (and optional 'overrides'); "
                                f"unknown keys {sorted(unknown)}")
    data = _read_yaml(folder / "data.yaml")
    sources = [SourceSpec.from_dict(source, folder) for source in data.get("sources", [])]
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise InvalidInputError(f"{folder / 'data.yaml'}: source names must be unique, got {names}")
    stages = {n: _stage(folder / f"stage{n}.yaml", n) for n in STAGES}
    for n, stage in stages.items():
        missing = (set(stage.sources) | set(stage.validation_sources)) - set(names)
        if missing:
            raise InvalidInputError(f"{folder / f'stage{n}.yaml'}: sources {sorted(missing)} are not in data.yaml")
    ds_path = folder / "ds_config.json"
    try:
        deepspeed = json.loads(ds_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InvalidInputError(f"{ds_path} cannot be read: {error}") from error
    recipe = Recipe(folder, model, sources, stages, deepspeed)
    for n, stage in stages.items():
        # Rank 0 validates alone while the others wait: under ZeRO-3 its forward would need their parameter shards.
        if stage.validation_every_steps and recipe.stage_deepspeed(n).get("zero_optimization", {}).get("stage", 0) >= 3:
            raise InvalidInputError(f"{folder / f'stage{n}.yaml'}: validation_every_steps needs ZeRO stage 0-2; "
                                    "this stage's DeepSpeed config uses ZeRO-3")
    recipe.model_config()       # fail now, not after hours of stage 1, on a broken model section
    recipe.sam_config()
    return recipe
