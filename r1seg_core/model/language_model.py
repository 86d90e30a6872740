"""Language model wrapper (Fig. 2, "LLM + LoRA"): any Hugging Face causal LM, with visual tokens placed by token id.

The wrapper owns three things the rest of the model relies on: the added tokens (`<im_patch>`, `[SEG]`), where
the visual tokens go in the input embeddings, and a forward that returns the last-layer hidden states (after the
final norm, the states the LM head sees) from which the `[SEG]` embedding is picked.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from ..config import LanguageModelConfig, LoraConfig
from ..errors import CheckpointError, InvalidInputError
from ..prompting import BOX_TOKENS, IMAGE_TOKEN, SEG_TOKEN

SUPPORTED_ARCHITECTURES = ("phi3", "llama", "qwen2", "mistral")


def build_causal_lm(config: LanguageModelConfig, dtype: torch.dtype | None = None):
    """A causal LM from a local folder (pretrained weights) or from a config dict (random weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if config.path or config.package:
        folder, arguments = pretrained_source(config)
        check_architecture(_pretrained_config(config, folder, arguments).model_type)
        if "gguf_file" in arguments:
            from .packaged import dequantised_gguf

            return dequantised_gguf(config.package, folder, arguments, dtype or torch.float32)
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32, **arguments)
    if not config.hf_config or "model_type" not in config.hf_config:
        raise InvalidInputError("the language model needs either a local folder (path) or a config dict with model_type")
    settings = dict(config.hf_config)
    model_type = settings.pop("model_type")
    check_architecture(model_type)
    hf_config = AutoConfig.for_model(model_type, **settings)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype or torch.float32)
    return model


def _pretrained_config(config: LanguageModelConfig, folder: Path, arguments: dict):
    """The pretrained LLM's Hugging Face config. A GGUF file's is read from its dequantised copy when one is cached
    (keyed by the file's SHA-256): parsing the GGUF metadata again takes 5-7 s of every load on a CPU."""
    from transformers import AutoConfig

    if "gguf_file" in arguments:
        from .packaged import cached_dequantised

        cached = cached_dequantised(config.package)
        if cached is not None:
            try:
                return AutoConfig.from_pretrained(cached, local_files_only=True)
            except (OSError, ValueError):
                pass                     # an unreadable cache: the GGUF file stays the source of truth
    return AutoConfig.from_pretrained(folder, **arguments)


def pretrained_source(config) -> tuple[Path, dict]:
    """Folder and `from_pretrained` arguments of a pretrained LLM or text encoder: a local folder or a packaged file."""
    from .packaged import from_pretrained_arguments

    if config.package:
        return from_pretrained_arguments(config.package)
    folder = Path(config.path)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"pretrained model folder {folder} has no config.json")
    return folder, {"local_files_only": True}


