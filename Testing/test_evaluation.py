"""`r1seg evaluate`: metrics against hand computations on real masks, aggregation, splits, bad input, and an
end-to-end run with a small model on two real cases (a DICOM folder whose label is flipped in y, and a folder of
masks on other grids), resumed after an interruption."""
import hashlib
import json
import math
import os

import matplotlib.image
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from r1seg_core.cli import main as r1seg
from r1seg_core.errors import InvalidInputError
from r1seg_core.prompting import HELD_OUT_EXPLICIT_QUESTIONS
from r1seg_core.evaluation import report
from r1seg_core.evaluation.cases import read_data_list
from r1seg_core.evaluation.metrics import hd95_mm, overlap_scores, score_masks
from r1seg_core.evaluation.plots import sliding_window_violins
from r1seg_core.evaluation.questions import KINDS, build_questions
from r1seg_core.evaluation.regions import absent_targets, body_regions
from r1seg_core.vocabulary import load_vocabulary
from training.data.cases import SourceSpec, list_cases

from test_inference import small_model

TS = "totalseg_example"
CLASSES = f"{TS}/totalsegmentator_total_v2_classes.json"


def label_array(shared_ct, name, value):
    image = sitk.ReadImage(str(shared_ct / TS / name))
    return sitk.GetArrayFromImage(image) == value, image.GetSpacing()


# ---- metrics --------------------------------------------------------------------------------------------------

def surface_points(mask, spacing_zyx):
    """Voxels of the mask with a 6-neighbour outside it (or outside the array), in mm: the hand-made surface."""
    padded = np.pad(mask, 1)
    inside = padded[1:-1, 1:-1, 1:-1]
    interior = inside.copy()
    for axis in range(3):
        for step in (-1, 1):
            interior &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
    return np.argwhere(inside & ~interior) * np.asarray(spacing_zyx)


def hand_hd95(a, b, spacing_zyx):
    pa, pb = surface_points(a, spacing_zyx), surface_points(b, spacing_zyx)
    distances = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return max(np.percentile(distances.min(1), 95), np.percentile(distances.min(0), 95))


def hand_overlap(a, b):
    predicted, truth = set(map(tuple, np.argwhere(a))), set(map(tuple, np.argwhere(b)))
    tp, fp, fn = len(predicted & truth), len(predicted - truth), len(truth - predicted)
    return {"dice": 2 * tp / (2 * tp + fp + fn), "precision": tp / (tp + fp), "sensitivity": tp / (tp + fn),
            "iou": tp / (tp + fp + fn)}


def test_metrics_on_real_masks_match_a_hand_computation(shared_ct):
    # The right adrenal gland (value 8) of the DICOM case's label: 0.977 x 0.977 x 2 mm, anisotropic.
    truth, spacing = label_array(shared_ct, "example_seg_dicom.nii.gz", 8)
    where = np.argwhere(truth)
    box = tuple(slice(max(low - 4, 0), high + 5) for low, high in zip(where.min(0), where.max(0)))
    truth = truth[box]
    prediction = np.roll(truth, (1, 2, -3), axis=(0, 1, 2))     # the same gland, one slice and a few voxels off
    prediction[:, :2] = False
    scores = score_masks(prediction, truth, spacing)
    for key, value in hand_overlap(prediction, truth).items():
        assert scores[key] == pytest.approx(value, abs=1e-9), key
    spacing_zyx = spacing[::-1]
    assert scores["hd95_mm"] == pytest.approx(hand_hd95(prediction, truth, spacing_zyx), abs=1e-3)
    # Anisotropy matters: the same voxels with 5 mm slices are further apart.
    stretched = hd95_mm(prediction, truth, (spacing[0], spacing[1], 5.0))
    assert stretched == pytest.approx(hand_hd95(prediction, truth, (5.0, spacing[1], spacing[0])), abs=1e-3)
    assert stretched > scores["hd95_mm"]


