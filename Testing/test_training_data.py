"""Training data: every reader layout, preparation into model space, bad data messages, crops, questions, samples.

Fixtures are built in tmp_path from the real CTs in ../shared/data/ct.
"""
from __future__ import annotations

import json
import locale
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


def test_slurm_logs_go_to_a_folder_that_exists_before_the_job_starts():
    # SLURM opens --output before the script runs, so a folder the script creates (or a git-ignored one) is too late:
    # the log must be in the submit directory (the repository root) or in a folder a fresh clone holds.
    import re
    import subprocess

    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout: cannot tell which folders a fresh clone holds")
    clone_folders = {str(parent) for line in tracked.stdout.splitlines() for parent in Path(line).parents}
    scripts = sorted((REPO / "training" / "slurm").glob("*.sbatch"))
    assert scripts
    for script in scripts:
        outputs = re.findall(r"^#SBATCH\s+(?:--output=|-o\s*)(\S+)", script.read_text(), re.MULTILINE)
        assert outputs, f"{script.name} sets no --output"
        for output in outputs:
            folder = str(Path(output).parent)
            assert folder == "." or folder in clone_folders, f"{script.name}: --output={output} is in {folder}/"


M3D_SEG_CODES = [f"{index:04d}" for index in range(25)]     # model_anchors.md §4.1


def test_paper_recipes_train_on_the_train_part_of_m3d_seg_split_files(tmp_path, monkeypatch):
    from training.data.cases import list_cases

    data = tmp_path / "data"
    monkeypatch.setenv("R1SEG_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("R1SEG_DATA", str(data))
    for name in ("paper-phi3", "paper-llama3", "original-phi3"):
        sources = load_recipe(REPO / "training" / "recipes" / name).sources
        assert sorted(s.vocabulary_dataset for s in sources) == M3D_SEG_CODES, name
        for spec in sources:
            # M3D-Seg ships <code>/<code>.json (train and test lists) with every dataset; the test part is for evaluation.
            assert spec.split_file == str(data / spec.path.name / f"{spec.path.name}.json"), (name, spec.name)
            assert spec.split == "train", (name, spec.name)
    # The recipe's TotalSegmentator source on a converted folder holding M3D-Seg's json as SegVol wrote it (each entry
    # names the case by its folder on the producer's machine): only the train cases are read.
    spec = next(s for s in sources if s.name == "0011")
    for case in ("s0001", "s0002", "s0003"):
        (data / "0011" / case / "segmentations").mkdir(parents=True)
    (data / "0011" / "0011.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "spleen"},
        "train": [{"image": f"/m3d/0011/{c}/image.npy", "label": f"/m3d/0011/{c}/mask_(104, 9).npz"}
                  for c in ("s0001", "s0003")],
        "test": [{"image": "/m3d/0011/s0002/image.npy", "label": "/m3d/0011/s0002/mask_(104, 9).npz"}]}))
    assert [entry.case_id for entry in list_cases(spec)] == ["s0001", "s0003"]


# ---- trainable sets, epoch counting, the paper and original recipes ------------------------------------------------


def test_a_recipe_names_its_trainable_groups_and_bad_names_are_refused(tmp_path):
    recipe = tmp_path / "recipe"
    shutil.copytree(REPO / "training" / "recipes" / "tiny", recipe)
    assert load_recipe(recipe).stages[2].trainable is None                    # the stage's default set
    stage2 = (recipe / "stage2.yaml").read_text()
    (recipe / "stage2.yaml").write_text(stage2 + "trainable: [projector]\n")
    assert load_recipe(recipe).stages[2].trainable == ["projector"]
    (recipe / "stage2.yaml").write_text(stage2 + "trainable: [projector, vit]\n")
    with pytest.raises(Exception, match=r"stage2.yaml.*unknown module groups \['vit'\].*can train \['image_encoder', "
                                        r"'prompt_encoder', 'mask_decoder', 'projector', 'embeddings', 'lora', "
                                        r"'segment_projector'\]"):
        load_recipe(recipe)
    (recipe / "stage2.yaml").write_text(stage2 + "samples_per_epoch: everything\n")
    with pytest.raises(Exception, match=r"stage2.yaml: samples_per_epoch must be one of \['auto', 'original'\]"):
        load_recipe(recipe)


