"""Stage-2 classifier: a 2D CNN per slice, a bidirectional LSTM over the slices.

One sample is one vertebra's stack of ``S`` slices, each with ``C`` = 6 channels
(5 neighbouring CT slices and the vertebra's predicted mask). The CNN turns each
slice into a feature vector, the LSTM lets every slice see the whole vertebra,
and a linear head gives one logit per slice.

Forward returns a dict (the one contract train, make_submission and the
benchmark share):

- ``slice_logits`` (B, S): per-slice fracture logits;
- ``attention`` (B, S): softmax weights over slices (``pooling: attention`` only).

:func:`vertebra_probability` turns that dict into the vertebra's probability
(B,): the mean of the slice probabilities (``pooling: mean``, the winners'
choice) or the sigmoid of the attention-weighted logit (``pooling: attention``).
:func:`vertebra_logit` gives the matching logit. The training loss
(:func:`weighted_loss`) lives here too, beside the pooling it must match.
"""
from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from stage2_cls.config import ModelConfig

log = logging.getLogger(__name__)


class WeightsFileError(FileNotFoundError):
    """A local backbone weights file that is missing or does not fit the backbone."""


class SliceSequenceClassifier(nn.Module):
    """CNN per slice -> BiLSTM over slices -> per-slice logits.

    Input ``(B, S, C, H, W)`` float in [0, 1]; output dict described in the module docstring.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.pooling = cfg.pooling
        self.backbone = timm.create_model(cfg.backbone, pretrained=False, in_chans=cfg.in_chans,
                                          num_classes=0, drop_path_rate=cfg.drop_path)
        features = self.backbone.num_features
        self.lstm = nn.LSTM(features, cfg.lstm_hidden, num_layers=cfg.lstm_layers,
                            dropout=cfg.dropout if cfg.lstm_layers > 1 else 0.0,
                            bidirectional=True, batch_first=True)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(2 * cfg.lstm_hidden, 1)
        self.attention = nn.Linear(2 * cfg.lstm_hidden, 1) if cfg.pooling == "attention" else None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.ndim != 5:
            raise ValueError(f"expected input (B, S, C, H, W), got shape {tuple(x.shape)}")
        b, s = x.shape[:2]
        feats = self.backbone(x.flatten(0, 1))               # (B*S, F)
        seq, _ = self.lstm(feats.view(b, s, -1))              # (B, S, 2*hidden)
        seq = self.dropout(seq)
        out = {"slice_logits": self.head(seq).squeeze(-1)}    # (B, S)
        if self.attention is not None:
            out["attention"] = torch.softmax(self.attention(seq).squeeze(-1), dim=1)
        return out


def vertebra_logit(output: dict[str, torch.Tensor]) -> torch.Tensor:
    """The vertebra logit (B,) from the model's output dict.

    Attention pooling: the attention-weighted mean of the slice logits. Mean
    pooling: the logit of the mean slice probability (computed stably).
    """
    logits = output["slice_logits"].float()
    if "attention" in output:
        return (output["attention"].float() * logits).sum(dim=1)
    # log(mean sigmoid) - log(mean (1 - sigmoid)), both through logsumexp.
    n = torch.log(torch.tensor(float(logits.shape[1]), device=logits.device))
    log_p = torch.logsumexp(nn.functional.logsigmoid(logits), dim=1) - n
    log_q = torch.logsumexp(nn.functional.logsigmoid(-logits), dim=1) - n
    return log_p - log_q


def vertebra_probability(output: dict[str, torch.Tensor]) -> torch.Tensor:
    """The vertebra probability (B,): mean slice probability, or sigmoid of the attention logit."""
    if "attention" in output:
        return torch.sigmoid(vertebra_logit(output))
    return torch.sigmoid(output["slice_logits"].float()).mean(dim=1)


def sample_losses(output: dict[str, torch.Tensor], label: torch.Tensor) -> torch.Tensor:
    """Unweighted BCE per sample (B,): mean over slices (mean pooling) or on the attention logit."""
    label = label.float()
    if "attention" in output:
        return F.binary_cross_entropy_with_logits(vertebra_logit(output), label, reduction="none")
    logits = output["slice_logits"].float()
    target = label[:, None].expand_as(logits)
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=1)


def weighted_loss(output: dict[str, torch.Tensor], label: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``sum(w * l) / sum(w)`` over the batch, ``w`` the metric's per-label weights (B,)."""
    weight = weight.float()
    return (weight * sample_losses(output, label)).sum() / weight.sum().clamp_min(1e-12)


def build_model(cfg: ModelConfig) -> nn.Module:
    """The one builder used by training, inference and the benchmark.

    Loads ``cfg.weights_file`` (a local backbone state dict) when set; nothing is
    ever downloaded.
    """
    if cfg.in_chans < 1:
        raise ValueError(f"model.in_chans must be positive, got {cfg.in_chans}")
    model = SliceSequenceClassifier(cfg)
    if cfg.weights_file:
        load_backbone_weights(model.backbone, cfg.weights_file)
    return model


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load a local timm state dict into ``backbone``, adapting a 3-channel stem.

    Classifier-head keys are ignored (the backbone has no head). A stem kernel
    with 3 input channels is turned into ``in_chans`` channels by averaging RGB
    and spreading it evenly, so a grey input gives the same response as before.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsFileError(f"model.weights_file not found: {path} (weights are never downloaded; "
                               "put a timm state dict there or set model.weights_file=null)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a bad file
        raise WeightsFileError(f"{path}: cannot be read as a torch state dict ({exc})") from exc
    for key in ("state_dict", "model", "model_state"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsFileError(f"{path}: expected a state dict, got {type(state).__name__}")
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    own = backbone.state_dict()
    adapted = {}
    for key, value in state.items():
        if key not in own:
            continue
        target = own[key]
        if value.ndim == 4 and target.ndim == 4 and value.shape[1] == 3 and target.shape[1] != 3 \
                and value.shape[0] == target.shape[0] and value.shape[2:] == target.shape[2:]:
            value = value.float().mean(dim=1, keepdim=True).repeat(1, target.shape[1], 1, 1)
            value = value * (3.0 / target.shape[1])
        if value.shape != target.shape:
            raise WeightsFileError(f"{path}: {key} has shape {tuple(value.shape)}, the backbone "
                                   f"expects {tuple(target.shape)} (wrong backbone for this file?)")
        adapted[key] = value.to(target.dtype)
    if not adapted:
        raise WeightsFileError(f"{path}: no key matches the backbone {type(backbone).__name__}")
    missing = sorted(set(own) - set(adapted))
    backbone.load_state_dict(adapted, strict=False)
    log.info("loaded %d backbone tensors from %s (%d left at their initial values%s)", len(adapted),
             path, len(missing), f", e.g. {missing[:3]}" if missing else "")


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
