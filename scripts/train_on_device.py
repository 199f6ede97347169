#!/usr/bin/env python3
"""One short accelerator run for a stronger encoder (issue 17, item 4): every step, in order, in one process.

The budget is about 15 minutes of device time in all, start-up included, so this is one prepared
script, run once: it continues the shipped encoder's MAE pretraining at a higher input size (its
position embeddings are fixed sine-cosine, so every weight carries over), adapts it on the labels,
fits the heads, the anomaly statistics and the out-of-domain bank, evaluates on val and writes the
candidate bundle with its metrics under ``--out``. The two encoder steps have their own minutes
(:data:`BUDGET`); one that runs out stops after its current epoch and the next step starts, so the whole
stays inside about 10 minutes of device time.

On the development machine (no accelerator) ``--smoke`` runs the same steps on a small sample with
tiny budgets, on the CPU: that is how the script is tested before a device is spent on it.

    # here: pack the data to carry (FracAtlas as WebP at 384 px), then try the script on the CPU
    dicom-node model pack-data --data ../shared/data/msk-xray --out pack
    python scripts/train_on_device.py --data pack --out /tmp/run --smoke
    # on the device (`run` with carry ["pack"]):
    python scripts/train_on_device.py --data pack --out "$OUT" --device cuda

The candidate is not shipped by this script: compare its ``run.json`` with the shipped card's figures,
choose on the development figures, and only then copy it over ``inference/bundles/msk-foundation``
(carrying the card's notes over).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dicom_node.cli import main as node  # noqa: E402

SHIPPED = ROOT / "inference" / "bundles" / "msk-foundation"
#: minutes for the two encoder steps on the device (the heads, the domain bank and evaluation take the rest)
BUDGET = {"mae": 3.5, "adapt": 3.0}


def step(name: str, argv: list[str], log: list[dict]) -> None:
    t0 = time.time()
    print(f"== {name}: dicom-node {' '.join(argv)}", flush=True)
    rc = node(argv)
    log.append({"step": name, "argv": argv, "rc": rc, "seconds": round(time.time() - t0, 1)})
    if rc != 0:
        raise SystemExit(f"{name} failed (exit {rc})")


def run(args) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    data = str(args.data)
    dev = ["--device", args.device]
    threads = ["--threads", str(args.threads)] if args.threads else []
    smoke = args.smoke
    size = str(args.image_size if not smoke else 96)
    log: list[dict] = []
    t0 = time.time()
    if smoke:  # a small sample of the data, and a tiny encoder of the shipped kind to continue
        sample = work / "sample"
        step("sample", ["model", "pack-data", "--data", data, "--out", str(sample), "--sample", "60"], log)
        data = str(sample)
        init = work / "tiny"
        step("tiny encoder", ["model", "pretrain", "--data", data, "--out", str(init), "--image-size", "64",
                              "--dim", "32", "--depth", "2", "--heads", "2", "--decoder-dim", "32",
                              "--decoder-depth", "1", "--decoder-heads", "2", "--epochs", "1",
                              "--batch-size", "16", "--cache", str(work / "c64.npz"), *threads], log)
    else:
        init = Path(args.init or SHIPPED)
    scale = 0.05 if smoke else 1.0
    pre, adapted = out / "pretrained", out / "bundle"
    step("mae", ["model", "pretrain", "--init", str(init), "--image-size", size, "--data", data, "--out", str(pre),
                 "--epochs", str(1 if smoke else args.mae_epochs), "--batch-size", str(16 if smoke else 256),
                 "--lr", "2e-4", "--max-minutes", str(BUDGET["mae"] * scale), "--cache",
                 str(work / f"c{size}.npz"), *dev, *threads], log)
    step("adapt", ["model", "pretrain", "--init", str(pre), "--supervised-epochs",
                   str(1 if smoke else args.adapt_epochs), "--data", data, "--out", str(adapted),
                   "--batch-size", str(16 if smoke else 128), "--max-minutes", str(BUDGET["adapt"] * scale),
                   "--cache", str(work / f"c{size}.npz"), *dev, *threads], log)
    heads = ["model", "fit-heads", "--bundle", str(adapted), "--data", data, "--cache-dir", str(work), *dev, *threads]
    # the recipes of the shipped heads (their card's commands): fracture at lr 3e-4, the KL branch from
    # augmented images (the slowest head: fewer epochs at the larger size), the others at the default lr
    step("fracture head", [*heads, "--head", "fracture", "--epochs", str(1 if smoke else 20), "--lr", "3e-4"], log)
    step("anatomy, view, anomaly", [*heads, "--head", "anatomy", "--head", "view", "--head", "anomaly",
                                    "--epochs", str(1 if smoke else 20)], log)
    step("kl grade head", [*heads, "--head", "kl_grade", "--epochs", str(1 if smoke else args.kl_epochs),
                           *(["--arch", "branch_depth=1"] if smoke else [])], log)  # the tiny encoder has 2 blocks
    step("domain", ["model", "fit-domain", "--bundle", str(adapted), "--data", data, "--cache-dir", str(work),
                    *threads], log)
    step("evaluate", ["model", "evaluate", "--bundle", str(adapted), "--data", data, "--out", str(out / "eval"),
                      "--splits", "val", "--record", "--no-plots", *dev, *threads], log)
    step("card", ["model", "card", "--bundle", str(adapted)], log)
    shutil.rmtree(work, ignore_errors=True)  # caches: not worth carrying back
    size_mb = sum(p.stat().st_size for p in adapted.rglob("*") if p.is_file()) / 2 ** 20
    metrics = json.loads((adapted / "configs" / "metadata.json").read_text())["msk_node"]["validation_metrics"]
    summary = {"minutes": round((time.time() - t0) / 60, 2), "bundle_mb": round(size_mb, 1), "steps": log,
               "val": metrics.get("val", {})}
    (out / "run.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "steps"}, indent=1))
    return out


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="the data (a pack-data copy on the device)")
    p.add_argument("--out", required=True, help="where the candidate bundle, its metrics and run.json go")
    p.add_argument("--init", help="encoder to continue (default: the shipped bundle)")
    p.add_argument("--image-size", type=int, default=384, help="input size to continue the encoder at")
    p.add_argument("--mae-epochs", type=int, default=60)
    p.add_argument("--adapt-epochs", type=int, default=40)
    p.add_argument("--kl-epochs", type=int, default=8)
    p.add_argument("--device", default="cuda")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--smoke", action="store_true", help="a sample and tiny budgets, on the CPU (the test run)")
    args = p.parse_args(argv)
    if args.smoke:
        args.device = "cpu"
    return args


if __name__ == "__main__":
    run(parse())
