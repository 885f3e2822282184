"""A rule-based labeler for the 14 CheXpert observations plus granuloma, emphysema and hernia.

It follows the conventions of the CheXpert labeler (Irvin et al. 2019; phrase
and pattern lists of ``stanfordmlgroup/chexpert-labeler``), with regular
expressions in place of its dependency parse:

1. Mentions. Each observation has mention phrases (``MENTIONS``: "effusion",
   "pleural fluid", "the mediastinum is widened", "heart size is mildly
   enlarged", ...) and unmention phrases (``UNMENTIONS``) that look like a
   mention but name something else: "pericardial effusion", "calcified
   nodule" (a granuloma), "massive", a bony "lesion" (only a "cavitary
   lesion" is a lung lesion), a healed or granulomatous "infection",
   "plate(-like) atelectasis" (no device). As in CheXpert's lists,
   "interstitial / reticular markings" are Lung Opacity, and a "line",
   "tube", "plate" or "screw" is a support device.
   Statements that the heart or mediastinum is normal ("heart size is
   normal", "normal cardiomediastinal silhouette", "upper limits of normal",
   "the heart, mediastinum and hila are normal") are negative mentions of
   Cardiomegaly / Enlarged Cardiomediastinum, "normal interstitial markings"
   a negative one of Lung Opacity.
2. Scope. A report is split into sentences: at ". ", ";", "?", "!", a
   line break, a period glued to the next word ("normal.The lungs"), before
   a numbered item "2) ", and at a colon after a section header
   ("IMPRESSION:"); a colon inside a statement ("Heart: enlarged",
   "Pneumothorax: none") is read as a space, a spaced dash as a comma,
   "vs." is no sentence end. Sentences are split into clauses. A clause
   ends at "but", "however", "although", "though", "otherwise", "except",
   "whereas", "which" (a comma-enclosed ", which ...," clause loses its
   commas, so the statement goes on after it), and at a comma, "and" or
   "with" that starts a new statement: the next part opens with a cue ("no
   pneumothorax"), with "there", an article or a size, severity, laterality
   or time word ("small right pleural effusion", "with persistent
   atelectasis"), is a verbless subject and predicate ("..., heart
   enlarged"), or holds its own verb after a complete statement ("...,
   cardiomegaly is present"). A comma or "and" before a bare noun phrase,
   or before "or", continues a list, so a cue applies to the whole list:
   "no effusion, pneumothorax or consolidation" negates all three,
   "effusion and pneumothorax are not seen" both; a negated list that goes
   on with "or" keeps qualified items ("without consolidation, large
   effusion, or pneumothorax"; without the Oxford comma too, where the item
   opens with a qualifier of negated findings: "no focal consolidation, large
   effusion or pneumothorax"), and "no displaced, acute fracture" is one
   negation.
3. Cues, applied in CheXpert's order within a mention's clause:
   (a) "cannot be excluded / ruled out", "not excluded", "no new X"
   -> uncertain; (b) negation -> negative: before the mention "no", "not",
   "without", "free of", "clear of", "negative for", "absence of",
   "resolution of", "resolved", "history of", "removal of", "rule out",
   "unlikely"; after it "is not seen / identified / present", "has
   resolved", "has cleared", "is no longer seen", "is absent", "is
   unlikely", "has been removed", "none", "negative", "with interval
   resolution", and a following "which has resolved / is no longer seen";
   "no change in X" and "no increase" are not negations; (c) uncertainty
   -> uncertain: "may", "might", "could", "possible", "probable", "likely"
   (also "more likely than"), "suggest", "question of", "concern for",
   "suspicious for", "suspected", "favor", "consider", "correlate for",
   "versus" / "vs.", "differential", "borderline", "equivocal",
   "indeterminate", "is not well seen", a "?" after the mention, and "or"
   (or "and/or") between two findings, also closing a list ("atelectasis,
   scarring, or pneumonia"). "Vascular / pulmonary congestion",
   "vascular prominence" and "indistinctness" are at most uncertain Edema,
   and "blunting of the costophrenic angle" at most uncertain Pleural
   Effusion. A mention with no cue is positive: "stable", "unchanged",
   "consistent with" and "compatible with" keep a finding positive.
4. Aggregation per report: positive beats uncertain beats negative; an
   observation never mentioned is absent. A positive or uncertain "CHF" /
   "heart failure" also makes Cardiomegaly uncertain (CheXpert's rule).
   "No Finding" is positive when no observation (support devices aside) is
   positive or uncertain and the report says something about the chest;
   negative when some finding is; absent for an empty or meaningless text
   ("", "XXXX", ".").

It is a keyword labeler, not CheXbert: it reads what a report states, not
what a radiologist would infer. medspaCy 1.3.1's ConText (default rules,
sentence scope, these same mention phrases) was measured in its place on the
IU X-Ray sample and lost (labeler 2.0): MeSH macro-F1 0.810 vs 0.935 on the
held-out half (0.843 vs 0.889 on all 389 indexed reports), 83 vs 118 of the
118 convention sentences of tests/test_labeler.py, and 24-35 times slower
(2.8-6.2 vs 0.08-0.26 s per 100 reports, same runs). Re-run with labeler
2.1 (the trial script is not in the repository: it ran from
/work/extra/trial/medspacy_trial.py with PYTHONPATH=/work/extra/medspacy):
0.811 vs 0.942 held out, 0.838 vs 0.903 on all, 113 vs 172 of 172
sentences, 11.7 vs 0.32 s per 100 reports on a loaded machine. So it is not
a dependency; ``labeler_agreement`` holds the measurement's MeSH side.
"""

