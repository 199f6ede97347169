"""Pixels of the node's secondary captures, rendered with Pillow.

- :func:`render_heatmap`: the radiograph as a person sees it, the model's map
  blended over it, fracture boxes (solid = definite, dotted = suspected), and a
  panel below with the burned-in model name and version, the findings in a line,
  a colour legend and "AI RESULT - NOT FOR DIAGNOSTIC USE".
- :func:`render_summary`: one page with a table of the findings of every image.

Both return ``uint8 (rows, columns, 3)`` RGB arrays whose long side is at most
:data:`dicom_node.sc.enum.MAX_SIDE`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dicom_node.errors import EncodingError
from dicom_node.sc import enum
from inference.results import BinaryFinding, CategoricalFinding, ImageResult, ModelInfo


# -- fonts and colours ------------------------------------------------------------------------------------
@cache
def _font_dir() -> Path | None:
    try:
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
        return path if (path / enum.FONT_REGULAR).exists() else None
    except Exception:
        return None


@lru_cache(maxsize=64)
def font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    d = _font_dir()
    if d is not None:
        return ImageFont.truetype(str(d / (enum.FONT_BOLD if bold else enum.FONT_REGULAR)), size)
    return ImageFont.load_default(size)


@lru_cache(maxsize=4)
def colour_lut(name: str = enum.COLOUR_MAP) -> np.ndarray:
    """256x3 uint8 lookup table of a matplotlib colour map."""
    import matplotlib

    cmap = matplotlib.colormaps[name]
    return np.rint(cmap(np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)


# -- text of findings ------------------------------------------------------------------------------------
def _pretty(name: str) -> str:
    pretty = {"kl_grade": "KL grade", "tumour": "Tumour", "tumor": "Tumour"}
    return pretty.get(name, name.replace("_", " ").capitalize())


def binary_text(f: BinaryFinding, localised: bool = True) -> str:
    """"Fracture: DEFINITE (p=0.72)"; a positive call no region localises adds "not localised"."""
    word = f.decision.upper() if f.decision != "absent" else "absent"
    where = "" if localised or f.decision == "absent" else ", not localised"
    return f"{_pretty(f.name)}: {word} (p={f.probability:.2f}{where})"


def categorical_text(f: CategoricalFinding) -> str:
    return f"{_pretty(f.name)}: {f.shown} ({f.confidence:.2f})"


def findings_line(result: ImageResult) -> str:
    """All findings of one image in one line (the burned-in findings text)."""
    if not result.processed:
        return f"NOT PROCESSED: {result.reason or 'unknown reason'}"
    unboxed = {f.name for f in result.not_localised()}
    parts = [binary_text(f, f.name not in unboxed) if isinstance(f, BinaryFinding) else categorical_text(f)
             for f in result.findings()]
    return "   ".join(parts) if parts else "no findings reported"


# -- geometry --------------------------------------------------------------------------------------------
def _wrap(draw: ImageDraw.ImageDraw, text: str, fnt, width: float) -> list[str]:
    words = text.split(" ")
    lines, line = [], ""
    for w in words:
        trial = f"{line} {w}" if line else w
        if draw.textlength(trial, font=fnt) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = w
    if line:
        lines.append(line)
    return lines


def _dotted_rectangle(draw: ImageDraw.ImageDraw, box, colour, width: int) -> None:
    x0, y0, x1, y1 = box
    dash = max(3 * width, 6)
    for (ax, ay, bx, by) in ((x0, y0, x1, y0), (x1, y0, x1, y1), (x1, y1, x0, y1), (x0, y1, x0, y0)):
        length = float(np.hypot(bx - ax, by - ay))
        if length == 0:
            continue
        n = int(length // (2 * dash)) + 1
        for i in range(n):
            t0 = (2 * i * dash) / length
            t1 = min(1.0, (2 * i * dash + dash) / length)
            if t0 >= 1.0:
                break
            draw.line([(ax + (bx - ax) * t0, ay + (by - ay) * t0), (ax + (bx - ax) * t1, ay + (by - ay) * t1)],
                      fill=colour, width=width)


@dataclass(frozen=True)
class Layout:
    scale: float
    width: int
    image_height: int
    panel_height: int
    font_size: int
    max_side: int = enum.MAX_SIDE

    @property
    def height(self) -> int:
        return self.image_height + self.panel_height

    @property
    def canvas_width(self) -> int:
        """At least MIN_PANEL_WIDTH so that the text fits beside a very narrow image."""
        return min(self.max_side, max(self.width, enum.MIN_PANEL_WIDTH))


def _panel_height(font_size: int, n_text_lines: int) -> int:
    line = int(font_size * 1.35)
    return line * n_text_lines + int(font_size * 3.8) + font_size  # text, two legend rows, margins


def layout(rows: int, columns: int, n_text_lines: int = 3, max_side: int = enum.MAX_SIDE) -> Layout:
    """Scale of the image and size of the panel so that the long side is within MIN_SIDE..``max_side``
    (MAX_SIDE for the captures the node sends; less for a preview, e.g. ``dicom-node infer``'s PNG)."""
    if not enum.MIN_PANEL_WIDTH <= max_side <= enum.MAX_SIDE:
        raise EncodingError(f"a capture's long side must be {enum.MIN_PANEL_WIDTH}..{enum.MAX_SIDE} pixels, "
                            f"not {max_side}")
    min_side = min(enum.MIN_SIDE, max_side)
    long_side = max(rows, columns)
    scale = min(1.0, max_side / long_side)
    if long_side * scale < min_side:
        scale = min_side / long_side
    for _ in range(20):
        width = max(1, int(round(columns * scale)))
        image_height = max(1, int(round(rows * scale)))
        font_size = int(np.clip(max(width, image_height) / 55, 14, 34))
        panel = _panel_height(font_size, n_text_lines)
        if max(width, image_height + panel) <= max_side:
            return Layout(scale, width, image_height, panel, font_size, max_side)
        # too tall with the panel: fit image + panel into max_side (the font, hence the panel, follows)
        scale = min(scale * 0.995, (max_side - panel) / float(rows))
    raise EncodingError(f"cannot lay out a {columns}x{rows} image within {max_side} pixels")


# -- heatmap ---------------------------------------------------------------------------------------------
#: the maps a heatmap can draw, in order of preference, with their names (legend: "<name> map")
_MAPS = (("fracture_map", "fracture localisation"), ("anomaly_map", "anomaly (reconstruction error)"))


def choose_map(result: ImageResult, size: tuple[int, int] | None = None) -> tuple[np.ndarray | None, str]:
    """The map drawn on the heatmap: the fracture map if there is one, else the anomaly map; in the source
    geometry, or at ``size`` (height, width: the capture's image part), made there directly where the model
    keeps the map on its grid (:class:`inference.preprocess.SourceMap`), else resized bilinearly."""
    for attr, label in _MAPS:
        arr = getattr(result, attr)
        if arr is not None:
            if tuple(arr.shape) != (result.rows, result.columns):
                raise EncodingError(f"{label} map has shape {tuple(arr.shape)}, the image is "
                                    f"{(result.rows, result.columns)}")
            if size is None or tuple(size) == (result.rows, result.columns):
                out = np.asarray(arr, dtype=np.float32)
            elif hasattr(arr, "at"):
                out = arr.at(*size)
            else:
                out = np.asarray(Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32)).resize(
                    (size[1], size[0]), Image.Resampling.BILINEAR))
            return np.nan_to_num(np.clip(out, 0.0, 1.0)), label
    return None, ""


