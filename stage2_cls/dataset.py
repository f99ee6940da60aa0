"""Stage-2 samples: one (study, vertebra) stack read from the crop files.

Crop files are ``<work>/crops/<uid>.npz`` holding ``stacks`` uint8
(7, S, 6, H, W), ``missing`` bool (7,) and ``slices`` (7, S) (see
``stage2_cls.crop``). A sample is a dict of tensors:

- ``image`` uint8 (S, 6, H, W): kept as bytes so workers ship and the GPU
  receives 4x less data; :func:`prepare_images` (the one preprocessing step,
  shared with inference) turns a batch into float32 in [0, 1] on the device;
- ``label`` float32: 1 if that vertebra is fractured (train.csv);
- ``weight`` float32: the metric's weight of that label (2 positive, 1 negative);
- ``study_index`` int64 (row in the dataset's study list), ``vertebra`` int64
  (0..6 = C1..C7), ``missing`` bool (stage 1 did not find the vertebra);
- ``box_target`` float32 (S,) and ``box_known`` bool: slice-level fracture labels
  from ``train_bounding_boxes.csv`` where they are known (see
  ``stage2_cls.slice_labels``; all unknown unless the dataset is given the boxes).

Missing vertebrae: their stack is empty, so they are left out of training; in
validation they stay in (so every study has 7 rows) and the task predicts the
training prior for them; at inference do the same (``fill_missing``).

Reading: decoding one compressed study (31.6 MB at 224 px) costs tens of
milliseconds, and each of its 7 vertebrae is drawn at a random time, so each
worker keeps an LRU of decoded studies; with ``decoded_dir`` set, each study is
also decoded once to an uncompressed ``.npy`` and memory-mapped afterwards
(fast random access at the cost of disk: ~31.6 MB per study at 224 px).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from common.constants import VERTEBRA_WEIGHT_NEG, VERTEBRA_WEIGHT_POS, VERTEBRAE
from common.io import atomic_path

if TYPE_CHECKING:  # albumentations is only needed where augmentation runs
    from stage2_cls.augment import StackAugmenter

log = logging.getLogger(__name__)

N_VERTEBRAE = len(VERTEBRAE)


class CropFileError(FileNotFoundError):
    """A crop file that is missing or does not hold the expected arrays."""


def crop_path(crops_dir: str | Path, uid: str) -> Path:
    return Path(crops_dir) / f"{uid}.npz"


def available_crops(crops_dir: str | Path, uids: Sequence[str]) -> tuple[list[str], list[str]]:
    """(uids with a crop file, uids without one), each in the order given."""
    have, lack = [], []
    for uid in uids:
        (have if crop_path(crops_dir, uid).is_file() else lack).append(uid)
    return have, lack


def prepare_images(images: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """uint8 stacks (B, S, C, H, W) -> float32 in [0, 1] on ``device`` (training and inference)."""
    return images.to(device, non_blocking=True).float().div_(255.0)


def fill_missing(probs: np.ndarray, missing: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Vertebra probabilities (N, 7) with the rows' missing vertebrae replaced by ``prior`` (7,)."""
    return np.where(missing, np.broadcast_to(prior, probs.shape), probs)


