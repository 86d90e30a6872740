"""Presets and the builder: a config (and optionally a tokenizer) in, a ready R1Seg3D out."""
from __future__ import annotations

import dataclasses
from copy import deepcopy

import torch

from ..config import (DecoderConfig, EncoderConfig, LanguageModelConfig, R1Seg3DConfig, TextEncoderConfig)
from ..errors import InvalidInputError
from ..prompting import TokenIds
from .language_model import LanguageModel, add_special_tokens, build_causal_lm, check_architecture
from .r1seg3d import R1Seg3D
from .text_encoder import TextEncoder, build_text_model

# Paper-size LLMs, as the published R1Seg-3D releases' Hugging Face configs describe them (public architecture
# facts). Phi-3-mini-4k keeps a 2047-token sliding window; Llama-3.1-8B rescales its rotary frequencies ("llama3"),
# which changes every position. Their tokenizers are not bundled: use a local folder for real work.
PHI3_MINI = dict(model_type="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, original_max_position_embeddings=4096,
                 sliding_window=2047, rope_theta=10000.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=32000,
                 pad_token_id=32000, tie_word_embeddings=False)
LLAMA31_8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
                  rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                         high_freq_factor=4.0, original_max_position_embeddings=8192),
                  bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False)
QWEN25_7B = dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rms_norm_eps=1e-6,
                 rope_theta=1000000.0, bos_token_id=151643, eos_token_id=151643, tie_word_embeddings=False)
MISTRAL_7B = dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768, rms_norm_eps=1e-5,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)

TINY_LLM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY_ENCODER = EncoderConfig(image_size=(32, 256, 256), patch_size=(4, 16, 16), hidden_size=64, depth=2, num_heads=4, mlp_dim=128)
TINY_DECODER = DecoderConfig(transformer_depth=2, num_heads=4, mlp_dim=128, iou_head_hidden=32)
TINY_TEXT_ENCODER = dict(model_type="bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=128)


def _tiny(model_type: str) -> R1Seg3DConfig:
    return R1Seg3DConfig(encoder=deepcopy(TINY_ENCODER), decoder=deepcopy(TINY_DECODER),
                         language_model=LanguageModelConfig(hf_config=dict(model_type=model_type, **TINY_LLM)))


def _paper(hf_config: dict) -> R1Seg3DConfig:
    return R1Seg3DConfig(language_model=LanguageModelConfig(hf_config=dict(hf_config)))


def _mid() -> R1Seg3DConfig:
    """ViT-B encoder and paper decoder with a small LLM: what a laptop CPU can run, for benchmarks."""
    llm = dict(model_type="qwen2", hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
               num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False)
    return R1Seg3DConfig(language_model=LanguageModelConfig(hf_config=llm))


def _sam_tiny() -> R1Seg3DConfig:
    return R1Seg3DConfig(encoder=deepcopy(TINY_ENCODER), decoder=deepcopy(TINY_DECODER), language_model=None,
                         text_encoder=TextEncoderConfig(hf_config=dict(TINY_TEXT_ENCODER)), refine_loops=1)


PRESETS = {
    "tiny": lambda: _tiny("phi3"),
    "tiny-phi3": lambda: _tiny("phi3"),
    "tiny-llama": lambda: _tiny("llama"),
    "tiny-qwen2": lambda: _tiny("qwen2"),
    "tiny-mistral": lambda: _tiny("mistral"),
    "tiny-sam": _sam_tiny,
    "mid": _mid,
    "phi3-mini": lambda: _paper(PHI3_MINI),
    "llama3-8b": lambda: _paper(LLAMA31_8B),
    "qwen2.5-7b": lambda: _paper(QWEN25_7B),
    "mistral-7b": lambda: _paper(MISTRAL_7B),
}


def preset_config(name: str, **overrides) -> R1Seg3DConfig:
    if name not in PRESETS:
        raise InvalidInputError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    config = PRESETS[name]()
    config.card.setdefault("preset", name)
    return dataclasses.replace(config, **overrides).validate()


def build_model(config: R1Seg3DConfig, tokenizer=None, text_tokenizer=None, dtype: torch.dtype | None = None,
                weights_follow: bool = False) -> R1Seg3D:
    """Build a model with fresh weights (pretrained LLM / text encoder weights when their config names a folder).

    Without a tokenizer, one is read from the LLM folder or, for configs without a folder, the project's small
    tokenizer is built. `tokenizer=False` builds a shape-only model (paper sizes on the `meta` device).
    `weights_follow`: every weight is read from a file right after (checkpoint.load_model), so nothing is drawn at
    random; a fresh model keeps its draws, and with them the random stream seeded training relies on.
    """
    config = deepcopy(config)
    language_model = None
    if config.language_model is not None:
        if tokenizer is None:
            tokenizer = _default_tokenizer(config)
        if tokenizer and not (config.language_model.path or config.language_model.package):
            # A freshly initialised LLM gets exactly the tokenizer's vocabulary (before the added tokens).
            config.language_model.hf_config.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                                   bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        causal_lm = build_causal_lm(config.language_model, dtype)
        if tokenizer is False:
            tokenizer = None
            vocab = causal_lm.config.vocab_size
            config.token_ids = dict(image=vocab - 4, seg=vocab - 1, eos=vocab - 5, pad=vocab - 5, bos=None)
        else:
            add_special_tokens(tokenizer, causal_lm, draw_added_rows=not weights_follow)
            config.token_ids = dataclasses.asdict(TokenIds.from_tokenizer(tokenizer))
            causal_lm.config.pad_token_id = config.token_ids["pad"]
        language_model = LanguageModel(causal_lm)
    text_encoder = None
    if config.text_encoder is not None:
        if text_tokenizer is None:
            text_tokenizer = _default_text_tokenizer(config.text_encoder)
        if not (config.text_encoder.path or config.text_encoder.package):
            config.text_encoder.hf_config["vocab_size"] = len(text_tokenizer)
        text_model = build_text_model(config.text_encoder)
        text_encoder = TextEncoder(text_model, config.encoder.hidden_size, config.text_encoder.prompt_template)
    model = R1Seg3D(config, language_model, tokenizer, text_encoder, text_tokenizer)
    return model.to(dtype) if dtype is not None else model


def build_from_preset(name: str, **overrides) -> R1Seg3D:
    return build_model(preset_config(name, **overrides))


def _default_tokenizer(config: R1Seg3DConfig):
    lm = config.language_model
    if lm.path or lm.package:
        return _pretrained_tokenizer(lm)
    check_architecture(lm.hf_config.get("model_type"))
    from .tokenizer import build_project_tokenizer
    return build_project_tokenizer(lm.hf_config["model_type"])


def _default_text_tokenizer(config: TextEncoderConfig):
    if config.path or config.package:
        return _pretrained_tokenizer(config)
    from .tokenizer import build_project_tokenizer
    return build_project_tokenizer("bert")


def _pretrained_tokenizer(config):
    from transformers import AutoTokenizer

    from .language_model import pretrained_source

    folder, arguments = pretrained_source(config)
    return AutoTokenizer.from_pretrained(folder, **arguments)
