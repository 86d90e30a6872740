"""The shared vocabulary: label maps resolve, descriptions never leak the answer, lookups behave."""
import json
import re
import shutil
from pathlib import Path

import pytest

from r1seg_core.vocabulary import (Code, VocabularyError, _load_vocabulary_from, load_vocabulary)

VOCABULARY_DIR = Path(__file__).resolve().parents[1] / "r1seg_core" / "vocabulary"
LEFT = Code("SCT", "7771000", "Left")
RIGHT = Code("SCT", "24028007", "Right")

# Class counts of the 25 M3D-Seg datasets (model_anchors.md 4.1).
M3D_CLASS_COUNTS = {"0000": 1, "0001": 30, "0002": 15, "0003": 4, "0004": 3, "0005": 4, "0006": 2, "0007": 13,
                    "0008": 1, "0009": 47, "0010": 13, "0011": 104, "0012": 6, "0013": 16, "0014": 28, "0015": 28,
                    "0016": 1, "0017": 3, "0018": 1, "0019": 2, "0020": 2, "0021": 1, "0022": 2, "0023": 1,
                    "0024": 3}


@pytest.fixture(scope="module")
def vocabulary():
    return load_vocabulary()


def words(text):
    return re.findall(r"[^\W_]+", text.lower())


def test_load_vocabulary_is_cached(vocabulary):
    assert load_vocabulary() is vocabulary


def test_all_totalsegmentator_ids_resolve(vocabulary):
    label_map = vocabulary.dataset_label_map("totalsegmentator_v2")
    assert sorted(label_map) == list(range(1, 118))
    for name in label_map.values():
        assert vocabulary.get(name).name == name


def test_totalsegmentator_raw_names_look_up_to_the_mapped_structure(vocabulary, shared_ct):
    classes = shared_ct / "totalseg_example" / "totalsegmentator_total_v2_classes.json"
    label_map = vocabulary.dataset_label_map("totalsegmentator_v2")
    for label, raw in json.loads(classes.read_text()).items():
        assert vocabulary.lookup(raw).name == label_map[int(label)], raw


def test_every_dataset_label_resolves(vocabulary):
    assert set(vocabulary.datasets()) == {"totalsegmentator_v2", *M3D_CLASS_COUNTS}
    for dataset in vocabulary.datasets():
        for name in vocabulary.dataset_label_map(dataset).values():
            vocabulary.get(name)
    for code, count in M3D_CLASS_COUNTS.items():
        assert sorted(vocabulary.dataset_label_map(code)) == list(range(count)), code


def test_verse_duplicate_l1_is_l2(vocabulary):
    for code in ("0014", "0015"):
        label_map = vocabulary.dataset_label_map(code)
        assert label_map[19] == "vertebra l1" and label_map[20] == "vertebra l2"
        assert len(set(label_map.values())) == len(label_map)
        assert label_map[27] == "vertebra t13"


def test_context_dependent_tumour_labels(vocabulary):
    assert vocabulary.dataset_label_map("0005")[3] == "kidney tumor"
    assert vocabulary.dataset_label_map("0020")[1] == "liver tumor"
    assert vocabulary.dataset_label_map("0022")[1] == "pancreas tumor"


def forbidden_phrases(structure):
    """Own name and synonyms, also with 'left'/'right' removed so 'left kidney' may not say 'kidney'."""
    phrases = set()
    for text in (structure.name, structure.display_name, *structure.synonyms):
        tokens = words(text)
        phrases.add(tuple(tokens))
        sideless = tuple(t for t in tokens if t not in ("left", "right"))
        if sideless:
            phrases.add(sideless)
    return phrases


def names_phrase(tokens, phrase):
    """Whether the token list contains the phrase, allowing a plural on its last word."""
    *head, last = phrase
    plurals = {last, last + "s", last + "es", last[:-1] + "ies" if last.endswith("y") else last}
    for start in range(len(tokens) - len(phrase) + 1):
        window = tokens[start:start + len(phrase)]
        if window[:-1] == head and window[-1] in plurals:
            return True
    return False


