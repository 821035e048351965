"""One typed configuration for every stage, loaded from ``params/*.yaml`` and validated.

A profile file is a mapping of sections (``synth``, ``holdout``, ``preprocess``, ``model``, ``fe``,
``augment``, ``train``, ``eval``, ``study``, ``notebooks``). Every key is checked against the dataclasses
below: an unknown key is an error that names it (``train.iteratons``), a wrong type likewise; a choice is a
``Literal`` type (the one list of its allowed values; the type checks are :mod:`cmbfe.coerce`), and every
other value check is in :func:`validate`, so a bad value fails at load with one :class:`ConfigError` line
naming the key. Files are read with ``yaml.safe_load``. Overrides use one syntax everywhere, dotted keys:
``--set train.iterations=200`` (values parsed as YAML scalars) and ``with_overrides(cfg, {"train.iterations":
200})`` (Python values), as do ``study.secondary`` and the study's grids.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cmbfe.coerce import build, set_dotted, set_override
from cmbfe.errors import ConfigError
from cmbfe.utils import atomic_write_text

REPO_ROOT = Path(__file__).resolve().parent.parent
PARAMS_DIR = REPO_ROOT / "params"
PROFILES = ("smoke", "default", "extended", "paper", "fe-readings")
COMMITTED_PROFILE = "default"  # its tables and figures are committed: results/ and figures/ themselves

# The allowed values of every choice, in one place (``typing.get_args(Backbone)`` lists them).
Backbone = Literal["vgg16", "resnet34", "mobilenet_v3"]
Priors = Literal["paper", "cmb"]
InputKind = Literal["gray3", "2.5d"]
ImageFormat = Literal["png", "jpg"]
LabelModel = Literal["annotator", "geometric"]
FESchedule = Literal["constant", "cosine"]
FEPlacement = Literal["post_l2norm", "pre_l2norm"]
FEVariant = Literal["fe", "ae", "l2n", "mean"]
LRSchedule = Literal["step", "cosine"]
Device = Literal["auto", "cpu", "cuda"]
MatchRule = Literal["iou", "centre"]
FEArm = Literal["no FE", "R1", "R2 constant", "R2 cosine", "R3", "R4 cosine", "AE cosine", "R1 sham",
                "mask loss"]
Ablation = Literal["placement", "schedule", "variant", "priors", "input"]


@dataclass
class SynthConfig:
    """Synthetic SWI cohort. Lengths in mm; ``matrix`` is the in-plane pixel count (FOV kept)."""

    patients: int = 58
    seed: int = 0
    matrix: int = 512
    fov_mm: float = 240.0
    slice_mm: float = 2.0
    z_range_mm: tuple[float, float] = (-50.0, 76.0)  # MNI z covered by the slab (cerebellum to vertex)
    field_t: float = 3.0
    te_ms: float = 20.0
    # mean CMBs per CMB-bearing patient, before the cap (58 patients -> ~1300 per-slice boxes)
    cmb_mean: float = 11.0
    p_no_cmb: float = 0.1  # fraction of patients without CMBs
    cmb_dispersion: float = 0.3  # negative-binomial shape of the per-patient count (small = skewed)
    cmb_max: int = 150  # cap on CMBs per patient
    cmb_radius_mm: tuple[float, float] = (0.6, 2.4)  # true (haemosiderin) radius, log-uniform
    cmb_dchi_ppm: tuple[float, float] = (0.5, 1.6)
    p_lobar: float = 0.73  # lobar (cortex/GM-WM junction + subcortical WM) vs deep/infratentorial
    veins: int = 500  # random cortical (60%) and medullary (40%) veins, plus the fixed sinuses
    calcifications: tuple[int, int] = (1, 4)
    air: bool = True
    snr: tuple[float, float] = (20.0, 40.0)
    bias_strength: tuple[float, float] = (0.3, 0.6)
    warp_mm: float = 3.0  # amplitude of the random smooth deformation of the template
    workers: int = 2


@dataclass
class HoldoutConfig:
    """An untouched second test cohort: the ``synth`` generator and ``preprocess`` labels with its own seed,
    patients ``HOLD-0001`` ... in one split ``holdout`` built as ``test`` is (:mod:`cmbfe.holdout`)."""

    patients: int = 17  # 0: none in this profile
    seed: int = 1000  # != synth.seed (patient i of seed s is the same patient in both cohorts)


@dataclass
class PreprocessConfig:
    """N4 bias correction, intensity normalisation and the patient-level split."""

    n4_iterations: tuple[int, ...] = (20, 20, 10)
    n4_shrink: int = 4  # ANTsPy default; 2 costs ~9x the time (61 s vs 7 s per 256x256x63 volume, 2 cores)
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    image_format: ImageFormat = "png"  # png (lossless) or jpg (as the paper)
    # annotator: boxes where the rendered focus is visible, enclosing it, sides >= 2 mm (cmbfe.labels);
    # geometric: the sphere's cross-section on every slice it crosses
    labels: LabelModel = "annotator"
    split_ratios: dict[str, float] = field(default_factory=lambda: {"train": 33, "val": 8, "test": 17})
    split_seed: int = 0
    test_negatives_ratio: float = 1.0  # mimic-only slices added to test per CMB slice (paper: 1.0)
    val_negatives_ratio: float = 1.0
    brain_min_fraction: float = 0.05  # a slice is a "brain slice" when the head mask covers this much of it
    workers: int = 2


@dataclass
class ModelConfig:
    """Detector: SSD at ``size`` px input on a named backbone."""

    backbone: Backbone = "vgg16"
    size: int = 300  # network input side for a whole slice (px); priors are fractions of it
    # > 0: train on random windows of this many network px (a window of train_crop * W / size slice px,
    # resized like whole slices); the tail is built for the window, inference still runs on whole slices
    train_crop: int = 0
    priors: Priors = "paper"  # paper (standard SSD scales) | cmb (sized to 2-10 mm CMBs)
    input: InputKind = "gray3"  # gray3 (slice replicated) | 2.5d (slices z-1, z, z+1)
    width: float = 1.0  # channel-width multiplier (<1 for CPU profiles)
    pretrained: bool = False  # ImageNet weights from the local torchvision cache only
    # VGG-16 with BatchNorm after each conv (from scratch); ResNet/MobileNet always have BN
    batch_norm: bool = False
    score_thresh: float = 0.01
    # inference: drop detections whose longer side exceeds this many mm (0: keep all). CMBs are 2-10 mm; the
    # deepest maps of a tail trained on windows can emit slice-wide boxes on whole slices (docs/training.md)
    max_box_mm: float = 0.0
    # > 0: only the first (finest) ``heads`` source maps, deeper ones not built (0: all). SSD-512 on 128-px
    # windows, 'cmb' priors: heads 3 = maps 64/32/16 px, priors 3.75/7.5/15/15 mm (fit 2-10 mm CMBs)
    heads: int = 0
    detections_per_img: int = 100
    nms_thresh: float = 0.45


@dataclass
class FEConfig:
    """Feature enhancement at conv4_3 (Li et al. 2021), training only."""

    enabled: bool = False
    beta: float = 1.5
    alpha: float = 1.0
    schedule: FESchedule = "constant"  # constant (paper) | cosine (decay 1 -> 0 over training)
    # pre_l2norm (R1, paper-literal: inline on the trunk before the conv4_3 L2Norm) | post_l2norm (R2: the
    # head sees FE, a train-only magnitude cue that leaks the label; an ablation arm). README, "Feature
    # enhancement". The one check of this choice is its type (cmbfe.fe and cmbfe.backbones trust it).
    placement: FEPlacement = "pre_l2norm"
    # fe: X + a*M*X (paper) | l2n: X + a*M*L2Norm_c(X) (R3, the intro's sentence) | mean: X + a*M*mean_c(X)
    # (R4, graded mask) | ae: X + a*[M>0]*mean_c(X) (Assisted Excitation; as published with schedule: cosine)
    variant: FEVariant = "fe"
    sham: bool = False  # the sham arm: each box's mask moved off every GT box (cmbfe.fe.sham_shifts)
    mask_loss_weight: float = 0.0  # > 0: the mask arm's BCE head on the first source (cmbfe.fe); 0: none


@dataclass
class AugmentConfig:
    """Online box-aware augmentation (paper section 2.2) applied to training batches."""

    enabled: bool = True
    hflip: float = 0.5
    vflip: float = 0.5
    intensity: tuple[float, float] = (1.2, 1.5)
    p_intensity: float = 0.5
    blur_sigma: tuple[float, float] = (0.0, 3.0)
    p_blur: float = 0.5
    translate_px: float = 15.0
    rotate_deg: float = 30.0
    scale: tuple[float, float] = (0.8, 0.95)
    p_affine: float = 0.5


@dataclass
class TrainConfig:
    """Adam with the paper's step schedule (or a cosine one) scaled to ``iterations``; optional warm-up,
    gradient clipping and weight averaging (:mod:`cmbfe.train`)."""

    iterations: int = 120000
    batch_size: int = 4
    lr: float = 1e-3
    lr_steps: tuple[float, ...] = (2 / 3, 5 / 6)  # paper: 80k and 100k of 120k
    lr_gamma: float = 0.1
    # step (the paper's: x lr_gamma at each lr_steps fraction) | cosine (to 0 at the last iteration)
    schedule: LRSchedule = "step"
    warmup: int = 0  # iterations of linear LR warm-up from lr/100 (0: none)
    # cosine: the LR falls from lr to lr * lr_min by the fraction cosine_end of training and stays there
    # (cosine_end 0.8, lr_min 0.01: the paper's last 1/6 at 1 % of the LR, with a smooth decay before it)
    cosine_end: float = 1.0
    lr_min: float = 0.0
    grad_clip: float = 0.0  # max global gradient norm (0: no clipping)
    ema: float = 0.0  # decay of an exponential moving average of the weights, validated and saved (0: off)
    weight_decay: float = 0.0
    seed: int = 0
    negatives_ratio: float = 0.25  # CMB-free slices per CMB slice in the training pool
    workers: int = 0
    cache: int = -1  # decoded PNG slices kept in RAM per loader process (-1: all, 0: none)
    amp: bool = True  # CUDA only
    channels_last: bool = True  # CUDA only
    # CPU training in channels_last memory format (1.06-1.11x faster on the project's 2-core CPU,
    # ../shared/cpu-training-notes.md); float results differ from the default contiguous format
    channels_last_cpu: bool = False
    checkpoint_every: int = 1000
    log_every: int = 50
    val_every: int = 0  # 0: only at the end; -1: never
    # > 0: in-loop validations on a fixed subset of this many val slices (data.val_subset), the final one on
    val_subset: int = 0  # the whole split (+ the subset; val.csv column subset 1/0); weights do not change
    device: Device = "auto"
    tensorboard: bool = False


@dataclass
class EvalConfig:
    """Matching rule and statistics (see ``cmbfe.metrics``)."""

    match: MatchRule = "iou"
    iou: float = 0.5
    radius_mm: float = 2.5
    bootstrap: int = 1000
    ci: float = 0.95
    seed: int = 0


@dataclass
class StudyConfig:
    """What the notebooks run: seeds, folds, backbones, ablations."""

    seeds: tuple[int, ...] = (0, 1, 2)
    sizes: tuple[int, ...] = (300, 512)
    folds: int = 10  # 0: no cross-validation in this profile (profile `extended` runs it)
    cv_iterations: int = 0  # 0: same as train.iterations
    timing_backbones: tuple[str, ...] = ("vgg16:512", "mobilenet_v3:320", "resnet34:300")
    timing_batch: int = 8
    timing_repeats: int = 5
    timing_iterations: int = 0  # 0: same as train.iterations (Table 3 precision columns)
    # false: Table 3 times the steps only, trains no model (profile `extended` does)
    timing_precision: bool = True
    ablations: tuple[Ablation, ...] = ("placement", "schedule", "variant", "priors", "input")
    ablation_iterations: int = 0  # 0: same as train.iterations
    ablation_seeds: int = 1  # how many of ``seeds`` each ablation setting is trained with
    # FE readings compared with SSD (issue #10; experiments.FE_ARMS), each trained with every seed of
    # ``seeds`` on the main recipe; () runs none (the default profile: profile `extended` runs them)
    fe_arms: tuple[FEArm, ...] = ()
    fe_arm_seeds: dict[str, int] = field(default_factory=dict)  # arm -> first n of seeds (default: all)
    reduced: str = ""  # what this profile reduces relative to the paper (printed in captions)
    ship: bool = True  # 05 exports the best run (+ its second stage) to the profile's model folder
    # overrides (``section.key: value``) for the cross-validation, Table 3 and ablation runs, e.g. a cheaper
    # resolution on CPU; listed in ``reduced``
    secondary: dict[str, Any] = field(default_factory=dict)
    jobs: int = 1  # concurrent executions in `cmbfe reproduce` (03_train configurations; 06-08)


@dataclass
class Config:
    """The whole run configuration. ``notebooks`` maps a notebook name to flat papermill parameters."""

    profile: str = "custom"
    data_dir: str = "data/{profile}"
    synth: SynthConfig = field(default_factory=SynthConfig)
    holdout: HoldoutConfig = field(default_factory=HoldoutConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    fe: FEConfig = field(default_factory=FEConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    notebooks: dict[str, Any] = field(default_factory=dict)  # name -> {param: value} or a list of them

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON/YAML-serialisable dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def hash(self) -> str:
        """Short stable hash of the configuration (sha256 of sorted JSON, 12 hex digits)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    # Where a profile's files live, the one home of these paths (nothing here creates a folder).
    def data_path(self) -> Path:
        """Absolute data directory (``data_dir`` with ``{profile}`` filled, relative to the repo root)."""
        p = Path(self.data_dir.format(profile=self.profile))
        return p if p.is_absolute() else REPO_ROOT / p

    def raw_path(self) -> Path:
        """The synthetic DICOM cohort: ``data_path()/raw``."""
        return self.data_path() / "raw"

    def pre_path(self) -> Path:
        """The preprocessed slices and COCO files: ``data_path()/pre``."""
        return self.data_path() / "pre"

    def holdout_path(self) -> Path:
        """The hold-out cohort (``holdout`` section): ``data_path()/holdout/{raw,pre}``."""
        return self.data_path() / "holdout"

    def runs_path(self) -> Path:
        """Trained runs of this profile: ``runs/<profile>/`` under the repo root."""
        return REPO_ROOT / "runs" / self.profile

    def results_path(self) -> Path:
        """Tables: ``results/`` for the committed (default) profile, ``results/<profile>/`` otherwise."""
        return REPO_ROOT / "results" / ("" if self.profile == COMMITTED_PROFILE else self.profile)

    def figures_path(self) -> Path:
        """Figures: ``figures/`` for the committed (default) profile, ``figures/<profile>/`` otherwise."""
        return REPO_ROOT / "figures" / ("" if self.profile == COMMITTED_PROFILE else self.profile)


