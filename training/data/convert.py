"""Turn a dataset as its publishers distribute it into a layout the readers take (training/README.md, "Converting
the 25 datasets"):

    python -m training.data.convert <code> <downloaded folder> <output folder>      e.g. 0007 ~/dl/BTCV $R1SEG_DATA/0007
    python -m training.data.convert --list

Image and label pairs (most datasets) become an MSD `dataset.json` that lists the downloaded files where they are,
with absolute paths and the case id of each pair, and names each label value from r1seg_core's vocabulary
(datasets.json, the M3D-Seg class list of the code): nothing is copied. HaN-Seg becomes a mask-folder tree of links.
3D-IRCADb (DICOM slices per structure, possibly zipped) and CHAOS (DICOM CT, PNG liver masks) are written out as
NIfTI, one file per structure, since no reader takes their masks. Datasets that a reader takes as published
(TotalSegmentator, the MSD tasks) need no conversion. Only the layouts described where each entry says are known;
a download laid out otherwise stops with a message naming what was not found.
"""
from __future__ import annotations

import argparse
import glob
import json
import re
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from r1seg_core.errors import InvalidInputError
from r1seg_core.vocabulary import load_vocabulary


@dataclass(frozen=True)
class Pairs:
    """Image and label files matched by their case id: `{id}` in both patterns, `*` anywhere else (glob)."""
    name: str
    image: str
    label: str
    described: str                              # where the published layout is described
    labels: dict[int, str] | None = None        # label value -> name when not the M3D-Seg class order (value i + 1)
    keep: str | None = None                     # a regular expression the case id must match (e.g. CT only)
    notes: str = ""                             # shown by --list


PAIRS = {
    "0002": Pairs("AMOS22 (CT)", "imagesTr/{id}.nii.gz", "labelsTr/{id}.nii.gz",
                  "amos22.grand-challenge.org, Zenodo 7155725 (amos22.zip: imagesTr, labelsTr, dataset.json)",
                  keep=r"amos_0([0-4]\d\d)$", notes="ids 0500 and above are MRI and are left out"),
    "0003": Pairs("AbdomenCT-1K", "*/Case_{id}_0000.nii.gz", "Mask/Case_{id}.nii.gz",
                  "github.com/JunMa11/AbdomenCT-1K README (image parts Case_XXXXX_0000.nii.gz, Mask/Case_XXXXX.nii.gz)"),
    "0004": Pairs("KiTS23", "dataset/{id}/imaging.nii.gz", "dataset/{id}/segmentation.nii.gz",
                  "github.com/neheller/kits23 README (dataset/case_XXXXX/imaging.nii.gz, segmentation.nii.gz)"),
    "0005": Pairs("KiPA22", "train/image/{id}.nii.gz", "train/label/{id}.nii.gz",
                  "kipa22.grand-challenge.org data page (train/image, train/label)"),
    "0006": Pairs("KiTS19", "data/{id}/imaging.nii.gz", "data/{id}/segmentation.nii.gz",
                  "github.com/neheller/kits19 README (data/case_XXXXX/imaging.nii.gz, segmentation.nii.gz)"),
    "0007": Pairs("BTCV", "RawData/Training/img/img{id}.nii.gz", "RawData/Training/label/label{id}.nii.gz",
                  "synapse.org syn3193805, RawData.zip (Training/img/imgXXXX.nii.gz, Training/label/labelXXXX.nii.gz)"),
    "0008": Pairs("Pancreas-CT", "Pancreas-CT/PANCREAS_{id}/*/*", "TCIA_pancreas_labels-02-05-2017/label{id}.nii.gz",
                  "TCIA Pancreas-CT collection page (DICOM PANCREAS_XXXX/<study>/<series>/, labels labelXXXX.nii.gz)",
                  notes="the CT is the DICOM series folder; check a few cases in Slicer, as the label files' "
                        "orientation has been reported to differ from the DICOM"),
    "0010": Pairs("FLARE22", "images/FLARE22_Tr_{id}_0000.nii.gz", "labels/FLARE22_Tr_{id}.nii.gz",
                  "flare22.grand-challenge.org (FLARE22_LabeledCase50: images/, labels/)"),
    "0012": Pairs("CT-ORG", "OrganSegmentations/volume-{id}.nii.gz", "OrganSegmentations/labels-{id}.nii.gz",
                  "TCIA CT-ORG collection page (OrganSegmentations/volume-N.nii.gz, labels-N.nii.gz)"),
    "0013": Pairs("WORD", "imagesTr/{id}.nii.gz", "labelsTr/{id}.nii.gz",
                  "github.com/HiLab-git/WORD README (WORD-V0.1.0/imagesTr, labelsTr)"),
    "0014": Pairs("VerSe19", "*/rawdata/*/{id}_ct.nii.gz", "*/derivatives/*/{id}_seg-vert_msk.nii.gz",
                  "github.com/anjany/verse README (rawdata/sub-*/..._ct.nii.gz, derivatives/sub-*/..._seg-vert_msk.nii.gz; "
                  "labels 1-7 C1-C7, 8-19 T1-T12, 20-25 L1-L6, 26 sacrum, 27 coccyx, 28 T13)"),
    "0015": Pairs("VerSe20", "*/rawdata/*/{id}_ct.nii.gz", "*/derivatives/*/{id}_seg-vert_msk.nii.gz",
                  "github.com/anjany/verse README (as VerSe19)"),
    "0016": Pairs("SLIVER07", "*/liver-orig{id}.mhd", "*/liver-seg{id}.mhd",
                  "sliver07.grand-challenge.org (liver-origXXX.mhd, liver-segXXX.mhd)"),
    "0024": Pairs("LUNA16", "subset*/{id}.mhd", "seg-lungs-LUNA16/{id}.mhd",
                  "luna16.grand-challenge.org data page (subset0-9/<seriesuid>.mhd, seg-lungs-LUNA16/<seriesuid>.mhd)",
                  labels={3: "left lung", 4: "right lung", 5: "trachea"},
                  notes="the lung mask values 3, 4, 5; which lung is which is checked by position on the first case"),
}

