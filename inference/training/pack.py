"""Packing a data layout (``dicom-node model pack-data``): a compact copy of ``msk-xray`` for carrying to a
training machine, and what the copy records about itself."""

from __future__ import annotations

import csv
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

from inference.training.data import IMAGE_SUFFIXES, hash_fraction

PACK_FILE = "pack.json"


def pack_layout(src: str | Path, dst: str | Path, long_side: int = 384, quality: int = 90,
                sample: int | None = None, workers: int = 2, command: str = "") -> dict:
    """A compact copy of a data layout for carrying to a training machine.

    FracAtlas images are downscaled (area) so that the long side is at most ``long_side`` and
    re-encoded as WebP ``quality``; ``labels.csv`` gains a ``file`` column naming the new file
    (the ``image_id`` and so the splits stay as they are) and its width/height become the stored
    size; ``boxes.csv`` (fractions) is copied. The knee set is copied as provided (its ids are
    its file names). ``sample`` keeps a deterministic subset per source (smoke tests; it changes
    FracAtlas's stratified split). Returns counts and bytes written.
    """
    import shutil

    src, dst = Path(src), Path(dst)
    stats = {"fracatlas": 0, "knee": 0, "bytes": 0}
    fa = src / "fracatlas"
    if (fa / "labels.csv").exists():
        rows = list(csv.DictReader(open(fa / "labels.csv", newline="")))
        if sample:
            rows = sorted(rows, key=lambda r: hash_fraction("pack:" + r["image_id"]))[:sample]
        (dst / "fracatlas" / "images").mkdir(parents=True, exist_ok=True)
        jobs = [(str(fa / "images" / (r.get("file") or r["image_id"])),
                 str(dst / "fracatlas" / "images" / (Path(r["image_id"]).stem + ".webp")), long_side, quality)
                for r in rows]
        with ProcessPoolExecutor(max(1, workers)) as ex:
            sizes = list(ex.map(_pack_one, jobs, chunksize=16))
        fields = list(rows[0].keys()) + ([] if "file" in rows[0] else ["file"])
        with open(dst / "fracatlas" / "labels.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fields)
            w.writeheader()
            for r, (_, out, _, _), (width, height, nbytes) in zip(rows, jobs, sizes):
                w.writerow({**r, "file": Path(out).name, "width": width, "height": height})
                stats["bytes"] += nbytes
        if (fa / "boxes.csv").exists():
            keep = {r["image_id"] for r in rows}
            with open(fa / "boxes.csv", newline="") as f_in, \
                    open(dst / "fracatlas" / "boxes.csv", "w", newline="") as f_out:
                rd = csv.DictReader(f_in)
                w = csv.DictWriter(f_out, rd.fieldnames)
                w.writeheader()
                w.writerows(b for b in rd if b["image_id"] in keep)
        stats["fracatlas"] = len(rows)
    knee = src / "knee-kl"
    if knee.is_dir():
        files = sorted(p for p in knee.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if sample:
            files = sorted(files, key=lambda p: hash_fraction("pack:" + str(p.relative_to(knee))))[:sample]
        for p in files:
            out = dst / "knee-kl" / p.relative_to(knee)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, out)
            stats["bytes"] += out.stat().st_size
        stats["knee"] = len(files)
    (dst / PACK_FILE).write_text(json.dumps({"command": command, "source": str(src), "long_side": long_side,
                                             "quality": quality, "sample": sample, **stats}, indent=2) + "\n")
    return stats


def pack_info(data_dir: str | Path) -> dict | None:
    """What :func:`pack_layout` recorded about a packed copy (None for the data as distributed)."""
    path = Path(data_dir) / PACK_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _pack_one(job) -> tuple[int, int, int]:
    src, out, long_side, quality = job
    from PIL import ImageFile

    ImageFile.LOAD_TRUNCATED_IMAGES = True
    with Image.open(src) as im:
        im = im.convert("L")
        f = long_side / max(im.size)
        if f < 1:
            im = im.resize((max(1, round(im.size[0] * f)), max(1, round(im.size[1] * f))), Image.Resampling.BOX)
        im.save(out, "WEBP", quality=quality, method=6)
        return im.size[0], im.size[1], os.path.getsize(out)