Rule = tuple[bool, str, str, Any]  # (ok, key, expected, value)


def _data_rules(sy: SynthConfig, pp: PreprocessConfig, ho: HoldoutConfig) -> list[Rule]:
    """Value checks of the ``synth``, ``preprocess`` and ``holdout`` sections."""
    lo, hi = pp.clip_percentiles
    ratios = list(pp.split_ratios.values())
    return [
        (sy.patients >= 1, "synth.patients", ">= 1", sy.patients),
        (sy.matrix >= 16, "synth.matrix", ">= 16", sy.matrix),
        (sy.fov_mm > 0 and sy.slice_mm > 0, "synth.fov_mm/slice_mm", "> 0", (sy.fov_mm, sy.slice_mm)),
        (set(pp.split_ratios) == {"train", "val", "test"}, "preprocess.split_ratios",
         "exactly train, val, test", pp.split_ratios),
        (bool(ratios) and min(ratios) >= 0 and sum(ratios) > 0, "preprocess.split_ratios",
         ">= 0 with a positive sum", pp.split_ratios),
        (bool(pp.n4_iterations) and min(pp.n4_iterations) >= 0, "preprocess.n4_iterations",
         ">= 1 level, each >= 0", pp.n4_iterations),
        (pp.n4_shrink >= 1, "preprocess.n4_shrink", ">= 1", pp.n4_shrink),
        (0 <= lo < hi <= 100, "preprocess.clip_percentiles", "0 <= low < high <= 100", pp.clip_percentiles),
        (min(pp.test_negatives_ratio, pp.val_negatives_ratio) >= 0, "preprocess.*_negatives_ratio", ">= 0",
         (pp.val_negatives_ratio, pp.test_negatives_ratio)),
        (0 <= pp.brain_min_fraction <= 1, "preprocess.brain_min_fraction", "[0, 1]", pp.brain_min_fraction),
        (ho.patients >= 0, "holdout.patients", ">= 0 (0: no hold-out cohort)", ho.patients),
        (ho.seed != sy.seed, "holdout.seed", f"!= synth.seed={sy.seed} (else: its patients)", ho.seed),
    ]


