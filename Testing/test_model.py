"""The R1Seg3D network: shapes, the [SEG] rules, the refinement loop, stages, checkpoints, bad input, learning."""
import dataclasses
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from r1seg_core import prompting
from r1seg_core.errors import CheckpointError, InvalidInputError
from r1seg_core.model import R1Seg3D, build_model, preset_config, set_trainable

SMALL_WINDOW = (16, 32, 64)
FAMILIES = ["tiny-phi3", "tiny-llama", "tiny-qwen2", "tiny-mistral"]


def small_model(preset="tiny-phi3", seed=0, **overrides) -> R1Seg3D:
    torch.manual_seed(seed)
    config = preset_config(preset, **overrides)
    config.encoder = dataclasses.replace(config.encoder, image_size=SMALL_WINDOW)
    return build_model(config)


def batch_for(model, answers, question="Please segment the liver in this image."):
    ids = model.token_ids
    prompt = prompting.prompt_ids(model.tokenizer, question, model.num_visual_tokens)
    return prompting.build_teacher_forced_batch(
        [prompt] * len(answers), [prompting.answer_ids(model.tokenizer, a, ids["eos"]) for a in answers], ids["pad"])


@pytest.fixture(scope="module")
def phi3():
    return small_model().eval()


@pytest.mark.parametrize("preset,hidden,rope", [("phi3-mini", 3072, "default"), ("llama3-8b", 4096, "llama3"),
                                               ("qwen2.5-7b", 3584, "default")])
def test_paper_size_shapes_on_meta(preset, hidden, rope):
    with torch.device("meta"):
        model = build_model(preset_config(preset), tokenizer=False)
        images = torch.empty(1, 1, 32, 256, 256)
        tokens = model.encode_images(images)
        visual = model.projector(tokens)
        seg = model.decode_masks(tokens, torch.empty(1, 768))
    # The paper's "LLaMA 3" is Llama-3.1-8B, whose rotary frequencies are rescaled.
    assert model.language_model.causal_lm.model.rotary_emb.rope_type == rope
    assert tokens.shape == (1, 2048, 768)
    assert visual.shape == (1, 256, hidden)
    assert seg.low_res_passes[0].shape == (1, 1, 32, 64, 64)
    assert seg.logits.shape == (1, 1, 32, 256, 256)
    assert len(seg.low_res_passes) == 3
    assert model.segment_projector[2].out_features == 768


@pytest.mark.parametrize("preset", FAMILIES)
def test_forward_and_backward_every_family(preset):
    model = small_model(preset)
    batch = batch_for(model, ["The liver is [SEG].", "Sorry, there is no liver."])
    images = torch.rand(2, 1, *SMALL_WINDOW)
    targets = torch.zeros(2, 1, *SMALL_WINDOW)
    targets[0, 0, 4:10, 8:20, 16:40] = 1
    out = model(images, batch.input_ids, batch.attention_mask, batch.labels, targets)
    assert out.prompt_rows == [(0, 0)]
    assert out.segmentation.logits.shape == (1, 1, *SMALL_WINDOW)
    assert out.loss_lm > 0 and out.loss_dice > 0 and out.loss_bce > 0
    out.loss.backward()
    assert model.image_encoder.patch_projection.weight.grad.abs().sum() > 0
    assert model.language_model.embed_tokens.weight.grad.abs().sum() > 0


