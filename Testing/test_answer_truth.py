"""Issue #20: one truth per answer. The text, the segments, the JSON status and the written file follow from one
decision per target (`r1seg_core/inference/decision.py`), and a follow-up reads the stored masks back.

The rule is checked on synthetic evidence; the invariant "no answer's text contradicts its segments or its JSON" is
checked on the bundled default model over explicit, implicit, absent, not-trained, unknown-word, multi-target and
follow-up questions on the sample CT and the held-out patient.
"""
import json
import re

import numpy as np
import pytest
import torch
import yaml

from r1seg_core import sample_ct_path
from r1seg_core.config import R1Seg3DConfig
from r1seg_core.errors import InvalidInputError
from r1seg_core.inference import Conversation, Predictor
from r1seg_core.inference.answer_text import compose_answer
from r1seg_core.inference.conversation import masks_path
from r1seg_core.inference.decision import ABSENT, NOT_TRAINED, PRESENT, STATUSES, Evidence, decide
from r1seg_core.inference.fingerprint import ct_fingerprint
from r1seg_core.inference.followup import NORMAL, SIDE, SIZE, follow_up_targets, intent
from r1seg_core.inference.result import AnswerResult, TargetResult
from r1seg_core.inference.targets import Targets, read_free_answer
from r1seg_core.inference.windows import WindowStitcher, gaussian_importance_map
from r1seg_core.vocabulary import load_vocabulary
from r1seg_core.volume import Volume, read_volume

from conftest import REPO

KNOWN = ["liver", "spleen"]


# ---- the rule, on synthetic evidence ------------------------------------------------------------------------------

@pytest.mark.parametrize("marked, min_ml, status", [
    (0.0, None, ABSENT),              # no voxel: absent, whatever the threshold
    (0.1, None, PRESENT),             # no threshold: any voxel
    (4.9, 5.0, ABSENT),               # under the model's presence volume
    (5.0, 5.0, PRESENT),              # at it
    (4.9, {"liver": 5.0}, ABSENT),    # one per name
    (4.9, {"spleen": 5.0}, PRESENT),  # a name left out of the map has none
])
def test_presence_is_the_fused_mask_volume_against_the_models_threshold(marked, min_ml, status):
    assert decide(Evidence("liver", marked), KNOWN, min_ml).status == status


def test_a_structure_outside_known_structures_is_not_trained_whatever_the_evidence():
    decision = decide(Evidence("femur", 500.0, said=True, windows_positive=9, windows=9), KNOWN)
    assert decision.status == NOT_TRAINED and not decision.overrules_global_answer
    # Without a list (folders written before the field) every structure counts as trained.
    assert decide(Evidence("femur", 500.0), None).status == PRESENT


@pytest.mark.parametrize("said, marked, overruled", [(True, 0.0, True), (False, 3.0, True), (True, 3.0, False),
                                                      (False, 0.0, False), (None, 3.0, False)])
def test_the_whole_ct_answer_never_decides_it_is_only_reported_when_overruled(said, marked, overruled):
    decision = decide(Evidence("liver", marked, said=said), KNOWN)
    assert decision.present == (marked > 0)
    assert decision.overrules_global_answer == overruled


def _target(name, status, voxels=0, said=None, marked=None, min_ml=0.0, shape=(4, 5, 6)):
    mask = np.zeros(shape, np.uint8)
    mask.reshape(-1)[:voxels] = 1
    evidence = Evidence(name, voxels * 0.5 if marked is None else marked, said, 3 if voxels else 0, 3)
    decision = decide(evidence, ["liver", "spleen", "stomach"], min_ml)
    assert decision.status == status
    return TargetResult.from_decision(decision, mask, None, 0.5)