def test_empty_masks_follow_the_documented_definitions(shared_ct):
    truth, spacing = label_array(shared_ct, "example_seg_dicom.nii.gz", 8)
    empty = np.zeros_like(truth)
    assert score_masks(empty, empty, spacing) == {"dice": 1.0, "precision": 1.0, "sensitivity": 1.0, "iou": 1.0,
                                                  "hd95_mm": 0.0}
    for prediction, reference in ((empty, truth), (truth, empty)):
        scores = score_masks(prediction, reference, spacing)
        assert scores["hd95_mm"] == math.inf
        assert all(scores[key] == 0.0 for key in ("dice", "precision", "sensitivity", "iou"))
    assert overlap_scores(truth, truth)["dice"] == 1.0 and hd95_mm(truth, truth, spacing) == 0.0


# ---- aggregation ----------------------------------------------------------------------------------------------

def row(case, target, kind, dice, hd95, present_gt=True, present_pred=True, tag=None, seconds=1.0, memory=100.0,
        dataset="A", status=None):
    return {"id": case, "dataset": dataset, "target": target, "kind": kind, "tag": tag or kind,
            "question": f"question {tag}" if tag else f"question about the {target}",
            "dice": dice, "precision": dice, "sensitivity": dice, "iou": dice, "hd95_mm": hd95,
            "present_gt": present_gt, "present_pred": present_pred, "seconds": seconds, "peak_memory_mb": memory,
            "status": status or ("present" if present_pred else "absent")}


def test_aggregation_of_a_small_table():
    rows = [row("c1", "liver", "explicit", 0.9, 4.0), row("c1", "liver", "implicit", 0.5, 10.0, seconds=3.0),
            row("c2", "spleen", "explicit", 0.0, math.inf, present_pred=False, dataset="B"),
            row("c2", "liver", "multi", 0.7, 6.0, tag="multi1", seconds=5.0, memory=300.0, dataset="B"),
            row("c2", "spleen", "multi", 0.3, 8.0, tag="multi1", seconds=5.0, memory=300.0, dataset="B"),
            row("c1", "brain", "absent_out_of_region", 0.0, math.inf, present_gt=False),
            row("c2", "heart", "absent_in_region", 0.0, math.inf, present_gt=False, dataset="B"),
            row("c2", "gallbladder", "absent_in_region", 1.0, 0.0, present_gt=False, present_pred=False, dataset="B")]
    segmentation = report.segmentation_rows(rows)
    assert len(segmentation) == 5
    summary = report.segmentation_summary(segmentation)
    dice = [0.9, 0.5, 0.0, 0.7, 0.3]
    assert summary["dice"][0] == pytest.approx(sum(dice) / 5)
    assert summary["dice"][1] == pytest.approx(math.sqrt(sum((d - sum(dice) / 5) ** 2 for d in dice) / 5))
    assert summary["hd95_mm"][0] == pytest.approx((4 + 10 + 6 + 8) / 4)      # the inf of the missed spleen left out
    assert summary["hd95_median"] == pytest.approx(7.0) and summary["missed"] == 1
    per_dataset = report.grouped(segmentation, "dataset")
    assert report.segmentation_summary(per_dataset["A"])["dice"][0] == pytest.approx(0.7)
    presence = report.presence_summary(report.presence_rows(rows))
    assert (presence["n"], presence["fp"], presence["tn"]) == (3, 2, 1)
    assert presence["specificity"] == pytest.approx(1 / 3)
    cost = report.cost_summary(rows)
    assert cost["n"] == 7                                  # the two-target question counts once
    assert cost["total_s"] == pytest.approx(1 + 3 + 1 + 5 + 1 + 1 + 1) and cost["peak_mb"] == 300.0
    table = report.presence_table(rows)
    assert "| Total | 3 | 0 | 2 | 1 | 33.33 | 33.33 |" in table
    assert "| absent_in_region | 2 | 0 | 1 | 1 | 50.00 | 50.00 |" in table
    assert "| Overall | 5 | 48.00 ± " in report.segmentation_table(rows, "dataset")


