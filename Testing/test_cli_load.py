"""Loading the bundled default model: a warm load reads its base LLM's config from the cache (keyed by the GGUF
file's SHA-256) instead of parsing the whole GGUF metadata again, 5-7 s of every load on a CPU."""
from __future__ import annotations

import pytest

from r1seg_core import default_model_path
from r1seg_core.config import R1Seg3DConfig


def test_a_warm_load_takes_the_base_llm_config_from_the_cache_not_the_gguf_file(monkeypatch):
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers import AutoConfig

    from r1seg_core.model.language_model import _pretrained_config, build_causal_lm, pretrained_source
    from r1seg_core.model.packaged import dequantised_folder

    language_model = R1Seg3DConfig.load(default_model_path()).language_model
    folder, arguments = pretrained_source(language_model)
    build_causal_lm(language_model)                      # fills the cache when it is cold (the first run only)
    assert (dequantised_folder(language_model.package) / "config.json").is_file()
    # The reference: transformers' own reading of the GGUF file.
    parsed = AutoConfig.from_pretrained(folder, **arguments)

    def no_gguf_parsing(*args, **kwargs):
        raise AssertionError("the GGUF metadata was parsed although the cache holds its config")

    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", no_gguf_parsing)
    cached = _pretrained_config(language_model, folder, arguments)
    assert cached.model_type == parsed.model_type
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
                "rope_theta", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings"):
        assert getattr(cached, key, None) == getattr(parsed, key, None), key
    model = build_causal_lm(language_model)
    assert model.config.hidden_size == parsed.hidden_size


def test_an_unreadable_cached_config_falls_back_to_the_gguf_file(monkeypatch, tmp_path):
    from r1seg_core.model.language_model import _pretrained_config, pretrained_source
    from r1seg_core.model.packaged import dequantised_folder

    language_model = R1Seg3DConfig.load(default_model_path()).language_model
    monkeypatch.setenv("R1SEG_CACHE", str(tmp_path))
    cached = dequantised_folder(language_model.package)
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{not json")
    folder, arguments = pretrained_source(language_model)
    assert _pretrained_config(language_model, folder, arguments).model_type == "llama"