from __future__ import annotations

import re
from functools import lru_cache

LABELER_VERSION = "2.2"  # bump whenever a rule or phrase changes: it is part of the evaluation fingerprint

POSITIVE, UNCERTAIN, NEGATIVE, ABSENT = "positive", "uncertain", "negative", "absent"
_RANK = {ABSENT: 0, NEGATIVE: 1, UNCERTAIN: 2, POSITIVE: 3}

NO_FINDING = "No Finding"
SUPPORT_DEVICES = "Support Devices"

# Words that may stand between a heart/mediastinum subject and what is said of it.
_FILLER = (r"(?:(?:is|are|was|were|appears?|remains?|seems?|again|now|still|also|overall|grossly|"
           r"mildly|moderately|markedly|severely|slightly|minimally|significantly|somewhat|borderline|"
           r"not|no|longer|top|at|near|the|upper|limits?|of|within|in|size|silhouette|contours?|and|"
           r"mediastinal|mediastinum|hilar|pulmonary|vascularity|vasculature|lungs?|stable|unchanged|"
           r"xxxx|likely|probably|possibly|may|be|to|for|very|slightly|shape|configuration|hila|hilum|"
           r"\w+ly),?\s+){0,6}")
_HEART = r"(?:heart|cardiac (?:silhouette|shadow|size|contour|diameter)s?)(?: size)?"
_MEDIASTINUM = (r"(?:(?:cardio)?mediastin(?:um|al) (?:silhouette|contours?|configuration|width|shadow)s?"
                r"|mediastinum|superior mediastinum)")
_ENLARGED = r"(?:enlarged|enlargement|large|prominent|prominence|increased)"
_WIDENED = r"(?:widened|widening|wide|enlarged|enlargement|prominent|prominence|broad|broadened)"
_NORMAL = (r"(?:normal|unremarkable|within normal limits|(?:at )?(?:the )?(?:upper|high|top) (?:limits? )?"
           r"(?:of )?normal)")

_INTERSTITIAL = (r"(?:interstitial|reticular) (?:markings?|patterns?|lung disease)"
                 r"|reticulation")
# "Normal interstitial markings": a normal statement, masked as a mention of Lung Opacity.
_NORMAL_INTERSTITIAL = (rf"normal (?:\w+ ){{0,3}}(?:{_INTERSTITIAL})",
                        rf"(?:{_INTERSTITIAL}) (?:(?:is|are|appears?|remains?)\s+)?{_NORMAL}")
