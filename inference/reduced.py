"""Reduced-resolution decoding: the first frame's stored values at 1/2, 1/4, ... of its size.

JPEG 2000 (and HTJ2K, whose transfer syntaxes also carry Part 1 codestreams) keeps the lower
resolutions in its wavelet levels, and baseline JPEG offers DCT scaling (1/2, 1/4, 1/8): a
decoder that stops there does a fraction of the work. The model reads 256-pixel images, so a
4-megapixel radiograph need not be decoded at full size for it.

:func:`reduced_frame` returns the stored values (the dtype pydicom's full decode gives, before
the modality LUT) of the smallest available level whose long side is still at least
``min_long_side``, or None where there is no reduced path, and the caller decodes in full:

- transfer syntaxes without one: uncompressed, deflated, RLE, JPEG-LS, JPEG lossless, and JPEG
  extended with 12 bits (Pillow's libjpeg is 8-bit);
- more than one sample per pixel (colour), more than 16 bits, a JPEG 2000 codestream with more
  than one component, or whose precision differs from Bits Stored;
- a JPEG 2000 codestream whose signedness differs from Pixel Representation: pydicom
  reinterprets such values bit by bit, which is exact only at full resolution (a wavelet average
  of wrapped-around values is not the wrapped-around average);
- any failure of the reduced decoder.

A JPEG 2000 image with no level small enough to help is decoded here at level 0 (full size) all
the same: Pillow's OpenJPEG decodes one image with several threads when ``OPJ_NUM_THREADS`` says
so (:func:`set_decoder_threads`), where pylibjpeg-openjpeg's build uses one; or, where the model
runs on CUDA and nvImageCodec is installed, on the GPU (:mod:`inference.gpu_decode`).

Decoding is Pillow's (OpenJPEG 2.5 for JPEG 2000, libjpeg-turbo for JPEG); at level 0 its JPEG 2000
values equal pylibjpeg-openjpeg's (the test suite checks it on RG1/RG3, 10 and 15 bits).
No torch, no DICOM networking in here.
"""

from __future__ import annotations

import io
import logging
import struct
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("inference.reduced")

#: transfer syntaxes whose codestreams keep lower resolutions (JPEG 2000 Part 1, HTJ2K)
J2K_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201",
                          "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"})
#: transfer syntaxes with DCT scaling (JPEG baseline and extended; 8-bit only through Pillow)
JPEG_DCT_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"})
#: the most a DCT decoder scales down: 1/8 (three halvings)
JPEG_MAX_LEVEL = 3


