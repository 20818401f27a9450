"""The words a result is given, shared by gate, score, report and the worklist.

- :class:`Label`: the result of a scored image;
- :class:`Population`: whether the patient is in the population the model was validated on
  (paediatric, 1-5 years), outside it, or unknown (no usable age). It is shown beside the
  label wherever a person reads a result;
- :func:`format_probability` / :func:`format_threshold`: how a probability is written for a
  person (two decimals, never "1.00" or "0.00"); JSON keeps the raw float.
"""

from __future__ import annotations

import enum


class Label(enum.StrEnum):
    SUSPECTED = "SUSPECTED PNEUMONIA"
    NEGATIVE = "NO PNEUMONIA DETECTED"


class Population(enum.StrEnum):
    """Stored in the worklist (``instances.population``) and given in JSON as these values."""

    IN = "in_population"
    OUTSIDE = "outside"
    UNKNOWN = "unknown"

    @property
    def text(self) -> str:
        """What a person reads (worklist, banner, ``score``)."""
        return _POPULATION_TEXT[self]

    @classmethod
    def worst(cls, values: list[str]) -> Population:
        """A study's population from its images': outside beats unknown beats in."""
        for p in (cls.OUTSIDE, cls.UNKNOWN):
            if p in values:
                return p
        return cls.IN if values else cls.UNKNOWN


_POPULATION_TEXT = {
    Population.IN: "IN VALIDATED POPULATION",
    Population.OUTSIDE: "OUTSIDE VALIDATED POPULATION",
    Population.UNKNOWN: "POPULATION UNKNOWN",
}


def format_probability(p: float) -> str:
    """Two decimals for a person: ``0.50``; above 0.99 ``> 0.99``, below 0.01 ``< 0.01``.

    A model output is never certain, so "1.00" and "0.00" are never written.
    """
    if p > 0.99:
        return "> 0.99"
    if p < 0.01:
        return "< 0.01"
    return f"{p:.2f}"


def format_threshold(t: float) -> str:
    """Two decimals (the shipped 0.1395 reads ``0.14``), more only where two decimals would
    read 0.00 or 1.00 (a threshold is always strictly between 0 and 1)."""
    for decimals in range(2, 7):
        text = f"{t:.{decimals}f}"
        if 0.0 < float(text) < 1.0:
            return text
    return f"{t:g}"
