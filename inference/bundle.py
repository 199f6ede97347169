"""Model bundles (MONAI Bundle layout) and the :class:`Model` that runs one.

Layout::

    <bundle>/configs/metadata.json   the card (MONAI metadata fields + "msk_node")
    <bundle>/models/mae.safetensors  encoder + MAE decoder
    <bundle>/models/heads/<name>.safetensors
    <bundle>/models/anomaly.safetensors   normal-image reconstruction-error statistics
    <bundle>/models/domain.safetensors    patch-token memory bank of the out-of-domain decline
    <bundle>/docs/README.md          the model card for people

Every weights file's sha256 is recorded in the card and checked at load.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from inference import DEFAULT_BUNDLE
from inference.card import Card, read_card, sha256_file, verify_weights, weights_digest
from inference.errors import BundleError
from inference.vit import MAE, ViTConfig
from inference.vocabulary import BINARY_LABELS, BONE_NEOPLASM, MODEL_MODALITIES, reads_modality

MAE_FILE = "models/mae.safetensors"
ANOMALY_FILE = "models/anomaly.safetensors"
DOMAIN_FILE = "models/domain.safetensors"

TUMOUR_SLOT = {
    "kind": "binary", "labels": list(BINARY_LABELS), "concept": BONE_NEOPLASM.as_dict(), "weights": None,
    "operating_points": None,
    "notes": "Slot only: no bone tumour data was available to the project, so this head ships no weights and "
             "the node reports no tumour finding. `dicom-node model fit-heads --head tumour --labels CSV` trains it.",
}


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def base_metadata(cfg: ViTConfig, name: str = "msk-foundation", version: str = "0.1.0") -> dict:
    """A fresh card: MONAI bundle metadata fields plus the node's own section (``monai_version``:
    the installed MONAI's, "unknown" on a training machine without it)."""
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                  "meta_schema_20220324.json",
        "name": name,
        "version": version,
        "changelog": {version: "MAE-pretrained ViT encoder with fracture, KL grade, anatomy and view heads"},
        "monai_version": _version("monai"),
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"safetensors": _version("safetensors")},
        "task": "Musculoskeletal radiograph findings: fracture, knee OA Kellgren-Lawrence grade, anatomy, view; "
                "reconstruction-error anomaly maps",
        "description": "A small Vision Transformer trained self-supervised as a masked autoencoder on "
                       "musculoskeletal radiographs, with task heads on its embedding.",
        "authors": "msk-dicom-node project",
        "copyright": "Weights: msk-dicom-node project. Training data CC BY 4.0, see docs/README.md",
        "data_source": "FracAtlas (doi:10.6084/m9.figshare.22363012) and the Knee Osteoarthritis Severity "
                       "Grading Dataset (doi:10.17632/56rmx5bjcr.1, from the Osteoarthritis Initiative), "
                       "both CC BY 4.0",
        "data_type": "jpeg (training); DICOM at inference",
        "image_classes": "single channel radiograph, displayed intensities (VOI applied, bone bright)",
        "label_classes": "see msk_node.heads",
        "pred_classes": "see msk_node.heads",
        "intended_use": "Research and workflow prototyping only; not for diagnostic use.",
        "references": [
            "Abedeen I. et al., FracAtlas, Scientific Data 10, 521 (2023), doi:10.1038/s41597-023-02432-4",
            "Chen P., Knee Osteoarthritis Severity Grading Dataset, Mendeley Data V1 (2018), "
            "doi:10.17632/56rmx5bjcr.1",
            "He K. et al., Masked Autoencoders Are Scalable Vision Learners, CVPR 2022",
        ],
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "modality": "CR/DX", "num_channels": 1,
                "spatial_shape": [cfg.image_size, cfg.image_size], "dtype": "float32",
                "value_range": [-10, 10], "is_patch_data": False,
                "channel_def": {"0": "image standardised per image (zero mean, unit variance)"}}},
            "outputs": {"tokens": {
                "type": "tokens", "format": "embedding", "num_channels": cfg.dim,
                "spatial_shape": [1 + cfg.num_patches], "dtype": "float32", "value_range": [-100, 100],
                "is_patch_data": False, "channel_def": {"0": "class token, then patch tokens row-major"}}},
        },
        "msk_node": {
            "name": name,
            "manufacturer": "msk-dicom-node project",
            "for_diagnostic_use": False,
            "architecture": {"encoder": "vit-mae", "config": cfg.to_dict(), "file": MAE_FILE},
            "preprocessing": {
                "input": "displayed image (VOI LUT/window applied, MONOCHROME1 inverted; see inference.pixels)",
                "resize": "area downscale so the long side is image_size, centred on a square black canvas",
                "normalise": "zero mean, unit variance over the image part",
                "image_size": cfg.image_size,
            },
            "heads": {"tumour": dict(TUMOUR_SLOT)},
            "anomaly": {},
            "weights": {},
            "validation_metrics": {},
            "training": {},
        },
    }


