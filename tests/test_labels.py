"""How a probability is written for a person, and the population vocabulary."""

from __future__ import annotations

import pytest

from cxr_worker.labels import Population, format_probability, format_threshold


@pytest.mark.parametrize(("p", "text"), [
    (0.5, "0.50"), (0.999, "> 0.99"), (1.0, "> 0.99"), (0.995, "> 0.99"), (0.991, "> 0.99"),
    (0.99, "0.99"), (0.004, "< 0.01"), (0.0, "< 0.01"), (0.0099, "< 0.01"), (0.01, "0.01"),
    (0.1395, "0.14"), (0.123, "0.12"), (0.005, "< 0.01"),
])
def test_format_probability(p, text):
    assert format_probability(p) == text


def test_format_probability_never_writes_certainty():
    for i in range(10001):
        text = format_probability(i / 10000)
        assert text not in ("1.00", "0.00")
        assert text in ("> 0.99", "< 0.01") or len(text) == 4


@pytest.mark.parametrize(("t", "text"), [
    (0.1395, "0.14"), (0.5, "0.50"), (0.004, "0.004"), (0.0004, "0.0004"), (0.996, "0.996"),
    (0.9999, "0.9999"),
])
def test_format_threshold(t, text):
    assert format_threshold(t) == text


def test_population_values_and_worst():
    assert [p.value for p in Population] == ["in_population", "outside", "unknown"]
    assert Population.OUTSIDE.text == "OUTSIDE VALIDATED POPULATION"
    assert Population.UNKNOWN.text == "POPULATION UNKNOWN"
    assert Population.worst(["in_population", "unknown"]) == Population.UNKNOWN
    assert Population.worst(["unknown", "outside", "in_population"]) == Population.OUTSIDE
    assert Population.worst(["in_population"]) == Population.IN
    assert Population.worst([]) == Population.UNKNOWN
