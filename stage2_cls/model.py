"""Stage-2 classifier: a 2D CNN per slice, a bidirectional LSTM over the slices.

One sample is one vertebra's stack of ``S`` slices, each with ``C`` = 6 channels
(5 neighbouring CT slices and the vertebra's predicted mask). The CNN turns each
slice into a feature vector, the LSTM lets every slice see the whole vertebra,
and a linear head gives one logit per slice.

Forward returns a dict (the one contract train, make_submission and the
benchmark share):

- ``slice_logits`` (B, S): per-slice fracture logits;
- ``attention`` (B, S): softmax weights over slices (``pooling: attention`` only);
- ``box_logits`` (B, S): an auxiliary head's per-slice logits of "a fracture box lies
  on this slice" (``box_head_weight > 0`` only; trained by :func:`box_loss`, not used
  for the vertebra probability).

``model.type: 2`` builds :class:`PatientClassifier` instead (the winners'
"type 2"): a whole study (B, 7, S, C, H, W) per sample, ``slice_logits``
(B, 7, S) and a learned ``overall_logit`` (B,), trained on the competition
metric itself (:func:`study_loss`).

:func:`vertebra_probability` turns that dict into the vertebra's probability
(B,): the mean of the slice probabilities (``pooling: mean``, the winners'
choice) or the sigmoid of the attention-weighted logit (``pooling: attention``).
:func:`vertebra_logit` gives the matching logit, and :func:`predict_logits` both logits
averaged over test-time flips (``tta``). The training loss
(:func:`weighted_loss`) lives here too, beside the pooling it must match.
"""
from __future__ import annotations

import logging
import math

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from common.pretrained import create_pretrained, resolve_source, wants_pretrained
from stage2_cls.config import ModelConfig

log = logging.getLogger(__name__)


class SliceSequenceClassifier(nn.Module):
    """CNN per slice -> BiLSTM over slices -> per-slice logits.

    Input ``(B, S, C, H, W)`` float in [0, 1]; output dict described in the module docstring.
    ``backbone`` is a timm model without classifier (``num_features`` outputs).
    """

    def __init__(self, cfg: ModelConfig, backbone: nn.Module) -> None:
        super().__init__()
        self.pooling = cfg.pooling
        if cfg.focus < 0:
            raise ValueError(f"model.focus must be >= 0 pixels, got {cfg.focus}")
        self.focus = cfg.focus
        self.backbone = backbone
        features = self.backbone.num_features
        self.lstm = nn.LSTM(features, cfg.lstm_hidden, num_layers=cfg.lstm_layers,
                            dropout=cfg.dropout if cfg.lstm_layers > 1 else 0.0,
                            bidirectional=True, batch_first=True)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(2 * cfg.lstm_hidden, 1)
        if cfg.prior:
            if not 0 < cfg.prior < 1:
                raise ValueError(f"model.prior must be in (0, 1), got {cfg.prior}")
            nn.init.constant_(self.head.bias, math.log(cfg.prior / (1 - cfg.prior)))
        self.attention = nn.Linear(2 * cfg.lstm_hidden, 1) if cfg.pooling == "attention" else None
        if cfg.box_head_weight < 0:
            raise ValueError(f"model.box_head_weight must be >= 0, got {cfg.box_head_weight}")
        self.box_head = nn.Linear(2 * cfg.lstm_hidden, 1) if cfg.box_head_weight > 0 else None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.ndim != 5:
            raise ValueError(f"expected input (B, S, C, H, W), got shape {tuple(x.shape)}")
        b, s = x.shape[:2]
        images = focus_on_mask(x.flatten(0, 1), self.focus)
        # channels-last: 1.2-1.6x the training speed of small CNNs on CPU
        feats = self.backbone(images.contiguous(memory_format=torch.channels_last))  # (B*S, F)
        seq, _ = self.lstm(feats.view(b, s, -1))              # (B, S, 2*hidden)
        seq = self.dropout(seq)
        out = {"slice_logits": self.head(seq).squeeze(-1)}    # (B, S)
        if self.attention is not None:
            out["attention"] = torch.softmax(self.attention(seq).squeeze(-1), dim=1)
        if self.box_head is not None:
            out["box_logits"] = self.box_head(seq).squeeze(-1)
        return out


