"""Builds Resources/R1Seg3D.term.json, Slicer's terminology context for R1Seg3D, from the project vocabulary.

Run from the repository root after changing r1seg_core/vocabulary/structures.json:

    python3 R1Seg3DSlicer/R1Seg3DSlicerLib/terminology.py

Testing/test_slicer_extension.py regenerates the file and fails when the shipped one differs.

The file is in Slicer's segmentation-context format (the one of Slicer's DICOM master list and of
TotalSegmentator's): categories hold types, a type holds its modifiers (left, right, ...). Each type or
modifier that a vocabulary structure names carries the structure's canonical name as `3dSlicerLabel` and its
colour as `recommendedDisplayRGBValue`. Slicer finds a type by its code, so one code triplet holds one label
and colour: structures that share a triplet with an earlier one (the organ-specific tumours share
"Neoplasm", the cysts "Cyst", the front and back of each eyeball "Eyeball") use the earlier one's entry.
Plain Python (json only): it runs outside Slicer.
"""

import json
from pathlib import Path

CONTEXT_NAME = "Segmentation category and type - R1Seg3D"
SCHEMA = "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/segment-context-schema.json#"
_MODULE_DIR = Path(__file__).resolve().parents[1]
TERMINOLOGY_FILE = _MODULE_DIR / "Resources" / "R1Seg3D.term.json"
STRUCTURES_FILE = _MODULE_DIR.parent / "r1seg_core" / "vocabulary" / "structures.json"


def _code(code: dict) -> dict:
    return {"CodingSchemeDesignator": code["scheme"], "CodeValue": code["value"], "CodeMeaning": code["meaning"]}


def build_terminology(structures: list) -> dict:
    """The context as a JSON-ready dict, in the vocabulary's order (`structures`: structures.json's list)."""
    categories = {}  # category code value -> category dict, whose "Type" is a list
    types = {}       # (category, type) code values -> type dict
    for structure in structures:
        category_code, type_code, modifier_code = structure["category"], structure["type"], structure["type_modifier"]
        category = categories.setdefault(category_code["value"], {**_code(category_code), "showAnatomy": False, "Type": []})
        type_key = (category_code["value"], type_code["value"])
        if type_key not in types:
            types[type_key] = _code(type_code)
            category["Type"].append(types[type_key])
        entry = types[type_key]
        if modifier_code is not None:
            modifiers = entry.setdefault("Modifier", [])
            entry = next((m for m in modifiers if m["CodeValue"] == modifier_code["value"]), None)
            if entry is None:
                entry = _code(modifier_code)
                modifiers.append(entry)
        if "3dSlicerLabel" not in entry:  # the first structure with this triplet names it (see the docstring)
            entry["3dSlicerLabel"] = structure["name"]
            entry["recommendedDisplayRGBValue"] = [int(channel) for channel in structure["color"]]
    return {
        "SegmentationCategoryTypeContextName": CONTEXT_NAME,
        "@schema": SCHEMA,
        "SegmentationCodes": {"Category": list(categories.values())},
    }


def terminology_text(structures_file: Path = STRUCTURES_FILE) -> str:
    """What TERMINOLOGY_FILE must contain for this structures.json (LF line endings, as Slicer's files)."""
    structures = json.loads(structures_file.read_text(encoding="utf-8"))["structures"]
    return json.dumps(build_terminology(structures), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    TERMINOLOGY_FILE.write_text(terminology_text(), encoding="utf-8", newline="\n")
    print(f"wrote {TERMINOLOGY_FILE}")
