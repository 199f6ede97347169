"""The bundle's model card for people (``docs/README.md``), rendered from its ``configs/metadata.json``.

Numbers come from the card only (recorded by ``fit-heads`` and ``evaluate --record``),
so the text and the machine-readable card cannot disagree.
"""

from __future__ import annotations

from pathlib import Path

from inference.card import adapt_stages, read_card
from inference.heads import input_layer

TARGETS = {  # issue 3: floors on the val splits
    "fracture_auroc": (0.80, "Fracture AUROC"),
    "kl_accuracy": (0.60, "KL grade accuracy"),
    "kl_quadratic_kappa": (0.75, "KL grade quadratic weighted kappa"),
    "anatomy_accuracy": (0.95, "Anatomy accuracy"),
}

DEV_SPLIT_TEXT = {"patient": "by patient", "image": "by image",
                  "image-exclusive": "by image (the images the encoder's adaptation held out), the same patients' "
                                     "other images left out of the head's training"}


def _f(v, nd=3):
    return "n/a" if v is None else f"{v:.{nd}f}"


def _param_counts(card) -> tuple[int, int]:
    """(encoder, decoder) parameter counts from the safetensors header (no torch)."""
    from safetensors import safe_open

    enc = dec = 0
    with safe_open(str(card.root / card.architecture["file"]), framework="np") as f:
        for k in f.keys():
            n = 1
            for d in f.get_slice(k).get_shape():
                n *= d
            if k.startswith("encoder."):
                enc += n
            else:
                dec += n
    return enc, dec


def _minutes(tr: dict) -> float:
    """Wall minutes of pretraining + adaptation(s), from the recorded histories."""
    pre = tr.get("pretrain", {})
    stages = [pre] + adapt_stages(pre)
    return sum(st["history"][-1]["seconds"] / 60 for st in stages if st.get("history"))


def _where(pre: dict) -> str:
    """The training machine as recorded (``device``), in words."""
    dev = str(pre.get("device") or "")
    if dev.startswith("cuda"):
        return f"one GPU ({dev.split('(', 1)[-1].rstrip(')')})" if "(" in dev else "one GPU"
    return "a 2-core CPU"