def test_memory_estimates_count_the_recipe_trainable_set():
    import torch

    from r1seg_core.model import build_model, preset_config
    from training.memory import stage_counts

    torch.manual_seed(0)
    model = build_model(preset_config("tiny-llama"))
    projector = sum(p.numel() for p in model.projector.parameters())
    encoder = sum(p.numel() for p in model.image_encoder.parameters())
    assert stage_counts("tiny-llama", 2, ["projector"]).trained == projector
    default_4 = stage_counts("tiny-llama", 4).trained
    assert stage_counts("tiny-llama", 4, ["image_encoder", "prompt_encoder", "mask_decoder", "lora", "projector",
                                          "segment_projector", "embeddings"]).trained == default_4 + encoder


RECIPES_TABLE = "Paper and original recipes"


def _recipe_table() -> list[dict]:
    """The rows of training/README.md's table of paper-phi3 vs original-phi3 values."""
    text = (REPO / "training" / "README.md").read_text()
    section = text[text.index(f"## {RECIPES_TABLE}"):]
    rows = []
    for line in section.splitlines()[1:]:
        if line.startswith("## "):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 5:
            key, paper, original = (c.strip("`") for c in cells[:3])
            rows.append({"key": key, "paper-phi3": paper, "original-phi3": original})
    return rows


def _recipe_value(recipe, key: str):
    part, *path = key.split(".")
    node = recipe.model_config() if part == "model" else recipe.stages[int(part[len("stage"):])]
    for name in path:
        node = getattr(node, name)
    return node


def _flat(node, prefix: str) -> dict:
    import dataclasses

    if dataclasses.is_dataclass(node):
        node = {f.name: getattr(node, f.name) for f in dataclasses.fields(node)}
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}.{key}").items()}
    return {prefix: node}