# Mention phrases (regular expressions over lowercased text, hyphens read as spaces), per observation.
MENTIONS: dict[str, list[str]] = {
    "Enlarged Cardiomediastinum": [
        rf"{_MEDIASTINUM},? {_FILLER}{_WIDENED}", rf"{_WIDENED} (?:of )?(?:the )?(?:\w+ )?{_MEDIASTINUM}",
        r"(?:cardio)?mediastinal (?:widening|enlargement|prominence)"],
    "Cardiomegaly": [
        r"cardiomegaly", r"cardiac enlargement", rf"{_HEART},? {_FILLER}{_ENLARGED}",
        rf"{_ENLARGED} (?:of )?(?:the )?{_HEART}"],
    "Lung Lesion": [r"nodules?", r"nodular (?:density|densities|opacity|opacities|opacification)",
                    r"mass(?:es)?", r"lump", r"cavitary lesions?", r"carcinoma", r"neoplasms?",
                    r"tumou?rs?"],
    "Lung Opacity": [r"opacit(?:y|ies)", r"opacification", r"opacified", r"infiltrat(?:e|es|ion|ions)",
                     r"air ?space (?:disease|process|opacit(?:y|ies))", r"increased density",
                     r"decreased translucency", _INTERSTITIAL],
    "Edema": [r"edema", r"heart failure", r"\bchf"],
    "Consolidation": [r"consolidat\w*"],
    "Pneumonia": [r"(?:broncho)?pneumonias?", r"infection", r"infectious(?: process)?"],
    "Atelectasis": [r"atelecta\w+", r"collapsed?"],
    "Pneumothorax": [r"(?:hydro)?pneumothora(?:x|ces)"],
    "Pleural Effusion": [r"effusions?", r"pleural fluid", r"hydropneumothora(?:x|ces)"],
    "Pleural Other": [r"pleural (?:thickening|scarring|scar|plaques?|calcifications?)", r"fibrothorax",
                      r"pleuro ?parenchymal (?:scarring|scar)", r"pleural parenchymal scar"],
    "Fracture": [r"fractures?", r"fractured"],
    SUPPORT_DEVICES: [r"pacemakers?", r"pacer", r"catheters?", r"(?:picc|central venous|central|port|ij|internal "
                      r"jugular|jugular|subclavian|femoral|arterial|venous|midline|swan ganz|hickman|dialysis|"
                      r"lumen|iv|intravenous|catheter) lines?", r"lines? and tubes?", r"tubes? and lines?",
                      r"picc", r"tubes?", r"plates?", r"screws?", r"(?:embolization|endovascular) coils?",
                      r"sternotomy wires?", r"sternal wires?",
                      r"(?:surgical|vascular|mediastinal) clips", r"stents?", r"port a cath", r"mediport",
                      r"defibrillators?", r"\b(?:a?icd)", r"devices?",
                      r"hardware", r"(?:prosthetic|artificial) valves?", r"valve (?:replacement|prosthesis)",
                      r"arthroplast\w*", r"cannula", r"drains?", r"generator", r"markers?"],
    # The seed's terms not covered by the 14:
    "Granuloma": [r"granulomas?", r"granulomatous", r"calcified nodul\w*"],
    "Emphysema": [r"emphysema\w*", r"\bcopd", r"chronic obstructive"],
    "Hernia": [r"hernia\w*"],
}
OBSERVATIONS = (NO_FINDING, *MENTIONS)
CHEXPERT_14 = OBSERVATIONS[:14]

# Mentions that are at most uncertain (CheXpert's post-negation uncertainty rules).
UNCERTAIN_MENTIONS: dict[str, list[str]] = {
    "Edema": [r"(?:pulmonary |vascular |venous |pulmonary vascular |pulmonary venous )congestion",
              r"indistinctness", r"vascular prominence"],
    "Pleural Effusion": [r"blunt\w* (?:of )?(?:the )?(?:\w+ )?costophrenic", r"costophrenic (?:angles?|sulc\w+) "
                         r"(?:is |are )?blunt\w*"],
    "Cardiomegaly": [rf"borderline (?:\w+ ){{0,3}}{_HEART}", rf"{_HEART},? {_FILLER}borderline"],
}
# Statements that the heart or mediastinum is normal: negative mentions.
NORMAL_MENTIONS: dict[str, list[str]] = {
    "Cardiomegaly": [rf"{_HEART},? {_FILLER}{_NORMAL}", rf"normal(?: sized?)? {_HEART}"],
    "Enlarged Cardiomediastinum": [
        rf"{_MEDIASTINUM},? {_FILLER}{_NORMAL}",
        rf"normal (?:(?:heart|cardiac|size|and|hilar|the)\s+){{0,4}}{_MEDIASTINUM}"],
    "Lung Opacity": list(_NORMAL_INTERSTITIAL),
}
# Phrases that contain a mention but name something else; masked before that observation is matched.
UNMENTIONS: dict[str, list[str]] = {
    "Pleural Effusion": [r"pericardial effusions?"],
    "Lung Lesion": [r"calcified nodul\w*", r"massive", r"mass effect", r"nipple"],
    "Lung Opacity": [r"pleural scar\w*", *_NORMAL_INTERSTITIAL],
    SUPPORT_DEVICES: [r"plates? (?:like )?atelecta\w*", r"plate ?like", r"end ?plates?"],
    "Pneumonia": [r"granulomatous (?:\w+ )?infection", r"(?:prior|previous|old|healed|remote|chronic) "
                  r"(?:\w+ ){0,2}infection", r"sequela\w* of (?:\w+ ){0,3}infection"],
    "Atelectasis": [r"(?:vertebral|vertebra|body|bodies|height) collapse", r"collapse of (?:the )?(?:\w+ )?"
                    r"(?:vertebra\w*|body|bodies)"],
}

