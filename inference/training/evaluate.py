"""Evaluation of a bundle on a data layout: metrics.json and plots.

End to end on the image files, the way ``infer`` sees them (decode, the model's
preprocessing, encoder, heads, anomaly map), per split folder found.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from inference.training import data as D

log = logging.getLogger(__name__)


def sample_records(records: list[D.Record], n_per_source: int) -> list[D.Record]:
    """A deterministic sample: per (source, split) the ``n`` records first by sha256 of their id."""
    out = []
    for key in sorted({(r.source, r.split) for r in records}):
        group = [r for r in records if (r.source, r.split) == key]
        group.sort(key=lambda r: D.hash_fraction("sample:" + r.image_id))
        out += group[:n_per_source]
    return out


def binary_metrics(y: np.ndarray, p: np.ndarray, ops) -> dict:
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=float)
    out = {"n": int(len(y)), "positives": int(y.sum())}
    if len(set(y.tolist())) < 2:
        return out
    out["auroc"] = float(roc_auc_score(y, p))
    # calibration: do the probabilities read as frequencies? (log loss and Brier score; lower is better)
    q = np.clip(p, 1e-7, 1 - 1e-7)
    out["log_loss"] = float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))
    out["brier"] = float(np.mean((p - y) ** 2))
    out["mean_probability"] = float(p.mean())
    for name, thr in (("suspected", ops.suspected), ("definite", ops.definite)):
        pred = p >= thr
        out[name] = {"threshold": float(thr), "sensitivity": float(pred[y == 1].mean()),
                     "specificity": float((~pred[y == 0]).mean())}
    return out


def point_in_boxes(x: float, y: float, boxes_px) -> bool:
    return any(x0 <= x <= x1 and y0 <= y <= y1 for (x0, y0, x1, y1) in boxes_px)


def peak_in_boxes(m: np.ndarray, boxes_px) -> bool:
    r, c = np.unravel_index(int(np.argmax(m)), m.shape)
    return point_in_boxes(c + 0.5, r + 0.5, boxes_px)


def box_share(boxes_px, rows: int, cols: int) -> float:
    mask = np.zeros((rows, cols), bool)
    for (x0, y0, x1, y1) in boxes_px:
        mask[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] = True
    return float(mask.mean())


def region_centre_hits(region, boxes_px) -> list[int]:
    """Indices of the boxes that contain the centre of ``region``'s box."""
    x0, y0, x1, y1 = region.box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return [k for k, (a, b, c, d) in enumerate(boxes_px) if a <= cx <= c and b <= cy <= d]


def froc(candidates: list[tuple[float, int, list[int]]], n_images: int, n_boxes: int,
         rates=(0.5, 1.0, 2.0)) -> dict:
    """Free-response figure: ``candidates`` (score, image, boxes its centre lies in) of every reported region;
    the share of true boxes hit by a region scoring at least t, at the t where the false-positive regions
    (centre in no box) per image reach each of ``rates`` (the highest sensitivity reached, where the regions
    run out before that rate: then ``fp_per_image_reached`` says how far they went)."""
    hit: set = set()
    fps = 0
    sens = {r: 0.0 for r in rates}
    for _score, image, boxes in sorted(candidates, key=lambda c: -c[0]):
        if boxes:
            hit.update((image, k) for k in boxes)
        else:
            fps += 1
        for r in rates:
            if fps / max(n_images, 1) <= r:
                sens[r] = len(hit) / max(n_boxes, 1)
    return {"sensitivity_at_fp_per_image": {str(r): sens[r] for r in rates},
            "fp_per_image_reached": fps / max(n_images, 1), "boxes": n_boxes, "images": n_images}


def predict_records(model, records: list[D.Record], batch: int = 32):
    results = []
    t0 = time.time()
    for s in range(0, len(records), batch):
        chunk = records[s:s + batch]
        images = [D.read_image(r.path) for r in chunk]
        results += model.predict_arrays(images, [r.image_id for r in chunk])
        log.info("evaluated %d/%d images (%.0f s)", len(results), len(records), time.time() - t0)
    return results


