import pytest

from medexgen_lib.config import ConfigError, load_config


def test_profiles_differ_in_data_source():
    assert load_config("demo").data.source == "phantom"
    assert load_config("full").data.source == "openi"


def test_overrides_are_coerced_from_strings():
    cfg = load_config("demo", {"data.n_phantom_studies": "12", "seed": 3})
    assert cfg.data.n_phantom_studies == 12 and cfg.seed == 3


@pytest.mark.reliability
@pytest.mark.parametrize("key", ["data.n_phantom_studys", "dta.source", "nonsense"])
def test_unknown_key_is_named(key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("demo", {key: 1})


@pytest.mark.reliability
def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="data.n_phantom_studies.*int"):
        load_config("demo", {"data.n_phantom_studies": "many"})


@pytest.mark.reliability
def test_invalid_source_and_profile():
    with pytest.raises(ConfigError, match="data.source"):
        load_config("demo", {"data.source": "internet"})
    with pytest.raises(ConfigError, match="unknown profile 'tiny'"):
        load_config("tiny")


@pytest.mark.reliability
@pytest.mark.parametrize("key, value, message", [
    ("train.epochs", 0, "at least 1"), ("train.lr_decoder", -1e-4, "at least 0"),
    ("eval.num_beams", 0, "between 1 and 64"), ("eval.num_beams", 65, "between 1 and 64"),
    ("model.dropout", 1.5, "between 0 and 1"),
    ("seed", -1, "between 0"), ("data.n_phantom_studies", "-3", "at least 1"),
])
def test_out_of_range_value_is_named(key, value, message):
    with pytest.raises(ConfigError, match=rf"{key.replace('.', '[.]')}.*{message}"):
        load_config("demo", {key: value})


@pytest.mark.reliability
def test_inconsistent_values_are_named():
    with pytest.raises(ConfigError, match="split.val_fraction .* must leave some training data"):
        load_config("demo", {"split.val_fraction": 0.5, "split.test_fraction": 0.5})
    with pytest.raises(ConfigError, match=r"model.n_embd \(30\) must be a multiple of model.n_head \(4\)"):
        load_config("demo", {"model.n_embd": 30})


def test_config_saved_as_json(tmp_path):
    import json
    path = load_config("demo").save(tmp_path / "config.json")
    assert json.loads(path.read_text())["data"]["source"] == "phantom"


@pytest.mark.reliability
@pytest.mark.parametrize("key, value", [
    ("train.lr_decoder", "nan"), ("train.lr_new", "inf"), ("train.lr_new", "1e400"),
    ("model.dropout", "nan"), ("split.val_fraction", "nan"), ("train.clip_grad_norm", "nan"),
    ("train.weight_decay", "inf"), ("guidance.loss_weight", float("nan")),
    ("train.label_smoothing", "nan"), ("train.warmup_ratio", "nan"),
    ("eval.length_penalty", "nan"), ("eval.length_penalty", "-inf"),
])
def test_nan_and_infinity_are_refused_in_every_float_setting(key, value):
    """NaN passed every range check (nan < low is false) and 1e400 parses to infinity."""
    with pytest.raises(ConfigError, match=rf"config key '{key.replace('.', '[.]')}' must be a finite "
                                          r"number, got (nan|-?inf)$"):
        load_config("demo", {key: value})


@pytest.mark.reliability
def test_every_float_setting_is_checked_for_nan():
    """The finite check is generic: no float field of any section escapes it."""
    import dataclasses

    cfg = load_config("demo")
    floats = [f"{section.name}.{fld.name}" for section in dataclasses.fields(cfg)
              if dataclasses.is_dataclass(getattr(cfg, section.name))
              for fld in dataclasses.fields(getattr(cfg, section.name))
              if isinstance(getattr(getattr(cfg, section.name), fld.name), float)]
    assert len(floats) >= 12
    for key in floats:
        with pytest.raises(ConfigError, match="finite"):
            load_config("demo", {key: "nan"})


@pytest.mark.reliability
@pytest.mark.parametrize("key, value", [
    ("text.max_length", 10**7), ("guidance.pool", 20000), ("data.phantom_image_size", 50000),
])
def test_sizes_that_would_exhaust_memory_are_refused(key, value):
    """phantom_image_size 50000 tried to allocate 37 GiB; guidance.pool 20000 builds a head of
    2 x 20000² x 2048 inputs; text.max_length sizes the decoder's positions."""
    with pytest.raises(ConfigError, match=rf"config key '{key.replace('.', '[.]')}' must be between"):
        load_config("demo", {key: value})


def test_the_mimic_profile_is_full_on_mimics_conventions():
    full, mimic = load_config("full"), load_config("mimic")
    assert mimic.data.source == "mimic" and mimic.text.target == "findings" and mimic.split.require_findings
    assert mimic.model == full.model and mimic.guidance == full.guidance and mimic.tokenizer == full.tokenizer
    assert mimic.split.annotation_file == ""  # the source's own (official) split, as R2Gen's
    assert (mimic.text.max_length, mimic.eval.max_new_tokens, mimic.eval.references) == (100, 100, "r2gen-mimic")


def test_each_profile_has_one_comment_line_pointing_to_its_rationale():
    """The rationale of the defaults lives in docs/RESULTS.md; a profile carries one comment line
    that links to its section there (an anchor that exists), and no other comment."""
    import ast
    import re
    from pathlib import Path

    from medexgen_lib import config

    root = Path(config.__file__).resolve().parent.parent
    source = Path(config.__file__).read_text()
    node = next(n for n in ast.parse(source).body
                if isinstance(n, ast.AnnAssign) and getattr(n.target, "id", "") == "PROFILES")
    comments = [line.strip() for line in source.splitlines()[node.lineno - 1:node.end_lineno]
                if line.strip().startswith("#")]
    headings = re.findall(r"^#+ (.+)$", (root / "docs" / "RESULTS.md").read_text(), re.MULTILINE)
    anchors = {re.sub(r"[^a-z0-9 -]", "", heading.lower()).replace(" ", "-") for heading in headings}
    linked = [re.search(r"docs/RESULTS\.md#([a-z0-9-]+)", comment) for comment in comments]
    assert len(comments) == len(config.PROFILES) and all(linked), comments
    assert {match.group(1) for match in linked} <= anchors