def test_paper_and_original_recipes_hold_the_values_the_readme_table_gives(tmp_path, monkeypatch):
    import yaml

    monkeypatch.setenv("R1SEG_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("R1SEG_DATA", str(tmp_path / "data"))
    recipes = {name: load_recipe(REPO / "training" / "recipes" / name) for name in ("paper-phi3", "original-phi3")}
    rows = _recipe_table()
    assert len(rows) >= 10
    for row in rows:
        for name, recipe in recipes.items():
            assert _recipe_value(recipe, row["key"]) == yaml.safe_load(row[name]), (row["key"], name)
    # Every value on which the two recipes differ is a row of the table.
    differing = set()
    paper, original = recipes["paper-phi3"], recipes["original-phi3"]
    for stage in (1, 2, 3, 4):
        a, b = _flat(paper.stages[stage], f"stage{stage}"), _flat(original.stages[stage], f"stage{stage}")
        differing |= {k for k in a if a[k] != b[k]}
    a, b = _flat(paper.model_config().to_dict(), "model"), _flat(original.model_config().to_dict(), "model")
    differing |= {k for k in a if a[k] != b[k] and not k.startswith("model.card")}
    assert differing and differing <= {row["key"] for row in rows}, differing - {row["key"] for row in rows}


def _write_prepared(folder: Path, name: str, cases: dict[str, tuple[list[str], list[str]]]) -> None:
    """A prepared source whose cases hold the given (present, absent) structures."""
    from training.data.prepared import INDEX_NAME, write_case

    for case_id, (present, absent) in cases.items():
        layers = np.zeros((1, 4, 4, 4), np.uint8)
        structures = []
        for index, structure in enumerate(present, start=1):
            layers[0, index - 1] = index
            structures.append({"index": index, "name": structure, "voxels": 16})
        write_case(folder / name / case_id, np.zeros((4, 4, 4)), layers,
                   {s["index"]: np.argwhere(layers[0] == s["index"]).astype(np.int32) for s in structures},
                   {"case_id": case_id, "shape_zyx": [4, 4, 4], "structures": structures, "absent": absent})
    (folder / name / INDEX_NAME).write_text(json.dumps({"cases": sorted(cases), "preprocess": {}}))


def test_an_original_epoch_counts_absent_pairs_and_the_prompt_variants(tmp_path):
    from training.train import samples_per_epoch

    _write_prepared(tmp_path, "a", {"c1": (["liver", "spleen"], ["left kidney"]), "c2": (["liver"], ["spleen", "left kidney"])})
    _write_prepared(tmp_path, "b", {"c3": (["aorta"], [])})
    sources = [open_source(tmp_path, "a"), open_source(tmp_path, "b")]
    recipe = load_recipe(REPO / "training" / "recipes" / "tiny")
    counts = {}
    for stage in (1, 3):
        config = recipe.stages[stage]
        for count in ("auto", "original", 50):
            config.samples_per_epoch = count
            counts[stage, count] = samples_per_epoch(config, sources)
    # By hand: present pairs 2 + 1 + 1 = 4; annotated pairs (3 + 3) + 1 = 7; stages 2-4 ask by name and by description.
    assert counts == {(1, "auto"): 4, (1, "original"): 7, (1, 50): 50, (3, "auto"): 4, (3, "original"): 14, (3, 50): 50}


# ---- converting the published dataset layouts (training/data/convert.py) ------------------------------------------
# Each download is rebuilt in miniature in its published layout (as training/data/convert.py's entries cite: the
# datasets' READMEs and challenge pages), converted, and prepared by the project's reader; label values are named
# as each dataset's own documentation lists them.

CT_SHAPE, CT_SPACING = (8, 20, 24), (1.0, 1.0, 2.0)       # (z, y, x) voxels; (x, y, z) mm


def ct_and_labels(values: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """A CT in HU (air around a 40 HU body) and a label map with one 2 x 4 x 4 block per value, at 100 + value HU in
    the CT so that a label's voxels can be found in a converted CT; value k's block lies at x = 4 (k - 1) onwards
    unless it is the second of LUNA16's lungs."""
    ct = np.full(CT_SHAPE, -1000, np.int16)
    ct[1:-1, 2:-2, 1:-1] = 40
    labels = np.zeros(CT_SHAPE, np.uint8)
    for k, value in enumerate(values):
        block = (slice(3, 5), slice(8, 12), slice(1 + 5 * k, 5 + 5 * k))
        labels[block], ct[block] = value, 100 + value
    return ct, labels


def write_volume(array: np.ndarray, path: Path) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(CT_SPACING)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=path.suffix != ".mhd")
    return path


def write_dicom_slices(array: np.ndarray, folder: Path, names: list[str]) -> None:
    """One DICOM file per axial slice (slice k at z = 2 k mm), named `names[k]`."""
    folder.mkdir(parents=True, exist_ok=True)
    # ITK's GDCM writer leaves the process in the "C" locale (Python's text encoding becomes ASCII), so later tests
    # that decode UTF-8 output would fail: put the locale back.
    saved_locale = locale.setlocale(locale.LC_ALL)
    try:
        _write_dicom_slices(array, folder, names)
    finally:
        locale.setlocale(locale.LC_ALL, saved_locale)


def _write_dicom_slices(array: np.ndarray, folder: Path, names: list[str]) -> None:
    writer = sitk.ImageFileWriter()
    writer.SetImageIO("GDCMImageIO")                  # 3D-IRCADb's slice files have no extension
    writer.KeepOriginalImageUIDOn()
    for k, name in enumerate(names):
        image = sitk.GetImageFromArray(array[k:k + 1].astype(np.int16))
        image.SetSpacing(CT_SPACING)
        image.SetOrigin((0.0, 0.0, CT_SPACING[2] * k))
        for tag, value in {"0008|0060": "CT", "0020|000d": "1.2.3", "0020|000e": "1.2.3.4", "0020|0013": str(k + 1),
                           "0020|0032": f"0\\0\\{CT_SPACING[2] * k}", "0020|0037": "1\\0\\0\\0\\1\\0",
                           "0018|0050": str(CT_SPACING[2])}.items():
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / name))
        writer.Execute(image)


