"""Issue #11: the model decides what to segment, and the user reads the model's own answer.

A tiny model is fine-tuned here, in a few seconds, on the exact images the predictor shows it (the whole-CT view
of the global step and the sliding windows of a real CT), so that it answers:
- "What is the organ behind the stomach that makes insulin?" with "The pancreas is [SEG], the gland behind the
  stomach." on the whole CT (a sentence no template has) and "The pancreas is [SEG]." in the windows;
- "Is there a spleen in this scan?" with "Sorry, there is no spleen." on the whole CT but "The spleen is [SEG]." in
  the windows (they disagree);
- "Is there a gallbladder in this scan?" with "Sorry, there is no gallbladder." everywhere.
"""
import json

import numpy as np
import pytest
import torch

from r1seg_core import prompting
from r1seg_core.cli import main as r1seg
from r1seg_core.errors import InvalidInputError
from r1seg_core.inference import Conversation, Predictor
from r1seg_core.inference.windows import extract_windows, window_starts
from r1seg_core.preprocess import resize_to_window
from r1seg_core.volume import Volume, read_volume

from test_inference import WINDOW, small_model

IMPLICIT = "What is the organ behind the stomach that makes insulin?"
PANCREAS_WHOLE = "The pancreas is [SEG], the gland behind the stomach."
SPLEEN = "Is there a spleen in this scan?"
GALLBLADDER = "Is there a gallbladder in this scan?"
# (question, answer on the whole-CT view, answer in every window)
LESSONS = [(IMPLICIT, PANCREAS_WHOLE, "The pancreas is [SEG]."),
           (SPLEEN, "Sorry, there is no spleen.", "The spleen is [SEG]."),
           (GALLBLADDER, "Sorry, there is no gallbladder.", "Sorry, there is no gallbladder.")]
STEPS = 150


@pytest.fixture(scope="module")
def ct(shared_ct):
    return read_volume(shared_ct / "totalseg_example" / "example_ct_sm.nii.gz")


