"""One vocabulary: the shipped card, the SR codes and the head fitting all use inference.vocabulary's concepts."""

from __future__ import annotations

import json

from dicom_node.sr import enum
from inference import DEFAULT_BUNDLE
from inference import vocabulary as V
from inference.training.adapt import ADAPT_HEADS
from inference.training.heads_fit import HEAD_DEFAULTS


def _card() -> dict:
    return json.loads((DEFAULT_BUNDLE / "configs" / "metadata.json").read_text())["msk_node"]


def test_shipped_card_uses_the_vocabulary_concepts():
    heads = _card()["heads"]
    assert set(V.HEAD_NAMES) <= set(heads)
    for name, head in heads.items():
        assert head["concept"] == V.FINDING_CONCEPTS[name].as_dict(), name
        if head["kind"] == "binary":
            assert tuple(head["labels"]) == V.BINARY_LABELS
            continue
        assert tuple(head["labels"]) == V.HEAD_LABELS[name], name
        assert head["label_concepts"] == [c.as_dict() for c in V.label_concepts(name, head["labels"])], name


def test_sr_codes_are_the_vocabulary_codes():
    def same(code, concept):
        return (code.value, code.scheme_designator, code.meaning) == (
            concept.value, concept.scheme_designator, concept.meaning)

    for name, concept in V.FINDING_CONCEPTS.items():
        assert same(enum.FINDING_CONCEPTS[name], concept), name
    for alias, name in V.FINDING_SYNONYMS.items():
        assert enum.FINDING_CONCEPTS[alias] == enum.FINDING_CONCEPTS[name]
    assert set(enum.FINDING_CONCEPTS) == set(V.FINDING_CONCEPTS) | set(V.FINDING_SYNONYMS)
    for head, labels in V.LABEL_CONCEPTS.items():
        assert set(enum.LABEL_CONCEPTS[head]) == set(labels)
        for label, concept in labels.items():
            assert same(enum.LABEL_CONCEPTS[head][label], concept), (head, label)
    for name, concept in (("FRACTURE", V.FRACTURE), ("BONE_NEOPLASM", V.BONE_NEOPLASM), ("KL_GRADE", V.KL_GRADE),
                          ("ANATOMY", V.ANATOMY), ("VIEW", V.VIEW), ("KNEE_OSTEOARTHRITIS", V.KNEE_OSTEOARTHRITIS)):
        assert same(getattr(enum, name), concept), name
    assert enum.PRIVATE_SCHEME == V.PRIVATE_SCHEME == "99MSKAI"
    assert enum.NOT_FOR_DIAGNOSTIC_USE_TEXT == V.NOT_FOR_DIAGNOSTIC_USE


def test_head_fitting_labels_and_concepts_come_from_the_vocabulary():
    for name, (kind, labels, _arch) in HEAD_DEFAULTS.items():
        assert tuple(labels) == (V.BINARY_LABELS if kind == "binary" else V.HEAD_LABELS[name]), name
        assert name in V.FINDING_CONCEPTS
    assert set(ADAPT_HEADS) < set(V.HEAD_NAMES)
    # a label set the vocabulary does not code gets no concepts, rather than codes of other labels
    assert V.label_concepts("anatomy", ["hand", "thorax"]) is None
    assert [c.value for c in V.label_concepts("view", ["lateral", "frontal"])] == ["LATERAL", "FRONTAL"]


def test_modalities_the_model_reads():
    assert V.reads_modality("DX") and V.reads_modality(" cr ") and V.reads_modality("") and V.reads_modality(None)
    assert not V.reads_modality("MG") and not V.reads_modality("CT") and not V.reads_modality("SC")