@dataclass(frozen=True)
class J2KHeader:
    """What the main header of a JPEG 2000 codestream says about its image."""

    x0: int  # image area on the reference grid: x0..x1, y0..y1
    y0: int
    x1: int
    y1: int
    components: int
    precision: int  # of the first component
    signed: bool
    levels: int  # decomposition levels (COD, or COC of component 0)

    def size_at(self, level: int) -> tuple[int, int]:
        """(columns, rows) of the image decoded at ``level`` (1/2**level): the reduced grid of
        ISO 15444-1 B.5, ceil(x1 / 2**r) - ceil(x0 / 2**r)."""
        p = 1 << level
        return -(-self.x1 // p) - -(-self.x0 // p), -(-self.y1 // p) - -(-self.y0 // p)


def parse_j2k_header(cs: bytes) -> J2KHeader | None:
    """The SIZ and COD (COC) values of a raw JPEG 2000 codestream; None if it is not one."""
    if len(cs) < 50 or cs[:4] != b"\xff\x4f\xff\x51":
        return None
    lsiz = struct.unpack(">H", cs[4:6])[0]
    x1, y1, x0, y0 = struct.unpack(">IIII", cs[8:24])
    csiz = struct.unpack(">H", cs[40:42])[0]
    if csiz < 1 or len(cs) < 42 + 3 * csiz:
        return None
    ssiz = cs[42]
    levels = None
    pos = 4 + lsiz  # the marker segments of the main header, up to the first tile-part (SOT)
    while pos + 4 <= len(cs):
        marker, length = struct.unpack(">HH", cs[pos:pos + 4])
        if marker == 0xFF90 or length < 2:  # SOT: the main header ends
            break
        seg = cs[pos + 4:pos + 2 + length]
        if marker == 0xFF52 and len(seg) >= 6:  # COD: Scod, SGcod (4), then SPcod: levels first
            levels = seg[5] if levels is None else levels
        elif marker == 0xFF53:  # COC: Ccoc (1 or 2 bytes), Scoc, SPcoc: levels first
            n = 1 if csiz < 257 else 2
            if len(seg) >= n + 2 and int.from_bytes(seg[:n], "big") == 0:
                levels = seg[n + 1]
        pos += 2 + length
    if levels is None:
        return None
    return J2KHeader(x0, y0, x1, y1, csiz, (ssiz & 0x7F) + 1, bool(ssiz & 0x80), levels)


def choose_level(columns: int, rows: int, min_long_side: int, max_level: int) -> int:
    """The largest level <= ``max_level`` whose long side, ceil(long / 2**level), is still at least
    ``min_long_side`` (0 when even level 1 is too small)."""
    long_side = max(columns, rows)
    level = 0
    while level < max_level and -(-long_side // (1 << (level + 1))) >= min_long_side:
        level += 1
    return level


def _first_fragment(ds) -> bytes:
    from pydicom.encaps import get_frame

    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    return bytes(get_frame(ds.PixelData, 0, number_of_frames=n_frames))


def _stored_dtype(ds) -> np.dtype:
    bits = int(ds.BitsAllocated)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    return np.dtype(f"{'i' if signed else 'u'}{1 if bits <= 8 else 2}")


def _j2k_header(ds, cs: bytes) -> J2KHeader | None:
    """The codestream's header when the reduced path applies to it (see the module docstring)."""
    head = parse_j2k_header(cs)
    if head is None or head.components != 1 or head.precision > 16:
        return None
    if head.precision != int(ds.BitsStored) or head.signed != (int(ds.get("PixelRepresentation", 0) or 0) == 1):
        return None  # pydicom reinterprets these bit by bit: exact only at full resolution
    if head.size_at(0) != (int(ds.Columns), int(ds.Rows)):
        return None
    return head


def _decode_j2k(ds, cs: bytes, min_long_side: int) -> np.ndarray | None:
    head = _j2k_header(ds, cs)
    if head is None:
        return None
    level = choose_level(*head.size_at(0), min_long_side, head.levels)
    if level == 0 and not head.signed:
        from inference.gpu_decode import gpu_decoder

        nv = gpu_decoder()  # nvImageCodec, where the model runs on CUDA and it is installed
        if nv is not None:
            try:
                values = nv.decode(cs, *head.size_at(0), head.precision, _stored_dtype(ds))
            except Exception as exc:  # noqa: BLE001 - decoded on the CPU below
                log.debug("nvImageCodec decoding not used (%s)", type(exc).__name__)
                values = None
            if values is not None:
                return values
    # level 0 too: Pillow's OpenJPEG decodes one image with several threads (OPJ_NUM_THREADS, see
    # :func:`set_decoder_threads`), pylibjpeg-openjpeg's with one; the values are the same
    return j2k_at_level(ds, cs, head, level)


def j2k_at_level(ds, cs: bytes, head: J2KHeader, level: int) -> np.ndarray | None:
    """Stored values of the JPEG 2000 codestream ``cs`` (of ``ds``) at ``level`` (0: full size)."""
    from PIL import Image, ImageFile

    with Image.open(io.BytesIO(cs), formats=["JPEG2000"]) as im:
        if im.mode not in ("L", "I;16"):
            return None
        # Pillow's own ``reduce`` rounds odd sizes differently from OpenJPEG (1841 / 4 -> 460, not 461)
        # and the decoder then fails: set the tile to the reduced grid of the standard
        size = head.size_at(level)
        tile = im.tile[0]
        args = tile[3]
        assert isinstance(args, tuple)
        im._size = size
        im.tile = [ImageFile._Tile(tile[0], (0, 0, *size), tile[2], (args[0], level, im.layers, *args[3:]))]
        ImageFile.ImageFile.load(im)
        raw = np.asarray(im)
    container = 8 if raw.dtype == np.uint8 else 16
    # Pillow scales the samples to its container and offsets signed ones by 2**(precision - 1)
    values = raw.astype(np.int32) >> (container - head.precision)
    if head.signed:
        values -= 1 << (head.precision - 1)
    return values.astype(_stored_dtype(ds))


def _decode_jpeg(ds, data: bytes, min_long_side: int) -> np.ndarray | None:
    from PIL import Image

    if int(ds.BitsStored) != 8 or int(ds.BitsAllocated) != 8 or int(ds.get("PixelRepresentation", 0) or 0):
        return None
    cols, rows = int(ds.Columns), int(ds.Rows)
    level = choose_level(cols, rows, min_long_side, JPEG_MAX_LEVEL)
    if level == 0:
        return None
    with Image.open(io.BytesIO(data), formats=["JPEG"]) as im:
        if im.mode != "L" or im.size != (cols, rows):
            return None
        p = 1 << level
        im.draft("L", (-(-cols // p), -(-rows // p)))
        im.load()
        if max(im.size) < min_long_side:
            return None
        return np.asarray(im, dtype=np.uint8)


def first_frame_at_level(ds, level: int) -> np.ndarray | None:
    """The first frame's stored values of a JPEG 2000 dataset at ``level`` through the reduced path's
    decoder (level 0: full size, to compare with pydicom's), None where the path does not apply."""
    if str(ds.file_meta.TransferSyntaxUID) not in J2K_SYNTAXES or int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return None
    cs = _first_fragment(ds)
    head = _j2k_header(ds, cs)
    if head is None or level > head.levels:
        return None
    return j2k_at_level(ds, cs, head, level)


def set_decoder_threads(threads: int) -> None:
    """Let OpenJPEG decode one JPEG 2000 image with ``threads`` threads (its ``OPJ_NUM_THREADS``, read
    each time a decoder is made); a value the administrator set in the environment is kept."""
    import os

    if threads > 1:
        os.environ.setdefault("OPJ_NUM_THREADS", str(int(threads)))


def reduced_frame(ds, min_long_side: int) -> np.ndarray | None:
    """The first frame's stored values decoded at the smallest level whose long side is at least
    ``min_long_side``, or None where no reduced path applies (see the module docstring)."""
    try:
        ts = str(ds.file_meta.TransferSyntaxUID)
    except AttributeError:
        return None
    if ts not in J2K_SYNTAXES and ts not in JPEG_DCT_SYNTAXES:
        return None
    try:
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1 or int(ds.BitsAllocated) > 16 or "PixelData" not in ds:
            return None
        data = _first_fragment(ds)
        if ts in J2K_SYNTAXES:
            return _decode_j2k(ds, data, min_long_side)
        return _decode_jpeg(ds, data, min_long_side)
    except Exception as exc:  # noqa: BLE001 - any trouble here: the full decoder decides
        # the error's type only: a decoder's or pydicom's text can quote a value
        log.debug("reduced decoding not used (%s); decoding in full", type(exc).__name__)
        return None


__all__ = ["J2KHeader", "parse_j2k_header", "choose_level", "reduced_frame", "set_decoder_threads",
           "first_frame_at_level", "J2K_SYNTAXES",
           "JPEG_DCT_SYNTAXES"]
