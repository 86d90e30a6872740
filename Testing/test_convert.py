"""Issue #6: the authors' released checkpoints convert into model folders that compute what the original computed.

The compatibility vectors (shared/reference/compat, produced by the ORIGINAL code) are converted in each published
layout, replayed with `compat-run`, and every tensor of the compat README's tables is compared (floats within
rtol = atol = 1e-4, integers and booleans exactly). Full-size key layouts are checked on the `meta` device.
"""
from __future__ import annotations

import inspect
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from r1seg_core.cli import main as r1seg
from r1seg_core.convert.converters import build_skeleton, clip_inner_prefix, convert, renamed_state, target_config
from r1seg_core.convert.keymaps import LORA, MERGED, PEFT_PREFIX, SAM, SEGVOL_VIT, map_keys
from r1seg_core.convert.original_config import ORIGINAL_COMMIT, ORIGINAL_REPOSITORY
from r1seg_core.convert.reading import SourceWeights
from r1seg_core.convert.segvol import load_encoder_start_point
from r1seg_core.errors import CheckpointError
from r1seg_core.model.r1seg3d import R1Seg3D
from r1seg_core.volume import Volume

TOLERANCE = dict(rtol=1e-4, atol=1e-4)
PASSES = range(3)
UNUSED_LEFTOVERS = {"logit_scale", "mm_vision_proj.weight", "mm_vision_proj.bias", "mm_language_proj.weight",
                    "mm_language_proj.bias"}

# Every tensor name of the compat README's tables ({k} expanded), besides the inputs.
STAGE1_NAMES = {"clip_last_hidden_state", "clip_pooler_output", "text_embedding", "vit_block_0", "vit_block_1",
                "vit_tokens", "image_embedding", "dense_pe", "pass0_twt_queries", "pass0_twt_keys",
                "pass0_upscaled_item0", "logits", "loss_dice", "loss_bce", "loss_total"}
STAGE1_NAMES |= {f"pass{k}_{part}" for k in PASSES for part in ("sparse", "dense", "lowres", "iou_pred")}
FULL_NAMES = {"vit_tokens", "image_embedding", "projector_pooled", "projector_out", "llm_hidden_states_0",
              "llm_hidden_states_2", "lm_label_positions", "lm_logits_at_label_positions", "loss_lm", "loss_dice",
              "loss_bce", "loss_total", "seg_hidden", "seg_prompt", "dense_pe", "pass0_twt_queries", "pass0_twt_keys",
              "pass0_upscaled_item0", "mask_logits", "g1_prefill_last_logits", "g1_prefill_last_hidden"}
FULL_NAMES |= {f"pass{k}_{part}" for k in PASSES for part in ("sparse", "dense", "lowres", "iou_pred")}
FULL_NAMES |= {f"g{n}_{part}" for n in (1, 2, 5) for part in ("output_ids", "step_last_hidden", "seg_hidden", "seg_prompt")}
FULL_NAMES |= {f"g{n}_pass{k}_lowres" for n in (1, 2, 5) for k in PASSES} | {"g1_mask_logits"}
FULL_NAMES |= {f"g{n}_{part}" for n in (3, 4) for part in ("output_ids", "step_last_hidden", "all_minus_1000", "logits_shape")}
UNMERGED_NAMES = {f"unmerged_{name}" for name in ("llm_hidden_states_2", "seg_hidden", "seg_prompt", "pass2_lowres",
                                                  "loss_lm", "loss_total")}
INPUT_NAMES = {"images", "segs", "clip_input_ids", "clip_attention_mask", "input_ids", "attention_mask", "labels",
               "gen_question_ids"}


def compare(produced: dict, stored: dict, names: set[str]) -> list[str]:
    """Compare the named tensors; returns the names compared (all of them, or the test fails)."""
    missing = sorted(names - set(produced))
    assert not missing, f"compat-run did not write {missing}"
    for name in sorted(names):
        got, want = produced[name], stored[name]
        assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} vs stored {tuple(want.shape)}"
        if want.dtype.is_floating_point:
            assert torch.allclose(got, want, **TOLERANCE), f"{name}: max deviation {(got - want).abs().max().item():.3g}"
        else:
            assert torch.equal(got, want.to(got.dtype)), f"{name}: {got.tolist()} vs stored {want.tolist()}"
    return sorted(names)


