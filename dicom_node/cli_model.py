"""Model commands: ``model pretrain|fit-heads|evaluate`` (``infer`` is :mod:`dicom_node.cli_infer`).

torch and the model code are imported inside the handlers, so node commands
(``serve``, ``status``, ...) start without loading them.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys

log = logging.getLogger("dicom_node.model")


def _command_line() -> str:
    return "dicom-node " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _threads(args) -> None:
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def _key_values(items, option: str, convert, expected: str) -> dict:
    """``KEY=VALUE`` options (repeatable) -> {KEY: convert(VALUE)}; a malformed one exits naming ``option``."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[key] = convert(value)
        except ValueError:
            raise SystemExit(f"{option} {item!r}: expected {expected}") from None
    return out


def _json_or_text(value: str):
    try:
        return json.loads(value)
    except ValueError:
        return value


DEV_SPLIT_CHOICES = ("patient", "image", "image-exclusive")  # = inference.training.splits.DEV_SPLITS (no torch here)


def _dev_split_option(p, default: str | None) -> None:
    p.add_argument("--dev-split", choices=DEV_SPLIT_CHOICES, default=default,
                   help="how the development split is held out: by patient where the data names one; by image "
                        "(how heads and the encoder adaptation before model 0.4.0 were selected); image-exclusive: "
                        "by image, with those patients' other images left out of training"
                        + (f" (default: {default})" if default else
                           " (default: the split the encoder's adaptation held out, made patient-disjoint, so that "
                           "neither the encoder nor the head trained on it)"))


def cmd_pretrain(args) -> int:
    _threads(args)
    from inference.training.adapt import adapt
    from inference.training.pretrain import pretrain

    if args.supervised_epochs:
        if not args.init:
            raise SystemExit("--supervised-epochs adapts a pretrained encoder: give --init BUNDLE")
        if args.image_size is not None:
            raise SystemExit("--image-size: adaptation keeps the --init encoder's input size (continue it at "
                             "another size with MAE pretraining first: pretrain --init B --image-size N)")
        out = adapt(args.init, args.data, args.out, epochs=args.supervised_epochs, seed=args.seed,
                    cache=args.cache, threads=args.threads, device=args.device, max_minutes=args.max_minutes,
                    command=_command_line(), lr=args.lr if args.lr is not None else 2e-4,
                    batch_size=args.batch_size, mae_weight=args.mae_weight, gamma=args.gamma,
                    stop_after_epochs=args.stop_after_epochs, dev_split_by=args.dev_split,
                    head_weights=_key_values(args.head_weight, "--head-weight", float, "NAME=NUMBER"))
        print(f"adapted encoder written to {out}")
        return 0
    arch = {k: getattr(args, k) for k in ("dim", "depth", "heads", "decoder_dim", "decoder_depth", "decoder_heads")
            if getattr(args, k) is not None}
    out = pretrain(args.data, args.out, image_size=args.image_size, epochs=args.epochs, batch_size=args.batch_size,
                   lr=args.lr if args.lr is not None else 5e-4, seed=args.seed, cache=args.cache, init=args.init,
                   threads=args.threads, device=args.device, max_minutes=args.max_minutes, command=_command_line(),
                   splits=tuple(args.splits.split(",")), stop_after_epochs=args.stop_after_epochs, arch=arch,
                   gamma=args.gamma)
    print(f"pretrained encoder written to {out}")
    return 0


