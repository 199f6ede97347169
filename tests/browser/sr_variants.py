"""Edited copies of an SR, to see what OHIF makes of a structure before the node writes it.

    python -m tests.browser.sr_variants SR_IN SR_OUT [--drop-groups-without-scoord] [--scoord-under-first-num]
                                                     [--comment]

* ``--drop-groups-without-scoord``: remove the measurement groups that hold no SCOORD/SCOORD3D
  (the per-image "Image N findings" groups).
* ``--scoord-under-first-num``: in each group with a SCOORD, drop the NUM items' children (the
  algorithm concept modifiers) and put a copy of the group's SCOORD under the group's first NUM
  (INFERRED FROM), the place where OHIF's hydration looks for it.
* ``--comment``: add a Comment (DCM 121106) TEXT item per group holding the Finding's meaning
  (OHIF's label for a hydrated measurement).

The copy gets new SOP Instance and Series Instance UIDs, so it can sit in the study next to the original.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return c


def _has_scoord(item: Dataset) -> bool:
    return any(c.ValueType in ("SCOORD", "SCOORD3D") for c in item.get("ContentSequence", []))


def _meaning(item: Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeMeaning)


def edit(ds: Dataset, *, drop_groups_without_scoord: bool = False, scoord_under_first_num: bool = False,
         comment: bool = False) -> Dataset:
    """``ds`` edited in place (and returned), with new SOP Instance and Series Instance UIDs."""
    for top in ds.ContentSequence:
        if _meaning(top) != "Imaging Measurements":
            continue
        groups = list(top.ContentSequence)
        if drop_groups_without_scoord:
            groups = [g for g in groups if _has_scoord(g)]
        for g in groups:
            items = list(g.get("ContentSequence", []))
            scoord = next((i for i in items if i.ValueType in ("SCOORD", "SCOORD3D")), None)
            nums = [i for i in items if i.ValueType == "NUM"]
            if scoord_under_first_num and scoord is not None and nums:
                for n in nums:
                    if "ContentSequence" in n:
                        del n.ContentSequence
                inner = copy.deepcopy(scoord)
                inner.RelationshipType = "INFERRED FROM"
                nums[0].ContentSequence = [inner]
            finding = next((i for i in items if i.ValueType == "CODE" and _meaning(i) == "Finding"), None)
            if comment and finding is not None:
                text = Dataset()
                text.RelationshipType, text.ValueType = "CONTAINS", "TEXT"
                text.ConceptNameCodeSequence = [_code("121106", "DCM", "Comment")]
                text.TextValue = str(finding.ConceptCodeSequence[0].CodeMeaning)
                items.append(text)
            g.ContentSequence = items
        top.ContentSequence = groups
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    return ds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sr_in", type=Path)
    p.add_argument("sr_out", type=Path)
    p.add_argument("--drop-groups-without-scoord", action="store_true")
    p.add_argument("--scoord-under-first-num", action="store_true")
    p.add_argument("--comment", action="store_true")
    args = p.parse_args(argv)
    ds = edit(pydicom.dcmread(args.sr_in), drop_groups_without_scoord=args.drop_groups_without_scoord,
              scoord_under_first_num=args.scoord_under_first_num, comment=args.comment)
    ds.save_as(args.sr_out, enforce_file_format=True)
    print(args.sr_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