# ---- the original layouts, rebuilt from the compat files -----------------------------------------------------

@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def original_hf_folder(compat_dir, work) -> Path:
    """The folder the original merge step writes: config.json, generation_config.json, model.safetensors, tokenizer."""
    folder = work / "original_phi3"
    folder.mkdir()
    description = json.loads((compat_dir / "r1seg3d_phi3_tiny.config.json").read_text())
    (folder / "config.json").write_text(json.dumps(description["hf_config_json"]))
    (folder / "generation_config.json").write_text(json.dumps(description["hf_generation_config_json"]))
    shutil.copy(compat_dir / "r1seg3d_phi3_tiny.safetensors", folder / "model.safetensors")
    for file in (compat_dir / "r1seg3d_phi3_tiny.tokenizer").iterdir():
        shutil.copy(file, folder / file.name)
    return folder


@pytest.fixture(scope="module")
def model_with_lora(compat_dir, work) -> Path:
    """`model_with_lora.bin`, rebuilt by the compat README's rule from the merged and the .lora files."""
    merged = load_file(str(compat_dir / "r1seg3d_phi3_tiny.safetensors"))
    adapter = load_file(str(compat_dir / "r1seg3d_phi3_tiny.lora.safetensors"))
    wrapped = {k.replace(".base_layer.weight", ".weight") for k in adapter if k.endswith(".base_layer.weight")}
    state = {PEFT_PREFIX + k: v for k, v in merged.items() if PEFT_PREFIX + k not in wrapped}
    state.update(adapter)
    listed = [line.split("\t")[0] for line in (compat_dir / "r1seg3d_phi3_tiny.lora.keys.txt").read_text().splitlines()
              if line and not line.startswith("#")]
    assert set(listed) == set(state)
    path = work / "model_with_lora.bin"
    torch.save(state, path)
    return path


def _convert_and_run(compat_dir: Path, work: Path, name: str, argv: list[str], io_name: str) -> tuple[Path, dict]:
    destination, out = work / name, work / f"{name}.out.safetensors"
    assert r1seg(["convert", *argv, str(destination)]) == 0
    assert r1seg(["compat-run", str(destination), str(compat_dir / io_name), str(out)]) == 0
    return destination, load_file(str(out))


@pytest.fixture(scope="module")
def sam_run(compat_dir, work):
    return _convert_and_run(compat_dir, work, "sam", [
        "--from", SAM, str(compat_dir / "r1seg3d_sam_tiny.safetensors"),
        "--config", str(compat_dir / "r1seg3d_sam_tiny.config.json"),
        "--tokenizer", str(compat_dir / "r1seg3d_sam_tiny.tokenizer")], "r1seg3d_sam_tiny.io.safetensors")


@pytest.fixture(scope="module")
def merged_run(compat_dir, work, original_hf_folder):
    return _convert_and_run(compat_dir, work, "phi3", [
        "--from", MERGED, str(original_hf_folder), "--config", str(compat_dir / "r1seg3d_phi3_tiny.config.json")],
        "r1seg3d_phi3_tiny.io.safetensors")


@pytest.fixture(scope="module")
def lora_run(compat_dir, work, model_with_lora):
    return _convert_and_run(compat_dir, work, "phi3_lora", [
        "--from", LORA, str(model_with_lora), "--config", str(compat_dir / "r1seg3d_phi3_tiny.config.json"),
        "--tokenizer", str(compat_dir / "r1seg3d_phi3_tiny.tokenizer")], "r1seg3d_phi3_tiny.io.safetensors")


@pytest.fixture(scope="module")
def stored_sam(compat_dir) -> dict:
    return load_file(str(compat_dir / "r1seg3d_sam_tiny.io.safetensors"))


@pytest.fixture(scope="module")
def stored_phi3(compat_dir) -> dict:
    return load_file(str(compat_dir / "r1seg3d_phi3_tiny.io.safetensors"))


# ---- every tensor of the README's tables -----------------------------------------------------------------------

def test_stage1_model_reproduces_every_stored_tensor(sam_run, stored_sam):
    _, produced = sam_run
    compared = compare(produced, stored_sam, set(stored_sam) - INPUT_NAMES)
    assert STAGE1_NAMES <= set(compared)