def test_not_trained_is_counted_apart_from_absent_everywhere():
    rows = [row("c1", "liver", "explicit", 0.8, 5.0),
            row("c1", "spleen", "explicit", 0.0, math.inf, present_pred=False),                    # a miss
            row("c1", "femur", "explicit", 0.0, math.inf, present_pred=False, status="not_trained"),
            row("c1", "brain", "absent_out_of_region", 0.0, math.inf, present_gt=False),            # FP by vision
            row("c1", "heart", "absent_out_of_region", 1.0, 0.0, present_gt=False, present_pred=False),  # TN
            row("c1", "skull", "absent_out_of_region", 1.0, 0.0, present_gt=False, present_pred=False,
                status="not_trained")]
    summary = report.segmentation_summary(report.segmentation_rows(rows))
    assert (summary["n"], summary["missed"], summary["not_trained"]) == (3, 1, 1)
    presence = report.presence_summary(report.presence_rows(rows))
    assert (presence["n"], presence["not_trained"], presence["fp"], presence["tn"]) == (3, 1, 1, 1)
    assert presence["specificity_vision"] == pytest.approx(1 / 2)      # the trained targets only
    assert presence["specificity"] == pytest.approx(2 / 3)             # with the rule: "skull" declined unseen
    assert "| Total | 3 | 1 | 1 | 1 | 50.00 | 66.67 |" in report.presence_table(rows)
    assert report.segmentation_table(rows, None).splitlines()[-1].endswith("| 1 | 1 |")


def test_body_regions_name_vocabulary_structures_and_split_absent_targets():
    names = [s.name for s in load_vocabulary().structures]
    assert set(body_regions()) <= set(names)
    inside, outside = absent_targets(["liver", "vertebra t12"], ["liver", "gallbladder", "brain", "vertebra t12"], names)
    assert inside == ["gallbladder"]                       # annotated, absent, and the abdomen is scanned
    assert "brain" in outside and "heart" not in outside and "liver" not in outside   # T12: the thorax is scanned
    assert absent_targets(["tumor"], ["tumor", "liver"], names) == ([], [])   # scanned regions unknown: ask nothing


def test_questions_use_held_out_phrasings_and_descriptions(shared_ct, tmp_path):
    case = read_data_list(write_json(tmp_path / "list.json", [dicom_case(shared_ct)])).cases[0]
    present = ["liver", "spleen", "stomach", "aorta", "vertebra t12"]
    questions = build_questions(case, present)
    assert questions == build_questions(case, present), "the same case gets the same questions"
    by_kind = {kind: [q for q in questions if q.kind == kind] for kind in KINDS}
    assert [q.targets for q in by_kind["explicit"]] == [(name,) for name in present]
    templates = [t.split("{")[0] for t in HELD_OUT_EXPLICIT_QUESTIONS]
    assert all(any(q.text.startswith(t) for t in templates) for q in by_kind["explicit"] + by_kind["multi"])
    vocabulary = load_vocabulary()
    for question in by_kind["implicit"]:
        structure = vocabulary.get(question.targets[0])
        assert any(d.rstrip(".") in question.text for d in structure.held_out_descriptions)
        assert not any(d.rstrip(".") in question.text for d in structure.descriptions), "a training description"
    assert [len(q.targets) for q in by_kind["multi"]] == [2, 3]
    for question in by_kind["multi"]:
        assert [s.name for s in vocabulary.find_in_text(question.text)] == list(question.targets)
    assert "gallbladder" in {q.targets[0] for q in by_kind["absent_in_region"]}
    assert "brain" in {q.targets[0] for q in by_kind["absent_out_of_region"]}
    limited = build_questions(case, present, kinds=("explicit", "multi"), max_per_kind=1)
    assert [q.kind for q in limited] == ["explicit", "multi"]
    # Restricted to what a model knows: only those are asked about, but any structure outside the scan still is.
    known = build_questions(case, present, targets=("liver", "aorta", "gallbladder"))
    asked = {q.targets[0] for q in known if q.kind in ("explicit", "implicit", "absent_in_region")}
    assert asked == {"liver", "aorta", "gallbladder"}
    assert "brain" in {q.targets[0] for q in known if q.kind == "absent_out_of_region"}


# ---- data lists, splits, bad input -----------------------------------------------------------------------------

def write_json(path, content):
    path.write_text(json.dumps(content))
    return path


def dicom_case(shared_ct, **extra):
    return {"id": "ts_dicom_series", "image": str(shared_ct / TS / "example_ct_dicom"),
            "label": str(shared_ct / TS / "example_seg_dicom.nii.gz"), "classes": str(shared_ct / CLASSES), **extra}