# HaN-Seg's 30 organs at risk as its files name them; alphabetical, which is M3D-Seg's class order for 0001.
HANSEG_ORGANS = ("A_Carotid_L", "A_Carotid_R", "Arytenoid", "Bone_Mandible", "Brainstem", "BuccalMucosa", "Cavity_Oral",
                 "Cochlea_L", "Cochlea_R", "Cricopharyngeus", "Esophagus_S", "Eye_AL", "Eye_AR", "Eye_PL", "Eye_PR",
                 "Glnd_Lacrimal_L", "Glnd_Lacrimal_R", "Glnd_Submand_L", "Glnd_Submand_R", "Glnd_Thyroid", "Glottis",
                 "Larynx_SG", "Lips", "OpticChiasm", "OpticNrv_L", "OpticNrv_R", "Parotid_L", "Parotid_R", "Pituitary",
                 "SpinalCord")
SPECIAL = {
    "0000": ("CHAOS (CT)", "chaos.grand-challenge.org data page (Train_Sets/CT/<n>/DICOM_anon/*.dcm, "
                           "Ground/liver_GT_*.png: one PNG per DICOM slice, in file-name order)"),
    "0001": ("HaN-Seg", "HaN-Seg Zenodo 7442914 README (set_1/case_XX/case_XX_IMG_CT.nrrd, "
                        "case_XX_OAR_<organ>.seg.nrrd)"),
    "0009": ("3D-IRCADb-01", "ircad.fr 3D-IRCADb-01 page (3Dircadb1.N/PATIENT_DICOM, MASKS_DICOM/<structure>/, "
                             "as folders or zips)"),
}


def class_names(code: str) -> dict[int, str]:
    """Label value -> canonical name: M3D-Seg's class i is the published label value i + 1 (model_anchors.md §4.1)."""
    return {index + 1: name for index, name in load_vocabulary().dataset_label_map(code).items()}


