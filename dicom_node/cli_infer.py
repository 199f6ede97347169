"""``dicom-node infer``: the node's stages (:mod:`dicom_node.stages`) on files.

DICOM inputs go through the same load (SOP class and modality filter), infer, route (the
default rule, or the rules of ``--config``) and encode stages as a study the node receives;
an image's heatmap PNG is the pixels of the heatmap secondary capture the PACS would receive.
JPEG/PNG inputs are inferred as displayed images, and their heatmap rendered by the same
function. torch is imported only when the command runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from dicom_node.sc.enum import MAX_SIDE

if TYPE_CHECKING:
    from inference.results import ImageResult

log = logging.getLogger("dicom_node.infer")

INPUT_SUFFIXES = {".dcm", ".dicom", ".jpg", ".jpeg", ".png", ""}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DEFAULT_BATCH_SIZE = 16
DEFAULT_DECODE_WORKERS = 2  # as pipeline.decode_workers
#: long side of the heatmap PNGs (a preview): half the node's captures, which a 2048-pixel image makes at full size;
#: a JPEG 2000 or JPEG source is then decoded at half resolution for it (about a quarter of the full decode's time)
DEFAULT_HEATMAP_SIDE = 1024


def collect(paths: list[str]) -> list[Path]:
    """Input files: the files given, and the files under the folders given (sorted)."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in INPUT_SUFFIXES
                            and not f.name.startswith("."))
        elif p.is_file():
            files.append(p)
        else:
            raise SystemExit(f"{p}: no such file or directory")
    return files


def _save_png(pixels, path: Path) -> None:
    from PIL import Image

    # zlib level 1: a 2048-pixel capture writes in about 40 % of the default level's time, 1.4x the bytes
    Image.fromarray(pixels).save(path, compress_level=1)


