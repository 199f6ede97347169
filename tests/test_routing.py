"""Routing rules: which heads are reported and where each output goes."""

from __future__ import annotations

import numpy as np
import pytest

from dicom_node.config import ConfigError, parse_config
from dicom_node.routing import ImageFacts, apply_heads, destinations, route
from inference.results import BinaryFinding, CategoricalFinding, ImageResult, OperatingPoints

CFG = {
    "peers": [{"ae_title": "PACS", "host": "127.0.0.1", "port": 4242},
              {"ae_title": "ARCHIVE", "host": "127.0.0.1", "port": 4243}],
    "routing": {"rules": [
        {"name": "knees", "match": {"modality": ["CR", "DX"], "body_part": ["KNEE"]},
         "heads": ["kl_grade", "anatomy"], "outputs": {"sr": ["origin"], "heatmaps": ["origin", "ARCHIVE"],
                                                       "summary": [], "gsps": ["ARCHIVE"]}},
        {"name": "no-mammo", "match": {"modality": ["MG"]}, "skip": True},
        {"name": "from-archive", "match": {"calling_ae": ["ARCHIVE"], "sop_class": ["1.2.840.10008.5.1.4.1.1.1"]},
         "heads": ["fracture"]},
    ]},
}


def facts(**kw):
    base = dict(calling_ae="PACS", Modality="DX", BodyPartExamined="", ViewPosition="AP",
                SOPClassUID="1.2.840.10008.5.1.4.1.1.1.1")
    base.update(kw)
    return ImageFacts(**base)


def result():
    return ImageResult(
        image_id="1.2.3", rows=8, columns=8,
        fracture=BinaryFinding("fracture", 0.9, OperatingPoints(0.3, 0.8)),
        kl_grade=CategoricalFinding("kl_grade", ("0", "1", "2", "3", "4"), (0.1, 0.1, 0.6, 0.1, 0.1)),
        anatomy=CategoricalFinding("anatomy", ("hand", "knee"), (0.2, 0.8)),
        view=CategoricalFinding("view", ("frontal", "lateral"), (0.7, 0.3)),
        fracture_map=np.zeros((8, 8), np.float32))


def test_first_matching_rule_wins_and_anatomy_stands_in_for_a_missing_body_part():
    cfg = parse_config(CFG, environ={})
    assert route(cfg.routing, facts(BodyPartExamined="knee")).name == "knees"  # case-insensitive
    assert route(cfg.routing, facts(), anatomy="knee").name == "knees"  # tag empty: the anatomy head decides
    assert route(cfg.routing, facts(BodyPartExamined="HAND"), anatomy="knee").name == "default"  # tag wins
    assert route(cfg.routing, facts(Modality="MG")).skip is True
    assert route(cfg.routing, facts(calling_ae="ARCHIVE", SOPClassUID="1.2.840.10008.5.1.4.1.1.1")).name == \
        "from-archive"
    assert route(cfg.routing, facts(calling_ae="ARCHIVE")).name == "default"


def test_heads_filter_and_destinations():
    cfg = parse_config(CFG, environ={})
    knees = cfg.routing.rules[0]
    r = apply_heads(knees, result())
    assert r.kl_grade is not None and r.anatomy is not None
    assert r.fracture is None and r.view is None and r.fracture_map is None
    assert apply_heads(cfg.routing.default, result()) == result()
    d = destinations([knees, cfg.routing.default], origin="PACS")
    assert d == {"sr": ("PACS",), "heatmaps": ("PACS", "ARCHIVE"), "summary": ("PACS",), "gsps": ("ARCHIVE", "PACS")}
    assert destinations([knees], origin="PACS")["summary"] == ()
    assert destinations([knees], origin="PACS")["gsps"] == ("ARCHIVE",)


@pytest.mark.parametrize("change,key", [
    ({"heads": ["elbow"]}, "routing.rules[0].heads"),
    ({"outputs": {"sr": ["NOWHERE"]}}, "routing.rules[0].outputs.sr"),
    ({"match": {"modailty": ["DX"]}}, "routing.rules[0].match.modailty"),
])
def test_routing_errors_name_the_key(change, key):
    import copy

    bad = copy.deepcopy(CFG)
    bad["routing"]["rules"][0].update(change)
    with pytest.raises(ConfigError) as err:
        parse_config(bad, environ={})
    assert err.value.key == key, str(err.value)


def test_every_output_kind_has_its_destinations():
    from dicom_node.config import OUTPUT_KINDS, Outputs

    assert OUTPUT_KINDS == ("sr", "heatmaps", "summary", "gsps")
    outputs = Outputs(gsps=["ARCHIVE"])
    assert [outputs.of_kind(k) for k in OUTPUT_KINDS] == [["origin"], ["origin"], ["origin"], ["ARCHIVE"]]
