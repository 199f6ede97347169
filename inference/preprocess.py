"""The one image transform used at training and at inference, and its inverse for maps and boxes.

A displayed radiograph (uint8 or float 0..1, bone bright, any size) becomes a
square ``size x size`` float32 array: downscaled (area averaging) so that its
long side is ``size``, standardised to zero mean / unit variance over the image,
and centred on a square canvas whose padding is the image's black level.
:class:`Geometry` remembers the scale and offsets, so a map on the model's grid
goes back to the source rows/columns and a box in source pixels onto the grid.
No torch in here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

#: images with a side above this are halved (box filter) before anything else: a 4k x 4k
#: detector image costs no more than a 2k one
EARLY_DOWNSCALE_SIDE = 2048


@dataclass(frozen=True)
class Geometry:
    """Where the source image lies on the model's square canvas."""

    rows: int
    columns: int
    size: int
    scale: float  # canvas pixels per source pixel
    off_y: int  # canvas row of the source's top edge
    off_x: int  # canvas column of the source's left edge
    height: int  # rows the image covers on the canvas
    width: int  # columns the image covers on the canvas

    @classmethod
    def for_image(cls, rows: int, columns: int, size: int) -> Geometry:
        if rows < 1 or columns < 1:
            raise ValueError(f"empty image {rows}x{columns}")
        scale = size / max(rows, columns)
        h = max(1, min(size, int(round(rows * scale))))
        w = max(1, min(size, int(round(columns * scale))))
        return cls(rows, columns, size, scale, (size - h) // 2, (size - w) // 2, h, w)

    def box_to_canvas(self, box):
        x0, y0, x1, y1 = box
        sx, sy = self.width / self.columns, self.height / self.rows
        return (self.off_x + x0 * sx, self.off_y + y0 * sy, self.off_x + x1 * sx, self.off_y + y1 * sy)

    def box_to_source(self, box):
        x0, y0, x1, y1 = box
        sx, sy = self.columns / self.width, self.rows / self.height
        return (float(np.clip((x0 - self.off_x) * sx, 0, self.columns)),
                float(np.clip((y0 - self.off_y) * sy, 0, self.rows)),
                float(np.clip((x1 - self.off_x) * sx, 0, self.columns)),
                float(np.clip((y1 - self.off_y) * sy, 0, self.rows)))

    def map_to_source(self, grid: np.ndarray, rows: int | None = None, columns: int | None = None) -> np.ndarray:
        """A map over the canvas (any square resolution) -> float32 ``(rows, columns)``, bilinear: the source
        geometry, or (``rows``, ``columns`` given) the source image's area at that size (a display of it)."""
        rows = self.rows if rows is None else rows
        columns = self.columns if columns is None else columns
        grid = np.asarray(grid, dtype=np.float32)
        f = grid.shape[0] / self.size
        y0, x0 = self.off_y * f, self.off_x * f
        y1, x1 = (self.off_y + self.height) * f, (self.off_x + self.width) * f
        # separable bilinear interpolation at the output pixel centres (edge-clamped); gathers, no BLAS
        ly, hy, ty = _bilinear_taps(rows, y0, y1, grid.shape[0])
        lx, hx, tx = _bilinear_taps(columns, x0, x1, grid.shape[1])
        a = grid[ly] * (1.0 - ty)[:, None] + grid[hy] * ty[:, None]  # (rows, g)
        out = np.take(a, lx, axis=1)
        out *= (1.0 - tx)[None, :]
        out += np.take(a, hx, axis=1) * tx[None, :]
        return out


class SourceMap:
    """A map over the model's canvas, in the source geometry when it is read: ``shape`` (rows, columns) and
    float32 like the array it stands for, which is made (once) when something reads its values
    (``np.asarray(m)``, ``m.max()``...). :meth:`at` gives it directly at a display's size, so that a capture of a
    4-megapixel image never makes the full-size map only to shrink it."""

    __slots__ = ("_grid", "_geometry", "_full")

    def __init__(self, grid: np.ndarray, geometry: Geometry):
        self._grid = np.asarray(grid, dtype=np.float32)
        self._geometry = geometry
        self._full: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self._geometry.rows, self._geometry.columns)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)

    @property
    def ndim(self) -> int:
        return 2

    def at(self, rows: int, columns: int) -> np.ndarray:
        """The map over the source image's area at ``rows`` x ``columns`` pixels (bilinear from the grid)."""
        if (rows, columns) == self.shape:
            return self.full()
        return self._geometry.map_to_source(self._grid, rows, columns)

    def full(self) -> np.ndarray:
        if self._full is None:
            self._full = self._geometry.map_to_source(self._grid)
        return self._full

    def __array__(self, dtype=None, copy=None):
        full = self.full()
        return full if dtype is None else full.astype(dtype, copy=False)

    def __getattr__(self, name: str):
        if name.startswith("_"):  # pickling and copying look these up before __init__ has run
            raise AttributeError(name)
        return getattr(self.full(), name)

    def __getstate__(self):
        return (self._grid, self._geometry)

    def __setstate__(self, state) -> None:
        self._grid, self._geometry = state
        self._full = None


