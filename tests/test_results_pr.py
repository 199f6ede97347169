"""Grayscale softcopy presentation states: attributes, graphics read back, dciodvfy, and dcmtk rendering them."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from dicom_node.identity import device_uid
from dicom_node.pr import content as prc
from dicom_node.pr import enum
from dicom_node.result_series import series_description
from dicom_node.results_dicom import build_result_objects, write_result_objects
from dicom_node.sc import content as scc
from dicom_node.sr import content as src
from inference.pixels import display_uint8
from inference.results import BinaryFinding, OperatingPoints
from tests.peers import require
from tests.test_results_support import (
    MODEL,
    cr_study,
    dx_study,
    make_results,
    strict_pydicom,
    validate,
    written_results,
)

PR_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"


@pytest.fixture(scope="module")
def cr(tmp_path_factory):
    """MONOCHROME1 CR images (uncompressed first, so that dcmtk can render it), one not processed."""
    tmp = tmp_path_factory.mktemp("pr_cr")
    sources = cr_study(tmp)  # RG1_UNCI (uncompressed), RG1_J2KI, RG1_J2KR
    return written_results(tmp, sources, make_results(sources, not_processed=2))


@pytest.fixture(scope="module")
def dx(tmp_path_factory):
    """MONOCHROME2 DX images with fracture decisions absent, suspected, definite, suspected, definite."""
    tmp = tmp_path_factory.mktemp("pr_dx")
    sources = dx_study(tmp, n=5, offset=3)
    return written_results(tmp, sources, make_results(sources))


def _pr_for(objs, source):
    return next(p for p in objs.presentation_states
                if p.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID
                == source.SOPInstanceUID)


def _pr_path(objs, paths, source) -> Path:
    name = f"gsps_{objs.identity.file_id('gsps', str(source.SOPInstanceUID))}.dcm"
    return next(p for p in paths if p.name == name)


def _annotations(pr) -> dict[str, pydicom.Dataset]:
    return {str(a.GraphicLayer): a for a in pr.GraphicAnnotationSequence}


def _texts(pr) -> list[str]:
    return [str(t.UnformattedTextValue) for a in pr.GraphicAnnotationSequence for t in a.get("TextObjectSequence", [])]


def _points(obj) -> np.ndarray:
    return np.asarray(obj.GraphicData, dtype=np.float64).reshape(-1, 2)


@pytest.mark.parametrize("study", ["cr", "dx"])
def test_presentation_state_attributes_and_validity(study, request):
    sources, results, objs, paths = request.getfixturevalue(study)
    processed = [(s, r) for s, r in zip(sources, results) if r.processed]
    assert len(objs.presentation_states) == len(processed)
    assert objs.datasets()[-1] is objs.sr  # the SR last, the presentation states before it
    assert objs.kinds().count("gsps") == len(processed)
    for i, (source, _) in enumerate(processed, 1):
        pr = _pr_for(objs, source)
        assert pr.SOPClassUID == PR_CLASS and pr.Modality == "PR"
        assert pr.StudyInstanceUID == source.StudyInstanceUID and pr.PatientID == source.PatientID
        assert pr.SeriesInstanceUID == objs.identity.pr_series_uid
        assert pr.SeriesInstanceUID not in {objs.sr.SeriesInstanceUID, objs.summary.SeriesInstanceUID,
                                            source.SeriesInstanceUID}
        assert pr.SeriesNumber == 9301 and pr.InstanceNumber == i
        assert pr.SOPInstanceUID == objs.identity.pr_uid(str(source.SOPInstanceUID))
        assert pr.SeriesDescription == series_description(MODEL, "PR", objs.identity)
        assert pr.ContentLabel == enum.CONTENT_LABEL
        # one instant for every object of the version
        assert (pr.SeriesDate, pr.SeriesTime) == (objs.sr.SeriesDate, objs.sr.SeriesTime)
        assert (pr.PresentationCreationDate, pr.PresentationCreationTime) == (pr.SeriesDate, pr.SeriesTime)
        ref = pr.ReferencedSeriesSequence[0]
        assert ref.SeriesInstanceUID == source.SeriesInstanceUID
        assert ref.ReferencedImageSequence[0].ReferencedSOPClassUID == source.SOPClassUID
        for ann in pr.GraphicAnnotationSequence:
            assert ann.ReferencedImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        monochrome1 = source.PhotometricInterpretation == "MONOCHROME1"
        assert pr.PresentationLUTShape == ("INVERSE" if monochrome1 else "IDENTITY")
        algo = [it for it in pr.ContributingEquipmentSequence if it.get("DeviceUID")]
        assert [it.DeviceUID for it in algo] == [device_uid(MODEL.name, MODEL.weights_sha256)]
        assert algo[0].PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Algorithm"
        assert "99IHE" in {it.CodingSchemeDesignator for it in pr.CodingSchemeIdentificationSequence}
        layers = {str(g.GraphicLayer): g for g in pr.GraphicLayerSequence}
        assert set(_annotations(pr)) <= set(layers)
        assert all(g.GraphicLayerRecommendedDisplayGrayscaleValue == enum.GRAYSCALE for g in layers.values())
    # written after the heatmaps, before the SR, named from derived ids
    names = [p.name for p in paths]
    assert [n.split("_")[0] for n in names] == (["summary"] + ["heatmap"] * len(processed)
                                                + ["gsps"] * len(processed) + ["sr"])
    assert not any(str(s.SOPInstanceUID) in n for s in sources for n in names)
    for p in paths:
        if p.name.startswith("gsps_"):
            validate(p)
            with strict_pydicom():
                pydicom.dcmread(p)


def test_boxes_are_the_results_boxes_solid_definite_dotted_suspected(dx):
    sources, results, objs, paths = dx
    seen = set()
    for source, result in zip(sources, results):
        pr = pydicom.dcmread(_pr_path(objs, paths, source))
        ann = _annotations(pr)
        rows, columns = int(source.Rows), int(source.Columns)
        texts = _texts(pr)
        # the capture's findings line, a line per finding, from the top-left corner down
        lines = [str(t.UnformattedTextValue) for t in ann[enum.LAYER_TEXT].TextObjectSequence]
        assert "   ".join(lines[:len(result.findings())]) == scc.findings_line(result)
        tops = [float(t.BoundingBoxTopLeftHandCorner[1]) for t in ann[enum.LAYER_TEXT].TextObjectSequence]
        assert tops == sorted(tops) and all(t.BoundingBoxAnnotationUnits == "PIXEL"
                                            for t in ann[enum.LAYER_TEXT].TextObjectSequence)
        assert src.use_statement(MODEL) in texts
        # anomaly regions: a closed polyline equal to the SR's box
        (region,) = result.regions
        graphics = ann[enum.LAYER_REGIONS].GraphicObjectSequence
        assert len(graphics) == 1 and graphics[0].GraphicAnnotationUnits == "PIXEL"
        np.testing.assert_allclose(_points(graphics[0]), src.box_polyline(region.box, rows, columns))
        assert prc.region_label(region, 1) == f"A1: Abnormal region, score {region.score:.2f}" and \
            prc.region_label(region, 1) in texts
        decision = result.fracture.decision
        seen.add(decision)
        if decision == "absent":
            assert enum.LAYER_FRACTURE not in ann
            continue
        (fracture,) = result.fracture_regions
        objects = ann[enum.LAYER_FRACTURE].GraphicObjectSequence
        assert all(o.GraphicType == "POLYLINE" and o.GraphicAnnotationUnits == "PIXEL" for o in objects)
        pts = np.concatenate([_points(o) for o in objects])
        x0, y0, x1, y1 = fracture.box
        assert (pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()) == (x0, y0, x1, y1)
        # every point lies on the box's outline
        on_edge = np.isclose(pts[:, 0], x0) | np.isclose(pts[:, 0], x1) | np.isclose(pts[:, 1], y0) \
            | np.isclose(pts[:, 1], y1)
        assert on_edge.all()
        if decision == "definite":
            assert len(objects) == 1
            np.testing.assert_allclose(_points(objects[0]), src.box_polyline(fracture.box, rows, columns))
        else:  # dashes: two-point segments covering about half of the outline
            assert len(objects) >= 8 and all(o.NumberOfGraphicPoints == 2 for o in objects)
            drawn = sum(float(np.hypot(*(_points(o)[1] - _points(o)[0]))) for o in objects)
            perimeter = 2 * ((x1 - x0) + (y1 - y0))
            assert 0.4 * perimeter < drawn < 0.65 * perimeter
        label = f"F1: Fracture, {decision}, p = {result.fracture.probability:.2f}"
        assert label in texts
        assert not any("not localised" in t for t in texts)
    assert seen == {"absent", "suspected", "definite"}


def test_positive_decision_without_a_box_says_not_localised(tmp_path):
    from dataclasses import replace

    sources = dx_study(tmp_path, n=1, offset=11)
    (result,) = make_results(sources)
    result = replace(result, fracture=BinaryFinding("fracture", 0.95, OperatingPoints(0.3, 0.7)),
                     tumour=BinaryFinding("tumour", 0.4, OperatingPoints(0.2, 0.6)), fracture_regions=(),
                     regions=())
    objs = build_result_objects(sources, [result], MODEL)
    (pr,) = objs.presentation_states
    assert set(_annotations(pr)) == {enum.LAYER_TEXT}
    texts = _texts(pr)
    assert "Fracture: DEFINITE (p=0.95, not localised)" in texts
    assert "Tumour: SUSPECTED (p=0.40, not localised)" in texts
    assert (0x6000, 0x3000) not in pr  # no box, no overlay (Overlay Data)
    for p in write_result_objects(objs, tmp_path / "out"):
        if p.name.startswith("gsps_"):
            validate(p)


def test_colour_source_gets_no_presentation_state(tmp_path):
    sources = dx_study(tmp_path, n=1, offset=12)
    ds = sources[0]
    grey = display_uint8(ds)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.PlanarConfiguration = "RGB", 3, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    for kw in ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept", "VOILUTSequence"):
        if kw in ds:
            delattr(ds, kw)
    ds.PixelData = rgb.tobytes()
    objs = build_result_objects([ds], make_results([ds]), MODEL)
    assert objs.presentation_states == [] and len(objs.heatmaps) == 1


# -- rendering with dcmtk ------------------------------------------------------------------------------------------
def render(pr_path: Path, image_path: Path, workdir: Path) -> tuple[np.ndarray, list[np.ndarray]]:
    """dcmtk's ``dcmp2pgm`` renders ``image_path`` through the presentation state: the image as displayed
    (modality LUT, VOI, presentation LUT) and, at log level info, each overlay activated on a graphic layer,
    drawn in the layer's recommended grayscale value (``ovl_LLII.pgm`` in the working directory, its place
    in the log), returned here placed on an image-sized canvas.
    dcmp2pgm does not rasterise graphic objects (POLYLINE) or text: a viewer does."""
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "rendered.pgm"
    proc = subprocess.run([require("dcmp2pgm"), "--log-level", "info", "-p", str(pr_path), str(image_path), str(out)],
                          cwd=workdir, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    base = np.asarray(Image.open(out))
    places = re.findall(r"columns=(\d+) rows=(\d+) left=(\d+) top=(\d+)", proc.stdout + proc.stderr)
    files = sorted(workdir.glob("ovl_*.pgm"))
    assert len(places) == len(files)
    overlays = []
    for path, (w, h, left, top) in zip(files, places):
        ovl = np.asarray(Image.open(path))
        assert ovl.shape == (int(h), int(w))
        canvas = np.zeros_like(base)
        canvas[int(top):int(top) + int(h), int(left):int(left) + int(w)] = ovl
        overlays.append(canvas)
    return base, overlays


def burn(base: np.ndarray, overlays: list[np.ndarray], grey: int) -> np.ndarray:
    """The image as a viewer composes dcmtk's renderings: the overlay pixels in the layer's grey."""
    out = base.copy()
    for ovl in overlays:
        out[ovl == grey] = grey
    return out


def _source_file(tmp: Path, ds: pydicom.Dataset) -> Path:
    path = tmp / "source.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _disjoint_box(box, rows: int, columns: int) -> tuple[float, float, float, float]:
    """A box of a fifth of the image in a corner, apart from ``box``."""
    h, w, m = rows // 5, columns // 5, 10
    for x, y in ((m, m), (columns - w - m, m), (m, rows - h - m), (columns - w - m, rows - h - m)):
        if x + w + m < box[0] or x > box[2] + m or y + h + m < box[1] or y > box[3] + m:
            return (float(x), float(y), float(x + w), float(y + h))
    raise AssertionError("no room for a second box")


@pytest.mark.parametrize("case", ["dx-definite", "dx-suspected", "cr"])
def test_dcmp2pgm_renders_the_image_as_the_node_displays_it_with_the_boxes(case, request, tmp_path):
    from dataclasses import replace

    from inference.results import Region

    if case == "cr":  # MONOCHROME1, fracture absent: the anomaly region's solid box
        sources, results, objs, _ = request.getfixturevalue("cr")
        source, result = sources[0], results[0]
        assert source.PhotometricInterpretation == "MONOCHROME1" and result.fracture.decision == "absent"
        paths = write_result_objects(objs, tmp_path / "out")
    else:  # MONOCHROME2: a fracture box and, apart from it, an anomaly region
        sources = dx_study(tmp_path, n=1, offset=7)
        (result,) = make_results(sources)
        source = sources[0]
        p = 0.91 if case == "dx-definite" else 0.45
        rows, columns = int(source.Rows), int(source.Columns)
        box = (float(columns * 35 // 100), float(rows * 40 // 100), float(columns * 65 // 100), float(rows * 60 // 100))
        other = _disjoint_box(box, rows, columns)
        result = replace(result, fracture=BinaryFinding("fracture", p, OperatingPoints(0.3, 0.7)),
                         fracture_regions=(Region(box, 0.8, 100, "fracture"),),
                         regions=(Region(other, 0.6, 100, "anomaly"),))
        objs = build_result_objects(sources, [result], MODEL)
        paths = write_result_objects(objs, tmp_path / "out")
    pr_path = _pr_path(objs, paths, source)
    base, overlays = render(pr_path, _source_file(tmp_path, source), tmp_path / "render")
    rows, columns = int(source.Rows), int(source.Columns)
    assert base.shape == (rows, columns)
    # the VOI and polarity of the node's own display (MONOCHROME1 bone-bright): dcmtk's rendering matches it
    expected = display_uint8(source).astype(np.int16)
    assert np.abs(base.astype(np.int16) - expected).mean() < 2.0
    assert np.corrcoef(base.ravel(), expected.ravel())[0, 1] > 0.99

    grey = 255  # GRAYSCALE 0xFFFF as an 8-bit display value
    assert len(overlays) == 1 and overlays[0].shape == (rows, columns)
    shown = burn(base, overlays, grey)
    drawn = prc.boxes(result)
    assert len(drawn) == (1 if case == "cr" else 2)
    for b in drawn:
        x0, y0, x1, y1 = (int(v) for v in b.box)
        assert (shown[y0 + 3:y1 - 3, x0 + 3:x1 - 3] == base[y0 + 3:y1 - 3, x0 + 3:x1 - 3]).all()  # inside: the image
        edges = (overlays[0][y0, x0:x1], overlays[0][y1 - 1, x0:x1], overlays[0][y0:y1, x0], overlays[0][y0:y1, x1 - 1])
        if b.dotted:  # dashes as long as the gaps, one starting at a corner of each edge
            dash = prc.dash_length(rows, columns)
            for edge in edges:
                on = edge == grey
                assert (on[0] or on[-1]) and 0.35 < on.mean() < 0.7
                runs = np.diff(np.flatnonzero(np.diff(np.r_[0, on.astype(np.int8), 0])))[::2]
                assert abs(np.median(runs) - dash) <= 1.5
        else:
            assert all((edge == grey).all() for edge in edges)
        assert (shown[y0, x0:x1] == grey).all() == (not b.dotted)
    if case == "dx-suspected":
        notes = Path("/work/notes")
        if notes.is_dir():  # a look at it for a person (not needed by the test)
            Image.fromarray(shown).save(notes / "gsps_dcmp2pgm.png")


def test_a_source_voi_lut_is_carried_and_dcmtk_applies_it(tmp_path):
    """A source whose VOI is a LUT (as some DX systems send): the presentation state carries that LUT, and dcmtk's
    rendering through it is what the node displays."""
    from pydicom.dataset import Dataset

    sources = dx_study(tmp_path, n=1, offset=9)
    ds = sources[0]
    stored = ds.pixel_array
    top = int(stored.max()) + 1
    lut = np.rint(65535 * np.sqrt(np.arange(top) / (top - 1))).astype(np.uint16)  # a non-linear curve
    item = Dataset()
    item.LUTDescriptor = [top, 0, 16]
    item.LUTExplanation = "test curve"
    item.add_new(0x00283006, "US", lut.tolist())  # LUT Data
    ds.VOILUTSequence = [item]
    for kw in ("WindowCenter", "WindowWidth", "WindowCenterWidthExplanation"):
        if kw in ds:
            delattr(ds, kw)
    objs = build_result_objects([ds], make_results([ds]), MODEL)
    (pr,) = objs.presentation_states
    voi = pr.SoftcopyVOILUTSequence[0]
    assert "WindowCenter" not in voi and list(voi.VOILUTSequence[0].LUTDescriptor) == [top, 0, 16]
    paths = write_result_objects(objs, tmp_path / "out")
    validate(_pr_path(objs, paths, ds))
    base, _ = render(_pr_path(objs, paths, ds), _source_file(tmp_path, ds), tmp_path / "render")
    expected = display_uint8(ds).astype(np.int16)
    assert np.abs(base.astype(np.int16) - expected).mean() < 2.0


def test_boxes_are_clipped_to_the_image_and_a_box_outside_is_left_out(tmp_path):
    from dataclasses import replace

    from inference.results import Region

    sources = dx_study(tmp_path, n=1, offset=10)
    (result,) = make_results(sources)
    columns = int(sources[0].Columns)
    result = replace(result, fracture=BinaryFinding("fracture", 0.9, OperatingPoints(0.3, 0.7)),
                     fracture_regions=(Region((columns + 5.0, 10.0, columns + 50.0, 40.0), 0.9, 10, "fracture"),),
                     regions=(Region((-10.0, -10.0, 50.0, 60.0), 0.5, 10, "anomaly"),))
    objs = build_result_objects(sources, [result], MODEL)
    (pr,) = objs.presentation_states
    ann = _annotations(pr)
    assert enum.LAYER_FRACTURE not in ann  # its only box lies outside the image: not localised
    assert "Fracture: DEFINITE (p=0.90, not localised)" in _texts(pr)
    (box,) = ann[enum.LAYER_REGIONS].GraphicObjectSequence
    np.testing.assert_allclose(_points(box), [[0, 0], [50, 0], [50, 60], [0, 60], [0, 0]])
    assert list(pr[0x6000, 0x0050].value) == [1, 1] and pr[0x6000, 0x0010].value == 60  # overlay: the box's part
    for p in write_result_objects(objs, tmp_path / "out"):
        if p.name.startswith("gsps_"):
            validate(p)