@pytest.fixture(scope="module")
def reasoner(ct):
    """A predictor whose tiny model has learnt the LESSONS on this CT's own views."""
    torch.manual_seed(0)
    predictor = Predictor(model=small_model(), device="cpu")
    model = predictor.model
    view = predictor._view(ct, predictor._cache_for(ct), sliding=True)
    starts = window_starts(view.padded.shape, WINDOW, 0.25)
    whole = resize_to_window(view.padded[view.crop], WINDOW)[None, None]
    windows = extract_windows(view.padded, starts, WINDOW)
    with torch.no_grad():      # the encoder stays frozen, as in training stages 3 and 4: encode once
        whole_tokens, window_tokens = model.encode_images(whole.float()), model.encode_images(windows.float())
    # The whole-CT view as often as all windows together, so both kinds of answer weigh the same in the loss.
    tokens = torch.cat([whole_tokens.expand(len(starts), -1, -1), window_tokens])
    tokenizer, n, eos, pad = model.tokenizer, model.num_visual_tokens, model.token_ids["eos"], model.token_ids["pad"]
    batches = []
    for question, on_whole, in_windows in LESSONS:
        prompt = prompting.prompt_ids(tokenizer, question, n)
        answers = [prompting.answer_ids(tokenizer, on_whole, eos)] * len(starts) + \
                  [prompting.answer_ids(tokenizer, in_windows, eos)] * len(starts)
        batches.append(prompting.build_teacher_forced_batch([prompt] * len(answers), answers, pad))
    model.train()
    trained = [p for name, p in model.named_parameters() if not name.startswith("image_encoder.") and p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=3e-3)
    for step in range(STEPS):
        batch = batches[step % len(batches)]
        # The training forward's language part (R1Seg3D.forward without re-encoding the frozen images).
        embeds = model.embed_prompt_sequence(batch.input_ids, model.projector(tokens))
        hidden, _ = model.language_model(embeds, batch.attention_mask)
        loss = model.lm_loss(hidden, batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    predictor.clear_cache()        # the projector changed: cached visual tokens are stale
    return predictor


def test_an_implicit_question_naming_another_structure_segments_the_models_target(reasoner, ct):
    # Free generation (the `generate` answer mode, the original profile): the model's own answer names the target.
    assert [s.name for s in reasoner.vocabulary.find_in_text(IMPLICIT)] == ["stomach"]
    result = reasoner.ask(ct, IMPLICIT, answer_mode="generate")
    assert result.model_text == PANCREAS_WHOLE
    assert [t.name for t in result.targets] == ["pancreas"]
    assert result.targets[0].windows_positive == result.windows, "every window answered 'The pancreas is [SEG].'"
    assert result.targets[0].present
    assert not any("keyword" in note for note in result.notes)


def test_a_question_naming_a_structure_is_about_that_structure_in_the_constrained_mode(reasoner, ct):
    # The project's default: the structures a question names are its targets, whatever the model would generate.
    result = reasoner.ask(ct, IMPLICIT, global_step="off")
    assert [t.name for t in result.targets] == ["stomach"] and result.model_text == ""


def test_the_answer_shown_is_the_models_text_with_its_segment_named(reasoner, ct):
    result = reasoner.ask(ct, IMPLICIT, answer_mode="generate")
    pancreas = result.targets[0]
    # The model's words agree with the decision (pancreas present), so they lead the answer.
    assert result.answer.startswith("The pancreas is [segment: pancreas], the gland behind the stomach.")
    assert result.answer.endswith(f"pancreas: {pancreas.volume_ml:.1f} mL.")


def test_windows_that_disagree_with_the_global_answer_are_reported(reasoner, ct):
    result = reasoner.ask(ct, SPLEEN)
    assert result.model_text == "Sorry, there is no spleen."
    spleen = result.targets[0]
    assert spleen.name == "spleen" and spleen.present and spleen.windows_positive == result.windows
    assert result.answer == (f"The spleen is [segment: spleen]: {spleen.volume_ml:.1f} mL. The whole-CT answer denied "
                             f"the spleen, but {result.windows} of {result.windows} windows found it, so it is reported "
                             "as present.")
    assert result.to_dict()["targets"][0]["global_answer"] is False


def test_an_absent_answer_still_writes_named_empty_segments(reasoner, ct, shared_ct, tmp_path):
    result = reasoner.ask(ct, GALLBLADDER)
    assert result.model_text == "Sorry, there is no gallbladder."
    assert [t.name for t in result.targets] == ["gallbladder"] and result.status == "absent"
    assert result.answer == "There is no gallbladder in this scan; its segment is empty."
    assert result.targets[0].windows_positive == 0 and result.targets[0].marked_ml == 0
    # The command line writes the empty segmentation on the CT's grid, and the JSON says "absent".
    folder = reasoner.model.save_pretrained(tmp_path / "model")
    ct_path = shared_ct / "totalseg_example" / "example_ct_sm.nii.gz"
    out, report = tmp_path / "answer.seg.nrrd", tmp_path / "answer.json"
    assert r1seg(["ask", str(ct_path), GALLBLADDER, "-o", str(out), "--json", str(report), "--model", str(folder),
                  "--device", "cpu"]) == 0
    data = json.loads(report.read_text())
    assert data["status"] == "absent" and data["targets"][0]["status"] == "absent"
    written = read_volume(out)
    assert written.shape == ct.shape and not written.array.any()
    np.testing.assert_allclose(written.spacing, ct.spacing)
    header = out.read_bytes()[:4000].decode("latin-1")
    assert "Segment0_Name:=gallbladder" in header


def test_follow_up_questions_keep_their_target_through_the_conversation(reasoner, ct):
    chat = Conversation()
    first = reasoner.ask(ct, IMPLICIT, conversation=chat, answer_mode="generate")
    follow_up = reasoner.ask(ct, "and how large is it?", conversation=chat)
    assert [t.name for t in follow_up.targets] == ["pancreas"] and follow_up.answered_from == "conversation"
    assert follow_up.targets[0].mask.tobytes() == first.targets[0].mask.tobytes(), "read back, not segmented again"
    assert follow_up.answer.startswith(f"The pancreas measures {first.targets[0].volume_ml:.1f} mL")
    # The model reads its own words back, not the volumes added for the user.
    assert PANCREAS_WHOLE in chat.history_text()
    other = reasoner.ask(ct, "and the spleen?", conversation=chat, global_step="off")
    assert [t.name for t in other.targets] == ["spleen"] and other.answered_from == "model"


def test_one_window_of_the_whole_ct_reuses_the_global_steps_encoding(reasoner, ct):
    result = reasoner.ask(ct, IMPLICIT, sliding_window=False, answer_mode="generate")
    assert result.windows == 1 and [t.name for t in result.targets] == ["pancreas"]
    assert result.targets[0].mask.shape == ct.shape
    assert result.model_text == PANCREAS_WHOLE


# ---- the text-prompted model (R1Seg-3D-SAM, "without reasoning") --------------------------------------------------

@pytest.fixture(scope="module")
def sam():
    return Predictor(model=small_model(preset="tiny-sam"), device="cpu")


def test_text_prompted_model_segments_every_named_target_without_reasoning(sam, ct):
    result = sam.ask(ct, "segment the liver and the spleen")
    assert [t.name for t in result.targets] == ["liver", "spleen"]
    assert all(t.windows_positive == result.windows for t in result.targets)
    liver = result.targets[0]
    assert liver.present and result.answer.startswith(f"The liver is [segment: liver]: {liver.volume_ml:.1f} mL.")
    assert result.model_text == ""
    with pytest.raises(InvalidInputError, match="named structure"):
        sam.ask(ct, "what is wrong here?")


def test_text_prompted_window_is_the_models_own_text_prompted_forward(sam, ct):
    # A CT exactly one window large on the model's grid: nothing is resampled, so the predictor's probabilities
    # must be segment_with_text's on that window.
    array = ct.array[:WINDOW[0], :WINDOW[1], :WINDOW[2]].astype(np.float32)
    assert array.shape == WINDOW
    window_ct = Volume(array, (4.0, 4.0, 4.0), (0.0, 0.0, 0.0), np.eye(3))
    result = sam.ask(window_ct, "segment the liver", sliding_window=False, keep_probability=True)
    image = torch.from_numpy(np.clip((array + 1000.0) / 2000.0, 0.0, 1.0))[None, None]
    with torch.no_grad():
        expected = torch.sigmoid(sam.model.segment_with_text(image, ["liver"])[0].logits[0, 0]).numpy()
    np.testing.assert_allclose(result.targets[0].probability, expected, atol=1e-5)