_CUE_NEG_PRE = (r"\bno\b", r"\bnot\b", r"\bwithout\b", r"\bfree of\b", r"\bnegative for\b", r"\babsence of\b",
                r"\bclear(?:ing)? of\b", r"\bresolution of\b", r"\bresolved\b", r"\bnor\b", r"\bneither\b",
                r"\bnever\b", r"\brule[sd]? out\b", r"\bexclude[sd]?\b", r"\bhistory of\b",
                r"\bremoval of\b", r"\bdisappearance of\b", r"\bunlikely\b", r"\bnone\b")
_CUE_NEG_POST = (r"^\W*(?:[\w,]+\s+){0,6}(?:is|are|was|were|has been|have been)\s+(?:not|no longer)\s+"
                 r"(?:seen|identified|present|visualized|demonstrated|appreciated|evident|noted|visible|"
                 r"detected|enlarged|widened)",
                 r"^\W*(?:[\w,]+\s+){0,6}(?:not|no longer)\s+(?:seen|identified|present|visualized|demonstrated|"
                 r"appreciated|evident|visible|detected)",
                 r"^\W*(?:[\w,]+\s+){0,6}(?:has|have|had)?\s*(?:since\s+|now\s+|completely\s+|nearly\s+)?"
                 r"(?:resolved|cleared)",
                 r"^\W*(?:[\w,]+\s+){0,6}(?:is|are|was|were)\s+(?:now\s+|very\s+|highly\s+)?(?:absent|unlikely)",
                 r"^\W*(?:[\w,]+\s+){0,6}(?:has|have)\s+been\s+removed", r"^\W*(?:is|are)?\s*removed",
                 r"^\W*(?:is\s+|are\s+|now\s+)*(?:unlikely|absent|excluded|gone)\b",
                 r"^\s*(?:none|negative)\b(?!\s+for)",
                 r"^\W*(?:[\w,]+\s+){0,6}?(?:with|showing|shows)\s+(?:near(?:ly)?\s+)?(?:complete\s+|interval\s+)*"
                 r"(?:resolution|clearing)\b(?!\s+of)")
# What a "which" clause says that negates its antecedent ("opacity which has resolved"); not "unlikely" or
# "not seen" ("opacity which is unlikely to be pneumonia", "nodule which is not seen on the lateral view").
_RELATIVE_NEGATION = (r"^\s*which\s+(?:[\w,]+\s+){0,6}?(?:(?:has|have|had)\s+)?(?:since\s+|now\s+|completely\s+|"
                      r"nearly\s+)?(?:resolved|cleared|been\s+removed|(?:is|are|was|were)\s+no\s+longer)\b")
_CUE_UNC_FIRST = (r"\b(?:cannot|can not|can't|could not|not)\s+(?:be\s+)?(?:entirely\s+|completely\s+|"
                  r"totally\s+|definitely\s+)?(?:excluded?|ruled?\s+out)",)
_NO_NEW = r"\bno\s+(?:\w+\s+)?new,?\s+(?:\w+\s+){0,2}$"
_CUE_UNC_PRE = (r"\bmay\b", r"\bmight\b", r"\bcould\b", r"\bpossibl[ey]\b", r"\bpossibility\b",
                r"\bprobabl[ey]\b", r"(?<!un)\blikely\b", r"\bsuggest\w*", r"\bversus\b", r"\bvs\b",
                r"\bquestionabl[ey]\b", r"\bquestion(?:ed)?\b", r"\bconcern(?:ing)?\b", r"\bsuspicious\b",
                r"\bcorrelat\w*\s+(?:clinically\s+)?for\b",
                r"\bsuspect\w*", r"\bsuspicion\b", r"\bworrisome\b", r"\bfavou?r\w*", r"\bconsider(?:ed)?\b",
                r"\bdifferential\b", r"\bborderline\b", r"\bequivocal\b", r"\bindeterminate\b",
                r"\bpresumed\b", r"\bpresumabl[ey]\b", r"\bperhaps\b", r"\bmaybe\b", r"\bapparent\b")