def test_the_segment_and_json_follow_the_decision():
    # The decoder marked 10 voxels of stomach, under its 100 mL: the segment written is empty.
    stomach = _target("stomach", ABSENT, voxels=10, said=True, min_ml={"stomach": 100.0})
    assert not stomach.mask.any() and stomach.voxel_count == 0 and stomach.marked_ml == 5.0
    femur = _target("femur", NOT_TRAINED, voxels=10)
    liver = _target("liver", PRESENT, voxels=7)
    result = AnswerResult("q", "a", [liver, stomach, femur])
    data = json.loads(json.dumps(result.to_dict()))
    assert [t["status"] for t in data["targets"]] == [PRESENT, ABSENT, NOT_TRAINED] and data["status"] == PRESENT
    assert [t["voxel_count"] for t in data["targets"]] == [7, 0, 0]
    labels, names = result.labelmap()
    assert names == {1: "liver", 2: "stomach", 3: "femur"} and set(np.unique(labels)) == {0, 1}
    assert AnswerResult("q", "a", [femur]).status == NOT_TRAINED
    nothing = AnswerResult("q", "a", [], shape=(4, 5, 6))
    assert nothing.status == "not_understood" and not nothing.labelmap()[0].any()


def test_the_text_says_each_decision_once_and_names_what_it_did_not_understand():
    liver = _target("liver", PRESENT, voxels=7, said=False)
    stomach = _target("stomach", ABSENT, voxels=10, said=True, min_ml={"stomach": 100.0})
    femur = _target("femur", NOT_TRAINED, voxels=10, said=True)
    text = compose_answer([liver, stomach, femur], Targets(["liver", "stomach", "femur"]), 3, "q")
    assert text == ("The liver is [segment: liver]: 3.5 mL. "
                    "The whole-CT answer denied the liver, but 3 of 3 windows found it, so it is reported as present. "
                    "There is no stomach in this scan (the decoder marked 5.0 mL, under the 100.0 mL this model needs "
                    "to call it present); its segment is empty. "
                    "The whole-CT answer found the stomach, but the windows marked only 5.0 mL, under this model's "
                    "100.0 mL, so it is reported as absent. "
                    "This model was not trained to segment the femur; its segment is empty.")
    # A free answer that contradicts a decision is not shown; one naming a non-structure says so.
    spoken = Targets(["liver"], {"liver": False}, [])
    assert "Sorry" not in compose_answer([liver], spoken, 3, "q", "Sorry, there is no liver.")
    bile = compose_answer([], Targets([], not_understood=["bile"]), 0, "q", "The bile is [SEG].")
    assert "'bile'" in bile and "[segment" not in bile
    assert "'segment the blorp'" in compose_answer([], Targets([]), 0, "segment the blorp")


def test_a_generated_answer_makes_targets_only_of_vocabulary_structures():
    vocabulary = load_vocabulary()
    bile = read_free_answer(vocabulary, "The bile is [SEG].")
    assert bile.names == [] and bile.not_understood == ["bile"] and bile.seg_names == [None]
    kidneys = read_free_answer(vocabulary, "The left kidney is [SEG]. Sorry, there is no brain.")
    assert kidneys.said == {"left kidney": True, "brain": False}
    assert read_free_answer(vocabulary, "Sorry, there is no such target.").not_understood == []


def test_a_window_that_answers_no_does_not_erase_its_neighbours_mask():
    # Two overlapping windows: one found the target with probability 0.9, the other answered "no" (no mask). The
    # voxels both cover keep 0.9; before, the "no" window's vote of 0 pulled them under 0.5 near its centre.
    roi = (4, 4, 4)
    stitcher = WindowStitcher((4, 4, 6), roi, gaussian_importance_map(roi))
    stitcher.add(torch.full((1, *roi), 0.9), [(0, 0, 0)])
    torch.testing.assert_close(stitcher.result()[:, :, :4], torch.full((4, 4, 4), 0.9))
    assert float(stitcher.result()[:, :, 4:].max()) == 0.0     # no window with a mask covers these


@pytest.mark.parametrize("question, kind", [("And how big is it?", SIZE), ("what volume does it have", SIZE),
                                            ("Which side is it on?", SIDE), ("is it left or right?", SIDE),
                                            ("Is it bigger than normal?", NORMAL), ("is it enlarged?", NORMAL),
                                            ("Now the spleen.", None), ("Segment the liver.", None)])