# Per dataset: the case ids to lay out (and those the conversion keeps), and label value -> the name the dataset's
# documentation gives it, as the vocabulary spells it.
PUBLISHED = {
    "0002": (["amos_0001", "amos_0507"], ["amos_0001"], {1: "spleen", 6: "liver"}),     # 0507: an MRI case
    "0003": (["00001", "00002"], None, {1: "liver", 4: "pancreas"}),
    "0004": (["case_00000", "case_00001"], None, {2: "kidney tumor", 3: "kidney cyst"}),
    "0005": (["001", "002"], None, {2: "kidney", 3: "renal artery"}),
    "0006": (["case_00000", "case_00001"], None, {1: "kidney", 2: "kidney tumor"}),
    "0007": (["0001", "0002"], None, {1: "spleen", 6: "liver"}),
    "0008": (["0001", "0002"], None, {1: "pancreas"}),
    "0010": (["0001", "0002"], None, {1: "liver", 13: "left kidney"}),
    "0012": (["0", "1"], None, {1: "liver", 6: "brain"}),
    "0013": (["word_0001", "word_0002"], None, {1: "liver", 2: "spleen"}),
    "0014": (["sub-verse004", "sub-verse005"], None, {20: "vertebra l1", 21: "vertebra l2"}),
    "0015": (["sub-gl003_dir-ax", "sub-verse506_dir-iso"], None, {20: "vertebra l1", 28: "vertebra t13"}),
    "0016": (["001", "002"], None, {1: "liver"}),
    "0024": (["1.3.6.1.4.1.14519.5.2.1.6279.6001.100225287222365663678666836860", "1.3.6.1.4.2"], None,
             {4: "right lung", 3: "left lung", 5: "trachea"}),      # left lung (3) at larger x: the patient's left
}


def _lay_out(pattern: str, case_id: str) -> str:
    return pattern.replace("{id}", case_id).replace("*", "part1")


def prepare_converted(tmp_path: Path, code: str, output: Path, layout: str = "msd", **source) -> tuple[dict, dict]:
    spec = SourceSpec.from_dict({"name": code, "layout": layout, "path": str(output), **source}, tmp_path)
    index = prepare_source(spec, PREPROCESS, tmp_path / "data")
    metas = {case: json.loads((tmp_path / "data" / code / case / "case.json").read_text()) for case in index["cases"]}
    return index, metas


@pytest.mark.parametrize("code", sorted(PUBLISHED))
def test_conversion_of_image_and_label_pairs(tmp_path, code):
    from training.data.convert import PAIRS, convert

    ids, kept, names = PUBLISHED[code]
    spec, root = PAIRS[code], tmp_path / "download"
    ct, labels = ct_and_labels(list(names))

    def write_ct(case_id: str) -> None:
        image = root / _lay_out(spec.image, case_id)
        if code == "0008":
            write_dicom_slices(ct, image, [f"1-{k + 1:03d}.dcm" for k in range(len(ct))])      # TCIA's DICOM folder
        else:
            write_volume(ct, image)

    for case_id in ids:
        write_ct(case_id)
        write_volume(labels, root / _lay_out(spec.label, case_id))
    write_ct("unlabelled")                                                  # e.g. a test case: left out
    result = convert(code, root, tmp_path / code)
    assert result["cases"] == len(kept or ids)
    index, metas = prepare_converted(tmp_path, code, tmp_path / code)
    assert index["cases"] == sorted(kept or ids) and not index["problems"]
    for meta in metas.values():
        assert sorted(s["name"] for s in meta["structures"]) == sorted(names.values())


def test_luna16_conversion_refuses_lungs_named_the_wrong_way_round(tmp_path):
    from training.data.convert import PAIRS, convert

    ct, labels = ct_and_labels([3, 4])             # value 3 at smaller x: the patient's right
    write_volume(ct, tmp_path / "dl" / "subset0" / "1.2.mhd")
    write_volume(labels, tmp_path / "dl" / "seg-lungs-LUNA16" / "1.2.mhd")
    with pytest.raises(Exception, match="'left lung' lies on the patient's right"):
        convert("0024", tmp_path / "dl", tmp_path / "0024")
    assert PAIRS["0024"].labels == {3: "left lung", 4: "right lung", 5: "trachea"}


def test_conversion_of_a_download_in_another_layout_says_what_it_looked_for(tmp_path):
    from training.data.convert import main

    (tmp_path / "dl" / "images").mkdir(parents=True)
    assert main(["0007", str(tmp_path / "dl"), str(tmp_path / "out")]) == 1
    with pytest.raises(Exception, match=r"no BTCV image matches RawData/Training/img/img\{id\}.nii.gz"):
        from training.data.convert import convert
        convert("0007", tmp_path / "dl", tmp_path / "out")
    with pytest.raises(Exception, match="no conversion for '0011'"):
        convert("0011", tmp_path / "dl", tmp_path / "out")


