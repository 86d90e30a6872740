"""Which original tensor becomes which tensor of this project, for every published layout.

The original names follow the R1Seg-3D code at commit a91c959 (MONAI 1.3 ViT blocks, SAM-style decoder, LaMed
LLM wrapper). A rule maps a name prefix to a new prefix; `None` marks the CLIP-style leftovers the original
built but never used. Names no rule covers are "unknown" and stop a conversion unless the user skips them.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

SAM = "r1seg3d-sam"
MERGED = "r1seg3d"
LORA = "r1seg3d-lora"
SEGVOL_VIT = "segvol-vit"
SOURCE_KINDS = (SAM, MERGED, LORA, SEGVOL_VIT)

# The model the stage-3/4 PEFT state dict wraps: every key starts with this.
PEFT_PREFIX = "base_model.model."
SEGVOL_ENCODER_PREFIX = "model.encoder."
LLM_PREFIX = "language_model.llm."

# Vision modules, named relative to their parent (the stage-1 model, or `model.vision_module.` in the LLM models).
# More specific prefixes come first: the first matching rule wins.
_VISION_RULES = (
    ("image_encoder.patch_embedding.patch_embeddings.1.", "image_encoder.patch_projection."),
    ("image_encoder.patch_embedding.position_embeddings", "image_encoder.position_embeddings"),
    ("image_encoder.", "image_encoder."),
    ("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix", "prompt_encoder.positional_encoding.gaussian_matrix"),
    ("prompt_encoder.mask3D_downscaling.", "prompt_encoder.mask_downscaling."),
    ("prompt_encoder.", "prompt_encoder."),
    ("mask_decoder.txt_align_upscaled_embedding.", "mask_decoder.prompt_similarity."),
    ("mask_decoder.", "mask_decoder."),
    # CLIP-style leftovers of the original (contrastive projections and temperature): built, never used.
    ("mm_vision_proj.", None),
    ("mm_language_proj.", None),
    ("logit_scale", None),
)


def _sam_rules(clip_inner_prefix: str) -> tuple:
    """The original kept transformers 4.x's CLIPTextModel, whose layers sit under `text_model.`; transformers 5
    dropped that level. `clip_inner_prefix` is what the installed version's model has there ("text_model." or "")."""
    return _VISION_RULES + (
        ("text_encoder.clip_text_model.text_model.", "text_encoder.text_model." + clip_inner_prefix),
        ("text_encoder.dim_align.", "text_encoder.dim_align."),
    )


def _llm_model_rules(llm_prefix: str) -> tuple:
    """Rules for the LaMed causal LM: vision and projectors are renamed, the Hugging Face LLM keeps its names."""
    vision = tuple(("model.vision_module." + old, new) for old, new in _VISION_RULES)
    return vision + (
        ("model.mm_projector.projector.", "projector.layers."),
        ("model.seg_projector.", "segment_projector."),
        ("model.", llm_prefix + "model."),
        ("lm_head.", llm_prefix + "lm_head."),
    )


_MERGED_RULES = _llm_model_rules(LLM_PREFIX)
# The PEFT wrapper of this project has the same structure as the original's, so LLM names (base_layer, lora_A...)
# carry over as they are; vision and projector names lose the wrapper prefix.
_LORA_RULES = tuple((PEFT_PREFIX + old, new if new is None or not new.startswith(LLM_PREFIX)
                     else LLM_PREFIX + PEFT_PREFIX + new[len(LLM_PREFIX):]) for old, new in _MERGED_RULES)
_SEGVOL_RULES = (
    (SEGVOL_ENCODER_PREFIX + "patch_embedding.patch_embeddings.1.", "image_encoder.patch_projection."),
    (SEGVOL_ENCODER_PREFIX + "patch_embedding.position_embeddings", "image_encoder.position_embeddings"),
    (SEGVOL_ENCODER_PREFIX, "image_encoder."),
)


@dataclass
class KeyMapping:
    """The outcome of mapping one file's keys: what goes where, what is dropped and why."""
    renamed: dict[str, str] = field(default_factory=dict)   # original key -> project key
    unused: list[str] = field(default_factory=list)         # known leftovers, dropped
    skipped: list[str] = field(default_factory=list)        # named by --skip-keys, dropped
    unknown: list[str] = field(default_factory=list)        # no rule: the conversion stops unless skipped


def rules_for(kind: str, clip_inner_prefix: str = "") -> tuple:
    return {SAM: _sam_rules(clip_inner_prefix), MERGED: _MERGED_RULES, LORA: _LORA_RULES, SEGVOL_VIT: _SEGVOL_RULES}[kind]


def map_keys(kind: str, original_keys, skip_patterns: tuple[str, ...] = (), clip_inner_prefix: str = "") -> KeyMapping:
    """Apply the layout's rules to every key; `skip_patterns` are exact names or shell-style globs."""
    rules = rules_for(kind, clip_inner_prefix)
    mapping = KeyMapping()
    for key in original_keys:
        if any(fnmatch.fnmatchcase(key, pattern) for pattern in skip_patterns):
            mapping.skipped.append(key)
            continue
        for old, new in rules:
            if key.startswith(old):
                if new is None:
                    mapping.unused.append(key)
                else:
                    mapping.renamed[key] = new + key[len(old):]
                break
        else:
            mapping.unknown.append(key)
    return mapping


def detect_layout(keys) -> str | None:
    """Which published layout a set of keys looks like, or None."""
    keys = list(keys)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has(PEFT_PREFIX + "model."):
        return LORA
    if has("model.vision_module.") or has("lm_head."):
        return MERGED
    if has(SEGVOL_ENCODER_PREFIX):
        return SEGVOL_VIT
    if has("image_encoder.") and has("mask_decoder."):
        return SAM
    return None


def llm_family(keys) -> str:
    """Phi-3 fuses the attention and MLP input projections; Llama-style models keep them apart."""
    return "phi3" if any(".self_attn.qkv_proj." in k for k in keys) else "llama"


def lora_target_modules(keys) -> list[str]:
    """Module names (relative to the Hugging Face model) that carry a LoRA adapter in a PEFT state dict."""
    marker = ".lora_A."
    return sorted({k[len(PEFT_PREFIX):k.index(marker)] for k in keys if marker in k and k.startswith(PEFT_PREFIX)})
