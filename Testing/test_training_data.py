"""Training data: every reader layout, preparation into model space, bad data messages, crops, questions, samples.

Fixtures are built in tmp_path from the real CTs in ../shared/data/ct.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from r1seg_core.preprocess import PreprocessConfig
from r1seg_core.prompting import SEG_TOKEN
from training.data.augment import augment, is_sided
from training.data.cases import SourceSpec
from training.data.crops import sample_crop
from training.data.prepare import prepare_source
from training.data.prepared import open_source
from training.data.questions import existence_qa, segmentation_qa
from training.data.samples import SampleKey, StageSamples
from training.recipe import AugmentSettings, CropSettings, QuestionSettings, load_recipe

REPO = Path(__file__).resolve().parents[1]
PREPROCESS = PreprocessConfig()
TOTALSEG_LIVER, TOTALSEG_SPLEEN, TOTALSEG_PANCREAS = 5, 1, 7


def prepare(tmp_path: Path, **source) -> dict:
    spec = SourceSpec.from_dict({"name": "src", **source}, tmp_path)
    return prepare_source(spec, PREPROCESS, tmp_path / "data")


def case_meta(tmp_path: Path, case_id: str) -> dict:
    return json.loads((tmp_path / "data" / "src" / case_id / "case.json").read_text())


def write_like(reference: Path, array: np.ndarray, path: Path, origin_shift=(0.0, 0.0, 0.0)) -> Path:
    """`array` (z, y, x) written with the geometry of `reference` (optionally moved), like a label file."""
    ref = sitk.ReadImage(str(reference))
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(ref.GetSpacing())
    image.SetDirection(ref.GetDirection())
    image.SetOrigin(tuple(o + s for o, s in zip(ref.GetOrigin(), origin_shift)))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture(scope="module")
def heart_case(shared_ct) -> dict:
    folder = shared_ct / "totalseg_pulmonary_report"
    return {"ct": folder / "ct_cropped.nii.gz", "artery": folder / "pulmonary_artery.nii.gz", "heart": folder / "heart.nii.gz"}


@pytest.fixture(scope="module")
def abdomen(shared_ct) -> tuple[np.ndarray, np.ndarray]:
    """A (32, 96, 96) block of the 3 mm abdomen and its TotalSegmentator labels, for the npy layouts."""
    folder = shared_ct / "totalseg_example"
    block = (slice(76, 108), slice(0, 96), slice(10, 106))
    return read(folder / "example_ct.nii.gz")[block].astype(np.float32), read(folder / "example_seg_fast_force_split.nii.gz")[block]


# ---- readers ------------------------------------------------------------------------------------------------


def test_msd_layout(tmp_path, heart_case):
    root = tmp_path / "Task01"
    shutil.copy(heart_case["ct"], (root / "imagesTr").mkdir(parents=True) or root / "imagesTr" / "heart_001.nii.gz")
    write_like(heart_case["ct"], read(heart_case["artery"]).astype(np.uint8), root / "labelsTr" / "heart_001.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "pulmonary artery", "2": "heart"},
        "training": [{"image": "./imagesTr/heart_001.nii.gz", "label": "./labelsTr/heart_001.nii.gz"}]}))
    index = prepare(tmp_path, layout="msd", path=str(root))
    assert index["cases"] == ["heart_001"] and not index["problems"]
    meta = case_meta(tmp_path, "heart_001")
    assert [s["name"] for s in meta["structures"]] == ["pulmonary artery"]
    assert meta["absent"] == ["heart"]            # annotated by the dataset, no voxel in this case
    assert meta["spacing_zyx"] == [2.0, 1.0, 1.0]
    image = np.load(tmp_path / "data" / "src" / "heart_001" / "image.npy")
    assert image.dtype == np.float16 and tuple(meta["shape_zyx"]) == image.shape and 0 <= image.min() <= image.max() <= 1


def test_nnunet_v2_layout(tmp_path, shared_ct):
    folder = shared_ct / "totalseg_aorta_report"
    root = tmp_path / "Dataset001_Aorta"
    (root / "imagesTr").mkdir(parents=True)
    shutil.copy(folder / "ct_cropped.nii.gz", root / "imagesTr" / "aorta_001_0000.nii.gz")
    write_like(folder / "ct_cropped.nii.gz", read(folder / "aorta.nii.gz").astype(np.uint8), root / "labelsTr" / "aorta_001.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "aorta": 1}, "channel_names": {"0": "CT"},
                                                   "file_ending": ".nii.gz"}))
    index = prepare(tmp_path, layout="msd", path=str(root))
    assert index["cases"] == ["aorta_001"]
    assert [s["name"] for s in case_meta(tmp_path, "aorta_001")["structures"]] == ["aorta"]


def test_mask_folder_layout(tmp_path, shared_ct):
    folder = shared_ct / "totalseg_aorta_report"
    case = tmp_path / "masks" / "s0001"
    (case / "segmentations").mkdir(parents=True)
    shutil.copy(folder / "ct_cropped.nii.gz", case / "ct.nii.gz")
    for name in ("aorta", "vertebrae_T12"):
        shutil.copy(folder / f"{name}.nii.gz", case / "segmentations" / f"{name}.nii.gz")
    index = prepare(tmp_path, layout="mask_folders", path=str(tmp_path / "masks"))
    assert index["cases"] == ["s0001"]
    assert sorted(s["name"] for s in case_meta(tmp_path, "s0001")["structures"]) == ["aorta", "vertebra t12"]


def test_manifest_layout_matches_a_label_on_another_grid_by_position(tmp_path, shared_ct):
    # heart.nii.gz lies on the uncropped 233x167x191 grid; resampled by position it is 668.8 mL inside the crop.
    index = prepare(tmp_path, layout="manifest", path=str(shared_ct / "manifest.json"), cases=["ts_heart_cta"])
    assert index["cases"] == ["ts_heart_cta"] and not index["problems"]
    heart = next(s for s in case_meta(tmp_path, "ts_heart_cta")["structures"] if s["name"] == "heart")
    assert heart["voxels"] * 2.0 / 1000 == pytest.approx(668.8, rel=0.02)


def test_a_label_grid_flipped_in_y_is_matched_by_position(tmp_path, shared_ct):
    # The DICOM series is LPS; its TotalSegmentator labels are stored flipped in y. Matched by position, the
    # structures sit on their tissue: liver 93 HU and aorta 151 HU (contrast), as the data README measured.
    index = prepare(tmp_path, layout="manifest", path=str(shared_ct / "manifest.json"), cases=["ts_dicom_series"])
    assert index["cases"] == ["ts_dicom_series"]
    folder = tmp_path / "data" / "src" / "ts_dicom_series"
    image, layers = np.load(folder / "image.npy").astype(np.float32), np.load(folder / "labels.npy")
    index_of = {s["name"]: s["index"] for s in case_meta(tmp_path, "ts_dicom_series")["structures"]}
    window = PREPROCESS.hu_max - PREPROCESS.hu_min
    for name, hounsfield in (("liver", 93), ("aorta", 151)):
        inside = image[(layers == index_of[name]).any(0)] * window + PREPROCESS.hu_min
        assert np.median(inside) == pytest.approx(hounsfield, abs=10), name


def write_m3d(root: Path, abdomen) -> None:
    image, labels = abdomen
    case = root / "0003" / "case_01"
    (case / "masks").mkdir(parents=True)
    np.save(case / "image.npy", ((image - image.min()) / (image.max() - image.min()))[None])
    np.save(case / "masks" / "mask_0.npy", (labels == TOTALSEG_LIVER)[None])
    np.save(case / "masks" / "mask_1.npy", np.zeros((1, 1, 1, 1)))          # M3D's "kidney absent" placeholder
    np.save(case / "masks" / "mask_2.npy", (labels == TOTALSEG_SPLEEN)[None])
    # The json holds the producer's absolute paths; the reader re-roots them at the source folder.
    old = "/old/machine/M3D_Seg_npy/0003/case_01"
    entries = [{"image": f"{old}/image.npy", "label": f"{old}/masks/mask_{i}.npy"} for i in range(3)]
    (root / "0003" / "0003.json").write_text(json.dumps({"train": entries, "test": []}))


def test_m3d_npy_layout(tmp_path, abdomen):
    write_m3d(tmp_path / "M3D_Seg_npy", abdomen)
    index = prepare(tmp_path, layout="m3d_npy", path=str(tmp_path / "M3D_Seg_npy" / "0003"))
    assert index["cases"] == ["case_01"], index["problems"]
    meta = case_meta(tmp_path, "case_01")
    assert sorted(s["name"] for s in meta["structures"]) == ["liver", "spleen"]
    assert meta["absent"] == ["kidney"]
    assert meta["spacing_zyx"] is None and meta["intensity"] == "unit"    # used on its own grid, as stored
    assert meta["shape_zyx"] == [32, 96, 96]


def test_segvol_npy_layout(tmp_path, abdomen):
    image, labels = abdomen
    case = tmp_path / "segvol" / "0003" / "case_01"
    case.mkdir(parents=True)
    xyz = image.transpose(2, 1, 0)                                   # SegVol stored (X, Y, Z)
    np.save(case / "image.npy", ((xyz - xyz.mean()) / xyz.std())[None])
    channels = [labels == TOTALSEG_LIVER, np.zeros_like(labels, bool), labels == TOTALSEG_SPLEEN, labels == TOTALSEG_PANCREAS]
    rows = [np.flatnonzero(c.transpose(2, 1, 0)) for c in channels]
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    shape = f"({len(channels)}, {', '.join(map(str, xyz.shape))})"
    # scipy.sparse.save_npz's CSR format, written without scipy.
    np.savez(case / f"mask_{shape}.npz", data=np.ones(indptr[-1], np.int32), indices=np.concatenate(rows).astype(np.int32),
             indptr=indptr.astype(np.int32), format=np.array(b"csr"), shape=np.array([len(channels), xyz.size]))
    entries = [{"image": str(case / "image.npy"), "label": str(case / f"mask_{shape}.npz")}]
    (tmp_path / "segvol" / "0003" / "0003.json").write_text(json.dumps({"labels": {}, "train": entries}))
    index = prepare(tmp_path, layout="segvol_npy", path=str(tmp_path / "segvol" / "0003"))
    assert index["cases"] == ["case_01"], index["problems"]
    meta = case_meta(tmp_path, "case_01")
    voxels = {s["name"]: s["voxels"] for s in meta["structures"]}
    assert voxels == {"liver": int(channels[0].sum()), "spleen": int(channels[2].sum()), "pancreas": int(channels[3].sum())}
    assert meta["absent"] == ["kidney"] and meta["shape_zyx"] == [32, 96, 96]
    layers = np.load(tmp_path / "data" / "src" / "case_01" / "labels.npy")
    liver = next(s["index"] for s in meta["structures"] if s["name"] == "liver")
    assert np.array_equal((layers == liver).any(0), channels[0])     # back in (z, y, x), voxel for voxel


# ---- bad data: one message per case, naming it ----------------------------------------------------------------


def msd_case(root: Path, case_id: str, image: Path, label: np.ndarray, names: dict, origin_shift=(0.0, 0.0, 0.0)):
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    shutil.copy(image, root / "imagesTr" / f"{case_id}.nii.gz")
    write_like(image, label, root / "labelsTr" / f"{case_id}.nii.gz", origin_shift)
    listing = json.loads((root / "dataset.json").read_text())["training"] if (root / "dataset.json").is_file() else []
    listing.append({"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"labels": names, "training": listing}))


def test_bad_cases_are_skipped_with_a_message_naming_them(tmp_path, heart_case):
    root = tmp_path / "bad"
    artery = read(heart_case["artery"]).astype(np.uint8)
    names = {"0": "background", "1": "pulmonary artery"}
    msd_case(root, "good", heart_case["ct"], artery, names)
    msd_case(root, "corrupt", heart_case["ct"], artery, names)
    data = (root / "imagesTr" / "corrupt.nii.gz").read_bytes()
    (root / "imagesTr" / "corrupt.nii.gz").write_bytes(data[: len(data) // 3])
    msd_case(root, "elsewhere", heart_case["ct"], artery, names, origin_shift=(400.0, 0.0, 0.0))
    unnamed = artery.copy()
    unnamed[artery > 0] = 3
    msd_case(root, "unnamed", heart_case["ct"], unnamed, names)
    msd_case(root, "empty", heart_case["ct"], np.zeros_like(artery), names)
    index = prepare(tmp_path, layout="msd", path=str(root))
    assert index["cases"] == ["good"]
    problems = {p.split(":")[0]: p for p in index["problems"]}
    assert set(problems) == {"case src/corrupt", "case src/elsewhere", "case src/unnamed", "case src/empty"}
    assert "corrupt.nii.gz" in problems["case src/corrupt"] and "cannot read" in problems["case src/corrupt"]
    assert "another grid" in problems["case src/elsewhere"] and "outside the CT" in problems["case src/elsewhere"]
    assert "label value 3" in problems["case src/unnamed"] and "has no name" in problems["case src/unnamed"]
    assert "every mask is empty" in problems["case src/empty"]


def test_a_label_missing_from_the_vocabulary_is_refused_or_skipped_as_configured(tmp_path, heart_case):
    root = tmp_path / "unknown"
    artery = read(heart_case["artery"]).astype(np.uint8)
    labels = artery.copy()
    labels[:2] = 2 * (artery[:2] == 0)                       # a second label the vocabulary does not know
    msd_case(root, "case_7", heart_case["ct"], labels, {"0": "background", "1": "pulmonary artery", "2": "flux capacitor"})
    refused = prepare(tmp_path, layout="msd", path=str(root))
    assert refused["cases"] == [] and "case src/case_7" in refused["problems"][0]
    assert "'flux capacitor'" in refused["problems"][0] and "not in the vocabulary" in refused["problems"][0]
    skipped = prepare(tmp_path, layout="msd", path=str(root), unknown_labels="skip")
    assert skipped["cases"] == ["case_7"] and any("flux capacitor" in n and "case src/case_7" in n for n in skipped["notes"])


def test_an_empty_mask_among_others_is_reported_and_marks_its_structure_absent(tmp_path, shared_ct):
    folder = shared_ct / "totalseg_aorta_report"
    case = tmp_path / "masks" / "s0002"
    (case / "segmentations").mkdir(parents=True)
    shutil.copy(folder / "ct_cropped.nii.gz", case / "ct.nii.gz")
    shutil.copy(folder / "aorta.nii.gz", case / "segmentations" / "aorta.nii.gz")
    write_like(folder / "ct_cropped.nii.gz", np.zeros(read(folder / "aorta.nii.gz").shape, np.uint8),
               case / "segmentations" / "spleen.nii.gz")
    index = prepare(tmp_path, layout="mask_folders", path=str(tmp_path / "masks"))
    assert index["cases"] == ["s0002"]
    assert any("case src/s0002" in n and "spleen.nii.gz is empty" in n for n in index["notes"])
    assert case_meta(tmp_path, "s0002")["absent"] == ["spleen"]


# ---- crops, questions, augmentation, samples ------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared_heart(tmp_path_factory, shared_ct):
    folder = tmp_path_factory.mktemp("prepared")
    prepare(folder, layout="manifest", path=str(shared_ct / "manifest.json"), cases=["ts_heart_cta"])
    return open_source(folder / "data", "src")


def test_crops_split_structures_into_present_and_absent(prepared_heart):
    case = prepared_heart.cases[0]
    window = (32, 64, 64)
    for seed in range(8):
        crop = sample_crop(case, window, CropSettings(foreground_ratio=1.0), np.random.default_rng(seed))
        assert crop.image.shape == window and crop.layers.shape[1:] == window
        assert not set(crop.present) & set(crop.absent)
        for name in crop.present:
            assert crop.mask(name).sum() >= 1
        for name in crop.absent:
            assert crop.mask(name).sum() == 0


def test_crop_targets_restrict_positives_but_keep_every_negative(prepared_heart):
    case = prepared_heart.cases[0]          # heart and pulmonary artery
    settings = CropSettings(foreground_ratio=1.0, targets=["heart"])
    for seed in range(6):
        crop = sample_crop(case, (32, 64, 64), settings, np.random.default_rng(seed))
        assert set(crop.present) <= {"heart"}
        # Centred on the heart, whatever else is in view.
        assert crop.mask("heart").sum() > 0
        if crop.mask("pulmonary artery").sum() == 0:
            assert "pulmonary artery" in crop.absent


def test_whole_volume_crops_resize_the_case_as_the_global_step_does(prepared_heart):
    import torch

    case = prepared_heart.cases[0]
    window = (16, 48, 48)
    crop = sample_crop(case, window, CropSettings(whole_volume_ratio=1.0), np.random.default_rng(0))
    # Independent reference: torch's own trilinear resize (corners not aligned), as the predictor's global step.
    expected = torch.nn.functional.interpolate(torch.from_numpy(np.asarray(case.image(), np.float32))[None, None],
                                               size=window, mode="trilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(crop.image, expected, atol=1e-5)
    heart_fraction = (np.asarray(case.labels()) == case.structures[0].index).any(0).mean()
    assert crop.mask(case.structures[0].name).mean() == pytest.approx(heart_fraction, rel=0.15)
    assert set(crop.present) == {s.name for s in case.structures}


def test_questions_use_the_answers_the_predictor_scores():
    rng = __import__("random").Random(0)
    settings = QuestionSettings(implicit_ratio=0.5, multi_target_ratio=0.5, max_targets=3)
    for _ in range(50):
        qa = segmentation_qa(rng, True, ["liver", "spleen", "left kidney"], ["heart"], settings)
        assert qa.answer.count(SEG_TOKEN) == len(qa.targets) >= 1
        assert qa.answer.startswith("The ") and all(f"the {t} is [seg]" in qa.answer.lower() for t in qa.targets)
        negative = segmentation_qa(rng, False, ["liver"], ["heart", "aorta"], settings)
        assert SEG_TOKEN not in negative.answer and negative.targets == [] and negative.answer.startswith("Sorry, there is no")
        existence = existence_qa(rng, bool(rng.random() < 0.5), ["liver"], ["heart"], settings)
        assert SEG_TOKEN not in existence.answer and existence.targets == []


def test_rotations_are_skipped_for_left_and_right_targets():
    assert is_sided("left kidney") and is_sided("right middle lobe") and not is_sided("liver")
    mask = np.zeros((1, 8, 16, 16), np.uint8)
    mask[0, 2:6, 3:5, 10:14] = 1                              # off-centre: any quarter turn moves it
    image = np.random.default_rng(0).random((8, 16, 16)).astype(np.float32)
    always = AugmentSettings(rotate90_prob=1.0, flip_z_prob=0.0)
    for seed in range(10):
        _, sided = augment(image, mask, ["left kidney"], always, seed)
        assert np.array_equal(sided, mask)
    turned = [not np.array_equal(augment(image, mask, ["liver"], always, seed)[1], mask) for seed in range(10)]
    assert any(turned)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_samples_are_reproducible_and_ranks_share_the_positive_negative_plan(prepared_heart, stage):
    recipe = load_recipe(REPO / "training" / "recipes" / "tiny")
    config = recipe.stages[stage]
    config.sources = {"src": 1.0}
    samples = StageSamples(config, [prepared_heart], (32, 64, 64))
    key = SampleKey(step=3, micro=0, rank=1, slot=1)
    first, again = samples[key], samples[key]
    assert all(np.array_equal(first[k], again[k]) if hasattr(first[k], "shape") else first[k] == again[k] for k in first)
    for step in range(20):
        keys = [SampleKey(step, 0, rank, 0) for rank in (0, 1, 2)]
        assert len({samples.is_positive(k) for k in keys}) == 1
    if stage >= 3:
        item = samples[key]
        assert item["answer"].count(SEG_TOKEN) == len(item["masks"]) and all(m.sum() > 0 for m in item["masks"])


def test_recipes_load_and_refuse_unknown_settings(tmp_path, monkeypatch):
    # The paper recipes name their models and data through these; an unset one is an error (test_training_cluster).
    monkeypatch.setenv("R1SEG_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("R1SEG_DATA", str(tmp_path / "data"))
    for name in ("tiny", "paper-phi3", "paper-llama3", "default-smollm2"):
        recipe = load_recipe(REPO / "training" / "recipes" / name)
        assert recipe.sam_config().language_model is None and recipe.sam_config().text_encoder is not None
        assert recipe.model_config().encoder == recipe.sam_config().encoder
    broken = tmp_path / "broken"
    shutil.copytree(REPO / "training" / "recipes" / "tiny", broken)
    (broken / "stage2.yaml").write_text((broken / "stage2.yaml").read_text() + "learning_rat: 1.0\n")
    with pytest.raises(Exception, match=r"stage2.yaml.*learning_rat"):
        load_recipe(broken)