def map_label(result: ImageResult) -> str:
    """The name of the map :func:`choose_map` draws ("" for none), without making the map."""
    return next((label for attr, label in _MAPS if getattr(result, attr) is not None), "")


def blend(display: np.ndarray, heat: np.ndarray | None) -> np.ndarray:
    """Greyscale uint8 image with the colour-mapped ``heat`` (0..1, same shape) blended over it."""
    out = np.repeat(np.asarray(display, dtype=np.uint8)[..., None], 3, axis=2)
    if heat is None:
        return out
    # only where the map is above its floor does the overlay show (elsewhere its opacity is 0 and the
    # radiograph stays as it is): blend those pixels only, most of the image is untouched
    where = heat > enum.MAP_FLOOR
    if not where.any():
        return out
    h = heat[where]
    grey = display[where].astype(np.float32)[:, None]
    colour = colour_lut()[np.clip(np.rint(h * 255), 0, 255).astype(np.int64)].astype(np.float32)
    ramp = np.clip((h - enum.MAP_FLOOR) / (1.0 - enum.MAP_FLOOR), 0.0, 1.0)
    alpha = (enum.MAX_ALPHA * ramp)[:, None].astype(np.float32)
    out[where] = np.clip(np.rint(grey * (1.0 - alpha) + colour * alpha), 0, 255).astype(np.uint8)
    return out


