"""A rule-based labeler for the 14 CheXpert observations plus granuloma, emphysema and hernia.

For each report: find mention phrases per observation, decide per mention
whether it is negated ("no", "without", "free of", "no evidence of", lists
like "no effusion, pneumothorax or consolidation") or uncertain ("may",
"possible", "cannot be excluded", "versus", ...) within its clause, then
aggregate: positive beats uncertain beats negative; unmentioned is absent.
"No Finding" is positive only when no finding (support devices aside) is
positive or uncertain. It is a keyword labeler, not CheXbert: it reads what a
report states, not what a radiologist would infer.
"""

from __future__ import annotations

import re
from functools import lru_cache

POSITIVE, UNCERTAIN, NEGATIVE, ABSENT = "positive", "uncertain", "negative", "absent"
_RANK = {ABSENT: 0, NEGATIVE: 1, UNCERTAIN: 2, POSITIVE: 3}

NO_FINDING = "No Finding"
SUPPORT_DEVICES = "Support Devices"

# Mention phrases (regular expressions over lowercased text), per observation.
MENTIONS: dict[str, list[str]] = {
    "Enlarged Cardiomediastinum": [
        r"(widened|widening of the|enlarged|prominent) (cardio)?mediastin\w*",
        r"mediastin\w* (widening|enlargement)", r"cardiomediastinal (silhouette|contour)s? (is |are )?(\w+ )?(enlarged|widened)"],
    "Cardiomegaly": [
        r"cardiomegaly", r"enlarged (heart|cardiac (silhouette|shadow|size))",
        r"(heart|cardiac silhouette|cardiac shadow|heart size|cardiac size)( is| are)?( \w+){0,2} (enlarged|increased|large|prominent)",
        r"enlargement of the (heart|cardiac (silhouette|shadow))"],
    "Lung Lesion": [r"nodules?", r"nodular (density|densities|opacity|opacities)", r"mass(es)?",
                    r"lesions?", r"tumou?rs?", r"neoplasms?", r"metasta\w+"],
    "Lung Opacity": [r"opacit(y|ies)", r"opacification", r"infiltrates?", r"airspace (disease|process)",
                     r"densit(y|ies)", r"haziness", r"hazy"],
    "Edema": [r"edema", r"(vascular|pulmonary|venous) congestion", r"congestive heart failure",
              r"\bchf\b", r"heart failure"],
    "Consolidation": [r"consolidat\w*"],
    "Pneumonia": [r"pneumonias?", r"infection", r"infectious (process|disease)"],
    "Atelectasis": [r"atelecta\w+", r"collapse(d)?"],
    "Pneumothorax": [r"pneumothora(x|ces)"],
    "Pleural Effusion": [r"effusions?", r"pleural fluid", r"blunting of the (\w+ )?costophrenic",
                         r"costophrenic (angle|sulcus|sulci)( is| are)? blunt\w*"],
    "Pleural Other": [r"pleural (thickening|scarring|plaques?)", r"fibrothorax", r"pleural calcification"],
    "Fracture": [r"fractures?", r"fractured"],
    SUPPORT_DEVICES: [r"pacemaker", r"catheters?", r"(picc|central venous|central) lines?",
                      r"(endotracheal|chest|feeding|nasogastric|tracheostomy) tubes?",
                      r"sternotomy", r"(surgical )?clips", r"stents?", r"ports?\b", r"defibrillator",
                      r"(support|medical|cardiac) devices?", r"hardware"],
    # The seed's terms not covered by the 14:
    "Granuloma": [r"granulomas?", r"granulomatous"],
    "Emphysema": [r"emphysema\w*", r"\bcopd\b", r"chronic obstructive"],
    "Hernia": [r"hernia\w*"],
}
OBSERVATIONS = (NO_FINDING, *MENTIONS)
CHEXPERT_14 = OBSERVATIONS[:14]

_NEGATION_BEFORE = (r"\bno\b", r"\bnot\b", r"\bwithout\b", r"\bfree of\b", r"\bnegative for\b",
                    r"\babsence of\b", r"\bclear of\b", r"\bresolution of\b", r"\bresolved\b",
                    r"\bnor\b", r"\bneither\b", r"\bnever\b", r"\brule[sd]? out\b", r"\bexclude[sd]?\b")
_NEGATION_AFTER = (r"^\W*(is|are|has|have been|was|were)?\s*(not|no longer)\b",
                   r"^\W*(has |have )?(resolved|cleared)\b", r"^\W*(is |are )?absent\b")
_UNCERTAIN_BEFORE = (r"\bmay\b", r"\bmight\b", r"\bpossibl[ey]\b", r"\bprobabl[ey]\b", r"\blikely\b",
                     r"\bsuggest(s|ive|ing)?\b", r"\bversus\b", r"\bvs\b", r"\bquestionable\b",
                     r"\bquestion of\b", r"\bconcern(ing)? for\b", r"\bcould\b", r"\bconsider\w*",
                     r"\bsuspicious for\b", r"\bsuspect\w*", r"\bcannot (be )?(excluded?|ruled? out)",
                     r"\bcan not (be )?(excluded?|ruled? out)", r"\bdifferential\b", r"\bborderline\b",
                     r"\bequivocal\b", r"\bpresumed\b", r"\bperhaps\b")
_UNCERTAIN_AFTER = (r"^[^.;]{0,25}\b(cannot|can not|could not|not) (be )?(excluded?|ruled? out)",
                    r"^\W*(is |are )?(possible|suspected|not excluded|questioned)\b", r"^\s*\?")