def render(root: str | Path) -> str:
    card = read_card(Path(root))
    meta = card.meta
    node = meta["msk_node"]
    cfg = node["architecture"]["config"]
    tr = node.get("training", {})
    pre = tr.get("pretrain", {})
    vm = node.get("validation_metrics", {})
    val = vm.get("val", {})
    details = vm.get("details", {}).get("val", {})
    L = []
    a = L.append
    a(f"# {card.name} {card.version}: model card\n")
    a("A small Vision Transformer for musculoskeletal radiographs, pretrained self-supervised as a masked "
      "autoencoder (MAE), with task heads on its embedding (fracture with a localisation map, knee "
      "osteoarthritis Kellgren-Lawrence grade, anatomy, view) and reconstruction-error anomaly maps. "
      f"Trained by the msk-dicom-node project on public data (below) on {_where(pre)}.\n")
    a("**Not for diagnostic use.** Research and workflow prototyping only: the node labels every result it "
      "sends as produced by an unvalidated algorithm.\n")

    a("## Architecture and input\n")
    enc_params, dec_params = _param_counts(card)
    a(f"- Encoder: ViT ({enc_params / 1e6:.2f} M parameters), single channel, {cfg['image_size']}x{cfg['image_size']} px input, patch "
      f"{cfg['patch_size']} ({cfg['image_size'] // cfg['patch_size']}x{cfg['image_size'] // cfg['patch_size']} "
      f"patches), width {cfg['dim']}, depth {cfg['depth']}, {cfg['heads']} attention heads, class token, fixed "
      f"2-D sin-cos position embeddings. Our own implementation (inference/vit.py) rather than MONAI's "
      f"MaskedAutoEncoderViT, because the anomaly map needs control of the masks and the heads need the patch "
      f"tokens.")
    a(f"- MAE decoder ({dec_params / 1e6:.2f} M parameters): width {cfg['decoder_dim']}, depth {cfg['decoder_depth']}, mask ratio "
      f"{cfg['mask_ratio']:.2f}; kept in the bundle for the anomaly maps.")
    a("- Preprocessing (inference/pixels.py, inference/preprocess.py), identical at training and inference: "
      "the displayed image (DICOM: modality LUT, VOI LUT or window, or a 0.5-99.5 percentile window when there "
      "is none / FOR PROCESSING / the window is unusable; MONOCHROME1 inverted; RGB made grey), area-downscaled "
      "so that the long side is the input size, centred on a square black canvas, standardised to zero mean and "
      "unit variance over the image.")
    a("- The encoder runs once per image; every head reads its tokens (class token + patch tokens).\n")

    a("## Training data and attribution\n")
    a("Both data sets are licensed CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/). The weights are a "
      "derived work; this attribution must accompany them.\n")
    a("- **FracAtlas**: Abedeen I., Rahman M.A., Prottyasha F.Z., Ahmed T., Chowdhury T.M., Shatabda S., "
      "\"FracAtlas: A Dataset for Fracture Classification, Localization and Segmentation of Musculoskeletal "
      "Radiographs\", Scientific Data 10, 521 (2023), doi:10.1038/s41597-023-02432-4; data "
      "doi:10.6084/m9.figshare.22363012. CC BY 4.0. Used as distributed to the project: 8-bit greyscale, long "
      "side at most 512 px, JPEG quality 90, boxes as normalised corners, one label corrected (see the data "
      "README), a part withheld by the project for independent evaluation.")
    a("- **Knee Osteoarthritis Severity Grading Dataset**: Chen P., Mendeley Data V1 (2018), "
      "doi:10.17632/56rmx5bjcr.1; Chen P., Gao L., Shi X., Allen K., Yang L., \"Fully automatic knee "
      "osteoarthritis severity grading using deep neural networks with a novel ordinal loss\", Computerized "
      "Medical Imaging and Graphics 75 (2019). CC BY 4.0. The radiographs come from the **Osteoarthritis "
      "Initiative (OAI)**, a public-private partnership comprised of five contracts (N01-AR-2-2258; "
      "N01-AR-2-2259; N01-AR-2-2260; N01-AR-2-2261; N01-AR-2-2262) funded by the National Institutes of Health "
      "and conducted by the OAI Study Investigators (nda.nih.gov/oai). Re-encoded PNG->JPEG; the source's "
      "patient-level test split is withheld.\n")
    a("Splits: the knee set's own train/val folders (by patient). FracAtlas has no split folders and no patient "
      "identifiers; its val split is defined in inference/data.py: within each stratum (region x fractured) "
      "images are sorted by sha256(image_id) and the first 20 % go to val (688 of 3,437 images). Because "
      "FracAtlas has no patient ids, views of the same patient can fall on both sides of this split, which may "
      "flatter the FracAtlas numbers. Pretraining used the train splits only (val images were never seen, not "
      "even unlabelled). Heads pick their best epoch on a further 10 % of train (by hash), and the val splits "
      "are used only for the operating points and the metrics below.\n")

    a("## How it was trained (exact commands, seeded)\n")
    if pre.get("data_pack"):
        a(f"The data travelled to the training machine as a compact copy made by `{pre['data_pack']}` "
          "(FracAtlas downscaled to a long side of 384 px and re-encoded as WebP quality 90, its image ids and so "
          "its splits unchanged; the knee set copied as provided). The training commands read that copy; the "
          "evaluation below reads the data as distributed.\n")
    a("```")
    if pre.get("command"):
        a(pre["command"])
        if pre.get("epochs_done") and pre.get("epochs") and pre["epochs_done"] < pre["epochs"]:
            a(f"#   stopped after {pre['epochs_done']} of {pre['epochs']} scheduled epochs; deterministic "
              f"equivalent: add --stop-after-epochs {pre['epochs_done']}")
    for st in adapt_stages(pre):
        a(st["command"])
        if st.get("epochs_done") and st["epochs_done"] < st.get("epochs", 0):
            a(f"#   stopped after {st['epochs_done']} of {st['epochs']} epochs; deterministic equivalent: "
              f"add --stop-after-epochs {st['epochs_done']}")
    cmds = []
    # in the order they ran: heads re-fitted (or calibrated) later carry a later time (older entries have none)
    steps = sorted([(h.get("training", {}).get("fitted") or "", h.get("training", {}).get("command"))
                    for h in node["heads"].values()]
                   + [(h["calibration"].get("calibrated") or "~", h["calibration"].get("command"))
                      for h in node["heads"].values() if h.get("calibration")], key=lambda t: t[0])
    for _, c in steps:
        if c and c not in cmds:
            cmds.append(c)
    if node.get("anomaly", {}).get("command") and node["anomaly"]["command"] not in cmds:
        cmds.append(node["anomaly"]["command"])
    for c in cmds:
        a(c)
    if vm.get("command"):
        a(vm["command"])
    sm = node.get("validation_metrics_sample", {})
    if sm.get("command"):
        a(sm["command"])
    a("```\n")
    if adapt_stages(pre):
        a("(Paths are those of the training run: each stage's `--init` is the previous command's output; the "
          "heads were added to a copy of the last stage's output, which became this bundle.)\n")
    if pre.get("history"):
        a(f"MAE pretraining: {pre.get('epochs_done')} epochs over {pre.get('images')} training images, batch "
          f"{pre.get('batch_size')}, AdamW lr {pre.get('lr')}, seed {pre.get('seed')}, final reconstruction loss "
          f"{pre['history'][-1]['loss']:.3f} ({pre['history'][-1]['seconds'] / 60:.0f} min on {_where(pre)}).")
    stages = adapt_stages(pre)
    if stages:
        a(f"Then multi-task adaptation of the encoder in {len(stages)} stage(s) ("
          + "; ".join(f"{st.get('epochs_done')} epochs at lr {st.get('lr')}, seed {st.get('seed')}, "
                      f"{st['history'][-1]['seconds'] / 60:.0f} min"
                      + (f", encoder kept from epoch {st['best_epoch']} (best development score "
                         f"{st['dev_score']:.3f})" if st.get("best_epoch") is not None else "")
                      for st in stages)
          + f"; labels: {', '.join(stages[-1].get('labels', []))}; the MAE loss stays in the objective so the "
            f"decoder and the anomaly maps remain valid; the temporary heads of a stage are discarded). The "
            f"`hardware` label is never used in training the encoder.")
    branches = []
    for n, h in card.heads.items():
        layer = input_layer(h.arch, cfg["depth"])
        if layer is None:
            continue
        depth = cfg["depth"] - 1 - layer
        dev_by = node["heads"].get(n, {}).get("training", {}).get("dev_split")
        branches.append(
            f"the {n} head is a *branch*: its own copy of the encoder's last {depth} block(s) and final norm, "
            f"initialised from them and fine-tuned (lr {h.arch.get('branch_lr', 1e-4)}) on the tokens after block "
            f"{layer}" + (", with horizontally mirrored copies of the training images"
                          if h.arch.get("flip_augmentation") else "")
            + (", from randomly augmented training images (flip, scale, shift, rotation, gamma) passed through "
               "the frozen encoder at every step" if h.arch.get("image_augmentation") else "")
            + (f", development split held out {DEV_SPLIT_TEXT.get(dev_by, 'by ' + dev_by)}" if dev_by else "")
            + f", so the shared encoder still runs once and the branch adds {depth}/{cfg['depth']} of a pass, "
              "only on the images it applies to")
    a("Heads are trained on the frozen encoder's tokens" + "".join("; " + b for b in branches) + ".\n")
    for note in node.get("notes", []):
        a(f"- {note}")
    if node.get("notes"):
        a("")

    a("## Heads\n")
    a("| head | kind | labels | coded concept | operating points (suspected / definite) | weights |")
    a("|---|---|---|---|---|---|")
    for name, h in card.heads.items():
        c = h.concept
        cc = f"{c.scheme_designator} {c.value} \"{c.meaning}\"" if c else ""
        op = (f"{h.operating_points.suspected:.4f} / {h.operating_points.definite:.4f}"
              if h.operating_points else "")
        w = h.weights or "**none** (slot only)"
        a(f"| {name} | {h.kind} | {', '.join(h.labels)} | {cc} | {op} | {w} |")
    a("")
    for name, h in card.heads.items():
        if h.kind == "ordinal" and h.arch.get("decision"):
            ds = node["heads"].get(name, {}).get("training", {}).get("decision_scores")
            a(f"The {name} head reports the **{h.arch['decision']}** of its predicted distribution"
              + (" (the most probable grade)" if h.arch["decision"] == "argmax" else
                 " (the first grade whose cumulative probability reaches one half; it minimises the expected "
                 "distance to the true grade)")
              + (", chosen on the development split (accuracy + kappa: "
                 + ", ".join(f"{k} {v:.3f}" for k, v in ds.items()) + ")" if ds else "") + ".\n")
    a("Label concepts: the anatomy labels carry SNOMED CT codes (see configs/metadata.json); \"other\", the KL "
      "grades and the views use the private scheme 99MSKAI (no standard code for a KL grade value; SNOMED CT "
      "codes projections by direction, e.g. antero-posterior, which the data's frontal/lateral/oblique labels "
      "do not resolve). Binary operating "
      "points are chosen on val: *suspected* = the highest threshold keeping sensitivity >= 0.90, *definite* = "
      "the lowest threshold reaching specificity >= 0.95.\n")
    for name in card.heads:
        cal = node["heads"].get(name, {}).get("calibration")
        if cal:
            a(f"The {name} head's probabilities are **calibrated** (Platt scaling, folded into its last layer: "
              f"{cal.get('scale_total', cal['scale']):.4f} x logit {cal.get('shift_total', cal['shift']):+.4f}), "
              f"fitted on {cal['images']} development images ({cal['positives']} positive; log loss "
              f"{cal['log_loss_before']:.4f} before, {cal['log_loss_after']:.4f} after), so that a reported "
              "probability reads as the share of such images that are positive; the ranking, and with it the AUROC, "
              "is unchanged, and the operating points were chosen after calibration.\n")
    tum = card.heads.get("tumour")
    if tum is not None and not tum.has_weights:
        a("**Bone tumour head**: the bundle format and the outputs have its slot, but it ships **no weights**: "
          "no bone-tumour radiographs with labels were available to the project (neither FracAtlas nor the knee "
          "set contains them), and a head trained without them would be noise. `dicom-node model fit-heads "
          "--bundle B --labels tumours.csv --head tumour` trains it (CSV: image_id/image and label 0/1), choosing "
          "its operating points on the CSV's val split. Until then the node reports no tumour finding.\n")
    kl = card.heads.get("kl_grade")
    if kl is not None and kl.has_weights:
        a("**KL grade** is reported only when the anatomy head (or BodyPartExamined) says knee.\n")

    a("## Validation metrics (val splits, end to end on the image files)\n")
    if val:
        a("| metric | value | target (issue 3) | met |")
        a("|---|---|---|---|")
        for k, (t, label) in TARGETS.items():
            v = val.get(k)
            a(f"| {label} | {_f(v)} | >= {t:.2f} | {'yes' if v is not None and v >= t else '**no**'} |")
        a(f"| KL grade mean absolute error | {_f(val.get('kl_mae'))} | | |")
        a(f"| View accuracy (prediction among the image's views) | {_f(val.get('view_accuracy'))} | | |")
        a(f"| Fracture localisation hit rate, fracture head map | {_f(val.get('fracture_map_hit_rate'))} | well "
          f"above box share | |")
        a(f"| Fracture localisation hit rate, anomaly map | {_f(val.get('anomaly_map_hit_rate'))} | well above "
          f"box share | |")
        a(f"| Share of the image covered by fracture boxes (chance hit rate) | "
          f"{_f(val.get('box_share_of_image'))} | | |")
        if val.get("centre_hit_rate") is not None:
            a(f"| Hit rate of the image's centre (a map that always peaks there) | "
              f"{_f(val.get('centre_hit_rate'))} | | |")
        a("")
        fr = details.get("fracture", {})
        for op in ("suspected", "definite"):
            if op in fr:
                a(f"- Fracture at *{op}* (threshold {fr[op]['threshold']:.4f}): sensitivity "
                  f"{fr[op]['sensitivity']:.3f}, specificity {fr[op]['specificity']:.3f} "
                  f"({fr.get('positives')} fractured of {fr.get('n')} FracAtlas val images).")
        if "log_loss" in fr:
            a(f"- Fracture probability calibration on val: log loss {fr['log_loss']:.3f}, Brier score "
              f"{fr['brier']:.3f}, mean probability {fr['mean_probability']:.3f} against a fractured share of "
              f"{fr['positives'] / fr['n']:.3f}.")
        an = details.get("anatomy", {})
        if an.get("accuracy_by_source"):
            a("- Anatomy accuracy by source: " + ", ".join(f"{s} {v:.3f}" for s, v in an["accuracy_by_source"].items())
              + ".")
        k = details.get("kl_grade", {})
        if k:
            a(f"- KL grade: {k.get('n')} knee val crops; confusion matrix (rows true 0-4, columns predicted): "
              f"`{k.get('confusion')}`.")
        a("")
        misses = [label for key, (t, label) in TARGETS.items() if val.get(key) is None or val[key] < t]
        if misses:
            a("**Below target**: " + "; ".join(misses) + f". These are honest numbers of a "
              f"{enc_params / 1e6:.1f} M-parameter ViT at {cfg['image_size']} px trained from scratch in about "
              f"{_minutes(tr):.0f} minutes (encoder; heads a few more) on {_where(pre)}; published "
              "models on the same data reach about 0.90 fracture AUROC and 0.70 KL accuracy with larger models, "
              "higher resolution and GPU-scale training. Fractures in FracAtlas are small: at "
              f"{cfg['image_size']} px a typical fracture box spans only a few patches.\n")
    le = vm.get("label_efficiency")
    if le:
        a("## Label efficiency (FracAtlas implant / `hardware` label, unseen by the encoder)\n")
        a(f"{le['head']}; {le['sampling']}; val: {le['val_images']} images, {le['val_positives']} with an "
          f"implant (few positives: the AUROC estimates are coarse).\n")
        a("| labelled train images | val AUROC (mean +- sd over seeds) |")
        a("|---|---|")
        for p in le["points"]:
            a(f"| {p['labels']}{' (all)' if p['all'] else ''} | {p['auroc_mean']:.3f} +- {p['auroc_sd']:.3f} |")
        a("")
    anom = node.get("anomaly", {})
    if anom:
        a("## Anomaly map\n")
        a(f"Reconstruction error of the MAE over complementary masks: the patch grid is split into "
          f"{anom.get('groups')} regular lattices and lattices {anom.get('passes')} are shown to the encoder in "
          f"turn, so that every patch is reconstructed from the others. Per-patch errors are normalised per grid "
          f"position against {anom.get('normal_images')} normal training images (FracAtlas without fracture or "
          f"implant, KL-0 knees): z = (error - mean) / std; patches on the letterbox padding, and "
          f"{anom.get('erode_patches', 0)} ring(s) of patches along the image edge, are 0. Display map "
          f"= clip(z / {anom.get('z_max')}, 0, 1), Gaussian-smoothed ({anom.get('smooth_patches')} patch), "
          f"bilinearly brought back to the source geometry; regions = connected components of map >= "
          f"{anom.get('region_threshold')}, with boxes in source pixels. The map highlights what the MAE finds "
          f"hard to predict from context (implants, edges of the collimated field, unusual anatomy) - it is "
          f"label-free and not a fracture detector; see the hit rates above.\n")
    a("## Limitations\n")
    a("- The knee set consists of CLAHE-enhanced 224x224 knee-joint crops; FracAtlas contains full knee "
      "radiographs labelled as `leg`. The anatomy label `knee` therefore means \"knee-joint crop\", and the KL "
      "head is trained on crops only: on a full knee radiograph it sees a different field of view and no CLAHE, "
      "so its grade there is outside its validated use. Crop the joint (and apply CLAHE) upstream for KL grading.")
    a("- Anatomy covers hand, leg (lower limb), hip, shoulder, knee (joint crop) and other; there is no class "
      "for the chest, spine, skull or abdomen, so such images get one of these labels (often `knee`, see the "
      "note on the anatomy head above), and non-MSK images are outside the model's use.")
    a("- Trained on 8-bit JPEGs downscaled to <= 512 px; DICOM inputs go through the same display transform, but "
      "detector-specific processing differs between sites.")
    a("- No patient identifiers in FracAtlas (see Splits); knee val is patient-disjoint.")
    a("- Fracture labels are image-level with boxes for most fractured images; no dislocations, no paediatric "
      "subset analysis, no site/vendor stratification.")
    a("- Input resolution is low for subtle fractures; the fracture map is at patch resolution "
      f"({cfg['patch_size']} px of the {cfg['image_size']} px canvas).\n")
    a("## Files and hashes\n")
    a("| file | sha256 |")
    a("|---|---|")
    for f, h in sorted(card.weights.items()):
        a(f"| {f} | `{h}` |")
    a("")
    return "\n".join(L) + "\n"


def write(root: str | Path) -> Path:
    root = Path(root)
    path = root / "docs" / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(root))
    return path