def test_follow_up_intents(question, kind):
    assert intent(question) == kind


def test_a_follow_up_points_back_or_names_only_structures_already_answered():
    shape = (2, 3, 4)
    chat = Conversation()
    chat.add("Segment the liver.", "The liver is [SEG].", ["liver"], [_target("liver", PRESENT, voxels=5, shape=shape)])
    vocabulary = load_vocabulary()
    assert [t.name for t in follow_up_targets("Is it enlarged?", chat, vocabulary)] == ["liver"]
    assert [t.name for t in follow_up_targets("How large is the liver?", chat, vocabulary)] == ["liver"]
    assert follow_up_targets("How large is the spleen?", chat, vocabulary) is None     # not answered yet: segment it
    assert follow_up_targets("Which organ is enlarged in portal hypertension?", chat, vocabulary) is None
    assert follow_up_targets("Segment it again.", chat, vocabulary) is None               # no question about it


# ---- the conversation file ----------------------------------------------------------------------------------------

def test_a_conversation_file_keeps_turns_statuses_and_masks_byte_for_byte(tmp_path):
    ct = Volume(np.zeros((6, 7, 9), np.int16) - 1000, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), np.eye(3))
    rng = np.random.default_rng(0)
    mask = (rng.random(ct.shape) > 0.7).astype(np.uint8)
    liver = TargetResult("liver", mask, None, 0.0, int(mask.sum()))
    femur = _target("femur", NOT_TRAINED, voxels=3, shape=ct.shape)
    chat = Conversation()
    chat.bind(ct_fingerprint(ct))
    chat.add("Segment the liver and the femur.", "The liver is [SEG].", ["liver", "femur"], [liver, femur], "shown")
    path = chat.save(tmp_path / "chat.json")
    assert masks_path(path).name == "chat.masks.npz"
    with np.load(masks_path(path), allow_pickle=False) as archive:      # no pickled objects in it
        assert all(archive[key].dtype == np.uint8 for key in archive.files)
    back = Conversation.load(path)
    assert back.is_about(ct) and back.fingerprint == ct_fingerprint(ct)
    assert back.stored["liver"].mask().tobytes() == liver.mask.tobytes()
    assert back.stored["femur"].status == NOT_TRAINED and not back.stored["femur"].mask().any()
    assert back.turns[0].results == [{"name": "liver", "status": PRESENT, "volume_ml": 0.0, "voxel_count": liver.voxel_count},
                                     {"name": "femur", "status": NOT_TRAINED, "volume_ml": 0.0, "voxel_count": 0}]
    assert back.last_targets() == ["liver", "femur"] and back.history_text() == chat.history_text()
    edited = ct.with_array(ct.array.copy())
    edited.array[0, 0, 0] = 0
    assert not back.is_about(edited), "another CT's conversation must be recognised"
    assert back.bind(ct_fingerprint(edited)) and not back.stored, "its masks are not reused on another CT"


def test_a_bad_conversation_file_is_refused_with_the_fix(tmp_path):
    with pytest.raises(InvalidInputError, match="no such conversation file"):
        Conversation.load(tmp_path / "missing.json")
    (tmp_path / "other.json").write_text('{"format": 1, "turns": [{"question": 1}]}')
    with pytest.raises(InvalidInputError, match="damaged.*new file name"):
        Conversation.load(tmp_path / "other.json")
    (tmp_path / "text.json").write_text("not json")
    with pytest.raises(InvalidInputError, match="not a conversation file"):
        Conversation.load(tmp_path / "text.json")


