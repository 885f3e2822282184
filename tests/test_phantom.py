"""The phantom set: deterministic, Open-i-shaped, and its pixels match its reports."""

import hashlib
import json

import numpy as np
import pytest

from medexgen_lib.phantom import draw_radiograph, make_phantom_dataset, mesh_terms
from medexgen_lib.reports import read_reports


def _digest(folder):
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        make_phantom_dataset(8, seed, tmp_path / name, image_size=48)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_reports_state_drawn_findings_and_negate_absent_ones(phantom_dir):
    truth = {f"CXR{s['number']}": s["findings"] for s in
             json.loads((phantom_dir / "reports" / "phantom_findings.json").read_text())}
    table = read_reports(phantom_dir / "reports").set_index("uid")
    kinds = set()
    for uid, findings in truth.items():
        row = table.loc[uid]
        text = (row.findings + " " + row.impression).lower()
        assert row.mesh_major == mesh_terms(findings)
        if not findings:
            assert row.mesh_major == ["normal"]
        if "effusion" in findings:
            assert "effusion" in text and "no pleural effusion" not in text
            kinds.add("effusion-" + findings["effusion"])
        else:
            assert "effusion" not in text or "no" in text.split("effusion")[0].split(".")[-1]
        if "pneumothorax" in findings:
            assert findings["pneumothorax"] + " " in text
        if "cardiomegaly" in findings:
            assert "cardiomegaly" in text or "enlarged" in text
        kinds.update(findings)
    assert {"cardiomegaly", "effusion", "pneumothorax", "nodule", "consolidation", "edema"} <= kinds
    assert sum(not f for f in truth.values()) > 5  # normals
    assert sum(len(f) > 1 for f in truth.values()) > 3  # combinations


def test_some_reports_carry_anonymisation_tokens(phantom_dir):
    table = read_reports(phantom_dir / "reports")
    assert (table.findings.str.contains("XXXX") | table.indication.str.contains("XXXX")).any()


def _draw(findings, view="frontal", seed=0, size=128):
    return draw_radiograph(findings, view, size, np.random.default_rng(seed)).astype(float)


@pytest.mark.parametrize("seed", range(3))
def test_pixels_show_the_findings(seed):
    normal = _draw({}, seed=seed)
    # PA convention: the patient's left lung base is on the image's right.
    left_base = (slice(90, 100), slice(78, 100))
    right_base = (slice(90, 100), slice(28, 50))
    effusion_left = _draw({"effusion": "left"}, seed=seed)
    assert effusion_left[left_base].mean() > normal[left_base].mean() + 30
    assert abs(effusion_left[right_base].mean() - normal[right_base].mean()) < 10
    # Cardiomegaly: more bright pixels around the heart.
    heart_zone = (slice(65, 105), slice(40, 100))
    big = _draw({"cardiomegaly": ""}, seed=seed)
    assert (big[heart_zone] > 130).mean() > (normal[heart_zone] > 130).mean() + 0.1
    # Pneumothorax: the apex of that lung goes dark.
    apex_right = (slice(25, 40), slice(20, 35))
    ptx = _draw({"pneumothorax": "right"}, seed=seed)
    assert ptx[apex_right].mean() < normal[apex_right].mean() - 10



@pytest.mark.parametrize("seed", range(3))
def test_bilateral_sides_and_upper_consolidation_are_drawn(seed):
    # The real-text phantom draws what real reports state: findings in both lungs, and
    # consolidation in an upper zone (the phantom's own studies use one side, lower zone).
    normal = _draw({}, seed=seed)
    lower = {"right": (slice(78, 88), slice(28, 40)), "left": (slice(78, 88), slice(88, 100))}
    upper = {"right": (slice(40, 48), slice(28, 40)), "left": (slice(40, 48), slice(88, 100))}
    both = _draw({"consolidation": "bilateral"}, seed=seed)
    for side in ("left", "right"):
        assert both[lower[side]].mean() > normal[lower[side]].mean() + 30
    right_upper = _draw({"consolidation": "right-upper"}, seed=seed)
    gain = {zone: right_upper[box["right"]].mean() - normal[box["right"]].mean()
            for zone, box in (("upper", upper), ("lower", lower))}
    assert gain["upper"] > 30 and gain["upper"] > gain["lower"] + 30
    masses = _draw({"nodule": "bilateral-lower-mass"}, seed=seed)
    lungs = {"right": (slice(65, 88), slice(24, 56)), "left": (slice(65, 88), slice(72, 104))}
    for side in ("left", "right"):  # a mass is far brighter than lung (the heart differs less)
        assert ((masses - normal)[lungs[side]] > 80).sum() > 40
    apices = {"right": (slice(25, 40), slice(20, 35)), "left": (slice(25, 40), slice(93, 108))}
    ptx = _draw({"pneumothorax": "bilateral"}, seed=seed)
    for side in ("left", "right"):
        assert ptx[apices[side]].mean() < normal[apices[side]].mean() - 10


