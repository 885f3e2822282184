"""Proof that the demo model reads the image, scored on the TEST split (validation picked the
checkpoint, so it would flatter the model): trained on the phantom set, the model beats the
best constant report (the training report that scores best on the training studies) and the same run with images shuffled
against reports by clear margins. Nearest-image retrieval is printed beside them as a fourth
row. Takes a few minutes on 2 CPU cores."""

import pytest

from medexgen_lib.acquisition import acquire, build_studies_table
from medexgen_lib.config import load_config
from medexgen_lib.evaluate import baseline_predictions
from medexgen_lib.reporting import generate_reports
from medexgen_lib.labeler import label_report
from medexgen_lib.metrics import clinical_metrics, prediction_labels
from medexgen_lib.model import ReportGenerator
from medexgen_lib.preprocess import load_split, run_preprocessing
from medexgen_lib.train import train

pytestmark = pytest.mark.slow
PHANTOM_FINDINGS = ("Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Lung Lesion",
                    "Consolidation", "Edema")


def _macro_f1(references, predictions, decoder_texts=None):
    """Macro-F1 over the phantom findings, a degenerate decoder text getting no credit (as scoring does)."""
    drafts = decoder_texts or [None] * len(predictions)
    return clinical_metrics([label_report(r) for r in references],
                            [prediction_labels(p, d) for p, d in zip(predictions, drafts, strict=True)],
                            PHANTOM_FINDINGS)["macro_F1"]


def _best_constant_report(train_texts):
    """The training report that, written for every training study, scores the best macro-F1 on
    them: the constant baseline at its strongest (the most frequent report is a normal one,
    which scores 0 over the phantom findings by construction)."""
    truth = [label_report(t) for t in train_texts]
    labels = {t: prediction_labels(t) for t in set(train_texts)}
    return max(sorted(labels), key=lambda t: clinical_metrics(truth, [labels[t]] * len(truth),
                                                              PHANTOM_FINDINGS)["macro_F1"])


def test_demo_model_learns_image_to_text(tmp_path):
    data = {"paths.data_dir": str(tmp_path / "data")}
    cfg = load_config("demo", {**data, "paths.output_dir": str(tmp_path / "prepared")})
    build_studies_table(cfg, acquire(cfg))
    run_preprocessing(cfg)
    train_data, val_data, test_data = (load_split(cfg, s) for s in ("train", "val", "test"))
    references = [e.text for e in test_data.examples]
    constant = _best_constant_report([e.text for e in train_data.examples])

    scores = {"constant report": _macro_f1(references, [constant] * len(references))}
    assert scores["constant report"] > 0.05  # a baseline that is not 0 by construction
    for name, shuffled in (("model", False), ("images shuffled", True)):
        run_cfg = load_config("demo", {**data, "paths.output_dir": str(tmp_path / name),
                                       "train.shuffle_images": shuffled})
        model = ReportGenerator.from_pretrained(train(run_cfg, progress=False).final_model)
        rows = generate_reports(model, test_data, run_cfg.eval, progress=False)
        assert [r["uid"] for r in rows] == [e.uid for e in test_data.examples]
        scores[name] = _macro_f1(references, [r["prediction"] for r in rows], [r["decoder_text"] for r in rows])
        if not shuffled:
            retrieved = baseline_predictions(model, train_data, val_data, test_data)
            scores["nearest-image retrieval"] = _macro_f1(references,
                                                          retrieved["retrieval (nearest image)"])
    print(f"\nTEST macro-F1 over phantom findings ({len(references)} studies): "
          + ", ".join(f"{name} {value:.3f}" for name, value in scores.items()))
    assert scores["model"] > scores["constant report"] + 0.4
    assert scores["images shuffled"] < scores["constant report"] + 0.25
    assert scores["model"] > scores["images shuffled"] + 0.3