def test_hanseg_conversion_links_the_organ_files_as_mask_folders(tmp_path):
    from training.data.convert import convert

    ct, labels = ct_and_labels([1, 2, 3])
    case = tmp_path / "HaN-Seg" / "set_1" / "case_01"
    write_volume(ct, case / "case_01_IMG_CT.nrrd")
    write_volume(ct, case / "case_01_IMG_MR_T1.nrrd")
    for value, organ in ((1, "A_Carotid_L"), (2, "Glottis"), (3, "SpinalCord")):
        write_volume((labels == value).astype(np.uint8), case / f"case_01_OAR_{organ}.seg.nrrd")
    assert convert("0001", tmp_path / "HaN-Seg", tmp_path / "0001")["cases"] == 1
    index, metas = prepare_converted(tmp_path, "0001", tmp_path / "0001", layout="mask_folders", image_name="ct.nrrd")
    assert index["cases"] == ["case_01"]
    assert sorted(s["name"] for s in metas["case_01"]["structures"]) == ["glottis", "left carotid artery", "spinal cord"]


def test_chaos_conversion_pairs_png_masks_with_dicom_slices_by_file_name(tmp_path):
    from training.data.convert import convert

    ct, labels = ct_and_labels([1])
    ct[5, 2:6, 2:6], labels[5, 2:6, 2:6] = 101, 1         # a second liver piece in another slice
    case = tmp_path / "CHAOS_Train_Sets" / "Train_Sets" / "CT" / "1"
    # The file names run against the slice positions, so name order and position order differ.
    names = [f"i{len(ct) - 1 - k:04d},0000b.dcm" for k in range(len(ct))]
    write_dicom_slices(ct, case / "DICOM_anon", names)
    (case / "Ground").mkdir()
    for k, name in enumerate(names):                      # liver_GT_<n>.png belongs to the n-th file by name
        png = case / "Ground" / f"liver_GT_{sorted(names).index(name):03d}.png"
        sitk.WriteImage(sitk.GetImageFromArray((labels[k] * 255).astype(np.uint8)), str(png))
    assert convert("0000", tmp_path / "CHAOS_Train_Sets", tmp_path / "0000")["cases"] == 1
    converted_ct = read(tmp_path / "0000" / "imagesTr" / "1.nii.gz")
    converted_liver = read(tmp_path / "0000" / "labelsTr" / "1.nii.gz")
    assert converted_liver.sum() == labels.sum() and set(converted_ct[converted_liver > 0]) == {101}
    index, metas = prepare_converted(tmp_path, "0000", tmp_path / "0000")
    assert [s["name"] for s in metas["1"]["structures"]] == ["liver"]


def test_ircadb_conversion_joins_numbered_masks_from_zipped_dicom(tmp_path):
    import zipfile

    from training.data.convert import convert

    ct, labels = ct_and_labels([1, 2, 3, 4])
    patient = tmp_path / "3Dircadb1" / "3Dircadb1.1"
    scratch = tmp_path / "scratch"
    slices = [f"image_{k}" for k in range(len(ct))]
    write_dicom_slices(ct, scratch / "PATIENT_DICOM", slices)
    for value, folder in ((1, "liver"), (2, "livertumor01"), (3, "livertumor02"), (4, "portalvein")):
        write_dicom_slices((labels == value) * 255, scratch / "MASKS_DICOM" / folder, slices)
    patient.mkdir(parents=True)
    for part in ("PATIENT_DICOM", "MASKS_DICOM"):         # the download ships each as a zip
        with zipfile.ZipFile(patient / f"{part}.zip", "w") as archive:
            for path in sorted((scratch / part).rglob("*")):
                archive.write(path, path.relative_to(scratch))
    assert convert("0009", tmp_path / "3Dircadb1", tmp_path / "0009")["cases"] == 1
    tumour = read(tmp_path / "0009" / "3Dircadb1.1" / "segmentations" / "liver tumor.nii.gz")
    assert tumour.sum() == ((labels == 2) | (labels == 3)).sum()
    index, metas = prepare_converted(tmp_path, "0009", tmp_path / "0009", layout="mask_folders")
    assert sorted(s["name"] for s in metas["3Dircadb1.1"]["structures"]) == ["liver", "liver tumor", "portal vein"]


# ---- the default recipe's data flow: one mask per label map, padding as inference pads, balance, empties ----

