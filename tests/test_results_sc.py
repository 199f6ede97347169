"""Heatmap and summary secondary captures: attributes, pixels, sizes, validity."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from PIL import Image

from dicom_node.identity import device_uid
from dicom_node.results_dicom import build_result_objects, write_result_objects
from dicom_node.sc import content as scc
from dicom_node.sc import enum
from inference.pixels import display_uint8
from tests.test_results_support import (
    MODEL,
    cr_study,
    dx_study,
    make_results,
    strict_pydicom,
    validate,
    written_results,
)


@pytest.fixture(scope="module")
def cr(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sc_cr")
    sources = cr_study(tmp, names=("RG3_J2KR.dcm", "RG3_UNCI.dcm", "RG3_J2KI.dcm"))
    return written_results(tmp, sources, make_results(sources, not_processed=2))


@pytest.fixture(scope="module")
def dx(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sc_dx")
    sources = dx_study(tmp, n=5, offset=3)
    return written_results(tmp, sources, make_results(sources))


def _heatmap_for(objs, source):
    return next(h for h in objs.heatmaps
                if h.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID)


@pytest.mark.parametrize("study", ["cr", "dx"])
def test_heatmap_attributes(study, request):
    sources, results, objs, paths = request.getfixturevalue(study)
    assert len(objs.heatmaps) == sum(r.processed for r in results)
    source_series = {s.SeriesInstanceUID for s in sources}
    for src, res in zip(sources, results):
        if not res.processed:
            assert not any(h.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
                           for h in objs.heatmaps)
            continue
        h = _heatmap_for(objs, src)
        assert h.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage and h.Modality == "OT"
        assert h.BurnedInAnnotation == "YES"
        assert h.PatientID == src.PatientID and h.PatientName == src.PatientName
        assert h.StudyInstanceUID == src.StudyInstanceUID
        assert h.SeriesInstanceUID not in source_series and h.SeriesInstanceUID != objs.sr.SeriesInstanceUID
        assert h.SeriesInstanceUID == objs.summary.SeriesInstanceUID
        ref = h.SourceImageSequence[0]
        assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (src.SOPClassUID, src.SOPInstanceUID)
        assert (h.PhotometricInterpretation, h.SamplesPerPixel, h.BitsAllocated) == ("RGB", 3, 8)
        assert max(h.Rows, h.Columns) <= enum.MAX_SIDE
        assert h.SeriesDescription.startswith(enum.NOT_FOR_DIAGNOSTIC_USE)
        assert "DERIVED" in h.ImageType
        # the lossy history of the source carries over
        assert h.LossyImageCompression == ("01" if src.get("LossyImageCompression") == "01" else "00")
        algo = [it for it in h.ContributingEquipmentSequence if it.get("DeviceUID")]
        assert [it.DeviceUID for it in algo] == [device_uid(MODEL.name, MODEL.weights_sha256)]
        assert algo[0].PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Algorithm"
        assert "99IHE" in {it.CodingSchemeDesignator for it in h.CodingSchemeIdentificationSequence}
    for p in paths:
        validate(p)


def _image_part(h, src):
    """The SC's image area (above the text panel) and the scale used."""
    px = h.pixel_array
    scale = h.Columns / float(src.Columns)
    height = int(round(src.Rows * scale))
    return px[:height], scale