def check_architecture(model_type: str) -> None:
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise InvalidInputError(
            f"unsupported language model architecture {model_type!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def _cache_argument(decoder) -> str:
    """transformers 5.2x renamed the decoder's `past_key_values` argument to `cache`."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def add_special_tokens(tokenizer, causal_lm, draw_added_rows: bool = True) -> int:
    """Add `<im_patch>`, the box tokens and `[SEG]`; new embedding rows start at the mean of the old ones.

    Returns how many tokens were added. The order matches the original release so ids line up.
    `draw_added_rows=False` skips transformers' random draw of every row of the resized matrices (0.3 s at SmolLM2
    size), for a model loaded from a checkpoint; a fresh model keeps it, so seeded runs draw the same numbers.
    """
    vocab = tokenizer.get_vocab()        # a copy of 49k-150k entries each call: read once
    specials = [t for t in (IMAGE_TOKEN, *BOX_TOKENS) if t not in vocab]
    added = tokenizer.add_special_tokens({"additional_special_tokens": specials}) if specials else 0
    if SEG_TOKEN not in vocab:
        added += tokenizer.add_tokens([SEG_TOKEN])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    old_rows = causal_lm.get_input_embeddings().weight.shape[0]
    if len(tokenizer) != old_rows:
        with nullcontext() if draw_added_rows else _embedding_init_skipped(causal_lm):
            causal_lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            for embeddings in (causal_lm.get_input_embeddings(), causal_lm.get_output_embeddings()):
                if embeddings is not None and len(tokenizer) > old_rows:
                    weight = embeddings.weight
                    weight[old_rows:] = weight[:old_rows].mean(0, keepdim=True)
    return added


@contextmanager
def _embedding_init_skipped(causal_lm):
    """transformers draws every row of a resized embedding and LM head at random before copying the old rows back;
    the added rows are set just after, so that draw is skipped."""
    causal_lm._init_weights = lambda module: None      # an instance attribute shadows the class's initialiser
    try:
        yield
    finally:
        del causal_lm._init_weights


class LanguageModel(nn.Module):
    def __init__(self, causal_lm, lora: LoraConfig | None = None):
        super().__init__()
        self.llm = causal_lm
        self.lora = lora

    def _apply(self, fn, recurse=True):
        # Rotary frequencies stay fp32 whatever the weights' dtype, as Hugging Face creates them: rounded to bf16
        # they would shift the angle of every position (by about a radian at position 260).
        rotary = {name: buffer for name, buffer in self.named_buffers(remove_duplicate=False) if name.endswith("inv_freq")}
        super()._apply(fn, recurse)
        for name, buffer in rotary.items():
            owner_name, _, key = name.rpartition(".")
            owner = self.get_submodule(owner_name)
            owner._buffers[key] = buffer.to(owner._buffers[key].device)
        return self

    @property
    def causal_lm(self):
        """The Hugging Face model without the PEFT wrapper (LoRA layers stay injected in it)."""
        return self.llm.get_base_model() if self.has_lora else self.llm

    @property
    def has_lora(self) -> bool:
        from peft import PeftModel
        return isinstance(self.llm, PeftModel)

    @property
    def hidden_size(self) -> int:
        return self.causal_lm.config.hidden_size

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.causal_lm.get_input_embeddings()

    @property
    def lm_head(self) -> nn.Module:
        return self.causal_lm.get_output_embeddings()

    def enable_lora(self, lora: LoraConfig) -> None:
        from peft import LoraConfig as PeftLoraConfig, get_peft_model

        if self.has_lora:
            return
        peft_config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                                     target_modules=lora.target_modules, task_type="CAUSAL_LM")
        self.llm = get_peft_model(self.llm, peft_config)
        self.lora = lora

    def merge_lora(self) -> None:
        """Fold the adapter into the base weights (what an inference checkpoint holds)."""
        if self.has_lora:
            self.llm = self.llm.merge_and_unload()
            self.lora = None

    def embed(self, input_ids: torch.Tensor, visual_tokens: torch.Tensor | None, image_token_id: int,
              insertion: str = "by_id") -> torch.Tensor:
        """Token embeddings with each row's N visual tokens written over its `<im_patch>` placeholders."""
        embeds = self.embed_tokens(input_ids)
        if visual_tokens is None:
            return embeds
        n = visual_tokens.shape[1]
        visual_tokens = visual_tokens.to(embeds.dtype)
        if insertion == "after_bos":
            # The original assumed exactly one BOS: positions 1..N, whatever ids stand there.
            return torch.cat([embeds[:, :1], visual_tokens, embeds[:, 1 + n:]], dim=1)
        is_image = input_ids == image_token_id
        counts = is_image.sum(1)
        if (counts != n).any():
            raise InvalidInputError(
                f"each sequence needs exactly {n} {IMAGE_TOKEN} tokens for the visual tokens; found {counts.tolist()}")
        embeds = embeds.clone()
        embeds[is_image] = visual_tokens.reshape(-1, visual_tokens.shape[-1])
        return embeds

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values=None, use_cache: bool = False, position_ids: torch.Tensor | None = None):
        """Runs the decoder stack; returns (last hidden states after the final norm, cache)."""
        decoder = self.causal_lm.get_decoder()
        cache_name = _cache_argument(decoder)
        out = decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=use_cache,
                      position_ids=position_ids, **{cache_name: past_key_values})
        return out.last_hidden_state, (getattr(out, cache_name) if use_cache else None)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
