"""The stage-1 network: a 3D U-Net with an EfficientNet encoder (segmentation-models-pytorch-3d).

A pretrained start inflates 2D ImageNet weights into the 3D encoder: timm
loads the 2D model (``model.weights_file``, or the hub and its cache; see
:mod:`common.pretrained`) with its stem adapted to ``in_channels``, and every
2D kernel ``(O, I, kh, kw)`` becomes the 3D kernel ``(O, I, kd, kh, kw)``
repeated along depth and divided by ``kd``, so that a volume whose slices are
all the same gives the 2D network's response on that slice (I3D inflation).
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # smp-3d warns about timm internals on import
    import segmentation_models_pytorch_3d as smp
    from segmentation_models_pytorch_3d.base import SegmentationHead

from common.pretrained import (REQUIRED_TENSOR_FRACTION, PretrainedError, create_pretrained, resolve_source,
                               wants_pretrained)
from stage1_seg.config import ModelConfig
from stage1_seg.depthwise import use_fast_depthwise

log = logging.getLogger(__name__)

N_CLASSES = 7
HEADS = ("sigmoid", "softmax")
TIMM_PREFIX = "tu-"  # smp-3d's name for timm-3d encoders, the ones with a 2D timm twin to inflate


def output_channels(cfg: ModelConfig) -> int:
    """7 sigmoid maps, or background + 7 softmax classes."""
    if cfg.head not in HEADS:
        raise ValueError(f"model.head must be one of {HEADS}, got {cfg.head!r}")
    return N_CLASSES + (cfg.head == "softmax")


def class_probs(logits: torch.Tensor, head: str) -> torch.Tensor:
    """Logits ``(B, 7 or 8, D, H, W)`` -> C1..C7 probabilities ``(B, 7, D, H, W)`` (float32)."""
    logits = logits.float()
    if head == "softmax":
        return torch.softmax(logits, dim=1)[:, 1:]
    return torch.sigmoid(logits)


class SegUnet(smp.Unet):
    """smp's Unet with optional deep-supervision heads (the same state-dict keys without them)
    and an optional half-resolution output stage.

    ``head_stride=2`` drops the decoder's last block (the one that upsamples to the input's
    resolution with no skip connection to add detail) and puts the segmentation head on the
    1/2-resolution features; its logits are upsampled trilinearly to the input size, so the
    output shape is unchanged; with ``loss_at_head`` as well, training mode skips that upsampling
    and returns the head's logits at 1/2 resolution, to be scored against the target averaged
    down to them (:func:`stage1_seg.train.supervised_loss`).
    In training mode with heads, ``forward`` returns ``(logits, [coarser logits, ...])``,
    the finest coarser output first; otherwise the logits alone.
    """

    def __init__(self, *args, deep_supervision: int = 0, head_stride: int = 1, loss_at_head: bool = False,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if head_stride not in (1, 2):
            raise ValueError(f"model.head_stride must be 1 or 2, got {head_stride}")
        self.head_stride, self.loss_at_head = head_stride, loss_at_head
        if head_stride == 2:
            del self.decoder.blocks[-1]
            head = self.segmentation_head[0]
            self.segmentation_head = SegmentationHead(
                self.decoder.blocks[-1].conv2[0].out_channels, head.out_channels, kernel_size=head.kernel_size[0])
        self.aux_heads = nn.ModuleList(
            nn.Conv3d(self.decoder.blocks[-2 - i].conv2[0].out_channels,
                      self.segmentation_head[0].out_channels, kernel_size=1)
            for i in range(deep_supervision)) if deep_supervision else None

    def forward(self, x: torch.Tensor):
        self.check_input_shape(x)               # as smp's own forward does
        features = self.encoder(x)[1:][::-1]   # deepest first, as smp's decoder takes them
        out, skips, outputs = self.decoder.center(features[0]), features[1:], []
        for i, block in enumerate(self.decoder.blocks):
            out = block(out, skips[i] if i < len(skips) else None)
            outputs.append(out)
        logits = self.segmentation_head(out)
        if self.head_stride > 1 and not (self.training and self.loss_at_head):
            logits = F.interpolate(logits, size=x.shape[2:], mode="trilinear", align_corners=False)
        # The logits leave in the standard layout: on CPU the loss over channels-last logits of
        # two 64^3 cubes took 0.066 s (forward and backward) against 0.042 s, of a 0.54 s step
        # (on a GPU it is one copy; not timed there).
        logits = logits.contiguous()
        if not (self.training and self.aux_heads is not None):
            return logits
        return logits, [head(outputs[-2 - i]).contiguous() for i, head in enumerate(self.aux_heads)]


def build_model(cfg: ModelConfig, pretrained_source: bool = True) -> nn.Module:
    """``(B, in_channels, D, H, W)`` -> logits ``(B, 7, D, H, W)`` (``head`` softmax: 8, background
    first); D, H, W multiples of 32.

    With ``pretrained_source`` (training) and ``cfg.pretrained`` or
    ``cfg.weights_file`` set, the encoder starts from inflated 2D ImageNet
    weights, or the build fails saying how to supply them.
    ``pretrained_source=False`` ignores both settings: rebuilding from a
    checkpoint (which holds every weight) and random-weight benchmarks use it.
    """
    levels = len(cfg.decoder_channels) - (cfg.head_stride == 2)   # decoder outputs left
    if not 0 <= cfg.deep_supervision < levels:
        raise ValueError(f"model.deep_supervision must be in 0..{levels - 1} (decoder_channels "
                         f"{tuple(cfg.decoder_channels)}, head_stride {cfg.head_stride}), got {cfg.deep_supervision}")
    if cfg.loss_at_head and cfg.head_stride != 2:
        raise ValueError(f"model.loss_at_head needs model.head_stride 2 (the head then works at 1/2 "
                         f"resolution), got head_stride {cfg.head_stride}")
    model = SegUnet(
        encoder_name=cfg.encoder, encoder_weights=None, in_channels=cfg.in_channels,
        classes=output_channels(cfg), decoder_channels=tuple(cfg.decoder_channels),
        encoder_depth=len(cfg.decoder_channels), deep_supervision=cfg.deep_supervision,
        head_stride=cfg.head_stride, loss_at_head=cfg.loss_at_head)
    # The classification head of the efficientnet-b* encoders is never run by the U-Net;
    # dropping it keeps DDP from waiting for gradients that never come.
    for name in ("_conv_head", "_bn1"):
        if isinstance(getattr(model.encoder, name, None), nn.Module):
            delattr(model.encoder, name)
    if cfg.prior:
        for conv in [model.segmentation_head[0], *(model.aux_heads or [])]:
            init_prior(conv, cfg.prior, cfg.head)
    if pretrained_source and wants_pretrained(cfg.pretrained, cfg.weights_file):
        load_imagenet_encoder(model.encoder, cfg)
    # The encoder's depthwise convolutions get a backward that is 3-5x faster on CPU (see
    # stage1_seg.depthwise); GPUs, autocast and inference run the library convolution.
    use_fast_depthwise(model)
    # Channels-last 3D convolutions: 1.7x the training speed on CPU (0.51 vs 0.86 s per step of
    # two 64^3 cubes, EfficientNetV2-B0); inputs go through as_model_input to match.
    return model.to(memory_format=torch.channels_last_3d)


def init_prior(conv: nn.Module, prior: float, head: str) -> None:
    """Start every output voxel at foreground probability ``prior`` per vertebra: bias of the
    sigmoid maps at log(prior / (1 - prior)); with the softmax head, background starts at
    1 - 7 prior. The network then does not spend its first steps learning that most voxels are
    background (the prior-probability initialisation of RetinaNet)."""
    if not 0 < prior < 1 / N_CLASSES:
        raise ValueError(f"model.prior must be in (0, {1 / N_CLASSES:.3f}), got {prior}")
    with torch.no_grad():
        if head == "softmax":
            conv.bias.zero_()
            conv.bias[0] = math.log((1 - N_CLASSES * prior) / prior)
        else:
            conv.bias.fill_(math.log(prior / (1 - prior)))


def as_model_input(x: torch.Tensor) -> torch.Tensor:
    """A batch ``(B, C, D, H, W)`` in the memory layout the built model uses."""
    return x.contiguous(memory_format=torch.channels_last_3d)


def timm_arch(encoder: str) -> str:
    """The 2D timm model whose weights inflate into ``encoder`` (``tu-<timm name>``)."""
    if not encoder.startswith(TIMM_PREFIX):
        raise PretrainedError(
            f"model.encoder '{encoder}' cannot start from ImageNet weights: only timm-3d encoders "
            f"('{TIMM_PREFIX}' + a timm model name, e.g. tu-tf_efficientnetv2_s or tu-tf_efficientnetv2_b0) "
            f"are inflated from 2D timm weights. Use one, or set model.pretrained=false model.weights_file=null")
    return encoder[len(TIMM_PREFIX):]


def check_pretrained(cfg: ModelConfig) -> None:
    """Fail now, before any data work, when the configured pretrained start has no source."""
    if wants_pretrained(cfg.pretrained, cfg.weights_file):
        resolve_source(timm_arch(cfg.encoder), cfg.weights_file)


@dataclass
class Inflation:
    """What :func:`inflate_state_dict` did, counted over weight tensors (not BatchNorm step counters)."""

    total: int = 0                                          # the 3D encoder's weight tensors
    loaded: int = 0                                         # of those, taken from the 2D model
    inflated: int = 0                                       # of those, 2D kernels made 3D
    initial: list[str] = field(default_factory=list)        # left at their initial values
    unused: list[str] = field(default_factory=list)         # 2D tensors with no 3D place (the head)

    @property
    def fraction(self) -> float:
        return self.loaded / max(self.total, 1)


def inflate_kernel(weight: torch.Tensor, depth: int) -> torch.Tensor:
    """``(O, I, kh, kw)`` -> ``(O, I, depth, kh, kw)``: repeated along depth, divided by depth.

    timm-3d's ``convert_2d_weights_to_3d`` applies the same rule but repeats
    along the kernel's last axis (W) and picks tensors by name; here depth is
    the slice axis of our (D, H, W) volumes, so each 2D filter keeps acting on
    axial slices, and tensors are picked by shape.
    """
    return weight.unsqueeze(2).repeat(1, 1, depth, 1, 1) / depth


def inflate_state_dict(state2d: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
                       ) -> tuple[dict[str, torch.Tensor], Inflation]:
    """The tensors of ``state2d`` that fit the 3D ``target`` state dict (same keys), kernels inflated."""
    out: dict[str, torch.Tensor] = {}
    report = Inflation()
    for key, want in target.items():
        counted = not key.endswith("num_batches_tracked")
        report.total += counted
        value = state2d.get(key)
        inflate = value is not None and value.ndim == 4 and want.ndim == 5 \
            and value.shape[:2] == want.shape[:2] and value.shape[2:] == want.shape[3:]
        if inflate:
            value = inflate_kernel(value, want.shape[2])
        if value is None or value.shape != want.shape:
            if counted:
                report.initial.append(key)
            continue
        out[key] = value.to(want.dtype)
        report.loaded += counted
        report.inflated += counted and inflate
    report.unused = [k for k in state2d if k not in target and not k.endswith("num_batches_tracked")]
    return out, report


def load_imagenet_encoder(encoder: nn.Module, cfg: ModelConfig) -> Inflation:
    """Inflate the 2D ImageNet weights of the encoder's timm twin into it; log the counts.

    Raises :class:`PretrainedError` when fewer than 95% of the encoder's weight
    tensors could be loaded: a start that is mostly random is not the start asked for.
    """
    source = resolve_source(timm_arch(cfg.encoder), cfg.weights_file)
    model2d = create_pretrained(source, in_chans=cfg.in_channels)  # timm adapts the stem to in_channels
    net3d = encoder.model  # smp-3d's TimmUniversalEncoder wraps the timm-3d features model
    state, report = inflate_state_dict(model2d.state_dict(), net3d.state_dict())
    net3d.load_state_dict(state, strict=False)
    stem = f", stem adapted from 3 to {cfg.in_channels} channels by timm" if cfg.in_channels != 3 else ""
    log.info("stage-1 encoder %s: %d of %d weight tensors loaded from the %s (%d 2D kernels inflated to 3D "
             "along depth%s); %d left at initial values%s; %d tensors of the 2D model unused%s",
             cfg.encoder, report.loaded, report.total, source, report.inflated, stem, len(report.initial),
             f" e.g. {report.initial[:3]}" if report.initial else "", len(report.unused),
             f" ({', '.join(report.unused[:4])}{', ...' if len(report.unused) > 4 else ''})" if report.unused else "")
    if report.fraction < REQUIRED_TENSOR_FRACTION:
        raise PretrainedError(
            f"{source}: only {report.loaded} of the {report.total} weight tensors of the {cfg.encoder} encoder "
            f"could be inflated from it ({report.fraction:.0%}; at least {REQUIRED_TENSOR_FRACTION:.0%} needed); "
            f"left at initial values e.g. {report.initial[:5]}")
    return report