def _manifest_with(shared_ct: Path, folder: Path, case_id: str, keep_labels: int | None = None) -> Path:
    """A copy of the shared manifest holding one case, with its paths made absolute and, optionally, only its first
    `keep_labels` label maps."""
    manifest = json.loads((shared_ct / "manifest.json").read_text())
    case = next(c for c in manifest["cases"] if c["id"] == case_id)
    case["image"] = str(shared_ct / case["image"])
    for label in case["labels"]:
        label["path"] = str(shared_ct / label["path"])
        if isinstance(label.get("names"), str):
            label["names"] = str(shared_ct / label["names"])
    if keep_labels is not None:
        case["labels"] = case["labels"][:keep_labels]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "manifest.json"
    path.write_text(json.dumps({**manifest, "cases": [case]}))
    return path


def test_a_second_label_map_of_the_same_organs_does_not_make_their_masks_a_union(tmp_path, shared_ct):
    # ts_upper_abdomen_3mm lists the full and the fast TotalSegmentator outputs of the same organs. The reference is
    # the same case prepared from its first label map alone.
    both = prepare(tmp_path / "both", layout="manifest", cases=["ts_upper_abdomen_3mm"],
                   path=str(_manifest_with(shared_ct, tmp_path / "m2", "ts_upper_abdomen_3mm")))
    first = prepare(tmp_path / "first", layout="manifest", cases=["ts_upper_abdomen_3mm"],
                    path=str(_manifest_with(shared_ct, tmp_path / "m1", "ts_upper_abdomen_3mm", keep_labels=1)))
    assert both["cases"] == first["cases"] == ["ts_upper_abdomen_3mm"]
    voxels = {}
    for name in ("both", "first"):
        meta = case_meta(tmp_path / name, "ts_upper_abdomen_3mm")
        voxels[name] = {s["name"]: s["voxels"] for s in meta["structures"]}
    for organ in ("liver", "spleen", "aorta", "stomach"):
        assert voxels["both"][organ] == voxels["first"][organ]
    assert any("again; the earlier label map's masks are kept" in note for note in both["notes"])


def test_training_pads_a_thin_crop_as_the_predictor_pads_a_thin_ct(tmp_path):
    # A 5-slice case, thinner than the 16-slice window: 11 slices of padding, 5 before and 6 after (the odd one at
    # the end), with 0 -- worked out by hand, not with the predictor's helper.
    _write_prepared(tmp_path, "thin", {"c": (["liver"], [])})
    case = open_source(tmp_path, "thin").cases[0]
    image = np.linspace(0.1, 0.9, 4 * 4 * 4, dtype=np.float32).reshape(4, 4, 4)
    np.save(case.folder / "image.npy", image.astype(np.float16))
    crop = sample_crop(case, (9, 4, 4), CropSettings(foreground_ratio=1.0), np.random.default_rng(0))
    assert crop.image.shape == (9, 4, 4) and crop.layers.shape == (1, 9, 4, 4)
    np.testing.assert_array_equal(crop.image[:2], 0.0)
    np.testing.assert_array_equal(crop.image[6:], 0.0)
    np.testing.assert_allclose(crop.image[2:6], image.astype(np.float16).astype(np.float32))
    assert crop.mask("liver")[2].all() and not crop.mask("liver")[[0, 1, 3, 4, 5, 6, 7, 8]].any()


def test_whole_volume_crops_train_their_answer_but_no_mask_by_default(prepared_heart):
    recipe = load_recipe(REPO / "training" / "recipes" / "tiny")
    config = recipe.stages[3]
    config.sources = {"src": 1.0}
    config.crops.whole_volume_ratio = 1.0
    config.questions.negative_ratio = 0.0
    samples = StageSamples(config, [prepared_heart], (16, 48, 48))
    for slot in range(4):
        item = samples[SampleKey(0, 0, 0, slot)]
        assert item["answer"].count(SEG_TOKEN) == len(item["masks"]) >= 1
        assert int(item["masks"].sum()) == 0           # the loss skips empty targets of an answer's [SEG]
    config.crops.whole_volume_masks = True
    assert all(int(samples[SampleKey(0, 0, 0, slot)]["masks"].sum()) > 0 for slot in range(4))


def _balanced_stage1(prepared, **crops):
    recipe = load_recipe(REPO / "training" / "recipes" / "default-smollm2")
    config = recipe.stages[1]
    config.sources = {prepared.name: 1.0}
    config.augment = AugmentSettings(rotate90_prob=0.0, flip_z_prob=0.0)
    for key, value in crops.items():
        setattr(config.crops, key, value)
    return StageSamples(config, [prepared], (16, 48, 48))


