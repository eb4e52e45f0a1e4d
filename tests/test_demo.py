"""What ``make run`` sums up over the sample studies: answers sharing the query's label, beside chance."""

from __future__ import annotations

import math

from lookalike.ops.demo import label_agreement


def test_agreement_counts_shown_answers_per_modality_beside_chance() -> None:
    labels = {"u1": "benign", "u2": "benign", "u3": "malignant", "u4": "normal", "x1": "normal", "x2": "pneumonia"}
    modality_of = {"u1": "US", "u2": "US", "u3": "US", "u4": "US", "x1": "DX", "x2": "DX"}
    answers = {"u1": ["u2", "u3"], "u3": ["u1", "u2", "u4"], "x1": ["x2"], "x2": []}
    got = label_agreement(answers, labels, modality_of)
    # US: u1's answers hold one of its label (u2) out of 2, u3's none of 3 -> 1 of 5 shown
    assert got["US"]["queries"] == 2 and got["US"]["answers"] == 5
    assert math.isclose(got["US"]["agreement"], 1 / 5)
    # chance: u1 has 1 benign among its 3 other US studies, u3 no malignant among its 3
    assert math.isclose(got["US"]["chance"], (1 / 3 + 0) / 2)
    assert got["DX"]["answers"] == 1 and got["DX"]["agreement"] == 0.0 and got["DX"]["chance"] == 0.0


def test_answers_and_queries_without_a_known_label_are_left_out() -> None:
    labels = {"a": "benign", "b": "benign"}
    got = label_agreement({"a": ["b", "unknown"], "unknown": ["a"]}, labels, {"a": "US", "b": "US", "unknown": "US"})
    assert got["US"]["queries"] == 1 and got["US"]["answers"] == 1 and got["US"]["agreement"] == 1.0
    assert math.isnan(label_agreement({"a": []}, labels, {"a": "US", "b": "US"})["US"]["agreement"])