# ---- image and label pairs -> dataset.json ----------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern:
    """`{id}` captures one path component (a repeated `{id}` must match the same text), `*` matches within one."""
    regex, seen = "", False
    for part in re.split(r"(\{id\}|\*)", pattern):
        if part == "{id}":
            regex += r"(?P=id)" if seen else r"(?P<id>[^/]+?)"
            seen = True
        else:
            regex += r"[^/]*" if part == "*" else re.escape(part)
    return re.compile(regex + "$")


def find_pairs(root: Path, spec: Pairs) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """(case id, image, label) of every image with a label, and the ids of images without one."""
    image_regex = _pattern_regex(spec.image)
    pairs, unlabelled = [], []
    for image in sorted(glob.glob(str(root / spec.image.replace("{id}", "*")))):
        found = image_regex.fullmatch(Path(image).relative_to(root).as_posix())
        if found is None or (spec.keep and not re.search(spec.keep, found["id"])):
            continue
        labels = sorted(glob.glob(str(root / spec.label.replace("{id}", glob.escape(found["id"])))))
        if len(labels) > 1:
            raise InvalidInputError(f"case {found['id']}: several label files match {spec.label}: {labels}")
        if labels:
            pairs.append((found["id"], Path(image), Path(labels[0])))
        else:
            unlabelled.append(found["id"])
    return pairs, unlabelled


def convert_pairs(code: str, root: Path, output: Path) -> dict:
    spec = PAIRS[code]
    pairs, unlabelled = find_pairs(root, spec)
    if not pairs:
        raise InvalidInputError(f"{root}: no {spec.name} image matches {spec.image} with a label matching {spec.label} "
                                f"(the layout of {spec.described})")
    ids = [case_id for case_id, _, _ in pairs]
    if len(set(ids)) != len(ids):
        raise InvalidInputError(f"{root}: case ids repeat across {spec.image}; the layout is not {spec.described}")
    names = spec.labels or class_names(code)
    if code == "0024":
        _check_lung_sides(pairs[0][2], names)
    _write_dataset_json(output, f"{code} {spec.name}", f"{root} ({spec.described})", names,
                        [{"id": case_id, "image": str(image.resolve()), "label": str(label.resolve())}
                         for case_id, image, label in pairs])
    return {"cases": len(pairs), "without_label": unlabelled}


def _write_dataset_json(output: Path, name: str, source: str, names: dict[int, str], training: list[dict]) -> None:
    output.mkdir(parents=True, exist_ok=True)
    description = {"name": name, "description": f"written by training.data.convert from {source}",
                   "labels": {"0": "background", **{str(value): label for value, label in names.items()}},
                   "training": training}
    (output / "dataset.json").write_text(json.dumps(description, indent=1))


def _check_lung_sides(label_path: Path, names: dict[int, str]) -> None:
    """The left lung lies at larger LPS x (the patient's left) than the right one; refuse a swapped mapping."""
    image = sitk.ReadImage(str(label_path))
    array = sitk.GetArrayViewFromImage(image)
    centres = {}
    for value, name in names.items():
        where = np.argwhere(array == value)
        if name.endswith(" lung") and len(where):
            index = where.mean(0)[::-1].tolist()           # (z, y, x) -> (x, y, z)
            centres[name] = image.TransformContinuousIndexToPhysicalPoint(index)[0]
    if len(centres) == 2 and centres["left lung"] <= centres["right lung"]:
        raise InvalidInputError(f"{label_path}: the value named 'left lung' lies on the patient's right of the one "
                                f"named 'right lung'; the published values are not {names}")


# ---- HaN-Seg -> mask folders (links) ----------------------------------------------------------------------------


def convert_hanseg(root: Path, output: Path) -> dict:
    names = dict(zip(HANSEG_ORGANS, class_names("0001").values()))
    cases = sorted(p.parent for p in root.glob("**/case_*_IMG_CT.nrrd"))
    if not cases:
        raise InvalidInputError(f"{root}: no case_XX/case_XX_IMG_CT.nrrd (the layout of {SPECIAL['0001'][1]})")
    for folder in cases:
        case = folder.name
        (output / case / "segmentations").mkdir(parents=True, exist_ok=True)
        _link(output / case / "ct.nrrd", folder / f"{case}_IMG_CT.nrrd")
        for organ, name in names.items():
            source = folder / f"{case}_OAR_{organ}.seg.nrrd"
            if source.is_file():
                _link(output / case / "segmentations" / f"{name}.nrrd", source)
    return {"cases": len(cases), "without_label": []}