def test_merged_model_reproduces_every_stored_tensor(merged_run, stored_phi3):
    _, produced = merged_run
    compared = compare(produced, stored_phi3, set(stored_phi3) - INPUT_NAMES - UNMERGED_NAMES)
    assert FULL_NAMES <= set(compared)


def test_lora_layout_reproduces_the_unmerged_tensors(lora_run, stored_phi3, compat_dir):
    folder, produced = lora_run
    assert (folder / "adapter" / "adapter_config.json").is_file()
    # The base LLM holds the pre-merge weights, so matching numbers prove the adapter ran.
    base = load_file(str(folder / "base_llm" / "model.safetensors"))
    adapter = load_file(str(compat_dir / "r1seg3d_phi3_tiny.lora.safetensors"))
    key = "model.layers.0.self_attn.qkv_proj.weight"
    assert torch.equal(base[key], adapter[PEFT_PREFIX + key.replace(".weight", ".base_layer.weight")])
    assert set(compare(produced, stored_phi3, UNMERGED_NAMES)) == UNMERGED_NAMES
    # The adapter path also reproduces the merged model's numbers, generation included.
    merged_names = {n for n in stored_phi3 if n.startswith(("g5_", "mask_logits", "lm_logits"))}
    compare({n[len("unmerged_"):]: t for n, t in produced.items()}, stored_phi3, merged_names)


def test_generation_reproduces_forced_decoding_and_the_first_token_quirk(merged_run, stored_phi3, compat_dir):
    _, produced = merged_run
    cases = json.loads((compat_dir / "r1seg3d_phi3_tiny.config.json").read_text())["generation"]["cases"]
    for case, spec in cases.items():
        assert produced[f"{case}_output_ids"][0].tolist() == spec["forced_ids"]
    assert produced["g3_all_minus_1000"].item() and produced["g4_all_minus_1000"].item()
    assert produced["g3_logits_shape"].tolist() == [1, 1, 16, 32, 64]
    # g2: the [SEG] forced first is never seen, so only the second one prompts.
    assert produced["g2_seg_hidden"].shape == (1, 64)
    # Teacher forcing the same answer gives the same [SEG] state, within KV-cache arithmetic.
    assert torch.allclose(produced["g5_seg_hidden"], produced["seg_hidden"], atol=1e-5)


def test_converted_tokenizers_give_the_original_ids(sam_run, merged_run, stored_sam, stored_phi3, compat_dir):
    sam_folder, _ = sam_run
    sam_model = R1Seg3D.from_pretrained(sam_folder)
    prompts = json.loads((compat_dir / "r1seg3d_sam_tiny.config.json").read_text())["prompts"]
    names = [re.match(r"A computerized tomography of a (.+)\.$", p).group(1) for p in prompts]
    ids, mask = sam_model.text_encoder.tokenize(sam_model.text_tokenizer, names, "cpu")
    assert torch.equal(ids, stored_sam["clip_input_ids"]) and torch.equal(mask, stored_sam["clip_attention_mask"])

    folder, _ = merged_run
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = json.loads((compat_dir / "r1seg3d_phi3_tiny.config.json").read_text())["teacher_forced_batch"]["items"]
    for row, item in enumerate(batch):
        text = "<im_patch>" * 4 + item["question"] + " " + item["answer"]
        ids = tokenizer(text)["input_ids"]
        assert ids == stored_phi3["input_ids"][row, :len(ids)].tolist()
    question = tokenizer("<im_patch>" * 4 + batch[1]["question"])["input_ids"]
    assert question == stored_phi3["gen_question_ids"][0].tolist()


def test_card_and_config_record_provenance_and_original_behaviour(sam_run, merged_run):
    for folder in (sam_run[0], merged_run[0]):
        config = json.loads((folder / "config.json").read_text())
        card = config["card"]
        assert card["source"].endswith(ORIGINAL_REPOSITORY) and card["source_commit"] == ORIGINAL_COMMIT
        assert card["converted_on"][:4].isdigit() and card["original_files"][0]["sha256"]
        assert {k.rsplit("vision_module.", 1)[-1] for k in card["dropped_unused_keys"]} == UNUSED_LEFTOVERS
        assert config["compatibility"] == dict(seg_state="before", average_seg_states=True, image_insertion="after_bos",
                                               first_generated_seg_visible=False)
        assert config["refine_loops"] == 2
        readme = (folder / "README.md").read_text()
        assert ORIGINAL_REPOSITORY in readme and ORIGINAL_COMMIT in readme and card["converted_on"] in readme