def _version(pkg: str) -> str:
    from importlib.metadata import version

    try:
        return version(pkg)
    except Exception:
        return "unknown"


def save_tensors(root: Path, rel: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write a safetensors file and record its sha256 in ``meta`` (atomically)."""
    path = Path(root) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    meta["msk_node"]["weights"][rel] = sha256_file(path)


def half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights are stored as float16 (half the bundle's size; loading casts back to the model's float32)."""
    return {k: v.detach().to(torch.float16) if v.is_floating_point() else v for k, v in state.items()}


def write_metadata(root: Path, meta: dict) -> None:
    path = Path(root) / "configs" / "metadata.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("metadata.json.tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_metadata(root: Path) -> dict:
    return read_card(root).to_dict()


def write_pretrained_bundle(out: str | Path, mae: MAE, cfg: ViTConfig, training: dict) -> None:
    out = Path(out)
    meta = base_metadata(cfg)
    meta["msk_node"]["training"] = {"pretrain": training, "python": platform.python_version(),
                                    "written": _now()}
    save_tensors(out, MAE_FILE, half(mae.state_dict()), meta)
    write_metadata(out, meta)


def load_mae(root: str | Path, device: str = "cpu") -> tuple[MAE, ViTConfig, Card]:
    card = read_card(Path(root))
    verify_weights(card, [card.architecture["file"]])
    try:
        cfg = ViTConfig.from_dict(card.architecture["config"])
    except (TypeError, ValueError, KeyError) as exc:
        raise BundleError(f"{card.root}: architecture.config is invalid ({exc})") from exc
    mae = MAE(cfg)
    state = load_file(str(card.root / card.architecture["file"]))
    try:
        mae.load_state_dict(state)
    except RuntimeError as exc:
        raise BundleError(f"{card.root}: {card.architecture['file']} does not fit the architecture: {exc}") from exc
    return mae.to(device).eval(), cfg, card


# ----------------------------------------------------------------------------------------------
# Running a bundle


def _auto_device(device: str | None) -> str:
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


class Model:
    """A loaded bundle: encoder once per image, every head on its tokens, the anomaly map."""

    def __init__(self, root: str | Path, device: str | None = None):
        from inference.heads import build_head, input_layer, n_outputs

        self.root = Path(root)
        self.card: Card = read_card(self.root)
        verify_weights(self.card)
        self.device = _auto_device(device)
        self.mae, self.cfg, _ = load_mae(self.root, self.device)
        self.heads: dict[str, torch.nn.Module] = {}
        self.head_inputs: dict[str, int | None] = {}  # None: final tokens; k: the tokens after block k
        for name, spec in self.card.heads.items():
            if not spec.has_weights:
                continue
            try:
                head = build_head(spec.arch, self.cfg.dim, n_outputs(spec.kind, spec.labels), self.cfg)
                head.load_state_dict(load_file(str(self.root / spec.weights)))
                self.head_inputs[name] = input_layer(spec.arch, self.cfg.depth)
            except (RuntimeError, ValueError) as exc:
                raise BundleError(f"{self.root}: head {name!r} ({spec.weights}) does not load: {exc}") from exc
            self.heads[name] = head.to(self.device).eval()
        an = self.card.anomaly
        self.anomaly_mean = self.anomaly_std = None
        if an.get("file"):
            t = load_file(str(self.root / an["file"]))
            if "mean" not in t or "std" not in t or t["mean"].numel() != self.cfg.num_patches:
                raise BundleError(f"{self.root}: {an['file']} needs 'mean' and 'std' "
                                  f"over {self.cfg.num_patches} patches")
            self.anomaly_mean, self.anomaly_std = t["mean"].numpy(), t["std"].numpy()
        dm = self.card.domain
        self.domain_bank: torch.Tensor | None = None
        if dm.get("file"):
            t = load_file(str(self.root / dm["file"]))
            if "bank" not in t or t["bank"].ndim != 2 or t["bank"].shape[1] != self.cfg.dim:
                raise BundleError(f"{self.root}: {dm['file']} needs a 'bank' of {self.cfg.dim}-wide patch tokens")
            self.domain_bank = torch.nn.functional.normalize(t["bank"].float(), dim=-1).to(self.device)
        self.batch_size = 16

    # -- identity -------------------------------------------------------------------------
    @property
    def info(self):
        from inference.results import ModelInfo

        meta = self.card.meta
        return ModelInfo(name=self.card.name, version=self.card.version,
                         weights_sha256=weights_digest(self.card.weights),
                         manufacturer=self.card.manufacturer,
                         for_diagnostic_use=bool(meta["msk_node"].get("for_diagnostic_use", False)),
                         description=str(meta.get("description", "")))

    # -- low level --------------------------------------------------------------------------
    def prepare(self, image: np.ndarray, source_shape: tuple[int, int] | None = None):
        from inference.preprocess import prepare

        return prepare(image, self.cfg.image_size, source_shape)

    @property
    def decode_side(self) -> int:
        """The smallest long side an image needs to be decoded at for this model: its input size
        (a reduced-resolution decode stops at the smallest level that still gives it)."""
        return int(self.cfg.image_size)

    def model_input_image(self, ds) -> np.ndarray:
        """The displayed image of ``ds`` (uint8) at the smallest decodable resolution that still gives
        the model its input (:func:`inference.pixels.display_uint8` with ``min_long_side``); raises
        :class:`~inference.errors.ImageNotProcessable`."""
        from inference.pixels import display_uint8

        return display_uint8(ds, self.decode_side)

    @torch.no_grad()
    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.mae.encoder(x.to(self.device))

    @torch.no_grad()
    def encode(self, x: torch.Tensor, names=None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """One encoder pass: the final tokens, and the intermediate tokens the heads ``names`` (default all) read."""
        taps = {self.head_inputs[n] for n in self.heads if names is None or n in names} - {None}
        return self.mae.encoder.forward_taps(x.to(self.device), taps=taps)

    @torch.no_grad()
    def run_heads(self, tokens: torch.Tensor, names=None, taps: dict[int, torch.Tensor] | None = None,
                  rows=None) -> dict[str, dict[str, torch.Tensor]]:
        """Heads ``names`` (default all) on ``tokens`` (final) or, for branch heads, on ``taps``;
        ``rows`` (indices) restricts them to part of the batch."""
        out = {}
        for n, h in self.heads.items():
            if names is not None and n not in names:
                continue
            layer = self.head_inputs[n]
            if layer is not None and (taps is None or layer not in taps):
                raise ValueError(f"head {n!r} reads the tokens after block {layer}: pass them in taps (see encode)")
            t = tokens if layer is None else taps[layer]
            if rows is not None:
                t = t[torch.as_tensor(rows, dtype=torch.long, device=t.device)]
            out[n] = {k: v.float().cpu() for k, v in h(t).items()}
        return out

    def domain_scores(self, x: torch.Tensor, tokens: torch.Tensor, geos) -> list:
        """One :class:`~inference.domain.DomainScore` per image of the batch (None without a memory bank):
        the mean of the largest nearest-bank distances of the content patches covering the image."""
        from inference.anomaly import coverage
        from inference.domain import DomainScore, content_patches, image_scores, nearest_distances, patch_features

        if self.domain_bank is None:
            return [None] * len(geos)
        dm = self.card.domain
        d = nearest_distances(patch_features(tokens), self.domain_bank).cpu().numpy()
        covered = np.stack([coverage(geo, self.cfg.grid).ravel() >= 0.5 for _, geo in geos])
        content = covered & content_patches(x, self.cfg.patch_size, float(dm.get("content_std", 0.0))).cpu().numpy()
        scores = image_scores(d, content, float(dm.get("top_fraction", 0.25)))
        share = content.sum(1) / np.maximum(covered.sum(1), 1)
        return [DomainScore(float(s), float(dm["threshold"]), float(c), float(dm.get("min_content_share", 0.0)),
                            max(geo.rows, geo.columns), int(dm.get("min_side", 0)))
                for s, c, (_, geo) in zip(scores, share, geos)]

    # -- prediction ---------------------------------------------------------------------------
    def predict_datasets(self, datasets, image_ids: list[str] | None = None, heads: set[str] | None = None,
                         maps: bool = True, decoded: list | None = None):
        """One :class:`ImageResult` per dataset; an image that cannot be processed is reported, not raised.

        Each image is decoded at the smallest resolution that gives the model its input
        (:meth:`model_input_image`); maps and boxes are in the dataset's rows and columns.
        ``decoded`` (parallel to ``datasets``): images already decoded by :meth:`model_input_image`
        (e.g. by a decoder pool), or the :class:`~inference.errors.ImageNotProcessable` it raised."""
        from inference.errors import ImageNotProcessable
        from inference.results import ImageResult

        ids = list(image_ids) if image_ids is not None else [str(getattr(ds, "SOPInstanceUID", i))
                                                             for i, ds in enumerate(datasets)]
        if len(ids) != len(datasets):
            raise ValueError("image_ids and datasets differ in length")
        if decoded is not None and len(decoded) != len(datasets):
            raise ValueError("decoded and datasets differ in length")
        results: list = [None] * len(datasets)
        arrays, where, hints, shapes = [], [], [], []
        for i, ds in enumerate(datasets):
            rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
            modality = str(ds.get("Modality", "") or "").upper()
            if not reads_modality(modality):
                results[i] = ImageResult.not_processed(
                    ids[i], f"modality {modality} is not a projection radiograph (the model reads "
                            f"{', '.join(sorted(MODEL_MODALITIES))})", rows, cols)
                continue
            try:
                arr = decoded[i] if decoded is not None else self.model_input_image(ds)
                if isinstance(arr, BaseException):
                    raise arr
            except ImageNotProcessable as exc:
                results[i] = ImageResult.not_processed(ids[i], exc.reason, rows, cols)
                continue
            except Exception as exc:  # a dataset broken in a way the decoder did not anticipate
                results[i] = ImageResult.not_processed(ids[i], f"{type(exc).__name__}: {exc}", rows, cols)
                continue
            arrays.append(arr)
            where.append(i)
            hints.append(str(ds.get("BodyPartExamined", "") or "").upper())
            # a reduced decode is smaller than the dataset: the geometry is the dataset's
            shapes.append((rows, cols) if rows and cols else None)
        for i, r in zip(where, self.predict_arrays(arrays, [ids[i] for i in where], heads, maps=maps,
                                                    body_parts=hints, source_shapes=shapes)):
            results[i] = r
        return results

    def predict_arrays(self, images, image_ids: list[str] | None = None, heads: set[str] | None = None,
                       maps: bool = True, body_parts: list[str] | None = None,
                       source_shapes: list[tuple[int, int] | None] | None = None):
        """Displayed greyscale images (uint8, or float 0..1; bone bright) -> ImageResults.
        ``source_shapes`` (rows, columns per image, None: the image's own): the images are
        reduced-resolution decodes of images of that size, which the results describe."""
        from inference.results import ImageResult

        ids = list(image_ids) if image_ids is not None else [str(i) for i in range(len(images))]
        if len(ids) != len(images):
            raise ValueError("image_ids and images differ in length")
        want = set(heads) if heads is not None else set(self.heads) | {"anomaly", "tumour"}
        unknown = want - set(self.card.heads) - {"anomaly"}
        if unknown:
            raise ValueError(f"unknown head(s) {sorted(unknown)}; the bundle has {sorted(self.card.heads)}")
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = list(range(start, min(start + self.batch_size, len(images))))
            prepared, geos, failed = [], [], {}
            for i in chunk:
                try:
                    x, geo = self.prepare(images[i], source_shapes[i] if source_shapes else None)
                    prepared.append(x)
                    geos.append((i, geo))
                except ValueError as exc:
                    failed[i] = str(exc)
            batch_results = {}
            if prepared:
                x = torch.from_numpy(np.stack(prepared))[:, None]
                batch_results = self._predict_batch(x, geos, ids, want, maps, body_parts)
            for i in chunk:
                if i in failed:
                    shape = np.asarray(images[i]).shape
                    rows_cols = shape[:2] if len(shape) >= 2 else (0, 0)
                    out.append(ImageResult.not_processed(ids[i], failed[i], *rows_cols))
                else:
                    out.append(batch_results[i])
        return out

    @torch.no_grad()
    def _predict_batch(self, x, geos, ids, want, maps, body_parts):
        from scipy import ndimage

        from inference.anomaly import (
            coverage,
            grid_to_canvas,
            normalise,
            peak_regions,
            reconstruction_error,
            regions_from_map,
            smooth_grid,
        )
        from inference.domain import OUTSIDE_DOMAIN, body_part_outside, content_patches
        from inference.heads import probabilities
        from inference.preprocess import SourceMap
        from inference.results import BinaryFinding, CategoricalFinding, ImageResult

        x = x.to(self.device)
        need = {n for n in self.heads if n in want}
        gate = {n for n in need if self.card.heads[n].applies_to}
        ungated = (need - gate) | ({"anatomy"} if gate and "anatomy" in self.heads else set())
        tokens, taps = self.encode(x, need)
        # images outside the model's domain (by their pixels, or a header naming a non-MSK region) are declined
        declined = {}
        for (i, _), dscore in zip(geos, self.domain_scores(x, tokens, geos)):
            body_part = body_parts[i] if body_parts else ""
            if dscore is not None and dscore.outside:
                declined[i] = dscore.reason()
            elif body_part_outside(body_part):
                declined[i] = (f"{OUTSIDE_DOMAIN}: BodyPartExamined names a region the model was not "
                               f"trained on")
        outs = self.run_heads(tokens, ungated, taps)
        anatomy_labels = [None] * len(geos)
        if "anatomy" in outs:
            spec = self.card.heads["anatomy"]
            anatomy_labels = [spec.labels[int(k)] for k in outs["anatomy"]["logits"].argmax(1)]
        # gated heads (the KL grade: knees only) run on the images they apply to, and only those
        gated_rows = {}
        for name in gate:
            applies = self.card.heads[name].applies_to
            rows = [b for b, (i, _) in enumerate(geos)
                    if anatomy_labels[b] in applies or (body_parts[i] if body_parts else "").lower() in applies]
            if rows:
                outs[name] = self.run_heads(tokens, {name}, taps, rows)[name]
                gated_rows[name] = {b: r for r, b in enumerate(rows)}
        errs = None
        an = self.card.anomaly
        if "anomaly" in want and self.anomaly_mean is not None:
            passes = tuple(an["passes"]) if an.get("passes") is not None else None
            errs = reconstruction_error(self.mae, x, int(an.get("groups", 4)), passes).cpu().numpy()
        g = self.cfg.grid
        results = {}
        for b, (i, geo) in enumerate(geos):
            kw = {}
            for name in need:
                spec = self.card.heads[name]
                row = b
                if name in gate:
                    if b not in gated_rows.get(name, {}):
                        continue  # e.g. KL grade only on knees
                    row = gated_rows[name][b]
                o = outs[name]
                p = probabilities(spec.kind, o["logits"])[row].numpy()
                if spec.kind == "binary":
                    finding = BinaryFinding(name=name, probability=float(p), operating_points=spec.operating_points,
                                            concept=spec.concept)
                else:
                    finding = CategoricalFinding(name=name, labels=spec.labels,
                                                 probabilities=tuple(float(v) for v in p),
                                                 concepts=spec.label_concepts,
                                                 rule=spec.decision,
                                                 floor=float(spec.arch.get("confidence_floor", 0.0)))
                if name in ("fracture", "tumour", "kl_grade", "anatomy", "view"):
                    kw[name] = finding
                if maps and "patch_logits" in o and name == "fracture":
                    pm = torch.sigmoid(o["patch_logits"][row]).numpy().reshape(g, g)
                    valid = coverage(geo, g) >= float(an.get("min_coverage", 0.5))
                    if int(spec.arch.get("erode_patches", 0)):  # the image's edge: collimation, markers, text
                        valid = ndimage.binary_erosion(valid, iterations=int(spec.arch["erode_patches"]),
                                                       border_value=0)
                    if spec.arch.get("flat_std") is not None:  # blank collimation, saturation, and the ring by them
                        flat = ~content_patches(x[b:b + 1], self.cfg.patch_size, float(spec.arch["flat_std"]))[0]
                        flat = flat.cpu().numpy().reshape(g, g)
                        if int(spec.arch.get("flat_dilate", 0)):
                            flat = ndimage.binary_dilation(flat, iterations=int(spec.arch["flat_dilate"]))
                        valid = valid & ~flat
                    pm = pm * valid
                    pm = smooth_grid(pm, float(spec.arch.get("smooth_patches", 0.6)))
                    canvas = grid_to_canvas(pm, geo.size, 0.0)
                    # bilinear from the patch grid: a convex combination, so it stays within 0..1
                    kw["fracture_map"] = SourceMap(pm, geo)  # made at full size only if read so
                    if finding.decision != "absent" and spec.arch.get("region_rule") == "peak":
                        # the call says whether, the map where: its strongest place is always reported
                        kw["fracture_regions"] = peak_regions(
                            canvas, geo, float(spec.arch.get("region_relative", 0.5)), "fracture",
                            int(spec.arch.get("max_regions", 2)), float(spec.arch.get("second_region", 0.5)))
                    elif finding.decision != "absent":  # boxes only where the head calls a fracture
                        kw["fracture_regions"] = regions_from_map(
                            canvas, geo, float(spec.arch.get("region_threshold", 0.5)), "fracture")
            if errs is not None and maps:
                z = normalise(errs[b], self.anomaly_mean, self.anomaly_std, geo, g,
                              float(an.get("min_coverage", 0.5)), int(an.get("erode_patches", 0)))
                m = np.clip(smooth_grid(z, float(an.get("smooth_patches", 0.6))) / float(an.get("z_max", 6.0)), 0, 1)
                canvas = grid_to_canvas(m, geo.size, 0.0)
                kw["anomaly_map"] = SourceMap(m, geo)
                if an.get("not_a_localiser"):  # measured not to localise: a map to look at, no regions as findings
                    kw["anomaly_note"] = "reconstruction error of the masked autoencoder; not a localiser: " + \
                        str(an["not_a_localiser"])
                else:
                    kw["regions"] = regions_from_map(canvas, geo, float(an.get("region_threshold", 0.5)), "anomaly")
            if i in declined:  # no findings, no maps: the model cannot read this image
                results[i] = ImageResult.not_processed(ids[i], declined[i], geo.rows, geo.columns)
                continue
            results[i] = ImageResult(image_id=ids[i], rows=geo.rows, columns=geo.columns, **kw)
        return results


def load_bundle(path: str | Path | None = None, device: str | None = None) -> Model:
    """Load a bundle (None: the shipped default) onto ``device`` (None: cuda if available, else cpu)."""
    return Model(Path(path) if path is not None else DEFAULT_BUNDLE, device)