def _model_rules(m: ModelConfig, fe: FEConfig, au: AugmentConfig) -> list[Rule]:
    """Value checks of the ``model``, ``fe`` and ``augment`` sections."""
    return [
        (m.size >= 128, "model.size", ">= 128 (multiples of 32, or 300)", m.size),
        (m.train_crop == 0 or 128 <= m.train_crop < m.size, "model.train_crop",
         f"0 or in [128, model.size={m.size})", m.train_crop),
        (m.width > 0 and math.isfinite(m.width), "model.width", "> 0", m.width),
        (not m.pretrained or m.width == 1.0, "model.width", "1.0 with model.pretrained=true", m.width),
        (not (m.pretrained and m.batch_norm and m.backbone == "vgg16"), "model.batch_norm",
         "false with model.pretrained=true (VGG-16 ImageNet features are plain)", m.batch_norm),
        (0 <= m.score_thresh <= 1, "model.score_thresh", "in [0, 1]", m.score_thresh),
        (0 < m.nms_thresh <= 1, "model.nms_thresh", "in (0, 1]", m.nms_thresh),
        (m.detections_per_img >= 1, "model.detections_per_img", ">= 1", m.detections_per_img),
        (m.max_box_mm >= 0, "model.max_box_mm", ">= 0 (0: off)", m.max_box_mm),
        (m.heads == 0 or m.heads >= 3, "model.heads", "0 (all maps) or >= 3 (priors need 3)", m.heads),
        (fe.alpha >= 0, "fe.alpha", ">= 0", fe.alpha),
        (fe.beta > 0, "fe.beta", "> 0", fe.beta),
        (fe.mask_loss_weight >= 0 and math.isfinite(fe.mask_loss_weight), "fe.mask_loss_weight",
         ">= 0 (0: no mask head)", fe.mask_loss_weight),
        (not fe.sham or fe.enabled, "fe.sham", "false unless fe.enabled=true", fe.sham),
        (all(0 <= p <= 1 for p in (au.hflip, au.vflip, au.p_intensity, au.p_blur, au.p_affine)),
         "augment.hflip/vflip/p_*", "probabilities in [0, 1]", (au.hflip, au.vflip, au.p_intensity, au.p_blur,
                                                               au.p_affine)),
        (0 < au.intensity[0] <= au.intensity[1], "augment.intensity", "0 < low <= high", au.intensity),
        (0 <= au.blur_sigma[0] <= au.blur_sigma[1], "augment.blur_sigma", "0 <= low <= high", au.blur_sigma),
        (0 < au.scale[0] <= au.scale[1], "augment.scale", "0 < low <= high", au.scale),
        (au.translate_px >= 0 and au.rotate_deg >= 0, "augment.translate_px/rotate_deg", ">= 0",
         (au.translate_px, au.rotate_deg)),
    ]


