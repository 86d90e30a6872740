"""Predictor.ask on real CTs with a small model: batching changes nothing, geometry is exact, bad input is refused."""
import dataclasses
import json
import threading

import numpy as np
import pytest
import torch

from r1seg_core import prompting
from r1seg_core.cli import main as r1seg
from r1seg_core.errors import CancelledError, InvalidInputError
from r1seg_core.inference import Conversation, Predictor
from r1seg_core.inference.answers import generate, score_candidates
from r1seg_core.model import build_model, preset_config
from r1seg_core.volume import Volume, read_volume

WINDOW = (16, 32, 64)


def small_model(seed=0, preset="tiny"):
    torch.manual_seed(seed)
    config = preset_config(preset)
    config.encoder = dataclasses.replace(config.encoder, image_size=WINDOW)
    # A coarse model grid keeps the number of windows small on the CPU.
    config.preprocess = {"spacing_zyx": [4.0, 4.0, 4.0], "hu_min": -1000.0, "hu_max": 1000.0}
    model = build_model(config).eval()
    # Scale up the decoder's output so the untrained masks are neither empty nor full.
    with torch.no_grad():
        model.mask_decoder.prompt_similarity.weight.mul_(20)
    return model


@pytest.fixture(scope="module")
def predictor():
    return Predictor(model=small_model(), device="cpu")


@pytest.fixture(scope="module")
def ct(shared_ct):
    return read_volume(shared_ct / "totalseg_example" / "example_ct_sm.nii.gz")


def test_batched_windows_equal_one_window_at_a_time(predictor, ct):
    decoded_windows = 0
    for mode in ("constrained", "generate"):
        predictor.clear_cache()   # each path computes its own encoder outputs
        one = predictor.ask(ct, "segment the liver", window_batch=1, answer_mode=mode, keep_probability=True, overlap=0.5)
        predictor.clear_cache()
        many = predictor.ask(ct, "segment the liver", window_batch=7, answer_mode=mode, keep_probability=True, overlap=0.5)
        assert one.windows == many.windows > 7
        assert [t.windows_positive for t in one.targets] == [t.windows_positive for t in many.targets]
        np.testing.assert_allclose(one.targets[0].probability, many.targets[0].probability, atol=1e-4)
        assert np.array_equal(one.targets[0].mask, many.targets[0].mask), f"{mode}: masks differ voxel for voxel"
        assert one.answer == many.answer
        decoded_windows += one.targets[0].windows_positive
    assert decoded_windows > 0, "the comparison must cover windows whose masks were decoded"


