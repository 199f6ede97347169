"""Inference speed: ``infer`` end to end against the bare encoder forward pass, on the same images, in one run.

    .venv/bin/python bench/bench_infer.py [--bundle PATH] [--images 32] [--threads 2] [--device cpu]

Images: the real CR radiographs of pydicom-data (RG1 chest 1955x1841 15-bit, RG3 leg
1760x1760 10-bit; uncompressed, JPEG 2000 lossless and lossy), repeated to --images.
Printed: images/s of

- end to end: ``Model.predict_datasets`` on the datasets (decode incl. JPEG 2000 at the reduced
  resolution the model needs, VOI, preprocessing, encoder, every head, anomaly map, maps back to
  source geometry, regions)
- the same with every image decoded in full first (as before issue 16)
- end to end, pixels already decoded: ``Model.predict_arrays`` on the displayed images
- bare encoder: ``model.mae.encoder`` on the already preprocessed batch

and the ratios; then the cost of all heads and of the anomaly map (complementary-mask
reconstruction) relative to one encoder pass over the same batch. The heads figure runs every
head on every image, the knee-only KL branch (its own copy of the last encoder block) included:
an upper bound, since the node runs that branch only on images the anatomy gate calls knees.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
import torch  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402

from inference import load_bundle  # noqa: E402
from inference.anomaly import reconstruction_error  # noqa: E402
from inference.pixels import display_uint8  # noqa: E402

FILES = ["RG3_UNCR.dcm", "RG3_J2KR.dcm", "RG3_J2KI.dcm", "RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm"]


def timed(fn, repeats: int) -> float:
    """Median wall time of ``repeats`` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default=None)
    ap.add_argument("--files", default=None, help="folder holding the RG*.dcm files (default: pydicom-data)")
    args = ap.parse_args()
    path_of = (lambda f: str(Path(args.files) / f)) if args.files else get_testdata_file
    torch.set_num_threads(args.threads)
    model = load_bundle(args.bundle, args.device)
    model.batch_size = args.batch
    dev = model.device
    datasets = [pydicom.dcmread(path_of(FILES[i % len(FILES)])) for i in range(args.images)]
    shown = [display_uint8(ds) for ds in datasets]
    x = torch.from_numpy(np.stack([model.prepare(a)[0] for a in shown]))[:, None].to(dev)
    n = len(datasets)

    def sync():
        if dev.startswith("cuda"):
            torch.cuda.synchronize()

    raw = [Path(path_of(FILES[i % len(FILES)])).read_bytes() for i in range(args.images)]

    def end_to_end():
        # parse and decode from the file bytes each time, as a received instance would be
        model.predict_datasets([pydicom.dcmread(io.BytesIO(b)) for b in raw])
        sync()

    def end_to_end_full():
        # the same, every image decoded in full first, as before issue 16 (no reduced-resolution decoding)
        dss = [pydicom.dcmread(io.BytesIO(b)) for b in raw]
        model.predict_datasets(dss, decoded=[display_uint8(ds) for ds in dss])
        sync()

    def arrays():
        model.predict_arrays(shown)
        sync()

    @torch.no_grad()
    def encoder(bf16: bool = False):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            for s in range(0, n, args.batch):
                model.mae.encoder(x[s:s + args.batch])
        sync()

    toks = [model.encode(x[s:s + args.batch]) for s in range(0, n, args.batch)]

    @torch.no_grad()
    def heads():  # every head on every image: a branch head (KL grade) as if all were knees, the upper bound
        for t, taps in toks:
            model.run_heads(t, None, taps)
        sync()

    groups = int(model.card.anomaly.get("groups", 4))
    passes = tuple(model.card.anomaly["passes"]) if model.card.anomaly.get("passes") else None

    @torch.no_grad()
    def anomaly():
        for s in range(0, n, args.batch):
            reconstruction_error(model.mae, x[s:s + args.batch], groups, passes)
        sync()

    t_e2e = timed(end_to_end, args.repeats)
    t_full = timed(end_to_end_full, args.repeats)
    t_arr = timed(arrays, args.repeats)
    t_enc = timed(encoder, args.repeats)
    t_heads = timed(heads, args.repeats)
    t_anom = timed(anomaly, args.repeats)
    print(f"device {dev}, {torch.get_num_threads()} threads, {n} images "
          f"({', '.join(sorted(set(FILES)))}), batch {args.batch}, model {model.info.name} {model.info.version}, "
          f"input {model.cfg.image_size}px, {len(model.heads)} heads: {', '.join(model.heads)}")
    print(f"end to end (DICOM decode .. maps):     {n / t_e2e:8.1f} images/s")
    print(f"end to end, decoded in full (before):  {n / t_full:8.1f} images/s  (reduced: x{t_full / t_e2e:.2f})")
    print(f"end to end, pixels already decoded:    {n / t_arr:8.1f} images/s")
    print(f"bare encoder forward (same images):    {n / t_enc:8.1f} images/s")
    if dev.startswith("cuda"):
        t_bf16 = timed(lambda: encoder(bf16=True), args.repeats)
        print(f"bare encoder forward, bf16 autocast:   {n / t_bf16:8.1f} images/s  (x{t_enc / t_bf16:.2f} over fp32)")
    print(f"ratio end-to-end / bare encoder:       {t_enc / t_e2e:8.3f}  (bare encoder is {t_e2e / t_enc:.1f}x faster)")
    print(f"ratio decoded-pixels / bare encoder:   {t_enc / t_arr:8.3f}  (bare encoder is {t_arr / t_enc:.1f}x faster)")
    print(f"all heads, cost in encoder passes:     {t_heads / t_enc:8.3f}")
    print(f"anomaly map ({len(passes or range(groups))} complementary passes):   {t_anom / t_enc:8.3f}")
    print(f"heads + anomaly map, in encoder passes:{(t_heads + t_anom) / t_enc:8.3f}  (must be well under 3)")
    print(f"encoder + heads + anomaly map:         {(t_enc + t_heads + t_anom) / t_enc:8.3f} encoder passes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