_CUE_UNC_POST = (r"^\W*(?:[\w,]+\s+){0,6}(?:is|are)\s+(?:\w+\s+)?(?:possible|suspected|questioned|likely|"
                 r"probable|suggested|considered|favou?red)\s*(?:[,.;:]|\bthan\b|$)",
                 r"^\W*(?:is\s+|are\s+)?(?:less\s+|more\s+|most\s+)?(?:likely|possible|suspected|questioned|"
                 r"probable|favou?red)\s*(?:[,.;:]|$)",
                 r"^\W*(?:\w+\s+){0,3}(?:may|might|could)\s+(?:also\s+)?(?:be|have\s+been)\s+(?:present|seen|"
                 r"noted|identified|visible|evident|developing|there|superimposed)",
                 r"^\W*(?:[\w,]+\s+){0,6}(?:(?:is|are)\s+)?not\s+(?:well|clearly)\s+(?:seen|visualized|evaluated)",
                 r"^\W*(?:[\w,]+\s+){0,6}(?:poorly|incompletely)\s+(?:seen|visualized|evaluated)",
                 r"^\s*\?(?!\w)")
# Uncertainty cues that open a statement after a comma ("..., likely atelectasis"); "suspicious" alone is an
# adjective inside a negated list ("no effusion, suspicious nodule or mass").
_STATEMENT_CUES = (r"\bmay\b", r"\bmight\b", r"\bcould\b", r"\bpossibl[ey]\b", r"\bprobabl[ey]\b",
                   r"\blikely\b", r"\bquestion(?:able|ably)?\b", r"\bconcern\w*", r"\bsuspect\w*",
                   r"\bsuspicious for\b", r"\bconsider(?:ed)?\b", r"\bfavou?r\w*", r"\bborderline\b",
                   r"\bcannot\b", r"\bmaybe\b", r"\bperhaps\b", r"\bpresumed\b", r"\bsuggest\w*")
# Phrases that look like negation but are not ("no change in the effusion").
_PSEUDO_NEGATION = (r"\b(?:no|without)\s+(?:significant\s+|interval\s+|appreciable\s+|substantial\s+)*"
                    r"(?:change|increase|worsening|progression)\b", r"\bnot\s+(?:significantly\s+)?changed\b",
                    r"\bnot\s+only\b", r"\bnot\s+(?:well|clearly)\s+(?:seen|visualized|evaluated)\b",
                    r"\bno\s+(?:\w+\s+)?new\b")
# "or" joining two findings makes both uncertain: the words next to the "or" that name findings.
_FINDING_WORDS = (r"scar\w*|fibros\w*|thickening|fat|vessels?|vascular\w*|artifact\w*|overlap\w*|shadows?|"
                  r"granulom\w*|adenopathy|lymphadenopathy|nodes?|lesions?|densit\w+|pneumonitis|"
                  r"aspiration|hemorrhage|calcifications?|bronchiectasis|process|disease|atelecta\w+|"
                  r"opacit\w+|infiltrat\w+|effusions?|fluid|edema|pneumonia|infection|consolidation|"
                  r"nodules?|mass|pneumothorax|emphysema|tumou?r|neoplasm|cardiomegaly|collapse|"
                  r"abnormalit\w+|changes?|findings?|structures?|contusion|hernia|eventration")

# A sentence ends at ". ", ";", "?", "!", a header's ":", a line break, a period glued to the next word
# ("normal.the lungs", "effusion.2.") and before a numbered item "2) ".
_SENTENCE_SPLIT = re.compile(r"(?<=[.:])(?=\s|$)|(?<=[;!?])|\n|(?<=[a-z]\.)(?=[a-z\d])|(?=\b\d{1,2}\)\s)")
_HEADERS = {"findings", "impression", "impressions", "comparison", "comparisons", "indication", "history",
            "technique", "exam", "examination", "conclusion", "conclusions", "recommendation", "recommendations",
            "note", "reason", "procedure", "report", "summary", "addendum", "clinical", "views", "view"}
