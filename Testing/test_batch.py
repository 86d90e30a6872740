"""Issue 22: `r1seg batch` (many CTs x questions, one model load, results.csv, resume, error rows); --device mps.

Masks are read back with SimpleITK and counted independently of the project's writer; the CTs are real (shared
data). A tiny untrained model keeps it fast: the test is about the batch machinery, not the answers.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from r1seg_core.cli import main as r1seg

QUESTIONS = ("Where is the liver? Please answer and segment.", "Segment the left kidney.")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("batch_model") / "tiny"
    assert r1seg(["init-model", str(folder), "--preset", "tiny"]) == 0
    return folder


@pytest.fixture
def ct_folder(shared_ct, tmp_path) -> Path:
    folder = tmp_path / "cts"
    folder.mkdir()
    (folder / "upper_abdomen.nii.gz").symlink_to(shared_ct / "totalseg_example" / "example_ct_sm.nii.gz")
    (folder / "sarcoma.nii.gz").symlink_to(shared_ct / "ibsi" / "STS_002" / "CT_image.nii.gz")
    (folder / "broken.nii.gz").write_bytes(b"not a CT at all")
    return folder


def read_rows(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as stream:
        return list(csv.DictReader(stream))


def batch(folder: Path, out: Path, model: Path, *extra: str) -> int:
    questions = [arg for question in QUESTIONS for arg in ("--question", question)]
    return r1seg(["batch", "--input", str(folder), *questions, "--out", str(out), "--model", str(model),
                  "--no-sliding-window", "--format", "nii.gz", *extra])


def test_two_cts_two_questions_rows_masks_errors_and_resume(ct_folder, tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    assert batch(ct_folder, out, tiny_model) == 0
    rows = read_rows(out)
    answered = [r for r in rows if r["status"] != "error"]
    assert {(r["case"], r["question_id"]) for r in answered} == {(c, q) for c in ("upper_abdomen", "sarcoma")
                                                                 for q in ("q1", "q2")}
    assert len(answered) >= 4
    for row in answered:
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / row["output"])))
        value = 1 + [r["target"] for r in answered if r["output"] == row["output"]].index(row["target"])
        assert int(np.count_nonzero(labels == value)) == int(row["voxel_count"])
        assert float(row["seconds"]) > 0 and row["question"] in QUESTIONS
    errors = [r for r in rows if r["status"] == "error"]
    assert {(r["case"], r["question_id"]) for r in errors} == {("broken", "q1"), ("broken", "q2")}
    assert all("broken.nii.gz" in r["error"] for r in errors)
    progress = capsys.readouterr().err
    assert "[6/6]" in progress and "3 CTs x 2 questions: 0 done before, 6 to answer" in progress

    masks = {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")}
    assert batch(ct_folder, out, tiny_model) == 0
    assert "4 done before, 2 to answer" in capsys.readouterr().err   # only the error rows are retried
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")} == masks
    again = read_rows(out)
    assert [r for r in again if r["status"] != "error"] == answered and len(again) == len(rows)


def test_list_file_and_questions_file(shared_ct, tiny_model, tmp_path, capsys):
    listing = tmp_path / "cts.txt"
    listing.write_text(f"# one CT per line\n{shared_ct / 'totalseg_example' / 'example_ct_sm.nii.gz'}\n\n")
    questions = tmp_path / "questions.txt"
    questions.write_text("segment the spleen\n# a comment\nsegment the liver\n")
    out = tmp_path / "out"
    assert r1seg(["batch", "--input", str(listing), "--questions-file", str(questions), "--out", str(out),
                  "--model", str(tiny_model), "--no-sliding-window"]) == 0
    rows = read_rows(out)
    assert {r["question"] for r in rows} == {"segment the spleen", "segment the liver"}
    assert all(r["output"].endswith(".seg.nrrd") and (out / r["output"]).is_file() for r in rows)
    assert r1seg(["batch", "--input", str(listing), "--out", str(out)]) == 2
    assert "--question" in capsys.readouterr().err


@pytest.mark.skipif(getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
                    reason="this machine has an Apple-silicon GPU")
def test_mps_asked_for_without_one_is_a_clear_refusal():
    from r1seg_core.errors import InvalidInputError
    from r1seg_core.inference.devices import resolve_device

    with pytest.raises(InvalidInputError, match="'mps' was asked for"):
        resolve_device("mps")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_a_question_naming_no_structure_is_one_row_and_not_asked_again(shared_ct, tiny_model, tmp_path, capsys):
    listing = tmp_path / "cts.txt"
    listing.write_text(f"{shared_ct / 'totalseg_example' / 'example_ct_sm.nii.gz'}\n")
    run = ["batch", "--input", str(listing), "--question", "Which organ stores bile?", "--out", str(tmp_path / "out"),
           "--model", str(tiny_model), "--no-sliding-window"]
    assert r1seg(run) == 0
    rows = read_rows(tmp_path / "out")
    assert [(r["target"], r["status"], r["voxel_count"]) for r in rows] == [("", "not_understood", "0")]
    assert "bile" in rows[0]["answer"] and "bile" in capsys.readouterr().err
    assert r1seg(run) == 0
    assert "1 done before, 0 to answer" in capsys.readouterr().err
