"""Run a converted model on the inputs of a compatibility-vector file and record every step under its names.

The names and the steps are those of the compat README (`shared/reference/compat/README.md`): stage-1 models
run the text-prompted forward; LLM models run the teacher-forced training forward and the generation cases
`g1`, `g2`, ... whose tokens the original forced (stored as `gN_output_ids`). A model holding an unmerged LoRA
adapter writes its tensors with the prefix `unmerged_`, the names the README gives the LoRA layout.
Which behaviour runs (the original's quirks or this project's rules) is the model's `compatibility` config.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import InvalidInputError
from ..model.r1seg3d import NO_SEG_LOGIT, R1Seg3D, SegmentationOutput, bce_loss, dice_loss

UNMERGED_PREFIX = "unmerged_"
# The original allowed two tokens beyond the forced ones (greedy decoding after them).
EXTRA_GENERATION_TOKENS = 2
_CASE_NAME = re.compile(r"^(g\d+)_output_ids$")


def run_compat(model_dir: Path, io_path: Path, out_path: Path) -> list[str]:
    """Writes the results to `out_path` (safetensors) and returns their names."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    try:
        inputs = load_file(str(io_path))
    except (SafetensorError, OSError) as error:
        raise InvalidInputError(f"{io_path} is missing or not a safetensors file: {error}") from error
    model = R1Seg3D.from_pretrained(model_dir)
    try:
        with torch.no_grad():
            if model.language_model is None:
                results = run_text_prompted(model, inputs)
            else:
                results = run_teacher_forced(model, inputs)
                results.update(run_generation_cases(model, inputs))
    except InvalidInputError as error:
        raise InvalidInputError(f"{io_path}: {error}") from error
    if model.language_model is not None and model.language_model.has_lora:
        results = {UNMERGED_PREFIX + name: tensor for name, tensor in results.items()}
    # Several names can be views of one tensor (the text embedding is every pass's sparse prompt): store copies.
    save_file({name: tensor.detach().clone().contiguous() for name, tensor in results.items()}, str(out_path))
    return sorted(results)


def _required(inputs: dict, *names: str) -> list[torch.Tensor]:
    missing = [n for n in names if n not in inputs]
    if missing:
        raise InvalidInputError(f"the inputs lack {', '.join(missing)}")
    return [inputs[n] for n in names]


def decoder_tensors(model: R1Seg3D, segmentation: SegmentationOutput, traces: list[dict]) -> dict:
    """The prompt-encoder and decoder outputs of every pass, and the decoder internals of pass 0."""
    out = {"dense_pe": model.prompt_encoder.dense_positional_encoding()}
    for k, (trace, low_res, iou) in enumerate(zip(traces, segmentation.low_res_passes, segmentation.iou_passes)):
        out[f"pass{k}_sparse"] = trace["sparse"]
        out[f"pass{k}_dense"] = trace["dense"]
        out[f"pass{k}_lowres"] = low_res
        out[f"pass{k}_iou_pred"] = iou
    out["pass0_twt_queries"] = traces[0]["twt_queries"]
    out["pass0_twt_keys"] = traces[0]["twt_keys"]
    out["pass0_upscaled_item0"] = traces[0]["upscaled"][:1]
    return out


