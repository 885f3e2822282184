"""A seeded phantom of IU X-Ray: synthetic radiographs whose drawn findings match their reports.

The phantom is the offline default data set. Each study gets a frontal (PA)
and, mostly, a lateral PNG, and an Open-i-format XML report whose FINDINGS and
IMPRESSION describe what was drawn (and negate what was not), with MeSH major
terms that match. Because the text follows the pixels, a model trained on it
can only beat a constant report by actually reading the image.

Conventions: a PA image shows the patient's right on the image's left.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import numpy as np
from PIL import Image, ImageFilter
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

FINDINGS = ("cardiomegaly", "effusion", "pneumothorax", "nodule", "consolidation", "edema")
FINDING_PROBABILITY = {"cardiomegaly": 0.3, "effusion": 0.3, "pneumothorax": 0.15,
                       "nodule": 0.2, "consolidation": 0.25, "edema": 0.15}
# Drawn only for real reports that state them (``realtext.py``); the phantom set never samples them.
REAL_TEXT_FINDINGS = ("atelectasis", "granuloma")
NORMAL_SHARE = 0.4
LATERAL_SHARE = 0.95
# Both written next to the XML reports, in reports/.
PROJECTIONS_FILE = "indiana_projections.csv"
TRUTH_FILE = "phantom_findings.json"


@dataclass
class PhantomStudy:
    """What was drawn for one study; the report is written from this."""

    number: int
    findings: dict[str, str] = field(default_factory=dict)  # finding -> side/size detail
    has_lateral: bool = True

    @property
    def uid(self) -> str:
        return f"CXR{self.number}"

    @property
    def image_ids(self) -> list[str]:
        base = f"{self.uid}_IM-{self.number % 10000:04d}"
        return [f"{base}-1001"] + ([f"{base}-2001"] if self.has_lateral else [])


def make_phantom_dataset(n_studies: int, seed: int, out_dir: str | os.PathLike,
                         image_size: int = 128) -> list[PhantomStudy]:
    """Write ``n_studies`` phantom studies under ``out_dir``.

    Layout as Open-i's archives unpack: ``reports/ecgen-radiology/<n>.xml`` and
    ``images/<image id>.png``; plus ``reports/indiana_projections.csv`` (Kaggle
    format) and ``reports/phantom_findings.json`` (the drawn ground truth).
    Deterministic by seed.
    """
    if n_studies < 1:
        raise ValueError(f"n_studies must be at least 1, got {n_studies}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 pixels, got {image_size}")
    out = Path(out_dir)
    reports_dir = out / "reports" / "ecgen-radiology"
    images_dir = out / "images"
    reports_dir.mkdir(parents=True, exist_ok=True)
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    studies = _sample_studies(n_studies, rng)
    projection_rows = ["uid,filename,projection"]
    for study in tqdm(studies, desc="phantom studies", unit="study"):
        views = ["Frontal", "Lateral"][: len(study.image_ids)]
        for image_id, view in zip(study.image_ids, views):
            pixels = draw_radiograph(study.findings, view.lower(), image_size, rng)
            Image.fromarray(pixels, mode="L").save(images_dir / f"{image_id}.png")
            kaggle_name = image_id.removeprefix("CXR") + ".dcm.png"
            projection_rows.append(f"{study.number},{kaggle_name},{view}")
        (reports_dir / f"{study.number}.xml").write_text(
            _report_xml(study, _write_report(study, rng)), encoding="utf-8")
    (out / "reports" / PROJECTIONS_FILE).write_text("\n".join(projection_rows) + "\n")
    (out / "reports" / TRUTH_FILE).write_text(json.dumps([asdict(s) for s in studies], indent=1))
    log.info("phantom: %d studies, %d images in %s", len(studies),
             len(projection_rows) - 1, out)
    return studies


def phantom_files(n_studies: int, seed: int) -> list[str]:
    """The files ``make_phantom_dataset(n_studies, seed, out_dir)`` writes, relative to ``out_dir``
    (known before it writes any: stage 01 records them as its own first)."""
    studies = _sample_studies(n_studies, np.random.default_rng(seed))
    return ([f"images/{image_id}.png" for study in studies for image_id in study.image_ids]
            + [f"reports/ecgen-radiology/{study.number}.xml" for study in studies]
            + [f"reports/{PROJECTIONS_FILE}", f"reports/{TRUTH_FILE}"])


def _sample_studies(n_studies: int, rng: np.random.Generator) -> list[PhantomStudy]:
    """What each study shows; drawn before any pixel, so the file names follow from the seed alone."""
    return [_sample_study(rng, number) for number in range(1, n_studies + 1)]


def _sample_study(rng: np.random.Generator, number: int) -> PhantomStudy:
    study = PhantomStudy(number=number, has_lateral=bool(rng.random() < LATERAL_SHARE))
    if rng.random() < NORMAL_SHARE:
        return study
    while not study.findings:
        for name in FINDINGS:
            if rng.random() < FINDING_PROBABILITY[name]:
                study.findings[name] = _finding_detail(name, rng)
    return study


def _finding_detail(name: str, rng: np.random.Generator) -> str:
    side = str(rng.choice(["left", "right"]))
    if name == "effusion":
        return str(rng.choice(["left", "right", "bilateral"]))
    if name == "nodule":
        return f"{side}-{rng.choice(['upper', 'lower'])}-{rng.choice(['nodule', 'nodule', 'mass'])}"
    if name in ("pneumothorax", "consolidation"):
        return side
    return ""


# --------------------------------------------------------------------------- drawing

def draw_radiograph(findings: dict[str, str], view: str, size: int,
                    rng: np.random.Generator) -> np.ndarray:
    """A grayscale uint8 radiograph (``size`` x ``size``) showing ``findings``.

    ``findings`` maps a name of ``FINDINGS`` to its detail: ``effusion``, ``pneumothorax``:
    a side; ``consolidation``: a side, optionally ``-upper`` or ``-lower`` (default lower);
    ``nodule``: ``side-zone-kind`` (``left-upper-mass``); a side is ``left``, ``right`` or
    ``bilateral`` (drawn in both lungs). ``cardiomegaly`` and ``edema`` take ``""``.
    ``REAL_TEXT_FINDINGS``: ``atelectasis`` a side (a thin plate-like band at the lung base,
    added to what is there, so it shows through fluid and consolidation),
    ``granuloma`` ``side-zone`` (a small, very dense calcified dot).
    """
    y, x = np.mgrid[0:size, 0:size] / size
    jitter = rng.normal(0, 0.015, size=2)
    x, y = x - jitter[0], y - jitter[1]
    img = np.full((size, size), 0.04)
    img[_ellipse(x, y, 0.5, 0.55, 0.46, 0.52)] = 0.38
    if view == "frontal":
        lung_mask = _draw_frontal(img, x, y, findings, rng)
    else:
        lung_mask = _draw_lateral(img, x, y, findings, rng)
    texture = np.asarray(Image.fromarray((rng.random((size, size)) * 255).astype(np.uint8))
                         .filter(ImageFilter.GaussianBlur(max(1, size // 64)))) / 255.0
    img += np.where(lung_mask, 0.12 * (texture - 0.5), 0.04 * (texture - 0.5))
    img = img * rng.uniform(0.9, 1.1) + rng.uniform(-0.04, 0.04)
    out = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
    out = out.filter(ImageFilter.GaussianBlur(size / 256))
    noisy = np.asarray(out, dtype=np.float32) + rng.normal(0, 3, (size, size))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _ellipse(x, y, cx, cy, rx, ry):
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1


def _blob(x, y, cx, cy, r):
    return np.exp(-(((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r)))


def _draw_frontal(img, x, y, findings, rng) -> np.ndarray:
    # Patient's right lung is on the image's left (PA convention).
    lung_cx = {"right": 0.31, "left": 0.69}
    lungs = {side: _ellipse(x, y, cx, 0.47, 0.15, 0.31) for side, cx in lung_cx.items()}
    for mask in lungs.values():
        img[mask] = 0.12
    ribs = (np.sin((y + 0.08 * np.abs(x - 0.5)) * 55) > 0.85)
    for mask in lungs.values():
        img[mask & ribs] += 0.07
    img[(np.abs(x - 0.5) < 0.045) & (y > 0.12)] = 0.62  # spine / mediastinum
    scale = 1.45 if "cardiomegaly" in findings else 1.0
    heart = _ellipse(x, y, 0.55, 0.66, 0.12 * scale, 0.10 * scale ** 0.7)
    img[heart] = 0.62
    img[y > 0.8 + 0.03 * np.cos((x - 0.5) * 6)] = 0.55  # diaphragm and abdomen
    if "edema" in findings:
        haze = _blob(x, y, 0.4, 0.5, 0.09) + _blob(x, y, 0.6, 0.5, 0.09)
        img += 0.22 * haze * (lungs["left"] | lungs["right"])
    if "consolidation" in findings:
        where, _, zone = findings["consolidation"].partition("-")
        for side in _sides(where):
            outward = 0.05 if side == "left" else -0.05  # away from the heart
            cx = lung_cx[side] + outward + rng.uniform(-0.02, 0.02)
            cy = rng.uniform(0.3, 0.38) if zone == "upper" else rng.uniform(0.6, 0.68)
            img += 0.4 * _blob(x, y, cx, cy, 0.06) * lungs[side]
    if "nodule" in findings:
        where, zone, kind = findings["nodule"].split("-")
        for side in _sides(where):
            cy = rng.uniform(0.3, 0.4) if zone == "upper" else rng.uniform(0.55, 0.65)
            r = 0.055 if kind == "mass" else 0.028
            img[_ellipse(x, y, lung_cx[side] + rng.uniform(-0.05, 0.05), cy, r, r)] = 0.72
    if "effusion" in findings:
        for side in _sides(findings["effusion"]):
            level = rng.uniform(0.62, 0.68)
            meniscus = level - 0.05 * np.abs(x - lung_cx[side]) / 0.15
            img[lungs[side] & (y > meniscus)] = 0.58
    if "pneumothorax" in findings:
        for side in _sides(findings["pneumothorax"]):
            lateral_x = 0.17 if side == "right" else 0.83
            air = lungs[side] & _ellipse(x, y, lateral_x, 0.25, 0.13, 0.17)
            img[air] = 0.02
            edge = lungs[side] & ~air & _ellipse(x, y, lateral_x, 0.25, 0.145, 0.185)
            img[edge] = 0.3
    if "atelectasis" in findings:
        for side in _sides(findings["atelectasis"]):
            cx, cy = lung_cx[side] + rng.uniform(-0.03, 0.03), rng.uniform(0.62, 0.7)
            tilt = 0.15 * (x - cx) * (1 if side == "left" else -1)
            img[lungs[side] & (np.abs(y - cy - tilt) < 0.012) & (np.abs(x - cx) < 0.09)] += 0.38
    if "granuloma" in findings:
        where, zone = findings["granuloma"].split("-")
        for side in _sides(where):
            cy = rng.uniform(0.3, 0.4) if zone == "upper" else rng.uniform(0.55, 0.65)
            img[_ellipse(x, y, lung_cx[side] + rng.uniform(-0.06, 0.06), cy, 0.016, 0.016)] = 0.95
    return lungs["left"] | lungs["right"]


def _sides(side: str) -> list[str]:
    return ["left", "right"] if side == "bilateral" else [side]


def _draw_lateral(img, x, y, findings, rng) -> np.ndarray:
    lung = _ellipse(x, y, 0.52, 0.46, 0.27, 0.32)
    img[lung] = 0.14
    img[(np.abs(x - 0.8) < 0.05) & (y > 0.1)] = 0.62  # spine
    scale = 1.4 if "cardiomegaly" in findings else 1.0
    img[_ellipse(x, y, 0.38, 0.64, 0.12 * scale, 0.12 * scale ** 0.7)] = 0.6
    img[y > 0.8 + 0.04 * (x - 0.5)] = 0.55
    if "edema" in findings:
        img += 0.2 * _blob(x, y, 0.52, 0.5, 0.12) * lung
    if "consolidation" in findings:
        cy = 0.35 if findings["consolidation"].endswith("-upper") else 0.65
        img += 0.35 * _blob(x, y, rng.uniform(0.55, 0.65), cy, 0.06) * lung
    if "nodule" in findings:
        _, zone, kind = findings["nodule"].split("-")
        cy = 0.35 if zone == "upper" else 0.6
        r = 0.05 if kind == "mass" else 0.025
        img[_ellipse(x, y, rng.uniform(0.45, 0.6), cy, r, r)] = 0.7
    if "effusion" in findings:
        img[lung & (y > 0.66) & (x > 0.55)] = 0.56  # posterior costophrenic sulcus
    if "pneumothorax" in findings:
        img[lung & _ellipse(x, y, 0.55, 0.18, 0.15, 0.1)] = 0.03
    if "atelectasis" in findings:
        cy = rng.uniform(0.64, 0.7)
        img[lung & (np.abs(y - cy - 0.1 * (x - 0.5)) < 0.012) & (np.abs(x - 0.5) < 0.14)] += 0.34
    if "granuloma" in findings:
        cy = 0.35 if findings["granuloma"].endswith("-upper") else 0.6
        img[_ellipse(x, y, rng.uniform(0.4, 0.62), cy, 0.016, 0.016)] = 0.92
    return lung


# --------------------------------------------------------------------------- text

_HEART_NORMAL = ["The heart is normal in size.", "Heart size is normal.",
                 "The cardiomediastinal silhouette is within normal limits.",
                 "Normal heart size and mediastinal contours."]
_HEART_BIG = ["The heart is enlarged.", "Cardiomegaly is present.",
              "The cardiac silhouette is enlarged.", "There is moderate cardiomegaly."]
_EDEMA = ["There is diffuse interstitial pulmonary edema.",
          "Bilateral perihilar opacities consistent with pulmonary edema.",
          "Pulmonary vascular congestion with interstitial edema."]
_CONSOLIDATION = ["There is focal consolidation in the {side} lower lobe.",
                  "Airspace opacity in the {side} lung base consistent with consolidation.",
                  "Patchy {side} basilar consolidation."]
_NODULE = ["There is a {size} nodule in the {side} {zone} lung.",
           "A {size} nodular density projects over the {side} {zone} lung zone."]
_MASS = ["There is a {side} {zone} lung mass.", "A large mass is seen in the {side} {zone} lung."]
_EFFUSION = ["There is a small {side} pleural effusion.", "{Side} pleural effusion is present.",
             "Blunting of the {side} costophrenic angle consistent with pleural effusion."]
_EFFUSION_BOTH = ["There are bilateral pleural effusions.", "Small bilateral pleural effusions."]
_PNEUMOTHORAX = ["There is a {side} apical pneumothorax.", "A small {side} pneumothorax is present."]
_NEGATED = {"effusion": "pleural effusion", "pneumothorax": "pneumothorax",
            "consolidation": "focal consolidation", "edema": "pulmonary edema",
            "nodule": "suspicious pulmonary nodule"}
_BONES = ["The osseous structures are intact.", "No acute bony abnormality.",
          "XXXX are intact.", "Visualized XXXX of the chest are within normal limits."]
_IMPRESSION_NORMAL = ["No acute cardiopulmonary abnormality.", "No active disease.",
                      "Normal chest.", "No acute cardiopulmonary disease."]


def _negation_sentence(names: list[str], rng: np.random.Generator) -> str:
    terms = [_NEGATED[n] for n in names]
    listed = terms[0] if len(terms) == 1 else ", ".join(terms[:-1]) + " or " + terms[-1]
    pattern = str(rng.choice(["No {}.", "There is no {}.", "No evidence of {}."]))
    return pattern.format(listed)


def _write_report(study: PhantomStudy, rng: np.random.Generator) -> dict[str, str]:
    """Findings, impression, indication and comparison for a study."""
    f = study.findings
    pick = lambda options: str(rng.choice(options))  # noqa: E731
    sentences = [pick(_HEART_BIG if "cardiomegaly" in f else _HEART_NORMAL)]
    impression: list[str] = []
    if "cardiomegaly" in f:
        impression.append("Cardiomegaly.")
    if "edema" in f:
        sentences.append(pick(_EDEMA))
        impression.append("Pulmonary edema." if "cardiomegaly" not in f
                          else "Cardiomegaly with pulmonary edema, likely congestive heart failure.")
        if "cardiomegaly" in f:
            impression.remove("Cardiomegaly.")
    if "consolidation" in f:
        side = f["consolidation"]
        sentences.append(pick(_CONSOLIDATION).format(side=side))
        impression.append(f"{side.capitalize()} lower lobe consolidation, may represent pneumonia.")
    if "nodule" in f:
        side, zone, kind = f["nodule"].split("-")
        template = pick(_MASS if kind == "mass" else _NODULE)
        sentences.append(template.format(side=side, zone=zone, size=pick(["small", "1 cm", "8 mm"])))
        impression.append(f"{side.capitalize()} {zone} lung {kind}. Recommend CT for further evaluation.")
    if "effusion" in f:
        side = f["effusion"]
        if side == "bilateral":
            sentences.append(pick(_EFFUSION_BOTH))
            impression.append("Bilateral pleural effusions.")
        else:
            sentences.append(pick(_EFFUSION).format(side=side, Side=side.capitalize()))
            impression.append(f"{side.capitalize()} pleural effusion.")
    if "pneumothorax" in f:
        side = f["pneumothorax"]
        sentences.append(pick(_PNEUMOTHORAX).format(side=side))
        impression.append(f"{side.capitalize()} pneumothorax.")
    absent = [n for n in ("effusion", "pneumothorax", "consolidation", "edema", "nodule") if n not in f]
    if not f:
        sentences.append(pick(["The lungs are clear.", "Lungs are clear bilaterally."]))
    mentioned = [n for n in absent if n in ("effusion", "pneumothorax") or rng.random() < 0.5]
    if mentioned:
        rng.shuffle(mentioned)
        sentences.append(_negation_sentence(mentioned, rng))
    sentences.append(pick(_BONES))
    if not impression:
        impression_text = pick(_IMPRESSION_NORMAL)
    elif len(impression) > 1 and rng.random() < 0.6:
        impression_text = " ".join(f"{i}. {s}" for i, s in enumerate(impression, 1))
    else:
        impression_text = " ".join(impression)
    return {
        "FINDINGS": " ".join(sentences),
        "IMPRESSION": impression_text,
        "INDICATION": pick(["XXXX-year-old male with chest pain.", "Shortness of breath.",
                            "Cough and fever.", "XXXX-year-old female, preoperative exam.", ""]),
        "COMPARISON": pick(["None.", "XXXX, XXXX", "", "Chest radiograph XXXX."]),
    }


def mesh_terms(findings: dict[str, str]) -> list[str]:
    """MeSH major terms for the drawn findings, in Open-i's ``Term/qualifier`` form."""
    if not findings:
        return ["normal"]
    terms = []
    if "cardiomegaly" in findings:
        terms.append("Cardiomegaly")
    if "edema" in findings:
        terms.append("Pulmonary Edema")
    if "consolidation" in findings:
        terms.append(f"Consolidation/lung/base/{findings['consolidation']}")
    if "nodule" in findings:
        side, zone, kind = findings["nodule"].split("-")
        terms.append(f"{kind.capitalize()}/lung/{side}/{zone} lobe")
    if "effusion" in findings:
        terms.append(f"Pleural Effusion/{findings['effusion']}")
    if "pneumothorax" in findings:
        terms.append(f"Pneumothorax/{findings['pneumothorax']}")
    return terms


