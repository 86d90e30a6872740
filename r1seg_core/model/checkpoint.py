"""Checkpoint folders a user can read: config.json, safetensors weights (sharded when large), tokenizer, model card.

The LLM is stored merged (its weights in the safetensors) or as a base folder path plus a PEFT adapter in
`adapter/`. Nothing is pickled, and every problem names the file and the keys.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..config import R1Seg3DConfig
from ..errors import CheckpointError
from ..model_card import WRITTEN_CARD_NAME, model_card

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
ADAPTER_DIR = "adapter"
TEXT_TOKENIZER_DIR = "text_tokenizer"
LLM_PREFIX = "language_model.llm."
# HF config fields that describe the run, not the architecture.
_VOLATILE_HF_KEYS = {"architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype", "output_attentions",
                     "output_hidden_states", "return_dict", "use_cache"}


def merged_llm_state(language_model) -> dict[str, torch.Tensor]:
    """The LLM's weights with any LoRA adapter folded in, under the plain Hugging Face names; the model is unchanged."""
    if not language_model.has_lora:
        return dict(language_model.causal_lm.state_dict())
    peft_model = language_model.llm
    peft_model.merge_adapter()
    try:
        state = {}
        for key, tensor in language_model.causal_lm.state_dict().items():
            if "lora_" in key:
                continue
            state[key.replace(".base_layer.", ".")] = tensor.clone()
    finally:
        peft_model.unmerge_adapter()
    return state


def architecture_config(causal_lm) -> dict:
    data = causal_lm.config.to_dict()
    return {k: v for k, v in data.items() if k not in _VOLATILE_HF_KEYS}


def save_model(model, folder: Path, merge_lora: bool = True, max_shard_bytes: int = 2 * 1024 ** 3,
               llm_delta_rank: int | None = None) -> Path:
    """`llm_delta_rank`: store the LLM as its packaged base plus a low-rank adapter and the added tokens' rows
    (base_delta.py) instead of its whole weights."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = dataclasses.replace(model.config)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("language_model.")}
    lm = model.language_model
    if lm is not None:
        store_adapter = lm.has_lora and not merge_lora
        if store_adapter and not config.language_model.path:
            raise CheckpointError("an adapter-only checkpoint needs the base LLM folder (language_model.path); save merged instead")
        if llm_delta_rank:
            state.update(_save_llm_delta(model, folder, llm_delta_rank))
            config.language_model = dataclasses.replace(config.language_model, hf_config=architecture_config(lm.causal_lm),
                                                        path=None)
        elif store_adapter:
            lm.llm.save_pretrained(folder / ADAPTER_DIR)
        else:
            state.update({LLM_PREFIX + k: v for k, v in merged_llm_state(lm).items()})
            config.language_model = dataclasses.replace(config.language_model, hf_config=architecture_config(lm.causal_lm),
                                                        path=None, package=None)
        model.tokenizer.save_pretrained(folder)
    if model.text_encoder is not None:
        config.text_encoder = dataclasses.replace(config.text_encoder, hf_config=architecture_config(model.text_encoder.text_model),
                                                  path=None, package=None)
        model.text_tokenizer.save_pretrained(folder / TEXT_TOKENIZER_DIR)
    _write_weights(state, folder, max_shard_bytes, save_file)
    config.save(folder)
    (folder / WRITTEN_CARD_NAME).write_text(model_card(config))
    return folder


def _save_llm_delta(model, folder: Path, rank: int) -> dict[str, torch.Tensor]:
    """Writes `adapter/`; returns the added tokens' rows for model.safetensors."""
    import copy

    from .base_delta import adapter_from_factors, added_rows, build_base, low_rank_factors
    from .stages import added_token_ids

    if not model.config.language_model.package:
        raise CheckpointError("storing the LLM as a delta needs its base weights named by language_model.package")
    token_ids = added_token_ids(model)
    base = build_base(model.config.language_model, copy.deepcopy(model.tokenizer))
    tuned = merged_llm_state(model.language_model)
    factors = low_rank_factors(base, tuned, rank, token_ids)
    # The embeddings are the base's plus the rows kept in model.safetensors: PEFT must not copy the whole matrix.
    adapter_from_factors(base, factors, rank).save_pretrained(folder / ADAPTER_DIR, save_embedding_layers=False)
    # PEFT's template model card names this machine's package folder and says nothing; the folder's card is README.md.
    (folder / ADAPTER_DIR / WRITTEN_CARD_NAME).unlink(missing_ok=True)
    return added_rows(model.language_model.causal_lm, token_ids)


def _write_weights(state: dict, folder: Path, max_shard_bytes: int, save_file) -> None:
    # safetensors refuses tensors sharing memory (tied embeddings): each gets its own copy.
    seen, tensors = set(), {}
    for key, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        pointer = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        tensors[key] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    shards, current, size = [], {}, 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensor
        size += nbytes
    shards.append(current)
    for stale in list(folder.glob("model-*-of-*.safetensors")) + [folder / WEIGHTS_NAME, folder / INDEX_NAME]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                                                 "weight_map": weight_map}, indent=2))


