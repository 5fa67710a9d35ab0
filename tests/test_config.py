from pathlib import Path

import pytest
import yaml

from dreamer4.config import Config, ConfigError, load_config, save_config

REPO = Path(__file__).parent.parent


@pytest.mark.parametrize("preset", ["tiny", "classic", "full"])
def test_presets_load(preset):
    cfg = load_config(REPO / "configs" / f"{preset}.yaml")
    assert isinstance(cfg, Config)
    assert cfg.env.name == ("full" if preset == "full" else "classic")


def test_dotted_overrides_are_typed():
    cfg = load_config(REPO / "configs" / "tiny.yaml",
                      ["collect.num_envs=3", "collect.labeled_fraction=0.25", "loader.shuffle=false", "seed=9"])
    assert cfg.collect.num_envs == 3 and cfg.collect.labeled_fraction == 0.25
    assert cfg.loader.shuffle is False and cfg.seed == 9
    # ints are accepted where floats are expected
    assert load_config(None, ["collect.labeled_fraction=1"]).collect.labeled_fraction == 1.0


def test_unknown_key_names_valid_choices():
    with pytest.raises(ConfigError, match=r"unknown config key 'collect.num_env'.*num_envs"):
        load_config(None, ["collect.num_env=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'colect.num_envs'.*collect"):
        load_config(None, ["colect.num_envs=3"])


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("collect:\n  num_envs: 2\n  bogus: 1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'collect.bogus'"):
        load_config(p)


def test_wrong_types_and_choices():
    with pytest.raises(ConfigError, match=r"'collect.num_envs'.*expected an integer"):
        load_config(None, ["collect.num_envs=abc"])
    with pytest.raises(ConfigError, match=r"'collect.num_envs'.*expected an integer"):
        load_config(None, ["collect.num_envs=2.5"])
    with pytest.raises(ConfigError, match=r"'env.name'.*'classic', 'full'"):
        load_config(None, ["env.name=minecraft"])
    with pytest.raises(ConfigError, match=r"'loader.shuffle'.*true or false"):
        load_config(None, ["loader.shuffle=3"])
    with pytest.raises(ConfigError, match=r"'collect.labeled_fraction' must be in \[0, 1\]"):
        load_config(None, ["collect.labeled_fraction=1.5"])
    with pytest.raises(ConfigError, match=r"'collect' is a section"):
        load_config(None, ["collect=3"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such/file.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["collect.num_envs=5"])
    path = save_config(cfg, tmp_path)
    assert load_config(path) == cfg
    assert yaml.safe_load(path.read_text())["collect"]["num_envs"] == 5