def split_metrics(model, records: list[D.Record], results) -> dict:
    from sklearn.metrics import cohen_kappa_score, confusion_matrix

    from inference.domain import OUTSIDE_DOMAIN

    m: dict = {"images": len(records)}
    card = model.card
    declined = [not res.processed and (res.reason or "").startswith(OUTSIDE_DOMAIN) for res in results]
    src = np.array([r.source for r in records])
    m["domain"] = {"declined": int(sum(declined)), "decline_rate": float(np.mean(declined)) if declined else 0.0,
                   "decline_rate_by_source": {s: float(np.mean(np.array(declined)[src == s]))
                                              for s in sorted(set(src))}}
    frac = [(r, res) for r, res in zip(records, results) if r.fractured >= 0 and res.fracture is not None]
    if frac:
        y = np.array([r.fractured for r, _ in frac])
        p = np.array([res.fracture.probability for _, res in frac])
        m["fracture"] = binary_metrics(y, p, card.heads["fracture"].operating_points)
        # localisation: share of fractured images with boxes whose map peak falls inside a box
        hits_a, hits_f, hits_c, hits_r, shares = [], [], [], [], []
        candidates: list = []
        n_boxes = 0
        for k, (r, res) in enumerate(frac):
            bx = ([(x0 * res.columns, y0 * res.rows, x1 * res.columns, y1 * res.rows) for x0, y0, x1, y1 in r.boxes]
                  if r.fractured == 1 else [])
            # every reported fracture region (the node reports them on suspected and definite calls),
            # scored by the call's probability times the region's map score
            reported = [g for g in res.reported_regions() if g.source == "fracture"]
            candidates += [(res.fracture.probability * g.score, k, region_centre_hits(g, bx)) for g in reported]
            n_boxes += len(bx)
            if r.fractured != 1 or not r.boxes:
                continue
            # reported fracture region hit: a region the node reports has its centre inside a true box
            hits_r.append(any(region_centre_hits(g, bx) for g in reported))
            shares.append(box_share(bx, res.rows, res.columns))
            # a map that always peaks at the image's centre: what a hit rate must beat besides the box share
            hits_c.append(point_in_boxes(res.columns / 2, res.rows / 2, bx))
            if res.anomaly_map is not None:
                hits_a.append(peak_in_boxes(res.anomaly_map, bx))
            if res.fracture_map is not None:
                hits_f.append(peak_in_boxes(res.fracture_map, bx))
        if shares:
            m["localisation"] = {
                "images_with_boxes": len(shares),
                "box_share_of_image": float(np.mean(shares)),
                "centre_hit_rate": float(np.mean(hits_c)),
                "anomaly_map_hit_rate": float(np.mean(hits_a)) if hits_a else None,
                "fracture_map_hit_rate": float(np.mean(hits_f)) if hits_f else None,
                "fracture_region_hit_rate": float(np.mean(hits_r)),
                "fracture_region_froc": froc(candidates, len(frac), n_boxes),
            }
    kl = [(r, res) for r, res in zip(records, results) if r.kl >= 0]
    if kl and "kl_grade" in model.heads:
        y = np.array([r.kl for r, _ in kl])
        # grade every knee, also when the anatomy gate would not report it (gate counted separately)
        pred = np.array([res.kl_grade.index if res.kl_grade is not None else -1 for _, res in kl])
        reported = pred >= 0
        if (~reported).any():
            pred = pred.copy()
            pred[~reported] = _kl_ungated(model, [r for (r, _), rep in zip(kl, reported) if not rep])
        m["kl_grade"] = {"n": int(len(y)), "accuracy": float(np.mean(pred == y)),
                         "quadratic_kappa": float(cohen_kappa_score(y, pred, weights="quadratic")),
                         "mae": float(np.mean(np.abs(pred - y))),
                         "reported_share": float(reported.mean()),
                         "confusion": confusion_matrix(y, pred, labels=list(range(5))).tolist()}
    an = [(r, res) for r, res in zip(records, results) if r.anatomy >= 0 and res.anatomy is not None]
    if an:
        ok = np.array([res.anatomy.index == r.anatomy for r, res in an])
        src = np.array([r.source for r, _ in an])
        m["anatomy"] = {"n": int(len(ok)), "accuracy": float(ok.mean()),
                        "accuracy_by_source": {s: float(ok[src == s].mean()) for s in sorted(set(src))}}
    vw = [(r, res) for r, res in zip(records, results) if min(r.views) >= 0 and sum(r.views) > 0
          and res.view is not None]
    if vw:
        ok = np.array([r.views[res.view.index] == 1 for r, res in vw])
        single = np.array([sum(r.views) == 1 for r, _ in vw])
        src = np.array([r.source for r, _ in vw])
        m["view"] = {"n": int(len(ok)), "accuracy": float(ok.mean()),
                     "accuracy_single_view": float(ok[single].mean()) if single.any() else None,
                     "accuracy_fracatlas": float(ok[src == "fracatlas"].mean()) if (src == "fracatlas").any() else None}
    return m


def _kl_ungated(model, records):
    """KL grade of knees the anatomy gate did not pass (so KL metrics cover every knee)."""
    import torch

    from inference.heads import probabilities
    from inference.results import decide

    xs = [model.prepare(D.read_image(r.path))[0] for r in records]
    out = []
    for s in range(0, len(xs), 32):
        t, taps = model.encode(torch.from_numpy(np.stack(xs[s:s + 32]))[:, None], {"kl_grade"})
        o = model.run_heads(t, {"kl_grade"}, taps)["kl_grade"]
        p = probabilities("ordinal", o["logits"]).numpy()
        out += decide(p, model.card.heads["kl_grade"].decision).tolist()
    return np.array(out)