def register(sub) -> None:
    """Add the model subcommands to the ``dicom-node`` parser."""
    m = sub.add_parser("model", help="train and evaluate the model (pretrain, fit-heads, evaluate)")
    msub = m.add_subparsers(dest="model_command", required=True, metavar="MODEL_COMMAND")

    p = msub.add_parser("pretrain", help="self-supervised MAE pretraining of the encoder")
    p.add_argument("--data", required=True, help="data directory (fracatlas/ and/or knee-kl/)")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--image-size", type=int, default=None,
                   help="input size (256; with --init: that encoder's, or continue it at this size)")
    for name, help_ in (("dim", "encoder width (256)"), ("depth", "encoder blocks (8)"),
                        ("heads", "encoder attention heads (4)"), ("decoder-dim", "MAE decoder width (192)"),
                        ("decoder-depth", "MAE decoder blocks (3)"), ("decoder-heads", "MAE decoder heads (6)")):
        p.add_argument(f"--{name}", type=int, default=None, help=help_)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--gamma", type=float, default=0.25, help="random gamma exp(U(-g, g)) per training image")
    p.add_argument("--mae-weight", type=float, default=1.0, help="MAE loss weight during --supervised-epochs")
    p.add_argument("--head-weight", action="append", metavar="NAME=W",
                   help="loss weight of a task during --supervised-epochs (fracture, kl_grade, anatomy, view; 1)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (5e-4 MAE, 2e-4 adaptation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--supervised-epochs", type=int, default=0,
                   help="instead of MAE: adapt the --init encoder on the training labels for N epochs "
                        "(MAE loss kept, so the anomaly maps stay valid)")
    p.add_argument("--splits", default="train", help="comma-separated splits to pretrain on (default: train)")
    p.add_argument("--init", default=None, help="continue from this bundle's encoder")
    p.add_argument("--cache", default=None, help="decoded-image cache (.npz; default /tmp/msk-cache-SIZE.npz)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-minutes", type=float, default=None, help="stop after the epoch that passes this")
    p.add_argument("--stop-after-epochs", type=int, default=None,
                   help="stop after N epochs of a schedule planned for --epochs (deterministic)")
    _dev_split_option(p, "patient")
    p.set_defaults(func=cmd_pretrain)
    register_more(sub, msub)


# ----------------------------------------------------------------------------------------------
# fit-heads / evaluate


def cmd_fit_heads(args) -> int:
    _threads(args)
    from inference.training import data as D
    from inference.training.heads_fit import HEAD_DEFAULTS, fit_anomaly, fit_head, save_head
    from inference.training.tokens import Embedded

    command = _command_line()
    if args.labels:
        records, classes = D.read_label_csv(args.labels, args.label_column, args.images)
        if len(args.head) != 1 or args.head[0] == "anomaly":
            raise SystemExit("--labels trains exactly one --head")
        name = args.head[0]
        kind = "binary" if len(classes) == 2 else "categorical"
        labels = ["absent", "present"] if kind == "binary" else classes
        if name in HEAD_DEFAULTS and HEAD_DEFAULTS[name][0] != kind:
            raise SystemExit(f"head {name!r} is {HEAD_DEFAULTS[name][0]}, the CSV has {len(classes)} classes")
    elif args.data:
        records = D.read_layout(args.data)
        kind, labels = None, None
    else:
        raise SystemExit("give --data DIR (msk-xray layout) or --labels CSV")
    arch = _key_values(args.arch, "--arch", _json_or_text, "KEY=VALUE")
    emb = Embedded(args.bundle, records, args.cache_dir, device=args.device)
    for name in args.head:
        if name == "anomaly":
            info = fit_anomaly(emb, args.bundle, seed=args.seed, command=command)
            print(f"anomaly statistics from {info['normal_images']} normal training images written")
            continue
        fit = fit_head(emb, name, kind=kind, labels=labels, epochs=args.epochs, seed=args.seed,
                       max_labels=args.max_labels, arch=arch, lr=args.lr, dev_split_by=args.dev_split)
        save_head(args.bundle, name, fit, command=command, extra={"seed": args.seed, "epochs": args.epochs,
                                                                   "max_labels": args.max_labels})
        msg = (f"head {name}: {fit['train_images']} train images, epoch {fit['selection']['best_epoch']}, "
               f"dev score {fit['selection']['dev_score']:.3f} "  # nan when a label budget left no dev set
               f"({fit['dev_images']} images held out by {fit['dev_split']})")
        if fit.get("calibration"):
            msg += f", Platt scaling {fit['calibration']['scale']:.4f} x logit {fit['calibration']['shift']:+.4f}"
        if "operating_points" in fit:
            op = fit["operating_points"]
            msg += f", thresholds suspected {op['suspected']:.4f} definite {op['definite']:.4f}"
        print(msg)
    return 0


