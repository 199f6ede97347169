"""What every result object of one result version shares: its series description and its dates.

A radiologist tells result versions apart in the PACS's series list, so the description
carries the version, and a re-run says which version it supersedes. The use statement
comes first so that it survives the 64-character limit of LO. The dates are one instant
per result version (when the node built the objects): Series Date/Time and Content
Date/Time are the same on every object of the version, so that a PACS files them together.
"""

from __future__ import annotations

from datetime import datetime

from pydicom.dataset import Dataset

from dicom_node.identity import ResultIdentity
from inference.results import ModelInfo
from inference.vocabulary import NOT_FOR_DIAGNOSTIC_USE

#: longest value of LO (Series Description)
_LO = 64


def series_description(model: ModelInfo, kind: str, identity: ResultIdentity) -> str:
    """``<use statement> <kind> v<n>[ supersedes v<n-1>] <model> <version>``, cut at 64 characters.

    The model's name and version come last: they are also in the Contributing Equipment and
    the algorithm identification, the version of the result is not.
    """
    head = "AI RESULT" if model.for_diagnostic_use else NOT_FOR_DIAGNOSTIC_USE
    version = f"v{identity.result_version}"
    if identity.result_version > 1:
        version += f" supersedes v{identity.result_version - 1}"
    return f"{head} {kind} {version} {model.name} {model.version}"[:_LO].rstrip()


def created_now() -> datetime:
    """The instant a result version is built (local time, as the other dates of the study are)."""
    return datetime.now().astimezone()


def stamp(ds: Dataset, created: datetime) -> None:
    """Series Date/Time, Content Date/Time and Instance Creation Date/Time of a result object."""
    date, time = created.strftime("%Y%m%d"), created.strftime("%H%M%S.%f")
    ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = date
    ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = time


__all__ = ["series_description", "created_now", "stamp"]
