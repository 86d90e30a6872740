"""The model each stage trains, and how one stage hands over to the next.

Every stage starts from the previous stage's exported folder (the inference format, LoRA merged):
1. R1Seg3D-SAM: a SAM-mode model (frozen text encoder instead of the LLM), fresh or from `init_from`: a model
   folder (e.g. a converted R1Seg-3D-SAM) or an encoder start point (`r1seg convert --from segvol-vit`, the
   paper's SimMIM-pretrained SegVol ViT).
2. The full model, built fresh (pretrained LLM from its folder), with the encoder, prompt encoder and mask
   decoder taken from stage 1's export. The two configs must agree on those parts and on preprocessing.
3. Stage 2's export with LoRA added.
4. Stage 3's export, whose LoRA is already merged, with a fresh LoRA: the same function at the start, and the
   adapter learns stage 4's change on top (the original continued stage 3's adapter; the sum is equivalent).
A LoRA is added in whichever stage trains the `lora` group (stages 3 and 4 by default), and each export merges it.

`build_stage_model` is deterministic for a given recipe and init folder, so training, resume and export all
rebuild the same frozen weights and only the trained ones travel through DeepSpeed checkpoints.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from r1seg_core.config import R1Seg3DConfig
from r1seg_core.errors import CheckpointError
from r1seg_core.model.builder import build_model
from r1seg_core.model.checkpoint import check_state_dict, read_weights
from r1seg_core.model.r1seg3d import R1Seg3D
from r1seg_core.model.stages import set_trainable, trainable_groups

from .recipe import Recipe

VISION_PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")
STAGE_NAMES = {1: "R1Seg3D-SAM", 2: "projector alignment", 3: "LoRA instruction tuning", 4: "joint fine-tuning"}


def build_stage_model(stage: int, recipe: Recipe, init: Path | None, dtype: torch.dtype | None = None) -> R1Seg3D:
    """The stage's model with its trainable set; `dtype` bf16 halves the host memory of a bf16 run's build."""
    # Fresh parts (projector, LoRA, random tiny LLMs) come out the same on every rank and in the export.
    torch.manual_seed(recipe.stages[stage].seed)
    if stage == 1:
        model = build_model(recipe.sam_config(), dtype=dtype)
        if recipe.stages[1].init_from:
            start_stage1(model, Path(recipe.stages[1].init_from))
    elif stage == 2:
        model = build_model(recipe.model_config(), dtype=dtype)
        take_vision_parts(model, _required(init, stage))
    else:
        model = R1Seg3D.from_pretrained(_required(init, stage), dtype=dtype)
    config = recipe.stages[stage]
    groups = trainable_groups(stage, config.trainable)
    if "lora" in groups:
        # A fresh adapter: on stage 3, over stage 2's export; on stage 4, over stage 3's merged one.
        model.language_model.enable_lora(model.config.language_model.lora)
    set_trainable(model, stage, config.embedding_rows, groups)
    return model


def _required(init: Path | None, stage: int) -> Path:
    if init is None or not (Path(init) / "config.json").is_file():
        what = "init_from" if stage == 1 else f"stage {stage - 1}'s exported model"
        raise CheckpointError(f"stage {stage} starts from {what}, but {init} is not a model folder"
                              + ("" if stage == 1 else f": run stage {stage - 1} first"))
    return Path(init)


def start_stage1(model: R1Seg3D, folder: Path) -> None:
    from r1seg_core.convert.segvol import ENCODER_CONFIG, load_encoder_start_point

    if (folder / ENCODER_CONFIG).is_file():
        load_encoder_start_point(model, folder)
    else:
        take_vision_parts(model, _required(folder, 1))


def take_vision_parts(model: R1Seg3D, folder: Path) -> None:
    """Copy the encoder, prompt encoder and mask decoder weights of another model folder into `model`."""
    source = R1Seg3DConfig.load(folder)
    for part in ("encoder", "decoder", "preprocess"):
        if getattr(source, part) != getattr(model.config, part):
            raise CheckpointError(f"{folder} has a different {part} ({getattr(source, part)}) than this model "
                                  f"({getattr(model.config, part)}); the stages must share it")
    prefixes = tuple(p + "." for p in VISION_PARTS)
    found = {k: v for k, v in read_weights(folder).items() if k.startswith(prefixes)}
    expected = {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}
    check_state_dict(expected, found, f"the encoder and decoder weights in {folder}")
    model.load_state_dict(found, strict=False)


def set_training_mode(model: torch.nn.Module) -> None:
    """train() for what learns; eval() for every fully frozen part, so e.g. the frozen text encoder drops nothing."""
    model.train()
    for module in model.modules():
        parameters = list(module.parameters())
        if parameters and not any(p.requires_grad for p in parameters):
            module.eval()


def enable_gradient_checkpointing(model: R1Seg3D, stage: int) -> None:
    """Recompute activations in backward: the LLM's layers (stages 2-4) or the encoder's blocks (stage 1, the
    only stage where the encoder trains; frozen parts keep no activations anyway)."""
    if stage == 1:
        for block in model.image_encoder.blocks:
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    else:
        model.language_model.causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def frozen_fingerprint(model: torch.nn.Module) -> list[float]:
    """Two sums over the frozen weights: checkpoints leave them out, so a rebuild must reproduce them exactly.

    Taken over bf16-rounded values, so a bf16 training build and the fp32 export build of the same weights agree."""
    total, absolute = 0.0, 0.0
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.requires_grad:
                rounded = parameter.to(torch.bfloat16).double()
                total += float(rounded.sum())
                absolute += float(rounded.abs().sum())
    return [total, absolute]


class Stage1Prompts:
    """Each structure's decoder prompt as stage 1 trained it (its frozen text encoder and trained text projection),
    computed once per name: the target of the [SEG] alignment loss."""

    def __init__(self, stage1_folder: Path):
        self.model = R1Seg3D.from_pretrained(stage1_folder)
        if self.model.text_encoder is None:
            raise CheckpointError(f"{stage1_folder} is not a stage-1 (SAM-mode) model: it has no text encoder")
        self.model.eval()
        self.known: dict[str, torch.Tensor] = {}

    def __call__(self, names: list[str]) -> torch.Tensor:
        """(len(names), C) prompts."""
        new = sorted(set(names) - set(self.known))
        if new:
            with torch.no_grad():
                self.known.update(zip(new, self.model.text_prompts(new, torch.device("cpu"))))
        return torch.stack([self.known[name] for name in names])