def test_split_files_give_training_the_train_part_and_refuse_a_case_in_both(shared_ct, tmp_path):
    split = write_json(tmp_path / "split.json", {"train": [{"id": "ts_abdomen_3mm"}, "ts_aorta_cta"],
                                                 "test": ["ts_dicom_series"]})
    spec = SourceSpec.from_dict({"name": "shared", "layout": "manifest", "path": str(shared_ct / "manifest.json"),
                                 "split_file": str(split), "split": "train"}, tmp_path)
    assert [e.case_id for e in list_cases(spec)] == ["ts_abdomen_3mm", "ts_aorta_cta"]
    write_json(split, {"train": ["ts_abdomen_3mm", "ts_dicom_series"], "test": ["ts_dicom_series"]})
    with pytest.raises(InvalidInputError, match="'ts_dicom_series' is in both the 'train' and the 'test' part"):
        list_cases(spec)
    # A split naming cases the source does not have (ids written for another conversion) is refused.
    write_json(split, {"train": ["ts_abdomen_3mm", "img0001"], "test": ["ts_dicom_series"]})
    with pytest.raises(InvalidInputError, match=r"1 of the 2 'train' cases .* are not in .*'img0001'"):
        list_cases(spec)
    # M3D-Seg's own per-dataset json, read by the npy layouts.
    code = tmp_path / "0000"
    code.mkdir()
    entry = {"image": "/data/M3D_Seg/0000/case_1/image.npy", "label": "/data/M3D_Seg/0000/case_1/masks/mask_1.npy"}
    write_json(code / "0000.json", {"train": [entry], "test": [entry]})
    with pytest.raises(InvalidInputError, match="'case_1' is in both"):
        list_cases(SourceSpec(name="m3d", layout="m3d_npy", path=code))
    # The evaluation reads the test part of such a split, with paths relative to the list's folder.
    lists = tmp_path / "lists"
    lists.mkdir()
    ts = os.path.relpath(shared_ct / TS, lists)
    content = {"classes": f"{ts}/totalsegmentator_total_v2_classes.json",
               "train": [{"id": "ts_abdomen_3mm", "image": f"{ts}/example_ct.nii.gz",
                          "label": f"{ts}/example_seg_fast_force_split.nii.gz"}],
               "test": [{"image": f"{ts}/example_ct_dicom", "label": f"{ts}/example_seg_dicom.nii.gz"}]}
    listed = read_data_list(write_json(lists / "split.json", content))
    assert [c.case_id for c in listed.cases] == ["example_ct_dicom"] and listed.split == "test"
    assert listed.cases[0].classes[5] == "liver" and listed.cases[0].image == shared_ct.resolve() / TS / "example_ct_dicom"


def run_cli(*args):
    return r1seg(["evaluate", *map(str, args)])


def test_bad_input_gets_a_clear_message_and_no_report(shared_ct, tmp_path, capsys):
    out = tmp_path / "report"
    bad_lists = {
        "does not exist": [dicom_case(shared_ct, image=str(tmp_path / "missing.nii.gz"))],
        "does not overlap the image's in space": [
            {"id": "lung", "image": str(shared_ct / "pyradiomics_lung/lung1_image.nrrd"),
             "label": str(shared_ct / "pyradiomics_lung/lung2_label.nrrd"), "classes": {"1": "lung tumor"}}],
        "'flux capacitor' is not in the vocabulary": [dicom_case(shared_ct, classes={"5": "flux capacitor"})],
        "is in both the 'train' and the 'test' part": {"train": [dicom_case(shared_ct)], "test": [dicom_case(shared_ct)]},
    }
    for message, content in bad_lists.items():
        code = run_cli("--data", write_json(tmp_path / "list.json", content), "--out", out, "--device", "cpu")
        assert code == 2, message
        assert message in capsys.readouterr().err
        assert not out.exists(), f"{message}: nothing may be written"


# ---- end to end -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return small_model().save_pretrained(tmp_path_factory.mktemp("model") / "small")


