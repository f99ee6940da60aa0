"""Stage-1 data: the one preprocessing function, the on-disk cache, the dataset.

``preprocess_hu`` is used by training, validation, ``stage1_seg.predict`` and
``make_submission`` alike, so what the model sees cannot drift between them.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from common.config import to_dict
from common.dicom import load_study
from common.io import remove_stale_temporaries, save_npz_atomic
from common.nifti import load_rsna_mask
from common.parallel import worker_pool
from common.volume import body_square, crop_region, full_region, resample, resample_labels, window
from stage1_seg.config import PreprocessConfig

log = logging.getLogger(__name__)
AIR_HU = -1024  # what the cube is padded with where its region leaves the image


def cube_shape(cfg: PreprocessConfig) -> tuple[int, int, int]:
    """The cube's (D, H, W): ``depth`` (or ``size``) slices of ``size`` x ``size``."""
    return (cfg.depth or cfg.size, cfg.size, cfg.size)


def check_cube_shape(cfg: PreprocessConfig) -> None:
    """The encoder halves the cube five times: each edge must be a multiple of 32."""
    if cfg.size <= 0 or cfg.size % 32:
        raise ValueError(f"preprocess.size must be a positive multiple of 32, got {cfg.size}")
    if cfg.depth < 0 or cfg.depth % 32:
        raise ValueError(f"preprocess.depth must be a positive multiple of 32 (or 0: the same as size), got {cfg.depth}")


def cube_region(hu: np.ndarray, spacing: Sequence[float], cfg: PreprocessConfig) -> np.ndarray:
    """The region of the study (see ``common.volume``) that the cube covers."""
    if cfg.crop_mm > 0:
        return body_square(hu, spacing, cfg.crop_mm)
    return full_region(hu.shape)


def preprocess_hu(hu: np.ndarray, spacing: Sequence[float], cfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """HU volume ``(S, H, W)`` -> (windowed float32 cube :func:`cube_shape` in [0, 1], its region (6,)).

    The one preprocessing of training, validation, prediction and submission.
    """
    region = cube_region(hu, spacing, cfg)
    part = crop_region(hu, region, AIR_HU)
    volume = resample(torch.from_numpy(np.ascontiguousarray(part)).unsqueeze(0), cube_shape(cfg))[0]
    return window(volume, cfg.window_center, cfg.window_width).numpy(), region


def cache_dir(work_dir: str | Path, cfg: PreprocessConfig) -> Path:
    """``work/cache/stage1/<hash of the preprocessing settings>``."""
    settings = to_dict(cfg)
    if not cfg.depth:  # a cubic cube keeps the folder it had before depth existed
        settings.pop("depth")
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return Path(work_dir) / "cache" / "stage1" / f"size{cfg.size}{f'x{cfg.depth}' if cfg.depth else ''}-{key}"


def build_cache_entry(uid: str, data_dir: Path, out_dir: Path, cfg: PreprocessConfig) -> Path:
    """Decode one segmented study once and store its cube and per-class target fractions."""
    path = out_dir / f"{uid}.npz"
    if path.exists():
        return path
    study = load_study(data_dir / "train_images" / uid)
    labels = load_rsna_mask(_mask_path(data_dir, uid), study)
    image, region = preprocess_hu(study.hu, study.spacing, cfg)
    target = resample_labels(crop_region(labels, region, 0), cube_shape(cfg))
    save_npz_atomic(path, image=image.astype(np.float16), target=np.round(target * 255).astype(np.uint8),
                    region=region)
    return path


def _mask_path(data_dir: Path, uid: str) -> Path:
    for suffix in (".nii", ".nii.gz"):
        path = data_dir / "segmentations" / f"{uid}{suffix}"
        if path.exists():
            return path
    raise FileNotFoundError(f"no segmentation for {uid} in {data_dir / 'segmentations'}")


def _build_entry_star(args: tuple[str, Path, Path, PreprocessConfig]) -> Path:
    return build_cache_entry(*args)


def prepare_cache(uids: Sequence[str], data_dir: Path, work_dir: Path, cfg: PreprocessConfig,
                  workers: int = 1) -> Path:
    """Make sure every study in ``uids`` has a cache entry; returns the cache folder."""
    out_dir = cache_dir(work_dir, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    todo = [u for u in uids if not (out_dir / f"{u}.npz").exists()]
    if todo:
        log.info("caching %d of %d stage-1 studies in %s", len(todo), len(uids), out_dir)
        jobs = [(u, Path(data_dir), out_dir, cfg) for u in todo]
        bar = tqdm(total=len(jobs), desc="stage1 cache", dynamic_ncols=True)
        if workers > 1:
            with worker_pool(workers) as pool:
                for _ in pool.map(_build_entry_star, jobs):
                    bar.update()
        else:
            for job in jobs:
                _build_entry_star(job)
                bar.update()
        bar.close()
    return out_dir


def with_cervical_labels(uids: Sequence[str], cache: Path) -> list[str]:
    """The studies whose cached target holds some C1..C7; the others are named in a warning.

    A segmentation with only thoracic labels would train stage 1 on an empty target.
    """
    kept, empty = [], []
    for uid in uids:
        with np.load(Path(cache) / f"{uid}.npz") as data:
            (kept if data["target"].any() else empty).append(uid)
    if empty:
        log.warning("skipping %d segmentations without any C1-C7 label (only other labels): %s",
                    len(empty), ", ".join(empty))
    return kept


class SegDataset(Dataset):
    """Cached segmented studies. Items: ``image`` (C, D, H, W) float32 (the window repeated to
    ``in_channels``), ``target`` (7, D, H, W) float32. No augmentation: training augments each
    batch on the model's device (``stage1_seg.augment.augment_batch``)."""

    def __init__(self, uids: Sequence[str], cache: Path, in_channels: int = 1) -> None:
        self.uids, self.cache, self.in_channels = list(uids), Path(cache), in_channels

    def __len__(self) -> int:
        return len(self.uids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        with np.load(self.cache / f"{self.uids[index]}.npz") as data:
            image = torch.from_numpy(data["image"].astype(np.float32))[None]
            target = torch.from_numpy(data["target"].astype(np.float32) / 255.0)
        if self.in_channels > 1:
            image = image.expand(self.in_channels, -1, -1, -1).contiguous()
        return {"image": image, "target": target, "index": torch.tensor(index)}
