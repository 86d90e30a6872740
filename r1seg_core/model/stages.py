"""What trains in each of the four training stages; everything else is frozen.

1. R1Seg3D-SAM: encoder, prompt encoder, mask decoder and the text projection (text tower frozen).
2. Projector alignment: multimodal projector plus the token embeddings and LM head (the new tokens must learn).
3. LoRA instruction tuning: LoRA, projector, embeddings, LM head and segment projector; encoder and decoder frozen.
4. Joint fine-tuning: stage 3 plus prompt encoder and mask decoder; the encoder stays frozen.
"""
from __future__ import annotations

from ..errors import InvalidInputError

STAGE_MODULES = {
    1: ("image_encoder", "prompt_encoder", "mask_decoder", "text_encoder.dim_align"),
    2: ("projector", "embeddings"),
    3: ("projector", "embeddings", "lora", "segment_projector"),
    4: ("projector", "embeddings", "lora", "segment_projector", "prompt_encoder", "mask_decoder"),
}


def _is_selected(name: str, groups: tuple[str, ...], embedding_names: set[str]) -> bool:
    for group in groups:
        if group == "lora" and "lora_" in name:
            return True
        if group == "embeddings" and name in embedding_names:
            return True
        if name.startswith(group + "."):
            return True
    return False


def set_trainable(model, stage: int) -> list[str]:
    """Freeze all parameters except the stage's set; returns the trainable parameter names."""
    if stage not in STAGE_MODULES:
        raise InvalidInputError(f"training stage must be 1, 2, 3 or 4; got {stage}")
    groups = STAGE_MODULES[stage]
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
    return trainable
