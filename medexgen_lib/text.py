"""Report cleaning that keeps clinical meaning, and the model's target text."""

from __future__ import annotations

import re

import pandas as pd

ANONYMISED = "XXXX"
# "1. " / "2) " at the start or right after a sentence ends (whitespace already collapsed)
_LIST_NUMBER = re.compile(r"(?:^|(?<=[.:;] ))\d{1,2}[.)] (?=\S)")
_ANON_RUN = re.compile(r"\bX{2,}\b", re.IGNORECASE)
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,;:!?])")
_REPEATED_STOP = re.compile(r"\.(\s*\.)+")


def clean_report(text: str, lowercase: bool = False) -> str:
    """Normalise whitespace and list numbering; keep ``XXXX`` as one token.

    ``"1. Cardiomegaly.  2. No  effusion."`` -> ``"Cardiomegaly. No effusion."``.
    Negations, laterality and numbers inside sentences are untouched.
    """
    if not isinstance(text, str):
        return ""
    text = " ".join(text.split())
    text = _LIST_NUMBER.sub("", text)
    text = _ANON_RUN.sub(ANONYMISED, text)
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    text = _REPEATED_STOP.sub(".", text).strip()
    if lowercase:
        text = text.lower().replace(ANONYMISED.lower(), ANONYMISED)
    return text


def target_texts(table: pd.DataFrame, target: str = "findings+impression",
                 lowercase: bool = False) -> pd.Series:
    """The cleaned text the model writes for each study, indexed like ``table``."""
    findings = table["findings"].map(lambda t: clean_report(t, lowercase))
    impression = table["impression"].map(lambda t: clean_report(t, lowercase))
    if target == "findings":
        return findings
    if target == "impression":
        return impression
    if target != "findings+impression":
        raise ValueError(f"unknown target {target!r}")
    return (findings + " " + impression).str.strip()