# ---- the quirks stay behind the compatibility switches ---------------------------------------------------------

def test_project_defaults_differ_where_expected(merged_run, stored_phi3, compat_dir, work):
    original, _ = merged_run
    folder = work / "phi3_project_rules"
    shutil.copytree(original, folder)
    config = json.loads((folder / "config.json").read_text())
    config["compatibility"] = dict(seg_state="before", average_seg_states=False, image_insertion="by_id",
                                   first_generated_seg_visible=True)
    (folder / "config.json").write_text(json.dumps(config))
    out = work / "project_rules.out.safetensors"
    assert r1seg(["compat-run", str(folder), str(compat_dir / "r1seg3d_phi3_tiny.io.safetensors"), str(out)]) == 0
    produced = load_file(str(out))
    hidden = stored_phi3["llm_hidden_states_2"]
    # The image tokens stand right after BOS here, so placing them by id changes nothing in the LLM.
    compare(produced, stored_phi3, {"llm_hidden_states_0", "llm_hidden_states_2", "loss_lm", "g1_seg_hidden", "g4_all_minus_1000"})
    # One mask per [SEG]: two prompts whose mean is the original's single prompt.
    assert torch.allclose(produced["seg_hidden"], hidden[1, [32, 39]], **TOLERANCE)
    assert torch.allclose(produced["seg_hidden"].mean(0, keepdim=True), stored_phi3["seg_hidden"], **TOLERANCE)
    assert produced["mask_logits"].shape[0] == 2 and not torch.allclose(produced["loss_total"], stored_phi3["loss_total"])
    # A [SEG] generated first is seen: its prompt is the state at the end of the prompt.
    prefill_last = stored_phi3["g1_prefill_last_hidden"][:, -1]
    assert produced["g2_seg_hidden"].shape[0] == 2
    assert torch.allclose(produced["g2_seg_hidden"][:1], prefill_last, **TOLERANCE)
    assert not produced["g3_all_minus_1000"].item()
    assert torch.allclose(produced["g3_seg_hidden"], prefill_last, **TOLERANCE)


def test_image_insertion_switch_matters_when_the_image_tokens_move(merged_run, stored_phi3):
    model = R1Seg3D.from_pretrained(merged_run[0])
    ids = stored_phi3["gen_question_ids"]
    # One more text token before the image tokens: the original's "positions 1..N" misses them.
    shifted = torch.cat([ids[:, :1], ids[:, 5:6], ids[:, 1:]], dim=1)
    with torch.no_grad():
        visual = model.projector(model.encode_images(stored_phi3["images"][1:2]))
        after_bos = model.embed_prompt_sequence(shifted, visual)
        model.config.compatibility.image_insertion = "by_id"
        by_id = model.embed_prompt_sequence(shifted, visual)
    assert torch.equal(after_bos[:, 1:5], visual) and torch.equal(by_id[:, 2:6], visual)
    assert not torch.allclose(after_bos, by_id)


# ---- the other outputs: merged LoRA, SegVol encoder, full-size layouts -----------------------------------------

def test_merge_lora_gives_the_original_merged_weights(model_with_lora, compat_dir, work):
    destination = work / "phi3_lora_merged"
    convert(LORA, model_with_lora, destination, compat_dir / "r1seg3d_phi3_tiny.config.json",
            compat_dir / "r1seg3d_phi3_tiny.tokenizer", merge_lora=True)
    written = load_file(str(destination / "model.safetensors"))
    original = load_file(str(compat_dir / "r1seg3d_phi3_tiny.safetensors"))
    llm = {k: v for k, v in written.items() if k.startswith("language_model.llm.")}
    assert len(llm) == 15
    for key, tensor in llm.items():
        assert torch.allclose(tensor, original[key[len("language_model.llm."):]], atol=1e-6), key