def _encoder_tensors(model: R1Seg3D, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
    tokens, blocks = model.image_encoder(images, return_block_outputs=True)
    out = {f"vit_block_{i}": block for i, block in enumerate(blocks)}
    out.update(vit_tokens=tokens, image_embedding=model.image_encoder.tokens_to_grid(tokens))
    return tokens, out


def run_text_prompted(model: R1Seg3D, inputs: dict) -> dict:
    """Stage 1: CLIP text embedding as the prompt of every decoder pass, losses on the final logits."""
    images, segs, ids, mask = _required(inputs, "images", "segs", "clip_input_ids", "clip_attention_mask")
    tokens, out = _encoder_tensors(model, images)
    text_outputs = model.text_encoder.text_model(input_ids=ids, attention_mask=mask)
    out.update(clip_last_hidden_state=text_outputs.last_hidden_state, clip_pooler_output=text_outputs.pooler_output)
    text_embedding = model.text_encoder(ids, mask)
    traces: list[dict] = []
    segmentation = model.decode_masks(tokens, text_embedding, traces=traces)
    out.update(text_embedding=text_embedding, logits=segmentation.logits, **decoder_tensors(model, segmentation, traces))
    targets = segs.to(torch.int32)
    out.update(loss_dice=dice_loss(segmentation.logits, targets), loss_bce=bce_loss(segmentation.logits, targets))
    out["loss_total"] = out["loss_dice"] + out["loss_bce"]
    return out


def run_teacher_forced(model: R1Seg3D, inputs: dict) -> dict:
    """The training forward of the README's batch: LLM states and logits, [SEG] prompts, decoder passes, losses."""
    images, segs, input_ids, attention_mask, labels = _required(
        inputs, "images", "segs", "input_ids", "attention_mask", "labels")
    seg_counts = (input_ids == model.token_ids["seg"]).sum(1)
    # The original gives each item one ground truth; with one mask per [SEG], every [SEG] of the item gets it.
    masks_per_item = 1 if model.config.compatibility.average_seg_states else max(int(seg_counts.max()), 1)
    target_masks = segs.expand(-1, masks_per_item, *segs.shape[2:])
    traces: list[dict] = []
    result = model(images, input_ids, attention_mask, labels, target_masks, traces=traces)
    hidden = result.hidden_states
    label_positions = torch.nonzero(labels[:, 1:] != -100)
    out = {"vit_tokens": result.image_tokens,
           "image_embedding": model.image_encoder.tokens_to_grid(result.image_tokens),
           "projector_pooled": model.projector.pool_tokens(result.image_tokens),
           "projector_out": result.visual_tokens,
           "llm_hidden_states_0": model.embed_prompt_sequence(input_ids, result.visual_tokens),
           "llm_hidden_states_2": hidden,
           "lm_label_positions": label_positions,
           "lm_logits_at_label_positions": model.language_model.logits(hidden[label_positions[:, 0], label_positions[:, 1]]),
           "loss_lm": result.loss_lm, "loss_dice": result.loss_dice, "loss_bce": result.loss_bce, "loss_total": result.loss}
    if result.segmentation is not None:
        out.update(seg_hidden=result.seg_hidden, seg_prompt=result.seg_prompt, mask_logits=result.segmentation.logits,
                   **decoder_tensors(model, result.segmentation, traces))
    return out


def question_item(inputs: dict) -> int:
    """The batch item whose image the generation cases use: the one whose sequence starts with the question."""
    question, input_ids = _required(inputs, "gen_question_ids", "input_ids")
    length = question.shape[1]
    matches = [b for b in range(input_ids.shape[0]) if torch.equal(input_ids[b, :length], question[0])]
    if not matches:
        raise InvalidInputError("no item of input_ids starts with gen_question_ids: cannot tell which image was asked about")
    return matches[0]


def generate_with_forced_tokens(model: R1Seg3D, image_tokens: torch.Tensor, prompt_ids: torch.Tensor,
                                forced_ids: list[int], max_new_tokens: int) -> dict:
    """Greedy decoding with the KV cache where the first len(forced_ids) tokens are imposed, stopping at eos.

    Returns the prefill's last-layer states, the generated ids, and the last-layer state AT each generated token
    that was fed back (all but the last one when decoding stopped at eos), as the original's generate saw them.
    """
    lm, eos = model.language_model, model.token_ids["eos"]
    embeds = model.embed_prompt_sequence(prompt_ids, model.projector(image_tokens))
    prefill, cache = lm(embeds, use_cache=True)
    prefill_last_logits = logits = lm.logits(prefill[:, -1])
    generated, states = [], []
    for step in range(max_new_tokens):
        token = forced_ids[step] if step < len(forced_ids) else int(logits.argmax(-1))
        generated.append(token)
        if token == eos:
            break
        hidden, cache = lm(lm.embed_tokens(torch.tensor([[token]], device=prompt_ids.device)), past_key_values=cache, use_cache=True)
        states.append(hidden)
        logits = lm.logits(hidden[:, -1])
    steps = torch.cat(states, dim=1) if states else prefill.new_zeros(1, 0, prefill.shape[-1])
    return {"prefill": prefill, "prefill_last_logits": prefill_last_logits,
            "output_ids": torch.tensor([generated], device=prompt_ids.device), "steps": steps}


def run_generation_cases(model: R1Seg3D, inputs: dict) -> dict:
    """Every `gN` case of the input file: the stored output ids are the tokens the original forced."""
    cases = sorted((m.group(1) for m in map(_CASE_NAME.match, inputs) if m), key=lambda name: int(name[1:]))
    if not cases:
        return {}
    images, prompt_ids = _required(inputs, "images", "gen_question_ids")
    item = question_item(inputs)
    image_tokens = model.encode_images(images[item:item + 1])
    out = {}
    for case in cases:
        forced = inputs[f"{case}_output_ids"][0].tolist()
        generation = generate_with_forced_tokens(model, image_tokens, prompt_ids, forced, len(forced) + EXTRA_GENERATION_TOKENS)
        output_ids = generation["output_ids"]
        out[f"{case}_output_ids"] = output_ids
        out[f"{case}_prefill_last_hidden"] = generation["prefill"]
        out[f"{case}_prefill_last_logits"] = generation["prefill_last_logits"]
        out[f"{case}_step_last_hidden"] = generation["steps"][:, :output_ids.shape[1] - 1]
        states = torch.cat([generation["prefill"], generation["steps"]], dim=1)
        # The final eos was never fed back, so it has no state; no [SEG] rule reads one there.
        sequence = torch.cat([prompt_ids, output_ids], dim=1)[:, :states.shape[1]]
        found = model.seg_prompts(sequence, states, answer_start=prompt_ids.shape[1])
        if not found.rows:
            logits = images.new_full((1, 1, *model.window_size), NO_SEG_LOGIT)
        else:
            traces: list[dict] = []
            segmentation = model.decode_masks(image_tokens.expand(len(found.rows), -1, -1), found.prompts, traces=traces)
            logits = segmentation.logits
            out.update({f"{case}_seg_hidden": found.hidden, f"{case}_seg_prompt": found.prompts})
            out.update({f"{case}_pass{k}_lowres": low for k, low in enumerate(segmentation.low_res_passes)})
        out[f"{case}_mask_logits"] = logits
        out[f"{case}_all_minus_1000"] = torch.tensor(bool((logits == NO_SEG_LOGIT).all()))
        out[f"{case}_logits_shape"] = torch.tensor(list(logits.shape))
    return out