def cmd_calibrate(args) -> int:
    _threads(args)
    from inference.training import data as D
    from inference.training.calibrate import calibrate_head
    from inference.training.tokens import Embedded

    emb = Embedded(args.bundle, D.read_layout(args.data), args.cache_dir, device=args.device)
    for name in args.head:
        try:
            entry = calibrate_head(emb, args.bundle, name, command=_command_line())
        except ValueError as exc:
            raise SystemExit(f"calibrate: {exc}") from None
        cal, op = entry["calibration"], entry["operating_points"]
        print(f"head {name}: Platt scaling {cal['scale']:.4f} x logit {cal['shift']:+.4f} on {cal['images']} "
              f"development images, log loss {cal['log_loss_before']:.4f} -> {cal['log_loss_after']:.4f}; "
              f"thresholds suspected {op['suspected']:.4f} definite {op['definite']:.4f}")
    return 0


def cmd_evaluate(args) -> int:
    _threads(args)
    from inference.training.evaluate import evaluate

    splits = tuple(args.splits.split(",")) if args.splits else None
    metrics = evaluate(args.bundle, args.data, args.out, splits=splits, sample=args.sample,
                       label_efficiency=args.label_efficiency, device=args.device, plots=not args.no_plots,
                       cache_dir=args.cache_dir)
    if args.record:
        from inference.bundle import read_metadata, write_metadata

        meta = read_metadata(args.bundle)
        key = "validation_metrics_sample" if args.sample else "validation_metrics"
        rec = {split: m["headline"] for split, m in metrics["splits"].items()}
        rec["command"] = _command_line()
        if args.sample:
            rec["sample_per_source"] = args.sample
        if "label_efficiency" in metrics:
            rec["label_efficiency"] = metrics["label_efficiency"]
        rec["details"] = {split: {k: v for k, v in m.items() if k != "headline"}
                          for split, m in metrics["splits"].items()}
        meta["msk_node"][key] = rec
        write_metadata(args.bundle, meta)
    for split, m in metrics["splits"].items():
        print(f"[{split}] " + ", ".join(f"{k} {v:.3f}" for k, v in m["headline"].items() if v is not None))
    if "label_efficiency" in metrics:
        for p in metrics["label_efficiency"]["points"]:
            print(f"[label efficiency] hardware, {p['labels']} labels: AUROC {p['auroc_mean']:.3f} "
                  f"+- {p['auroc_sd']:.3f}")
    print(f"metrics and plots written to {args.out}")
    return 0


def cmd_fit_domain(args) -> int:
    _threads(args)
    from inference.training.domain_fit import fit_domain

    entry = fit_domain(args.bundle, args.data, args.cache_dir, bank_size=args.bank_size,
                       top_fraction=args.top_fraction, quantile=args.quantile, content_std=args.content_std,
                       min_side=args.min_side, seed=args.seed, command=_command_line())
    print(f"domain bank of {entry['bank_vectors']} patch tokens from {entry['bank_images']} training images; "
          f"threshold {entry['threshold']:.4f} (quantile {entry['threshold_quantile']} of {entry['dev_images']} "
          f"development images)")
    return 0


def cmd_card(args) -> int:
    from inference.training.model_card import write

    print(f"model card written to {write(args.bundle)}")
    return 0


def cmd_pack_data(args) -> int:
    from inference.training.pack import pack_layout

    stats = pack_layout(args.data, args.out, long_side=args.long_side, quality=args.quality, sample=args.sample,
                        workers=args.workers, command=_command_line())
    print(f"packed {stats['fracatlas']} FracAtlas and {stats['knee']} knee images into {args.out} "
          f"({stats['bytes'] / 1e6:.1f} MB)")
    return 0


