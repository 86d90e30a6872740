"""The module's help (R1Seg3DSlicer.py, helpText) says what the engine does (issues 20 and 22): each claim checked
against the engine itself, not against the help's own words, so the help fails this test when the engine changes
under it."""
import ast
import re
from pathlib import Path

import pytest

MODULE_FILE = Path(__file__).resolve().parents[1] / "R1Seg3DSlicer" / "R1Seg3DSlicer.py"


@pytest.fixture(scope="module")
def help_text() -> str:
    """The text given to `self.parent.helpText = _(...)`, read from the source (the module needs Slicer to run)."""
    for node in ast.walk(ast.parse(MODULE_FILE.read_text(encoding="utf-8"))):
        if (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute)
                and node.targets[0].attr == "helpText"):
            return node.value.args[0].value
    raise AssertionError("no helpText in the module")


def plain(html: str) -> str:
    return re.sub(r"<[^>]+>", "", html).replace("&gt;", ">").replace('\\"', '"')


def test_help_names_each_decision_the_engine_can_make(help_text):
    from r1seg_core.inference.decision import STATUSES

    text = plain(help_text)
    for status in STATUSES:   # present, absent, not_trained: each explained by name
        assert status.replace("_", " ") + ":" in text, status
    assert "never become segments" in text and "not understood" in text


def test_the_follow_ups_the_help_cites_are_follow_ups_to_the_engine(help_text):
    from r1seg_core.inference.followup import intent

    text = plain(help_text)
    cited = re.findall(r"<i>([^<]*\?)</i>", help_text)
    assert len(cited) == 3
    assert all(intent(question) is not None for question in cited), cited   # answered from the stored masks
    assert "without segmenting again" in text


def test_the_command_lines_the_help_cites_exist(help_text):
    from r1seg_core.cli import build_parser

    text = plain(help_text)
    parser = build_parser()
    assert 'r1seg ask CT "question" --conversation FILE.json' in text
    assert parser.parse_args(["ask", "ct.nii.gz", "question", "--conversation", "c.json"]).conversation == "c.json"
    assert "r1seg chat CT" in text and parser.parse_args(["chat", "ct.nii.gz"]).ct == "ct.nii.gz"
    assert "r1seg models get NAME" in text and parser.parse_args(["models", "get", "r1seg3d-phi3"]).name == "r1seg3d-phi3"


def test_help_documents_the_picker_download_and_dicom_seg(help_text):
    text = plain(help_text)
    for phrase in ("Model picks the model", "Download", "licence note", "authors state no licence", "cancel",
                   "resumes", "Export as DICOM SEG", "loaded from the DICOM database"):
        assert phrase in text, phrase