_COLON = re.compile(r"\b(\w+)?\s*:(?!\d)\s*")
_SPACED_DASH = re.compile(r"\s+-{1,2}\s+")
_BLANKS = re.compile(r"[ \t]+")
_ABBREVIATION = re.compile(r"\b(vs|approx|e\.g|i\.e)\.")  # not the end of a sentence
# ", which was seen before," inside a statement: its commas go, so the statement goes on after it.
_PARENTHETICAL = re.compile(r",(\s*which\b[^,;.]*),")
_SCOPE_BREAK = re.compile(r"\b(?:but|however|although|though|otherwise|except|whereas|which|aside from|"
                          r"apart from|with the exception of)\b")
_LIST_SEPARATOR = re.compile(r",\s*(?:and\b|or\b)?|\band\b|\bwith\b")
_STATEMENT_START = re.compile(
    r"^\s*(?:there|the|a|an|this|these|that|it|its|with|small|large|tiny|trace|minimal|mild|mildly|moderate|"
    r"moderately|severe|marked|markedly|extensive|massive|left|right|bilateral|bibasilar|bibasal|basilar|"
    r"new|old|stable|unchanged|persistent|persisting|chronic|acute|increased|increasing|decreased|"
    r"decreasing|improved|improving|worsening|worsened|resolving|healed|healing|calcified|subsegmental|residual|"
    r"patchy|diffuse|multiple|several|\d)\b")
# Qualifiers of a negated finding ("no large effusion"), and a negation followed by them only, before a
# comma: "no displaced, acute fracture".
_NEGATION_QUALIFIERS = (r"acute|displaced|nondisplaced|non displaced|focal|large|significant|definite|new|obvious|"
                        r"gross|discrete|suspicious|active|confluent|appreciable|sizable|substantial|frank|overt|"
                        r"dense|visible|evident")
_NEGATED_MODIFIERS = re.compile(
    rf"\b(?:no|not|without|negative for|free of|clear of)\s+(?:(?:{_NEGATION_QUALIFIERS})\s*)+$")
_QUALIFIED_ITEM = re.compile(rf"^\s*(?:{_NEGATION_QUALIFIERS})\b")
# A subject and its predicate without a verb: "heart enlarged", "heart size normal".
_PREDICATE = re.compile(r"^\s*(?:\w+\s+){1,3}(?:enlarged|widened|normal|unremarkable|clear|intact|stable|unchanged)\b")
_VERB = re.compile(r"\b(?:is|are|was|were|has|have|had|be|been|can|cannot|may|might|could|appears?|remains?|"
                   r"seen|noted|present|identified|demonstrated|visualized|shows?|persists?|measur\w+|"
                   r"projects?|overlies|represents?)\b")
# After a negation, a place or side makes a noun phrase a statement of its own, not a bare list item.
_PLACE = re.compile(r"\b(?:left|right|bilateral|bibasilar|bibasal|basilar|apical|perihilar|retrocardiac|lobe|"
                    r"(?:in|at|within|involving|along|overlying|throughout) the)\b")
_CHEST_WORDS = re.compile(
    r"\b(?:lungs?|heart|cardiac|cardio\w*|mediastin\w*|pleura\w*|pulmonary|chest|thora\w*|hil(?:a|ar|um)|"
    r"diaphragms?|hemidiaphragms?|costophrenic|air ?space|pneumo\w*|normal|unremarkable|clear|acute|"
    r"disease|abnormalit\w*|findings?|process|negative|osseous|bony|bones?|spine|ribs?|aorta|aortic|"
    r"vascular\w*|vasculature|silhouette|effusions?|lobes?|apex|apices|bases?|trachea|airways?)\b")


def _alternation(patterns) -> str:
    return "|".join(f"(?:{p})" for p in patterns)


def _word_pattern(patterns) -> re.Pattern:
    return re.compile(r"(?<![\w])(?:" + _alternation(patterns) + r")(?![a-z])")