def test_segvol_encoder_start_point(sam_run, stored_sam, compat_dir, work):
    tiny = load_file(str(compat_dir / "r1seg3d_sam_tiny.safetensors"))
    encoder = {"model.encoder." + k[len("image_encoder."):]: v for k, v in tiny.items() if k.startswith("image_encoder.")}
    checkpoint = work / "ViT_pretrain.ckpt"
    torch.save({"state_dict": encoder, "epoch": 399}, checkpoint)
    destination = work / "segvol"
    report = convert(SEGVOL_VIT, checkpoint, destination, compat_dir / "r1seg3d_sam_tiny.config.json")
    assert report.converted == len(encoder) and report.ignored_entries == ["epoch"]
    model = R1Seg3D.from_pretrained(sam_run[0])
    with torch.no_grad():
        model.image_encoder.norm.weight.zero_()
        load_encoder_start_point(model, destination)
        assert torch.allclose(model.encode_images(stored_sam["images"]), stored_sam["vit_tokens"], **TOLERANCE)


def _full_size_sections(compat_dir: Path) -> dict[str, dict[str, list[int]]]:
    sections, current = {}, None
    for line in (compat_dir / "full_size_keys.txt").read_text().splitlines():
        if line.startswith("## "):
            current = sections.setdefault(line[3:], {})
        elif line and not line.startswith("#") and current is not None:
            key, shape, _ = line.split("\t")
            current.update({k: json.loads(shape) for k in _expand(key)})
    return sections


def _expand(key: str) -> list[str]:
    found = re.search(r"\{(\d+)\.\.(\d+)\}", key)
    if not found:
        return [key]
    return [k for i in range(int(found.group(1)), int(found.group(2)) + 1)
            for k in _expand(key[:found.start()] + str(i) + key[found.end():])]


@pytest.mark.parametrize("section, kind, family", [
    ("R1Seg-3D-SAM", SAM, None), ("R1Seg-3D-Phi-3-4B, merged", MERGED, "phi3"),
    ("R1Seg-3D-Phi-3-4B, stage-3/4", LORA, "phi3"), ("R1Seg-3D-llama-3-8B, merged", MERGED, "llama"),
    ("R1Seg-3D-llama-3-8B, stage-3/4", LORA, "llama")])
def test_full_size_layouts_map_onto_the_published_sizes(compat_dir, tmp_path, section, kind, family):
    """Every key of the published files has its place, with the same shape, in a model of the published sizes."""
    shapes = next(s for title, s in _full_size_sections(compat_dir).items() if title.startswith(section))
    weights = SourceWeights({k: torch.empty(shape, device="meta") for k, shape in shapes.items()}, [])
    if kind == MERGED:
        (tmp_path / "config.json").write_text(json.dumps({"model_type": f"lamed_{family}_cross", "mm_hidden_size": 768}))
    config, _, _ = target_config(kind, tmp_path, weights, None)
    clip_vocabulary = [None] * 49408 if kind == SAM else None   # only its length matters for a shape-only model
    model = build_skeleton(config, False, clip_vocabulary, kind)
    mapping = map_keys(kind, weights.tensors, (), clip_inner_prefix(model))
    state = renamed_state(mapping, weights, model.state_dict(), kind, Path(section))
    assert len(state) == len(shapes) - len(UNUSED_LEFTOVERS) == len(model.state_dict())
    if kind == SAM:
        encoder = {"model.encoder." + k[len("image_encoder."):]: v for k, v in weights.tensors.items() if k.startswith("image_encoder.")}
        segvol = map_keys(SEGVOL_VIT, encoder)
        assert not segvol.unknown and set(segvol.renamed.values()) == {k for k in model.state_dict() if k.startswith("image_encoder.")}


# ---- bad input: each message names the file and the key --------------------------------------------------------

def test_source_type_that_does_not_match_the_file(compat_dir, original_hf_folder, work):
    with pytest.raises(CheckpointError, match=r"r1seg3d_phi3_tiny\.safetensors does not match --from r1seg3d-sam.*--from r1seg3d"):
        convert(SAM, compat_dir / "r1seg3d_phi3_tiny.safetensors", work / "wrong")
    with pytest.raises(CheckpointError, match="is not a folder"):
        convert(MERGED, compat_dir / "r1seg3d_phi3_tiny.safetensors", work / "wrong")
    exit_code_for_checkpoint_problems = 3
    assert r1seg(["convert", "--from", "segvol-vit", str(compat_dir / "r1seg3d_sam_tiny.safetensors"),
                  str(work / "wrong")]) == exit_code_for_checkpoint_problems


