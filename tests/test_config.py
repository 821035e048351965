"""Profiles load, validate, and reject unknown keys / wrong types with the key named."""

import pytest
import yaml

from cmbfe import config
from cmbfe.config import ConfigError


@pytest.mark.parametrize("profile", config.PROFILES)
def test_profiles_load_and_share_one_schema(profile):
    cfg = config.load(profile)
    assert cfg.profile == profile
    raw = yaml.safe_load((config.PARAMS_DIR / f"{profile}.yaml").read_text())
    assert set(raw) <= set(cfg.to_dict())


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  iteratons: 5\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*unknown key 'train.iteratons'"):
        config.load(p)


def test_unknown_section_is_named():
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        config.from_dict({"trian": {}})


@pytest.mark.parametrize(
    "data, msg",
    [
        ({"train": {"iterations": "many"}}, "train.iterations: expected an integer"),
        ({"train": {"lr": True}}, "train.lr: expected a number"),
        ({"fe": {"enabled": "yes"}}, "fe.enabled: expected true/false"),
        ({"augment": {"scale": [0.8]}}, "augment.scale: expected 2 values"),
        ({"model": {"backbone": "alexnet"}}, "model.backbone"),
        ({"fe": {"placement": "middle"}}, "fe.placement"),
        ({"preprocess": {"split_ratios": {"train": 1, "test": 1}}}, "split_ratios"),
    ],
)
def test_bad_values(data, msg):
    with pytest.raises(ConfigError, match=msg):
        config.from_dict(data)


def test_overrides_parse_yaml_scalars():
    cfg = config.load("smoke", ["train.iterations=7", "fe.enabled=true", "model.priors=paper"])
    assert cfg.train.iterations == 7 and cfg.fe.enabled is True and cfg.model.priors == "paper"
    with pytest.raises(ConfigError, match="unknown key 'train.nope'"):
        config.load("smoke", ["train.nope=1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        config.load("smoke", ["train.iterations"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "none.yaml")
    p = tmp_path / "broken.yaml"
    p.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(p)


def test_yaml_is_safe_loaded(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("train: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError):
        config.load(p)


def test_hash_is_stable_and_sensitive(tmp_path):
    a, b = config.load("smoke"), config.load("smoke")
    assert a.hash() == b.hash()
    assert config.load("smoke", ["train.seed=1"]).hash() != a.hash()
    config.dump(a, tmp_path / "c.yaml")
    assert config.load(tmp_path / "c.yaml").to_dict() == a.to_dict()


def test_override_accepts_exponent_floats():
    assert config.load("smoke", ["train.lr=1e-3"]).train.lr == 1e-3
    assert config.load("smoke", ["model.backbone=resnet34"]).model.backbone == "resnet34"