def _train_rules(tr: TrainConfig, ev: EvalConfig) -> list[Rule]:
    """Value checks of the ``train`` and ``eval`` sections."""
    return [
        (tr.iterations >= 1, "train.iterations", ">= 1", tr.iterations),
        (tr.batch_size >= 1, "train.batch_size", ">= 1", tr.batch_size),
        (tr.lr > 0 and math.isfinite(tr.lr), "train.lr", "> 0", tr.lr),
        (tr.lr_gamma > 0, "train.lr_gamma", "> 0", tr.lr_gamma),
        (all(0 < f <= 1 for f in tr.lr_steps), "train.lr_steps", "fractions in (0, 1]", tr.lr_steps),
        (tr.warmup >= 0, "train.warmup", ">= 0", tr.warmup),
        (0 < tr.cosine_end <= 1, "train.cosine_end", "in (0, 1]", tr.cosine_end),
        (0 <= tr.lr_min < 1, "train.lr_min", "in [0, 1)", tr.lr_min),
        (tr.grad_clip >= 0, "train.grad_clip", ">= 0", tr.grad_clip),
        (0 <= tr.ema < 1, "train.ema", "in [0, 1)", tr.ema),
        (tr.weight_decay >= 0, "train.weight_decay", ">= 0", tr.weight_decay),
        (tr.negatives_ratio >= 0, "train.negatives_ratio", ">= 0", tr.negatives_ratio),
        (tr.workers >= 0, "train.workers", ">= 0", tr.workers),
        (tr.cache >= -1, "train.cache", ">= -1", tr.cache),
        (tr.checkpoint_every >= 0, "train.checkpoint_every", ">= 0", tr.checkpoint_every),
        (tr.log_every >= 0, "train.log_every", ">= 0", tr.log_every),
        (tr.val_every >= -1, "train.val_every", ">= -1", tr.val_every),
        (tr.val_subset >= 0, "train.val_subset", ">= 0 (0: the whole val split)", tr.val_subset),
        (0 < ev.iou <= 1, "eval.iou", "in (0, 1]", ev.iou),
        (ev.radius_mm > 0, "eval.radius_mm", "> 0", ev.radius_mm),
        (ev.bootstrap >= 0, "eval.bootstrap", ">= 0", ev.bootstrap),
        (0 < ev.ci < 1, "eval.ci", "in (0, 1)", ev.ci),
    ]