def test_qwen_tokenizer_without_bos_places_visual_tokens_by_id():
    model = small_model("tiny-qwen2").eval()
    assert model.tokenizer.bos_token is None
    prompt = prompting.prompt_ids(model.tokenizer, "Segment the liver.", model.num_visual_tokens)
    assert prompt[0] == model.token_ids["image"], "no BOS: the sequence starts with the image tokens"
    ids = torch.tensor([prompt])
    visual = torch.randn(1, model.num_visual_tokens, model.language_model.hidden_size)
    embeds = model.embed_prompt_sequence(ids, visual)
    n = model.num_visual_tokens
    assert torch.equal(embeds[0, :n], visual[0])
    question_embeds = model.language_model.embed_tokens(ids)[0, n:]
    assert torch.equal(embeds[0, n:], question_embeds), "the question's first token must survive"
    # The original's position rule (after a BOS) overwrites the first question token instead.
    model.config.compatibility.image_insertion = "after_bos"
    shifted = model.embed_prompt_sequence(ids, visual)
    assert not torch.equal(shifted[0, n], question_embeds[0])


@pytest.mark.parametrize("loops,passes", [(0, 1), (1, 2), (3, 4)])
def test_refinement_loops_run_one_plus_n_passes(phi3, loops, passes):
    tokens = phi3.encode_images(torch.rand(1, 1, *SMALL_WINDOW))
    traces = []
    seg = phi3.decode_masks(tokens, torch.randn(1, phi3.config.encoder.hidden_size), loops=loops, traces=traces)
    assert len(seg.low_res_passes) == passes
    assert traces[0]["dense"].shape == traces[-1]["dense"].shape
    if passes > 1:
        # Later passes are prompted by the previous raw logits, not by the no-mask embedding.
        assert not torch.allclose(traces[0]["dense"], traces[1]["dense"])


def test_refinement_loops_out_of_range(phi3):
    tokens = phi3.encode_images(torch.rand(1, 1, *SMALL_WINDOW))
    with pytest.raises(InvalidInputError, match="between 0 and 3"):
        phi3.decode_masks(tokens, torch.randn(1, phi3.config.encoder.hidden_size), loops=4)


def test_two_seg_tokens_give_two_masks_and_none_gives_no_mask(phi3):
    batch = batch_for(phi3, ["The liver is [SEG] and the spleen is [SEG].", "Sorry, there is no liver."])
    images = torch.rand(2, 1, *SMALL_WINDOW)
    with torch.no_grad():
        out = phi3(images, batch.input_ids, batch.attention_mask)
    assert out.prompt_rows == [(0, 0), (0, 1)]
    assert out.segmentation.logits.shape[0] == 2
    assert not torch.allclose(out.seg_hidden[0], out.seg_hidden[1])
    # The original averaged all [SEG] states of an item into one mask: still available.
    phi3.config.compatibility.average_seg_states = True
    try:
        with torch.no_grad():
            averaged = phi3(images, batch.input_ids, batch.attention_mask)
    finally:
        phi3.config.compatibility.average_seg_states = False
    assert averaged.prompt_rows == [(0, 0)]
    assert torch.allclose(averaged.seg_hidden[0], out.seg_hidden.mean(0), atol=1e-6)


def test_seg_state_is_the_token_before_by_default(phi3):
    batch = batch_for(phi3, ["It is [SEG]."])
    with torch.no_grad():
        out = phi3(torch.rand(1, 1, *SMALL_WINDOW), batch.input_ids, batch.attention_mask)
    seg_position = int((batch.input_ids[0] == phi3.token_ids["seg"]).nonzero()[0])
    assert torch.equal(out.seg_hidden[0], out.hidden_states[0, seg_position - 1])