class InferCommand:
    """One run of ``dicom-node infer``: per-image JSON and heatmap PNG in ``out``, optionally the DICOM
    result objects of each study in ``dicom_out``."""

    def __init__(self, model, out: Path, *, routing, batch_size: int, max_pixels: int | None = None,
                 heads: set[str] | None = None, dicom_out: Path | None = None,
                 decode_workers: int = DEFAULT_DECODE_WORKERS, heatmap_side: int = DEFAULT_HEATMAP_SIDE):
        from dicom_node.sc import enum as sc_enum

        if not sc_enum.MIN_PANEL_WIDTH <= heatmap_side <= sc_enum.MAX_SIDE:
            raise ValueError(f"heatmap_side must be {sc_enum.MIN_PANEL_WIDTH}..{sc_enum.MAX_SIDE}")
        self.model = model
        self.heatmap_side = heatmap_side
        self.decode_workers = decode_workers
        import torch

        from inference.reduced import set_decoder_threads

        set_decoder_threads(torch.get_num_threads())  # one JPEG 2000 image decoded with the model's threads
        self.out = out
        self.routing = routing
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.heads = heads
        self.dicom_out = dicom_out
        self.written: list[Path] = []
        self.errors: list[str] = []
        self.results: dict[int, ImageResult] = {}  # input index -> its result

    def run(self, files: list[Path]) -> list[dict]:
        """One JSON document per input file, in the order of ``files``."""
        from dicom_node import stages

        docs: list[dict | None] = [None] * len(files)
        dicom = [i for i, f in enumerate(files) if f.suffix.lower() not in IMAGE_SUFFIXES]
        limit = stages.DEFAULT_MAX_PIXELS if self.max_pixels is None else self.max_pixels
        images = [stages.load_file(files[i], max_pixels=limit) for i in dicom]
        from dicom_node.decoding import DecoderPool

        with DecoderPool(self.decode_workers) as decoder:
            # without --dicom-out, decoded for the PNG preview's size; with it, for the captures the PACS would get
            side = self.heatmap_side if self.dicom_out is None else MAX_SIDE
            results = stages.infer(self.model, images, self.batch_size, self.heads, decoder=decoder,
                                   capture_max_side=side)
        routed = stages.route(images, results, self.routing)
        studies: dict[str, list[int]] = {}  # Study Instance UID -> positions in ``dicom``
        for k, im in enumerate(routed.images):
            if im.ds is not None:
                studies.setdefault(str(im.ds.get("StudyInstanceUID", "") or ""), []).append(k)
            else:
                docs[dicom[k]] = self._doc(files, dicom[k], routed.results[k], None)
        for members in studies.values():
            previews: dict | None = None
            objs = self._encode(files, [dicom[k] for k in members], [routed.images[k] for k in members],
                                [routed.results[k] for k in members])
            for k in members:
                im, r = routed.images[k], routed.results[k]
                if isinstance(objs, dict):  # no --dicom-out: the captures' pixels only
                    pixels = objs.get(str(im.ds.SOPInstanceUID)) if r.processed and im.ds is not None else None
                elif objs is not None and r.processed and self.heatmap_side >= MAX_SIDE:
                    pixels = stages.heatmap_pixels(objs, im)  # the capture the PACS would get, as it is
                elif objs is not None and r.processed and im.ds is not None:
                    previews = previews if previews is not None else self._previews(routed, members)
                    pixels = previews.get(str(im.ds.SOPInstanceUID))
                else:
                    pixels = None
                if pixels is None and r.processed:
                    pixels = self._render(im.ds, None, r, im.decoded.for_capture() if im.decoded else None)
                docs[dicom[k]] = self._doc(files, dicom[k], r, pixels)
        self._arrays(files, [i for i, f in enumerate(files) if f.suffix.lower() in IMAGE_SUFFIXES], docs)
        return docs  # type: ignore[return-value]

    def _previews(self, routed, members: list[int]) -> dict:
        """With --dicom-out and a PNG smaller than the captures: the study's heatmaps rendered again at the
        PNG's size, from the decodes the captures were made of (empty if they cannot be rendered)."""
        from dicom_node import stages
        from dicom_node.errors import EncodingError

        try:
            return stages.heatmaps_only([routed.images[k] for k in members], [routed.results[k] for k in members],
                                        self.model.info, max_side=self.heatmap_side)
        except EncodingError:
            return {}

    def _encode(self, files: list[Path], indices: list[int], images: list, results: list):
        """The encode (and, with ``dicom_out``, write) stage for the loaded images of one study; None when
        nothing was processed (as the node, which sends nothing then) or the study cannot be encoded. Without
        ``dicom_out``, only the heatmap captures' pixels (by SOP Instance UID): the same pixels, no objects."""
        from dicom_node import stages
        from dicom_node.errors import EncodingError

        # a file repeating a SOP Instance UID already given is left out of the study's objects
        seen: set[str] = set()
        chosen = []
        for i, im, r in zip(indices, images, results):
            uid = str(im.ds.get("SOPInstanceUID", "") or "")
            if uid in seen:
                self.errors.append(f"{files[i]}: skipped, SOP Instance UID already given by another file")
                continue
            seen.add(uid)
            chosen.append((im, r))
        if not any(r.processed for _, r in chosen):
            return None
        try:
            if self.dicom_out is None:
                return stages.heatmaps_only([im for im, _ in chosen], [r for _, r in chosen], self.model.info,
                                            max_side=self.heatmap_side)
            objs = stages.encode([im for im, _ in chosen], [r for _, r in chosen], self.model.info,
                                 card=self.model.card)
        except EncodingError as exc:
            study = str(chosen[0][0].ds.get("StudyInstanceUID", "") or "")
            log.error("study %s: results not encoded: %s", study, exc)
            self.errors.append(f"study {study}: results not encoded: {exc}")
            return None
        if self.dicom_out is not None:
            from dicom_node.identity import derive_id

            folder = self.dicom_out / f"study_{derive_id('study', objs.identity.study_uid, length=16)}"
            self.written += stages.write_files(objs, folder)
        return objs

    def _arrays(self, files: list[Path], indices: list[int], docs: list) -> None:
        """JPEG/PNG inputs: inferred as displayed images, ``batch_size`` at a time."""
        from inference.pixels import load_image_file
        from inference.results import ImageResult

        loaded = {}
        for i in indices:
            try:
                loaded[i] = load_image_file(files[i])
            except Exception as exc:  # noqa: BLE001 - any unreadable image is reported, not raised
                docs[i] = self._doc(files, i, ImageResult.not_processed(str(files[i]), f"cannot read image: {exc}"),
                                    None)
        from dicom_node.stages import predict_in_batches

        todo = list(loaded)
        predicted = predict_in_batches(self.model, self.model.predict_arrays, [loaded[i] for i in todo],
                                       [str(files[i]) for i in todo], self.batch_size, self.heads)
        for i, r in zip(todo, predicted, strict=True):
            docs[i] = self._doc(files, i, r, self._render(None, loaded[i], r) if r.processed else None)

    def _render(self, ds, image, result, decoded=None):
        """The heatmap capture's pixels, rendered as for the PACS, for an image not in an encoded study
        (``decoded``: its decode by the infer stage, used when large enough)."""
        from dicom_node.results_dicom import capture_display
        from dicom_node.sc.content import render_heatmap

        return render_heatmap(capture_display(ds, decoded, self.heatmap_side).image if ds is not None else image,
                              result, self.model.info, max_side=self.heatmap_side)

    def _doc(self, files: list[Path], i: int, result, pixels) -> dict:
        f = files[i]
        self.results[i] = result
        stem = f"{i:05d}-{hashlib.sha256(str(f.resolve()).encode()).hexdigest()[:12]}"
        doc = result.to_json()
        doc["source"] = str(f)
        info = self.model.info
        doc["model"] = {"name": info.name, "version": info.version, "weights_sha256": info.weights_sha256}
        if pixels is not None:
            _save_png(pixels, self.out / f"{stem}.png")
            doc["heatmap_png"] = f"{stem}.png"
            if result.fracture_map is not None:  # the capture shows the fracture map when there is one
                doc["fracture_heatmap_png"] = f"{stem}.png"
        (self.out / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
        doc["json"] = f"{stem}.json"
        return doc


def cmd_infer(args) -> int:
    from dicom_node.config import RoutingSection
    from inference.results import BinaryFinding

    files = collect(args.inputs)
    if not files:
        raise SystemExit("no input files")
    routing, batch_size, max_pixels = RoutingSection(), DEFAULT_BATCH_SIZE, None
    decode_workers = DEFAULT_DECODE_WORKERS
    if getattr(args, "config_given", False):
        from dicom_node.cli import _load_config

        cfg = _load_config(args)
        routing, batch_size, max_pixels = cfg.routing, cfg.pipeline.batch_size, cfg.limits.max_image_pixels
        decode_workers = cfg.pipeline.decode_workers
    if args.batch_size is not None:
        batch_size = args.batch_size
    if args.decode_workers is not None:
        decode_workers = args.decode_workers
    import torch

    from inference import load_bundle

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_bundle(args.bundle, args.device)
    from inference.gpu_decode import use_gpu_decoder

    use_gpu_decoder(str(model.device))  # full-size JPEG 2000 on the GPU where nvImageCodec is installed
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = InferCommand(model, out, routing=routing, batch_size=batch_size, max_pixels=max_pixels,
                           heads=set(args.heads.split(",")) if args.heads else None,
                           dicom_out=Path(args.dicom_out) if args.dicom_out else None,
                           decode_workers=decode_workers, heatmap_side=args.heatmap_side)
    summary = command.run(files)
    if not args.json:
        for i, f in enumerate(files):
            res = command.results[i]
            if res.processed:
                parts = [f"{x.name}={x.decision}({x.probability:.2f})" if isinstance(x, BinaryFinding)
                         else f"{x.name}={'uncertain:' if x.uncertain else ''}{x.label}({x.confidence:.2f})"
                         for x in res.findings()]
                shown = res.reported_regions()  # the boxes the SR, captures and presentation states show
                n_fx = sum(1 for r in shown if r.source == "fracture")
                unboxed = "".join(f" {x.name}=not-localised" for x in res.not_localised())
                print(f"{f}: " + " ".join(parts) + f" regions={len(shown)} (fracture={n_fx} "
                      f"anomaly={len(shown) - n_fx}){unboxed}")
            else:
                print(f"{f}: not processed: {res.reason}")
    (out / "index.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.dicom_out:
        for msg in command.errors:
            print(f"--dicom-out: {msg}", file=sys.stderr)
        if not args.json:
            print(f"{len(command.written)} DICOM result objects (SR, heatmaps, summary) written to {args.dicom_out}")
    if args.json:
        print(json.dumps(summary))
    processed = sum(1 for d in summary if d["processed"])
    if not args.json:
        print(f"{processed}/{len(summary)} images processed; results in {out}")
    return 0 if processed == len(summary) else 3


def _non_negative(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _heatmap_side(text: str) -> int:
    import argparse

    from dicom_node.sc import enum as sc_enum

    value = _non_negative(text)
    if not sc_enum.MIN_PANEL_WIDTH <= value <= sc_enum.MAX_SIDE:
        raise argparse.ArgumentTypeError(f"must be {sc_enum.MIN_PANEL_WIDTH}..{sc_enum.MAX_SIDE}")
    return value


def register(sub) -> None:
    """Add ``infer`` to the ``dicom-node`` subcommands."""
    p = sub.add_parser("infer", help="run the model on DICOM (or JPEG/PNG) files: JSON findings + heatmap PNGs",
                       description="Runs the node's stages on files: the SOP class and modality filter, the model, "
                                   "routing (the default rule, or the rules of --config FILE given before the "
                                   "command) and the DICOM encoding. The heatmap PNG of an image is the heatmap "
                                   "secondary capture the PACS would receive, at --heatmap-side pixels at most.")
    p.add_argument("inputs", nargs="+", metavar="FILE_OR_DIR")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--bundle", default=None, help="model bundle (default: the shipped model)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    p.add_argument("--heads", default=None, help="comma-separated heads (default: all, plus anomaly)")
    p.add_argument("--dicom-out", default=None, metavar="DIR",
                   help="also write the DICOM results of the DICOM inputs (SR, heatmap and summary secondary "
                        "captures, one folder per study) into DIR")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"images per forward pass (default: pipeline.batch_size of --config, else "
                        f"{DEFAULT_BATCH_SIZE})")
    p.add_argument("--decode-workers", type=_non_negative, default=None, metavar="N",
                   help=f"decoder threads decoding the next batch while the model reads one, 0: none (default: "
                        f"pipeline.decode_workers of --config, else {DEFAULT_DECODE_WORKERS})")
    p.add_argument("--heatmap-side", type=_heatmap_side, default=DEFAULT_HEATMAP_SIDE, metavar="PIXELS",
                   help=f"long side of the heatmap PNGs at most, 768..2048 (default {DEFAULT_HEATMAP_SIDE}; 2048: the "
                        f"captures the PACS would receive, pixel for pixel, which costs a full decode of each image)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_infer)