def _link(link: Path, target: Path) -> None:
    link.unlink(missing_ok=True)
    link.symlink_to(target.resolve())


# ---- DICOM slices and PNG masks -> NIfTI --------------------------------------------------------------------------


def read_dicom_slices(files: list[Path]) -> tuple[sitk.Image, list[int]]:
    """A CT from DICOM slices ordered by position along the slice normal (they need not share a series UID, and
    anonymised CHAOS slices do not), and each file's slice index in it."""
    reader = sitk.ImageFileReader()
    positions = []
    for path in files:
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        normal = np.array(reader.GetDirection()).reshape(3, 3)[:, 2]
        positions.append(float(np.dot(reader.GetOrigin(), normal)))
    order = sorted(range(len(files)), key=lambda k: positions[k])
    series = sitk.ImageSeriesReader()
    series.SetFileNames([str(files[k]) for k in order])
    slot = {k: z for z, k in enumerate(order)}
    return series.Execute(), [slot[k] for k in range(len(files))]


def _write_mask_like(mask: np.ndarray, reference: sitk.Image, path: Path) -> None:
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.CopyInformation(reference)
    _write_image(image, path)


def _write_image(image: sitk.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)


def convert_chaos(root: Path, output: Path) -> dict:
    """Each CT's DICOM slices and its PNG liver masks, paired in file-name order, as NIfTI and a dataset.json."""
    cases = sorted(p.parent for p in root.glob("**/CT/*/DICOM_anon"))
    if not cases:
        raise InvalidInputError(f"{root}: no CT/<case>/DICOM_anon folder (the layout of {SPECIAL['0000'][1]})")
    training = []
    for folder in cases:
        slices, masks = sorted((folder / "DICOM_anon").glob("*.dcm")), sorted((folder / "Ground").glob("*.png"))
        if len(slices) != len(masks):
            raise InvalidInputError(f"{folder}: {len(slices)} DICOM slices but {len(masks)} PNG masks; the layout of "
                                    f"{SPECIAL['0000'][1]} pairs them one to one")
        ct, slot = read_dicom_slices(slices)
        liver = np.zeros(sitk.GetArrayViewFromImage(ct).shape, np.uint8)
        for k, png in enumerate(masks):
            pixels = sitk.GetArrayFromImage(sitk.ReadImage(str(png)))
            if pixels.shape != liver.shape[1:]:
                raise InvalidInputError(f"{png}: {pixels.shape} pixels, but its DICOM slice has {liver.shape[1:]}")
            liver[slot[k]] = pixels > 0
        _write_image(ct, output / "imagesTr" / f"{folder.name}.nii.gz")
        _write_mask_like(liver, ct, output / "labelsTr" / f"{folder.name}.nii.gz")
        training.append({"id": folder.name, "image": f"imagesTr/{folder.name}.nii.gz",
                         "label": f"labelsTr/{folder.name}.nii.gz"})
    _write_dataset_json(output, "0000 CHAOS (CT)", str(root), class_names("0000"), training)
    return {"cases": len(training), "without_label": []}