def test_a_second_question_about_the_same_ct_reuses_its_encoder_outputs(predictor, ct):
    predictor.clear_cache()
    first = predictor.ask(ct, "segment the liver", global_step="off", keep_probability=True)
    again = predictor.ask(ct, "segment the liver", global_step="off", keep_probability=True)
    assert again.timings["encoder"] < first.timings["encoder"] / 3
    assert again.timings["resample"] < first.timings["resample"] / 3
    np.testing.assert_allclose(again.targets[0].probability, first.targets[0].probability, atol=1e-6)
    one_voxel_edited = ct.array.copy()
    one_voxel_edited[tuple(size // 2 for size in ct.shape)] += 1
    other = predictor.ask(ct.with_array(one_voxel_edited), "segment the liver", global_step="off")
    assert other.timings["encoder"] > again.timings["encoder"], "another CT's voxels must not reuse the cache"


def test_teacher_forced_answer_matches_the_full_forward_and_generation(predictor):
    model = predictor.model
    tokens = model.encode_images(torch.rand(3, 1, *WINDOW))
    visual = model.projector(tokens)
    prompt = prompting.prompt_ids(model.tokenizer, "Where is the liver?", model.num_visual_tokens)
    eos = model.token_ids["eos"]
    candidates = [prompting.answer_ids(model.tokenizer, a, eos) for a in ("The liver is [SEG].", "Sorry, there is no liver.")]
    with torch.no_grad():
        scored = score_candidates(model, visual, prompt, [candidates])
        for row, (choice,) in enumerate(scored.choice):
            batch = prompting.build_teacher_forced_batch([prompt], [candidates[choice]], model.token_ids["pad"])
            full = model.embed_prompt_sequence(batch.input_ids, visual[row:row + 1])
            hidden, _ = model.language_model(full, batch.attention_mask)
            # The training forward's [SEG] prompts for the same tokens (the one rule, teacher-forced).
            expected = model.seg_prompts(batch.input_ids, hidden).prompts
            got = [i for i, r in enumerate(scored.rows) if r == row]
            if expected is None:
                assert not got
            else:
                torch.testing.assert_close(scored.prompts[got], expected, atol=1e-5, rtol=1e-5)
            # The chosen candidate is the likelier one under the same model.
            logits = model.language_model.logits(hidden[0, len(prompt) - 1:-1])
            chosen = torch.log_softmax(logits, -1).gather(-1, torch.tensor(candidates[choice])[:, None]).sum()
            other = candidates[1 - choice]
            batch_other = prompting.build_teacher_forced_batch([prompt], [other], model.token_ids["pad"])
            hidden_other, _ = model.language_model(model.embed_prompt_sequence(batch_other.input_ids, visual[row:row + 1]))
            logits_other = model.language_model.logits(hidden_other[0, len(prompt) - 1:-1])
            assert chosen >= torch.log_softmax(logits_other, -1).gather(-1, torch.tensor(other)[:, None]).sum() - 1e-4
        generated = generate(model, visual, prompt, max_new_tokens=6)
        for row in range(3):
            sequence = torch.tensor([prompt + generated.token_ids[row][:-1]])
            hidden, _ = model.language_model(model.embed_prompt_sequence(sequence, visual[row:row + 1]))
            argmax = model.language_model.logits(hidden[0, len(prompt) - 1:]).argmax(-1).tolist()
            assert argmax == generated.token_ids[row]


def test_masks_come_back_on_the_input_grid_for_flipped_and_oblique_volumes(predictor, ct):
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    flipped = Volume(ct.array[:, ::-1].copy(), ct.spacing, ct.origin, ct.direction @ np.diag([1, -1, 1]))
    oblique = Volume(ct.array, (ct.spacing[0], ct.spacing[1] * 0.5, ct.spacing[2] * 2), ct.origin, rotation @ ct.direction)
    straight = predictor.ask(ct, "segment the liver", global_step="off", keep_probability=True)
    turned = predictor.ask(flipped, "segment the liver", global_step="off", keep_probability=True)
    # The same physical CT: the same canonical grid and windows, so the answer is the straight one, flipped.
    np.testing.assert_allclose(turned.targets[0].probability[:, ::-1], straight.targets[0].probability, atol=1e-5)
    for volume in (flipped, oblique):
        result = predictor.ask(volume, "segment the liver", global_step="off")
        assert result.targets[0].mask.shape == volume.shape
        assert result.targets[0].mask.dtype == np.uint8
        assert result.targets[0].volume_ml == pytest.approx(result.targets[0].voxel_count * volume.voxel_volume_ml)


def test_multi_target_question_gives_one_entry_per_target(predictor, ct):
    result = predictor.ask(ct, "Segment the liver and the left kidney", global_step="off")
    assert [t.name for t in result.targets] == ["liver", "left kidney"]
    labels, names = result.labelmap()
    assert names == {1: "liver", 2: "left kidney"} and labels.shape == ct.shape


def test_follow_up_question_reuses_the_conversation(predictor, ct):
    conversation = Conversation()
    predictor.ask(ct, "segment the spleen", conversation=conversation, global_step="off")
    follow_up = predictor.ask(ct, "and how large is it?", conversation=conversation, global_step="off")
    assert [t.name for t in follow_up.targets] == ["spleen"]
    assert len(conversation.turns) == 2 and "spleen" in conversation.history_text()


def test_progress_and_cancel(predictor, ct):
    seen = []
    result = predictor.ask(ct, "segment the liver", progress=lambda done, total, stage: seen.append((done, total)),
                           window_batch=2, global_step="off")
    assert seen[-1] == (result.windows, result.windows) and len(seen) > 1
    cancel = threading.Event()

    def cancel_after_first(done, total, stage):
        cancel.set()

    with pytest.raises(CancelledError):
        predictor.ask(ct, "segment the liver", progress=cancel_after_first, cancel=cancel, window_batch=1, global_step="off")


def test_global_step_skip_processes_fewer_windows(predictor, ct):
    counted = {}
    for mode in ("answer", "skip"):
        calls = []
        predictor.ask(ct, "segment the liver", global_step=mode, window_batch=1,
                      progress=lambda done, total, stage: calls.append(done))
        counted[mode] = calls
    assert len(counted["skip"]) <= len(counted["answer"])


def test_bad_input_is_refused(predictor, ct):
    with pytest.raises(InvalidInputError, match="empty"):
        predictor.ask(ct, "  ")
    broken = ct.array.astype(np.float32)
    broken[0, 0, 0] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        predictor.ask(ct.with_array(broken), "segment the liver")
    with pytest.raises(InvalidInputError, match="overlap"):
        predictor.ask(ct, "segment the liver", overlap=1.5)
    with pytest.raises(InvalidInputError, match="loops"):
        predictor.ask(ct, "segment the liver", loops=5)
    with pytest.raises(InvalidInputError):
        predictor.ask("/nonexistent/ct.nii.gz", "segment the liver")


def test_cli_ask_and_info(tmp_path, shared_ct, capsys):
    model_dir = small_model().save_pretrained(tmp_path / "model")
    ct_path = str(shared_ct / "totalseg_example" / "example_ct_sm.nii.gz")
    out, report = tmp_path / "out.seg.nrrd", tmp_path / "result.json"
    code = r1seg(["ask", ct_path, "segment the liver", "-o", str(out), "--model", str(model_dir), "--device", "cpu",
                  "--json", str(report), "--overlap", "0.5"])
    assert code == 0
    data = json.loads(report.read_text())
    assert data["targets"][0]["name"] == "liver" and set(data["timings_s"]) >= {"encoder", "llm", "resample"}
    if data["present"]:
        written = read_volume(out)
        assert written.shape == read_volume(ct_path).shape
    assert r1seg(["info", str(model_dir)]) == 0
    assert "window (D,H,W): (16, 32, 64)" in capsys.readouterr().out

    # Bad input: clear message, non-zero exit, nothing written.
    fresh = tmp_path / "never.seg.nrrd"
    assert r1seg(["ask", ct_path, "", "-o", str(fresh), "--model", str(model_dir)]) == 2
    assert r1seg(["ask", str(tmp_path / "missing.nii.gz"), "segment the liver", "-o", str(fresh), "--model", str(model_dir)]) == 2
    assert r1seg(["ask", ct_path, "segment the liver", "-o", str(fresh), "--model", str(tmp_path)]) == 3
    assert not fresh.exists()
    assert "error:" in capsys.readouterr().err


OUT_OF_MEMORY_CHILD = """
import json, re, resource, sys
import numpy as np
from r1seg_core.errors import OutOfMemoryError
from r1seg_core.inference import Predictor
from r1seg_core import sample_ct_path
from r1seg_core.volume import read_volume

def limit_address_space(to_size_kb, extra_mb):
    resource.setrlimit(resource.RLIMIT_AS, (to_size_kb * 1024 + extra_mb * 2 ** 20, resource.RLIM_INFINITY))

predictor = Predictor(sys.argv[1], device="cpu")
ct = read_volume(sample_ct_path())
reference = predictor.ask(ct, "segment the liver", window_batch=1, global_step="off", keep_probability=True)
predictor.clear_cache()
loaded_kb = int(re.search(r"VmSize:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
report = {"refused": []}
# How much room a few windows need depends on the machine's libraries, so the room grows in 100 MiB steps until the
# question is answered; every smaller room must end in the clear error, never in a crash. 50 MiB is too little even
# to resample the CT (a 70 MiB float32 array on the sample CT).
for extra_mb in (50, *range(100, 1300, 100)):
    limit_address_space(loaded_kb, extra_mb)
    try:
        squeezed = predictor.ask(ct, "segment the liver", window_batch=28, global_step="off", keep_probability=True)
    except OutOfMemoryError as error:
        report["refused"].append(str(error))
        continue
    finally:
        predictor.clear_cache()
    report.update(room_mb=extra_mb, notes=squeezed.notes,
                  difference=float(np.abs(squeezed.targets[0].probability - reference.targets[0].probability).max()))
    break
print(json.dumps(report))
"""


def test_running_out_of_cpu_memory_retries_with_fewer_windows_then_says_so(tmp_path):
    # A real allocation failure: the child process caps its own address space (RLIMIT_AS) after loading. The tiny
    # preset's 32x256x256 windows at 2x1x1 mm give 28 windows on the sample CT, which need about 400 MiB more than a few
    # windows at a time. One malloc arena: glibc reserves 64 MiB of address space per thread arena, which would make
    # the room a question needs depend on how many threads happened to allocate.
    import os
    import subprocess
    import sys

    assert r1seg(["init-model", str(tmp_path / "tiny"), "--preset", "tiny"]) == 0
    child = subprocess.run([sys.executable, "-c", OUT_OF_MEMORY_CHILD, str(tmp_path / "tiny")], capture_output=True,
                           text=True, timeout=600, env={**os.environ, "MALLOC_ARENA_MAX": "1"})
    assert child.returncode == 0, child.stderr[-2000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert report["refused"][0].startswith("out of CPU memory for this CT"), "50 MiB must be too little to resample"
    # Too little room to resample ("out of CPU memory for this CT") or for even one window per batch: both say what
    # to do.
    assert all("out of" in error and "memory" in error and "free memory" in error for error in report["refused"]), report
    assert "room_mb" in report, f"no room up to 1.2 GiB answered: {report['refused'][-1]}"
    retries = [note for note in report["notes"] if note.startswith("out of CPU memory: retried with")]
    assert retries and retries[0].endswith("14 windows per batch"), f"answered in {report['room_mb']} MiB without a retry"
    assert report["difference"] < 1e-4, "a retried chunk must be stitched once, like the one-window-at-a-time run"


def test_bf16_on_the_cpu_gives_the_fp32_answer(tmp_path, ct):
    # The GPU path's dtype, exercised where CI runs: every step must accept bf16 weights and activations.
    folder = small_model().save_pretrained(tmp_path / "model")
    results = {}
    for dtype in ("float32", "bfloat16"):
        predictor = Predictor(folder, device="cpu", dtype=dtype)
        assert {p.dtype for p in predictor.model.parameters()} == {getattr(torch, dtype)}
        results[dtype] = predictor.ask(ct, "segment the liver", global_step="answer", keep_probability=True)
    full, half = results["float32"], results["bfloat16"]
    assert [t.present for t in half.targets] == [t.present for t in full.targets]
    difference = np.abs(half.targets[0].probability - full.targets[0].probability)
    assert difference.mean() < 0.01 and difference.max() < 0.1
    assert abs(half.targets[0].voxel_count - full.targets[0].voxel_count) <= 0.01 * full.targets[0].voxel_count
    with pytest.raises(InvalidInputError, match="unknown dtype"):
        Predictor(folder, device="cpu", dtype="float8")


def test_global_step_answer_is_the_models_greedy_text(predictor, ct):
    # Free generation: the `generate` answer mode (and the original profile) keep the model's own words.
    result = predictor.ask(ct, "segment the liver", global_step="answer", answer_mode="generate")
    model = predictor.model
    whole = predictor._whole_ct(predictor._ct_cache.views[("project", True)])[1]
    # The model reads the question in sentence case ("Segment the liver.").
    prompt = prompting.prompt_ids(model.tokenizer, "Segment the liver.", model.num_visual_tokens)
    with torch.no_grad():
        greedy = generate(model, whole, prompt, model.config.max_answer_tokens).token_ids[0]
    expected = model.tokenizer.decode(greedy, skip_special_tokens=False).replace(model.tokenizer.eos_token, "").strip()
    assert result.model_text == expected


def test_a_seg_answered_first_is_used_unless_the_original_switch_hides_it(predictor):
    # The original code never saw a [SEG] generated as the very first token (compatibility switch, default off).
    model = predictor.model
    with torch.no_grad():
        visual = model.projector(model.encode_images(torch.rand(1, 1, *WINDOW)))
    prompt = prompting.prompt_ids(model.tokenizer, "Where is the liver?", model.num_visual_tokens)
    seg_first = [model.token_ids["seg"], model.token_ids["eos"]]
    compat = model.config.compatibility
    counts = {}
    try:
        for visible in (True, False):
            compat.first_generated_seg_visible = visible
            with torch.no_grad():
                counts[visible] = len(score_candidates(model, visual, prompt, [[seg_first]]).rows)
    finally:
        compat.first_generated_seg_visible = True
    assert counts == {True: 1, False: 0}


def test_resampling_on_the_models_device_gives_the_same_answer(predictor, ct):
    # On a GPU the predictor resamples with torch; forced here on the CPU, it must match SimpleITK's way.
    flipped = Volume(ct.array[:, ::-1].copy(), ct.spacing, ct.origin, ct.direction @ np.diag([1, -1, 1]))
    results = {}
    try:
        for on_device in (False, True):
            predictor.resample_on_device = on_device
            predictor.clear_cache()
            results[on_device] = predictor.ask(flipped, "segment the liver", global_step="answer", keep_probability=True)
    finally:
        predictor.resample_on_device = False
    np.testing.assert_allclose(results[True].targets[0].probability, results[False].targets[0].probability, atol=1e-4)
    assert results[True].model_text == results[False].model_text


def test_only_windows_touching_the_coarse_mask_are_kept_by_the_skip_step(predictor):
    from r1seg_core.inference.global_step import far_windows
    from r1seg_core.inference.windows import window_starts

    coarse = torch.zeros(32, 64, 128)
    coarse[20:24, 40:44, 100:104] = 0.9
    starts = window_starts(coarse.shape, WINDOW, 0.0)
    far = far_windows(starts, coarse, WINDOW)
    assert len(starts) == 8 and [start for start in starts if start not in far] == [(16, 32, 64)]
