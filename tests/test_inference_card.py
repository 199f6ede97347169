"""The model card for people is rendered from its template, byte for byte what the shipped bundle carries."""

from __future__ import annotations

import json
import shutil

from inference import DEFAULT_BUNDLE
from inference.training.model_card import render, write


def test_shipped_card_renders_to_the_committed_readme():
    assert render(DEFAULT_BUNDLE) == (DEFAULT_BUNDLE / "docs" / "README.md").read_text()


def test_card_of_a_bundle_without_training_records(tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(DEFAULT_BUNDLE, bundle)
    meta_path = bundle / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    node = meta["msk_node"]
    for key in ("training", "validation_metrics", "validation_metrics_sample", "notes"):
        node.pop(key, None)
    for head in node["heads"].values():
        head.pop("training", None)
        head.pop("calibration", None)
    node["anomaly"].pop("command", None)
    meta_path.write_text(json.dumps(meta))
    text = write(bundle).read_text()
    assert text.startswith(f"# {node['name']} {meta['version']}: model card\n")
    assert "## Validation metrics" in text and "Below target" not in text and "MAE pretraining:" not in text
    assert "| fracture | binary | absent, present | SCT 125605004 \"Fracture of bone\" |" in text
    assert "\n```\n```\n" in text  # no recorded commands
    assert text.endswith("|\n\n")
