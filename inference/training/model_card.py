"""The bundle's model card for people (``docs/README.md``), rendered from its ``configs/metadata.json``.

Numbers come from the card only (recorded by ``fit-heads`` and ``evaluate --record``),
so the text and the machine-readable card cannot disagree. The text is the template
``templates/model_card.md.j2``; the small functions here derive what it shows.
"""

from __future__ import annotations

from pathlib import Path

import jinja2

from inference.card import adapt_stages, read_card
from inference.heads import input_layer
from inference.vocabulary import PRIVATE_SCHEME

TEMPLATES = Path(__file__).resolve().parent / "templates"
#: the card's template (Jinja2, Markdown out); the functions below derive what it shows
TEMPLATE = "model_card.md.j2"

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


def training_commands(node: dict) -> list[str]:
    """The commands that made the bundle, in the order they ran, with a note where a run stopped early."""
    pre = node.get("training", {}).get("pretrain", {})
    lines = []
    if pre.get("command"):
        lines.append(pre["command"])
        if pre.get("epochs_done") and pre.get("epochs") and pre["epochs_done"] < pre["epochs"]:
            lines.append(f"#   stopped after {pre['epochs_done']} of {pre['epochs']} scheduled epochs; deterministic "
                         f"equivalent: add --stop-after-epochs {pre['epochs_done']}")
    for st in adapt_stages(pre):
        lines.append(st["command"])
        if st.get("epochs_done") and st["epochs_done"] < st.get("epochs", 0):
            lines.append(f"#   stopped after {st['epochs_done']} of {st['epochs']} epochs; deterministic equivalent: "
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
    lines += cmds
    vm = node.get("validation_metrics", {})
    if vm.get("command"):
        lines.append(vm["command"])
    sm = node.get("validation_metrics_sample", {})
    if sm.get("command"):
        lines.append(sm["command"])
    return lines


def adaptation_text(stages: list[dict]) -> str:
    """The sentence on the encoder's multi-task adaptation stages."""
    return (f"Then multi-task adaptation of the encoder in {len(stages)} stage(s) ("
            + "; ".join(f"{st.get('epochs_done')} epochs at lr {st.get('lr')}, seed {st.get('seed')}, "
                        f"{st['history'][-1]['seconds'] / 60:.0f} min"
                        + (f", encoder kept from epoch {st['best_epoch']} (best development score "
                           f"{st['dev_score']:.3f})" if st.get("best_epoch") is not None else "")
                        for st in stages)
            + f"; labels: {', '.join(stages[-1].get('labels', []))}; the MAE loss stays in the objective so the "
              f"decoder and the anomaly maps remain valid; the temporary heads of a stage are discarded). The "
              f"`hardware` label is never used in training the encoder.")


def branch_texts(card, cfg: dict) -> list[str]:
    """One clause per head that is a branch (its own copy of the encoder's last blocks)."""
    node = card.meta["msk_node"]
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
    return branches


def head_rows(card) -> list[tuple[str, ...]]:
    """The cells of the heads table: name, kind, labels, coded concept, operating points, weights."""
    rows = []
    for name, h in card.heads.items():
        c = h.concept
        cc = f"{c.scheme_designator} {c.value} \"{c.meaning}\"" if c else ""
        op = (f"{h.operating_points.suspected:.4f} / {h.operating_points.definite:.4f}"
              if h.operating_points else "")
        rows.append((name, h.kind, ", ".join(h.labels), cc, op, h.weights or "**none** (slot only)"))
    return rows


def decision_texts(card) -> list[str]:
    """How each ordinal head with a recorded decision rule reads its label."""
    node = card.meta["msk_node"]
    texts = []
    for name, h in card.heads.items():
        if h.kind == "ordinal" and h.arch.get("decision"):
            ds = node["heads"].get(name, {}).get("training", {}).get("decision_scores")
            texts.append(f"The {name} head reports the **{h.arch['decision']}** of its predicted distribution"
                         + (" (the most probable grade)" if h.arch["decision"] == "argmax" else
                            " (the first grade whose cumulative probability reaches one half; it minimises the "
                            "expected distance to the true grade)")
                         + (", chosen on the development split (accuracy + kappa: "
                            + ", ".join(f"{k} {v:.3f}" for k, v in ds.items()) + ")" if ds else "") + ".")
    return texts


def target_rows(val: dict) -> list[tuple[str, float | None, float, bool]]:
    """(metric, value, target, met) of each target of issue 3."""
    return [(label, val.get(k), t, val.get(k) is not None and val[k] >= t) for k, (t, label) in TARGETS.items()]


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True, undefined=jinja2.StrictUndefined, autoescape=False)
    env.filters["num"] = _f
    return env


def render(root: str | Path) -> str:
    """The model card (Markdown) of the bundle at ``root``."""
    card = read_card(Path(root))
    node = card.meta["msk_node"]
    cfg = node["architecture"]["config"]
    tr = node.get("training", {})
    pre = tr.get("pretrain", {})
    vm = node.get("validation_metrics", {})
    val = vm.get("val", {})
    details = vm.get("details", {}).get("val", {})
    stages = adapt_stages(pre)
    encoder_params, decoder_params = _param_counts(card)
    tumour = card.heads.get("tumour")
    kl = card.heads.get("kl_grade")
    context = {
        "card": card, "cfg": cfg, "where": _where(pre), "pretrain": pre, "stages": stages,
        "encoder_params": encoder_params, "decoder_params": decoder_params,
        "commands": training_commands(node), "adaptation": adaptation_text(stages) if stages else "",
        "branches": branch_texts(card, cfg), "notes": node.get("notes", []),
        "head_rows": head_rows(card), "decisions": decision_texts(card), "private_scheme": PRIVATE_SCHEME,
        "calibrations": [(name, node["heads"][name]["calibration"]) for name in card.heads
                         if node["heads"].get(name, {}).get("calibration")],
        "tumour_slot": tumour is not None and not tumour.has_weights,
        "kl_gated": kl is not None and kl.has_weights,
        "val": val, "target_rows": target_rows(val),
        "fracture": details.get("fracture", {}), "anatomy": details.get("anatomy", {}),
        "kl": details.get("kl_grade", {}),
        "misses": [label for label, value, target, met in target_rows(val) if not met],
        "minutes": _minutes(tr), "label_efficiency": vm.get("label_efficiency"), "anomaly": node.get("anomaly", {}),
        "domain": node.get("domain", {}), "domain_val": details.get("domain", {}),
        "localisation": details.get("localisation", {}), "regions": card.heads["fracture"].arch
        if "fracture" in card.heads else {},
        "anatomy_floor": card.heads["anatomy"].arch.get("confidence_floor") if "anatomy" in card.heads else None,
        "weights": sorted(card.weights.items()),
    }
    return _environment().get_template(TEMPLATE).render(context)


def write(root: str | Path) -> Path:
    """Render the card of the bundle at ``root`` into its ``docs/README.md``; returns that path."""
    root = Path(root)
    path = root / "docs" / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(root))
    return path