def _study_rules(st: StudyConfig, notebooks: dict[str, Any]) -> list[Rule]:
    """Value checks of the ``study`` and ``notebooks`` sections."""
    rules: list[Rule] = [
        (len(st.seeds) >= 1, "study.seeds", "at least one seed", st.seeds),
        (all(s >= 128 for s in st.sizes), "study.sizes", "each >= 128", st.sizes),
        (st.folds == 0 or st.folds >= 2, "study.folds", "0 (none) or >= 2", st.folds),
        (st.jobs >= 1, "study.jobs", ">= 1", st.jobs),
        (st.ablation_seeds >= 1, "study.ablation_seeds", ">= 1", st.ablation_seeds),
        (all(a in typing.get_args(FEArm) and isinstance(n, int) and 1 <= n <= len(st.seeds)
             for a, n in st.fe_arm_seeds.items()), "study.fe_arm_seeds",
         f"arm: n with arms of {', '.join(typing.get_args(FEArm))} and 1 <= n <= len(study.seeds)",
         st.fe_arm_seeds),
        (min(st.timing_batch, st.timing_repeats) >= 1, "study.timing_batch/timing_repeats", ">= 1",
         (st.timing_batch, st.timing_repeats)),
        (min(st.cv_iterations, st.timing_iterations, st.ablation_iterations) >= 0, "study.*_iterations",
         ">= 0 (0: train.iterations)", (st.cv_iterations, st.timing_iterations, st.ablation_iterations)),
    ]
    for spec in st.timing_backbones:
        name, _, size = spec.partition(":")
        ok = name in typing.get_args(Backbone) and size.isdigit() and int(size) >= 128
        want = f"'backbone:size' entries, backbone one of {', '.join(typing.get_args(Backbone))}, size >= 128"
        rules.append((ok, "study.timing_backbones", want, spec))
    for name, value in notebooks.items():
        runs = value if isinstance(value, list) else [value]
        rules.append((bool(runs) and all(isinstance(r, dict) for r in runs), f"notebooks.{name}",
                      "a mapping of parameters or a list of them", value))
    return rules