def weight_file_names(folder: Path, index_name: str, single_name: str) -> list[str]:
    """The weight files of a folder: those its index lists (sharded), else its single file, else none."""
    index = folder / index_name
    if index.is_file():
        try:
            return sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as error:
            raise CheckpointError(f"{index} is not a valid weight index: {error}") from error
    return [single_name] if (folder / single_name).is_file() else []


def read_weights(folder: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a folder's safetensors file(s); a truncated or corrupt file is named in the error.

    Floating-point tensors are cast to `dtype` one at a time as they are read, so reading an fp32 file for a
    bf16 model never holds both copies.
    """
    from safetensors import SafetensorError, safe_open

    files = weight_file_names(folder, INDEX_NAME, WEIGHTS_NAME)
    if not files:
        raise CheckpointError(f"{folder} has no weights: expected {WEIGHTS_NAME} or {INDEX_NAME}")
    state = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"weight file {path} is missing (listed in {INDEX_NAME})")
        try:
            with safe_open(str(path), framework="pt") as weights:
                for key in weights.keys():
                    tensor = weights.get_tensor(key)
                    state[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"weight file {path} is truncated or corrupt: {error}") from error
    return state


def check_state_dict(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source: str) -> None:
    """Missing, unexpected and mis-shaped keys, listed by name (the first few of each)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = [f"{k}: file {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in sorted(set(expected) & set(found)) if tuple(found[k].shape) != tuple(expected[k].shape)]
    problems = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if keys:
            shown = ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")
            problems.append(f"{len(keys)} {label}: {shown}")
    if problems:
        raise CheckpointError(f"{source} does not match its config.json: " + "; ".join(problems))


def load_model(folder: Path, device="cpu", dtype: torch.dtype | None = None):
    from transformers import AutoTokenizer

    from .builder import build_model

    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} does not exist")
    config = R1Seg3DConfig.load(folder)
    if config.language_model is not None and config.language_model.path and not Path(config.language_model.path).is_absolute():
        # A base LLM shipped inside the model folder (converted LoRA checkpoints) is named relative to the folder.
        config.language_model.path = str(folder / config.language_model.path)
    tokenizer = text_tokenizer = None
    try:
        if config.language_model is not None:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        if config.text_encoder is not None:
            text_tokenizer = AutoTokenizer.from_pretrained(folder / TEXT_TOKENIZER_DIR, local_files_only=True)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"the tokenizer files in {folder} are missing or unreadable: {error}") from error
    # Built directly in the requested dtype, and without random initialisation: every weight is read from the
    # folder, and initialising a Phi-3-size model first costs over a minute on a CPU.
    with weight_init_skipped():
        model = build_model(config, tokenizer=tokenizer, text_tokenizer=text_tokenizer, dtype=dtype, weights_follow=True)
    if model.config.token_ids != config.token_ids:
        raise CheckpointError(f"the tokenizer in {folder} gives token ids {model.config.token_ids} but config.json says "
                              f"{config.token_ids}: tokenizer and weights do not belong together")
    adapter = folder / ADAPTER_DIR
    state = read_weights(folder, dtype)
    # An LLM built from its base plus an adapter is complete already; the file holds only the rest.
    llm_from_base = config.language_model is not None and adapter.is_dir() and bool(
        config.language_model.package or config.language_model.path)
    if llm_from_base:
        _load_adapter(model, adapter)
    if llm_from_base and config.language_model.package:
        from .base_delta import set_added_rows
        from .stages import added_token_ids

        # Folded in once: inference then runs the plain LLM, as fast as a merged checkpoint.
        model.language_model.merge_lora()
        set_added_rows(model.language_model.causal_lm, added_token_ids(model), state)
    expected = {k: v for k, v in model.state_dict().items() if not (llm_from_base and k.startswith("language_model."))}
    check_state_dict(expected, state, f"the weights in {folder}")
    # The read tensors become the parameters (no second copy of the weights in memory); the file stores tied
    # embeddings twice, so they are tied again.
    model.load_state_dict(state, strict=False, assign=True)
    if model.language_model is not None:
        model.language_model.causal_lm.tie_weights()
    model.eval()
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)


def weight_init_skipped():
    """transformers' switch that makes torch's and its own weight initialisers no-ops (moved in transformers 5)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _load_adapter(model, adapter: Path) -> None:
    from peft import PeftModel

    if not (adapter / "adapter_config.json").is_file():
        raise CheckpointError(f"{adapter} has no adapter_config.json")
    try:
        model.language_model.llm = PeftModel.from_pretrained(model.language_model.llm, adapter, is_trainable=False)
    except (OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"the LoRA adapter in {adapter} could not be loaded: {error}") from error
