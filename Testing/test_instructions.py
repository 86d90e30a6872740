"""The hand-written instruction data: every organ is covered, no description names its answer, and nothing shares
a word 4-gram with the held-out descriptions or question phrasings the evaluation keeps apart."""
import ast
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
INSTRUCTIONS = REPO / "training" / "data" / "instructions.json"
STRUCTURES = REPO / "r1seg_core" / "vocabulary" / "structures.json"
PROMPTING = REPO / "r1seg_core" / "prompting.py"
HELD_OUT_QUESTION_NAMES = ("HELD_OUT_IMPLICIT_QUESTIONS", "HELD_OUT_EXPLICIT_QUESTIONS")

ORGANS = {"liver", "spleen", "stomach", "pancreas", "aorta", "left kidney", "right kidney", "gallbladder", "heart",
          "urinary bladder", "inferior vena cava", "esophagus"}
PLACEHOLDER = re.compile(r"\{\w*\}")
# Word stems that give an organ away even when neither its name nor a listed synonym appears ("hepatic", "renal").
# A stem matches at the start of a word; a stem ending in \b must be the whole word.
GIVEAWAY_STEMS = {
    "liver": [r"liver", r"hepat", r"hepar", r"jecur"],
    "spleen": [r"spleen", r"splen", r"lien"],
    "stomach": [r"stomach", r"gastr", r"gaster", r"ventricul", r"tumm"],
    "pancreas": [r"pancrea", r"sweetbread"],
    "aorta": [r"aort", r"arota"],
    "left kidney": [r"kidney", r"renal", r"nephr", r"ren\b"],
    "right kidney": [r"kidney", r"renal", r"nephr", r"ren\b"],
    "gallbladder": [r"gall", r"bladder", r"cholecyst"],
    "heart": [r"heart", r"cardi", r"myocard", r"pericard", r"endocard", r"cor\b"],
    "urinary bladder": [r"bladder", r"vesic", r"cyst"],
    "inferior vena cava": [r"vena\b", r"venae\b", r"cava", r"ivc\b"],
    "esophagus": [r"esophag", r"oesophag", r"gullet"],
}


def words(text):
    return re.findall(r"[^\W_]+", text.lower())


def four_grams(text):
    """Word 4-grams of each stretch of text between placeholders (a gap left by a placeholder joins nothing)."""
    grams = set()
    for stretch in PLACEHOLDER.split(text):
        tokens = words(stretch)
        grams.update(tuple(tokens[i:i + 4]) for i in range(len(tokens) - 3))
    return grams


def held_out_questions():
    """r1seg_core.prompting's held-out question phrasings, read as literals from its source: importing the module
    would load torch, which this text-only check does not need."""
    found = {}
    for node in ast.parse(PROMPTING.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id in HELD_OUT_QUESTION_NAMES:
                    found[target.id] = ast.literal_eval(node.value)
    assert set(found) == set(HELD_OUT_QUESTION_NAMES), f"{PROMPTING} no longer defines {HELD_OUT_QUESTION_NAMES}"
    return [question for name in HELD_OUT_QUESTION_NAMES for question in found[name]]


@pytest.fixture(scope="module")
def instructions():
    return json.loads(INSTRUCTIONS.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def structures():
    return {entry["name"]: entry for entry in json.loads(STRUCTURES.read_text(encoding="utf-8"))["structures"]}


@pytest.fixture(scope="module")
def held_out_grams(structures):
    """Every word 4-gram of the held-out descriptions and question phrasings (placeholders removed)."""
    texts = [text for entry in structures.values() for text in entry.get("held_out_descriptions", [])]
    texts += held_out_questions()
    return {gram for text in texts for gram in four_grams(text)}


def test_layout_and_counts(instructions, structures):
    assert set(instructions) == {"_about", "descriptions", "synonyms", "implicit_questions"}
    assert isinstance(instructions["_about"], str) and instructions["_about"].strip()
    assert set(instructions["descriptions"]) == ORGANS
    assert set(instructions["synonyms"]) == ORGANS
    assert ORGANS <= set(structures), "every organ must be a canonical structure name"
    for organ in ORGANS:
        descriptions = instructions["descriptions"][organ]
        assert len(descriptions) >= 15, organ
        assert len(set(descriptions)) == len(descriptions), f"{organ}: repeated description"
        assert 2 <= len(instructions["synonyms"][organ]) <= 5, organ
    templates = instructions["implicit_questions"]
    assert len(templates) >= 15
    assert len(set(templates)) == len(templates)
    for template in templates:
        assert PLACEHOLDER.findall(template) == ["{description}"], template


def test_descriptions_are_sentences_that_hide_the_answer(instructions, structures):
    for organ, descriptions in instructions["descriptions"].items():
        names = [organ, *instructions["synonyms"][organ], *structures[organ]["synonyms"]]
        giveaways = [re.compile(r"\b" + re.escape(name.replace("_", " ")) + r"\b", re.IGNORECASE) for name in names]
        giveaways += [re.compile(r"\b" + stem, re.IGNORECASE) for stem in GIVEAWAY_STEMS[organ]]
        for description in descriptions:
            assert description.endswith("."), description
            assert not PLACEHOLDER.search(description), description
            leaked = [pattern.pattern for pattern in giveaways if pattern.search(description.replace("_", " "))]
            assert not leaked, f"{organ}: {description!r} gives away the answer via {leaked}"


@pytest.mark.parametrize("organ, side", [("left kidney", "left"), ("right kidney", "right")])
def test_paired_organ_descriptions_say_the_side(instructions, organ, side):
    for description in instructions["descriptions"][organ]:
        assert side in words(description), f"{organ}: {description!r} does not say {side}"


def test_nothing_shares_a_4gram_with_held_out_text(instructions, held_out_grams):
    assert held_out_grams, "no held-out text found to compare against"
    texts = [text for descriptions in instructions["descriptions"].values() for text in descriptions]
    texts += instructions["implicit_questions"]
    overlaps = [f"{text!r} shares {' '.join(gram)!r}" for text in texts
                for gram in four_grams(text) if gram in held_out_grams]
    assert not overlaps, "reword these:\n" + "\n".join(overlaps)
