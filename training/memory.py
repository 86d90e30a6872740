"""Estimated GPU memory per stage and LLM (what training/README.md tabulates): arithmetic, not a measurement.

    python -m training.memory --gpus 8 [--checkpointing]                      # every preset, default trainable sets
    python -m training.memory --gpus 8 --recipe training/recipes/paper-phi3   # a recipe's preset, sets and batches

Parameter counts are exact: each preset is built on the `meta` device and `set_trainable` picks each stage's
set (the recipe's `trainable` groups, or the default). The rest follows ZeRO-2 with bf16 weights and AdamW:
- weights: every parameter in bf16 on every GPU (ZeRO-2 does not shard parameters);
- gradients: bf16, sharded over the GPUs, plus one full gradient of the largest trained tensor while it is
  reduced (the token embedding from stage 2 on);
- optimizer: fp32 master weights and the two Adam moments (12 bytes per trained parameter), sharded;
- DeepSpeed's gradient buckets: 2 x reduce_bucket_size bf16 elements (overlap_comm double-buffers them);
- activations: the tensors autograd keeps for backward, per token and layer as Korthikanti et al. 2022 ("Reducing
  Activation Recomputation in Large Transformer Models") count them. The per-layer byte counts below were measured
  on this project's modules in bf16 with torch.autograd.graph.saved_tensors_hooks (CPU, torch 2.13, SDPA): a
  small Llama-shaped LLM with and without LoRA, the ViT-B encoder and the paper-size decoder. Frozen Linear
  layers keep no input, which is why a frozen LLM costs less than a trained one. Gradient checkpointing keeps
  one layer input per layer and recomputes one layer at a time.
Not included: the CUDA context and allocator fragmentation (add about 10 %), and data-loader pinned memory.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

GIB = 1024 ** 3
SEQUENCE = 350            # 256 visual tokens + question (implicit descriptions are the longest) + answer
BUCKET_ELEMENTS = 5e8     # ds_config.json reduce_bucket_size
PAPER_BATCH = {"phi3-mini": (16, 8, 6, 6), "llama3-8b": (16, 4, 2, 2), "qwen2.5-7b": (16, 4, 2, 2), "mistral-7b": (16, 4, 2, 2)}
# ViT-B encoder, trained in stage 1 only: 24.9 kB per token and block measured, i.e. about 16 x hidden bf16
# values (norm inputs and outputs, q, k, v, attention output, MLP input, hidden and activation).
ENCODER_BYTES_PER_TOKEN_LAYER = 24_931
ENCODER_TOKENS, ENCODER_LAYERS = 2048, 12
# One decoder pass per prompted mask, measured: 118 MB (mostly the two upscaling stages, 192 x 16x32x32 and
# 96 x 32x64x64, with their norms and activations, and the text-similarity product).
DECODER_BYTES_PER_PASS = 118e6
CLIP_TEXT_PARAMETERS = 63_165_952      # CLIP ViT-B/32 text tower (CLIPTextModel(CLIPTextConfig()))
STAGE_1_PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")


@dataclass
class Counts:
    total: int
    trained: int
    largest_trained: int


def stage_counts(preset: str, stage: int, groups: list[str] | None = None) -> Counts:
    """Total, trained and largest trained parameter counts of a stage training `groups` (None: the default set)."""
    import torch

    from r1seg_core.model.builder import build_model, preset_config
    from r1seg_core.model.stages import set_trainable, trainable_groups

    groups = trainable_groups(stage, groups)
    with torch.device("meta"):
        model = build_model(preset_config(preset), tokenizer=False)
        if "lora" in groups:
            model.language_model.enable_lora(model.config.language_model.lora)
    if stage == 1:
        # The SAM mode: the LLM side is replaced by the frozen CLIP text tower and a 512 -> 768 projection.
        trained = [p.numel() for group in groups if group != "text_projection" for p in getattr(model, group).parameters()]
        trained += [512 * 768 + 768] if "text_projection" in groups else []
        return Counts(sum(p.numel() for group in STAGE_1_PARTS for p in getattr(model, group).parameters())
                      + 512 * 768 + 768 + CLIP_TEXT_PARAMETERS, sum(trained), max(trained))
    set_trainable(model, stage, groups=groups)
    trained = [p.numel() for p in model.parameters() if p.requires_grad]
    return Counts(sum(p.numel() for p in model.parameters()), sum(trained), max(trained))


def llm_bytes_per_token_layer(config: dict, stage: int, lora_rank: int = 16) -> float:
    """Measured exactly on a bf16 Llama-shaped decoder layer (h 256, i 704, 8/2 heads), then written per size."""
    h, i = config["hidden_size"], config["intermediate_size"]
    kv = h * config["num_key_value_heads"] // config["num_attention_heads"]
    # The two RMSNorm inputs in fp32 (HF norms upcast), SDPA's q and output, k and v, the MLP's gate, up and
    # activation in bf16.
    frozen = 12 * h + 4 * kv + 6 * i
    # LoRA on all 7 Linear layers: two input-sized bf16 tensors each (dropout output and mask), and the rank-r
    # intermediate.
    lora = 4 * (6 * h + i) + 14 * lora_rank if stage >= 3 else 0
    return frozen + lora


def activation_bytes(preset: str, stage: int, batch: int, checkpointing: bool, groups: tuple[str, ...]) -> float:
    from r1seg_core.model.builder import preset_config

    # A trained encoder keeps its blocks' activations (stage 1, and stage 4 where the paper trains it); gradient
    # checkpointing of the encoder applies in stage 1 only (stage_model.enable_gradient_checkpointing).
    encoder = 0.0
    if "image_encoder" in groups:
        encoder = ENCODER_BYTES_PER_TOKEN_LAYER * ENCODER_TOKENS * ENCODER_LAYERS
        encoder /= ENCODER_LAYERS if checkpointing and stage == 1 else 1
    if stage == 1:
        return batch * (encoder + 2 * DECODER_BYTES_PER_PASS)
    config = preset_config(preset).language_model.hf_config
    per_layer = llm_bytes_per_token_layer(config, stage) * SEQUENCE
    layers = config["num_hidden_layers"]
    llm = (layers * 2 * config["hidden_size"] * SEQUENCE + per_layer) if checkpointing else layers * per_layer
    # The decoder runs 3 passes (2 refinement loops) and its activations are kept so that gradients reach the
    # segment projector (stage 3) or the decoder itself (stage 4); about one prompted mask per sample.
    decoder = 3 * DECODER_BYTES_PER_PASS if stage >= 3 else 0
    return batch * (llm + decoder + encoder)


def estimate(preset: str, stage: int, gpus: int, checkpointing: bool, batch: int | None = None,
             groups: list[str] | None = None) -> dict[str, float]:
    from r1seg_core.model.stages import trainable_groups

    groups = trainable_groups(stage, groups)
    counts = stage_counts(preset, stage, groups)
    batch = batch or PAPER_BATCH[preset][stage - 1]
    parts = {"weights": 2 * counts.total,
             "gradients": 2 * counts.trained / gpus + 2 * counts.largest_trained,
             "optimizer": 12 * counts.trained / gpus,
             "buckets": 2 * 2 * BUCKET_ELEMENTS,
             "activations": activation_bytes(preset, stage, batch, checkpointing, groups)}
    return {**{k: v / GIB for k, v in parts.items()}, "total": sum(parts.values()) / GIB, "batch": batch,
            "trained_millions": counts.trained / 1e6}


def table(gpus: int, checkpointing: bool, recipe=None) -> str:
    """Every preset with the paper batches and default sets, or one recipe's preset, batches and trainable sets."""
    lines = ["| LLM | stage | batch/GPU | trained (M) | weights | grads | optimizer | buckets | activations | total (GiB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    plans = ([(preset, stage, None, None) for preset in PAPER_BATCH for stage in (1, 2, 3, 4)] if recipe is None else
             [(recipe.model["preset"], n, c.micro_batch_size, c.trainable) for n, c in recipe.stages.items()])
    for preset, stage, batch, groups in plans:
        e = estimate(preset, stage, gpus, checkpointing, batch, groups)
        lines.append(f"| {preset} | {stage} | {e['batch']} | {e['trained_millions']:.0f} | {e['weights']:.1f} | "
                     f"{e['gradients']:.1f} | {e['optimizer']:.1f} | {e['buckets']:.1f} | {e['activations']:.1f} | "
                     f"**{e['total']:.1f}** |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=8, help="GPUs sharing the ZeRO-2 partitions")
    parser.add_argument("--checkpointing", action="store_true", help="with gradient checkpointing")
    parser.add_argument("--recipe", type=Path, help="a recipe folder: its preset, batch sizes and trainable sets")
    args = parser.parse_args(argv)
    recipe = None
    if args.recipe:
        from .recipe import load_recipe

        recipe = load_recipe(args.recipe)
    print(table(args.gpus, args.checkpointing, recipe))


if __name__ == "__main__":
    main()