@lru_cache(maxsize=1)
def _compiled() -> dict:
    """Every regular expression, compiled once."""
    kinds = {"mention": MENTIONS, "uncertain": UNCERTAIN_MENTIONS, "normal": NORMAL_MENTIONS}
    mentions = {obs: [(kind, _word_pattern(table[obs])) for kind, table in kinds.items() if obs in table]
                for obs in MENTIONS}
    unmentions = {obs: _word_pattern(p) for obs, p in UNMENTIONS.items()}
    return {
        "mentions": mentions, "unmentions": unmentions,
        "neg_pre": re.compile(_alternation(_CUE_NEG_PRE)),
        "neg_post": re.compile(_alternation(_CUE_NEG_POST)),
        "relative_neg": re.compile(_RELATIVE_NEGATION),
        "unc_first": re.compile(_alternation(_CUE_UNC_FIRST)),
        "no_new": re.compile(_NO_NEW),
        "unc_pre": re.compile(_alternation(_CUE_UNC_PRE)),
        "unc_post": re.compile(_alternation(_CUE_UNC_POST)),
        "pseudo": re.compile(_alternation(_PSEUDO_NEGATION)),
        "cue_start": re.compile(r"^\s*(?:" + _alternation(_CUE_NEG_PRE + _STATEMENT_CUES) + ")"),
        # "atelectasis or pneumonia", also closing a list: "atelectasis, scarring, or pneumonia"
        "or_after": re.compile(r"^\s*,?\s*(?:(?:\w+\s+){0,2}?(?:" + _FINDING_WORDS + r")\s*,\s*){0,3}"
                               r"(?:or|and/or|versus|vs)\s+(?:\w+\s+){0,3}?(?:" + _FINDING_WORDS + r")\b"),
        "or_before": re.compile(r"\b(?:" + _FINDING_WORDS + r"),?\s+(?:\w+\s+){0,3}?(?:or|and/or|versus|vs)\s+"
                                r"(?:\w+\s+){0,3}$"),
    }


def _starts_statement(previous: str, separator: str, part: str, following: str = "") -> bool:
    """Whether ``part`` (after a comma or "and") opens a new statement instead of continuing a list.

    ``following`` is the text after ``part``: a list that goes on with "or" ("no effusion, consolidation at
    the base, or pneumothorax") keeps its items.
    """
    text = part.strip()
    if not text or re.search(r"\bor\b", separator) or re.match(r"(?:or|nor)\b", text):
        return False
    if _compiled()["cue_start"].match(text):
        return True
    if _NEGATED_MODIFIERS.search(previous):
        return False  # "no displaced, acute fractures": the comma joins two adjectives
    goes_on = re.match(r"\s*,?\s*(?:or|nor)\b", following)
    if _STATEMENT_START.match(text):  # "without consolidation, large effusion, or pneumothorax" is one list,
        # and so, without the Oxford comma, is "no consolidation, large effusion or pneumothorax"
        listed = goes_on or (_QUALIFIED_ITEM.match(text) and re.search(r"\b(?:or|nor)\b", text))
        return not (listed and _compiled()["neg_pre"].search(previous))
    disjunction = re.search(r"\b(?:or|nor)\b", text) or goes_on
    negated_list = disjunction and _compiled()["neg_pre"].search(previous)
    if _PLACE.search(text) and not disjunction and _compiled()["neg_pre"].search(previous):
        return True  # "no effusion, atelectasis at the left base": not an item of the negated list
    if _PREDICATE.match(text) and not disjunction and not _VERB.search(text):
        return True  # "no effusion, heart enlarged"
    if _VERB.search(text):
        if "and" not in separator:  # "opacity at the base, pneumonia cannot be excluded"
            return not negated_list
        complete = bool(_VERB.search(previous) or _compiled()["cue_start"].search(previous)
                        or _compiled()["neg_pre"].search(previous))
        return complete and not disjunction  # "effusion and pneumothorax are not seen" is one statement
    return False


def clauses(sentence: str) -> list[tuple[int, str]]:
    """(offset, clause) pairs: the scopes within which a cue applies."""
    pieces, start = [], 0
    for brk in _SCOPE_BREAK.finditer(sentence):
        pieces.append((start, sentence[start:brk.start()]))
        start = brk.start()
    pieces.append((start, sentence[start:]))
    out = []
    for offset, piece in pieces:
        bounds = [0] + [m.start() for m in _LIST_SEPARATOR.finditer(piece)] + [len(piece)]
        clause_start = 0
        for i in range(1, len(bounds) - 1):
            sep = _LIST_SEPARATOR.match(piece, bounds[i])
            part = piece[sep.end():bounds[i + 1]]
            if _starts_statement(piece[clause_start:bounds[i]], sep.group(), part, piece[bounds[i + 1]:]):
                out.append((offset + clause_start, piece[clause_start:bounds[i]]))
                clause_start = bounds[i]
        out.append((offset + clause_start, piece[clause_start:]))
    return out