def test_descriptions_do_not_name_their_structure(vocabulary):
    leaks = []
    for structure in vocabulary.structures:
        phrases = forbidden_phrases(structure)
        for description in structure.all_descriptions:
            tokens = words(description)
            leaks += [(structure.name, " ".join(p), description) for p in phrases if names_phrase(tokens, p)]
    assert not leaks, "\n".join(map(str, leaks))


def test_descriptions_are_plentiful_single_sentences(vocabulary):
    for structure in vocabulary.structures:
        assert len(structure.descriptions) >= 3 and structure.held_out_descriptions, structure.name
        assert len(set(structure.all_descriptions)) == len(structure.all_descriptions), structure.name
        for description in structure.all_descriptions:
            assert description[0].isupper() and description.endswith("."), description
            assert not re.search(r"[.!?]\s+[A-Z]", description), description


def test_lookup_is_case_insensitive_and_side_specific(vocabulary):
    kidney = vocabulary.lookup("Kidney")
    assert kidney.name == "kidney" and kidney.type_modifier is None
    for text in ("left kidney", "kidney_left", "Left Kidney", "  LEFT   kidney ", "kidney left", "the left kidney"):
        structure = vocabulary.lookup(text)
        assert structure.name == "left kidney", text
        assert structure.type_modifier == LEFT
    assert vocabulary.lookup("right kidney").type_modifier == RIGHT
    assert vocabulary.lookup("left kidney").type == kidney.type == Code("SCT", "64033007", "Kidney")


@pytest.mark.parametrize("text, name", [
    ("the liver", "liver"), ("postcava", "inferior vena cava"), ("IVC", "inferior vena cava"),
    ("gall bladder", "gallbladder"), ("kidneys", "kidney"), ("lungs", "lung"), ("vertebrae_L1", "vertebra l1"),
    ("lumbar spine L2", "vertebra l2"), ("L1", "vertebra l1"), ("rib_left_1", "left rib 1"),
    ("hepatic vessels", "hepatic vessel"), ("tumours", "tumor"), ("head of femur left", "left femoral head"),
    ("prostate/uterus", "prostate or uterus"), ("coccygis", "coccyx"), ("larynx glottis", "glottis"),
])
def test_lookup_accepts_synonyms_and_raw_dataset_names(vocabulary, text, name):
    assert vocabulary.lookup(text).name == name


def test_lookup_of_unknown_text_is_none(vocabulary):
    assert vocabulary.lookup("banana") is None
    assert vocabulary.lookup("  ") is None


def test_get_needs_the_canonical_name(vocabulary):
    assert vocabulary.get("left kidney").display_name == "Left kidney"
    with pytest.raises(KeyError, match="kidney_left"):
        vocabulary.get("kidney_left")


def test_unknown_dataset_lists_the_known_ones(vocabulary):
    with pytest.raises(KeyError, match="totalsegmentator_v2.*0024"):
        vocabulary.dataset_label_map("0099")


@pytest.mark.parametrize("question, names", [
    ("Segment the liver and the spleen.", ["liver", "spleen"]),
    ("Please segment the left kidney.", ["left kidney"]),
    ("Segment the left and right kidneys", ["left kidney", "right kidney"]),
    ("Where are the kidneys and the lungs?", ["kidney", "lung"]),
    ("segment kidney_left, then the gall bladder", ["left kidney", "gallbladder"]),
    ("Outline the spleen, the liver and the spleen again", ["spleen", "liver"]),
    ("Segment the brain stem but not the brain", ["brainstem", "brain"]),
    ("Find the right middle lobe and the left lower lobe", ["right middle lobe", "left lower lobe"]),
    ("Show the aorta next to the postcava", ["aorta", "inferior vena cava"]),
    ("Segment the kidney tumor and the kidney", ["kidney tumor", "kidney"]),
    ("Is there anything unusual in this scan?", []),
])
def test_find_in_text(vocabulary, question, names):
    assert [s.name for s in vocabulary.find_in_text(question)] == names


def test_paired_structures_share_their_type_and_differ_by_laterality(vocabulary):
    for base in ("kidney", "lung", "adrenal gland", "parotid gland", "optic nerve", "femur"):
        both = vocabulary.get(base)
        left, right = vocabulary.get(f"left {base}"), vocabulary.get(f"right {base}")
        assert both.type == left.type == right.type
        assert (both.type_modifier, left.type_modifier, right.type_modifier) == (None, LEFT, RIGHT)


