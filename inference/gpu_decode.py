"""Optional GPU decoding of JPEG 2000 and HTJ2K with NVIDIA nvImageCodec (an extra, never required).

On a GPU host the model reads a 256-pixel image in well under a millisecond, and what is left on the CPU
is the full-size decode that a heatmap capture of a 2048-pixel JPEG 2000 image needs (the model's own
decode is a cheap wavelet level, :mod:`inference.reduced`). Where ``nvidia-nvimgcodec`` is installed
(``pip install 'msk-dicom-node[gpu-decode]'``: nvImageCodec with nvJPEG2000) and the model runs on CUDA,
those full-size decodes go to the GPU: :func:`use_gpu_decoder` is called with the model's device by the
inference worker and by ``dicom-node infer``; on the CPU, or without the package, or when nvImageCodec
cannot start, nothing changes (one log line says which).

Only single-component, unsigned JPEG 2000 codestreams whose precision is Bits Stored go this way (the
values are then exactly pydicom's: the test suite checks it through nvImageCodec's CPU backend, which
runs the same code without a GPU); anything else, and any failure, is decoded as before.
No torch, no DICOM networking in here.
"""

from __future__ import annotations

import logging
import threading

import numpy as np

log = logging.getLogger("inference.gpu_decode")


class NvDecoder:
    """An nvImageCodec decoder on ``device`` ("cuda", "cuda:N"; "cpu": its CPU backend, the same calls
    without a GPU). Raises :class:`RuntimeError` when nvImageCodec is missing or cannot start there."""

    def __init__(self, device: str):
        try:
            from nvidia import nvimgcodec
        except ImportError as exc:
            raise RuntimeError("nvImageCodec is not installed (the gpu-decode extra)") from exc
        self._nv = nvimgcodec
        if device == "cpu":
            device_id = nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY
            backends = [nvimgcodec.Backend(nvimgcodec.BackendKind.CPU_ONLY)]
        elif device == "cuda" or device.startswith("cuda:"):
            device_id = int(device.partition(":")[2] or 0)
            backends = None  # nvImageCodec's choice: the GPU (nvJPEG2000), hybrid, then the CPU
        else:
            raise RuntimeError(f"no nvImageCodec decoder for device {device!r}")
        try:
            self._decoder = nvimgcodec.Decoder(device_id=device_id, backends=backends)
        except Exception as exc:  # noqa: BLE001 - no driver, no GPU, a library missing
            raise RuntimeError(f"nvImageCodec cannot start on {device}: {type(exc).__name__}") from exc
        # values at their own precision (10, 12, 15 bits...), one component, as stored
        self._params = nvimgcodec.DecodeParams(allow_any_depth=True, color_spec=nvimgcodec.ColorSpec.UNCHANGED)
        self.device = device
        self.decoded = 0  # images decoded here (the status of the path, for tests and logs)
        self._lock = threading.Lock()  # one decoder object, used by one thread at a time

    def decode(self, codestream: bytes, columns: int, rows: int, precision: int, dtype: np.dtype) -> np.ndarray | None:
        """The codestream's values at full size as ``dtype``, or None if nvImageCodec cannot decode it or
        gives something else than a ``rows`` x ``columns`` image of one component at ``precision`` bits."""
        nv = self._nv
        stream = nv.CodeStream(codestream)
        if (stream.width, stream.height, stream.num_channels) != (columns, rows, 1) or stream.precision != precision:
            return None
        with self._lock:
            image = self._decoder.decode(stream, params=self._params)
        if image is None:
            return None
        values = np.asarray(image.cpu() if image.buffer_kind != nv.ImageBufferKind.STRIDED_HOST else image)
        values = values.reshape(values.shape[:2]) if values.ndim == 3 and values.shape[2] == 1 else values
        if values.shape != (rows, columns) or values.dtype.kind != "u":
            return None
        self.decoded += 1
        return values.astype(dtype, copy=False)


_decoder: NvDecoder | None = None


def use_gpu_decoder(device: str) -> NvDecoder | None:
    """Decode full-size JPEG 2000 with nvImageCodec on ``device`` from now on, in this process, where it is
    a CUDA device and nvImageCodec starts there; otherwise (and for ``device`` "cpu") decode as before.
    Returns the decoder in use, if any; says which in one log line."""
    global _decoder
    _decoder = None
    if not str(device).startswith("cuda"):
        return None
    try:
        _decoder = NvDecoder(str(device))
    except RuntimeError as exc:
        log.info("JPEG 2000 decoded on the CPU: %s", exc)
        return None
    log.info("full-size JPEG 2000 and HTJ2K decoded on %s by nvImageCodec", device)
    return _decoder


def set_gpu_decoder(decoder: NvDecoder | None) -> None:
    """Use ``decoder`` (None: none) for full-size JPEG 2000 decodes in this process."""
    global _decoder
    _decoder = decoder


def gpu_decoder() -> NvDecoder | None:
    """The decoder :func:`use_gpu_decoder` or :func:`set_gpu_decoder` chose, if any."""
    return _decoder


__all__ = ["NvDecoder", "use_gpu_decoder", "set_gpu_decoder", "gpu_decoder"]
