"""Codes of the node's Structured Report: standard where one exists, else the node's private scheme.

Standard codes come from SNOMED CT (``SCT``), DICOM (``DCM``), UMLS and UCUM as
PS3.16 lists them. Concepts no standard defines use the private coding scheme
:data:`PRIVATE_SCHEME` (``99MSKAI``), declared in every SR's Coding Scheme
Identification Sequence and listed in the README's conformance section.

A bundle's model card may carry its own concepts for a finding or a label; those
win over the fallbacks here. The findings' and labels' concepts and the private scheme come from
:mod:`inference.vocabulary` (the one owner of the product's codes); the codes only the SR uses
(report structure, statuses, measurements) are defined here.
"""

from __future__ import annotations

from highdicom.sr import CodedConcept
from pydicom.sr.coding import Code

from inference import vocabulary as V
from inference.vocabulary import (  # noqa: F401
    PRIVATE_SCHEME,
    PRIVATE_SCHEME_NAME,
    PRIVATE_SCHEME_ORGANIZATION,
    PRIVATE_SCHEME_VERSION,
)


def code(concept: V.Concept) -> Code:
    """The pydicom code of a vocabulary concept."""
    return Code(concept.value, concept.scheme_designator, concept.meaning)


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
NOT_FOR_DIAGNOSTIC_USE_TEXT = V.NOT_FOR_DIAGNOSTIC_USE
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
FRACTURE = code(V.FRACTURE)
BONE_NEOPLASM = code(V.BONE_NEOPLASM)
KNEE_OSTEOARTHRITIS = code(V.KNEE_OSTEOARTHRITIS)
KL_GRADE = code(V.KL_GRADE)
ANATOMY = code(V.ANATOMY)
VIEW = code(V.VIEW)

#: Concept of each finding *name* of :mod:`inference.results` (the qualitative evaluation's name).
FINDING_CONCEPTS: dict[str, Code] = {name: code(c) for name, c in V.FINDING_CONCEPTS.items()}
FINDING_CONCEPTS.update({alias: FINDING_CONCEPTS[name] for alias, name in V.FINDING_SYNONYMS.items()})

#: Fallback concepts of categorical *labels* (the qualitative evaluation's value).
LABEL_CONCEPTS: dict[str, dict[str, Code]] = {
    head: {label: code(c) for label, c in labels.items()} for head, labels in V.LABEL_CONCEPTS.items()}

#: Values of a binary finding's decision at the bundle's two operating points.
DECISION_CODES: dict[str, Code] = {
    "absent": Code("272519000", "SCT", "Absent"),
    "suspected": Code("415684004", "SCT", "Suspected"),
    "definite": Code("52101004", "SCT", "Present"),
}
KNEE_OA_MIN_KL_GRADE = V.KNEE_OA_MIN_KL_GRADE

# -- measurements ---------------------------------------------------------------------------
#: Unit of a probability and of a map score. Viewers print a NUM as "<concept meaning>: <value> <unit code>"
#: (OHIF: "Fracture of bone, definite: 72.00 %"), so the unit is one a reader knows: percent. (UCUM's
#: dimensionless "1" printed as a stray "1", the annotation "{probability}" in braces.)
UNIT_PERCENT = Code("%", "UCUM", "percent")
UNIT_MM2 = Code("mm2", "UCUM", "square millimeter")
AREA = Code("42798000", "SCT", "Area")
#: Peak value of a model map inside a region (in percent of the map's full scale).
REGION_PEAK_SCORE = private("MAPPEAK", "Peak map score in region")
#: The region's anomaly score: peak of the reconstruction-error map in the region (label-free localisation).
ANOMALY_SCORE = private("ANOMSCORE", "Abnormal region, anomaly score")
#: A group's label in viewers (OHIF's measurement panel shows it).
COMMENT = Code("121106", "DCM", "Comment")
#: Text of a positive finding that no region localises.
LOCALISATION = private("LOCALISATION", "Localisation")
NOT_LOCALISED_TEXT = "not localised"
#: What the anomaly map (the heatmap capture) is and is not, from the model's card (issue 17: not a localiser).
ANOMALY_MAP_NOTE = private("ANOMMAPNOTE", "Anomaly map")

#: How a viewer names a binary finding's probability: the finding and the call, so that the line a viewer
#: draws next to the box reads "Fracture of bone, definite: 72.00 %". A private concept per (finding,
#: decision); the standard concepts stay in the qualitative evaluation (finding -> Present/Suspected/Absent).
DECISION_WORDS = {"absent": "absent", "suspected": "suspected", "definite": "definite"}


def decision_probability(finding: Code | CodedConcept, decision: str) -> Code:
    """NUM concept "<finding meaning>, <decision>" for the probability of a binary finding."""
    word = DECISION_WORDS[decision]
    value = f"P-{finding.value}-{word[:3].upper()}"[:16]
    return private(value, f"{finding.meaning}, {word}")

#: Standard coding schemes the SR uses without declaring them (PS3.16 Section 8).
STANDARD_SCHEMES = {"SCT", "DCM", "UMLS", "UCUM", "LN", "SRT", "FMA", "RADLEX", "NCIt"}