def test_config_fields_load_from_old_and_new_folders(tmp_path):
    config = R1Seg3DConfig.load(REPO / "r1seg_core" / "data" / "default_model")
    assert config.known_structures is None or all(load_vocabulary().get(n) for n in config.known_structures)
    data = config.to_dict()
    data.pop("known_structures"), data.pop("presence_min_ml")         # a folder written before the fields
    assert R1Seg3DConfig.from_dict(data).presence_min_ml is None
    new = R1Seg3DConfig.from_dict({**data, "known_structures": KNOWN, "presence_min_ml": {"liver": 12.5}})
    assert new.known_structures == KNOWN and new.presence_min_ml == {"liver": 12.5}
    for bad in ({"known_structures": []}, {"known_structures": "liver"}, {"presence_min_ml": -1},
                {"presence_min_ml": {"liver": "big"}}):
        with pytest.raises(InvalidInputError):
            R1Seg3DConfig.from_dict({**data, **bad})


# ---- the bundled default model: no answer contradicts itself ------------------------------------------------------

def recipe_targets() -> list[str]:
    """The organs the default recipe trains, from the recipe itself (for a bundled model exported before the
    known_structures field)."""
    stage = yaml.safe_load((REPO / "training" / "recipes" / "default-smollm2" / "stage1.yaml").read_text())
    return list(stage["crops"]["targets"])


@pytest.fixture(scope="module")
def bundled():
    predictor = Predictor(device="cpu")
    if predictor.model.config.known_structures is None:
        predictor.model.config.known_structures = recipe_targets()
    return predictor


def assert_one_truth(result, voxel_ml: float) -> None:
    """Text, masks, JSON and labelmap say the same of every target, and only structures become segments."""
    vocabulary = load_vocabulary()
    data = json.loads(json.dumps(result.to_dict()))
    text = result.answer
    assert data["status"] == result.status and data["present"] == any(t.present for t in result.targets)
    labels, names = result.labelmap() if result.targets else (None, {})
    for value, (target, summary) in enumerate(zip(result.targets, data["targets"]), start=1):
        name = target.name
        assert vocabulary.get(name).name == name, f"{name!r} is not a vocabulary structure"
        assert summary["status"] == target.status in STATUSES and names[value] == name
        voxels = int(target.mask.sum())
        assert summary["voxel_count"] == target.voxel_count == voxels
        assert summary["volume_ml"] == pytest.approx(voxels * voxel_ml, abs=1e-3)
        assert bool((labels == value).any()) == target.present == (voxels > 0) == summary["present"]
        if target.status == PRESENT:
            assert f"{target.volume_ml:.1f} mL" in text and name in text
        elif target.status == ABSENT:
            assert f"There is no {name} in this scan" in text
        else:
            assert f"not trained to segment the {name}" in text
        if target.status != PRESENT:
            assert f"[segment: {name}]" not in text
    statuses = {t.name: t.status for t in result.targets}
    for shown in re.findall(r"\[segment: ([^\]]+)\]", text):
        assert statuses.get(shown) == PRESENT, f"the text shows a segment {shown!r} that is not present"
    for denied in re.findall(r"there is no ([a-z ]+?)(?: in this scan|\.|,|;)", text, re.IGNORECASE):
        assert statuses.get(denied.lower()) != PRESENT, f"the text denies {denied!r}, which is present"
    if not result.targets:
        assert result.status == "not_understood" and "nothing was segmented" in text