def heatmap_layout(result: ImageResult, model: ModelInfo, title: str = "", max_side: int = enum.MAX_SIDE
                   ) -> tuple[Layout, list[str]]:
    """Layout of a heatmap and its burned-in text lines: the use statement, model name and version (and
    ``title``), then the findings line wrapped to the width; the long side at most ``max_side``."""
    probe = ImageDraw.Draw(Image.new("RGB", (8, 8)))
    head = [use_statement(model), f"{model.name} {model.version}" + (f"   {title}" if title else "")]
    n = len(head) + 1
    for _ in range(4):  # the panel's height changes the scale, which changes the wrapping
        lay = layout(result.rows, result.columns, n, max_side)
        body = _wrap(probe, findings_line(result), font(lay.font_size), lay.canvas_width - 2 * lay.font_size)
        if len(head) + len(body) == n:
            break
        n = len(head) + len(body)
    lay = layout(result.rows, result.columns, len(head) + len(body), max_side)
    return lay, head + body


def use_statement(model: ModelInfo) -> str:
    return "AI RESULT" if model.for_diagnostic_use else enum.NOT_FOR_DIAGNOSTIC_USE


def capture_side(rows: int, columns: int, max_side: int = enum.MAX_SIDE) -> int:
    """The most pixels the image part of a heatmap capture of a ``columns`` x ``rows`` image has on its long
    side (the layout with the fewest text lines) when the capture's long side is at most ``max_side``: a
    reduced-resolution decode whose long side is at least this is all the capture needs
    (:func:`inference.pixels.displayed` with ``min_long_side``)."""
    lay = layout(rows, columns, 3, max_side)  # the use statement, the model line, one findings line
    return max(lay.width, lay.image_height)