def _report_xml(study: PhantomStudy, text: dict[str, str]) -> str:
    """The report in Open-i's eCitation structure (the elements the reader uses)."""
    abstract = "\n".join(
        f'            <AbstractText Label="{label}">{escape(text[label])}</AbstractText>'
        if text[label] else f'            <AbstractText Label="{label}"/>'
        for label in ("COMPARISON", "INDICATION", "FINDINGS", "IMPRESSION"))
    mesh = "\n".join(f"      <major>{escape(t)}</major>" for t in mesh_terms(study.findings))
    images = "\n".join(
        f"   <parentImage id={quoteattr(image_id)}>\n"
        f"      <figureId>F{i}</figureId>\n"
        f"      <caption>Xray Chest PA and Lateral</caption>\n"
        f"      <panel type=\"single\"><url>/phantom/{image_id}.png</url></panel>\n"
        f"   </parentImage>"
        for i, image_id in enumerate(study.image_ids, 1))
    return f"""<?xml version="1.0" encoding="utf-8"?>
<eCitation>
   <meta type="rr"/>
   <uId id="{study.uid}"/>
   <pmcId id="{study.number}"/>
   <docSource>CXR</docSource>
   <IUXRId id="{study.number}"/>
   <licenseType>phantom (synthetic, generated by MedExGen)</licenseType>
   <title>MedExGen phantom chest X-ray collection</title>
   <MedlineCitation Owner="MedExGen" Status="synthetic">
      <Article PubModel="Electronic">
         <Abstract>
{abstract}
         </Abstract>
      </Article>
   </MedlineCitation>
   <MeSH>
{mesh}
   </MeSH>
{images}
</eCitation>
"""