def test_no_answer_contradicts_its_segments_or_json_with_the_bundled_model(bundled, shared_ct):
    ct = read_volume(sample_ct_path())
    one_window = {"sliding_window": False}
    chat = Conversation()
    answers, asked = {}, []

    def ask(question, volume=ct, conversation=chat, **options):
        result = bundled.ask(volume, question, conversation=conversation, **options)
        assert_one_truth(result, volume.voxel_volume_ml)
        answers[question] = result
        asked.append(question)
        return result

    # Explicit, one target, with the windows: the README's first question.
    liver = ask("segment the liver")
    assert [t.name for t in liver.targets] == ["liver"] and liver.windows > 1
    # Follow-ups read the stored mask back: byte for byte, no model step.
    for question in ("And how big is it?", "Which side is it on?", "Is it bigger than normal?"):
        follow = ask(question)
        assert follow.answered_from == "conversation" and set(follow.timings) <= {"read", "cache_lookup"}
        assert follow.targets[0].mask.tobytes() == liver.targets[0].mask.tobytes()
    assert f"The liver measures {liver.targets[0].volume_ml:.1f} mL" in answers["And how big is it?"].answer
    # "Now the spleen." is about the spleen, on the same CT.
    spleen = ask("Now the spleen.", **one_window)
    assert [t.name for t in spleen.targets] == ["spleen"] and spleen.answered_from == "model"
    size = ask("How large is the spleen?")
    assert size.answered_from == "conversation" and size.targets[0].mask.tobytes() == spleen.targets[0].mask.tobytes()

    single = Conversation()
    for question in ("Segment the liver and the spleen.", "Segment the left kidney, the right kidney and the pancreas.",
                     "Where is the aorta?", "Is there a urinary bladder in this scan?", "Segment the gallbladder.",
                     "Which organ stores bile?", "Which organ gets rid of old red blood cells?",
                     "Show me the largest solid organ of the abdomen.", "Segment the brain.", "Segment the femur.",
                     "Segment the liver and the femur."):
        single.clear()
        ask(question, conversation=single, **one_window)
    multi = answers["Segment the left kidney, the right kidney and the pancreas."]
    assert [t.name for t in multi.targets] == ["left kidney", "right kidney", "pancreas"]
    # One target the model was not trained on never costs the other its decision.
    mixed = answers["Segment the liver and the femur."].targets
    assert [t.name for t in mixed] == ["liver", "femur"] and mixed[1].status == NOT_TRAINED
    assert mixed[0].status in (PRESENT, ABSENT) and mixed[0].marked_ml is not None
    assert answers["Segment the brain."].status == NOT_TRAINED and answers["Segment the brain."].windows == 0
    implicit = answers["Which organ stores bile?"]
    assert len(implicit.targets) == 1 and implicit.targets[0].name in bundled.model.config.known_structures
    # Words that name no structure never become a segment.
    unknown = ask("Segment the blorp.", conversation=None, global_step="off", **one_window)
    assert unknown.targets == [] and unknown.status == "not_understood"
    ask("Which organ stores bile?", conversation=None, answer_mode="generate", **one_window)   # free generation
    # A trained organ whose mask is under the model's presence volume: absent, emptied, and the text says why.
    config = bundled.model.config
    saved = config.presence_min_ml
    try:
        config.presence_min_ml = {"stomach": 1e6}
        stomach = ask("Segment the stomach.", conversation=None, **one_window)
    finally:
        config.presence_min_ml = saved
    assert stomach.targets[0].status == ABSENT and not stomach.targets[0].mask.any()

    # The held-out patient, with the windows.
    heldout = read_volume(shared_ct / "totalseg_example" / "example_ct_dicom")
    both = ask("Segment the liver and the spleen.", volume=heldout, conversation=None)
    assert [t.name for t in both.targets] == ["liver", "spleen"] and both.windows > 1
    ask("Segment the urinary bladder.", volume=heldout, conversation=None)
    assert len(asked) >= 20


@pytest.mark.parametrize("question, requested", [
    ("Segment the liver and the spleen.", ["liver", "spleen"]),
    ("I need a segmentation of the aorta, the inferior vena cava and the spleen.",
     ["aorta", "inferior vena cava", "spleen"]),
    ("Segment the femur.", ["femur"]),
    ("Now the spleen.", ["spleen"]),
    ("Is the liver visible in this scan?", ["liver"]),
    # Landmarks of a description are not requests: the model chooses the target among what it knows.
    ("Which structure matches this description? The organ that sits above the right kidney with the gallbladder "
     "tucked under its surface.", []),
    ("The organ sheltered by the lower left ribs. Mark this structure on the scan.", []),
    ("Which organ stores bile?", []),
])
def test_names_count_as_targets_only_where_the_question_asks_for_them(question, requested):
    from r1seg_core.inference.targets import requested_in_question
    from r1seg_core.vocabulary import load_vocabulary

    assert requested_in_question(load_vocabulary(), question) == requested
