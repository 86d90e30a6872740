"""What trains in each of the four training stages; everything else is frozen.

The default sets (`STAGE_MODULES`) are the released code's (model_anchors.md §1.8):
1. R1Seg3D-SAM: encoder, prompt encoder, mask decoder and the text projection (text tower frozen).
2. Projector alignment: multimodal projector plus the token embeddings and LM head (the new tokens must learn).
3. LoRA instruction tuning: LoRA, projector, embeddings, LM head and segment projector; encoder and decoder frozen.
4. Joint fine-tuning: stage 3 plus prompt encoder and mask decoder; the encoder stays frozen.
A recipe may name another set per stage from the stage's `TRAINABLE_GROUPS` (the paper's text trains only the
projector in stage 2 and all three modules, encoder included, in stage 4).
"""
from __future__ import annotations

import torch

from ..errors import InvalidInputError

STAGE_MODULES = {
    1: ("image_encoder", "prompt_encoder", "mask_decoder", "text_projection"),
    2: ("projector", "embeddings"),
    3: ("projector", "embeddings", "lora", "segment_projector"),
    4: ("projector", "embeddings", "lora", "segment_projector", "prompt_encoder", "mask_decoder"),
}
# The groups a stage's model has: stage 1 is the SAM mode (frozen text tower, no LLM), stages 2-4 the full model.
# "embeddings" is the token embedding and LM head, "lora" the LoRA adapters of the LLM, "text_projection" the
# Linear from the frozen text tower into the prompt space.
_VISION_GROUPS = ("image_encoder", "prompt_encoder", "mask_decoder")
TRAINABLE_GROUPS = {1: (*_VISION_GROUPS, "text_projection"),
                    **{stage: (*_VISION_GROUPS, "projector", "embeddings", "lora", "segment_projector")
                       for stage in (2, 3, 4)}}
_PREFIXES = {"text_projection": "text_encoder.dim_align"}


def trainable_groups(stage: int, groups=None) -> tuple[str, ...]:
    """The groups stage `stage` trains: `groups` (a recipe's `trainable` list) checked, or the stage's default."""
    if stage not in STAGE_MODULES:
        raise InvalidInputError(f"training stage must be 1, 2, 3 or 4; got {stage}")
    if groups is None:
        return STAGE_MODULES[stage]
    if not isinstance(groups, (list, tuple)) or not groups or not all(isinstance(g, str) for g in groups):
        raise InvalidInputError(f"stage {stage}: trainable must be a non-empty list of module groups from "
                                f"{list(TRAINABLE_GROUPS[stage])}; got {groups!r}")
    unknown = [g for g in groups if g not in TRAINABLE_GROUPS[stage]]
    if unknown:
        raise InvalidInputError(f"stage {stage}: trainable names unknown module groups {unknown}; stage {stage} "
                                f"can train {list(TRAINABLE_GROUPS[stage])}")
    return tuple(dict.fromkeys(groups))


def _is_selected(name: str, groups: tuple[str, ...], embedding_names: set[str]) -> bool:
    for group in groups:
        if group == "lora" and "lora_" in name:
            return True
        if group == "embeddings" and name in embedding_names:
            return True
        if name.startswith(_PREFIXES.get(group, group) + "."):
            return True
    return False


EMBEDDING_ROWS = ("all", "new")


def set_trainable(model, stage: int, embedding_rows: str = "all", groups=None) -> list[str]:
    """Freeze all parameters except the stage's set; returns the trainable parameter names.

    `groups`: the module groups to train (see `trainable_groups`); None trains the stage's default set.

    `embedding_rows="new"` trains only the rows of the added tokens (`<im_patch>`, box tokens, `[SEG]`) of the token
    embeddings and LM head: the other rows' gradients are zeroed, so with no weight decay on them (see
    `trained_rows`) they keep the pretrained values. For a small LLM the whole matrix is most of what stage 2 would
    train (SmolLM2-135M: 28 M of 34 M parameters), and a shipped model then only needs the new rows.
    """
    if embedding_rows not in EMBEDDING_ROWS:
        raise InvalidInputError(f"embedding_rows must be one of {EMBEDDING_ROWS}; got {embedding_rows!r}")
    groups = trainable_groups(stage, groups)
    if stage == 1 and model.text_encoder is None:
        raise InvalidInputError("stage 1 trains the SAM mode: the model needs a text encoder")
    if stage >= 2 and model.language_model is None:
        raise InvalidInputError(f"stage {stage} needs a language model")
    if "lora" in groups and not model.language_model.has_lora:
        raise InvalidInputError(f"stage {stage} trains LoRA: call model.language_model.enable_lora first")
    embedding_names = set()
    if model.language_model is not None:
        ids = {id(model.language_model.embed_tokens.weight), id(model.language_model.lm_head.weight)}
        embedding_names = {n for n, p in model.named_parameters() if id(p) in ids}
    trainable = []
    for name, parameter in model.named_parameters():
        selected = _is_selected(name, groups, embedding_names)
        parameter.requires_grad_(selected)
        if selected:
            trainable.append(name)
            if name in embedding_names and embedding_rows == "new":
                _train_rows_only(parameter, added_token_ids(model))
    return trainable


def added_token_ids(model) -> list[int]:
    """Ids of the tokens R1Seg3D adds to the LLM's vocabulary."""
    from ..prompting import BOX_TOKENS, IMAGE_TOKEN, SEG_TOKEN

    return model.tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, *BOX_TOKENS, SEG_TOKEN])


def trained_rows(parameter) -> list[int] | None:
    """The rows a row-restricted parameter trains (None: all of it); the optimizer must not decay such a parameter."""
    return getattr(parameter, "r1seg_trained_rows", None)


def _train_rows_only(parameter, rows: list[int]) -> None:
    if trained_rows(parameter) is not None:
        return                          # tied embeddings: input and output are one parameter, hooked once
    keep = torch.zeros(parameter.shape[0], 1, dtype=torch.bool)
    keep[rows] = True
    parameter.r1seg_trained_rows = list(rows)
    parameter.register_hook(lambda grad: grad * keep.to(grad.device))
