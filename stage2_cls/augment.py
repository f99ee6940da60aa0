"""Training augmentation of one vertebra stack, with albumentations.

A stack is uint8 (S, C, H, W): S slices, each with C channels (the last one is
the vertebra mask). Every geometric transform must move all S*C channels
together, otherwise the mask would drift off its CT slice and the neighbouring
slices off each other. So the stack is laid out as a single (H, W, S*C) image
and passed through one ``A.Compose`` call: albumentations samples the
parameters once per call and applies them to every channel (checked in the
tests). Intensity transforms (brightness/contrast, blur, noise) are applied to
the CT channels only, so the mask keeps its meaning.

Slice-order shuffle lives here too; mixup is a batch operation (see
:func:`mixup`) done in the loss step.
"""
from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import torch

from stage2_cls.config import AugmentConfig


def reseed_transforms(transform: A.BasicTransform | A.BaseCompose, seed: int) -> None:
    """Give an albumentations pipeline, and each transform in it, generators seeded from ``seed``.

    ``Compose.set_random_seed`` hands the same seed to every transform, so two
    transforms with the same probability would always fire together; each gets a
    seed of its own here.
    """
    sequence = np.random.SeedSequence(seed)
    transform.set_random_seed(int(sequence.generate_state(1)[0]))
    children = list(getattr(transform, "transforms", []))
    for child, child_sequence in zip(children, sequence.spawn(len(children))):
        reseed_transforms(child, int(child_sequence.generate_state(1)[0]))


class StackAugmenter:
    """Callable: uint8 stack (S, C, H, W) -> augmented uint8 stack of the same shape.

    Uses NumPy's global RNG for the shuffle and albumentations' own generators for
    the rest; the training loop reseeds both per worker and chunk (``reseed``).
    """

    def __init__(self, cfg: AugmentConfig) -> None:
        self.cfg = cfg
        self.geometric = A.Compose([
            A.HorizontalFlip(p=cfg.flip_p),
            A.VerticalFlip(p=cfg.flip_p),
            A.Affine(scale=(1 - cfg.scale, 1 + cfg.scale), translate_percent=(-cfg.shift, cfg.shift),
                     rotate=(-cfg.rotate_deg, cfg.rotate_deg), border_mode=cv2.BORDER_CONSTANT,
                     fill=0, p=cfg.ssr_p),
            A.OneOf([
                A.GridDistortion(num_steps=5, distort_limit=0.2, border_mode=cv2.BORDER_CONSTANT),
                A.OpticalDistortion(distort_limit=0.2, border_mode=cv2.BORDER_CONSTANT),
            ], p=cfg.distortion_p),
            A.CoarseDropout(num_holes_range=(1, 3), hole_height_range=(0.1, 0.3),
                            hole_width_range=(0.1, 0.3), fill=0, p=cfg.cutout_p),
        ])
        self.intensity = A.Compose([
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2,
                                       p=cfg.brightness_contrast_p),
            A.OneOf([
                A.GaussianBlur(blur_limit=(3, 5)),
                A.MotionBlur(blur_limit=(3, 5)),
                A.GaussNoise(std_range=(0.02, 0.06), per_channel=False),
            ], p=cfg.blur_noise_p),
        ])

    def reseed(self, seed: int) -> None:
        reseed_transforms(self.geometric, seed)
        reseed_transforms(self.intensity, seed + 1)

    def __call__(self, stack: np.ndarray, return_order: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """The augmented stack; with ``return_order`` also the slice order (S,) it now has."""
        if stack.ndim != 4 or stack.dtype != np.uint8:
            raise ValueError(f"expected a uint8 stack (S, C, H, W), got {stack.dtype} {stack.shape}")
        s, c, h, w = stack.shape
        image = np.ascontiguousarray(stack.reshape(s * c, h, w).transpose(1, 2, 0))  # (H, W, S*C)
        image = self.geometric(image=image)["image"]
        out = image.transpose(2, 0, 1).reshape(s, c, h, w).copy()
        if c > 1:
            # CT channels only: the mask channel (last) is a probability, not an intensity.
            ct = np.ascontiguousarray(out[:, :-1].reshape(s * (c - 1), h, w).transpose(1, 2, 0))
            ct = self.intensity(image=ct)["image"]
            out[:, :-1] = ct.transpose(2, 0, 1).reshape(s, c - 1, h, w)
        order = np.arange(s)
        if self.cfg.shuffle_p > 0 and np.random.random() < self.cfg.shuffle_p:
            order = np.random.permutation(s)
            out = out[order]
        return (out, order) if return_order else out


def mixup(images: torch.Tensor, alpha: float, generator: torch.Generator | None = None
          ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mix a batch with a permutation of itself.

    ``images`` (B, ...) -> (mixed images (B, ...), permutation (B,), lam). The
    loss is then ``lam * L(y) + (1 - lam) * L(y[perm])``, each term with its own
    metric weights, which equals the loss on linearly mixed labels.
    """
    lam = float(np.random.beta(alpha, alpha)) if alpha > 0 else 0.5
    perm = torch.randperm(images.shape[0], generator=generator, device="cpu").to(images.device)
    return lam * images + (1.0 - lam) * images[perm], perm, lam
