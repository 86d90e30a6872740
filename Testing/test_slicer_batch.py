"""R1Seg3DSlicer/batch.py end to end under plain Python with slicer-core: CT file in, .seg.nrrd and
JSON out, exit codes. Most tests script the model; `test_batch_runs_the_real_predictor` and
`test_batch_runs_the_real_predictor_in_bfloat16` run the project's real Predictor and default model
on a small real CT."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
BATCH = REPO / "R1Seg3DSlicer" / "batch.py"
sys.path.insert(0, str(REPO / "R1Seg3DSlicer"))

pytest.importorskip("slicer", reason="needs the slicer-core wheel")

import batch  # noqa: E402
from R1Seg3DSlicerLib import scene  # noqa: E402
from test_batch import read_rows  # noqa: E402

SMALL_CT = "totalseg_example/example_ct_sm.nii.gz"


class LiverPredictor:
    """Returns a fixed block as "liver", on the grid it was given."""

    def __init__(self, folder=None, device="cpu", dtype="auto"):
        self.device, self.dtype = device, dtype

    def ask(self, volume, question, *, conversation=None, progress=None, cancel=None, **options):
        mask = np.zeros(volume.array.shape, np.uint8)
        mask[5:20, 30:60, 20:50] = 1
        if progress:
            progress(1, 1, "Segmenting")
        target = SimpleNamespace(name="liver", mask=mask, probability=None, volume_ml=float(mask.sum()) * 0.027,
                                 voxel_count=int(mask.sum()))
        return SimpleNamespace(answer="The liver is outlined.", present=True, targets=[target],
                               timings={"total": 0.1}, notes=[], device="cpu")


class NothingPredictor(LiverPredictor):
    def ask(self, volume, question, **kwargs):
        return SimpleNamespace(answer="There is no gallbladder in this scan.", present=False, targets=[],
                               timings={}, notes=[], device="cpu")


def run_batch(arguments, factory):
    stdout, stderr = io.StringIO(), io.StringIO()
    code = batch.main([str(a) for a in arguments], predictor_factory=factory, stdout=stdout, stderr=stderr)
    return code, stdout.getvalue(), stderr.getvalue()


def read_segmentation(path, reference_path):
    headless = scene.create_headless_scene()
    volume_node = headless.volumes_logic.AddArchetypeVolume(str(reference_path), "ct")
    segmentation_node = headless.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = segmentation_node.CreateDefaultStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(segmentation_node)
    segmentation = segmentation_node.GetSegmentation()
    return {segmentation.GetNthSegment(i).GetName(): scene.segment_mask(segmentation_node,
                                                                         segmentation.GetNthSegmentID(i), volume_node)
            for i in range(segmentation.GetNumberOfSegments())}


def test_batch_writes_the_answer(shared_ct, tmp_path):
    ct = shared_ct / SMALL_CT
    out = tmp_path / "out" / "liver.seg.nrrd"
    code, stdout, stderr = run_batch(
        ["--input", ct, "--question", "segment the liver", "--output", out, "--device", "cpu",
         "--answer-json", tmp_path / "answer.json"],
        lambda folder, device, dtype: LiverPredictor(folder, device, dtype),
    )
    assert code == batch.EXIT_OK, stderr
    assert "The liver is outlined." in stdout and "[R1Seg3D] Segmenting 1/1" in stderr

    segments = read_segmentation(out, ct)
    expected = np.zeros(sitk.GetArrayFromImage(sitk.ReadImage(str(ct))).shape, np.uint8)
    expected[5:20, 30:60, 20:50] = 1
    assert list(segments) == ["liver"] and np.array_equal(segments["liver"], expected)

    summary = json.loads((tmp_path / "answer.json").read_text())
    assert summary["present"] is True and summary["targets"][0]["name"] == "liver"
    assert summary["targets"][0]["voxel_count"] == int(expected.sum())


def test_batch_writes_an_empty_segmentation_when_nothing_is_found(shared_ct, tmp_path):
    out = tmp_path / "none.seg.nrrd"
    code, stdout, _ = run_batch(
        ["--input", shared_ct / SMALL_CT, "--question", "is there a gallbladder?", "--output", out],
        lambda folder, device, dtype: NothingPredictor(),
    )
    assert code == batch.EXIT_OK
    assert "no gallbladder" in stdout
    assert read_segmentation(out, shared_ct / SMALL_CT) == {}


def test_batch_reads_a_dicom_series_folder(shared_ct, tmp_path):
    code, _, stderr = run_batch(
        ["--input", shared_ct / "totalseg_example/example_ct_dicom", "--question", "segment the liver",
         "--output", tmp_path / "dicom.seg.nrrd"],
        lambda folder, device, dtype: LiverPredictor(),
    )
    assert code == batch.EXIT_OK, stderr
    assert (tmp_path / "dicom.seg.nrrd").stat().st_size > 0


def test_batch_exit_codes_for_engine_errors(shared_ct, tmp_path):
    from r1seg_core.errors import CheckpointError, InvalidInputError, OutOfMemoryError

    def failing(error):
        def factory(folder, device, dtype):
            raise error
        return factory

    common = ["--input", shared_ct / SMALL_CT, "--question", "segment the liver", "--output", tmp_path / "x.seg.nrrd"]
    for error, expected in [
        (InvalidInputError("The question is empty."), batch.EXIT_INPUT),
        (CheckpointError("No weights in /models/r1."), batch.EXIT_MODEL),
        (OutOfMemoryError("Out of memory even on the CPU."), batch.EXIT_INFERENCE),
    ]:
        code, _, stderr = run_batch(common, failing(error))
        assert code == expected and str(error) in stderr
    code, _, stderr = run_batch(common, failing(KeyError("bug")))
    assert code == batch.EXIT_UNEXPECTED and "Traceback" in stderr
    assert not (tmp_path / "x.seg.nrrd").exists()


def test_batch_passes_the_precision_to_the_model(shared_ct, tmp_path):
    loaded = []

    def factory(folder, device, dtype):
        loaded.append(LiverPredictor(folder, device, dtype))
        return loaded[-1]

    common = ["--input", shared_ct / SMALL_CT, "--question", "segment the liver", "--output", tmp_path / "o.seg.nrrd"]
    for extra, expected in [([], "auto"), (["--dtype", "bfloat16"], "bfloat16"), (["--dtype", "float32"], "float32")]:
        code, _, stderr = run_batch(common + extra, factory)
        assert code == batch.EXIT_OK, stderr
        assert loaded[-1].dtype == expected
    assert run_batch(common + ["--dtype", "float16"], factory)[0] == batch.EXIT_USAGE


def test_batch_missing_input_and_bad_arguments(tmp_path):
    code, _, stderr = run_batch(["--input", tmp_path / "nope.nii.gz", "--question", "q", "--output", tmp_path / "o.seg.nrrd"],
                                lambda folder, device, dtype: LiverPredictor())
    assert code == batch.EXIT_INPUT and "Input not found" in stderr
    assert batch.main(["--question", "q"], stderr=io.StringIO()) == batch.EXIT_USAGE


def test_batch_script_exits_with_its_code(tmp_path):
    """The file as a script: a clear message and a non-zero exit, no model needed to get there."""
    result = subprocess.run(
        [sys.executable, str(BATCH), "--input", str(tmp_path / "missing.nii.gz"), "--question", "segment the liver",
         "--output", str(tmp_path / "out.seg.nrrd")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == batch.EXIT_INPUT
    assert "Input not found" in result.stderr


def test_batch_bad_model_folder(shared_ct, tmp_path):
    empty_model = tmp_path / "model"
    empty_model.mkdir()
    code, _, stderr = run_batch(
        ["--input", shared_ct / SMALL_CT, "--question", "segment the liver", "--output", tmp_path / "o.seg.nrrd",
         "--model", empty_model, "--device", "cpu"],
        None,
    )
    assert code == batch.EXIT_MODEL, stderr


def test_batch_runs_the_real_predictor(shared_ct, tmp_path):
    """The project's Predictor and default model, CPU, through the script exactly as a user runs it."""
    out = tmp_path / "real.seg.nrrd"
    result = subprocess.run(
        [sys.executable, str(BATCH), "--input", str(shared_ct / SMALL_CT), "--question", "segment the liver",
         "--output", str(out), "--device", "cpu", "--answer-json", str(tmp_path / "answer.json")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == batch.EXIT_OK, result.stderr[-3000:]
    summary = json.loads((tmp_path / "answer.json").read_text())
    assert summary["answer"]
    segments = read_segmentation(out, shared_ct / SMALL_CT)
    assert all(mask.shape == (30, 101, 122) for mask in segments.values())
    assert len(segments) == sum(1 for t in summary["targets"] if t["segment_id"])


def test_batch_runs_the_real_predictor_in_bfloat16(shared_ct, tmp_path):
    """`--dtype bfloat16` on the CPU loads the real model in bfloat16 and still writes the answer."""
    import torch
    from R1Seg3DSlicerLib import engine

    loaded = []

    def factory(folder, device, dtype):
        loaded.append(engine._default_predictor_factory(folder, device, dtype))
        return loaded[-1]

    out = tmp_path / "bf16.seg.nrrd"
    code, stdout, stderr = run_batch(
        ["--input", shared_ct / SMALL_CT, "--question", "segment the liver", "--output", out, "--device", "cpu",
         "--dtype", "bfloat16"],
        factory,
    )
    assert code == batch.EXIT_OK, stderr[-3000:]
    assert loaded[0].dtype == torch.bfloat16
    assert {parameter.dtype for parameter in loaded[0].model.parameters()} == {torch.bfloat16}
    assert stdout.strip()
    assert all(mask.shape == (30, 101, 122) for mask in read_segmentation(out, shared_ct / SMALL_CT).values())


@pytest.mark.parametrize("package, old, fix", [
    ("torch", "2.4.1", 'pip install "torch>=2.5"'),
    ("transformers", "4.55.2", 'pip install "transformers>=4.56"'),
])
def test_batch_refuses_too_old_packages_before_any_work_with_the_fix(shared_ct, tmp_path, monkeypatch, package, old,
                                                                      fix):
    from R1Seg3DSlicerLib import engine

    real = engine.metadata.version
    monkeypatch.setattr(engine.metadata, "version", lambda name: old if name == package else real(name))
    loaded = []
    code, stdout, stderr = run_batch(["--input", shared_ct / SMALL_CT, "--question", "segment the liver",
                                      "--output", tmp_path / "o.seg.nrrd"],
                                     lambda *args: loaded.append(args) or LiverPredictor())
    assert code == batch.EXIT_DEPENDENCIES
    assert f"{package} {old} is too old" in stderr and fix in stderr
    assert loaded == [] and not (tmp_path / "o.seg.nrrd").exists()


def test_batch_inside_an_old_slicer_says_which_slicer_it_needs(shared_ct, tmp_path, monkeypatch):
    import slicer

    monkeypatch.setattr(slicer, "app", SimpleNamespace(majorVersion=5, minorVersion=8), raising=False)
    code, _, stderr = run_batch(["--input", shared_ct / SMALL_CT, "--question", "segment the liver",
                                 "--output", tmp_path / "o.seg.nrrd"], lambda *args: LiverPredictor())
    assert code == batch.EXIT_DEPENDENCIES and "5.10 or newer" in stderr and "download.slicer.org" in stderr


# ---- a list of CTs (--list): r1seg batch's reader and results table --------------------------------------------


THREE_SLICE_DICOM = "dcmqi_ct3slice/ct-3slice"


class DecidingPredictor:
    """A liver block, present, for a question naming the liver; nothing (absent) for anything else. Counts questions."""

    asked = []

    def __init__(self, folder=None, device="cpu", dtype="auto"):
        pass

    def ask(self, volume, question, *, conversation=None, progress=None, cancel=None, **options):
        DecidingPredictor.asked.append((volume.array.shape, question))
        if "bile" in question:   # names no structure: an answer without targets
            return SimpleNamespace(answer="No structure was found in the question.", present=False, targets=[],
                                   timings={}, notes=[], device="cpu")
        mask = np.zeros(volume.array.shape, np.uint8)
        liver = "liver" in question
        if liver:
            mask[0:2, 10:20, 10:30] = 1
        target = SimpleNamespace(name="liver" if liver else "gallbladder", mask=mask, probability=None,
                                 volume_ml=float(mask.sum()) * 0.5, voxel_count=int(mask.sum()),
                                 status="present" if liver else "absent")
        return SimpleNamespace(answer="Found." if liver else "Not in this scan.", present=liver, targets=[target],
                               timings={}, notes=[], device="cpu")


def test_batch_list_answers_every_ct_and_question_once_and_a_second_run_skips_them(shared_ct, tmp_path):
    cases = tmp_path / "cases.txt"
    # one path relative to the list's folder, one absolute; a comment and a blank line
    (tmp_path / "cts").symlink_to(shared_ct / "totalseg_example")
    cases.write_text(f"# two CTs\ncts/example_ct_sm.nii.gz\n\n{shared_ct / THREE_SLICE_DICOM}\n")
    out = tmp_path / "out"
    arguments = ["--list", cases, "--question", "segment the liver", "--question", "is there a gallbladder?",
                 "--output-dir", out]
    DecidingPredictor.asked = []
    code, stdout, stderr = run_batch(arguments, lambda folder, device, dtype: DecidingPredictor())
    assert code == batch.EXIT_OK, stderr
    assert len(DecidingPredictor.asked) == 4 and "4 rows; 0 errors" in stdout
    rows = read_rows(out)
    assert [(r["case"], r["question_id"], r["target"], r["status"]) for r in rows] == [
        ("example_ct_sm", "q1", "liver", "present"), ("example_ct_sm", "q2", "gallbladder", "absent"),
        ("ct-3slice", "q1", "liver", "present"), ("ct-3slice", "q2", "gallbladder", "absent")]
    # Each answer has a file of its own, on its CT's grid: the liver only in q1's, nothing in q2's.
    for ct, case in ((shared_ct / SMALL_CT, "example_ct_sm"), (shared_ct / THREE_SLICE_DICOM / "01.dcm", "ct-3slice")):
        liver = read_segmentation(out / case / "q1.seg.nrrd", ct)
        assert list(liver) == ["liver"] and int(liver["liver"].sum()) == 2 * 10 * 20
        assert np.array_equal(np.argwhere(liver["liver"]).min(0), [0, 10, 10])
        assert read_segmentation(out / case / "q2.seg.nrrd", ct) == {}
    assert {r["voxel_count"] for r in rows if r["status"] == "present"} == {str(2 * 10 * 20)}

    DecidingPredictor.asked = []
    code, stdout, stderr = run_batch(arguments, lambda folder, device, dtype: DecidingPredictor())
    assert code == batch.EXIT_OK and DecidingPredictor.asked == [] and stderr.count("answered before, skipped") == 2
    assert read_rows(out) == rows


def test_batch_list_records_a_bad_ct_as_an_error_row_and_goes_on(shared_ct, tmp_path):
    cases = tmp_path / "cases.txt"
    cases.write_text(f"missing_ct.nii.gz\n{shared_ct / SMALL_CT}\n")
    questions = tmp_path / "questions.txt"
    questions.write_text("segment the liver\n# a comment\nwhich organ stores bile?\n")
    out = tmp_path / "out"
    arguments = ["--list", cases, "--questions-file", questions, "--output-dir", out]
    code, stdout, stderr = run_batch(arguments, lambda folder, device, dtype: DecidingPredictor())
    assert code == batch.EXIT_OK, stderr
    bad1, bad2, good, no_target = read_rows(out)
    assert {bad1["status"], bad2["status"]} == {"error"} and "Input not found" in bad1["error"]
    assert bad1["case"] == "missing_ct"
    assert good["status"] == "present" and (out / good["output"]).is_file()
    # A question naming no structure still has its row (and file), so a second run does not ask it again.
    assert (no_target["question_id"], no_target["target"], no_target["status"]) == ("q2", "", "not_understood")
    DecidingPredictor.asked = []
    run_batch(arguments, lambda folder, device, dtype: DecidingPredictor())
    assert DecidingPredictor.asked == []   # the missing CT's rows are errors: retried, but it is still missing


@pytest.mark.parametrize("arguments, problem", [
    (["--list", "cases.txt", "--question", "q"], "--list needs --output-dir"),
    (["--input", "ct.nii.gz", "--question", "a", "--question", "b", "--output", "o.seg.nrrd"], "exactly one --question"),
    (["--list", "cases.txt", "--question", "q", "--output-dir", "o", "--output", "x.seg.nrrd"], "--output goes with --input"),
])
def test_batch_list_and_single_ct_options_do_not_mix(arguments, problem, capsys):
    assert batch.main(arguments, stderr=io.StringIO()) == batch.EXIT_USAGE
    assert problem in capsys.readouterr().err   # argparse's own message, on stderr