class CropStore:
    """Random access to the vertebra stacks of a list of studies.

    ``stack(i, v)`` -> uint8 (S, C, H, W) of study ``uids[i]``, vertebra ``v``.
    The small ``missing`` flags (N, 7) are read up front.
    """

    def __init__(self, crops_dir: str | Path, uids: Sequence[str], lru_studies: int = 16,
                 decoded_dir: str | Path | None = None) -> None:
        self.crops_dir, self.uids = Path(crops_dir), list(uids)
        self.lru_studies = max(1, lru_studies)
        self.decoded_dir = Path(decoded_dir) if decoded_dir else None
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.missing = np.stack([self._read_member(uid, "missing").astype(bool) for uid in self.uids]) \
            if self.uids else np.zeros((0, N_VERTEBRAE), bool)
        if self.missing.shape[1:] != (N_VERTEBRAE,):
            raise CropFileError(f"{self.crops_dir}: 'missing' must have shape (7,), got {self.missing.shape[1:]}")

    def _read_member(self, uid: str, name: str, optional: bool = False) -> np.ndarray | None:
        """One array of a crop file; with ``optional``, None when the file lacks it."""
        path = crop_path(self.crops_dir, uid)
        if not path.is_file():
            raise CropFileError(f"crop file not found: {path} (run python -m stage2_cls.crop first)")
        try:
            with np.load(path) as data:
                if optional and name not in data.files:
                    return None
                return data[name]
        except KeyError:
            raise CropFileError(f"{path}: no array '{name}' (not a stage-2 crop file?)") from None
        except (OSError, ValueError) as exc:
            raise CropFileError(f"{path}: unreadable crop file ({exc}); delete it and rerun the crop step") from exc

    def _decode(self, i: int) -> np.ndarray:
        uid = self.uids[i]
        if self.decoded_dir is None:
            return self._read_stacks(uid)
        decoded = self.decoded_dir / f"{uid}.npy"
        source = crop_path(self.crops_dir, uid)
        if not decoded.is_file() or decoded.stat().st_mtime < source.stat().st_mtime:
            stacks = self._read_stacks(uid)
            with atomic_path(decoded) as tmp:  # several workers may race here: the rename settles it
                with open(tmp, "wb") as fh:
                    np.save(fh, stacks)
        return np.load(decoded, mmap_mode="r")

    def _read_stacks(self, uid: str) -> np.ndarray:
        stacks = self._read_member(uid, "stacks")
        if stacks.ndim != 5 or stacks.shape[0] != N_VERTEBRAE or stacks.dtype != np.uint8:
            raise CropFileError(f"{crop_path(self.crops_dir, uid)}: 'stacks' must be uint8 "
                                f"(7, S, C, H, W), got {stacks.dtype} {stacks.shape}")
        return stacks

    def study(self, i: int) -> np.ndarray:
        """All stacks of study ``i``: uint8 (7, S, C, H, W) (possibly memory-mapped)."""
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        stacks = self._decode(i)
        self._cache[i] = stacks
        while len(self._cache) > self.lru_studies:
            self._cache.popitem(last=False)
        return stacks

    @property
    def n_slices(self) -> int:
        """Slices per stack (read from the first study's file; 0 without studies)."""
        return int(self.study(0).shape[1]) if self.uids else 0

    def slice_index(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Study ``i``'s centre slice indices (7, S) (``slices``) and its InstanceNumber per slice
        index (None if its crop file predates them)."""
        uid = self.uids[i]
        numbers = self._read_member(uid, "instance_numbers", optional=True)
        return (self._read_member(uid, "slices").astype(np.int64),
                None if numbers is None else numbers.astype(np.int64))

    def stack(self, i: int, v: int) -> np.ndarray:
        return np.asarray(self.study(i)[v])

    def preload(self, max_bytes: float) -> bool:
        """Decode every study into memory if they fit in ``max_bytes``; True if done.

        Loaded before the loader forks its workers, the arrays are shared with
        them copy-on-write instead of being decoded again by each worker every epoch.
        """
        if not self.uids:
            return True
        first = self.study(0)
        if first.nbytes * len(self.uids) > max_bytes:
            return False
        self.lru_studies = max(self.lru_studies, len(self.uids))
        for i in range(len(self.uids)):
            self.study(i)
        return True


class VertebraDataset(Dataset):
    """(study, vertebra) samples; see the module docstring for the item layout.

    ``labels`` (N, 7) 0/1 per study and vertebra (None at inference: label 0).
    ``train=True`` drops missing vertebrae; ``augment`` is applied when given.
    """

    def __init__(self, store: CropStore, labels: np.ndarray | None, train: bool,
                 augment: "StackAugmenter | None" = None, positive_oversampling: float = 1.0,
                 box_slices: dict[str, np.ndarray] | None = None, context: int = 2) -> None:
        n = len(store.uids)
        self.store, self.augment = store, augment
        self.labels = np.zeros((n, N_VERTEBRAE), np.float32) if labels is None \
            else np.asarray(labels, np.float32)
        if self.labels.shape != (n, N_VERTEBRAE):
            raise ValueError(f"labels must have shape ({n}, 7), got {self.labels.shape}")
        keep = ~store.missing if train else np.ones_like(store.missing)
        self.items = np.argwhere(keep)  # (M, 2): study index, vertebra, study-major order
        # Fractured vertebrae are drawn ``positive_oversampling`` times as often and weigh that much
        # less in the loss: the expected loss is unchanged, but far more batches hold a fracture.
        positive = self.labels[self.items[:, 0], self.items[:, 1]] > 0.5
        if not positive_oversampling > 0:
            raise ValueError(f"positive_oversampling must be positive, got {positive_oversampling}")
        self.oversampling = float(positive_oversampling)
        self.sample_weights = np.where(positive, self.oversampling, 1.0) if train and self.oversampling != 1.0 \
            else None
        if train and store.missing.any():
            log.info("training skips %d missing vertebrae of %d", int(store.missing.sum()), store.missing.size)
        self.box_targets, self.box_known = self._box_labels(box_slices, context)

    def _box_labels(self, box_slices: dict[str, np.ndarray] | None,
                    context: int) -> tuple[np.ndarray | None, np.ndarray]:
        """Per item: slice targets (M, S) (None without boxes) and whether they are known (M,)
        (see ``stage2_cls.slice_labels``)."""
        known = np.zeros(len(self.items), bool)
        if box_slices is None:
            return None, known
        from stage2_cls.slice_labels import slice_targets
        targets = np.zeros((len(self.items), self.store.n_slices), np.float32)
        positive = self.labels[self.items[:, 0], self.items[:, 1]] > 0.5
        known[~positive] = True  # an intact vertebra shows no fracture on any slice
        lacking, index = [], {}
        for k in np.flatnonzero(positive):
            i, v = (int(x) for x in self.items[k])
            uid = self.store.uids[i]
            if uid not in box_slices or self.store.missing[i, v]:
                continue
            if i not in index:  # read once per study, not per vertebra
                index[i] = self.store.slice_index(i)
            centres, numbers = index[i]
            if numbers is None:
                lacking.append(uid)
                continue
            targets[k] = slice_targets(numbers, centres[v], context, box_slices[uid])
            known[k] = True
        if lacking:
            log.warning("%d crop files of studies with fracture boxes lack instance_numbers (cropped by an "
                        "older version; e.g. %s): no slice labels for them, recrop to use them",
                        len(set(lacking)), crop_path(self.store.crops_dir, lacking[0]))
        log.info("slice-level fracture labels: %d of %d fractured vertebrae (%d positive slices)",
                 int((known & positive).sum()), int(positive.sum()), int(targets.sum()))
        return targets, known

    def __len__(self) -> int:
        return len(self.items)

    def reseed(self, seed: int) -> None:
        """Reseed the augmentation (the training loop calls this per worker and chunk)."""
        if self.augment is not None:
            self.augment.reseed(seed)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        i, v = (int(x) for x in self.items[k])
        stack = self.store.stack(i, v)
        box_target = self.box_targets[k] if self.box_targets is not None else np.zeros(len(stack), np.float32)
        if self.augment is not None:
            stack, order = self.augment(stack, return_order=True)
            box_target = box_target[order]
        label = float(self.labels[i, v])
        weight = VERTEBRA_WEIGHT_POS if label > 0.5 else VERTEBRA_WEIGHT_NEG
        if self.sample_weights is not None and label > 0.5:
            weight /= self.oversampling
        return {"image": torch.from_numpy(np.ascontiguousarray(stack)),
                "label": torch.tensor(label, dtype=torch.float32),
                "weight": torch.tensor(weight, dtype=torch.float32),
                "study_index": torch.tensor(i, dtype=torch.int64),
                "vertebra": torch.tensor(v, dtype=torch.int64),
                "missing": torch.tensor(bool(self.store.missing[i, v])),
                "box_target": torch.from_numpy(np.ascontiguousarray(box_target)),
                "box_known": torch.tensor(bool(self.box_known[k]))}



class StudyDataset(Dataset):
    """Whole studies for the type-2 model. Items:

    - ``image`` uint8 (7, S, C, H, W): every vertebra's stack (zeros where missing);
    - ``labels`` float32 (8,): C1..C7 then patient_overall (zeros at inference);
    - ``missing`` bool (7,); ``order`` int64 (7,): which vertebra sits in each place
      (the identity unless the vertebra order was shuffled as an augmentation);
    - ``study_index`` int64.
    """

    def __init__(self, store: CropStore, labels: np.ndarray | None, augment: "StackAugmenter | None" = None,
                 shuffle_p: float = 0.0) -> None:
        n = len(store.uids)
        self.store, self.augment, self.shuffle_p = store, augment, shuffle_p
        self.labels = np.zeros((n, N_VERTEBRAE + 1), np.float32) if labels is None \
            else np.asarray(labels, np.float32)
        if self.labels.shape != (n, N_VERTEBRAE + 1):
            raise ValueError(f"labels must have shape ({n}, 8), got {self.labels.shape}")

    def __len__(self) -> int:
        return len(self.store.uids)

    def reseed(self, seed: int) -> None:
        if self.augment is not None:
            self.augment.reseed(seed)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        stacks = np.array(self.store.study(i))  # a copy: the augmentation writes into it
        missing = self.store.missing[i].copy()
        if self.augment is not None:
            for v in np.flatnonzero(~missing):
                stacks[v] = self.augment(stacks[v])
        order = np.arange(N_VERTEBRAE)
        if self.shuffle_p > 0 and np.random.random() < self.shuffle_p:
            order = np.random.permutation(N_VERTEBRAE)
        labels = self.labels[i].copy()
        labels[:N_VERTEBRAE] = labels[order]
        return {"image": torch.from_numpy(np.ascontiguousarray(stacks[order])),
                "labels": torch.from_numpy(labels),
                "missing": torch.from_numpy(missing[order]),
                "order": torch.from_numpy(order),
                "study_index": torch.tensor(i, dtype=torch.int64)}
