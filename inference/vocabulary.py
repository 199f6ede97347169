"""The one vocabulary of the product: head names and labels, the modalities the model reads, and every
coded concept a finding or a label is reported with.

Plain data (no pydicom): :class:`Concept` is a (value, scheme designator, meaning) triple. The model card
writer and head fitting (:mod:`inference.training`) write these concepts into a bundle's card;
``dicom_node.sr.enum`` and ``dicom_node.sc.enum`` build their pydicom codes from them; the config and
routing read the head names. Nothing else spells these codes or lists out.

A bundle's card carries its own concepts for its heads and labels, and those are what goes on the wire;
the concepts here are what head fitting writes into a card and the fallbacks for a card without them. The
shipped bundle's card (``inference/bundles/msk-foundation/configs/metadata.json``) carries exactly these
(tests/test_inference_vocabulary.py checks it), and the README's conformance section lists them.
"""

from __future__ import annotations

from dataclasses import dataclass

#: heads whose findings the node reports and routing rules may name, in report order
HEAD_NAMES = ("fracture", "kl_grade", "anatomy", "view", "tumour")

#: modalities of the images the model reads (computed and digital radiography, digitised films); an
#: empty Modality is read too, since the SOP class already says it is an image
MODEL_MODALITIES = frozenset({"CR", "DX", "DR", "RG", "OT"})


def reads_modality(modality: str | None) -> bool:
    """True when the model reads images of ``modality`` (an empty value included)."""
    m = (modality or "").strip().upper()
    return not m or m in MODEL_MODALITIES


# -- labels ---------------------------------------------------------------------------------------
#: anatomy labels of the anatomy head (FracAtlas' regions, 'mixed' read as 'other', plus the knee data)
ANATOMY_LABELS = ("hand", "leg", "hip", "shoulder", "knee", "other")
#: projection labels of the view head
VIEW_LABELS = ("frontal", "lateral", "oblique")
#: Kellgren-Lawrence grades, the labels of the kl_grade head
KL_GRADES = ("0", "1", "2", "3", "4")
#: labels of a binary head
BINARY_LABELS = ("absent", "present")
#: labels of each categorical head, in the order of the head's outputs
HEAD_LABELS: dict[str, tuple[str, ...]] = {"anatomy": ANATOMY_LABELS, "view": VIEW_LABELS, "kl_grade": KL_GRADES}

# -- coding schemes -------------------------------------------------------------------------------
SCT = "SCT"
DCM = "DCM"
#: the project's private coding scheme ("99" prefix: private, PS3.3 C.12.1.1.2.1)
PRIVATE_SCHEME = "99MSKAI"
PRIVATE_SCHEME_NAME = "MSK radiograph AI node private codes"
PRIVATE_SCHEME_ORGANIZATION = "msk-dicom-node project"
PRIVATE_SCHEME_VERSION = "1"

#: the statement every result object carries (SR text, burned into secondary captures)
NOT_FOR_DIAGNOSTIC_USE = "AI RESULT - NOT FOR DIAGNOSTIC USE"


@dataclass(frozen=True)
class Concept:
    """A coded concept: code value, coding scheme designator and code meaning."""

    value: str
    scheme_designator: str
    meaning: str

    def as_dict(self) -> dict[str, str]:
        """The concept as a card writes it (``{"value", "scheme_designator", "meaning"}``)."""
        return {"value": self.value, "scheme_designator": self.scheme_designator, "meaning": self.meaning}


def private(value: str, meaning: str) -> Concept:
    """A concept of the private scheme :data:`PRIVATE_SCHEME`."""
    return Concept(value, PRIVATE_SCHEME, meaning)


# -- findings -------------------------------------------------------------------------------------
FRACTURE = Concept("125605004", SCT, "Fracture of bone")
BONE_NEOPLASM = Concept("126537000", SCT, "Neoplasm of bone")
HARDWARE = Concept("40388003", SCT, "Implant")
KL_GRADE = private("KLGRADE", "Kellgren-Lawrence grade")
ANATOMY = Concept("123014", DCM, "Target Region")
VIEW = Concept("111031", DCM, "Image View")
#: the finding a Kellgren-Lawrence grade of at least :data:`KNEE_OA_MIN_KL_GRADE` states
KNEE_OSTEOARTHRITIS = Concept("239873007", SCT, "Osteoarthritis of knee")
KNEE_OA_MIN_KL_GRADE = 2  # Kellgren-Lawrence: grade >= 2 is radiographic osteoarthritis

#: concept of each head: the finding itself (binary heads) or the question a label answers (categorical)
FINDING_CONCEPTS: dict[str, Concept] = {
    "fracture": FRACTURE,
    "tumour": BONE_NEOPLASM,
    "hardware": HARDWARE,
    "kl_grade": KL_GRADE,
    "anatomy": ANATOMY,
    "view": VIEW,
}
#: other spellings of finding names a bundle may use, and the finding they mean
FINDING_SYNONYMS = {"tumor": "tumour", "bone_tumour": "tumour"}

# -- labels' concepts -----------------------------------------------------------------------------
#: concept of each label of a categorical head. The heads' own labels first (in :data:`HEAD_LABELS`
#: order); then labels other bundles may use, as fallbacks. SNOMED CT codes projections by direction
#: (antero-posterior, right lateral, ...); the data's view labels are coarser (frontal = AP or PA,
#: lateral = either side), so they get private codes rather than a wrong one.
LABEL_CONCEPTS: dict[str, dict[str, Concept]] = {
    "anatomy": {
        "hand": Concept("85562004", SCT, "Hand"),
        "leg": Concept("61685007", SCT, "Lower limb"),  # FracAtlas 'leg': foot to femur
        "hip": Concept("29836001", SCT, "Hip"),
        "shoulder": Concept("16982005", SCT, "Shoulder region"),
        "knee": Concept("72696002", SCT, "Knee"),
        "other": private("OTHER", "Other or several regions"),
        "mixed": Concept("66019005", SCT, "Extremity"),
        "foot": Concept("56459004", SCT, "Foot"),
        "wrist": Concept("74670003", SCT, "Wrist joint"),
        "elbow": Concept("16953009", SCT, "Elbow joint"),
        "ankle": Concept("70258002", SCT, "Ankle joint"),
    },
    "view": {
        "frontal": private("FRONTAL", "Frontal projection (AP or PA)"),
        "lateral": private("LATERAL", "Lateral projection"),
        "oblique": private("OBLIQUE", "Oblique projection"),
        "ap": Concept("399348003", SCT, "antero-posterior"),
        "pa": Concept("272479007", SCT, "postero-anterior"),
    },
    "kl_grade": {g: private(f"KL{g}", f"Kellgren-Lawrence grade {g}") for g in KL_GRADES},
}


def label_concepts(head: str, labels) -> list[Concept] | None:
    """The concepts of ``labels`` of ``head`` in order, or None when the vocabulary lacks one of them."""
    known = LABEL_CONCEPTS.get(head, {})
    if not labels or any(str(label) not in known for label in labels):
        return None
    return [known[str(label)] for label in labels]