def test_lesions_are_morphologically_altered_structures(vocabulary):
    altered = Code("SCT", "49755003", "Morphologically Altered Structure")
    lesions = [s for s in vocabulary.structures if s.group == "lesion"]
    assert lesions and all(s.category == altered for s in lesions)


def test_slicer_codes_spot_check(vocabulary):
    assert vocabulary.get("liver").type == Code("SCT", "10200004", "Liver")
    assert vocabulary.get("inferior vena cava").type == Code("SCT", "64131007", "Inferior vena cava")
    assert vocabulary.get("vertebra l1").type == Code("SCT", "66794005", "L1 vertebra")
    assert vocabulary.get("liver").color == (221, 130, 101)


def copy_vocabulary(tmp_path):
    for name in ("structures.json", "datasets.json"):
        shutil.copy(VOCABULARY_DIR / name, tmp_path / name)
    return (json.loads((tmp_path / "structures.json").read_text()),
            json.loads((tmp_path / "datasets.json").read_text()))


def write(tmp_path, structures=None, datasets=None):
    if structures is not None:
        (tmp_path / "structures.json").write_text(json.dumps(structures))
    if datasets is not None:
        (tmp_path / "datasets.json").write_text(json.dumps(datasets))


def test_unmodified_copy_loads(tmp_path):
    copy_vocabulary(tmp_path)
    assert len(_load_vocabulary_from(tmp_path).structures) == len(load_vocabulary().structures)


def test_validation_rejects_label_without_structure(tmp_path):
    _, datasets = copy_vocabulary(tmp_path)
    datasets["datasets"]["0000"]["labels"]["0"] = "livre"
    write(tmp_path, datasets=datasets)
    with pytest.raises(VocabularyError, match="'livre'"):
        _load_vocabulary_from(tmp_path)


def test_validation_rejects_duplicate_name(tmp_path):
    structures, _ = copy_vocabulary(tmp_path)
    structures["structures"].append(dict(structures["structures"][0]))
    write(tmp_path, structures=structures)
    with pytest.raises(VocabularyError, match="duplicate structure name 'liver'"):
        _load_vocabulary_from(tmp_path)


def test_validation_rejects_colour_out_of_range(tmp_path):
    structures, _ = copy_vocabulary(tmp_path)
    structures["structures"][0]["color"] = [300, 0, 0]
    write(tmp_path, structures=structures)
    with pytest.raises(VocabularyError, match="color"):
        _load_vocabulary_from(tmp_path)


def test_validation_rejects_synonym_shared_by_two_structures(tmp_path):
    structures, _ = copy_vocabulary(tmp_path)
    structures["structures"][1]["synonyms"].append("Hepar")
    write(tmp_path, structures=structures)
    with pytest.raises(VocabularyError, match="'Hepar' of 'spleen' already names 'liver'"):
        _load_vocabulary_from(tmp_path)


def test_validation_rejects_missing_field_and_bad_code(tmp_path):
    structures, _ = copy_vocabulary(tmp_path)
    del structures["structures"][0]["group"]
    write(tmp_path, structures=structures)
    with pytest.raises(VocabularyError, match="missing fields \\['group'\\]"):
        _load_vocabulary_from(tmp_path)
    structures["structures"][0]["group"] = "organ"
    structures["structures"][0]["type"] = {"scheme": "SCT", "value": ""}
    write(tmp_path, structures=structures)
    with pytest.raises(VocabularyError, match="type"):
        _load_vocabulary_from(tmp_path)


def test_validation_rejects_unreadable_json(tmp_path):
    copy_vocabulary(tmp_path)
    (tmp_path / "structures.json").write_text('{"structures": [')
    with pytest.raises(VocabularyError, match="cannot be read as JSON"):
        _load_vocabulary_from(tmp_path)


def test_validation_rejects_duplicate_label_ids(tmp_path):
    copy_vocabulary(tmp_path)
    (tmp_path / "datasets.json").write_text('{"datasets": {"x": {"labels": {"0": "liver", "0": "spleen"}}}}')
    with pytest.raises(VocabularyError, match="duplicate keys \\['0'\\]"):
        _load_vocabulary_from(tmp_path)
