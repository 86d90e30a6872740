"""The sizes and settings of the published models, and how the original configuration files describe them.

A converted model's `R1Seg3DConfig` starts from the published sizes of its source type, then takes what the
source itself says (the `config.json` of an original Hugging Face folder), then the `--config` file: either
such an original `config.json` or a compatibility-vector description (`*.config.json` of the compat set).
"""
from __future__ import annotations

import json
from copy import deepcopy
from pathlib import Path

from ..config import (CompatibilityConfig, DecoderConfig, EncoderConfig, LanguageModelConfig, LoraConfig,
                      R1Seg3DConfig, TextEncoderConfig)
from ..errors import CheckpointError
from ..model.builder import LLAMA31_8B, PHI3_MINI
from .keymaps import LORA, MERGED, SAM, SEGVOL_VIT

ORIGINAL_REPOSITORY = "lihaoqin168/R1Seg-3D"
# A converted model's card["source"]; the predictor picks the `original` inference profile for folders that carry it.
ORIGINAL_SOURCE_URL = f"https://github.com/{ORIGINAL_REPOSITORY}"
# The key layout and behaviour reproduced here are those of this commit (the model code is unchanged at HEAD 2974945).
ORIGINAL_COMMIT = "a91c959"
SEGVOL_REPOSITORY = "BAAI-DCAI/SegVol"
RELEASES = {
    SAM: "lihao0011/R1Seg-3D-SAM",
    ("phi3", MERGED): "lihao0011/R1Seg-3D-Phi-3-4B",
    ("llama", MERGED): "lihao0011/R1Seg-3D-llama-3-8B",
    SEGVOL_VIT: "BAAI/SegVol (ViT_pretrain.ckpt)",
}

# What the original code did, which this project changes by default (see CompatibilityConfig).
ORIGINAL_BEHAVIOUR = CompatibilityConfig(seg_state="before", average_seg_states=True, image_insertion="after_bos",
                                         first_generated_seg_visible=False)
# The original inference and evaluation scripts set num_clicks = 2 whatever the saved config says.
ORIGINAL_REFINE_LOOPS = 2
ORIGINAL_LORA = dict(r=16, alpha=32, dropout=0.05)

# The text tower of openai/clip-vit-base-patch32, which stage 1 loads (its legacy eos_token_id 2 selects the
# pooling at the largest token id, the end-of-text token).
CLIP_VIT_B32_TEXT = dict(model_type="clip_text_model", vocab_size=49408, hidden_size=512, intermediate_size=2048,
                         num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                         layer_norm_eps=1e-5, projection_dim=512, bos_token_id=0, eos_token_id=2, pad_token_id=1)
# The LLMs of the two releases.
PUBLISHED_LLMS = {"phi3": PHI3_MINI, "llama": LLAMA31_8B}

# Keys the LaMed wrapper adds to the LLM's Hugging Face config; they describe the vision side, not the LLM.
_LAMED_KEYS = {"image_channel", "img_size", "patch_size", "mlp_dim", "num_layers", "num_heads", "need_text_en",
               "num_clicks", "seg_token_id", "test_mode", "tune_mm_mlp_adapter", "vision_module", "vision_tower"}
_LAMED_KEY_PREFIXES = ("mm_", "proj_", "vision_", "segmentation_")
_RUN_KEYS = {"architectures", "_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache", "model_type"}
# The original ViT sizes when its config does not name them (the released configs do not).
_ORIGINAL_VIT_FALLBACK = dict(mlp_dim=3072, num_layers=12, num_heads=12)


def published_config(kind: str, family: str | None = None) -> R1Seg3DConfig:
    """Paper sizes of a source type, with the original behaviour switches."""
    language_model = text_encoder = None
    if kind in (MERGED, LORA):
        hf = dict(PUBLISHED_LLMS[family or "phi3"])
        language_model = LanguageModelConfig(hf_config=hf, lora=LoraConfig(**ORIGINAL_LORA))
    if kind == SAM:
        text_encoder = TextEncoderConfig(hf_config=dict(CLIP_VIT_B32_TEXT))
    return R1Seg3DConfig(encoder=EncoderConfig(), decoder=DecoderConfig(), language_model=language_model,
                         text_encoder=text_encoder, compatibility=deepcopy(ORIGINAL_BEHAVIOUR),
                         refine_loops=ORIGINAL_REFINE_LOOPS)


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"configuration file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def is_original_hf_config(data: dict) -> bool:
    """An original `config.json` is a Hugging Face LLM config extended by LaMed (it has `mm_hidden_size`)."""
    return "model_type" in data and "mm_hidden_size" in data


def family_of(model_type: str | None) -> str | None:
    """The LLM family in a LaMed model type such as "lamed_phi3_cross"."""
    for family, marker in (("phi3", "phi3"), ("llama", "llama"), ("qwen2", "qwen"), ("mistral", "mistral")):
        if model_type and marker in model_type.lower():
            return family
    return None


