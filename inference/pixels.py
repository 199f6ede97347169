"""Pixel data out of a DICOM dataset: decoded values and the image as a person sees it.

No torch in here. Two functions, and two for image files (the ``infer`` command's input and output):

- :func:`decode_pixels`: the stored values of the first frame with the modality
  LUT (or rescale slope/intercept) applied, colour images turned to grey; float32
  ``(rows, columns)``.
- :func:`display_uint8`: what a viewer would show: VOI LUT or window applied
  (a robust percentile window when there is none, when the image is FOR
  PROCESSING, or when the recorded window is unusable), MONOCHROME1 inverted so
  that bone is bright; uint8 ``(rows, columns)``.

Both raise :class:`inference.errors.ImageNotProcessable` with a reason when the
image cannot be used (no pixel data, undecodable, unsupported photometric
interpretation, not two-dimensional).

- :func:`load_image_file`: the displayed image of a JPEG, PNG or DICOM file.
- :func:`overlay_png`: an image with a heatmap and boxes drawn over it, as a PNG.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inference.errors import ImageNotProcessable

GREY = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "PALETTE COLOR")

#: percentiles of the robust fallback window
FALLBACK_PERCENTILES = (0.5, 99.5)


def _photometric(ds) -> str:
    pi = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if not pi:
        raise ImageNotProcessable("PhotometricInterpretation is missing")
    if pi not in GREY and pi not in COLOUR:
        raise ImageNotProcessable(f"unsupported PhotometricInterpretation {pi!r}")
    return pi


def _first_frame(ds, min_long_side: int | None = None):
    """Decoded stored values of the first frame (RGB for colour images); with ``min_long_side``, of
    a greyscale image, possibly at a reduced resolution (see :mod:`inference.reduced`)."""
    from pydicom.pixels import pixel_array

    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageNotProcessable("the dataset has no pixel data")
    if min_long_side is not None and _photometric(ds) in GREY:
        from inference.reduced import reduced_frame

        reduced = reduced_frame(ds, min_long_side)
        if reduced is not None:
            return reduced
    try:
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        n_frames = 1
    try:
        if n_frames > 1:
            arr = pixel_array(ds, index=0)
        else:
            arr = ds.pixel_array
    except Exception as exc:  # pydicom raises many kinds for undecodable data
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        ts_name = getattr(ts, "name", str(ts)) if ts is not None else "unknown transfer syntax"
        raise ImageNotProcessable(f"pixel data cannot be decoded ({ts_name}): {type(exc).__name__}: {exc}") from exc
    return np.asarray(arr)


def _to_grey(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.float32)
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


def decode_pixels(ds, min_long_side: int | None = None) -> np.ndarray:
    """First frame of ``ds`` as float32 ``(rows, columns)``, modality LUT applied, colour made grey.

    ``min_long_side``: a smaller image will do, as long as its long side is at least this many
    pixels; JPEG 2000 and JPEG images are then decoded at a reduced resolution where the codec
    allows it (:mod:`inference.reduced`), the same modality LUT applied to the reduced values. The
    result then has fewer rows and columns than the dataset says: the caller scales coordinates."""
    pi = _photometric(ds)
    arr = _first_frame(ds, min_long_side)
    if pi == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        try:
            arr = apply_color_lut(arr, ds)
        except Exception as exc:
            raise ImageNotProcessable(f"palette colour lookup failed: {exc}") from exc
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise ImageNotProcessable(f"palette colour image has unexpected shape {arr.shape}")
        return np.ascontiguousarray(_to_grey(arr), dtype=np.float32)
    if pi in COLOUR:
        # pydicom converts YBR to RGB when decoding (as_rgb defaults to True)
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise ImageNotProcessable(f"colour image has unexpected shape {arr.shape}")
        return np.ascontiguousarray(_to_grey(arr), dtype=np.float32)
    if arr.ndim != 2:
        raise ImageNotProcessable(f"greyscale image is not two-dimensional (shape {arr.shape})")
    if arr.size == 0:
        raise ImageNotProcessable("the image is empty")
    from pydicom.pixels import apply_modality_lut

    try:
        out = apply_modality_lut(arr, ds)
    except Exception as exc:
        raise ImageNotProcessable(f"modality LUT cannot be applied: {exc}") from exc
    out = np.asarray(out, dtype=np.float32)
    if not np.isfinite(out).all():
        out = np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
    return np.ascontiguousarray(out)


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing, output 0..1."""
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / max(width, 1e-6)))
    if function == "LINEAR_EXACT":
        lo, hi = center - width / 2.0, center + width / 2.0
    else:  # LINEAR
        width = max(width, 1.0)
        lo, hi = center - 0.5 - (width - 1.0) / 2.0, center - 0.5 + (width - 1.0) / 2.0
    if hi <= lo:
        return (values > center).astype(np.float32)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0)