def register_more(sub, msub) -> None:
    p = msub.add_parser("pack-data", help="compact copy of a data layout (FracAtlas as WebP) for a training machine")
    p.add_argument("--data", required=True, help="data directory (fracatlas/ and/or knee-kl/)")
    p.add_argument("--out", required=True)
    p.add_argument("--long-side", type=int, default=384)
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--sample", type=int, default=None, help="deterministic subset of N images per source")
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(func=cmd_pack_data)

    p = msub.add_parser("fit-heads", help="train task heads (or anomaly statistics) on frozen embeddings")
    p.add_argument("--bundle", required=True, help="bundle to add the heads to (written in place)")
    p.add_argument("--data", default=None, help="data directory (fracatlas/ and/or knee-kl/)")
    p.add_argument("--labels", default=None, help="CSV with an image/image_id column and a label column")
    p.add_argument("--label-column", default="label")
    p.add_argument("--images", default=None, help="folder the CSV's images are in (default: beside the CSV)")
    p.add_argument("--head", action="append", required=True,
                   help="fracture, kl_grade, anatomy, view, hardware, tumour, anomaly or a new name (repeatable)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-labels", type=int, default=None, help="train on this many labelled images only")
    p.add_argument("--arch", action="append", metavar="KEY=VALUE",
                   help="override a head setting (hidden, dropout, pool_heads, ordinal_weight, ...); repeatable")
    p.add_argument("--lr", type=float, default=1e-3, help="head learning rate")
    p.add_argument("--cache-dir", default=None, help="where decoded images and embeddings are cached (/tmp)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    _dev_split_option(p, None)
    p.set_defaults(func=cmd_fit_heads)

    p = msub.add_parser("calibrate",
                        help="Platt-scale binary heads on their development split; thresholds again on val")
    p.add_argument("--bundle", required=True)
    p.add_argument("--data", required=True, help="data directory (msk-xray layout) the heads were fitted on")
    p.add_argument("--head", action="append", required=True, help="binary head (repeatable)")
    p.add_argument("--cache-dir", default=None, help="where decoded images and embeddings are cached (/tmp)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_calibrate)

    p = msub.add_parser("evaluate", help="metrics.json and plots on every split found under --data")
    p.add_argument("--bundle", default=None, help="bundle (default: the shipped model)")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--splits", default=None, help="comma-separated splits (default: all found)")
    p.add_argument("--sample", type=int, default=None, help="deterministic sample of N images per source and split")
    p.add_argument("--label-efficiency", action="store_true", help="hardware AUROC against number of labels")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--record", action="store_true", help="record the metrics in the bundle's card")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_evaluate)

    p = msub.add_parser("fit-domain", help="fit the out-of-domain decline: a patch-token memory bank of the "
                                           "training images and a threshold on the development images")
    p.add_argument("--bundle", required=True, help="bundle to add the bank to (written in place)")
    p.add_argument("--data", required=True, help="data directory (fracatlas/ and/or knee-kl/)")
    p.add_argument("--bank-size", type=int, default=1024, help="patch tokens kept (greedy k-centre coreset)")
    p.add_argument("--content-std", type=float, default=0.05,
                   help="a patch counts (bank and score) when its pixel standard deviation exceeds this")
    p.add_argument("--min-side", type=int, default=128, help="images with a smaller long side are declined")
    p.add_argument("--top-fraction", type=float, default=0.1,
                   help="an image's score: the mean of this share of its largest patch distances")
    p.add_argument("--quantile", type=float, default=0.995, help="threshold: this quantile of development scores")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None, help="where the tokens are cached")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_fit_domain)

    p = msub.add_parser("card", help="render the bundle's docs/README.md model card from its metadata")
    p.add_argument("--bundle", required=True)
    p.set_defaults(func=cmd_card)
