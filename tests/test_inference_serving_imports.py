"""The serving path runs the model without the training package and its optional dependencies."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SERVING = """
import sys
import numpy as np
import inference
from inference import anomaly, bundle, card, errors, heads, pixels, preprocess, results, vit, vocabulary
from PIL import Image
model = inference.load_bundle(device="cpu")
# a radiograph (a synthetic pattern is declined as outside the model's domain, as it should be)
image = np.asarray(Image.open("tests/fixtures/fracatlas/images/IMG0000479.jpg").convert("L"))
[result] = model.predict_arrays([image], ["fixture"])
assert result.processed, result
assert result.fracture is not None and 0.0 <= result.fracture.probability <= 1.0
assert result.anatomy is not None and result.anatomy.label in vocabulary.ANATOMY_LABELS
loaded = sorted(m for m in sys.modules
                if m.split(".")[0] in ("sklearn", "matplotlib", "jinja2") or m.startswith("inference.training"))
print("LOADED", loaded)
"""


def test_serving_path_imports_no_training_code():
    proc = subprocess.run([sys.executable, "-c", SERVING], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LOADED []" in proc.stdout, proc.stdout
