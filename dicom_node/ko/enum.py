"""Constants of the node's Key Object Selection documents: IHE IOCM rejection notes.

A re-run of a study (late images) supersedes the result version a destination already holds.
Where ``superseded_results`` is ``reject``, the node sends that destination a rejection note
(IHE Radiology TF, Imaging Object Change Management): a Key Object Selection Document whose
document title is a reason from CID 7011 "Rejected for Quality Reasons" and whose evidence lists
every rejected instance. A PACS with IOCM hides or deletes them.

Why 113001 "Rejected for Quality Reasons" among CID 7011's reasons: the superseded objects are
about the right patient and study (not "Incorrect Modality Worklist Entry", 113038), they are
not dangerous (not "Rejected for Patient Safety Reasons", 113037, which IOCM reserves for objects
that must never be used and that receivers must purge), and no retention period ended (not
"Data Retention Policy Expired", 113039). They were computed from an incomplete study and a
better version replaces them: a quality rejection, which an IOCM PACS hides from normal queries
and may keep or delete according to its own policy.
"""

from __future__ import annotations

from highdicom.sr import CodedConcept

#: Key Object Selection Document Storage
SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.88.59"

#: document title of a rejection note (CID 7011 "Rejection Reasons")
REJECTED_FOR_QUALITY_REASONS = CodedConcept(value="113001", scheme_designator="DCM",
                                            meaning="Rejected for Quality Reasons")

#: Series Number of a rejection note: this plus the result version that supersedes
#: (the SR series is 9100 + version, the secondary captures 9200 + version)
SERIES_NUMBER_BASE = 9900

#: the name of the device observer (TID 1004) that selected the rejected objects
DEVICE_OBSERVER_NAME = "msk-dicom-node"