def mention_status(clause: str, start: int, end: int, relative: str = "") -> str:
    """Positive, negative or uncertain for the mention ``clause[start:end]``, from the cues of its clause.

    ``relative`` is a "which" clause that follows: its resolution ("opacity which has resolved") reaches
    back, its other cues ("opacity which may represent pneumonia", "... is unlikely to be") do not.
    """
    c = _compiled()
    before, inside, after = clause[:start], clause[start:end], clause[end:]
    if c["unc_first"].search(clause) or c["no_new"].search(before):
        return UNCERTAIN
    masked = c["pseudo"].sub(lambda m: " " * len(m.group()), before + inside)
    if c["neg_pre"].search(masked) or c["neg_post"].search(after) or c["relative_neg"].search(relative):
        return NEGATIVE
    if (c["unc_pre"].search(before + inside) or c["unc_post"].search(after) or before.rstrip().endswith("?")
            or c["or_after"].search(after) or c["or_before"].search(before)):
        return UNCERTAIN
    return POSITIVE


def _mask(text: str, pattern: re.Pattern | None) -> str:
    if pattern is None:
        return text
    return pattern.sub(lambda m: " " * len(m.group()), text)


def _colon(match: re.Match) -> str:
    """A colon after a section header ends a sentence; inside a statement ("Heart: enlarged") it is a space."""
    return f"{match.group(1) or ''}: " if match.group(1) in _HEADERS else f"{match.group(1) or ''} "


def _prepare(text: str) -> str:
    """Lowercased text, single-spaced; a spaced dash reads as a comma, "and/or" as "or", hyphens and
    statement colons as spaces, and a comma-enclosed "which" clause loses its commas."""
    lowered = _SPACED_DASH.sub(", ", text.lower()).replace("-", " ")
    lowered = _ABBREVIATION.sub(r"\1", lowered.replace("and/or", "or"))
    lowered = _PARENTHETICAL.sub(r"\1", _BLANKS.sub(" ", lowered))
    return _COLON.sub(_colon, lowered)


def label_report(text: str) -> dict[str, str]:
    """``{observation: positive | negative | uncertain | absent}`` for one report (see the module
    docstring); a text that is not a string reads as empty. Memoised: scoring labels the same
    references and training reports again for every system and epoch."""
    return dict(_label_text(text if isinstance(text, str) else ""))


def label_report_afresh(text: str) -> dict[str, str]:
    """``label_report`` without its memo: what labelling a report not seen before costs."""
    return dict(_label_text.__wrapped__(text if isinstance(text, str) else ""))


@lru_cache(maxsize=1 << 14)  # about 20 MB at most
def _label_text(text: str) -> tuple[tuple[str, str], ...]:
    c = _compiled()
    labels = {obs: ABSENT for obs in OBSERVATIONS}
    lowered = _prepare(text)
    for sentence in _SENTENCE_SPLIT.split(lowered):
        if not sentence.strip():
            continue
        scopes = [clause for _, clause in clauses(sentence)]
        for i, clause in enumerate(scopes):
            following = scopes[i + 1] if i + 1 < len(scopes) else ""
            relative = following if re.match(r"\s*which\b", following) else ""
            for obs, patterns in c["mentions"].items():
                visible = _mask(clause, c["unmentions"].get(obs))
                for kind, pattern in patterns:  # a normal statement is read where its mention is masked
                    for match in pattern.finditer(clause if kind == "normal" else visible):
                        status = mention_status(clause, match.start(), match.end(), relative)
                        if kind == "uncertain" and status == POSITIVE:
                            status = UNCERTAIN
                        elif kind == "normal":
                            status = NEGATIVE if status != UNCERTAIN else UNCERTAIN
                        if obs == "Edema" and status != NEGATIVE and re.fullmatch(r"heart failure|chf",
                                                                                  match.group()):
                            labels["Cardiomegaly"] = max(labels["Cardiomegaly"], UNCERTAIN, key=_RANK.get)
                        labels[obs] = max(labels[obs], status, key=_RANK.get)
    findings = [o for o in MENTIONS if o != SUPPORT_DEVICES]
    if any(labels[o] in (POSITIVE, UNCERTAIN) for o in findings):
        labels[NO_FINDING] = NEGATIVE
    elif any(labels[o] != ABSENT for o in MENTIONS) or _CHEST_WORDS.search(lowered):
        labels[NO_FINDING] = POSITIVE
    return tuple(labels.items())


def positive_set(labels: dict[str, str], uncertain_as_positive: bool = False,
                 observations: tuple[str, ...] = OBSERVATIONS) -> set[str]:
    """The observations counted as positive (uncertain counts as negative by default)."""
    accepted = {POSITIVE, UNCERTAIN} if uncertain_as_positive else {POSITIVE}
    return {o for o in observations if labels.get(o) in accepted}