def _rules(cfg: Config) -> list[Rule]:
    """``(ok, key, expected, value)`` for every value check the types cannot express, section by section."""
    return (_data_rules(cfg.synth, cfg.preprocess, cfg.holdout) + _model_rules(cfg.model, cfg.fe, cfg.augment)
            + _train_rules(cfg.train, cfg.eval) + _study_rules(cfg.study, cfg.notebooks))


def validate(cfg: Config) -> Config:
    """Check value domains that types cannot express; return ``cfg``. Raises :class:`ConfigError`
    naming the first bad key. ``study.secondary`` must itself give a valid configuration."""
    for ok, key, want, value in _rules(cfg):
        if not ok:
            raise ConfigError(f"{key}: expected {want}, got {value!r}")
    if cfg.study.secondary:
        data = cfg.to_dict()
        data["study"]["secondary"] = {}
        try:
            for key, value in cfg.study.secondary.items():
                set_dotted(data, key, copy.deepcopy(value))
            validate(build(Config, data, ""))
        except ConfigError as e:
            raise ConfigError(f"study.secondary: {e} (keys are section.key, e.g. model.size)") from None
    return cfg


def check(section: Any, name: str) -> Any:
    """Validate one section built in code (``check(ModelConfig(size=96), "model")``) as :func:`load`
    validates a file: types, choices and values; returns ``section``; :class:`ConfigError` naming the key."""
    validate(build(Config, {name: dataclasses.asdict(section)}, ""))
    return section