@pytest.mark.parametrize("study", ["cr", "dx"])
def test_heatmap_pixels(study, request):
    """Grey where the map is low (and equal to the displayed source), coloured where it is high, boxes
    solid for definite and dotted for suspected, the warning text burned in below."""
    sources, results, objs, _ = request.getfixturevalue(study)
    for src, res in zip(sources, results):
        if not res.processed:
            continue
        h = _heatmap_for(objs, src)
        img, scale = _image_part(h, src)
        size = (img.shape[1], img.shape[0])
        display = display_uint8(src)
        method = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BILINEAR
        expected = np.asarray(Image.fromarray(display).resize(size, method))
        heat, _ = scc.choose_map(res)
        heat_small = np.asarray(Image.fromarray(heat).resize(size, Image.Resampling.BILINEAR))
        grey = img[..., 0].astype(int)
        is_grey = (img[..., 0] == img[..., 1]) & (img[..., 1] == img[..., 2])
        # keep away from boxes and the map's edge
        low = heat_small < 0.5 * enum.MAP_FLOOR
        for reg in res.reported_regions():  # the boxes and their tags (above or below a box)
            x0, y0, x1, y1 = (int(v * scale) for v in reg.box)
            low[max(0, y0 - 48):y1 + 48, max(0, x0 - 8):x1 + 8] = False
        assert low.sum() > 1000, "the test map has no low region"
        assert is_grey[low].all()
        assert np.array_equal(grey[low], expected[low].astype(int))
        high = heat_small > 0.9
        assert high.sum() > 100
        assert (~is_grey[high]).mean() > 0.9
        # fracture boxes: top edge of each
        decision = res.fracture.decision
        lw = max(2, h.Columns // 400)
        colour = np.array(enum.DEFINITE if decision == "definite" else enum.SUSPECTED)
        for reg in res.fracture_regions:
            x0, y0, x1, y1 = (v * scale for v in reg.box)
            rows = slice(max(0, int(y0) - 1), int(y0) + lw + 1)
            cols = slice(int(x0) + 2 * lw, int(x1) - 2 * lw)
            edge = (img[rows, cols] == colour).all(axis=-1).any(axis=0)
            if decision == "definite":
                assert edge.mean() > 0.95, edge.mean()
            else:
                assert 0.3 < edge.mean() < 0.7, edge.mean()  # dotted
        # anomaly regions: drawn in their own colour, tagged A1, A2, ... as the SR numbers them
        anomaly = np.array(enum.ANOMALY)
        for reg in res.reported_regions():
            if reg.source != "anomaly":
                continue
            x0, y0, x1, y1 = (int(v * scale) for v in reg.box)
            near = img[max(0, y0 - 40):y1 + 40, max(0, x0 - 4):x1 + 4]
            assert (near == anomaly).all(axis=-1).sum() > 20
        if decision == "absent":
            assert res.fracture_regions == ()
            for c in (enum.DEFINITE, enum.SUSPECTED):
                assert not (img == np.array(c)).all(axis=-1).any()
        # the panel: the warning in its colour, text in white
        panel = h.pixel_array[img.shape[0]:]
        assert (panel == np.array(enum.WARNING_TEXT)).all(axis=-1).sum() > 200
        assert (panel == np.array(enum.TEXT)).all(axis=-1).sum() > 200


def test_heatmap_text(dx):
    sources, results, _, _ = dx
    res = results[1]
    lay, lines = scc.heatmap_layout(res, MODEL, "image 2 of 5")
    text = " ".join(lines)
    assert lines[0] == "AI RESULT - NOT FOR DIAGNOSTIC USE"
    assert f"{MODEL.name} {MODEL.version}" in text
    assert f"Fracture: {res.fracture.decision.upper()} (p={res.fracture.probability:.2f})" in text
    assert f"Anatomy: {res.anatomy.label} ({res.anatomy.confidence:.2f})" in text
    assert scc.findings_line(res) in text.replace("  ", "   ") or all(
        part in text for part in scc.findings_line(res).split("   "))


def test_summary_page(cr):
    sources, results, objs, _ = cr
    s = objs.summary
    assert s.InstanceNumber == 1 and s.BurnedInAnnotation == "YES"
    assert s.SeriesInstanceUID == objs.heatmaps[0].SeriesInstanceUID
    assert [r.ReferencedSOPInstanceUID for r in s.SourceImageSequence] == [x.SOPInstanceUID for x in sources]
    px = s.pixel_array
    assert px.shape[1] == 1600 and px.shape[0] <= enum.MAX_SIDE
    # coloured cells: each decision in its colour, the image not processed in the warning colour
    for decision in {r.fracture.decision for r in results if r.processed}:
        colour = {"definite": enum.DEFINITE, "suspected": enum.SUSPECTED, "absent": enum.ABSENT}[decision]
        assert (px == np.array(colour)).all(axis=-1).sum() > 30, decision
    assert (px == np.array(enum.WARNING_TEXT)).all(axis=-1).sum() > 200
    rows = scc.summary_rows(results, [str(i) for i in range(len(results))])
    assert any(cell[0] == "NOT PROCESSED" for row in rows for cell in row)
    assert any(cell[0].startswith("reason: pixel data cannot be decoded") for row in rows for cell in row)


def test_summary_page_with_many_images_stays_within_the_limit(dx):
    sources, results, _, _ = dx
    many = list(results) * 30  # 150 rows: more than a page holds
    px = scc.render_summary(many, ["x"] * len(many), MODEL, ["header"])
    assert px.shape[0] <= enum.MAX_SIDE and px.dtype == np.uint8


@pytest.mark.slow
def test_large_and_small_images(tmp_path):
    """A detector-sized image is reduced to the 2048 limit, a small one enlarged for legible text."""
    with strict_pydicom():
        big = dx_study(tmp_path / "big", n=1, offset=20, scale=5)
    small = dx_study(tmp_path / "small", n=1, offset=21)
    for sources in (big, small):
        results = make_results(sources)
        objs = build_result_objects(sources, results, MODEL)
        paths = write_result_objects(objs, tmp_path / str(sources[0].SOPInstanceUID)[-8:])
        h = objs.heatmaps[0]
        long_side = max(h.Rows, h.Columns)
        assert long_side <= enum.MAX_SIDE
        if max(sources[0].Rows, sources[0].Columns) > enum.MAX_SIDE:
            assert long_side >= 0.95 * enum.MAX_SIDE  # reduced to the limit, not far below it
        else:
            assert long_side >= enum.MIN_SIDE
        for p in paths:
            validate(p)


def test_captures_and_summary_show_the_regions_the_sr_reports(tmp_path):
    """One rule for every report (ImageResult.reported_regions): the SR's region groups, the boxes on the
    heatmap and the summary's Regions column agree, and a positive call without a box says "not localised"."""
    from dataclasses import replace

    from dicom_node.sr.sop import read_sr
    from inference.results import Region

    sources = dx_study(tmp_path, n=3, offset=6)
    results = make_results(sources)
    boxed = next(r for r in results if r.fracture.decision == "definite")
    # a definite call without a fracture box, and one with a box that lies outside the image
    outside = Region(box=(-50.0, -50.0, -10.0, -10.0), score=0.9, area_px=100, source="fracture")
    unboxed = replace(boxed, fracture_regions=(outside,), regions=())
    results = [unboxed if r is boxed else r for r in results]
    objs = build_result_objects(sources, results, MODEL)
    read = {i.source_sop_instance_uid: i for i in read_sr(objs.sr).images}
    rows = scc.summary_rows(results, [str(i) for i in range(len(results))])
    for src, res, row in zip(sources, results, rows):
        sr_regions = read[str(src.SOPInstanceUID)].regions
        assert len(sr_regions) == len(res.reported_regions())
        assert row[7][0].split()[0] == str(len(sr_regions))
    assert unboxed.reported_regions() == ()
    assert unboxed.not_localised() == [unboxed.fracture]
    assert "not localised" in scc.findings_line(unboxed)
    assert rows[results.index(unboxed)][7][0] == "0 not localised"
    assert read[str(sources[results.index(unboxed)].SOPInstanceUID)].not_localised == [
        "Fracture of bone: not localised"]
    # the heatmap of the unboxed image has no fracture box colour on the image part
    h = _heatmap_for(objs, sources[results.index(unboxed)])
    img, _ = _image_part(h, sources[results.index(unboxed)])
    assert not (img == np.array(enum.DEFINITE)).all(axis=-1).any()