@pytest.fixture(scope="module")
def two_cases(shared_ct, tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    masks = folder / "heart_masks"      # a TotalSegmentator-style folder; heart.nii.gz lies on a larger grid
    masks.mkdir()
    for name in ("heart.nii.gz", "pulmonary_artery.nii.gz"):
        (masks / name).symlink_to(shared_ct / "totalseg_pulmonary_report" / name)
    heart = {"id": "ts_heart_cta", "dataset": "pulmonary", "image": str(shared_ct / "totalseg_pulmonary_report/ct_cropped.nii.gz"),
             "label": "heart_masks", "questions": [{"question": "Outline the heart and the pulmonary artery.",
                                                    "targets": ["heart", "pulmonary artery"]}]}
    return write_json(folder / "two_cases.json", {"dataset": "totalseg", "cases": [dicom_case(shared_ct), heart]})


FAST = ("--device", "cpu", "--overlap", "0", "--max-questions-per-kind", "1")


def truth_on_image_grid(case, target):
    """The ground truth computed here, apart from the package: SimpleITK resampling by physical position."""
    image_path, label_path = case["image"], case["label"]
    if image_path.endswith("example_ct_dicom"):
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(image_path))
        image = reader.Execute()
        names = json.loads(open(case["classes"]).read())
        value = next(int(v) for v, n in names.items() if load_vocabulary().lookup(n).name == target)
        label = sitk.ReadImage(label_path)
    else:
        image = sitk.ReadImage(image_path)
        label = sitk.ReadImage(str(case["folder"] / label_path / f"{target.replace(' ', '_')}.nii.gz"))
        value = 1
    resampled = sitk.Resample(label, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(resampled) == value


def test_evaluate_end_to_end_resumes_and_writes_every_artefact(model_dir, two_cases, tmp_path):
    out = tmp_path / "report"
    kinds = "explicit,absent_in_region,absent_out_of_region,custom"     # implicit and multi: see the questions test
    common = ("--model", model_dir, "--data", two_cases, "--out", out, "--save-masks", "--kinds", kinds, *FAST)
    assert run_cli(*common, "--max-cases", "1") == 0            # stops after one case, as a killed run would
    assert not (out / "report.md").exists() and not (out / "cases.csv").exists()
    rows_file = out / "rows" / "shard-0-of-1.jsonl"
    first_line = rows_file.read_text()
    with open(rows_file, "a") as stream:
        stream.write('{"id": "ts_heart_cta", "rows": [')         # a line cut short by the kill
    assert run_cli(*common) == 0
    lines = rows_file.read_text().splitlines()
    assert len(lines) == 2 and lines[0] == first_line.strip(), "the scored case is kept, not scored again"
    assert [json.loads(line)["id"] for line in lines] == ["ts_dicom_series", "ts_heart_cta"]

    rows = report.read_rows(out / "cases.csv")
    assert {"id", "dataset", "target", "kind", "question", "answer", "dice", "precision", "sensitivity", "iou",
            "hd95_mm", "present_gt", "present_pred", "seconds"} <= set(rows[0])
    assert {r["kind"] for r in rows} == {"explicit", "absent_in_region", "absent_out_of_region", "custom"}
    assert all(r["seconds"] > 0 and r["peak_memory_mb"] > 0 for r in rows)
    assert {r["target"] for r in rows if r["kind"] == "custom"} == {"heart", "pulmonary artery"}
    cases = {c["id"]: {**c, "folder": two_cases.parent} for c in json.loads(two_cases.read_text())["cases"]}
    for r in rows:
        mask_path = out / r["mask"]
        assert mask_path.name == f"{r['id']}__{r['target'].replace(' ', '_')}__{r['tag']}.nii.gz"
        prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(mask_path))) > 0
        truth = truth_on_image_grid(cases[r["id"]], r["target"]) if r["present_gt"] else np.zeros_like(prediction)
        assert truth.shape == prediction.shape
        both = 2 * np.count_nonzero(prediction & truth)
        total = np.count_nonzero(prediction) + np.count_nonzero(truth)
        assert r["dice"] == pytest.approx(both / total if total else 1.0, abs=1e-3), (r["id"], r["target"])
        assert r["present_gt"] == bool(truth.any()) and r["present_pred"] == bool(prediction.any())

    text = (out / "report.md").read_text()
    config_hash = hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()
    data_hash = hashlib.sha256(two_cases.read_bytes()).hexdigest()
    for expected in (str(model_dir), config_hash, data_hash, f"torch {torch.__version__}", "Table 3",
                     "SPE with the not-trained rule (%)", "## Left out"):
        assert expected in text
    for png in ("dice_by_dataset.png", "dice_by_target.png"):
        assert matplotlib.image.imread(out / png).ndim == 3

    # An explicit merge gives the same tables; another run's settings cannot join this folder.
    before = (out / "cases.csv").read_text()
    assert run_cli("--merge", out) == 0 and (out / "cases.csv").read_text() == before
    assert run_cli(*common, "--loops", "0") == 2