def test_stage_parameter_sets():
    model = small_model("tiny-sam")
    names = set_trainable(model, 1)
    assert names and all(n.startswith(("image_encoder.", "prompt_encoder.", "mask_decoder.", "text_encoder.dim_align."))
                         for n in names)
    assert not any(n.startswith("text_encoder.text_model") for n in names)

    model = small_model()
    with pytest.raises(InvalidInputError, match="enable_lora"):
        set_trainable(model, 3)
    stage2 = set(set_trainable(model, 2))
    assert any(n.startswith("projector.") for n in stage2) and any("embed_tokens" in n for n in stage2)
    assert not any(n.startswith(("image_encoder.", "mask_decoder.", "segment_projector.")) for n in stage2)
    model.language_model.enable_lora(model.config.language_model.lora)
    stage3 = set(set_trainable(model, 3))
    assert any("lora_A" in n for n in stage3) and any(n.startswith("segment_projector.") for n in stage3)
    assert not any(n.startswith(("image_encoder.", "prompt_encoder.", "mask_decoder.")) for n in stage3)
    assert not any("q_proj.base_layer" in n for n in stage3), "base LLM weights stay frozen"
    stage4 = set(set_trainable(model, 4))
    assert stage4 - stage3 == {n for n in stage4 if n.startswith(("prompt_encoder.", "mask_decoder."))}
    assert not any(n.startswith("image_encoder.") for n in stage4)


def test_gradients_reach_the_encoder_in_stage_1_and_not_in_stage_3():
    sam = small_model("tiny-sam")
    set_trainable(sam, 1)
    target = torch.zeros(1, 1, *SMALL_WINDOW)
    target[0, 0, 2:8, 4:20, 10:30] = 1
    _, losses = sam.segment_with_text(torch.rand(1, 1, *SMALL_WINDOW), ["liver"], target)
    losses["loss"].backward()
    assert sam.image_encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in sam.text_encoder.text_model.parameters())

    model = small_model()
    model.language_model.enable_lora(model.config.language_model.lora)
    set_trainable(model, 3)
    batch = batch_for(model, ["The liver is [SEG]."])
    out = model(torch.rand(1, 1, *SMALL_WINDOW), batch.input_ids, batch.attention_mask, batch.labels, target)
    out.loss.backward()
    assert model.image_encoder.blocks[0].attn.qkv.weight.grad is None
    assert model.mask_decoder.iou_token.weight.grad is None
    assert model.segment_projector[0].weight.grad.abs().sum() > 0


def test_save_and_load_give_identical_outputs(tmp_path):
    model = small_model("tiny-llama")
    model.language_model.enable_lora(model.config.language_model.lora)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)   # a non-trivial adapter, so merging matters
    model.eval()
    batch = batch_for(model, ["The liver is [SEG]."])
    images = torch.rand(1, 1, *SMALL_WINDOW)
    with torch.no_grad():
        before = model(images, batch.input_ids, batch.attention_mask)
    folder = model.save_pretrained(tmp_path / "ckpt", max_shard_bytes=1_000_000)
    assert (folder / "model.safetensors.index.json").is_file(), "large models are sharded"
    config = json.loads((folder / "config.json").read_text())
    assert config["token_ids"]["seg"] == model.token_ids["seg"] and config["refine_loops"] == 2
    loaded = R1Seg3D.from_pretrained(folder)
    with torch.no_grad():
        after = loaded(images, batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(after.hidden_states, before.hidden_states, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after.segmentation.logits, before.segmentation.logits, atol=1e-4, rtol=1e-4)


def test_loading_in_bf16_casts_every_weight_keeps_rotary_fp32_and_ties_embeddings_again(tmp_path):
    # The loader skips random initialisation and takes the read tensors as parameters: every parameter and
    # buffer must come back equal to the saved one, and tied embeddings must share one tensor again.
    torch.manual_seed(0)
    config = preset_config("tiny-qwen2")
    config.encoder = dataclasses.replace(config.encoder, image_size=SMALL_WINDOW)
    config.language_model.hf_config["tie_word_embeddings"] = True
    model = build_model(config).eval()
    folder = model.save_pretrained(tmp_path / "ckpt")
    loaded = R1Seg3D.from_pretrained(folder, dtype=torch.bfloat16)
    lm = loaded.language_model
    assert lm.lm_head.weight.data_ptr() == lm.embed_tokens.weight.data_ptr()
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    saved = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        expected = saved[name].to(torch.bfloat16) if saved[name].is_floating_point() else saved[name]
        assert torch.equal(tensor, expected), name
    # Rotary frequencies are not weights: rounded to bf16 they would move every position's angle.
    rotary = {name: b for name, b in loaded.named_buffers(remove_duplicate=False) if name.endswith("inv_freq")}
    assert rotary and all(b.dtype == torch.float32 and torch.equal(b, model.get_buffer(name)) for name, b in rotary.items())


def test_loader_names_the_broken_file_and_keys(tmp_path):
    model = small_model()
    folder = model.save_pretrained(tmp_path / "ckpt")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()

    with pytest.raises(CheckpointError, match="nowhere does not exist"):
        R1Seg3D.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        R1Seg3D.from_pretrained(tmp_path / "empty")
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated or corrupt"):
        R1Seg3D.from_pretrained(folder)

    from safetensors.torch import load_file, save_file
    weights.write_bytes(data)
    state = load_file(str(weights))
    del state["mask_decoder.iou_token.weight"]
    state["projector.layers.0.weight"] = torch.zeros(3, 3)
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match=r"missing keys: mask_decoder.iou_token.weight.*shape mismatches: projector.layers.0.weight"):
        R1Seg3D.from_pretrained(folder)
    weights.unlink()
    with pytest.raises(CheckpointError, match="has no weights"):
        R1Seg3D.from_pretrained(folder)


