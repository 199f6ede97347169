"""Build real DX/CR test datasets from the committed radiographs and the pydicom-data files.

The FracAtlas radiographs in ``tests/fixtures/fracatlas`` (twelve 8-bit JPEGs,
CC BY 4.0, see the README there) become
DX "for presentation" images (12 bits stored, MONOCHROME2, explicit VR little
endian) with the usual patient/study/series attributes, so that the node and
the model see what a modality would send. Nothing about the pixels is invented.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

#: The committed FracAtlas fixture set: ``images/``, ``labels.csv``, ``boxes.csv``.
FRACATLAS = Path(__file__).resolve().parent / "fixtures" / "fracatlas"

# SNOMED CT codes of the body parts used here (DICOM PS3.16 CID 4031).
def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    """One code sequence item (CodeValue, CodingSchemeDesignator, CodeMeaning)."""
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


_BODYPART_CODES = {"HAND": ("85562004", "Hand"), "LEG": ("30021000", "Lower leg"), "HIP": ("24136001", "Hip joint"),
                   "SHOULDER": ("16982005", "Shoulder region"), "KNEE": ("72696002", "Knee"),
                   "EXTREMITY": ("66019005", "Limb")}
_REGION_TO_BODYPART = {"hand": "HAND", "leg": "LEG", "hip": "HIP", "shoulder": "SHOULDER", "mixed": "EXTREMITY"}


def fracatlas_available() -> bool:
    """Whether the fixture radiographs are there (they are, in any complete checkout)."""
    return (FRACATLAS / "labels.csv").is_file() and any((FRACATLAS / "images").glob("IMG*.jpg"))


#: fixture radiographs the shipped model declines as outside its domain (a whole-arm lateral); a study of them alone
#: gets only an SR and a summary saying so (no maps), so tests that need findings leave them out (``readable=True``).
#: tests/test_fixtures.py checks the list.
DECLINED_FIXTURES = frozenset({"IMG0000025.jpg"})


def fracatlas_images(n: int, *, offset: int = 0, readable: bool = False) -> list[Path]:
    """``n`` fixture radiographs in name order, starting at ``offset``, wrapping around the set
    (``readable``: without the ones the shipped model declines, :data:`DECLINED_FIXTURES`).

    The set holds a dozen images; longer runs repeat them, which is fine for a DICOM
    node: every dataset built from an image gets its own SOP Instance UID.
    """
    files = sorted(f for f in (FRACATLAS / "images").glob("IMG*.jpg") if not (readable and f.name in DECLINED_FIXTURES))
    if not files:
        raise FileNotFoundError(f"no FracAtlas fixture images under {FRACATLAS}")
    return [files[(offset + i) % len(files)] for i in range(n)]


def dx_from_image(image_path: Path | str, *, study_uid: str | None = None, series_uid: str | None = None,
                  patient_id: str = "MSK0001", patient_name: str = "TEST^MSK", body_part: str = "EXTREMITY",
                  view_position: str = "", instance_number: int = 1, scale: int = 1) -> Dataset:
    """A DX For Presentation dataset with the pixels of ``image_path`` (8-bit -> 12 bits stored).

    ``scale`` enlarges the image by an integer factor (nearest neighbour), to reach
    the sizes of real detectors for throughput tests.
    """
    img = np.asarray(Image.open(image_path).convert("L"), dtype=np.uint16)
    if scale > 1:
        img = np.kron(img, np.ones((scale, scale), dtype=np.uint16))
    pixels = (img * 16 + 8).astype(np.uint16)  # 8 -> 12 bits

    now = _dt.datetime.now()
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber = "ACC0001"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.Modality = "DX"
    ds.Manufacturer = "MSK test data"
    ds.BodyPartExamined = body_part
    ds.ViewPosition = view_position
    ds.ImageLaterality = "U"
    ds.PatientOrientation = ["L", "F"]
    ds.PositionerType = ""
    code, meaning = _BODYPART_CODES.get(body_part, ("66019005", "Limb"))
    ds.AnatomicRegionSequence = [code_item(code, "SCT", meaning)]
    ds.AcquisitionContextSequence = []
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.BurnedInAnnotation = "NO"
    ds.DetectorType = "SCINTILLATOR"
    ds.ImagerPixelSpacing = [0.15, 0.15]
    ds.PixelSpacing = [0.15, 0.15]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = "01"  # the source JPEGs were lossy
    ds.LossyImageCompressionRatio = 10
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.PixelData = pixels.tobytes()
    return ds


def write_dx_study(out_dir: Path, images: list[Path], *, study_uid: str | None = None, scale: int = 1,
                   patient_id: str = "MSK0001", patient_name: str = "TEST^MSK", like: Path | None = None
                   ) -> list[Path]:
    """Write one study (one series) of DX files built from ``images``; returns the file paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if like is not None:  # same patient and study as an existing file
        ref = pydicom.dcmread(like, stop_before_pixels=True)
        patient_id, patient_name, study_uid = str(ref.PatientID), str(ref.PatientName), ref.StudyInstanceUID
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    paths = []
    for i, img in enumerate(images, 1):
        ds = dx_from_image(img, study_uid=study_uid, series_uid=series_uid, instance_number=i, scale=scale,
                           patient_id=patient_id, patient_name=patient_name)
        p = out_dir / f"dx_{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def copy_with_new_uids(src: Path | str, dst: Path, *, study_uid: str | None = None,
                       series_uid: str | None = None) -> Path:
    """Copy a DICOM file with a new SOP Instance UID (and optionally study/series), pixel data untouched."""
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if study_uid:
        ds.StudyInstanceUID = study_uid
    if series_uid:
        ds.SeriesInstanceUID = series_uid
    ds.save_as(dst, enforce_file_format=True)
    return dst


