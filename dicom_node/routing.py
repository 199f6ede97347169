"""Routing: which heads run on an image and where each kind of output goes.

Rules in ``config.yaml`` (``routing.rules``) are tried in order; the first whose
``match`` fits the image wins, else ``routing.default``. A rule matches on the
calling AE, Modality, BodyPartExamined (the anatomy head's answer when the tag
is empty), ViewPosition and SOP class; every list given must contain the
image's value (case-insensitive), an absent list matches anything.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from dicom_node.config import OUTPUT_KINDS, RoutingRule, RoutingSection
from inference.results import ImageResult
from inference.vocabulary import HEAD_NAMES


@dataclass(frozen=True)
class ImageFacts:
    calling_ae: str
    Modality: str
    BodyPartExamined: str
    ViewPosition: str
    SOPClassUID: str


def _fits(values: list[str] | None, value: str) -> bool:
    if values is None:
        return True
    return value.strip().upper() in {v.strip().upper() for v in values}


def matches(rule: RoutingRule, facts: ImageFacts, anatomy: str | None = None) -> bool:
    m = rule.match
    body_part = facts.BodyPartExamined or (anatomy or "")
    return (_fits(m.calling_ae, facts.calling_ae) and _fits(m.modality, facts.Modality)
            and _fits(m.body_part, body_part) and _fits(m.view_position, facts.ViewPosition)
            and _fits(m.sop_class, facts.SOPClassUID))


def route(routing: RoutingSection, facts: ImageFacts, anatomy: str | None = None) -> RoutingRule:
    for rule in routing.rules:
        if matches(rule, facts, anatomy):
            return rule
    return routing.default


def apply_heads(rule: RoutingRule, result: ImageResult) -> ImageResult:
    """Keep only the findings of the heads the rule asks for (the encoder ran once for all of them)."""
    if rule.heads == "all" or not result.processed:
        return result
    keep = set(rule.heads)
    # a head's finding: the ImageResult field of its name
    drop: dict[str, Any] = {f: None for f in HEAD_NAMES if f not in keep}
    if "fracture" not in keep:
        drop["fracture_map"] = None
        drop["fracture_regions"] = ()
    return replace(result, **drop)


def destinations(rules: list[RoutingRule], origin: str) -> dict[str, tuple[str, ...]]:
    """Output kind -> destination AE titles, the union over the rules of the processed images."""
    out: dict[str, dict[str, None]] = {k: {} for k in OUTPUT_KINDS}
    for rule in rules:
        for kind in OUTPUT_KINDS:
            for dest in rule.outputs.of_kind(kind):
                out[kind][origin if dest == "origin" else dest] = None
    return {k: tuple(v) for k, v in out.items()}