def _bilinear_taps(n_out: int, start: float, stop: float, n_in: int):
    """Lower index, upper index and weight of the upper one, sampling [start, stop) of an n_in axis
    at n_out pixel centres."""
    centres = start + (np.arange(n_out, dtype=np.float64) + 0.5) * (stop - start) / n_out - 0.5
    centres = np.clip(centres, 0.0, n_in - 1.0)
    lo = np.floor(centres).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (centres - lo).astype(np.float32)


def as_float_image(image: np.ndarray) -> np.ndarray:
    """uint8 0..255 or float 0..1 greyscale (or RGB, made grey) -> float32 0..1 (rows, cols)."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] in (3, 4):
        a = a[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        if np.asarray(image).dtype == np.uint8:
            a = a / 255.0
        return np.clip(a, 0, 1).astype(np.float32)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D greyscale image, got shape {a.shape}")
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype == np.uint16:
        return a.astype(np.float32) / 65535.0
    return np.clip(a.astype(np.float32), 0.0, 1.0)


def as_uint8_image(image: np.ndarray) -> np.ndarray:
    """Any accepted image (see :func:`as_float_image`) as uint8 0..255; uint8 greyscale passes through."""
    a = np.asarray(image)
    if a.dtype == np.uint8 and a.ndim == 2:
        return a
    return np.rint(as_float_image(a) * 255.0).astype(np.uint8)


def resize_to_canvas(image: np.ndarray, size: int, source_shape: tuple[int, int] | None = None
                     ) -> tuple[np.ndarray, Geometry]:
    """Image (uint8, or float 0..1) -> (size x size float32 canvas 0..1 with black padding, geometry).

    Works on 8 bits, as the training cache did: huge images are first halved (2x2 box) until
    their long side is at most ``EARLY_DOWNSCALE_SIDE``, then box-filtered to the canvas size.
    ``source_shape`` (rows, columns): the image is a reduced-resolution decode of an image of this
    size (:mod:`inference.reduced`); the geometry is the source's, so maps and boxes go back to it,
    and the image is box-filtered onto the part of the canvas the source would cover.
    """
    u8 = as_uint8_image(image)
    if u8.ndim != 2:
        raise ValueError(f"expected a 2-D greyscale image, got shape {u8.shape}")
    rows, cols = source_shape if source_shape is not None else u8.shape
    geo = Geometry.for_image(int(rows), int(cols), size)
    img = Image.fromarray(u8, mode="L")
    while max(img.size) > EARLY_DOWNSCALE_SIDE:
        img = img.reduce(2)
    small = np.asarray(img.resize((geo.width, geo.height), Image.BOX), dtype=np.float32) / 255.0
    canvas = np.zeros((size, size), dtype=np.float32)
    canvas[geo.off_y:geo.off_y + geo.height, geo.off_x:geo.off_x + geo.width] = small
    return canvas, geo


def standardise(canvas01: np.ndarray, geo: Geometry) -> np.ndarray:
    """Zero mean / unit variance over the image part of the canvas (padding gets the same transform)."""
    part = canvas01[geo.off_y:geo.off_y + geo.height, geo.off_x:geo.off_x + geo.width]
    mean, std = float(part.mean()), float(part.std())
    return ((canvas01 - mean) / max(std, 0.02)).astype(np.float32)


def prepare(image: np.ndarray, size: int, source_shape: tuple[int, int] | None = None
            ) -> tuple[np.ndarray, Geometry]:
    """Displayed image -> (model input float32 size x size, geometry); ``source_shape`` as in
    :func:`resize_to_canvas`."""
    canvas, geo = resize_to_canvas(image, size, source_shape)
    return standardise(canvas, geo), geo


def canvas_uint8(image: np.ndarray, size: int) -> tuple[np.ndarray, Geometry]:
    """Displayed image -> (uint8 canvas, geometry): what the training cache stores."""
    canvas, geo = resize_to_canvas(image, size)
    return np.rint(canvas * 255).astype(np.uint8), geo
