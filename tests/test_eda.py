import pandas as pd

from medexgen_lib.eda import compute_eda_stats, run_eda


def _table():
    rows = [("Heart normal. Lungs clear.", "No acute disease.", ["normal"], 2),
            ("Heart normal. Lungs clear.", "No acute disease.", ["normal"], 2),
            ("Large left pleural effusion.", "Effusion.", ["Pleural Effusion/left"], 1),
            ("", "", [], 0)]
    return pd.DataFrame({
        "findings": [r[0] for r in rows], "impression": [r[1] for r in rows],
        "mesh_major": [r[2] for r in rows], "n_images": [r[3] for r in rows],
        "image_paths": [[""] * r[3] for r in rows],
        "projections": [["frontal", "lateral"][:r[3]] for r in rows],
        "projection_source": ["bundled IU X-Ray table" if r[3] else "unknown" for r in rows],
        "no_findings": [not r[0] for r in rows], "no_impression": [not r[1] for r in rows],
        "no_image": [r[3] == 0 for r in rows], "image_missing": [r[3] > 0 for r in rows]})


def test_known_values():
    stats = compute_eda_stats(_table())
    assert stats["reports"] == 4 and stats["images_referenced"] == 5
    assert stats["images_per_report"] == {"0": 1, "1": 1, "2": 2}
    assert stats["missing"]["no_findings_and_no_impression"] == 1
    assert stats["distinct_reports"] == 2
    assert abs(stats["duplicate_report_share"] - 2 / 3) < 1e-9
    # "heart normal. lungs clear. no acute disease.": 7 words, 10 tokens with the full stops
    assert stats["length_words"]["max"] == 7 and stats["length_tokens"]["max"] == 10
    assert stats["top_sentences"][0] == ("heart normal.", 2)
    assert stats["mesh_major_prevalence"][0] == ("normal", 2, 0.5)
    assert stats["projections"] == {"images": {"frontal": 3, "lateral": 2},
                                    "studies_by_views": {"frontal + lateral": 2, "frontal": 1},
                                    "source": {"bundled IU X-Ray table": 3}}


def test_run_eda_writes_stats_and_figures(tmp_path):
    stats, figures = run_eda(_table(), tmp_path / "plots", tmp_path / "logs" / "eda_stats.json")
    assert (tmp_path / "logs" / "eda_stats.json").exists()
    assert {f.name for f in figures} >= {"eda_counts.png", "eda_report_lengths.png",
                                         "eda_mesh_terms.png", "eda_top_words.png"}
    assert all(f.stat().st_size > 1000 for f in figures)


def test_sentences_are_counted_on_the_cleaned_text_the_model_learns(iuxray_sample):
    """The real sample's numbered impressions ("1. ... 2. ...") must not make "1." a sentence."""
    import re

    from medexgen_lib.reports import read_reports

    table = read_reports(iuxray_sample / "reports")
    assert table["impression"].str.contains(r"(?:^|\. )2\. ", regex=True).sum() >= 20  # numbered lists exist
    stats = compute_eda_stats(table, top=1000)
    numbering = [(s, n) for s, n in stats["top_sentences"] if re.fullmatch(r"\W*\d*\W*", s)]
    assert numbering == []
    assert stats["top_sentences"][0][0] == "no acute cardiopulmonary abnormality."
    assert "target findings+impression" in stats["text"]
    findings_only = compute_eda_stats(table, target="findings")
    assert findings_only["length_words"]["mean"] < stats["length_words"]["mean"]


def test_real_sample_projection_counts_come_from_the_bundled_table(iuxray_sample):
    from medexgen_lib.reports import BUNDLED_PROJECTIONS, read_reports

    table = read_reports(iuxray_sample / "reports", projections=BUNDLED_PROJECTIONS)
    projections = compute_eda_stats(table)["projections"]
    assert set(projections["images"]) == {"frontal", "lateral"}
    assert sum(projections["images"].values()) == table["n_images"].sum() == 754
    assert projections["source"] == {"bundled IU X-Ray table": int((table["n_images"] > 0).sum())}
    assert projections["studies_by_views"]["frontal + lateral"] > 300


def test_statistics_memory_does_not_grow_with_words_per_report():
    """compute_eda_stats held every report's word and token lists at once (~7 kB per report at
    50 words): stage 02's peak memory grew with the data set, +150 MB at 20,000 studies. Python's
    peak allocation while computing must stay within a few times the texts' own size."""
    import tracemalloc

    import numpy as np

    rng = np.random.default_rng(0)
    vocabulary = [f"word{k}" for k in range(300)]
    table = pd.concat([_table()] * 1_000, ignore_index=True)
    table["findings"] = [" ".join(rng.choice(vocabulary, 60)) + "." for _ in range(len(table))]
    text_bytes = sum(len(t) for t in table["findings"]) + sum(len(t) for t in table["impression"])
    tracemalloc.start()
    try:
        stats = compute_eda_stats(table)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stats["length_words"]["max"] >= 60 and stats["reports"] == 4_000
    assert peak < 6 * text_bytes, f"peak {peak / 1e6:.1f} MB for {text_bytes / 1e6:.1f} MB of text"
