"""nltk's BLEU: the seed-style figure in metrics.score, and nltk's corpus_bleu agreeing with
pycocoevalcap's BLEU-1..4 on the real sample (two independent implementations)."""

import pytest
from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu, sentence_bleu
from pycocoevalcap.bleu.bleu import Bleu

from medexgen_lib.metrics import normalise, score
from medexgen_lib.reports import read_reports

# pycocoevalcap adds tiny=1e-15 to matched n-gram counts and small=1e-9 to n-gram totals and to
# the reference length in the brevity penalty. Over a corpus of thousands of n-grams that moves
# BLEU by about 1e-13 (relative); 1e-9 leaves room for that and nothing else: a real difference
# of convention shows at 1e-4 (see the short-hypothesis test below).
REL = 1e-9


@pytest.fixture(scope="module")
def sample_table(iuxray_sample):
    return read_reports(iuxray_sample / "reports")


def _both(references, predictions):
    refs, preds = [normalise(r) for r in references], [normalise(p) for p in predictions]
    coco, _ = Bleu(4).compute_score({i: [r] for i, r in enumerate(refs)},
                                    {i: [p] for i, p in enumerate(preds)}, verbose=0)
    # nltk's defaults are pycocoevalcap's conventions: closest reference length, brevity penalty
    # exp(1 - r/c) over corpus totals, uniform weights, no smoothing.
    nltk = [corpus_bleu([[r.split()] for r in refs], [p.split() for p in preds],
                        weights=tuple([1 / n] * n)) for n in range(1, 5)]
    return coco, nltk


def test_nltk_corpus_bleu_equals_pycocoevalcap_on_the_real_sample(sample_table):
    findings = [f for f in sample_table.findings if f]
    predictions = findings[1:] + findings[:1]  # each report scored against another: realistic overlap
    coco, nltk = _both(findings, predictions)
    assert len(findings) > 300 and nltk[3] > 0.05  # 4-grams match: every order is exercised
    assert coco == pytest.approx(nltk, rel=REL)


def test_they_agree_only_where_every_hypothesis_has_at_least_four_tokens(sample_table):
    """nltk divides each sentence's n-gram count by max(1, count), pycocoevalcap by the count
    itself, so a hypothesis shorter than n tokens adds 1 to nltk's BLEU-n denominator only."""
    pairs = [(f, i) for f, i in zip(sample_table.findings, sample_table.impression)]
    short = [len(normalise(i).split()) < 4 for _, i in pairs]
    assert any(short)
    coco, nltk = _both(*zip(*pairs))
    assert coco[0] == pytest.approx(nltk[0], rel=REL)
    assert coco[3] != pytest.approx(nltk[3], rel=1e-5)
    coco, nltk = _both(*zip(*[p for p, s in zip(pairs, short) if not s]))
    assert coco == pytest.approx(nltk, rel=REL)


def test_score_reports_the_seed_style_figure_labelled_beside_corpus_bleu(sample_table):
    findings = [f for f in sample_table.findings if f][:40]
    predictions = findings[1:] + findings[:1]
    metrics = score(findings, predictions)
    smoothing = SmoothingFunction().method1
    expected = sum(sentence_bleu([normalise(r).split()], normalise(p).split(), smoothing_function=smoothing)
                   for r, p in zip(findings, predictions)) / len(findings)
    assert metrics["nltk sentence BLEU-4"] == pytest.approx(expected)
    assert metrics["nltk sentence BLEU-4"] != pytest.approx(metrics["BLEU-4"])
    assert "method1" in metrics["nltk sentence BLEU note"] and "corpus BLEU" in metrics["nltk sentence BLEU note"]
    assert [metrics[f"nltk sentence BLEU-{n}"] >= metrics[f"nltk sentence BLEU-{n + 1}"] for n in (1, 2, 3)] == [True] * 3
