"""The committed FracAtlas fixture set is complete, consistent with its labels and attributed."""

from __future__ import annotations

import csv

from PIL import Image

from tests.dicomgen import FRACATLAS, dx_from_image, fracatlas_images


def _rows(name: str) -> list[dict[str, str]]:
    with open(FRACATLAS / name, newline="") as f:
        return list(csv.DictReader(f))


def test_every_image_has_its_label_row_and_stored_size():
    labels = {r["image_id"]: r for r in _rows("labels.csv")}
    images = sorted(p.name for p in (FRACATLAS / "images").glob("*.jpg"))
    assert images == sorted(labels) and 10 <= len(images) <= 16
    for name in images:
        with Image.open(FRACATLAS / "images" / name) as img:
            img.load()  # decodes in full (no truncated source)
            assert img.mode == "L"
            assert img.size == (int(labels[name]["width"]), int(labels[name]["height"]))
            assert max(img.size) <= 512


def test_the_set_covers_regions_fracture_status_and_views():
    labels = _rows("labels.csv")
    assert {r["region"] for r in labels} >= {"hand", "leg", "hip", "shoulder"}
    assert {r["fractured"] for r in labels} == {"0", "1"}
    for view in ("frontal", "lateral"):
        assert any(r[view] == "1" for r in labels), view


def test_fractured_images_and_only_those_have_boxes_inside_the_image():
    fractured = {r["image_id"]: int(r["fracture_count"]) for r in _rows("labels.csv") if r["fractured"] == "1"}
    boxes = _rows("boxes.csv")
    assert {b["image_id"] for b in boxes} == set(fractured)
    for b in boxes:
        x0, y0, x1, y1 = (float(b[k]) for k in ("x0", "y0", "x1", "y1"))
        assert 0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0, b
    for image_id, count in fractured.items():
        assert sum(b["image_id"] == image_id for b in boxes) == count, image_id


def test_attribution_names_source_and_licence():
    readme = (FRACATLAS.parent / "README.md").read_text()
    for needed in ("FracAtlas", "Abedeen", "doi:10.1038/s41597-023-02432-4", "CC BY 4.0", "Changes made"):
        assert needed in readme, needed


def test_runs_wrap_around_the_set_and_build_distinct_instances():
    images = fracatlas_images(30, offset=5)
    distinct = sorted(set(images))
    assert len(images) == 30 and images[0] == distinct[5 % len(distinct)]
    a, b = dx_from_image(images[0]), dx_from_image(images[len(distinct)])
    assert a.PixelData == b.PixelData and a.SOPInstanceUID != b.SOPInstanceUID


def test_the_fixtures_the_shipped_model_declines_are_the_listed_ones():
    """tests.dicomgen.DECLINED_FIXTURES names exactly the fixture radiographs the shipped model declines as outside
    its domain (tests that need results leave them out)."""
    from inference import load_bundle
    from inference.pixels import display_uint8
    from tests.dicomgen import DECLINED_FIXTURES, dx_from_image, fracatlas_images

    model = load_bundle(device="cpu")
    images = sorted(set(fracatlas_images(12)))
    results = model.predict_arrays([display_uint8(dx_from_image(p)) for p in images], [p.name for p in images])
    assert {p.name for p, r in zip(images, results) if not r.processed} == set(DECLINED_FIXTURES)
    assert DECLINED_FIXTURES.isdisjoint(p.name for p in fracatlas_images(24, readable=True))
