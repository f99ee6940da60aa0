"""On-the-fly 3D augmentation in torch, applied identically to image and target.

Axes are (C, D, H, W) with D the head-feet axis. Flips are left-right (W) and, only if
``augment.flip_ap_p`` asks, front-back (H); never along D, which would turn C1 into C7.
Rotations are about the D axis.

Training augments each batch where the model runs (:func:`augment_batch`, called by
``stage1_seg.train.batch_loss``), not in the data loader: at 128^3 the augmentation of one
sample took 0.68 s on one CPU core, so four loader workers could feed about 5 samples/s to a GPU that trains
29. The random draws come from torch's generators, which the trainer seeds for every period
between validations (and per rank), so a resumed run draws the same.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from stage1_seg.config import AugmentConfig


def _rand(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(()).item()


def _affine_theta(cfg: AugmentConfig) -> torch.Tensor:
    """A (3, 4) sampling matrix in (x=W, y=H, z=D) normalised coordinates."""
    angle = math.radians(_rand(-cfg.rotate_deg, cfg.rotate_deg))
    scale = [1.0 + _rand(-cfg.scale, cfg.scale) for _ in range(3)]
    shift = [_rand(-cfg.shift, cfg.shift) * 2 for _ in range(3)]
    cos, sin = math.cos(angle), math.sin(angle)
    rot = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]])
    linear = rot @ torch.diag(torch.tensor(scale))
    return torch.cat([linear, torch.tensor(shift)[:, None]], dim=1)


def _elastic_offsets(shape: tuple[int, int, int], strength: float,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Smooth random displacement ``(1, D, H, W, 3)`` from a coarse 4^3 noise field (drawn on the
    CPU, interpolated on ``device``)."""
    coarse = (torch.randn(1, 3, 4, 4, 4) * strength).to(device)
    field = F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)
    return field.permute(0, 2, 3, 4, 1)


def spatial_transform(image: torch.Tensor, target: torch.Tensor, cfg: AugmentConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Random affine and/or elastic warp of ``image`` (C, D, H, W) and ``target`` (K, D, H, W)."""
    do_affine = torch.rand(()).item() < cfg.affine_p
    do_elastic = torch.rand(()).item() < cfg.elastic_p
    if not (do_affine or do_elastic):
        return image, target
    shape = tuple(image.shape[1:])
    theta = (_affine_theta(cfg) if do_affine else torch.eye(3, 4)).to(image.device)
    grid = F.affine_grid(theta[None], [1, 1, *shape], align_corners=False)
    if do_elastic:
        grid = grid + _elastic_offsets(shape, cfg.elastic_strength, image.device)
    warped = warp_volume(torch.cat([image, target], dim=0), grid)
    return warped[: image.shape[0]], warped[image.shape[0]:]


def warp_volume(volume: torch.Tensor, grid: torch.Tensor, pieces: int | None = None) -> torch.Tensor:
    """``grid_sample`` of ``volume`` (C, D, H, W) at ``grid`` (1, D, H, W, 3), outside the volume 0
    (air after windowing for the image, background for the target).

    PyTorch's CPU ``grid_sample`` shares its work among threads by batch item only, so one volume
    ran on one core. The output's depth is cut into one slab a thread, each slab a batch item
    over the same (expanded, not copied) input: the same values, 1.5-1.8x the samples/s on 2 cores
    for 8 channels at 64^3 (the last line of ``python -m tooling.bench.stage1``). ``pieces``: the
    number of slabs (default: torch's threads on CPU, else 1; 1 if it does not divide the depth).
    """
    depth = grid.shape[1]
    if pieces is None:
        pieces = torch.get_num_threads() if volume.device.type == "cpu" else 1
    if pieces < 2 or depth % pieces:
        pieces = 1
    slabs = grid.reshape(pieces, depth // pieces, *grid.shape[2:])
    warped = F.grid_sample(volume[None].expand(pieces, *volume.shape), slabs, mode="bilinear",
                           padding_mode="zeros", align_corners=False)
    return warped.permute(1, 0, 2, 3, 4).reshape(volume.shape[0], depth, *warped.shape[3:])


def intensity_transform(image: torch.Tensor) -> torch.Tensor:
    """Contrast, brightness, gamma and noise jitter on a [0, 1] image."""
    image = image * _rand(0.9, 1.1) + _rand(-0.05, 0.05)
    image = image.clamp(0, 1) ** _rand(0.8, 1.25)
    image = image + torch.randn_like(image) * _rand(0.0, 0.03)
    return image.clamp(0, 1)


def augment_pair(image: torch.Tensor, target: torch.Tensor, cfg: AugmentConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """All stage-1 augmentations for one sample; shapes are kept."""
    if torch.rand(()).item() < cfg.flip_p:  # left-right (W)
        image, target = image.flip(3), target.flip(3)
    # Front-back (H); never D. No draw when off, so the random numbers match a left-right-only run.
    if cfg.flip_ap_p > 0 and torch.rand(()).item() < cfg.flip_ap_p:
        image, target = image.flip(2), target.flip(2)
    image, target = spatial_transform(image, target, cfg)
    if torch.rand(()).item() < cfg.intensity_p:
        image = intensity_transform(image)
    return image.contiguous(), target.clamp(0, 1).contiguous()


def augment_batch(image: torch.Tensor, target: torch.Tensor, cfg: AugmentConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`augment_pair` on every sample of a batch (B, C, D, H, W) / (B, K, D, H, W), each with
    draws of its own, on the batch's device."""
    pairs = [augment_pair(one_image, one_target, cfg) for one_image, one_target in zip(image, target)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def mixup(image: torch.Tensor, target: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch mixup with probability ``p`` (image and soft target mixed alike)."""
    if image.shape[0] < 2 or torch.rand(()).item() >= p:
        return image, target
    lam = float(torch.distributions.Beta(1.0, 1.0).sample())
    perm = torch.randperm(image.shape[0], device=image.device)
    return lam * image + (1 - lam) * image[perm], lam * target + (1 - lam) * target[perm]
