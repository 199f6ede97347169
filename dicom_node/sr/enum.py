"""Codes of the node's Structured Report: standard where one exists, else the node's private scheme.

Standard codes come from SNOMED CT (``SCT``), DICOM (``DCM``), UMLS and UCUM as
PS3.16 lists them. Concepts no standard defines use the private coding scheme
:data:`PRIVATE_SCHEME` (``99MSKAI``), declared in every SR's Coding Scheme
Identification Sequence and listed in the README's conformance section.

A bundle's model card may carry its own concepts for a finding or a label; those
win over the fallbacks here.
"""

from __future__ import annotations

from pydicom.sr.coding import Code

#: Private coding scheme designator ("99" prefix: private, PS3.3 C.12.1.1.2.1).
PRIVATE_SCHEME = "99MSKAI"
PRIVATE_SCHEME_NAME = "MSK radiograph AI node private codes"
PRIVATE_SCHEME_ORGANIZATION = "msk-dicom-node project"
PRIVATE_SCHEME_VERSION = "1"


def private(value: str, meaning: str) -> Code:
    return Code(value, PRIVATE_SCHEME, meaning)


# -- report level -------------------------------------------------------------------------
#: Procedure reported (TID 1500 row 5, CID 100 is extensible).
PROCEDURE_REPORTED = Code("168537006", "SCT", "Plain radiography")
#: TID 1500 row 12: the report-level "Qualitative Evaluations" container and TEXT/CODE items.
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
#: Purpose of reference of the algorithm's Contributing Equipment item: "Processing Algorithm" as the IHE
#: AI Results (AIR) profile defines it (DICOM CID 7005 has no such concept yet; AIR's code is a placeholder
#: in IHE's private scheme 99IHE, which the objects declare in their Coding Scheme Identification Sequence).
PURPOSE_PROCESSING = Code("Newcode1", "99IHE", "Processing Algorithm")
IHE_SCHEME = "99IHE"
IHE_SCHEME_NAME = "IHE Radiology AI Results (AIR) profile codes"
IHE_SCHEME_ORGANIZATION = "IHE Radiology"

# -- statements (private: no standard concept) --------------------------------------------
USE_RESTRICTION = private("USE", "Intended use statement")
NOT_FOR_DIAGNOSTIC_USE_TEXT = "AI RESULT - NOT FOR DIAGNOSTIC USE"
PROCESSING_STATUS = private("PROCSTAT", "AI processing status")
REASON_NOT_PROCESSED = private("NOTPROCREASON", "Reason image not processed")
# processing status values: DCM CID 6042 "Status of Results"
STATUS_SUCCEEDED = Code("111222", "DCM", "Succeeded")
STATUS_PARTIAL = Code("111223", "DCM", "Partially Succeeded")
STATUS_FAILED = Code("111224", "DCM", "Failed")

# -- finding types of measurement groups ---------------------------------------------------
IMAGE_FINDINGS = Code("404684003", "SCT", "Clinical finding")
ABNORMAL_REGION = Code("122451", "DCM", "Abnormal Region")

# -- finding concepts (fallbacks when the card has none) ------------------------------------
FRACTURE = Code("125605004", "SCT", "Fracture of bone")
BONE_NEOPLASM = Code("126537000", "SCT", "Neoplasm of bone")
KNEE_OSTEOARTHRITIS = Code("239873007", "SCT", "Osteoarthritis of knee")
KL_GRADE = private("KLGRADE", "Kellgren-Lawrence grade")
ANATOMY = Code("91723000", "SCT", "Anatomical Structure")
VIEW = Code("111031", "DCM", "Image View")

#: Concept of each finding *name* of :mod:`inference.results` (the qualitative evaluation's name).
FINDING_CONCEPTS: dict[str, Code] = {
    "fracture": FRACTURE,
    "tumour": BONE_NEOPLASM,
    "tumor": BONE_NEOPLASM,
    "bone_tumour": BONE_NEOPLASM,
    "kl_grade": KL_GRADE,
    "anatomy": ANATOMY,
    "view": VIEW,
}

#: Fallback concepts of categorical *labels* (the qualitative evaluation's value).
LABEL_CONCEPTS: dict[str, dict[str, Code]] = {
    "anatomy": {
        "hand": Code("85562004", "SCT", "Hand"),
        "leg": Code("30021000", "SCT", "Lower leg"),
        "hip": Code("24136001", "SCT", "Hip joint"),
        "shoulder": Code("16982005", "SCT", "Shoulder"),
        "knee": Code("72696002", "SCT", "Knee"),
        "mixed": Code("66019005", "SCT", "Extremity"),
        "foot": Code("56459004", "SCT", "Foot"),
        "wrist": Code("74670003", "SCT", "Wrist joint"),
        "elbow": Code("16953009", "SCT", "Elbow joint"),
        "ankle": Code("70258002", "SCT", "Ankle joint"),
    },
    "view": {
        "frontal": Code("399033003", "SCT", "frontal"),
        "ap": Code("399348003", "SCT", "antero-posterior"),
        "pa": Code("272479007", "SCT", "postero-anterior"),
        "lateral": Code("399067008", "SCT", "lateral"),
        "oblique": Code("399182000", "SCT", "oblique"),
    },
    "kl_grade": {str(g): private(f"KL{g}", f"Kellgren-Lawrence grade {g}") for g in range(5)},
}

#: Values of a binary finding's decision at the bundle's two operating points.
DECISION_CODES: dict[str, Code] = {
    "absent": Code("272519000", "SCT", "Absent"),
    "suspected": Code("415684004", "SCT", "Suspected"),
    "definite": Code("52101004", "SCT", "Present"),
}
KNEE_OA_MIN_KL_GRADE = 2  # Kellgren-Lawrence: grade >= 2 is radiographic osteoarthritis

# -- measurements ---------------------------------------------------------------------------
#: Unit of a probability (UCUM annotation: dimensionless, reads "probability").
UNIT_PROBABILITY = Code("{probability}", "UCUM", "probability")
UNIT_SCORE = Code("1", "UCUM", "no units")
UNIT_MM2 = Code("mm2", "UCUM", "square millimeter")
AREA = Code("42798000", "SCT", "Area")
#: Peak value of a model map inside a region (0..1).
REGION_PEAK_SCORE = private("MAPPEAK", "Peak map score in region")

#: Standard coding schemes the SR uses without declaring them (PS3.16 Section 8).
STANDARD_SCHEMES = {"SCT", "DCM", "UMLS", "UCUM", "LN", "SRT", "FMA", "RADLEX", "NCIt"}