def test_truncated_files_are_named(compat_dir, model_with_lora, work):
    for original in (compat_dir / "r1seg3d_sam_tiny.safetensors", model_with_lora):
        truncated = work / f"truncated{original.suffix}"
        truncated.write_bytes(original.read_bytes()[: original.stat().st_size // 2])
        kind = SAM if original.suffix == ".safetensors" else LORA
        with pytest.raises(CheckpointError, match=rf"{re.escape(str(truncated))} is truncated"):
            convert(kind, truncated, work / "never")


def copy_with_config(source: Path, folder: Path, **changes) -> Path:
    """A copy of an original release folder whose config.json says something else."""
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_size_mismatch_names_the_original_key(original_hf_folder, compat_dir, work):
    folder = copy_with_config(original_hf_folder, work / "wrong_hidden_size", hidden_size=32)
    with pytest.raises(CheckpointError, match=r"size mismatches.*model\.embed_tokens\.weight .*file \(495, 64\) vs config \(495, 32\)"):
        convert(MERGED, folder, work / "never")


class _TouchesAFileWhenUnpickled:
    """A stand-in for a malicious object: unpickling it calls Path.touch (any function could be called)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_pickle_that_needs_code_execution_is_refused_without_running_it(work):
    marker = work / "payload_ran"
    malicious = work / "malicious.pth"
    torch.save({"image_encoder.norm.weight": torch.ones(2), "extra": _TouchesAFileWhenUnpickled(marker)}, malicious)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(malicious))} was refused: .*arbitrary code.*Unsupported global"):
        convert(SAM, malicious, work / "never")
    assert not marker.exists()
    torch.load(malicious, weights_only=False)   # what an unsafe loader would have done
    assert marker.exists()


def test_tokenizer_whose_seg_id_disagrees_with_the_weights(original_hf_folder, compat_dir, work):
    folder = copy_with_config(original_hf_folder, work / "wrong_seg_id", seg_token_id=493)
    with pytest.raises(CheckpointError, match=r"gives \[SEG\] the id 494 but .*wrong_seg_id/config\.json says seg_token_id = 493"):
        convert(MERGED, folder, work / "never")
    from transformers import AutoTokenizer
    longer = AutoTokenizer.from_pretrained(original_hf_folder)
    longer.add_tokens(["<extra>"])
    longer.save_pretrained(work / "longer_tokenizer")
    with pytest.raises(CheckpointError, match=r"has 496 entries but model\.embed_tokens\.weight in .* has 495 rows"):
        convert(MERGED, original_hf_folder, work / "never", tokenizer_path=work / "longer_tokenizer")


def test_unknown_keys_stop_the_conversion_unless_skipped(compat_dir, work):
    tensors = load_file(str(compat_dir / "r1seg3d_sam_tiny.safetensors"))
    tensors["image_encoder.cls_token"] = torch.zeros(1, 1, 48)
    source = work / "with_extra_key.safetensors"
    save_file(tensors, str(source))
    common = dict(config_path=compat_dir / "r1seg3d_sam_tiny.config.json", tokenizer_path=compat_dir / "r1seg3d_sam_tiny.tokenizer")
    with pytest.raises(CheckpointError, match=r"1 unexpected keys .*image_encoder\.cls_token.*--skip-keys"):
        convert(SAM, source, work / "extra", **common)
    report = convert(SAM, source, work / "extra", skip_keys=("image_encoder.cls_*",), **common)
    assert report.skipped == ["image_encoder.cls_token"] and set(report.unused) == UNUSED_LEFTOVERS
    assert "image_encoder.cls_token" in report.summary()


# ---- issue #11: one [SEG] rule, and the `original` inference profile ------------------------------------------

def test_training_forward_predictor_and_compat_run_share_one_seg_rule(merged_run, stored_phi3, compat_dir, monkeypatch):
    """The predictor's scored answers give the [SEG] prompts the ORIGINAL's generation gave (stored gN_seg_prompt),
    and the training forward, the predictor and compat-run all go through R1Seg3D.seg_prompts."""
    from r1seg_core.convert.compat_run import question_item, run_generation_cases
    from r1seg_core.inference.answers import score_candidates

    folder, _ = merged_run
    model = R1Seg3D.from_pretrained(folder).eval()
    calls = []
    rule = R1Seg3D.seg_prompts

    def spy(self, *args, **kwargs):
        calls.append(inspect.currentframe().f_back.f_code.co_name)     # who applied the rule
        return rule(self, *args, **kwargs)

    monkeypatch.setattr(R1Seg3D, "seg_prompts", spy)
    item = question_item(stored_phi3)
    prompt = stored_phi3["gen_question_ids"][0].tolist()
    with torch.no_grad():
        visual = model.projector(model.encode_images(stored_phi3["images"][item:item + 1]))
        for case in ("g1", "g2", "g5"):
            forced = stored_phi3[f"{case}_output_ids"][0].tolist()
            scored = score_candidates(model, visual, prompt, [[forced]])
            torch.testing.assert_close(scored.prompts, stored_phi3[f"{case}_seg_prompt"], atol=1e-4, rtol=1e-4)
        for case in ("g3", "g4"):   # a [SEG] generated first only (unseen by the original), and no [SEG]
            assert score_candidates(model, visual, prompt, [[stored_phi3[f"{case}_output_ids"][0].tolist()]]).prompts is None
        run_generation_cases(model, {k: v for k, v in stored_phi3.items() if not k.startswith(("g2_", "g3_", "g4_", "g5_"))})
        model(stored_phi3["images"], stored_phi3["input_ids"], stored_phi3["attention_mask"], stored_phi3["labels"])
    assert {"score_candidates", "run_generation_cases", "forward"} <= set(calls)


ORIGINAL_QUESTION = "Please segment the liver in this image."


@pytest.fixture(scope="module")
def original_predictor(merged_run, shared_ct):
    """The converted compat model, taught in a few seconds to answer "It is [SEG]." in the brighter half of the
    windows of a real CT and "Sorry, there is no liver." in the others, so that fusion meets both kinds of window."""
    from r1seg_core import prompting
    from r1seg_core.inference import Predictor
    from r1seg_core.inference.windows import extract_windows, window_starts
    from r1seg_core.volume import read_volume

    folder, _ = merged_run
    ct = read_volume(shared_ct / "totalseg_example" / "example_ct_sm.nii.gz")
    predictor = Predictor(folder, device="cpu")
    model = predictor.model
    roi = model.window_size
    views = [predictor._view(ct, predictor._cache_for(ct), sliding) for sliding in (True, False)]
    windows = torch.cat([extract_windows(views[0].padded, window_starts(views[0].padded.shape, roi, 0.5), roi),
                         views[1].padded[None, None]]).float()
    means = windows.mean(dim=(1, 2, 3, 4))
    positive = (means > means.median()).tolist()
    torch.manual_seed(0)
    with torch.no_grad():
        tokens = model.encode_images(windows)
    eos, pad = model.token_ids["eos"], model.token_ids["pad"]
    prompt = prompting.prompt_ids(model.tokenizer, ORIGINAL_QUESTION, model.num_visual_tokens)
    answers = [prompting.answer_ids(model.tokenizer, "It is [SEG]." if p else "Sorry, there is no liver.", eos)
               for p in positive]
    batch = prompting.build_teacher_forced_batch([prompt] * len(answers), answers, pad)
    trained = [p for name, p in model.named_parameters() if name.startswith(("language_model.", "projector."))]
    optimizer = torch.optim.AdamW(trained, lr=3e-3)
    model.train()
    for _ in range(60):
        hidden, _ = model.language_model(model.embed_prompt_sequence(batch.input_ids, model.projector(tokens)),
                                         batch.attention_mask)
        loss = model.lm_loss(hidden, batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    predictor.clear_cache()
    return predictor, ct


def original_pipeline(model, ct, sliding: bool) -> np.ndarray:
    """The published pipeline composed from MONAI's own pieces as the original code composed them, mapped back onto
    the CT's voxels: SegVol's foreground percentile clip, ScaleIntensity (min-max), CropForeground, Resize (without
    sliding windows), sliding_window_inference (overlap 0.5, constant blending of logits, zero padding), each window
    answered by greedy generation with -1000 logits when no [SEG] was seen. Returns the probabilities."""
    from monai.inferers import sliding_window_inference
    from monai.transforms import CropForeground, Resize, ScaleIntensity
    from monai.transforms.utils import generate_spatial_bounding_box

    from r1seg_core import prompting
    from r1seg_core.convert.compat_run import generate_with_forced_tokens

    array = ct.array.astype(np.float32)
    foreground = array[array > array.mean(dtype=np.float64)]
    low, high = np.percentile(foreground, [0.05, 99.95])
    image = ScaleIntensity(minv=0.0, maxv=1.0)(torch.from_numpy(np.clip(array, low, high)[None]))
    start, end = generate_spatial_bounding_box(image)
    cropped = CropForeground()(image)
    roi = model.window_size
    prompt = torch.tensor([prompting.prompt_ids(model.tokenizer, ORIGINAL_QUESTION, model.num_visual_tokens)])

    def answer_window(window):
        tokens = model.encode_images(window)
        generation = generate_with_forced_tokens(model, tokens, prompt, [], 100)
        states = torch.cat([generation["prefill"], generation["steps"]], dim=1)
        sequence = torch.cat([prompt, generation["output_ids"]], dim=1)[:, :states.shape[1]]
        found = model.seg_prompts(sequence, states, answer_start=prompt.shape[1])
        if not found.rows:
            return window.new_full((1, 1, *roi), -1000.0)
        return model.decode_masks(tokens.expand(len(found.rows), -1, -1), found.prompts).logits

    with torch.no_grad():
        if sliding:
            logits = sliding_window_inference(cropped[None], roi, 1, answer_window, overlap=0.5, mode="constant")[0]
        else:
            resized = Resize(roi, mode="trilinear")(cropped)
            logits = Resize(tuple(cropped.shape[1:]), mode="trilinear")(answer_window(resized[None])[0])
    full = np.full(ct.shape, -1000.0, dtype=np.float32)
    full[tuple(slice(s, e) for s, e in zip(start, end))] = np.asarray(logits[0])
    return torch.sigmoid(torch.from_numpy(full)).numpy()


@pytest.mark.parametrize("sliding", [True, False])
def test_original_profile_reproduces_the_original_pipeline_composed_from_monai(original_predictor, sliding):
    predictor, ct = original_predictor
    assert predictor.profile.name == "original"      # chosen from the converted folder's card
    result = predictor.ask(ct, ORIGINAL_QUESTION, global_step="off", sliding_window=sliding, keep_probability=True)
    expected = original_pipeline(predictor.model, ct, sliding)
    liver = result.targets[0]
    assert liver.name == "liver" and liver.probability.shape == ct.shape
    np.testing.assert_allclose(liver.probability, expected, atol=1e-4)
    differ = liver.mask != (expected >= 0.5)
    assert not differ.any() or np.abs(expected[differ] - 0.5).max() < 1e-4, "masks differ away from the threshold"
    if sliding:
        # Both kinds of window met in the fusion: the veto of the absent ones is what is compared.
        assert 0 < liver.windows_positive < result.windows
        assert liver.present


def test_both_profiles_keep_masks_on_the_input_grid_for_flipped_and_oblique_cts(original_predictor):
    predictor, ct = original_predictor
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    flipped = Volume(ct.array[:, ::-1].copy(), ct.spacing, ct.origin, ct.direction @ np.diag([1, -1, 1]))
    oblique = Volume(ct.array, ct.spacing, ct.origin, rotation @ ct.direction)
    for volume in (flipped, oblique):
        # One window (the released evaluation's view) keeps this fast; the sliding path is compared above.
        result = predictor.ask(volume, ORIGINAL_QUESTION, global_step="off", sliding_window=False, keep_probability=True)
        # The original never reorients or resamples: the mask is the stored voxels' own, whatever the direction.
        np.testing.assert_allclose(result.targets[0].probability, original_pipeline(predictor.model, volume, False),
                                   atol=1e-4)
        assert result.targets[0].mask.shape == volume.shape
