"""An image's declared size, read without decoding it: the defence against decompression bombs.

A compressed frame of a few kilobytes can declare 60000 x 60000 pixels: decoding it takes gigabytes.
Before anything decodes an image (at C-STORE time, and again before the pipeline reads a file), the
size it declares is checked:

- Rows x Columns x Number of Frames must not pass the limit (``limits.max_image_megapixels``);
- every frame's codestream header (JPEG 2000 and HTJ2K SIZ, JPEG SOFn, JPEG-LS SOF55), read from
  its first bytes, must declare the image's own Rows and Columns: a decoder allocates what the
  codestream says, not what the DICOM header says.

Only headers are parsed: nothing here allocates in proportion to a declared size.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments

#: transfer syntaxes whose frames hold a JPEG 2000 codestream (or a JP2 file)
J2K_SYNTAXES = frozenset({uid.JPEG2000Lossless, uid.JPEG2000, uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL, uid.HTJ2K})
#: transfer syntaxes whose frames hold a JPEG (ISO 10918-1) or JPEG-LS (ISO 14495-1) codestream
JPEG_SYNTAXES = frozenset({uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLossless, uid.JPEGLosslessSV1,
                           uid.JPEGLSLossless, uid.JPEGLSNearLossless})

# JPEG start-of-frame markers (SOF0-3, 5-7, 9-11, 13-15) and JPEG-LS SOF55
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


class DeclaredSizeError(ValueError):
    """The image declares more pixels than allowed, or a codestream declares another size than the
    dataset. The message names sizes and limits only, never another value of the dataset."""


@dataclass(frozen=True)
class DeclaredSize:
    rows: int
    columns: int
    frames: int

    @property
    def pixels(self) -> int:
        return self.rows * self.columns * self.frames


def j2k_size(data: bytes) -> tuple[int, int] | None:
    """(rows, columns) from a JPEG 2000 codestream's SIZ segment (or a JP2 file's codestream); None if
    ``data`` does not start with one."""
    if data.startswith(_JP2_SIGNATURE):
        at = data.find(b"jp2c", 0, 4096)
        if at < 4:
            return None
        data = data[at + 4:]
    if len(data) < 4 + 38 or data[:4] != b"\xff\x4f\xff\x51":
        return None
    # SIZ: Lsiz(2) Rsiz(2) Xsiz(4) Ysiz(4) XOsiz(4) YOsiz(4) ...
    xsiz, ysiz, xo, yo = struct.unpack(">IIII", data[8:24])
    return max(0, ysiz - yo), max(0, xsiz - xo)


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(rows, columns) from the first SOFn (JPEG) or SOF55 (JPEG-LS) segment; None if ``data`` is not a
    JPEG codestream or holds no frame header in its first 64 KiB."""
    if not data.startswith(b"\xff\xd8"):
        return None
    i, end = 2, min(len(data), 1 << 16)
    while i + 4 <= end:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01,) or 0xD0 <= marker <= 0xD7:  # no length
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        if marker in _SOF:
            if i + 9 > len(data):
                return None
            rows, columns = struct.unpack(">HH", data[i + 5:i + 9])
            return rows, columns
        if marker == 0xDA:  # start of scan before any frame header
            return None
        i += 2 + length
    return None


def _frame_headers(ds: Dataset, transfer_syntax: str) -> Iterator[tuple[int, int] | None]:
    """The size each codestream in Pixel Data's fragments declares (fragments that continue a frame
    are skipped; a fragment that starts no codestream yields nothing)."""
    reader = j2k_size if transfer_syntax in J2K_SYNTAXES else jpeg_size
    for fragment in generate_fragments(ds["PixelData"].value):
        head = bytes(fragment[:1 << 16])
        if head.startswith((b"\xff\x4f\xff\x51", _JP2_SIGNATURE, b"\xff\xd8")):
            yield reader(head)


def _int(ds: Dataset, keyword: str) -> int:
    try:
        return int(ds.get(keyword) or 0)
    except (TypeError, ValueError):
        return 0


def check(ds: Dataset, transfer_syntax: str, max_pixels: int) -> DeclaredSize:
    """The image's declared size, or :class:`DeclaredSizeError` when it passes ``max_pixels`` or when a
    codestream declares another size than Rows and Columns."""
    size = DeclaredSize(_int(ds, "Rows"), _int(ds, "Columns"), max(1, _int(ds, "NumberOfFrames")))
    if size.pixels > max_pixels:
        raise DeclaredSizeError(f"image declares {size.rows} x {size.columns} x {size.frames} frame(s) = "
                                f"{size.pixels / 1e6:.1f} MP, more than the limit of {max_pixels / 1e6:.1f} MP "
                                f"(limits.max_image_megapixels)")
    if transfer_syntax in J2K_SYNTAXES or transfer_syntax in JPEG_SYNTAXES:
        found = 0
        for header in _frame_headers(ds, transfer_syntax):
            if header is None:
                raise DeclaredSizeError("a frame's codestream header cannot be read")
            if header != (size.rows, size.columns):
                raise DeclaredSizeError(f"a frame's codestream declares {header[0]} x {header[1]}, the dataset "
                                        f"{size.rows} x {size.columns} (Rows x Columns)")
            found += 1
            if found > size.frames:
                raise DeclaredSizeError(f"Pixel Data holds more codestreams than its {size.frames} frame(s)")
        if found == 0:
            raise DeclaredSizeError("Pixel Data holds no codestream of its transfer syntax")
    return size


__all__ = ["DeclaredSize", "DeclaredSizeError", "J2K_SYNTAXES", "JPEG_SYNTAXES", "check", "j2k_size", "jpeg_size"]