class PatientClassifier(nn.Module):
    """Type 2: a whole study in one sample, with a learned patient_overall.

    Input ``(B, V, S, C, H, W)`` (V = 7 vertebrae) and ``missing`` (B, V) bool. The
    backbone and the slice LSTM are those of the type-1 model, applied to every
    vertebra; a second bidirectional LSTM reads the seven vertebra summaries (a
    learned embedding stands in for a missing vertebra, whose empty stack says
    nothing) and its max over vertebrae gives the patient logit. With ``overall_head:
    noisy_or`` that logit is a correction (zero at the start) added to the log-odds of the
    noisy-OR of the model's own vertebra probabilities (:func:`noisy_or_logit`), through
    which patient_overall's loss reaches the vertebra heads too. Output dict:
    ``slice_logits`` (B, V, S) and ``overall_logit`` (B,).
    """

    def __init__(self, cfg: ModelConfig, backbone: nn.Module) -> None:
        super().__init__()
        self.vertebra = SliceSequenceClassifier(cfg, backbone)
        width = 2 * cfg.lstm_hidden
        self.missing_embedding = nn.Parameter(torch.zeros(width))
        self.patient_lstm = nn.LSTM(width, cfg.lstm_hidden, bidirectional=True, batch_first=True)
        self.patient_head = nn.Linear(width, 1)
        self.checkpoint_chunk = cfg.checkpoint_chunk
        if cfg.pooling != "mean":
            raise ValueError(f"type 2 pools slices by their mean probability; model.pooling={cfg.pooling!r}")
        if cfg.overall_head not in ("free", "noisy_or"):
            raise ValueError(f"model.overall_head must be 'free' or 'noisy_or', got {cfg.overall_head!r}")
        self.overall_head = cfg.overall_head
        if self.overall_head == "noisy_or":
            nn.init.zeros_(self.patient_head.weight)
            nn.init.zeros_(self.patient_head.bias)

    def slice_features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, F); in checkpointed chunks when training with ``checkpoint_chunk``."""
        images = focus_on_mask(images, self.vertebra.focus).contiguous(memory_format=torch.channels_last)
        backbone = self.vertebra.backbone
        if not (self.training and self.checkpoint_chunk > 0):
            return backbone(images)
        return torch.cat([checkpoint(backbone, chunk, use_reentrant=False)
                          for chunk in images.split(self.checkpoint_chunk)])

    def forward(self, x: torch.Tensor, missing: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.ndim != 6:
            raise ValueError(f"expected input (B, V, S, C, H, W), got shape {tuple(x.shape)}")
        b, v, s = x.shape[:3]
        feats = self.slice_features(x.flatten(0, 2))                  # (B*V*S, F)
        seq, _ = self.vertebra.lstm(feats.view(b * v, s, -1))        # (B*V, S, 2*hidden)
        seq = self.vertebra.dropout(seq)
        slice_logits = self.vertebra.head(seq).squeeze(-1).view(b, v, s)
        summary = seq.mean(dim=1).view(b, v, -1)
        summary = torch.where(missing[..., None], self.missing_embedding.to(summary.dtype), summary)
        patient, _ = self.patient_lstm(summary)                       # (B, V, 2*hidden)
        overall = self.patient_head(patient.max(dim=1).values).squeeze(-1)
        if self.overall_head == "noisy_or":
            overall = overall.float() + noisy_or_logit(vertebra_logit({"slice_logits": slice_logits}), missing)
        return {"slice_logits": slice_logits, "overall_logit": overall}


FOCUS_FULL = 0.25  # a grown mask probability from which the CT is kept whole


def focus_on_mask(images: torch.Tensor, grow: int) -> torch.Tensor:
    """CT channels of ``images`` (N, C, H, W) kept where the vertebra's mask (channel C-1), grown
    by ``grow`` pixels (a max filter), is likely: multiplied by ``min(1, grown / FOCUS_FULL)``.
    The mask channel itself is unchanged; ``grow`` 0 returns ``images`` as they are."""
    if grow <= 0:
        return images
    mask = images[:, -1:]
    grown = F.max_pool2d(mask, kernel_size=2 * grow + 1, stride=1, padding=grow)
    weight = (grown / FOCUS_FULL).clamp(max=1.0)
    return torch.cat([images[:, :-1] * weight, mask], dim=1)


def noisy_or_logit(logits: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
    """Log-odds (B,) of ``1 - prod(1 - p)`` over the vertebrae present, from their logits (B, V).

    Computed in log space: ``log(1 - P) = sum log sigmoid(-logit)``; a study with no vertebra
    present gets the log-odds of a tiny probability instead of minus infinity.
    """
    log_none = torch.where(missing, torch.zeros_like(logits), F.logsigmoid(-logits.float())).sum(dim=1)
    log_none = log_none.clamp(max=-1e-30)
    return torch.log(-torch.expm1(log_none)) - log_none


def study_loss(output: dict[str, torch.Tensor], labels: torch.Tensor, missing: torch.Tensor,
               smoothing: float = 0.0) -> torch.Tensor:
    """The competition metric's weighting, per study, as the type-2 training loss.

    labels (B, 8) in TARGETS order, missing (B, 7). Each vertebra's loss is the mean
    slice BCE (as for type 1), weighted 2 / 1 (positive / negative) and 0 when the
    vertebra is missing; patient_overall's BCE is weighted 14 / 7; each study's loss is
    ``sum(w * l) / sum(w)``, then averaged over the batch: the metric itself. ``smoothing``
    softens the BCE targets (:func:`smooth_labels`), not the weights.
    """
    labels = labels.float()
    targets = smooth_labels(labels, smoothing)
    logits = output["slice_logits"].float()                                            # (B, 7, S)
    vertebra = F.binary_cross_entropy_with_logits(
        logits, targets[:, :7, None].expand_as(logits), reduction="none").mean(dim=2)   # (B, 7)
    overall = F.binary_cross_entropy_with_logits(output["overall_logit"].float(), targets[:, 7], reduction="none")
    w_vertebra = (1.0 + labels[:, :7]) * (~missing).float()
    w_overall = 7.0 * (1.0 + labels[:, 7])
    return ((w_vertebra * vertebra).sum(1) + w_overall * overall).div(w_vertebra.sum(1) + w_overall).mean()


def vertebra_logit(output: dict[str, torch.Tensor]) -> torch.Tensor:
    """The vertebra logit (B,) from the model's output dict.

    Attention pooling: the attention-weighted mean of the slice logits. Mean
    pooling: the logit of the mean slice probability (computed stably).
    """
    logits = output["slice_logits"].float()
    if "attention" in output:
        return (output["attention"].float() * logits).sum(dim=1)
    # log(mean sigmoid) - log(mean (1 - sigmoid)), both through logsumexp.
    n = torch.log(torch.tensor(float(logits.shape[-1]), device=logits.device))
    log_p = torch.logsumexp(nn.functional.logsigmoid(logits), dim=-1) - n
    log_q = torch.logsumexp(nn.functional.logsigmoid(-logits), dim=-1) - n
    return log_p - log_q


TTA_MODES = ("none", "flips")
# The views of "flips": the image as it is, flipped left-right, flipped front-back, and both
# (the in-plane flips the training augmentation draws with augment.flip_p); negative dims so
# that they apply to type 1 (B, S, C, H, W) and type 2 (B, V, S, C, H, W) alike.
_FLIP_VIEWS = {"none": ((),), "flips": ((), (-1,), (-2,), (-2, -1))}


def predict_logits(model: nn.Module, images: torch.Tensor, missing: torch.Tensor | None = None,
                   tta: str = "none") -> dict[str, torch.Tensor]:
    """Inference logits averaged over the test-time views of ``tta`` ("none" or "flips").

    Returns ``vertebra_logit`` ((B,) type 1, (B, V) type 2) and, for type 2,
    ``overall_logit`` (B,): each the mean log-odds over the views (float32). Without
    views, ``sigmoid(vertebra_logit)`` equals :func:`vertebra_probability`.
    """
    if tta not in _FLIP_VIEWS:
        raise ValueError(f"unknown stage-2 tta {tta!r}; choose from {TTA_MODES}")
    sums: dict[str, torch.Tensor] = {}
    views = _FLIP_VIEWS[tta]
    for dims in views:
        x = torch.flip(images, dims) if dims else images
        output = model(x) if missing is None else model(x, missing)
        logits = {"vertebra_logit": vertebra_logit(output)}
        if "overall_logit" in output:
            logits["overall_logit"] = output["overall_logit"].float()
        for key, value in logits.items():
            sums[key] = sums[key] + value if key in sums else value
    return {key: value / len(views) for key, value in sums.items()}


def vertebra_probability(output: dict[str, torch.Tensor]) -> torch.Tensor:
    """The vertebra probability (B,) (type 2: (B, 7)): mean slice probability, or sigmoid of the
    attention logit."""
    if "attention" in output:
        return torch.sigmoid(vertebra_logit(output))
    return torch.sigmoid(output["slice_logits"].float()).mean(dim=-1)


def check_smoothing(smoothing: float) -> None:
    """Refuse a ``label_smoothing`` outside [0, 1) (1 would make every target 0.5)."""
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {smoothing}")


def smooth_labels(label: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Training targets pulled towards 0.5: ``label * (1 - smoothing) + smoothing / 2``.

    A target of 0.025 / 0.975 (``smoothing`` 0.05) is met at a logit of about +-3.7, so the
    loss stops pushing a vertebra it has learned by heart further out; the metric's weights
    still come from the hard labels.
    """
    check_smoothing(smoothing)
    label = label.float()
    return label * (1.0 - smoothing) + 0.5 * smoothing if smoothing else label