def test_a_partial_classes_map_scores_only_the_named_structures_and_says_what_it_left_out(
        model_dir, shared_ct, tmp_path):
    # As README's example: the map names two of the label's values.
    partial = write_json(tmp_path / "partial.json", [dicom_case(shared_ct, classes={"5": "liver", "1": "spleen"})])
    out = tmp_path / "report"
    assert run_cli("--model", model_dir, "--data", partial, "--out", out, "--kinds",
                   "explicit,absent_in_region,absent_out_of_region", *FAST) == 0
    rows = report.read_rows(out / "cases.csv")
    assert {r["target"] for r in rows} <= {"liver", "spleen"} and {r["kind"] for r in rows} == {"explicit"}
    assert all(r["status"] in ("present", "absent", "not_trained", "not_named") for r in rows)
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_ct / TS / "example_seg_dicom.nii.gz")))
    values, counts = np.unique(label, return_counts=True)
    unnamed = {int(v): int(n) for v, n in zip(values, counts) if v not in (0, 1, 5)}
    left_out = json.loads((out / "rows" / "shard-0-of-1.jsonl").read_text())["left_out"]
    assert left_out["unnamed_label_values"] == {str(v): n for v, n in unnamed.items()}
    assert left_out["skipped_kinds"] == ["absent_out_of_region"]
    text = (out / "report.md").read_text().split("## Left out")[1].split("##")[0]
    first = min(unnamed)
    assert f"{first} ({unnamed[first]} voxels)" in text and "no absent_out_of_region questions" in text


def test_shards_fill_one_folder_and_the_last_one_merges(model_dir, two_cases, tmp_path, capsys):
    out = tmp_path / "sharded"
    # Only the heart case has a custom question: one question per run keeps this fast; the DICOM case has none.
    common = ("--model", model_dir, "--data", two_cases, "--out", out, "--kinds", "custom", *FAST)
    assert run_cli(*common, "--shard", "1/2") == 0
    assert not (out / "report.md").exists()
    assert run_cli("--merge", out) == 2 and "1 of 2 cases are not scored yet" in capsys.readouterr().err
    assert run_cli(*common, "--shard", "0/2") == 0
    assert (out / "report.md").is_file()
    ids = [json.loads(line)["id"] for path in sorted((out / "rows").glob("*.jsonl")) for line in path.read_text().splitlines()]
    assert sorted(ids) == ["ts_dicom_series", "ts_heart_cta"]

    # The same cases without the sliding window, then both side by side.
    without = tmp_path / "no_window"
    assert run_cli("--model", model_dir, "--data", two_cases, "--out", without, "--kinds", "custom", *FAST,
                   "--no-sliding-window") == 0
    compared = tmp_path / "compared"
    assert run_cli("--compare", out, without, "--out", compared) == 0
    text = (compared / "compare.md").read_text()
    assert "sharded" in text and "no_window" in text and "sliding_window" in text
    for png in ("dice_by_dataset.png", "dice_by_target.png", "sliding_window_violins.png"):
        assert matplotlib.image.imread(compared / png).shape[-1] in (3, 4)


def test_violin_plot_of_synthetic_rows_is_a_valid_png(tmp_path):
    rng = np.random.default_rng(0)
    with_window = [row(f"c{i}", t, "explicit", float(rng.uniform(0.5, 1)), 3.0) for i in range(6) for t in ("liver", "stomach")]
    without = [row(f"c{i}", t, "explicit", float(rng.uniform(0, 0.6)), 9.0) for i in range(6) for t in ("liver", "stomach")]
    path = sliding_window_violins(tmp_path / "violins.png", with_window, without)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(path).shape[0] > 100
