"""Frozen text encoder of the SAM mode (stage 1 and the "without reasoning" ablation).

The target name goes through a frozen Hugging Face text model; its pooled output is mapped by one trainable
Linear (`dim_align`) into the decoder's prompt space, where the LLM path's segment embedding also lives.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import TextEncoderConfig
from ..errors import InvalidInputError


def build_text_model(config: TextEncoderConfig):
    from transformers import AutoConfig, AutoModel

    if config.path or config.package:
        from .language_model import pretrained_source

        folder, arguments = pretrained_source(config)
        return AutoModel.from_pretrained(folder, **arguments)
    if not config.hf_config or "model_type" not in config.hf_config:
        raise InvalidInputError("the text encoder needs either a local folder (path) or a config dict with model_type")
    settings = dict(config.hf_config)
    return AutoModel.from_config(AutoConfig.for_model(settings.pop("model_type"), **settings))


def pooled_output(outputs, attention_mask: torch.Tensor) -> torch.Tensor:
    """The model's own pooled vector (CLIP: end-of-text state; BERT: CLS), else a masked mean."""
    pooled = getattr(outputs, "pooler_output", None)
    if pooled is not None:
        return pooled
    hidden = outputs.last_hidden_state
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


class TextEncoder(nn.Module):
    def __init__(self, text_model, prompt_dim: int, prompt_template: str):
        super().__init__()
        self.text_model = text_model.requires_grad_(False)
        width = getattr(text_model.config, "hidden_size", None) or text_model.config.text_config.hidden_size
        self.dim_align = nn.Linear(width, prompt_dim)
        self.prompt_template = prompt_template

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            outputs = self.text_model(input_ids=input_ids, attention_mask=attention_mask)
            pooled = pooled_output(outputs, attention_mask)
        return self.dim_align(pooled)

    def tokenize(self, tokenizer, target_names: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [self.prompt_template.format(name) for name in target_names]
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        return batch["input_ids"].to(device), batch["attention_mask"].to(device)
