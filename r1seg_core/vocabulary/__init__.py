"""The one vocabulary of CT structures that training, inference and the Slicer module share.

structures.json holds each canonical structure (synonyms, SNOMED CT codes, colour, implicit
descriptions for training and held-out ones for evaluation only); datasets.json maps every dataset's label ids to canonical names. README.md says
where the codes and colours come from.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from r1seg_core.errors import R1SegError

_DATA_DIR = Path(__file__).resolve().parent
GROUPS = frozenset({"organ", "vessel", "bone", "muscle", "lesion", "airway", "gland", "nerve", "cavity", "other"})
_STRUCTURE_FIELDS = frozenset({"name", "display_name", "synonyms", "group", "category", "type", "type_modifier",
                               "color", "descriptions", "held_out_descriptions"})
_OPTIONAL_STRUCTURE_FIELDS = frozenset({"provenance"})  # documentation only, see README.md
_ARTICLES = ("the", "a", "an")
_SIDES = ("left", "right")


class VocabularyError(R1SegError, ValueError):
    """structures.json or datasets.json is malformed; the message names the file and the entry."""


@dataclass(frozen=True)
class Code:
    scheme: str
    value: str
    meaning: str


@dataclass(frozen=True)
class Structure:
    name: str
    display_name: str
    synonyms: tuple[str, ...]
    group: str
    category: Code
    type: Code
    type_modifier: Code | None
    color: tuple[int, int, int]
    descriptions: tuple[str, ...]             # what training asks implicit questions with
    held_out_descriptions: tuple[str, ...]    # never trained on: implicit questions of the evaluation

    @property
    def all_descriptions(self) -> tuple[str, ...]:
        return self.descriptions + self.held_out_descriptions


def _words(text: str) -> list[str]:
    """Lower-case word tokens; underscores, hyphens and punctuation all separate words."""
    return re.findall(r"[^\W_]+", text.lower())


def _phrase_key(text: str) -> str:
    """The form every name and synonym is matched in: "The Kidney_Left " -> "kidney left"."""
    words = _words(text)
    while words and words[0] in _ARTICLES:
        words = words[1:]
    return " ".join(words)


def _singular_forms(word: str) -> list[str]:
    # Only ever compared against known phrases, so over-generating ("pancreas" -> "pancrea") is harmless.
    forms = []
    if word.endswith("ies") and len(word) > 4:
        forms.append(word[:-3] + "y")
    if word.endswith("es") and len(word) > 3:
        forms.append(word[:-2])
    if word.endswith("s") and len(word) > 2:
        forms.append(word[:-1])
    return forms


class Vocabulary:
    """Canonical structures plus dataset label maps; build it with load_vocabulary()."""

    def __init__(self, structures: tuple[Structure, ...], label_maps: dict[str, dict[int, str]],
                 phrases: dict[str, Structure], published_names: dict[str, dict[str, Structure]]):
        self.structures = structures
        self._by_name = {s.name: s for s in structures}
        self._label_maps = label_maps
        self._phrases = phrases
        self._published_names = published_names
        self._longest_phrase = max(len(p.split(" ")) for p in phrases)

    def lookup(self, text: str, dataset: str | None = None) -> Structure | None:
        """The structure a name, synonym or raw dataset label refers to, or None.

        With `dataset` (a datasets.json code), a label name of that dataset's own published label list comes
        first: MSD calls a liver, a lung and a pancreas tumour all "cancer".
        """
        key = _phrase_key(text)
        if not key:
            return None
        if key in self._published_names.get(dataset, {}):
            return self._published_names[dataset][key]
        *head, last = key.split(" ")
        for form in (last, *_singular_forms(last)):
            hit = self._phrases.get(" ".join([*head, form]))
            if hit is not None:
                return hit
        return None

    def get(self, name: str) -> Structure:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a canonical structure name (use lookup() for synonyms)") from None

    def find_in_text(self, text: str) -> list[Structure]:
        """Structures named in a question, in order of appearance, longest phrase first, without repeats.

        "left and right kidneys" names both sided structures; a bare plural ("the kidneys") names
        the side-less pair entry.
        """
        tokens = _words(text)
        found: list[Structure] = []
        position = 0
        while position < len(tokens):
            both_sides = self._coordinated_sides(tokens, position)
            if both_sides is not None:
                matches, position = both_sides
            else:
                match = self._longest_match(tokens, position)
                if match is None:
                    position += 1
                    continue
                structure, position = match
                matches = (structure,)
            found.extend(s for s in matches if s not in found)
        return found

    def dataset_label_map(self, dataset: str) -> dict[int, str]:
        try:
            return dict(self._label_maps[dataset])
        except KeyError:
            raise KeyError(f"unknown dataset {dataset!r}; known: {', '.join(self._label_maps)}") from None

    def datasets(self) -> tuple[str, ...]:
        return tuple(self._label_maps)

    def _longest_match(self, tokens: list[str], start: int) -> tuple[Structure, int] | None:
        for length in range(min(self._longest_phrase, len(tokens) - start), 0, -1):
            *head, last = tokens[start:start + length]
            for form in (last, *_singular_forms(last)):
                hit = self._phrases.get(" ".join([*head, form]))
                if hit is not None:
                    return hit, start + length
        return None

    def _coordinated_sides(self, tokens: list[str], start: int) -> tuple[tuple[Structure, Structure], int] | None:
        """'left and right kidneys' / 'right, left parotid' -> both sided structures, else None."""
        first_side = tokens[start]
        if first_side not in _SIDES:
            return None
        second = start + 1
        if second < len(tokens) and tokens[second] in ("and", "or"):
            second += 1
        if second >= len(tokens) or tokens[second] not in _SIDES or tokens[second] == first_side:
            return None
        match = self._longest_match(tokens, second)
        if match is None or not match[0].name.startswith(tokens[second] + " "):
            return None
        second_structure, end = match
        first_structure = self._by_name.get(first_side + second_structure.name[len(tokens[second]):])
        if first_structure is None:
            return None
        return (first_structure, second_structure), end


@lru_cache(maxsize=1)
def load_vocabulary() -> Vocabulary:
    """The packaged vocabulary, validated once per process."""
    return _load_vocabulary_from(_DATA_DIR)


def _load_vocabulary_from(directory: Path) -> Vocabulary:
    """Read and validate structures.json and datasets.json from `directory`."""
    structures_path, datasets_path = directory / "structures.json", directory / "datasets.json"
    structures = tuple(_parse_structure(entry, structures_path)
                       for entry in _read(structures_path, "structures", list))
    by_name: dict[str, Structure] = {}
    phrases: dict[str, Structure] = {}
    for structure in structures:
        if structure.name in by_name:
            raise VocabularyError(f"{structures_path}: duplicate structure name {structure.name!r}")
        by_name[structure.name] = structure
        for text in (structure.name, structure.display_name, *structure.synonyms):
            owner = phrases.setdefault(_phrase_key(text), structure)
            if owner is not structure:
                raise VocabularyError(f"{structures_path}: {text!r} of {structure.name!r} already names "
                                      f"{owner.name!r}; a phrase must resolve to one structure")

    label_maps: dict[str, dict[int, str]] = {}
    published_names: dict[str, dict[str, Structure]] = {}
    for dataset, spec in _read(datasets_path, "datasets", dict).items():
        labels = spec.get("labels") if isinstance(spec, dict) else None
        if not isinstance(labels, dict) or not labels:
            raise VocabularyError(f"{datasets_path}: dataset {dataset!r} has no 'labels' object")
        label_maps[dataset] = {}
        for label_id, name in labels.items():
            if not label_id.isdigit():
                raise VocabularyError(f"{datasets_path}: dataset {dataset!r} label id {label_id!r} is not an integer")
            if name not in by_name:
                raise VocabularyError(f"{datasets_path}: dataset {dataset!r} label {label_id} names {name!r}, "
                                      "which is not a structure in structures.json")
            label_maps[dataset][int(label_id)] = name
        published = spec.get("published_names", {})
        if not isinstance(published, dict):
            raise VocabularyError(f"{datasets_path}: dataset {dataset!r} 'published_names' must be an object")
        published_names[dataset] = {}
        for raw, name in published.items():
            if name not in by_name:
                raise VocabularyError(f"{datasets_path}: dataset {dataset!r} published name {raw!r} names {name!r}, "
                                      "which is not a structure in structures.json")
            published_names[dataset][_phrase_key(raw)] = by_name[name]
    return Vocabulary(structures, label_maps, phrases, published_names)


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    # json.loads would silently keep the last of two equal keys, e.g. two definitions of label "3".
    keys = [key for key, _ in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"duplicate keys {duplicates}")
    return dict(pairs)


def _read(path: Path, top_key: str, expected: type):
    try:
        content = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except (OSError, ValueError) as error:
        raise VocabularyError(f"{path}: cannot be read as JSON ({error})") from error
    if not isinstance(content, dict) or not isinstance(content.get(top_key), expected):
        raise VocabularyError(f"{path}: expected a top-level object with a {top_key!r} {expected.__name__}")
    return content[top_key]


def _parse_structure(entry: object, path: Path) -> Structure:
    if not isinstance(entry, dict):
        raise VocabularyError(f"{path}: structure entry {entry!r} is not an object")
    where = f"{path}: structure {entry.get('name')!r}"
    missing = _STRUCTURE_FIELDS - entry.keys()
    unknown = entry.keys() - _STRUCTURE_FIELDS - _OPTIONAL_STRUCTURE_FIELDS
    if missing or unknown:
        raise VocabularyError(f"{where}: missing fields {sorted(missing)}, unknown fields {sorted(unknown)}")
    name = entry["name"]
    if not isinstance(name, str) or _phrase_key(name) != name:
        raise VocabularyError(f"{where}: name must be lower-case words separated by single spaces")
    if not isinstance(entry["display_name"], str) or not entry["display_name"].strip():
        raise VocabularyError(f"{where}: display_name must be a non-empty string")
    for field in ("synonyms", "descriptions", "held_out_descriptions"):
        if not isinstance(entry[field], list) or not all(isinstance(t, str) and t.strip() for t in entry[field]):
            raise VocabularyError(f"{where}: {field} must be a list of non-empty strings")
    if entry["group"] not in GROUPS:
        raise VocabularyError(f"{where}: group {entry['group']!r} is not one of {sorted(GROUPS)}")
    color = entry["color"]
    if (not isinstance(color, list) or len(color) != 3
            or not all(type(c) is int and 0 <= c <= 255 for c in color)):
        raise VocabularyError(f"{where}: color must be three integers in 0..255, got {color!r}")
    return Structure(
        name=name,
        display_name=entry["display_name"],
        synonyms=tuple(entry["synonyms"]),
        group=entry["group"],
        category=_parse_code(entry["category"], f"{where}: category"),
        type=_parse_code(entry["type"], f"{where}: type"),
        type_modifier=None if entry["type_modifier"] is None
        else _parse_code(entry["type_modifier"], f"{where}: type_modifier"),
        color=(color[0], color[1], color[2]),
        descriptions=tuple(entry["descriptions"]),
        held_out_descriptions=tuple(entry["held_out_descriptions"]),
    )


def _parse_code(value: object, where: str) -> Code:
    if (not isinstance(value, dict) or value.keys() != {"scheme", "value", "meaning"}
            or not all(isinstance(v, str) and v for v in value.values())):
        raise VocabularyError(f"{where}: expected {{'scheme', 'value', 'meaning'}} with non-empty strings")
    return Code(scheme=value["scheme"], value=value["value"], meaning=value["meaning"])
