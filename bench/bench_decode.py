#!/usr/bin/env python3
"""``dicom-node infer`` on 4-megapixel JPEG 2000 DICOM against the same images as 256-pixel PNGs, in one run.

    .venv/bin/python bench/bench_decode.py [--images 24] [--threads 2] [--decode-workers 2] [--repeats 2]
                                           [--heatmap-side 1024] [--repo OTHER_CHECKOUT]

Images: the FracAtlas fixture radiographs (tests/fixtures/fracatlas) enlarged 4x to detector size
(about 2048 x 1700, 12 bits stored), written as DX in JPEG 2000 lossless into a temporary folder; the
same images, as displayed, downscaled to 256 pixels on the long side and written as PNG beside them.
Each folder goes through ``InferCommand.run`` (what ``dicom-node infer --out DIR`` runs after loading the
model: load, infer, route, render each image's heatmap PNG at ``--heatmap-side`` pixels at most (infer's
default, 1024), write the JSON), the model loaded once for both; the two alternate,
``--repeats`` times, and the best of each is printed in images/s with their ratio (DICOM / PNG).
Then the time of each step for the DICOM folder (``--decode-workers 0``, one thread): decoding for
the model and for the captures, the model, the encoding of the result objects the PACS receives, and
``infer``'s own path (decoded for the PNG's size, the PNGs rendered and written).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# --repo OTHER_CHECKOUT: time another checkout's code (e.g. the commit before issue 16) on the same inputs
_repo = sys.argv[sys.argv.index("--repo") + 1] if "--repo" in sys.argv else str(REPO)
sys.path.insert(0, _repo)

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from pydicom import uid  # noqa: E402

from dicom_node import stages  # noqa: E402
from dicom_node.cli_infer import InferCommand  # noqa: E402
from dicom_node.config import RoutingSection  # noqa: E402
from inference import load_bundle  # noqa: E402
from inference.pixels import display_uint8  # noqa: E402
from tests.dicomgen import DECLINED_FIXTURES, dx_from_image, fracatlas_images  # noqa: E402


def make_inputs(folder: Path, n: int) -> tuple[list[Path], list[Path]]:
    """The fixture radiographs the shipped model reads (one it declines as outside its domain would skip the
    model, which flatters whichever side has more of them: ``DECLINED_FIXTURES`` are left out)."""
    dcm_dir, png_dir = folder / "dicom", folder / "png"
    dcm_dir.mkdir()
    png_dir.mkdir()
    dcm, png = [], []
    sources = fracatlas_images(n, readable=True)
    for i, img in enumerate(sources):
        ds = dx_from_image(img, scale=4, instance_number=i + 1)
        ds.compress(uid.JPEG2000Lossless)  # pylibjpeg-openjpeg
        p = dcm_dir / f"dx_{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        dcm.append(p)
        shown = Image.fromarray(display_uint8(ds))
        shown.thumbnail((256, 256), Image.Resampling.LANCZOS)
        q = png_dir / f"dx_{i:04d}.png"
        shown.save(q)
        png.append(q)
    return dcm, png


def run_infer(model, files: list[Path], out: Path, batch: int, decode_workers: int, heatmap_side: int) -> float:
    out.mkdir(parents=True, exist_ok=True)
    import inspect

    params = inspect.signature(InferCommand).parameters  # an older checkout (--repo) may lack these
    extra = {k: v for k, v in (("decode_workers", decode_workers), ("heatmap_side", heatmap_side)) if k in params}
    cmd = InferCommand(model, out, routing=RoutingSection(), batch_size=batch, **extra)
    t0 = time.perf_counter()
    docs = cmd.run(files)
    dt = time.perf_counter() - t0
    assert all(d["processed"] for d in docs), [d.get("reason") for d in docs if not d["processed"]]
    return dt


def steps(model, files: list[Path], batch: int, heatmap_side: int) -> dict[str, float]:
    """Seconds per step over ``files``, in the inference thread (no decoder threads)."""
    from dicom_node.cli_infer import _save_png
    from dicom_node.decoding import DecoderPool, decode_image

    t: dict[str, float] = {}
    t0 = time.perf_counter()
    images = [stages.load_file(f) for f in files]
    t["read files"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    decoded = [decode_image(im.ds, model.decode_side, capture=False) for im in images]
    t["decode for the model (reduced)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for im in images:
        display_uint8(im.ds)
    t["decode in full (what the model did before)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.batch_size = batch
    results = []
    for s in range(0, len(images), batch):
        results += model.predict_datasets([im.ds for im in images[s:s + batch]],
                                          decoded=[d.model.image for d in decoded[s:s + batch]])
    t["model (preprocess, encoder, heads, maps)"] = time.perf_counter() - t0
    images = [stages.load_file(f) for f in files]  # afresh: pydicom keeps a full decode on its dataset
    t0 = time.perf_counter()
    with DecoderPool(0) as pool:
        results = stages.infer(model, images, batch, decoder=pool)  # decodes for the captures, kept on the images
    t["infer stage (model's decode, capture's decode, model)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for im, r in zip(images, results):  # one study per image, as infer groups these files
        stages.encode([im], [r], model.info, card=model.card)
    t["encode (SR, captures, presentation states)"] = time.perf_counter() - t0
    images = [stages.load_file(f) for f in files]
    t0 = time.perf_counter()
    with DecoderPool(0) as pool:
        results = stages.infer(model, images, batch, decoder=pool, capture_max_side=heatmap_side)
    t[f"infer's infer stage (capture decoded for {heatmap_side} px)"] = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        for k, (im, r) in enumerate(zip(images, results)):
            for pixels in stages.heatmaps_only([im], [r], model.info, max_side=heatmap_side).values():
                _save_png(pixels, Path(out) / f"{k}.png")
        t[f"infer's heatmap PNGs ({heatmap_side} px: render, write)"] = time.perf_counter() - t0
    return t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode-workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--heatmap-side", type=int, default=1024, help="infer's --heatmap-side (default: its default)")
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--repo", default=str(REPO), help="the checkout whose code runs (default: this one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_bundle(args.bundle, "cpu")
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        folder = Path(tmp)
        dcm, png = make_inputs(folder, args.images)
        print(f"left out, declined by the shipped model as outside its domain: {', '.join(sorted(DECLINED_FIXTURES))}")
        shape = Image.open(png[0]).size
        # warm-up: torch, fonts, and highdicom's tables of the standard (read at its first object)
        run_infer(model, png[:1] + dcm[:1], folder / "warm", args.batch, args.decode_workers, args.heatmap_side)
        t_dcm, t_png = [], []
        for r in range(args.repeats):
            t_dcm.append(run_infer(model, dcm, folder / f"out-dcm-{r}", args.batch, args.decode_workers,
                                   args.heatmap_side))
            t_png.append(run_infer(model, png, folder / f"out-png-{r}", args.batch, args.decode_workers,
                                   args.heatmap_side))
        n = len(dcm)
        print(f"{n} images: DX JPEG 2000 lossless ~2048 px (FracAtlas fixtures enlarged 4x) vs the same as "
              f"{shape[0]}x{shape[1]}-ish PNG; model {model.info.name} {model.info.version}, CPU, "
              f"{torch.get_num_threads()} threads, batch {args.batch}, decode_workers {args.decode_workers}, "
              f"heatmap PNGs within {args.heatmap_side} px, best of {args.repeats}")
        print(f"infer, JPEG 2000 DICOM:   {n / min(t_dcm):7.2f} images/s")
        print(f"infer, 256-pixel PNG:     {n / min(t_png):7.2f} images/s")
        print(f"ratio DICOM / PNG:        {min(t_png) / min(t_dcm):7.3f}")
        print(f"code: {_repo}")
        if _repo != str(REPO):
            return 0
        print("steps for the DICOM folder, in one thread (s per image):")
        for name, sec in steps(model, dcm, args.batch, args.heatmap_side).items():
            print(f"  {name:<48} {sec / n * 1000:8.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