def test_bad_input_is_rejected_with_clear_messages(phi3):
    with pytest.raises(InvalidInputError, match="rank 4"):
        phi3.encode_images(torch.rand(1, *SMALL_WINDOW))
    with pytest.raises(InvalidInputError, match="channel"):
        phi3.encode_images(torch.rand(1, 2, *SMALL_WINDOW))
    with pytest.raises(InvalidInputError, match="windows of"):
        phi3.encode_images(torch.rand(1, 1, 8, 32, 64))
    images = torch.rand(1, 1, *SMALL_WINDOW)
    images[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(InvalidInputError, match="NaN"):
        phi3.encode_images(images)
    with pytest.raises(InvalidInputError, match="unsupported language model architecture 'gpt2'"):
        build_model(dataclasses.replace(preset_config("tiny"), language_model=dataclasses.replace(
            preset_config("tiny").language_model, hf_config={"model_type": "gpt2"})))
    from r1seg_core.model.tokenizer import build_project_tokenizer
    with pytest.raises(InvalidInputError, match=r"lacks the special tokens \['<im_patch>', '\[SEG\]'\]"):
        prompting.TokenIds.from_tokenizer(build_project_tokenizer("phi3"))
    with pytest.raises(InvalidInputError, match="empty"):
        prompting.validate_question("   ")
    with pytest.raises(InvalidInputError, match="limit is"):
        prompting.validate_question("liver " * 400)
    # Sentence case with a final mark, as training writes questions; the words stay the user's.
    assert prompting.validate_question("  segment   the liver ") == "Segment the liver."
    assert prompting.validate_question("is the spleen enlarged?") == "Is the spleen enlarged?"
    assert prompting.validate_question("Where is the pancreas!") == "Where is the pancreas!"


def test_overfitting_one_real_liver_window_halves_the_segmentation_loss(shared_ct):
    """Dice + BCE on a real CT window with the TotalSegmentator liver label must fall by half."""
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_ct / "totalseg_example" / "example_ct.nii.gz"))).astype(np.float32)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_ct / "totalseg_example" / "example_seg.nii.gz")))
    liver = labels == 5
    centre = [int(c.mean()) for c in np.nonzero(liver)]
    region = tuple(slice(max(0, min(c - n // 2, size - n)), max(0, min(c - n // 2, size - n)) + n)
                   for c, n, size in zip(centre, SMALL_WINDOW, ct.shape))
    window_ct, window_liver = ct[region], liver[region]
    assert window_liver.sum() > 50, "the crop must contain liver"
    image = torch.from_numpy(np.clip((window_ct + 1000) / 2000, 0, 1))[None, None]
    target = torch.from_numpy(window_liver.astype(np.float32))[None, None]

    model = small_model()
    model.language_model.enable_lora(model.config.language_model.lora)
    set_trainable(model, 4)
    for parameter in model.image_encoder.parameters():
        parameter.requires_grad_(True)
    batch = batch_for(model, ["The liver is [SEG]."])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(40):
        out = model(image, batch.input_ids, batch.attention_mask, batch.labels, target)
        seg_loss = out.loss_dice + out.loss_bce
        first = first if first is not None else seg_loss.item()
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert seg_loss.item() < first / 2, f"Dice+BCE went from {first:.3f} to {seg_loss.item():.3f}"


def test_named_trainable_groups_replace_the_stage_default():
    """A recipe's `trainable` list (the paper: only the projector in stage 2, all three modules in stage 4)."""
    model = small_model()
    stage2 = set_trainable(model, 2, groups=["projector"])
    assert stage2 == [n for n, _ in model.named_parameters() if n.startswith("projector.")] and stage2
    assert not model.language_model.embed_tokens.weight.requires_grad
    model.language_model.enable_lora(model.config.language_model.lora)
    everything = ["image_encoder", "prompt_encoder", "mask_decoder", "lora", "projector", "segment_projector", "embeddings"]
    stage4 = set(set_trainable(model, 4, groups=everything))
    encoder = {n for n, _ in model.named_parameters() if n.startswith("image_encoder.")}
    assert encoder and encoder <= stage4 and stage4 - encoder == set(set_trainable(model, 4))   # default: ViT frozen
    assert not any("base_layer" in n for n in stage4), "the base LLM weights stay frozen"
    with pytest.raises(InvalidInputError, match=r"unknown module groups \['vit'\].*can train \['image_encoder'"):
        set_trainable(model, 4, groups=["vit"])
    with pytest.raises(InvalidInputError, match="stage 1 can train"):
        set_trainable(small_model("tiny-sam"), 1, groups=["lora"])       # the SAM mode has no LLM
    sam = small_model("tiny-sam")
    names = set_trainable(sam, 1, groups=["text_projection"])
    assert names == [n for n, _ in sam.named_parameters() if n.startswith("text_encoder.dim_align.")] and names


@pytest.mark.parametrize("tied,draw", [(True, True), (False, True), (True, False), (False, False)])
def test_added_token_rows_start_at_the_mean_of_the_old_rows(tied, draw):
    """A load skips transformers' random draw of the new rows (draw=False), so the rows it leaves must all be set:
    old rows kept, each added row the mean of the old ones, in the input and output embeddings. A fresh model
    draws them (and so consumes the random stream as before): the same rows come out."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from r1seg_core.model.language_model import add_special_tokens
    from r1seg_core.model.tokenizer import build_project_tokenizer

    tokenizer = build_project_tokenizer("llama")
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                  tie_word_embeddings=tied)
    causal_lm = AutoModelForCausalLM.from_config(config)
    before_in = causal_lm.get_input_embeddings().weight.detach().clone()
    before_out = causal_lm.get_output_embeddings().weight.detach().clone()
    added = add_special_tokens(tokenizer, causal_lm, draw_added_rows=draw)
    assert added > 0 and len(tokenizer) == before_in.shape[0] + added
    for weight, before in ((causal_lm.get_input_embeddings().weight, before_in),
                           (causal_lm.get_output_embeddings().weight, before_out)):
        assert weight.shape[0] == len(tokenizer)
        assert torch.equal(weight[:before.shape[0]], before)
        expected = before.double().sum(0) / before.shape[0]          # the mean, by hand
        assert torch.allclose(weight[before.shape[0]:].double(), expected.expand(added, -1), atol=1e-6)
    assert (causal_lm.get_input_embeddings().weight.data_ptr() == causal_lm.get_output_embeddings().weight.data_ptr()) == tied