def _squashed(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def ircadb_name(folder_name: str) -> str:
    """A MASKS_DICOM folder name ("livertumor01", "portalvein") as the vocabulary names the structure: M3D-Seg's
    published 0009 names without spaces, or any name the vocabulary knows. Others are kept as they are and
    preparation reports them (`unknown_labels`)."""
    vocabulary = load_vocabulary()
    for index, published in _published_names("0009").items():
        if _squashed(published) == _squashed(folder_name):
            return vocabulary.dataset_label_map("0009")[index]
    structure = vocabulary.lookup(folder_name, "0009")
    return structure.name if structure is not None else folder_name


@lru_cache(maxsize=None)      # asked for every structure folder of every patient
def _published_names(code: str) -> dict[int, str]:
    import r1seg_core.vocabulary as package

    entry = json.loads((Path(package.__file__).parent / "datasets.json").read_text())["datasets"][code]
    return {int(k): v for k, v in entry.get("source_names", entry["labels"]).items()}


def _dicom_folder(folder: Path, scratch: Path) -> Path:
    """`folder`, or its zip (as the download ships it) extracted into `scratch`."""
    if folder.is_dir():
        return folder
    archive = folder.with_suffix(".zip")
    if not archive.is_file():
        raise InvalidInputError(f"neither {folder} nor {archive} exists (the layout of {SPECIAL['0009'][1]})")
    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(scratch)
    return scratch / folder.name


def convert_ircadb(root: Path, output: Path) -> dict:
    """Each patient's CT and structure masks (DICOM slices) as ct.nii.gz and segmentations/<structure>.nii.gz;
    masks of one structure (livertumor01, livertumor02...) are joined into one."""
    patients = sorted(p for p in root.glob("**/3Dircadb1.*") if p.is_dir())
    if not patients:
        raise InvalidInputError(f"{root}: no 3Dircadb1.N patient folder (the layout of {SPECIAL['0009'][1]})")
    for patient in patients:
        with tempfile.TemporaryDirectory() as scratch:
            ct, _ = read_dicom_slices(_slices(_dicom_folder(patient / "PATIENT_DICOM", Path(scratch))))
            _write_image(ct, output / patient.name / "ct.nii.gz")
            masks: dict[str, np.ndarray] = {}
            masks_folder = _dicom_folder(patient / "MASKS_DICOM", Path(scratch))
            for structure in sorted(p for p in masks_folder.iterdir() if p.is_dir()):
                image, _ = read_dicom_slices(_slices(structure))
                name = ircadb_name(structure.name)
                masks[name] = masks.get(name, False) | (sitk.GetArrayFromImage(image) > 0)
            for name, mask in masks.items():
                _write_mask_like(mask, ct, output / patient.name / "segmentations" / f"{name}.nii.gz")
    return {"cases": len(patients), "without_label": []}


def _slices(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    if not files:
        raise InvalidInputError(f"{folder} holds no DICOM slice")
    return files


# ---- command line -------------------------------------------------------------------------------------------------

CONVERTERS = {"0000": convert_chaos, "0001": convert_hanseg, "0009": convert_ircadb}


def convert(code: str, root: Path, output: Path) -> dict:
    if not Path(root).is_dir():
        raise InvalidInputError(f"{root} is not a folder")
    if code in PAIRS:
        return convert_pairs(code, Path(root), Path(output))
    if code in CONVERTERS:
        return CONVERTERS[code](Path(root), Path(output))
    raise InvalidInputError(f"no conversion for {code!r}: one of {sorted([*PAIRS, *CONVERTERS])} "
                            "(the others are read as published; training/README.md)")


def listing() -> str:
    rows = [f"{code}  {spec.name}: {spec.image} + {spec.label}  [{spec.described}]" + (f" {spec.notes}" if spec.notes else "")
            for code, spec in PAIRS.items()]
    rows += [f"{code}  {name}  [{described}]" for code, (name, described) in SPECIAL.items()]
    return "\n".join(sorted(rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("code", nargs="?", help="M3D-Seg dataset code (0000-0024)")
    parser.add_argument("source", nargs="?", type=Path, help="the dataset as downloaded (and unzipped)")
    parser.add_argument("output", nargs="?", type=Path, help="the folder data.yaml reads (e.g. $R1SEG_DATA/<code>)")
    parser.add_argument("--list", action="store_true", help="the datasets converted here and their layouts")
    args = parser.parse_args(argv)
    if args.list:
        print(listing())
        return 0
    if not (args.code and args.source and args.output):
        parser.error("give the dataset code, the downloaded folder and the output folder (or --list)")
    try:
        result = convert(args.code, args.source, args.output)
    except InvalidInputError as error:
        print(f"[convert] {error}", file=sys.stderr)
        return 1
    print(f"[convert] {args.code}: {result['cases']} cases written to {args.output}")
    if result["without_label"]:
        print(f"[convert]   {len(result['without_label'])} images without a label left out: "
              f"{', '.join(result['without_label'][:10])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