def headline(metrics: dict) -> dict:
    """The few numbers the card and the issue's targets talk about."""
    h = {}
    if "fracture" in metrics and "auroc" in metrics["fracture"]:
        h["fracture_auroc"] = metrics["fracture"]["auroc"]
    if "kl_grade" in metrics:
        h["kl_accuracy"] = metrics["kl_grade"]["accuracy"]
        h["kl_quadratic_kappa"] = metrics["kl_grade"]["quadratic_kappa"]
        h["kl_mae"] = metrics["kl_grade"]["mae"]
    if "anatomy" in metrics:
        h["anatomy_accuracy"] = metrics["anatomy"]["accuracy"]
    if "view" in metrics:
        h["view_accuracy"] = metrics["view"]["accuracy"]
    if "localisation" in metrics:
        h["anomaly_map_hit_rate"] = metrics["localisation"]["anomaly_map_hit_rate"]
        h["fracture_map_hit_rate"] = metrics["localisation"]["fracture_map_hit_rate"]
        h["box_share_of_image"] = metrics["localisation"]["box_share_of_image"]
        h["centre_hit_rate"] = metrics["localisation"]["centre_hit_rate"]
        h["fracture_region_hit_rate"] = metrics["localisation"]["fracture_region_hit_rate"]
        for rate, sens in metrics["localisation"]["fracture_region_froc"]["sensitivity_at_fp_per_image"].items():
            h[f"fracture_region_sensitivity_at_{rate}_fp"] = sens
    if "domain" in metrics:
        h["outside_domain_decline_rate"] = metrics["domain"]["decline_rate"]
    return h


def evaluate(bundle: str | None, data_dir: str, out_dir: str, *, splits: tuple[str, ...] | None = None,
             sample: int | None = None, label_efficiency: bool = False, device: str | None = None,
             plots: bool = True, label_counts=(25, 50, 100, 200, None), repeats: int = 5,
             cache_dir: str | None = None) -> dict:
    from inference.bundle import load_bundle

    model = load_bundle(bundle, device)
    records = D.read_layout(data_dir)
    found = sorted({r.split for r in records})
    use = [s for s in found if splits is None or s in splits]
    if sample:
        records = sample_records(records, sample)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {"bundle": str(model.root), "model": model.info.name, "version": model.info.version,
               "weights_sha256": model.info.weights_sha256, "data": str(data_dir),
               "sample_per_source": sample, "splits": {}}
    per_split = {}
    for split in use:
        recs = [r for r in records if r.split == split]
        if not recs:
            continue
        res = predict_records(model, recs)
        per_split[split] = (recs, res)
        sm = split_metrics(model, recs, res)
        sm["headline"] = headline(sm)
        metrics["splits"][split] = sm
    if label_efficiency:
        metrics["label_efficiency"] = label_efficiency_curve(model.root, data_dir, label_counts, repeats, cache_dir)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if plots:
        from inference.training import plots as P

        for split, (recs, res) in per_split.items():
            P.roc_plot(recs, res, out / f"roc_{split}.png", model)
            if "kl_grade" in metrics["splits"][split]:
                P.confusion_plot(metrics["splits"][split]["kl_grade"]["confusion"], out / f"kl_confusion_{split}.png")
            P.heatmap_grid(recs, res, out / f"heatmaps_{split}.png")
        if label_efficiency:
            P.label_efficiency_plot(metrics["label_efficiency"], out / "label_efficiency.png")
    return metrics


def label_efficiency_curve(bundle, data_dir, counts=(25, 50, 100, 200, None), repeats: int = 5,
                           cache_dir: str | None = None) -> dict:
    """AUROC on val of the hardware (implant) head fit with 25, 50, ... and all train labels."""
    from sklearn.metrics import roc_auc_score

    from inference.training.heads_fit import fit_head
    from inference.training.tokens import Embedded

    records = [r for r in D.read_layout(data_dir) if r.source == "fracatlas"]
    emb = Embedded(bundle, records, cache_dir)
    rows = []
    for n in counts:
        aucs = []
        for rep in range(repeats if n is not None else 1):
            fit = fit_head(emb, "hardware", max_labels=n if n is not None else 10 ** 9, seed=rep, epochs=60)
            aucs.append(float(roc_auc_score(fit["val_y"], fit["val_p"])))
        rows.append({"labels": n if n is not None else fit["train_images"], "all": n is None,
                     "auroc_mean": float(np.mean(aucs)), "auroc_sd": float(np.std(aucs)), "aurocs": aucs})
        log.info("hardware head with %s labels: AUROC %.3f +- %.3f", rows[-1]["labels"], np.mean(aucs), np.std(aucs))
    return {"label": "hardware (implant present), FracAtlas", "head": "linear probe on frozen embeddings",
            "sampling": "seeded; up to half of the sampled images positive; 'all' = every train image",
            "val_images": int(len(fit["val_y"])), "val_positives": int(np.sum(fit["val_y"])), "points": rows}