def sample_losses(output: dict[str, torch.Tensor], label: torch.Tensor) -> torch.Tensor:
    """Unweighted BCE per sample (B,): mean over slices (mean pooling) or on the attention logit.

    ``label`` may be soft (see :func:`smooth_labels`)."""
    label = label.float()
    if "attention" in output:
        return F.binary_cross_entropy_with_logits(vertebra_logit(output), label, reduction="none")
    logits = output["slice_logits"].float()
    target = label[:, None].expand_as(logits)
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=1)


def weighted_loss(output: dict[str, torch.Tensor], label: torch.Tensor, weight: torch.Tensor,
                  smoothing: float = 0.0) -> torch.Tensor:
    """``sum(w * l) / sum(w)`` over the batch, ``w`` the metric's per-label weights (B,); the BCE
    against the labels smoothed by ``smoothing`` (:func:`smooth_labels`)."""
    weight = weight.float()
    return (weight * sample_losses(output, smooth_labels(label, smoothing))).sum() / weight.sum().clamp_min(1e-12)


def box_loss(output: dict[str, torch.Tensor], target: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """The auxiliary slice loss: BCE of ``box_logits`` (B, S) against ``target`` (B, S).

    Only samples with ``known`` (B,) true count; positive slices weigh 2 (as the
    metric weighs a fractured vertebra). Normalised by the weight sum, and 0 (still
    attached to the graph) when the batch holds no known sample.
    """
    logits = output["box_logits"].float()
    target = target.float()
    weight = known.float()[:, None] * (1.0 + target)
    losses = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (weight * losses).sum() / weight.sum().clamp_min(1.0)


def build_model(cfg: ModelConfig, pretrained_source: bool = True) -> nn.Module:
    """The one builder used by training, inference and the benchmarks.

    With ``pretrained_source`` (training) and ``cfg.pretrained`` or
    ``cfg.weights_file`` set, the backbone starts from ImageNet weights loaded by
    timm (see :mod:`common.pretrained`), or the build fails saying how to supply
    them. ``pretrained_source=False`` ignores both settings: rebuilding from a
    checkpoint (which holds every weight) and random-weight benchmarks use it.
    """
    if cfg.in_chans < 1:
        raise ValueError(f"model.in_chans must be positive, got {cfg.in_chans}")
    if pretrained_source and wants_pretrained(cfg.pretrained, cfg.weights_file):
        backbone = pretrained_backbone(cfg)
    else:
        backbone = timm.create_model(cfg.backbone, pretrained=False, in_chans=cfg.in_chans,
                                     num_classes=0, drop_path_rate=cfg.drop_path, global_pool=cfg.global_pool)
    backbone = backbone.to(memory_format=torch.channels_last)
    return PatientClassifier(cfg, backbone) if cfg.type == 2 else SliceSequenceClassifier(cfg, backbone)


def check_pretrained(cfg: ModelConfig) -> None:
    """Fail now, before any data work, when the configured pretrained start has no source."""
    if wants_pretrained(cfg.pretrained, cfg.weights_file):
        resolve_source(cfg.backbone, cfg.weights_file)


def pretrained_backbone(cfg: ModelConfig) -> nn.Module:
    """The timm backbone with its ImageNet weights, the stem adapted to ``in_chans`` by timm."""
    source = resolve_source(cfg.backbone, cfg.weights_file)
    backbone = create_pretrained(source, in_chans=cfg.in_chans, drop_path_rate=cfg.drop_path)
    # timm loaded every tensor strictly, head included; the slice features need no head.
    backbone.reset_classifier(0, global_pool=cfg.global_pool)
    log.info("stage-2 backbone %s: all %d tensors loaded from the %s (stem adapted from 3 to %d "
             "channels by timm), ImageNet classifier dropped", cfg.backbone,
             len(backbone.state_dict()), source, cfg.in_chans)
    return backbone


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
