"""An LLM fine-tuned from a packaged base, stored as what training changed: a low-rank adapter and the added rows.

Training merges each stage's LoRA into the LLM, so a trained model holds the whole LLM (SmolLM2-135M: 540 MB in
fp32). What it learnt is small: every weight the LoRA stages touched differs from the base by a matrix of rank at
most the sum of their ranks, and of the token embeddings only the added tokens' rows trained
(`stages.set_trainable(embedding_rows="new")`). A model folder can therefore name the base weights (an installed
package and its file's SHA-256, see packaged.py) and store only:
- `adapter/`: a PEFT LoRA adapter whose factors are the exact SVD of each changed weight (rank `rank`);
- the added tokens' embedding rows, under ADDED_ROWS_KEYS in model.safetensors.
Anything else that differs from the base is an error: nothing is silently dropped.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import CheckpointError

ADDED_ROWS_KEYS = {"input": "language_model.added_token_rows.input", "output": "language_model.added_token_rows.output"}
# A weight whose largest change is below this is unchanged (the base is rebuilt bit for bit from the same file).
UNCHANGED_ATOL = 1e-6


def build_base(language_model_config, tokenizer):
    """The packaged base LLM with the tokenizer's vocabulary (added tokens' rows at their initial value)."""
    from .language_model import add_special_tokens, build_causal_lm

    base = build_causal_lm(language_model_config)
    add_special_tokens(tokenizer, base)
    return base


def added_rows(causal_lm, token_ids: list[int]) -> dict[str, torch.Tensor]:
    rows = {"input": causal_lm.get_input_embeddings().weight[token_ids]}
    if not causal_lm.config.tie_word_embeddings:
        rows["output"] = causal_lm.get_output_embeddings().weight[token_ids]
    return {ADDED_ROWS_KEYS[k]: v.detach().clone() for k, v in rows.items()}


def set_added_rows(causal_lm, token_ids: list[int], state: dict[str, torch.Tensor]) -> None:
    """Write the stored rows into the base's embeddings; pops them from `state`."""
    with torch.no_grad():
        causal_lm.get_input_embeddings().weight[token_ids] = state.pop(ADDED_ROWS_KEYS["input"]).to(
            causal_lm.get_input_embeddings().weight.dtype)
        if ADDED_ROWS_KEYS["output"] in state:
            causal_lm.get_output_embeddings().weight[token_ids] = state.pop(ADDED_ROWS_KEYS["output"]).to(
                causal_lm.get_output_embeddings().weight.dtype)


def low_rank_factors(base, tuned_state: dict[str, torch.Tensor], rank: int,
                     token_ids: list[int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """For each Linear whose weight changed, (A, B) with B @ A equal to the change; raises on any other change."""
    base_state = base.state_dict()
    if set(base_state) != set(tuned_state):
        raise CheckpointError(f"the LLM's weights do not match its base model's: {sorted(set(base_state) ^ set(tuned_state))[:5]}")
    linear_weights = {name + ".weight" for name, module in base.named_modules() if isinstance(module, nn.Linear)}
    embeddings = (base.get_input_embeddings().weight, base.get_output_embeddings().weight)
    embedding_names = {name for name, p in base.named_parameters() if any(p is e for e in embeddings)}
    embedding_names |= {name for name in base_state if name.endswith(("embed_tokens.weight", "lm_head.weight"))}
    factors = {}
    for name, weight in tuned_state.items():
        delta = weight.double() - base_state[name].double()
        if name in embedding_names:
            delta[token_ids] = 0       # stored as rows
        if delta.abs().max() <= UNCHANGED_ATOL:
            continue
        if name not in linear_weights or name in embedding_names:
            raise CheckpointError(f"{name} differs from the base model (by up to {float(delta.abs().max()):.3g}) but "
                                  "is not a LoRA-trained linear layer: this model cannot be stored as a delta of its base")
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        if s[rank:].numel() and s[rank] > 1e-4 * s[0]:
            raise CheckpointError(f"the change of {name} has rank above {rank} (singular value {rank + 1} is "
                                  f"{float(s[rank] / s[0]):.2e} of the largest); store it with a larger rank")
        root = s[:rank].sqrt()
        factors[name.removesuffix(".weight")] = ((root[:, None] * vh[:rank]).float(), (u[:, :rank] * root).float())
    return factors


def adapter_from_factors(base, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int):
    """A PEFT LoRA model on `base` (modified in place) whose every adapter equals the given factors (scaling 1)."""
    from peft import LoraConfig, get_peft_model

    # Full module paths, anchored, so only the changed layers get an adapter.
    pattern = "^(" + "|".join(name.replace(".", r"\.") for name in factors) + ")$"
    peft_model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=pattern,
                                                 bias="none", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, (a, b) in factors.items():
            layer = peft_model.get_base_model().get_submodule(name)
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
    return peft_model
