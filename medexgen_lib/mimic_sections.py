"""MIMIC-CXR free-text reports -> named sections (FINDINGS, IMPRESSION, ...).

Written after the conventions of MIT-LCP's ``mimic-cxr/txt/section_parser.py`` (read, not
copied): a section starts at a line whose text begins with a header in capitals followed by ``:``
(``FINDINGS:``, ``IMPRESSION:``, ``WET READ:``); the section runs to the next header. Header
names are normalised (``CONCLUSION`` and ``FINDINGS AND IMPRESSION`` are the impression,
``REASON FOR EXAM`` the indication, a header describing the study such as ``CHEST, PA AND
LATERAL`` the findings, common misspellings mapped); an empty FINDINGS or IMPRESSION is dropped,
and sections of the same name are joined in order.

MIMIC's shapes handled beyond that:

- Titles ``FINAL REPORT`` / ``FINAL ADDENDUM`` (a line by itself) end the section before them;
  everything under ``FINAL ADDENDUM`` up to the next title, and any ``ADDENDUM:`` section, is the
  ``addendum``: an addendum's later text never replaces the report's own FINDINGS or IMPRESSION.
- ``WET READ:`` (the preliminary read, at the top) is its own section, ended also by the line of
  underscores MIMIC puts under it; it never counts as findings.
- ``___`` marks de-identified text (names, dates, ages); a run of two or more underscores inside
  text becomes the project's anonymisation token ``XXXX`` (IU X-Ray's, ``text.ANONYMISED``), and a
  line of underscores alone is a separator, dropped.
- Text before the first header is the ``preamble``. Whitespace is collapsed to single spaces.

A report with no header at all yields no sections (MIT-LCP falls back to the last paragraph; here
the study is flagged as one without FINDINGS/IMPRESSION, as IU X-Ray's are, and named by the reader).
"""

from __future__ import annotations

import re

from medexgen_lib.text import ANONYMISED

# A header: capitals (and space ( ) / , & -) at the start of a line, then ':'.
_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z ()/,&-]*?)[ \t]*:", re.MULTILINE)
_TITLE = re.compile(r"^[ \t]*(FINAL REPORT|FINAL ADDENDUM|PRELIMINARY REPORT)[ \t]*$", re.MULTILINE)
_RULE_LINE = re.compile(r"^[ \t]*_{5,}[ \t]*$", re.MULTILINE)
_DEIDENTIFIED = re.compile(r"_{2,}")
_SPACE_BEFORE_PUNCT = re.compile(r" ([.,;:!?)])")

NAMES = {
    "impression": "impression", "impressions": "impression", "conclusion": "impression",
    "conclusions": "impression", "findings and impression": "impression",
    "findings/impression": "impression", "findings/ impression": "impression",
    "impresson": "impression", "impresion": "impression", "impession": "impression",
    "findings": "findings", "finding": "findings", "findngs": "findings", "findins": "findings",
    "indication": "indication", "indications": "indication", "reason for exam": "indication",
    "reason for examination": "indication", "clinical indication": "indication",
    "history": "history", "clinical history": "history", "clinical information": "history",
    "patient history": "history",
    "comparison": "comparison", "comparisons": "comparison", "comparison exam": "comparison",
    "comparison film": "comparison", "reference exam": "comparison", "comparision": "comparison",
    "examination": "examination", "exam": "examination", "type of examination": "examination",
    "technique": "technique", "notification": "notification", "addendum": "addendum",
    "wet read": "wet read", "wetread": "wet read", "recommendation": "recommendations",
    "recommendations": "recommendations", "recommendation(s)": "recommendations",
}
# Headers that describe the study itself ("CHEST, PA AND LATERAL:") hold its findings.
_STUDY_HEADER = re.compile(r"chest|portable|pa and lat|ap and lat|lateral and|frontal|two views|one view"
                           r"|pa view|ap view")


def normalise_name(header: str) -> str:
    """A header as the section's normalised name (``"REASON FOR EXAM"`` -> ``"indication"``)."""
    name = " ".join(header.lower().split())
    if name in NAMES:
        return NAMES[name]
    for main in ("impression", "findings", "addendum", "comparison", "history", "indication"):
        if main in name:
            return main
    return "findings" if _STUDY_HEADER.search(name) else name


def section_report(text: str) -> dict[str, str]:
    """The sections of one MIMIC-CXR report, normalised name -> text (see the module's rules);
    ``{}`` when it has no header. FINDINGS/IMPRESSION of an addendum go to ``addendum``."""
    spans = _boundaries(text)
    sections: dict[str, list[str]] = {}
    for name, start, end in spans:
        body = _tidy(text[start:end])
        if name in ("findings", "impression") and not body:
            continue
        sections.setdefault(name, []).append(body)
    if not any(name != "preamble" for name, _, _ in spans):
        return {}
    return {name: " ".join(b for b in bodies if b) for name, bodies in sections.items()}


def _boundaries(text: str) -> list[tuple[str, int, int]]:
    """(name, start, end) of every section: headers, titles and separator lines all end one."""
    marks: list[tuple[int, int, str]] = []  # (position, body start, kind/name)
    for match in _HEADER.finditer(text):
        marks.append((match.start(), match.end(), normalise_name(match.group(1))))
    for match in _TITLE.finditer(text):
        marks.append((match.start(), match.end(), "#" + match.group(1)))
    for match in _RULE_LINE.finditer(text):
        marks.append((match.start(), match.end(), "#rule"))
    marks.sort()
    spans, in_addendum = [], False
    first = marks[0][0] if marks else len(text)
    spans.append(("preamble", 0, first))
    for k, (position, body, kind) in enumerate(marks):
        end = marks[k + 1][0] if k + 1 < len(marks) else len(text)
        if kind.startswith("#"):
            if kind in ("#FINAL ADDENDUM", "#FINAL REPORT", "#PRELIMINARY REPORT"):
                in_addendum = kind == "#FINAL ADDENDUM"
            spans.append(("addendum" if in_addendum else "preamble", body, end))
            continue
        spans.append(("addendum" if in_addendum else kind, body, end))
    return spans


def _tidy(body: str) -> str:
    text = " ".join(_DEIDENTIFIED.sub(f" {ANONYMISED} ", body).split())  # "___F" -> "XXXX F"
    return _SPACE_BEFORE_PUNCT.sub(r"\1", text)
