"""Decoding ahead of the model: a bounded pool of decoder threads (``pipeline.decode_workers``).

The infer stage (:func:`dicom_node.stages.infer`) hands the model one batch at a time; while the model
works on a batch, the pool decodes the next one, so that on a many-core host decoding keeps the encoder
busy. At most two batches are decoded or being decoded at once (the one the model reads and the next).

Each image is decoded once for the model, at the smallest resolution that gives it its input size
(:mod:`inference.reduced`), and, when its heatmap capture needs more than that, once more at the smallest
resolution that gives the capture its size (:func:`dicom_node.sc.content.capture_side`). The encode stage
then renders the capture and the presentation state from that decode without decoding again.

Threads, not processes: a dataset need not be copied to another process, and the inference workers are
daemonic processes, which may not start children. torch releases the GIL in its operations, so a decoder
thread works while the model does; but the JPEG 2000 decoders at hand (pylibjpeg-openjpeg for full
decodes, Pillow's OpenJPEG for reduced ones) hold the GIL while they decode, so two decoder threads do
not decode two JPEG 2000 images at once (measured in docs/performance.md). With
``pipeline.decode_workers: 0`` the images are decoded in the inference thread, one batch at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from dicom_node.sc.content import capture_side
from dicom_node.sc.enum import MAX_SIDE
from inference.errors import ImageNotProcessable
from inference.pixels import Displayed, displayed

log = logging.getLogger("dicom_node.decoding")

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Decoded:
    """One image decoded for the model (``model``: its display image, or why it cannot be decoded) and,
    where the model's decode is too small for the heatmap capture, for the capture (``capture``)."""

    model: Displayed | ImageNotProcessable
    capture: Displayed | None = None

    def for_capture(self) -> Displayed | None:
        """The decode the heatmap capture and presentation state are made of, if one was made."""
        if self.capture is not None:
            return self.capture
        return self.model if isinstance(self.model, Displayed) else None


def decode_image(ds, model_side: int | None, capture: bool = True, capture_max_side: int = MAX_SIDE) -> Decoded:
    """Decode ``ds`` for the model (``model_side``: its input size, None: in full) and, with ``capture``,
    for its heatmap capture (long side at most ``capture_max_side``) when the model's decode is too small
    for it. Never raises :class:`ImageNotProcessable`: it is returned."""
    try:
        shown = displayed(ds, model_side)
    except ImageNotProcessable as exc:
        return Decoded(exc)
    if not capture:
        return Decoded(shown)
    rows, columns = int(ds.Rows), int(ds.Columns)
    need = capture_side(rows, columns, capture_max_side)
    if shown.image.shape == (rows, columns) or max(shown.image.shape) >= need:
        return Decoded(shown)
    try:
        return Decoded(shown, displayed(ds, need))
    except ImageNotProcessable:  # the encode stage says so if the image is processed
        return Decoded(shown)


class DecoderPool:
    """``workers`` decoder threads (0: decode in the calling thread). Use as a context manager, or
    :meth:`close` it."""

    def __init__(self, workers: int):
        if workers < 0:
            raise ValueError("decode_workers must be 0 or more")
        self.workers = workers
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="decode") if workers else None

    def __enter__(self) -> DecoderPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def batches(self, fn: Callable[[T], R], batches: Sequence[Sequence[T]]) -> Iterator[list[R]]:
        """``[fn(x) for x in batch]`` for each batch, in order; the next batch is decoded while the caller
        works on the one yielded (at most two batches in flight)."""
        if self._executor is None:
            for batch in batches:
                yield [fn(x) for x in batch]
            return
        pending: list[Future] | None = None
        try:
            for k in range(len(batches)):
                current = pending if pending is not None else [self._executor.submit(fn, x) for x in batches[k]]
                pending = [self._executor.submit(fn, x) for x in batches[k + 1]] if k + 1 < len(batches) else None
                yield [f.result() for f in current]
        finally:
            for f in pending or ():
                f.cancel()


__all__ = ["Decoded", "DecoderPool", "decode_image"]