def pydicom_radiographs() -> list[Path]:
    """The real CR radiographs of the pydicom-data package (MONOCHROME1; uncompressed and JPEG 2000)."""
    from pydicom.data import get_testdata_file

    names = ["RG1_UNCI.dcm", "RG1_J2KI.dcm", "RG1_J2KR.dcm", "RG3_UNCI.dcm", "RG3_J2KI.dcm", "RG3_J2KR.dcm"]
    out = []
    for n in names:
        p = get_testdata_file(n)
        if p is None:
            raise FileNotFoundError(f"{n} not found: install the test extra (pydicom-data)")
        out.append(Path(p))
    return out


def dataset_part(path: Path | str) -> bytes:
    """The bytes of a DICOM file after its preamble and file meta group: what travels in a C-STORE."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    with open(path, "rb") as f:
        read_preamble(f, False)
        _read_file_meta_info(f)
        return f.read()


def encode_as(ds: Dataset, syntax: str) -> Dataset:
    """A copy of an uncompressed greyscale ``ds`` in the transfer syntax ``syntax``, through a round trip
    of Part 10 bytes (as received). JPEG 2000 and JPEG-LS by pydicom's encoders (pylibjpeg-openjpeg,
    pyjpegls; JPEG 2000 lossy at 20:1); HTJ2K carries the JPEG 2000 Part 1 codestream (which those
    transfer syntaxes allow; no HT block coder is at hand to encode); JPEG baseline (8-bit) by
    Pillow at quality 90 from the values scaled to 8 bits. RLE and deflate by pydicom."""
    import copy
    import io

    from pydicom import uid
    from pydicom.encaps import encapsulate

    out = copy.deepcopy(ds)
    syntax = uid.UID(syntax)
    if syntax in (uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.DeflatedExplicitVRLittleEndian):
        out.file_meta.TransferSyntaxUID = syntax
    elif syntax == uid.JPEGBaseline8Bit:
        arr = out.pixel_array.astype(np.float64)
        u8 = np.rint(arr / (2 ** int(out.BitsStored) - 1) * 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(u8, mode="L").save(buf, format="JPEG", quality=90)
        out.BitsAllocated, out.BitsStored, out.HighBit, out.PixelRepresentation = 8, 8, 7, 0
        for kw in ("WindowCenter", "WindowWidth"):
            if kw in out:
                del out[kw]
        out.PixelData = encapsulate([buf.getvalue()])
        out["PixelData"].VR = "OB"
        out.LossyImageCompression = "01"
        out.file_meta.TransferSyntaxUID = syntax
    elif syntax in (uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL, uid.HTJ2K):
        out.compress(uid.JPEG2000Lossless if syntax != uid.HTJ2K else uid.JPEG2000,
                     **({} if syntax != uid.HTJ2K else {"j2k_cr": [20]}))
        out.file_meta.TransferSyntaxUID = syntax
    elif syntax == uid.JPEG2000:
        out.compress(syntax, j2k_cr=[20])
    else:
        out.compress(syntax)
    buf = io.BytesIO()
    out.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return pydicom.dcmread(buf)