def _same_image(shape: tuple[int, ...], rows: int, columns: int) -> bool:
    """Whether an image of ``shape`` is the ``rows`` x ``columns`` image or a reduced-resolution decode of it
    (1/2**k of each side, rounded up: JPEG 2000 levels, JPEG DCT scaling)."""
    if len(shape) != 2:
        return False
    if tuple(shape) == (rows, columns):
        return True
    h, w = shape
    for k in range(1, 6):
        p = 1 << k
        if abs(h - -(-rows // p)) <= 1 and abs(w - -(-columns // p)) <= 1:
            return True
    return False


def render_heatmap(display: np.ndarray, result: ImageResult, model: ModelInfo, title: str = "",
                   max_side: int = enum.MAX_SIDE) -> np.ndarray:
    """The heatmap secondary capture's pixels for one processed image (see the module docstring), its long
    side at most ``max_side`` (MAX_SIDE: the capture the node sends)."""
    if not result.processed:
        raise EncodingError("no heatmap for an image that was not processed")
    display = np.asarray(display)
    if display.dtype != np.uint8 or not _same_image(display.shape, result.rows, result.columns):
        raise EncodingError(f"display image {display.shape} {display.dtype} does not match the result "
                            f"({result.rows}, {result.columns}) uint8")
    lay, text_lines = heatmap_layout(result, model, title, max_side)
    heat_small, map_label = choose_map(result, (lay.image_height, lay.width))  # the map at the capture's size
    if display.shape != (result.rows, result.columns) and max(display.shape) < max(lay.width, lay.image_height):
        raise EncodingError(f"display image {display.shape} is a reduced decode smaller than the capture "
                            f"({lay.image_height}, {lay.width})")
    fnt = font(lay.font_size)
    bold = font(lay.font_size, bold=True)

    size = (lay.width, lay.image_height)
    img = Image.fromarray(display).resize(size, Image.Resampling.LANCZOS if lay.scale < 1 else
                                          Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (lay.canvas_width, lay.height), enum.PANEL)
    canvas.paste(Image.fromarray(blend(np.asarray(img), heat_small)), (0, 0))
    draw = ImageDraw.Draw(canvas)

    # every region the SR reports for this image (ImageResult.reported_regions), tagged as the SR's tracking
    # identifiers number them: fracture boxes solid for definite, dotted for suspected; anomaly regions thin
    line_width = max(2, lay.canvas_width // 400)
    tag_font = font(max(12, lay.font_size), bold=True)
    numbers: dict[str, int] = {}
    numbered = []
    for region in result.reported_regions():
        numbers[region.source] = k = numbers.get(region.source, 0) + 1
        numbered.append((region, k))
    # anomaly regions first, so that a fracture box on the same place stays visible above them
    for region, k in sorted(numbered, key=lambda rk: rk[0].source == "fracture"):
        x0, y0, x1, y1 = (v * lay.scale for v in region.box)
        x0, y0 = max(0.0, x0), max(0.0, y0)
        x1, y1 = min(float(lay.width - 1), x1 - 1), min(float(lay.image_height - 1), y1 - 1)
        box = (x0, y0, max(x0 + 1, x1), max(y0 + 1, y1))
        if region.source == "fracture":
            definite = result.fracture is not None and result.fracture.decision == "definite"
            colour = enum.DEFINITE if definite else enum.SUSPECTED
            if definite:
                draw.rectangle(box, outline=colour, width=line_width)
            else:
                _dotted_rectangle(draw, box, colour, line_width)
            tag = f"F{k}"
        else:
            colour = enum.ANOMALY
            draw.rectangle(box, outline=colour, width=max(1, line_width // 2))
            tag = f"A{k}"
        tag_px = int(getattr(tag_font, "size", 12))
        ty = box[1] - tag_px - 4 if box[1] >= tag_px + 4 else box[3] + 2
        tx = box[0] + 2 if region.source == "fracture" else max(box[0] + 2, box[2] - 2 * tag_px)
        draw.text((tx, min(ty, lay.image_height - tag_px - 2)), tag, font=tag_font, fill=colour)

    # panel: warning, model and findings, legend
    pad = lay.font_size
    line = int(lay.font_size * 1.35)
    y = lay.image_height + pad // 2
    draw.text((pad, y), text_lines[0], font=bold, fill=enum.WARNING_TEXT)
    y += line
    for t in text_lines[1:]:
        draw.text((pad, y), t, font=fnt, fill=enum.TEXT)
        y += line
    _legend(draw, pad, y + lay.font_size // 4, lay, fnt, map_label if heat_small is not None else "", line_width,
            anomaly=any(region.source != "fracture" for region, _ in numbered))
    return np.asarray(canvas, dtype=np.uint8)


def _legend(draw: ImageDraw.ImageDraw, x: int, y: int, lay: Layout, fnt, map_label: str, line_width: int,
            anomaly: bool = False) -> None:
    """Two rows: the colour bar with its map's name, then the box styles (the anomaly region's only where the
    image has one: a bundle whose anomaly map is not a localiser reports none)."""
    h = lay.font_size
    x_start = x
    if map_label:
        bar_w = max(100, lay.canvas_width // 5)
        lut = colour_lut()
        for i in range(bar_w):
            c = tuple(int(v) for v in lut[int(round(i * 255 / max(1, bar_w - 1)))])
            draw.line([(x + i, y), (x + i, y + h)], fill=c)
        small = font(max(10, h * 2 // 3))
        draw.text((x, y + h + 2), "0", font=small, fill=enum.TEXT)
        draw.text((x + bar_w - h // 2, y + h + 2), "1", font=small, fill=enum.TEXT)
        draw.text((x + bar_w + h // 2, y), f"{map_label} map", font=fnt, fill=enum.TEXT)
    y += int(h * 2.0)
    x = x_start
    sample = 2 * h
    draw.rectangle((x, y, x + sample, y + h), outline=enum.DEFINITE, width=line_width)
    x += sample + h // 2
    draw.text((x, y), "definite fracture", font=fnt, fill=enum.TEXT)
    x += int(draw.textlength("definite fracture", font=fnt)) + 2 * h
    _dotted_rectangle(draw, (x, y, x + sample, y + h), enum.SUSPECTED, line_width)
    x += sample + h // 2
    draw.text((x, y), "suspected fracture", font=fnt, fill=enum.TEXT)
    if not anomaly:
        return
    x += int(draw.textlength("suspected fracture", font=fnt)) + 2 * h
    draw.rectangle((x, y, x + sample, y + h), outline=enum.ANOMALY, width=max(1, line_width // 2))
    x += sample + h // 2
    draw.text((x, y), "anomaly region", font=fnt, fill=enum.TEXT)


# -- summary page ------------------------------------------------------------------------------------------
COLUMNS = ("#", "Instance", "Anatomy", "View", "Fracture", "Tumour", "KL grade", "Regions", "Status")
_WEIGHTS = (0.35, 0.9, 1.2, 1.2, 1.6, 1.4, 1.0, 1.3, 1.4)


def _cell(f, binary: bool) -> tuple[str, tuple[int, int, int]]:
    if f is None:
        return "-", enum.TEXT
    if binary:
        colour = {"definite": enum.DEFINITE, "suspected": enum.SUSPECTED}.get(f.decision, enum.ABSENT)
        return (f"{f.decision} ({f.probability:.2f})", colour)
    return f"{f.shown} ({f.confidence:.2f})", enum.TEXT


def _regions_cell(r: ImageResult) -> str:
    """The regions the SR reports for the image (as on its heatmap): "2 (1F 1A)", "0", or
    "0 (not localised)" when a positive call has no box."""
    regions = r.reported_regions()
    n_f = sum(1 for g in regions if g.source == "fracture")
    text = str(len(regions)) + (f" ({n_f}F {len(regions) - n_f}A)" if regions else "")
    return text + (" not localised" if r.not_localised() else "")


def summary_rows(results: Sequence[ImageResult], labels: Sequence[str]) -> list[list[tuple[str, tuple]]]:
    rows = []
    for i, (r, label) in enumerate(zip(results, labels), 1):
        if not r.processed:
            rows.append([(str(i), enum.TEXT), (label, enum.TEXT)] + [("-", enum.TEXT)] * 6
                        + [("NOT PROCESSED", enum.WARNING_TEXT)])
            rows.append([("", enum.TEXT), (f"reason: {r.reason or 'unknown'}", enum.WARNING_TEXT)])
            continue
        rows.append([(str(i), enum.TEXT), (label, enum.TEXT), _cell(r.anatomy, False), _cell(r.view, False),
                     _cell(r.fracture, True), _cell(r.tumour, True), _cell(r.kl_grade, False),
                     (_regions_cell(r), enum.TEXT), ("processed", enum.ABSENT)])
    return rows


def render_summary(results: Sequence[ImageResult], labels: Sequence[str], model: ModelInfo,
                   header: Sequence[str]) -> np.ndarray:
    """The summary page: a table of the findings per image (rows beyond the page are counted, not drawn)."""
    width, fs = 1600, 20
    fnt, bold = font(fs), font(fs, bold=True)
    big = font(int(fs * 1.4), bold=True)
    line = int(fs * 1.6)
    top = int(fs * 1.4 * 1.5) + line * (len(header) + 2) + fs
    max_rows = (enum.MAX_SIDE - top - 3 * line) // line
    rows = summary_rows(results, labels)
    shown = rows[:max_rows]
    hidden = sum(1 for row in rows[max_rows:] if len(row) > 2)  # images whose row is not on the page
    height = top + line * (len(shown) + 1) + (line if rows[max_rows:] else 0) + 3 * line
    canvas = Image.new("RGB", (width, min(enum.MAX_SIDE, height)), enum.PANEL)
    draw = ImageDraw.Draw(canvas)
    x0 = fs
    y = fs // 2
    draw.text((x0, y), use_statement(model), font=big, fill=enum.WARNING_TEXT)
    y += int(fs * 1.4 * 1.5)
    draw.text((x0, y), f"AI findings summary - {model.name} {model.version}", font=bold, fill=enum.TEXT)
    y += line
    for h in header:
        draw.text((x0, y), h, font=fnt, fill=enum.TEXT)
        y += line
    y += line // 2
    total = sum(_WEIGHTS)
    usable = width - 2 * fs
    xs = [x0]
    for w in _WEIGHTS[:-1]:
        xs.append(xs[-1] + int(usable * w / total))
    for x, name in zip(xs, COLUMNS):
        draw.text((x, y), name, font=bold, fill=enum.TEXT)
    y += line
    draw.line([(x0, y - 4), (width - fs, y - 4)], fill=enum.GRID, width=2)
    for row in shown:
        for k, (x, (text, colour)) in enumerate(zip(xs, row)):
            spans_row = len(row) == 2 and k == 1  # a reason line spans the rest of the row
            limit = ((xs[k + 1] if k + 1 < len(xs) and not spans_row else width - fs) - x - fs // 2)
            text = " ".join(text.split())  # one line per cell, whatever the text held
            while text and draw.textlength(text, font=fnt) > limit:
                text = text[:-2] + "…" if len(text) > 2 else ""
            draw.text((x, y), text, font=fnt, fill=colour)
        y += line
        draw.line([(x0, y - 4), (width - fs, y - 4)], fill=enum.GRID, width=1)
    if rows[max_rows:]:
        draw.text((x0, y), f"... {hidden} more image(s) not listed here: see the structured report", font=fnt,
                  fill=enum.WARNING_TEXT)
        y += line
    draw.text((x0, y + line // 2), "Fracture: definite = high-specificity operating point, suspected = "
              "high-sensitivity operating point.", font=font(16), fill=enum.TEXT)
    tags = "F = fracture, A = anomaly" if any(g.source != "fracture" for r in results if r.processed
                                              for g in r.reported_regions()) else "F = fracture"
    draw.text((x0, y + line // 2 + 22), "Regions: the boxes on each image's heatmap and in the structured report "
              f"({tags}); \"not localised\": a positive call without a box.", font=font(16), fill=enum.TEXT)
    return np.asarray(canvas, dtype=np.uint8)