@pytest.mark.parametrize("seed", range(3))
def test_atelectasis_and_granuloma_are_drawn_on_their_side(seed):
    # Real-text findings: a thin bright band at the lung base, a small very dense dot.
    normal = _draw({}, seed=seed)
    halves = {"right": (slice(0, 128), slice(0, 64)), "left": (slice(0, 128), slice(64, 128))}
    band = _draw({"atelectasis": "left"}, seed=seed) - normal
    assert (band[halves["left"]] > 60).sum() > 15 and (band[halves["right"]] > 60).sum() == 0
    assert (band > 60).nonzero()[0].min() > 75  # at the base, not above it
    for under in ({"effusion": "left"}, {"consolidation": "left-lower"}):  # shows through fluid and opacity
        for view in ("frontal", "lateral"):
            through = _draw({**under, "atelectasis": "left"}, view, seed=seed) - _draw(under, view, seed=seed)
            assert (through > 60).sum() > 15, (under, view)
    dot = _draw({"granuloma": "right-upper"}, seed=seed)
    bright = dot - normal > 50
    assert 5 < bright[halves["right"]].sum() < 40 and bright[halves["left"]].sum() == 0  # small
    assert bright.nonzero()[0].max() < 60  # upper zone
    # Calcified: brighter than a nodule is drawn.
    assert dot.max() > _draw({"nodule": "right-upper-nodule"}, seed=seed).max() + 15
    for view in ("frontal", "lateral"):
        # Against the band alone (against a normal image the band by itself passed for the dot).
        gain = (_draw({"granuloma": "left-lower", "atelectasis": "left"}, view, seed=seed)
                - _draw({"atelectasis": "left"}, view, seed=seed))
        assert (gain > 60).sum() >= 3


def test_the_demo_phantom_is_pixel_for_pixel_what_it_was_before_the_real_text_findings(tmp_path):
    """The real-text findings (atelectasis, granuloma) are drawn only when asked for: the demo
    phantom's pixels are pinned to those of 762d88d, before they were added (decoded pixels,
    not PNG bytes, so another zlib cannot move them)."""
    from PIL import Image

    with_set = hashlib.sha256()
    make_phantom_dataset(24, seed=3, out_dir=tmp_path, image_size=48)
    images = sorted((tmp_path / "images").rglob("*.png"))
    assert len(images) == 48
    for path in images:
        with_set.update(path.name.encode() + np.asarray(Image.open(path)).tobytes())
    assert with_set.hexdigest() == "18423bc103057dbf953dee5439b99c8773e702bec53228cfed962e4681fcfd58"
    every = hashlib.sha256()  # each demo finding, both views
    for findings in [{}, {"cardiomegaly": ""}, {"effusion": "bilateral"}, {"pneumothorax": "left"},
                     {"nodule": "right-upper-mass"}, {"consolidation": "left-upper"}, {"edema": ""},
                     {"cardiomegaly": "", "effusion": "left", "pneumothorax": "right",
                      "nodule": "left-lower-nodule", "consolidation": "bilateral", "edema": ""}]:
        for view in ("frontal", "lateral"):
            every.update(draw_radiograph(findings, view, 64, np.random.default_rng(5)).tobytes())
    assert every.hexdigest() == "2e6e78e387cc065088946d4d8ffdbf4600fd42647eec028633e54c01e176870d"


def test_lateral_views_exist_and_bad_arguments_are_refused(phantom_dir, tmp_path):
    assert len(list((phantom_dir / "images").glob("*-2001.png"))) > 30
    with pytest.raises(ValueError, match="n_studies"):
        make_phantom_dataset(0, 0, tmp_path)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("size", (64, 128))  # 64: what the experiments draw
def test_atelectasis_band_and_granuloma_dot_are_drawn_on_either_side_and_in_both_views(seed, size):
    # Each finding alone against the normal image, so no other finding's pixels can pass for it:
    # the right side too (the committed IU sample's atelectasis studies are all left-sided),
    # bilateral, and the lateral view's dot.
    normal = {view: _draw({}, view, seed=seed, size=size) for view in ("frontal", "lateral")}
    half = size // 2
    halves = {"right": (slice(0, size), slice(0, half)), "left": (slice(0, size), slice(half, size))}
    other = {"left": "right", "right": "left"}
    band_px = 15 * size // 128  # about 18 columns at 128 px, 1 to 2 rows thick
    dot_px = 1 if size == 64 else 3  # radius 0.016: 2 to 5 pixels at 64 px, not all far above the heart
    for side in ("left", "right"):
        band = _draw({"atelectasis": side}, seed=seed, size=size) - normal["frontal"]
        assert (band[halves[side]] > 60).sum() > band_px, side
        assert (band[halves[other[side]]] > 60).sum() == 0, side
        assert (band > 60).nonzero()[0].min() > 0.58 * size, side  # at the base
    both = _draw({"atelectasis": "bilateral"}, seed=seed, size=size) - normal["frontal"]
    assert all((both[halves[side]] > 60).sum() > band_px for side in ("left", "right"))
    for where in ("left-lower", "right-lower", "left-upper", "right-upper"):
        side, zone = where.split("-")
        for view in ("frontal", "lateral"):
            dot = (_draw({"granuloma": where}, view, seed=seed, size=size) - normal[view]) > 60
            assert dot.sum() >= dot_px, (where, view)
            rows = dot.nonzero()[0]
            assert (rows.max() < 0.45 * size) if zone == "upper" else (rows.min() > 0.5 * size), (where, view)
            if view == "frontal":
                assert dot[halves[other[side]]].sum() == 0, where
        for view in ("frontal", "lateral"):  # with the band: the dot is still there
            gain = (_draw({"atelectasis": side, "granuloma": where}, view, seed=seed, size=size)
                    - _draw({"atelectasis": side}, view, seed=seed, size=size))
            assert ((gain[halves[side]] if view == "frontal" else gain) > 60).sum() >= dot_px, (where, view)
