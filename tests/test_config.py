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


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.size=64", "model.size"),
        ("fe.placement=middle", "fe.placement"),
        ("train.lr=0", "train.lr"),
        ("train.lr=-1e-3", "train.lr"),
        ("model.backbone=alexnet", "model.backbone"),
        ("preprocess.n4_shrink=0", "preprocess.n4_shrink"),
        ("preprocess.clip_percentiles=[50, 10]", "preprocess.clip_percentiles"),
        ("model.width=0", "model.width"),
        ("eval.iou=1.5", "eval.iou"),
        ("study.ablations=[placement, nope]", "study.ablations"),
        ("study.timing_backbones=['vgg16-256']", "study.timing_backbones"),
        ("study.secondary={model.size: 64}", "study.secondary"),
        ("study.secondary={model__size: 256}", "study.secondary"),
        ("train.device=tpu", "train.device"),
        ("model.heads=2", "model.heads"),
        ("model.heads=-1", "model.heads"),
        ("train.val_subset=-5", "train.val_subset"),
        ("holdout.patients=-1", "holdout.patients"),
        ("holdout.seed=0", "holdout.seed"),  # = synth.seed: the hold-out patients would be the study's
        ("holdout.cohort=3", "holdout.cohort"),
    ],
)
def test_bad_value_fails_at_load_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        config.load("smoke", [override])
    assert "\n" not in str(err.value)


def test_sections_built_in_code_are_checked_like_files():
    assert config.check(config.ModelConfig(size=128, width=0.125), "model").size == 128
    with pytest.raises(ConfigError, match=r"model\.size"):
        config.check(config.ModelConfig(size=96), "model")
    with pytest.raises(ConfigError, match=r"fe\.variant"):
        config.check(config.FEConfig(variant="nope"), "fe")


def test_one_override_syntax():
    cfg = config.load("smoke")
    c = config.with_overrides(cfg, {"model.size": 256, "fe.enabled": True, "study.seeds": [3]})
    assert (c.model.size, c.fe.enabled, c.study.seeds) == (256, True, (3,))
    assert c.to_dict() == config.load("smoke", ["model.size=256", "fe.enabled=true", "study.seeds=[3]"]).to_dict()
    assert cfg.model.size == 128  # a copy
    with pytest.raises(ConfigError, match="unknown key 'model.sise'"):
        config.with_overrides(cfg, {"model.sise": 256})
    d = config.load("default")
    assert d.study.secondary == {"model.size": 256, "model.train_crop": 0}


def test_choices_have_one_home():
    from typing import get_args

    from cmbfe import data, fe, models
    from cmbfe.study import experiments

    assert tuple(models.BACKBONES) == get_args(config.Backbone)
    assert fe.SCHEDULES == get_args(config.FESchedule) and fe.VARIANTS == get_args(config.FEVariant)
    assert data.INPUTS == get_args(config.InputKind)
    assert tuple(experiments.ABLATIONS) == get_args(config.Ablation)


def test_paths_have_one_home(tmp_path):
    cfg = config.load("smoke", [f"data_dir={tmp_path}/d-{{profile}}"])
    assert cfg.data_path() == tmp_path / "d-smoke"
    assert (cfg.raw_path(), cfg.pre_path()) == (tmp_path / "d-smoke" / "raw", tmp_path / "d-smoke" / "pre")
    assert cfg.runs_path() == config.REPO_ROOT / "runs" / "smoke"
    assert cfg.results_path() == config.REPO_ROOT / "results" / "smoke"
    assert cfg.figures_path() == config.REPO_ROOT / "figures" / "smoke"
    assert cfg.holdout_path() == tmp_path / "d-smoke" / "holdout"
    assert config.load("default").results_path() == config.REPO_ROOT / "results"


def test_issue17_keys_default_to_what_the_code_did_before():
    cfg = config.Config()
    assert (cfg.model.heads, cfg.train.val_subset) == (0, 0)
    assert cfg.holdout.patients >= 17 and cfg.holdout.seed != cfg.synth.seed
    c = config.load("smoke", ["model.heads=3", "train.val_subset=40", "holdout.patients=2", "holdout.seed=5"])
    assert (c.model.heads, c.train.val_subset, c.holdout.patients, c.holdout.seed) == (3, 40, 2, 5)