def from_dict(data: dict[str, Any], source: str = "<dict>") -> Config:
    """Build and validate a Config from a nested dict; errors are prefixed with ``source``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping")
    try:
        return validate(build(Config, data, ""))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def with_overrides(cfg: Config, overrides: Mapping[str, Any]) -> Config:
    """A validated copy of ``cfg`` with ``{"section.key": value}`` overrides (Python values, the ``--set``
    keys), e.g. ``with_overrides(cfg, {"fe.enabled": True, "train.seed": 1})``."""
    data = copy.deepcopy(cfg.to_dict())
    for key, value in overrides.items():
        set_dotted(data, key, copy.deepcopy(value))
    return from_dict(data, f"{cfg.profile}+overrides")


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a profile by file path or by name (``smoke``/``default``/``paper``), then apply overrides."""
    if path is None:
        data: dict[str, Any] = {}
        source = "<defaults>"
    else:
        p = Path(path)
        if not p.suffix and str(path) in PROFILES:
            p = PARAMS_DIR / f"{path}.yaml"
        if not p.is_file():
            raise ConfigError(f"{p}: params file not found")
        source = str(p)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({e})") from None
        data.setdefault("profile", p.stem)
    for ov in overrides:
        set_override(data, ov)
    return from_dict(data, source)


def dump(cfg: Config, path: str | Path) -> None:
    """Write ``cfg`` as YAML atomically."""
    atomic_write_text(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