def _first_number(value) -> float | None:
    if value is None:
        return None
    try:
        if isinstance(value, (list, tuple)) or hasattr(value, "__len__") and not isinstance(value, (str, bytes)):
            value = value[0]
        return float(value)
    except (TypeError, ValueError, IndexError):
        return None


def percentile_bounds(values: np.ndarray, lo_pct: float = FALLBACK_PERCENTILES[0],
                      hi_pct: float = FALLBACK_PERCENTILES[1]) -> tuple[float, float]:
    """The values at two percentiles of the image (subsampled for speed), min and max when they coincide."""
    flat = values.ravel()
    step = max(1, flat.size // 1_000_000)
    lo, hi = (float(v) for v in np.percentile(flat[::step], [lo_pct, hi_pct]))
    if hi <= lo:
        lo, hi = float(flat.min()), float(flat.max())
    return lo, hi


def percentile_window(values: np.ndarray, lo_pct: float = FALLBACK_PERCENTILES[0],
                      hi_pct: float = FALLBACK_PERCENTILES[1]) -> np.ndarray:
    """Linear window between two percentiles of the image (subsampled for speed), output 0..1."""
    lo, hi = percentile_bounds(values, lo_pct, hi_pct)
    if hi <= lo:
        return np.zeros_like(values, dtype=np.float32)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _usable(display: np.ndarray) -> bool:
    """A window is unusable when nearly every pixel ends up black or white."""
    sub = display.ravel()[:: max(1, display.size // 200_000)]
    inside = np.mean((sub > 0.002) & (sub < 0.998))
    return bool(inside >= 0.05)


def _voi(ds, values: np.ndarray) -> np.ndarray | None:
    """Apply the dataset's own VOI (LUT or first window) -> 0..1, or None when it has none usable."""
    if str(ds.get("PresentationIntentType", "") or "").upper() == "FOR PROCESSING":
        return None
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        item = ds.VOILUTSequence[0]
        try:
            desc = [int(v) for v in item.LUTDescriptor]
            n_entries = desc[0] or 65536
            first = desc[1]
            lut = np.asarray(item.LUTData, dtype=np.float32).ravel()
            if lut.size >= n_entries and n_entries > 1:
                lut = lut[:n_entries]
                idx = np.clip(np.rint(values) - first, 0, n_entries - 1).astype(np.int64)
                out = lut[idx]
                lo, hi = float(lut.min()), float(lut.max())
                if hi > lo:
                    return (out - lo) / (hi - lo)
        except Exception:
            pass  # malformed LUT: fall back to the window or the percentiles
    center = _first_number(ds.get("WindowCenter"))
    width = _first_number(ds.get("WindowWidth"))
    if center is not None and width is not None and width > 0:
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR")
        return _window(values, center, width, function).astype(np.float32)
    return None


@dataclass(frozen=True)
class Displayed:
    """One decode of an image, as shown: ``image`` (uint8, bone bright; fewer rows and columns than the
    dataset after a reduced-resolution decode) and ``window``, what :func:`fallback_window` says of it
    (the percentile window fallen back to, in modality values; None: the image's own VOI, or colour).
    The captures and the presentation state of an image are made from one of these."""

    image: np.ndarray
    window: tuple[float, float] | None


def _display(ds, min_long_side: int | None) -> tuple[np.ndarray, tuple[float, float] | None]:
    pi = _photometric(ds)
    values = decode_pixels(ds, min_long_side)
    if pi in COLOUR:
        bits = int(ds.get("BitsStored", 8) or 8)
        if pi == "PALETTE COLOR":
            # palette entries are 8 or 16 bit regardless of BitsStored
            bits = 16 if float(values.max(initial=0)) > 255 else 8
        return np.clip(values / float(2 ** bits - 1), 0.0, 1.0).astype(np.float32), None
    window = None
    out = _voi(ds, values)
    if out is None or not _usable(out):
        window = percentile_bounds(values)
        out = percentile_window(values)
    if pi == "MONOCHROME1":
        out = 1.0 - out
    return np.ascontiguousarray(out, dtype=np.float32), window


def display_float(ds, min_long_side: int | None = None) -> np.ndarray:
    """The displayed image as float32 0..1 (see :func:`display_uint8`)."""
    return _display(ds, min_long_side)[0]


def fallback_window(ds, min_long_side: int | None = None) -> tuple[float, float] | None:
    """Which VOI :func:`display_float` applies to a greyscale image: None when it is the image's own
    (VOI LUT or first window), else the (low, high) modality values of the percentile window it falls
    back to. Presentation states use it to show the image as the node's captures do (decoded as for
    them: ``min_long_side`` as in :func:`decode_pixels`)."""
    values = decode_pixels(ds, min_long_side)
    own = _voi(ds, values)
    if own is not None and _usable(own):
        return None
    return percentile_bounds(values)


def display_uint8(ds, min_long_side: int | None = None) -> np.ndarray:
    """The image as a person sees it, uint8 ``(rows, columns)``: VOI applied, bone bright.
    With ``min_long_side`` (see :func:`decode_pixels`), possibly smaller: the VOI, modality LUT and
    MONOCHROME1 inversion are the same functions of each value."""
    return np.rint(display_float(ds, min_long_side) * 255.0).astype(np.uint8)


def displayed(ds, min_long_side: int | None = None) -> Displayed:
    """:func:`display_uint8` and :func:`fallback_window` of ``ds`` from one decode."""
    out, window = _display(ds, min_long_side)
    return Displayed(np.rint(out * 255.0).astype(np.uint8), window)


def load_image_file(path: str | Path) -> np.ndarray:
    """A displayed greyscale image (uint8) from a JPEG/PNG, or from a DICOM file."""
    path = Path(path)
    if path.suffix.lower() in (".dcm", ".dicom"):
        import pydicom

        return display_uint8(pydicom.dcmread(path))
    from PIL import Image

    with Image.open(path) as im:
        im.load()  # truncated JPEGs raise here unless allowed
        return np.asarray(im.convert("L"))


def overlay_png(image: np.ndarray, heat: np.ndarray | None, path: Path, boxes=(), max_side: int = 1024) -> None:
    """The displayed image with a heatmap blended over it (and boxes), as a PNG, no matplotlib."""
    from PIL import Image, ImageDraw

    img = np.asarray(image)
    if img.dtype != np.uint8:
        img = np.rint(np.clip(img, 0, 1) * 255).astype(np.uint8)
    base = np.repeat(img[..., None], 3, axis=2).astype(np.float32)
    if heat is not None:
        h = np.clip(np.asarray(heat, dtype=np.float32), 0, 1)
        colour = np.stack([np.clip(3 * h, 0, 1), np.clip(3 * h - 1, 0, 1), np.clip(3 * h - 2, 0, 1)], -1) * 255
        alpha = (0.55 * np.clip(h * 1.5, 0, 1))[..., None]
        base = base * (1 - alpha) + colour * alpha
    pil = Image.fromarray(np.rint(base).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(pil)
    for (x0, y0, x1, y1), colour in boxes:
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=colour, width=max(1, img.shape[1] // 300))
    scale = max_side / max(pil.size)
    if scale < 1:
        pil = pil.resize((int(pil.size[0] * scale), int(pil.size[1] * scale)), Image.BILINEAR)
    pil.save(path)
