"""Stage-2 config schema (see configs/stage2.yaml)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from common.config import replace, to_dict
from common.trainer import TrainConfig


@dataclass(frozen=True)
class CropConfig:
    stage1_run: str = "default"        # reads work/stage1/<run>/masks and boxes.csv
    n_slices: int = 15                 # evenly spaced over the vertebra's slice range
    context: int = 2                   # +-2 neighbouring CT slices -> 5 image channels
    size: int = 224                    # output height = width
    margin: float = 0.15               # xy box grown by this fraction of its size on each side
    window_center: float = 400.0
    window_width: float = 1800.0
    minmax: bool = False               # per-crop min-max scaling instead of the HU window
    workers: int = 8


@dataclass(frozen=True)
class ModelConfig:
    # 1: one vertebra per sample (the winners' "type 1"); 2: the whole study per sample, with a
    # learned patient_overall head (their "type 2"; see stage2_cls.model.PatientClassifier)
    type: Literal[1, 2] = 1
    backbone: str = "convnext_nano"    # any timm model; in_chans 6
    in_chans: int = 6
    pretrained: bool = False           # ImageNet start via timm (hub/cache); configs/stage2.yaml sets true
    weights_file: Optional[str] = None # local timm state dict for the ImageNet start (offline); implies pretrained
    lstm_hidden: int = 256
    lstm_layers: int = 2
    dropout: float = 0.2
    pooling: Literal["mean", "attention"] = "mean"
    # How the backbone pools each slice's feature map into one vector (timm's global_pool):
    # "avg" (timm's default), "max", or "avgmax" (their mean). A fracture gap is a few pixels of a
    # 224 px slice; an average over the whole map dilutes it, a maximum keeps it. "avg" in both
    # configs: recipe check (demo config, the same stage 1, all 5 folds), avgmax against avg, OOF /
    # best constant: varied-96 0.85x vs 0.81x, slices-60 0.74x vs 0.82x, wide-fov-192 0.88x vs
    # 0.84x (few-masks not run); submissions 0.79x / 0.68x / 0.86x vs 0.73x / 0.68x / 0.81x; the
    # posterior-element breaks it was meant for stayed near chance (AUC 0.36 / 0.62 / 0.50 vs
    # 0.39 / 0.68 / 0.56).
    global_pool: Literal["avg", "max", "avgmax"] = "avg"
    # Initial vertebra probability (the slice head's bias at its log-odds); 0 keeps the layer's
    # default (~0.5). Off in both configs: recipe check, demo config, all 5 folds, same stage 1,
    # a start at 0.14 against none: varied-96 1.08x vs 1.03x the best constant (submission 0.99x
    # vs 0.94x), few-masks 0.92x vs 1.04x (0.76x vs 0.78x); mixed, within seed noise.
    prior: float = 0.0
    drop_path: float = 0.1
    # Type 1: weight of an auxiliary per-slice head trained on the slices that
    # train_bounding_boxes.csv marks as fractured (stage2_cls.slice_labels); 0: no such head.
    # Off: demo recipe on crops cut from true masks (boxes for half of the fractured studies),
    # 1,000 steps, folds 0/1, weight 1: 0.80x / 0.69x the best constant against 0.73x / 0.58x
    # without (vertebra AUC 0.89 / 0.96 against 0.88 / 0.95); the head's own slice probabilities
    # rank vertebrae no better (max over slices: AUC 0.87 / 0.93).
    box_head_weight: float = 0.0
    # Type 2 only: slice images per checkpointed backbone chunk (0: none): their activations are
    # recomputed in the backward pass. A study at 224 px is 105 slice images. Measured
    # (python -m tooling.bench.stage2_model --configs real --types 1 2, and time_model with other
    # chunks; convnext_nano, 15 x 224 px, batch 2 studies), peak training memory and studies/s:
    # H200, bf16 autocast: no checkpointing 8.7 GB, 26.2/s; chunks of 105 4.5 GB, 17.0/s;
    # of 35 1.9 GB, 7.5/s; fp32 without 14.2 GB, 12.6/s. H100, bf16: 8.7 GB, 24.9/s without;
    # chunks of 15 1.2 GB, 3.9/s. So batch 2 fits a 16 GB GPU without it (AMP on CUDA is the
    # default); small chunks cost 3-6x the time: use it only for larger batches or smaller GPUs.
    checkpoint_chunk: int = 0
    # Type 2 only: what the patient head learns. "free": the winners' head, a patient LSTM over the
    # seven vertebra summaries, from scratch. "noisy_or": the noisy-OR of the model's own vertebra
    # probabilities plus that head's output as a correction of its log-odds (zero at the start), so
    # the head starts where the vertebrae already are and patient_overall's loss also trains them.
    # Off ("free"): recipe check, varied-96, all 5 folds, the same type-1 run, noisy_or against free:
    # type 2 0.627 vs 0.510 out of fold (best constant 0.571), patient_overall 0.762 vs 0.620 from the
    # head and 0.635 vs 0.552 from type 2's own vertebrae (the overall loss raised them: their mean
    # noisy-OR 0.70 vs 0.62, patient prevalence 0.48), chosen ensemble 0.86x vs 0.80x the best
    # constant, submission 0.81x vs 0.74x the constant prior.
    overall_head: Literal["free", "noisy_or"] = "free"
    # Pixels (of the crop) by which the vertebra's predicted mask (the last channel) is grown
    # before the CT channels are multiplied by it, so that the network sees this vertebra's bone
    # and not its neighbours' (the posterior elements slope down over the next vertebra's body,
    # the dens rises into C1's ring); 0: the CT as cropped (the winners'). Off: recipe check, demo
    # config, the same stage 1, all 5 folds, focus=4 (64 px crops) against 0, OOF / best constant,
    # submission / constant prior, posterior-element breaks' AUC out of fold: varied-96 0.89x vs
    # 0.81x, 0.74x vs 0.73x, 0.35 vs 0.39; slices-60 0.80x vs 0.82x, 0.82x vs 0.68x, 0.65 vs 0.68.
    # The neighbours it hides were not what held the posterior breaks back. Untried on real CT.
    focus: int = 0


@dataclass(frozen=True)
class AugmentConfig:
    flip_p: float = 0.5
    ssr_p: float = 0.7                 # shift-scale-rotate
    shift: float = 0.1                 # fraction of the crop size
    scale: float = 0.15                # zoom in [1 - scale, 1 + scale]
    rotate_deg: float = 20.0
    brightness_contrast_p: float = 0.5
    blur_noise_p: float = 0.3
    distortion_p: float = 0.3
    cutout_p: float = 0.3
    shuffle_p: float = 0.2             # shuffle slice order within a stack
    vertebra_shuffle_p: float = 0.2    # type 2: shuffle the order of the 7 vertebrae of a study
    mixup_p: float = 0.5
    mixup_alpha: float = 1.0           # Beta(alpha, alpha) mixing weight (1: uniform)


@dataclass(frozen=True)
class Type2TrainConfig:
    """Training settings of the type-2 model that differ from ``train``'s (0: ``train``'s value).

    A type-2 sample is a whole study (7 vertebra stacks), so one step sees 7x the stacks of a
    type-1 step and an epoch has 7x fewer steps: it needs its own schedule. Applied by
    :func:`for_model_type` whenever ``model.type`` is 2 (``--model-type 2`` included).
    """

    steps: int = 0
    eval_every: int = 0
    batch_size: int = 0
    val_batch_size: int = 0


@dataclass(frozen=True)
class Stage2Config:
    """The real recipe; configs/stage2.yaml holds only what differs from these defaults."""

    run: str = "default"
    overall: Literal["noisy_or", "max"] = "noisy_or"  # patient_overall from C1..C7
    # Test-time views, in validation (so the out-of-fold files, the calibration and the ensemble
    # rule see what is submitted) and in make_submission: "flips" averages the log-odds of the
    # stack as it is and flipped left-right, front-back and both (the flips of augment.flip_p);
    # "none": one view, a quarter of the inference time. Recipe check (demo config, the same stage 1,
    # all 5 folds), flips against none, OOF / best constant: varied-96 0.81x vs 0.89x, wide-fov-192
    # 0.84x vs 0.89x, slices-60 0.82x vs 0.91x, few-masks 0.88x vs 0.91x; submissions (five folds,
    # already an average) 0.73x / 0.81x / 0.68x / 0.67x vs 0.74x / 0.87x / 0.66x / 0.64x; stage 2
    # of make_submission 0.71 s a study vs 0.17 s (CPU, 5 demo folds).
    tta: Literal["none", "flips"] = "flips"
    # Type 1: fractured vertebrae (~8% of them) drawn this many times as often in training, their loss
    # weight divided by as much (the expected loss, hence calibration, is unchanged). Off: with 4x,
    # demo recipe on crops cut from true masks, 1,000 steps, folds 0/1: 0.86x/0.62x the best constant
    # against 0.73x/0.58x without (vertebra AUC 0.90/0.93 against 0.88/0.95).
    positive_oversampling: float = 1.0
    # Training targets pulled towards 0.5 by this much (0.05: 0.025 / 0.975; type 1 and type 2,
    # patient_overall included); validation and the metric use the hard labels. Against the
    # over-confidence of long training on few studies: the demo uses 0.05 (configs/demo/stage2.yaml,
    # docs/experiments.md). Off here: the real recipe keeps the best of ~400 validation studies, and
    # nothing was measured on the RSNA data.
    label_smoothing: float = 0.0
    preload_mb: float = 0.0            # decode all crop files into memory when they fit in this (2019 studies: ~64 GB)
    lru_studies: int = 8               # else: decoded studies kept per data-loader worker
    decoded_cache: bool = False        # else also: uncompressed copies in work/stage2/decoded (31.6 MB/study at 224)
    crop: CropConfig = field(default_factory=CropConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # The winners (their public training notebooks): batch 8, AdamW lr 2.3e-4 decaying to 2.3e-5
    # (cosine), mixup 0.5, 5 folds, the epoch of lowest validation loss kept. Type 1: 75 epochs
    # of ~1,412 batches (2,018 studies x 7 vertebrae x 4/5, batch 8), ~106,000 steps. Type 2
    # (whole studies): 50 epochs of ~201 batches of 8 studies, ~10,000 steps. Ours: the same
    # step counts, the best validation score of the fold's ~400 studies kept (about one check per
    # two of their epochs). Until this version type 1 had 6,000 steps, ~4 passes over its training
    # vertebrae: on the recipe check's many-studies set the demo network needed ~30 passes
    # (docs/experiments.md). On an H100 (README, Benchmarks) 106,000 type-1 steps are ~1.5 h a
    # fold of model time, 10,000 type-2 steps ~1 h at batch 8 (~35 GB; with less GPU memory use
    # model.checkpoint_chunk, or type2.batch_size=2 with more steps).
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=106_000, eval_every=2_800, batch_size=8, val_batch_size=16, lr=2.3e-4, min_lr_ratio=0.1,
        weight_decay=5e-2, warmup_steps=200, num_workers=8, select="best"))
    type2: Type2TrainConfig = field(default_factory=lambda: Type2TrainConfig(steps=10_000, eval_every=400))


def for_model_type(cfg: Stage2Config) -> Stage2Config:
    """``cfg`` with ``type2``'s non-zero settings moved into ``train`` when ``model.type`` is 2."""
    if cfg.model.type != 2:
        return cfg
    changes = {f"train.{name}": value for name, value in to_dict(cfg.type2).items() if value}
    return replace(cfg, **changes) if changes else cfg
