"""Proof that the demo model reads the image: trained on the phantom set, it beats the
constant-report baseline on the phantom findings by far; with images shuffled against
reports (same run otherwise) it does not. Takes a few minutes on 2 CPU cores."""

from collections import Counter

import pytest

from medexgen_lib.acquisition import acquire, build_studies_table
from medexgen_lib.config import load_config
from medexgen_lib.evaluate import generate_reports
from medexgen_lib.labeler import label_report
from medexgen_lib.metrics import clinical_metrics
from medexgen_lib.model import ReportGenerator
from medexgen_lib.preprocess import load_split, run_preprocessing
from medexgen_lib.train import train

pytestmark = pytest.mark.slow
PHANTOM_FINDINGS = ("Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Lung Lesion",
                    "Consolidation", "Edema")


def _macro_f1(references, predictions):
    return clinical_metrics([label_report(r) for r in references], [label_report(p) for p in predictions],
                            PHANTOM_FINDINGS)["macro_F1"]


def test_demo_model_learns_image_to_text(tmp_path):
    data = {"paths.data_dir": str(tmp_path / "data")}
    cfg = load_config("demo", {**data, "paths.output_dir": str(tmp_path / "real")})
    build_studies_table(cfg, acquire(cfg))
    run_preprocessing(cfg)
    val = load_split(cfg, "val")
    references = [e.text for e in val.examples]
    most_frequent = Counter(e.text for e in load_split(cfg, "train").examples).most_common(1)[0][0]
    baseline = _macro_f1(references, [most_frequent] * len(references))

    scores = {}
    for name, shuffled in (("real", False), ("shuffled", True)):
        run_cfg = load_config("demo", {**data, "paths.output_dir": str(tmp_path / name),
                                       "train.shuffle_images": shuffled})
        result = train(run_cfg, progress=False)
        model = ReportGenerator.from_pretrained(result.final_model)
        rows = generate_reports(model, val, run_cfg.eval, progress=False)
        scores[name] = _macro_f1(references, [r["prediction"] for r in rows])
    print(f"\nval macro-F1 over phantom findings: constant report {baseline:.3f}, "
          f"model {scores['real']:.3f}, images shuffled {scores['shuffled']:.3f}")
    assert scores["real"] > baseline + 0.4
    assert scores["shuffled"] < baseline + 0.25
    assert scores["real"] > scores["shuffled"] + 0.3