def apply_original_hf_config(config: R1Seg3DConfig, data: dict, source: Path) -> None:
    """Sizes from an original LaMed `config.json`: the ViT (under mm_*/img_size names) and the LLM itself."""
    family = family_of(data.get("model_type"))
    if family is None:
        raise CheckpointError(f"{source}: model_type {data.get('model_type')!r} names no supported LLM family")
    vit = {**_ORIGINAL_VIT_FALLBACK, **{k: data[k] for k in _ORIGINAL_VIT_FALLBACK if k in data}}
    config.encoder = EncoderConfig(image_size=tuple(data.get("img_size", config.encoder.image_size)),
                                   patch_size=tuple(data.get("patch_size", config.encoder.patch_size)),
                                   hidden_size=data.get("mm_hidden_size", config.encoder.hidden_size),
                                   depth=vit["num_layers"], num_heads=vit["num_heads"], mlp_dim=vit["mlp_dim"])
    if data.get("proj_pooling_size"):
        config.projector_pool = data["proj_pooling_size"]
    llm = {k: v for k, v in data.items()
           if k not in _LAMED_KEYS and k not in _RUN_KEYS and not k.startswith(_LAMED_KEY_PREFIXES)}
    if llm.get("rope_scaling", {}) is None:
        del llm["rope_scaling"]     # "no scaling" is the default; naming it only draws a deprecation warning
    # Over the published LLM of that family, so that a partial --config changes only what it names.
    config.language_model.hf_config = {**PUBLISHED_LLMS.get(family, {}), **llm, "model_type": family}


def apply_compat_description(config: R1Seg3DConfig, data: dict, source: Path) -> None:
    """Sizes from a compatibility-vector description (`r1seg3d_*_tiny.config.json`)."""
    if "hf_config_json" in data and config.language_model is not None:
        apply_original_hf_config(config, data["hf_config_json"], source)
    vit = data.get("image_encoder", {})
    if vit:
        hidden = next((v for k, v in vit.items() if k.split(" ")[0] == "hidden_size"), config.encoder.hidden_size)
        config.encoder = EncoderConfig(image_size=tuple(vit.get("img_size", config.encoder.image_size)),
                                       patch_size=tuple(vit.get("patch_size", config.encoder.patch_size)),
                                       hidden_size=hidden, depth=vit.get("num_layers", config.encoder.depth),
                                       num_heads=vit.get("num_heads", config.encoder.num_heads),
                                       mlp_dim=vit.get("mlp_dim", config.encoder.mlp_dim))
    decoder = data.get("mask_decoder", {})
    prompt = data.get("prompt_encoder", {})
    config.decoder = DecoderConfig(
        transformer_depth=decoder.get("transformer_depth", config.decoder.transformer_depth),
        num_heads=decoder.get("transformer_num_heads", config.decoder.num_heads),
        mlp_dim=decoder.get("transformer_mlp_dim", config.decoder.mlp_dim),
        iou_head_hidden=decoder.get("iou_head_hidden_dim", config.decoder.iou_head_hidden),
        num_multimask_outputs=decoder.get("num_multimask_outputs", config.decoder.num_multimask_outputs),
        mask_in_chans=prompt.get("mask_in_chans", decoder.get("mask_in_chans", config.decoder.mask_in_chans)),
        attention_downsample_rate=decoder.get("attention_downsample_rate", config.decoder.attention_downsample_rate))
    text = data.get("text_encoder", {})
    if config.text_encoder is not None and text.get("clip_text_config"):
        clip = {k: v for k, v in text["clip_text_config"].items() if k not in _RUN_KEYS}
        config.text_encoder.hf_config = dict(model_type="clip_text_model", **clip)
    if config.text_encoder is not None and text.get("prompt_template"):
        config.text_encoder.prompt_template = text["prompt_template"]
    if "num_clicks" in data:
        config.refine_loops = data["num_clicks"]
    lora = data.get("lora", {})
    if config.language_model is not None and lora:
        config.language_model.lora = LoraConfig(r=lora.get("r", ORIGINAL_LORA["r"]), alpha=lora.get("lora_alpha", ORIGINAL_LORA["alpha"]),
                                                dropout=lora.get("lora_dropout", ORIGINAL_LORA["dropout"]))


def apply_config_file(config: R1Seg3DConfig, path: Path) -> int | None:
    """Apply a `--config` file of either kind; returns the `seg_token_id` it states, if any."""
    data = read_json(path)
    if is_original_hf_config(data):
        if config.language_model is None:
            raise CheckpointError(f"{path} is the configuration of an LLM model, not of this source type")
        apply_original_hf_config(config, data, path)
        return data.get("seg_token_id")
    apply_compat_description(config, data, path)
    return data.get("hf_config_json", {}).get("seg_token_id")
