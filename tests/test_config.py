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


def test_config_saved_as_json(tmp_path):
    import json
    path = load_config("demo").save(tmp_path / "config.json")
    assert json.loads(path.read_text())["data"]["source"] == "phantom"