def test_stage1_balances_organs_not_cases_and_teaches_empty_masks(tmp_path):
    # Three cases hold the liver and one the spleen: by case the spleen would be a quarter of the centres.
    _write_prepared(tmp_path, "mix", {"a": (["liver", "heart"], ["spleen"]), "b": (["liver"], ["spleen"]),
                                      "c": (["liver"], []), "d": (["spleen", "liver"], [])})
    samples = _balanced_stage1(open_source(tmp_path, "mix"), targets=["liver", "spleen"], target_weights={},
                               masks_per_crop=3, foreground_ratio=1.0)
    centres, empties, names = [], 0, []
    for slot in range(400):
        item = samples[SampleKey(0, 0, 0, slot)]
        assert len(item["names"]) == len(item["masks"]) == 3
        centres.append(item["names"][0])
        for name, mask in zip(item["names"], item["masks"]):
            names.append(name)
            empties += int(mask.sum() == 0)
    assert 0.4 < centres.count("spleen") / len(centres) < 0.6
    assert empties > 0 and {"spleen", "liver"} <= set(names)


def test_negatives_mostly_name_trained_organs_the_crop_lacks(tmp_path):
    # Annotated but absent: one trained organ (spleen) and five untrained structures. Without the trained share a
    # negative names the spleen about 1 time in 6, so the name alone would predict the answer.
    untrained = ["brain", "trachea", "urinary bladder", "prostate", "heart"]
    _write_prepared(tmp_path, "neg", {"a": (["liver"], ["spleen", *untrained])})
    recipe = load_recipe(REPO / "training" / "recipes" / "tiny")
    config = recipe.stages[3]
    config.sources = {"neg": 1.0}
    config.crops.targets = ["liver", "spleen"]
    config.questions.negative_ratio = 1.0
    samples = StageSamples(config, [open_source(tmp_path, "neg")], (4, 4, 4))
    share = []
    for trained_share in (0.0, 0.7):
        config.questions.trained_negative_ratio = trained_share
        answers = [samples[SampleKey(step, 0, 0, 0)]["answer"] for step in range(200)]
        assert all(a.startswith("Sorry, there is no") for a in answers)
        share.append(sum("spleen" in a for a in answers) / len(answers))
    assert share[0] < 0.3 and 0.65 < share[1] < 0.9      # 0.7 + 0.3 / 6 = 0.75 expected


def test_contrast_phase_moves_each_organ_within_its_range_and_leaves_bone_alone():
    from training.data.augment import PHASE_OFFSETS_HU, VESSEL_LUMEN_HU, contrast_phase

    hu_min, hu_max = -300.0, 400.0
    image = np.full((4, 8, 8), (40.0 - hu_min) / (hu_max - hu_min), np.float32)
    structures = {name: np.zeros(image.shape, bool) for name in ("liver", "aorta", "vertebra l1")}
    structures["liver"][0] = structures["aorta"][1] = structures["vertebra l1"][2] = True
    for seed in range(20):
        out = contrast_phase(image, structures, hu_min, hu_max - hu_min, np.random.default_rng(seed))
        hu = out * (hu_max - hu_min) + hu_min
        low, high = PHASE_OFFSETS_HU["parenchyma"]
        assert np.all(hu[0] >= 40 + low - 1e-3) and np.all(hu[0] <= 40 + high + 1e-3) and np.ptp(hu[0]) < 1e-3
        assert VESSEL_LUMEN_HU[0] - 1e-3 <= hu[1, 0, 0] <= VESSEL_LUMEN_HU[1] + 1e-3
        np.testing.assert_allclose(hu[2:], 40.0, atol=1e-3)


def test_the_default_recipe_refuses_settings_that_would_bring_the_shortcuts_back(tmp_path):
    folder = tmp_path / "recipe"
    shutil.copytree(REPO / "training" / "recipes" / "default-smollm2", folder)
    stage1 = folder / "stage1.yaml"
    text = stage1.read_text()
    stage1.write_text(text.replace("  masks_per_crop: 4", "  masks_per_crop: 4\n  whole_volume_ratio: 0.1"))
    with pytest.raises(Exception, match="whole_volume_masks"):
        load_recipe(folder)
    stage1.write_text(text.replace("balance: structure", "balance: organ"))
    with pytest.raises(Exception, match="crops.balance"):
        load_recipe(folder)
