"""Issue 22: `r1seg ask DICOM_DIR "question" -o answer.dcm` writes a DICOM SEG over the source series.

The SEG is read back with pydicom alone (not highdicom, which wrote it): every frame is located by its
ImagePositionPatient on the NIfTI output's grid (read with SimpleITK) and compared pixel by pixel with that slice of
the NIfTI labelmap; every non-empty slice of every found target must have its frame. The series is dcmqi's 3-slice
CT, which has real UIDs; the held-out TotalSegmentator series has empty UIDs and must be refused.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from r1seg_core.cli import main as r1seg
from r1seg_core.dicom_seg import source_series, write_dicom_seg
from r1seg_core.inference.result import AnswerResult, TargetResult
from r1seg_core.volume import read_volume

LEFT = "7771000"


@pytest.fixture(scope="module")
def ct_series(shared_ct) -> Path:
    return shared_ct / "dcmqi_ct3slice" / "ct-3slice"


def frames_against_nifti(seg_path: Path, nifti_path: Path, values: dict[int, int], ct_series: Path) -> int:
    """Compare each SEG frame with its slice of the NIfTI labelmap; `values` maps segment number -> label value.
    Returns the number of frames compared."""
    seg = pydicom.dcmread(seg_path)
    labels_image = sitk.ReadImage(str(nifti_path))
    labels = sitk.GetArrayFromImage(labels_image)
    source_uids = {pydicom.dcmread(p).SOPInstanceUID: p for p in ct_series.iterdir()}
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    covered = set()
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        # With one segment, the segment identification is shared by all frames.
        identification = group if "SegmentIdentificationSequence" in group else seg.SharedFunctionalGroupsSequence[0]
        number = identification.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        position = [float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient]
        x, y, z = labels_image.TransformPhysicalPointToIndex(position)
        assert (x, y) == (0, 0)
        np.testing.assert_array_equal(frame.astype(bool), labels[z] == values[number], err_msg=f"segment {number}, z {z}")
        source = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert [float(v) for v in pydicom.dcmread(source_uids[source]).ImagePositionPatient] == position
        covered.add((number, z))
    expected = {(n, z) for n, v in values.items() for z in range(labels.shape[0]) if (labels[z] == v).any()}
    assert covered == expected
    return len(covered)


def test_seg_references_the_series_codes_laterality_and_frames_equal_the_nifti(ct_series, shared_ct, tmp_path):
    volume = read_volume(ct_series)
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_ct / "dcmqi_ct3slice" / "liver_spine_seg.nrrd")))
    assert reference.shape == volume.array.shape
    # Label 2 stands in for a lateral structure: the codes, not the anatomy, are tested here.
    targets = [TargetResult("liver", (reference == 1).astype(np.uint8), None, 70.4, int((reference == 1).sum())),
               TargetResult("spleen", np.zeros_like(reference, np.uint8), None, 0.0, 0),
               TargetResult("left kidney", (reference == 2).astype(np.uint8), None, 8.2, int((reference == 2).sum()))]
    result = AnswerResult("Segment the liver, the spleen and the left kidney.", "answer", targets)
    nifti = result.write(tmp_path / "answer.nii.gz", volume)
    seg_path = write_dicom_seg(result, volume, source_series(ct_series), tmp_path / "answer.dcm", "test model")

    seg = pydicom.dcmread(seg_path)
    ct = pydicom.dcmread(next(ct_series.iterdir()))
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == ct.StudyInstanceUID and seg.FrameOfReferenceUID == ct.FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct.SeriesInstanceUID
    segments = {s.SegmentNumber: s for s in seg.SegmentSequence}
    assert len(segments) == 2, "an absent target must not be an (empty) segment"
    liver, kidney = segments[1], segments[2]
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert liver.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "123037004"
    assert "SegmentedPropertyTypeModifierCodeSequence" not in liver
    assert kidney.SegmentedPropertyTypeCodeSequence[0].CodeValue == "64033007"
    assert kidney.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == LEFT
    algorithm = liver.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "R1Seg3D" and algorithm.AlgorithmVersion and algorithm.AlgorithmSource == "test model"
    assert liver.SegmentAlgorithmType == "AUTOMATIC" and "absent: spleen" in seg.ContentDescription
    # NIfTI values follow the answer's targets (liver 1, spleen 2, left kidney 3); SEG numbers only the found ones.
    assert frames_against_nifti(seg_path, nifti, {1: 1, 2: 3}, ct_series) > 0


def test_ask_writes_a_seg_equal_to_its_nifti_answer(ct_series, tmp_path, capsys):
    model = tmp_path / "tiny"
    assert r1seg(["init-model", str(model), "--preset", "tiny"]) == 0
    common = [str(ct_series), "Segment the liver.", "--model", str(model), "--no-sliding-window"]
    assert r1seg(["ask", *common, "-o", str(tmp_path / "a.nii.gz")]) == 0
    assert r1seg(["ask", *common, "-o", str(tmp_path / "a.dcm")]) == 0
    out = capsys.readouterr().out
    # The untrained tiny model (seed 0) marks the liver present on this CT, so there is a segment to compare.
    assert "liver: present" in out and f"wrote {tmp_path / 'a.dcm'}" in out
    assert frames_against_nifti(tmp_path / "a.dcm", tmp_path / "a.nii.gz", {1: 1}, ct_series) > 0


@pytest.mark.parametrize("ct, expected", [
    ("totalseg_example/example_ct_dicom", "empty SOPClassUID, SOPInstanceUID, SeriesInstanceUID, StudyInstanceUID"),
    ("totalseg_example/example_ct_sm.nii.gz", "NIfTI/NRRD file has none"),
])
def test_inputs_a_seg_cannot_reference_are_refused_before_any_work(shared_ct, tmp_path, capsys, ct, expected):
    output = tmp_path / "answer.dcm"
    assert r1seg(["ask", str(shared_ct / ct), "Segment the liver.", "-o", str(output)]) == 2
    error = capsys.readouterr().err
    assert expected in error and ".seg.nrrd" in error and not output.exists()
    assert list(tmp_path.iterdir()) == []