# Phrases that look like negation but are not ("no change in the effusion").
_PSEUDO_NEGATION = (r"\bno (significant |interval |appreciable )?change\b", r"\bnot (significantly )?changed\b",
                    r"\bno increase\b", r"\bnot only\b", r"\bno longer\b(?= (enlarged|seen|visible|present))")
_SCOPE_BREAK = re.compile(r"\b(but|however|although|though|except|aside from|apart from|which|that is|with the exception)\b")
_CLAUSE_SPLIT = re.compile(r"(?<!\d)[.;](?!\d)|\n")


@lru_cache(maxsize=1)
def _compiled():
    join = lambda patterns: re.compile("|".join(f"(?:{p})" for p in patterns))  # noqa: E731
    mentions = {obs: re.compile(r"\b(?:" + "|".join(f"(?:{p})" for p in pats) + r")")
                for obs, pats in MENTIONS.items()}
    return (mentions, join(_NEGATION_BEFORE), [re.compile(p) for p in _NEGATION_AFTER],
            join(_UNCERTAIN_BEFORE), [re.compile(p) for p in _UNCERTAIN_AFTER],
            join(_PSEUDO_NEGATION))


def mention_status(clause: str, start: int, end: int) -> str:
    """Positive, negative or uncertain for the mention ``clause[start:end]``."""
    _, neg_before, neg_after, unc_before, unc_after, pseudo = _compiled()
    before = clause[:start]
    breaks = list(_SCOPE_BREAK.finditer(before))
    if breaks:
        before = before[breaks[-1].end():]
    inside = clause[start:end]
    after = clause[end:]
    cut = _SCOPE_BREAK.search(after)
    after = after[: cut.start()] if cut else after
    if unc_before.search(before) or any(p.search(after) for p in unc_after):
        return UNCERTAIN
    before_and_inside = pseudo.sub(" ", before + " " + inside)
    if neg_before.search(before_and_inside) or any(p.search(after) for p in neg_after):
        return NEGATIVE
    return POSITIVE


def label_report(text: str) -> dict[str, str]:
    """``{observation: positive | negative | uncertain | absent}`` for one report."""
    mentions = _compiled()[0]
    labels = {obs: ABSENT for obs in OBSERVATIONS}
    lowered = (text or "").lower()
    for clause in _CLAUSE_SPLIT.split(lowered):
        for obs, pattern in mentions.items():
            for match in pattern.finditer(clause):
                status = mention_status(clause, match.start(), match.end())
                if _RANK[status] > _RANK[labels[obs]]:
                    labels[obs] = status
    findings = [o for o in MENTIONS if o != SUPPORT_DEVICES]
    any_finding = any(labels[o] in (POSITIVE, UNCERTAIN) for o in findings)
    labels[NO_FINDING] = NEGATIVE if any_finding else POSITIVE
    return labels


def positive_set(labels: dict[str, str], uncertain_as_positive: bool = False,
                 observations: tuple[str, ...] = OBSERVATIONS) -> set[str]:
    """The observations counted as positive (uncertain counts as negative by default)."""
    accepted = {POSITIVE, UNCERTAIN} if uncertain_as_positive else {POSITIVE}
    return {o for o in observations if labels.get(o) in accepted}


# Open-i MeSH major terms (the part before the first "/") that state an observation.
MESH_TERMS: dict[str, tuple[str, ...]] = {
    NO_FINDING: ("normal",),
    "Cardiomegaly": ("Cardiomegaly",),
    "Lung Lesion": ("Nodule", "Mass", "Neoplasms", "Lung Neoplasms"),
    "Lung Opacity": ("Opacity", "Airspace Disease", "Infiltrate", "Density"),
    "Edema": ("Pulmonary Edema", "Edema", "Pulmonary Congestion"),
    "Consolidation": ("Consolidation",),
    "Pneumonia": ("Pneumonia",),
    "Atelectasis": ("Pulmonary Atelectasis", "Atelectasis"),
    "Pneumothorax": ("Pneumothorax",),
    "Pleural Effusion": ("Pleural Effusion",),
    "Fracture": ("Fractures, Bone", "Rib Fractures"),
    SUPPORT_DEVICES: ("Implanted Medical Device", "Catheters, Indwelling", "Surgical Instruments",
                      "Medical Device", "Tube, Inserted", "Stents"),
    "Granuloma": ("Calcified Granuloma", "Granuloma", "Granulomatous Disease"),
    "Emphysema": ("Emphysema", "Pulmonary Emphysema", "Pulmonary Disease, Chronic Obstructive"),
    "Hernia": ("Hernia, Hiatal", "Hernia"),
}


def mesh_agreement(texts: list[str], mesh_major: list[list[str]]) -> dict[str, dict]:
    """Per observation: how the labeler's positives agree with the reports' MeSH major terms."""
    result = {}
    labels = [label_report(t) for t in texts]
    for obs, terms in MESH_TERMS.items():
        mesh = [any(t.split("/")[0].strip() in terms for t in m) for m in mesh_major]
        if obs == NO_FINDING:
            mesh = [list(m) == ["normal"] for m in mesh_major]
        ours = [l[obs] == POSITIVE for l in labels]
        both = sum(a and b for a, b in zip(mesh, ours))
        agree = sum(a == b for a, b in zip(mesh, ours))
        result[obs] = {"mesh": sum(mesh), "labeler": sum(ours), "both": both,
                       "recall_of_mesh": both / sum(mesh) if sum(mesh) else None,
                       "precision_vs_mesh": both / sum(ours) if sum(ours) else None,
                       "agreement": agree / len(texts) if texts else None}
    return result
