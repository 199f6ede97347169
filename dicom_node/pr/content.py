"""Graphics of the node's presentation states, from :mod:`inference.results` objects.

Three graphic layers over the source image, every coordinate in PIXEL units of that image:

- ``AI_REGIONS``: one box per anomaly region, with its label ("A1: Abnormal region, score 0.59");
- ``AI_FRACTURE``: one box per fracture region while the fracture call is suspected or definite, as the
  heatmap capture draws them: solid when definite, dotted (short POLYLINE dashes, see :func:`dashes`)
  when suspected, each with its label ("F1: Fracture, definite, p = 0.72");
- ``AI_TEXT``: the image's findings in the wording of the capture's findings line (a line per finding,
  "not localised" after a positive call that no box localises) and the intended-use statement.

The regions are those every report of the image shows (:meth:`ImageResult.reported_regions`), tagged F1,
F2, ... and A1, A2, ... as the SR's tracking identifiers and the heatmap number them.

The boxes are also drawn into an overlay bitmap (:func:`overlay_elements`) activated on a fourth layer,
``AI_BOX_BITMAP`` (drawn first, under the vector graphics, which cover it), so that a renderer that draws
overlays but no vector graphics (dcmtk's presentation state library, print paths) still shows them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import pack_bits

from dicom_node.pr import enum
from dicom_node.sc import content as sc_content
from dicom_node.sr import content as sr_content
from inference.results import BinaryFinding, ImageResult, ModelInfo, Region

PIXEL = hd.pr.AnnotationUnitsValues.PIXEL
POLYLINE = hd.pr.GraphicTypeValues.POLYLINE


@dataclass(frozen=True)
class Box:
    """One box to draw: its layer, corners (clipped to the image), label and line style."""

    layer: str
    box: tuple[float, float, float, float]
    label: str
    dotted: bool
    region: Region
    number: int  # 1-based, within its kind (as the SR numbers its regions)


# -- geometry -----------------------------------------------------------------------------------------------------
def long_side(rows: int, columns: int) -> int:
    return max(int(rows), int(columns))


def dash_length(rows: int, columns: int) -> float:
    return max(enum.MIN_DASH, long_side(rows, columns) * enum.DASH_FRACTION)


def dashes(polyline: np.ndarray, dash: float) -> list[np.ndarray]:
    """A polyline cut into dashes of length ``dash`` with gaps as long: one 2-point segment per dash.

    The pattern restarts at every corner, so that each corner of a box is drawn (a dash starts there).
    """
    pts = np.asarray(polyline, dtype=np.float64).reshape(-1, 2)
    out: list[np.ndarray] = []
    for a, b in zip(pts[:-1], pts[1:]):
        length = float(np.hypot(*(b - a)))
        if length == 0:
            continue
        start = 0.0
        while start < length:
            end = min(length, start + dash)
            out.append(np.array([a + (b - a) * (start / length), a + (b - a) * (end / length)]))
            start += 2 * dash
    return out


def text_height(rows: int, columns: int) -> float:
    return max(enum.MIN_TEXT_HEIGHT, long_side(rows, columns) * enum.TEXT_HEIGHT_FRACTION)


def text_box(text: str, left: float, top: float, rows: int, columns: int,
             height: float) -> tuple[float, float, float, float]:
    """A bounding box (left, top, right, bottom) for one line of ``text`` at (left, top), moved and cut
    to lie inside the image."""
    width = min(float(columns), max(height, len(text) * height * enum.CHAR_WIDTH))
    height = min(float(rows), height)
    left = min(max(0.0, left), float(columns) - width)
    top = min(max(0.0, top), float(rows) - height)
    return (left, top, left + width, top + height)


# -- texts ----------------------------------------------------------------------------------------------------------
def fracture_label(finding: BinaryFinding | None, number: int) -> str:
    """"F1: Fracture, definite, p = 0.72" (F1, F2, ... as the SR's tracking identifiers and the heatmap number them)."""
    if finding is None:
        return f"F{number}: Fracture"
    return f"F{number}: Fracture, {finding.decision}, p = {finding.probability:.2f}"


def region_label(region: Region, number: int) -> str:
    """"A1: Abnormal region, score 0.59"."""
    return f"A{number}: Abnormal region, score {region.score:.2f}"


def boxes(result: ImageResult) -> list[Box]:
    """The boxes to draw for one processed image: the regions every report of it shows
    (:meth:`ImageResult.reported_regions`), numbered per kind as the SR and the heatmap number them."""
    out: list[Box] = []
    numbers: dict[str, int] = {}
    fracture = result.fracture
    for region in result.reported_regions():
        numbers[region.source] = k = numbers.get(region.source, 0) + 1
        box = _clipped(region.box, result)
        if region.source == "fracture":
            dotted = fracture is None or fracture.decision != "definite"
            out.append(Box(enum.LAYER_FRACTURE, box, fracture_label(fracture, k), dotted, region, k))
        else:
            out.append(Box(enum.LAYER_REGIONS, box, region_label(region, k), False, region, k))
    return out


def _clipped(box: tuple[float, float, float, float], result: ImageResult) -> tuple[float, float, float, float]:
    return sr_content.polyline_box(sr_content.box_polyline(box, result.rows, result.columns))


def findings_lines(result: ImageResult) -> list[str]:
    """The parts of the capture's findings line (:func:`dicom_node.sc.content.findings_line`), one per finding,
    "not localised" after a positive call that no box localises: one line of all of them would be wider than
    most images at a legible size."""
    unboxed = {f.name for f in result.not_localised()}
    parts = [sc_content.binary_text(f, f.name not in unboxed) if isinstance(f, BinaryFinding)
             else sc_content.categorical_text(f) for f in result.findings()]
    return parts or [sc_content.findings_line(result)]


def text_lines(result: ImageResult, model: ModelInfo) -> list[str]:
    """The image's findings (in the capture's wording, a line each) and the use statement."""
    return [*findings_lines(result), sr_content.use_statement(model)]


# -- layers and annotations -------------------------------------------------------------------------------------
def _colour(rgb: tuple[int, int, int]) -> hd.color.CIELabColor:
    return hd.color.CIELabColor.from_rgb(*rgb)


def layer_colours(result: ImageResult) -> dict[str, tuple[int, int, int]]:
    fracture = result.fracture
    definite = fracture is not None and fracture.decision == "definite"
    fracture_colour = enum.FRACTURE_DEFINITE if definite else enum.FRACTURE_SUSPECTED
    has_fracture_box = any(b.layer == enum.LAYER_FRACTURE for b in boxes(result))
    return {enum.LAYER_REGIONS: enum.REGIONS, enum.LAYER_FRACTURE: fracture_colour, enum.LAYER_TEXT: enum.TEXT,
            enum.LAYER_OVERLAY: fracture_colour if has_fracture_box else enum.REGIONS}


def graphic_layers(result: ImageResult, used: Sequence[str]) -> list[hd.pr.GraphicLayer]:
    """The layers ``used``, with their order, description, CIELab colour and a grayscale value."""
    colours = layer_colours(result)
    out = []
    for name in sorted(set(used), key=enum.LAYER_ORDER.__getitem__):
        layer = hd.pr.GraphicLayer(layer_name=name, order=enum.LAYER_ORDER[name],
                                   description=enum.LAYER_DESCRIPTIONS[name], display_color=_colour(colours[name]))
        # for monochrome displays (and renderers that burn overlays in grey): white
        layer.GraphicLayerRecommendedDisplayGrayscaleValue = enum.GRAYSCALE
        out.append(layer)
    return out


def box_objects(b: Box, rows: int, columns: int) -> list[hd.pr.GraphicObject]:
    """A closed POLYLINE for a solid box, one 2-point POLYLINE per dash for a dotted one."""
    polyline = sr_content.box_polyline(b.box, rows, columns)
    parts = dashes(polyline, dash_length(rows, columns)) if b.dotted else [polyline]
    return [hd.pr.GraphicObject(graphic_type=POLYLINE, graphic_data=p, units=PIXEL) for p in parts]


def label_object(b: Box, rows: int, columns: int) -> hd.pr.TextObject:
    """The box's label on one line next to it: a fracture's above the box, a region's below it (so that the two
    labels of a fracture box that is also an anomaly region do not cover each other), on the other side when
    there is no room."""
    h = text_height(rows, columns)
    x0, y0, _, y1 = b.box
    above, below = y0 - h - 2, y1 + 2
    if b.layer == enum.LAYER_FRACTURE:
        top = above if above >= 0 else below
    else:
        top = below if below + h <= rows else above
    return hd.pr.TextObject(text_value=b.label, units=PIXEL, bounding_box=text_box(b.label, x0, top, rows, columns, h),
                            text_justification=hd.pr.TextJustificationValues.LEFT)


def findings_objects(lines: Sequence[str], rows: int, columns: int) -> list[hd.pr.TextObject]:
    """The text lines, one below the other from the top-left corner of the image."""
    h = text_height(rows, columns)
    out = []
    for i, line in enumerate(lines):
        bbox = text_box(line, h / 2, h / 2 + i * h * 1.2, rows, columns, h)
        out.append(hd.pr.TextObject(text_value=line[:1024], units=PIXEL, bounding_box=bbox,
                                    text_justification=hd.pr.TextJustificationValues.LEFT))
    return out


def graphic_annotations(ds: Dataset, result: ImageResult, model: ModelInfo
                ) -> tuple[list[hd.pr.GraphicAnnotation], list[hd.pr.GraphicLayer], list[Box]]:
    """Graphic annotations (one per layer used) on ``ds``, their layers, and the boxes drawn."""
    rows, columns = int(ds.Rows), int(ds.Columns)
    drawn = boxes(result)
    per_layer: dict[str, tuple[list, list]] = {}
    for b in drawn:
        graphics, texts = per_layer.setdefault(b.layer, ([], []))
        graphics += box_objects(b, rows, columns)
        texts.append(label_object(b, rows, columns))
    per_layer[enum.LAYER_TEXT] = ([], findings_objects(text_lines(result, model), rows, columns))
    layers = graphic_layers(result, [*per_layer, *([enum.LAYER_OVERLAY] if drawn else [])])
    by_name = {layer.GraphicLayer: layer for layer in layers}
    out = [hd.pr.GraphicAnnotation(referenced_images=[ds], graphic_layer=by_name[name],
                                   graphic_objects=graphics or None, text_objects=texts or None)
           for name, (graphics, texts) in sorted(per_layer.items(), key=lambda kv: enum.LAYER_ORDER[kv[0]])]
    return out, layers, drawn


# -- overlays --------------------------------------------------------------------------------------------------------
def box_bitmap(drawn: Sequence[Box], rows: int, columns: int) -> np.ndarray:
    """The boxes' outlines as a uint8 0/1 bitmap of the image's size: the POLYLINE segments of
    :func:`box_objects` (the dashes of a dotted box included) rasterised as lines drawn inside the box's
    edges, a fraction of the image's long side wide."""
    width = max(1, int(round(long_side(rows, columns) * enum.OVERLAY_LINE_FRACTION)))
    out = np.zeros((rows, columns), dtype=np.uint8)
    for b in drawn:
        x0, y0, x1, y1 = b.box
        w = max(1, min(width, int((x1 - x0) // 2), int((y1 - y0) // 2)))
        for obj in box_objects(b, rows, columns):
            pts = np.asarray(obj.GraphicData, dtype=np.float64).reshape(-1, 2)
            for (ax, ay), (bx, by) in zip(pts[:-1], pts[1:]):
                lo_x, hi_x = int(np.floor(min(ax, bx))), int(np.ceil(max(ax, bx)))
                lo_y, hi_y = int(np.floor(min(ay, by))), int(np.ceil(max(ay, by)))
                if ay == by:  # horizontal: the rows just inside the top or bottom edge
                    r0 = int(np.floor(y0)) if ay == y0 else int(np.ceil(y1)) - w
                    out[r0:r0 + w, lo_x:hi_x] = 1
                else:  # vertical: the columns just inside the left or right edge
                    c0 = int(np.floor(x0)) if ax == x0 else int(np.ceil(x1)) - w
                    out[lo_y:hi_y, c0:c0 + w] = 1
    return out


def overlay_elements(pr: Dataset, drawn: Sequence[Box], rows: int, columns: int) -> bool:
    """Add the boxes as one graphic overlay (Overlay Plane and Overlay Activation modules) activated on the
    layer :data:`~dicom_node.pr.enum.LAYER_OVERLAY`: the part of the image the boxes cover, placed by its
    Overlay Origin. False when there is no box."""
    if not drawn:
        return False
    full = box_bitmap(drawn, rows, columns)
    on_rows, on_columns = np.flatnonzero(full.any(axis=1)), np.flatnonzero(full.any(axis=0))
    top, left = int(on_rows[0]), int(on_columns[0])
    bitmap = full[top:int(on_rows[-1]) + 1, left:int(on_columns[-1]) + 1]
    group = enum.OVERLAY_GROUP
    pr.add_new((group, 0x0010), "US", bitmap.shape[0])            # Overlay Rows
    pr.add_new((group, 0x0011), "US", bitmap.shape[1])            # Overlay Columns
    pr.add_new((group, 0x0022), "LO", enum.LAYER_DESCRIPTIONS[enum.LAYER_OVERLAY][:64])  # Overlay Description
    pr.add_new((group, 0x0040), "CS", "G")                        # Overlay Type: graphics
    pr.add_new((group, 0x0050), "SS", [top + 1, left + 1])        # Overlay Origin: row, column (1-based)
    pr.add_new((group, 0x0100), "US", 1)                          # Overlay Bits Allocated
    pr.add_new((group, 0x0102), "US", 0)                          # Overlay Bit Position
    pr.add_new((group, 0x1001), "CS", enum.LAYER_OVERLAY)         # Overlay Activation Layer
    pr.add_new((group, 0x1500), "LO", "AI BOXES")                 # Overlay Label
    pr.add_new((group, 0x3000), "OW", pack_bits(bitmap.ravel()))  # Overlay Data
    return True
