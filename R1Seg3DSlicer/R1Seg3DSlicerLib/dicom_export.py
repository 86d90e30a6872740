"""What Export as DICOM SEG exports, and whether it can: the scene side, without Slicer's DICOM module.

A DICOM Segmentation references the DICOM series it was drawn on, so an answer can be exported only when its CT
came from DICOM: Slicer's DICOM module then gives the volume node the series' SOP Instance UIDs (attribute
`DICOM.instanceUIDs`) and places it under its study in the subject hierarchy, and the files stay in the DICOM
database. A CT opened from NIfTI or NRRD has none of that; the export is refused with what to do, never written
as a file that references nothing.

The export itself (R1Seg3DSlicer.py, Logic.exportDicomSeg) goes through Slicer's own exporter, the
DICOMSegmentationPlugin of the Quantitative Reporting extension (dcmqi), as the DICOM module's Export does. It is
given a segmentation of its own holding copies of the answer's non-empty segments (their names, colours and
terminology), on the CT's geometry, in the CT's study, each marked as made by an algorithm (the plugin writes
SegmentAlgorithmType MANUAL otherwise); the answers' segmentation is left as it is. Imports only slicer.
"""
from __future__ import annotations

from dataclasses import dataclass

import slicer

from .i18n import tr as _
from .scene import new_segmentation_beside, segment_mask, subject_hierarchy

# Set by Slicer's DICOM scalar volume plugin on a volume loaded from the DICOM database.
INSTANCE_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"
# Segment tags the DICOMSegmentationPlugin reads for SegmentAlgorithmType and SegmentAlgorithmName.
ALGORITHM_TYPE_TAG = "DICOM.SegmentAlgorithmType"
ALGORITHM_NAME_TAG = "DICOM.SegmentAlgorithmName"
AUTOMATIC = "AUTOMATIC"
LOAD_FROM_DICOM = _("Load the CT through the DICOM module (import its series into the DICOM database and load it"
                    " from there), ask the question again, then export.")


class ExportRefused(ValueError):
    """The answer cannot be exported as DICOM SEG; the message says why and what to do."""


@dataclass(frozen=True)
class DicomSegExport:
    """What one export writes: these segments of the answers' segmentation, referencing these DICOM instances."""
    volume_node_id: str
    segmentation_node_id: str
    segment_ids: tuple[str, ...]
    instance_uids: tuple[str, ...]


def study_item(volume_node) -> int:
    """The subject-hierarchy study the volume sits in, or 0."""
    hierarchy = subject_hierarchy(volume_node.GetScene())
    item = hierarchy.GetItemByDataNode(volume_node)
    parent = hierarchy.GetItemParent(item) if item else 0
    study_level = slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMLevelStudy()
    return parent if parent and hierarchy.GetItemLevel(parent) == study_level else 0


def _non_empty(segmentation_node, segment_id: str, volume_node) -> bool:
    if segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
        return False
    try:
        return bool(segment_mask(segmentation_node, segment_id, volume_node).any())
    except ValueError:   # no labelmap at all: nothing drawn
        return False


def check_exportable(volume_node, segmentation_node, segment_ids, file_for_instance=None) -> DicomSegExport:
    """The export of the answer whose segments are `segment_ids`, or ExportRefused saying why not.
    `file_for_instance(uid)` (Slicer: slicer.dicomDatabase.fileForInstance) tells where the database keeps each of
    the CT's DICOM files; the plugin needs them all."""
    if volume_node is None or segmentation_node is None:
        raise ExportRefused(_("Select the CT and an answer's segment to export."))
    uids = tuple((volume_node.GetAttribute(INSTANCE_UIDS_ATTRIBUTE) or "").split())
    if not uids:
        raise ExportRefused(_("'{volume}' was not loaded from DICOM (it has no DICOM instance UIDs), and a DICOM"
                              " Segmentation must reference the CT's DICOM series. {fix}").format(
            volume=volume_node.GetName(), fix=LOAD_FROM_DICOM))
    if not study_item(volume_node):
        raise ExportRefused(_("'{volume}' is not in a DICOM study in the Data module's subject hierarchy, so the"
                              " segmentation would join no study. {fix}").format(volume=volume_node.GetName(),
                                                                                 fix=LOAD_FROM_DICOM))
    # After the attribute checks: telling an empty segment resamples each segment onto the CT grid.
    kept = tuple(segment_id for segment_id in segment_ids if _non_empty(segmentation_node, segment_id, volume_node))
    if not kept:
        raise ExportRefused(_("This answer has no segment to export: it found nothing, or its segments were deleted or"
                              " emptied. DICOM SEG has no empty segments."))
    if file_for_instance is not None:
        missing = [uid for uid in uids if not file_for_instance(uid)]
        if missing:
            raise ExportRefused(_("{missing} of the {total} DICOM files of '{volume}' are no longer in the DICOM"
                                  " database (moved or deleted). Import the series into the DICOM database again and"
                                  " load the CT from there, then ask and export again.").format(
                missing=len(missing), total=len(uids), volume=volume_node.GetName()))
    return DicomSegExport(volume_node.GetID(), segmentation_node.GetID(), kept, uids)


def build_export_segmentation(export: DicomSegExport, scene, name: str, algorithm_name: str):
    """A new segmentation node holding copies of the export's segments, on the CT's geometry, in the CT's study and
    under its transform, each tagged as made by `algorithm_name`. The caller removes it after the export."""
    volume_node = scene.GetNodeByID(export.volume_node_id)
    source = scene.GetNodeByID(export.segmentation_node_id).GetSegmentation()
    node = new_segmentation_beside(volume_node, name)
    copy = node.GetSegmentation()
    for segment_id in export.segment_ids:
        if not copy.CopySegmentFromSegmentation(source, segment_id):
            scene.RemoveNode(node)
            raise RuntimeError(_("Slicer could not copy segment {segment} for the export.").format(segment=segment_id))
        segment = copy.GetSegment(segment_id)
        segment.SetTag(ALGORITHM_TYPE_TAG, AUTOMATIC)
        segment.SetTag(ALGORITHM_NAME_TAG, algorithm_name)
    return node
