"""build_stacks on synthetic labelled volumes: slices, channels, mask, crop window."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from common.config import load_config
from common.volume import crop_region
from stage1_seg.boxes import boxes_from_labels
from stage2_cls.config import CropConfig, Stage2Config
from stage2_cls.stacks import build_stacks, centre_slices, square_window

S, H, W = 40, 64, 64


def crop_cfg(**changes) -> CropConfig:
    overrides = [f"crop.{k}={v}" for k, v in {"n_slices": 15, "size": 32, **changes}.items()]
    return load_config(Stage2Config, None, overrides).crop


def empty_boxes() -> np.ndarray:
    return np.full((7, 6), -1, dtype=np.int64)


def no_probs(shape=(7, S // 2, H // 2, W // 2)) -> np.ndarray:
    return np.zeros(shape, dtype=np.uint8)


def test_shapes_dtype_and_even_centre_slices():
    hu = np.zeros((S, H, W), dtype=np.int16)
    boxes = empty_boxes()
    boxes[2] = [5, 30, 10, 40, 12, 44]
    boxes[6] = [33, 36, 10, 40, 12, 44]  # 4 slices for 15 centres: repeats
    res = build_stacks(hu, no_probs(), boxes, crop_cfg())
    assert res.stacks.shape == (7, 15, 6, 32, 32) and res.stacks.dtype == np.uint8
    assert res.missing.tolist() == [True, True, False, True, True, True, False]
    assert res.slices[2, 0] == 5 and res.slices[2, -1] == 30
    assert np.all(np.diff(res.slices[2]) >= 1) and np.all(np.diff(res.slices[2]) <= 2)
    assert np.array_equal(res.slices[2], np.round(np.linspace(5, 30, 15)).astype(int))
    assert set(res.slices[6].tolist()) == {33, 34, 35, 36} and res.slices[6, -1] == 36
    assert np.all(res.slices[0] == -1)


def test_ct_channels_are_neighbouring_slices_clamped_at_study_ends():
    # Each slice's HU is 10 * its index; window [0, 400] maps it to 255 * z / 40.
    hu = np.broadcast_to((np.arange(S) * 10)[:, None, None], (S, H, W)).astype(np.int16)
    boxes = empty_boxes()
    boxes[0] = [0, 12, 20, 40, 20, 40]   # touches the first slice
    boxes[1] = [27, S - 1, 20, 40, 20, 40]  # touches the last slice
    res = build_stacks(hu, no_probs(), boxes, crop_cfg(window_center=200, window_width=400))
    for c in (0, 1):
        for i, z in enumerate(res.slices[c]):
            for k, dz in enumerate(range(-2, 3)):
                expected = round(255 * np.clip(z + dz, 0, S - 1) / 40)
                got = res.stacks[c, i, k]
                assert np.all(np.abs(got.astype(int) - expected) <= 1), (c, z, dz)
    # Clamping really happened: the first item of C1 repeats slice 0 in channels 0..2.
    assert np.array_equal(res.stacks[0, 0, 0], res.stacks[0, 0, 2])


def labelled_volume() -> tuple[np.ndarray, np.ndarray]:
    """HU and labels: C1 block over slices 4..15, C2 over 16..31, same xy, other levels absent."""
    labels = np.zeros((S, H, W), dtype=np.uint8)
    labels[4:16, 20:36, 24:40] = 1
    labels[16:32, 22:38, 24:42] = 2
    hu = np.where(labels > 0, 500, 0).astype(np.int16)
    return hu, labels


def lowres_probs(labels: np.ndarray, factor: int = 2) -> np.ndarray:
    """One-hot * 255 block-averaged by ``factor`` on every axis: (7, S/f, H/f, W/f) uint8."""
    onehot = np.stack([labels == c + 1 for c in range(7)]).astype(np.float32)
    d, h, w = (n // factor for n in labels.shape)
    pooled = onehot.reshape(7, d, factor, h, factor, w, factor).mean(axis=(2, 4, 6))
    return np.round(pooled * 255).astype(np.uint8)


def test_mask_channel_is_this_vertebras_mask_from_lowres_probs():
    hu, labels = labelled_volume()
    boxes = boxes_from_labels(labels, "uid")
    res = build_stacks(hu, lowres_probs(labels), boxes, crop_cfg(margin=0.5))
    assert res.missing.tolist() == [False, False] + [True] * 5
    for c in (0, 1):
        z_lo, z_hi = (4, 15) if c == 0 else (16, 31)
        assert res.slices[c, 0] == z_lo and res.slices[c, -1] == z_hi
        mask = res.stacks[c, 1:-1, 5].astype(int)  # inner centres: away from z edges
        centre = mask[:, 12:20, 12:20]
        assert centre.min() >= 200, c  # inside the vertebra
        # The crop is the box grown by 50% on each side: its border is outside.
        assert mask[:, :3, :].max() <= 30 and mask[:, :, -3:].max() <= 30
    # C2's stack must not show C1's mask: at C2's first centre (slice 16) C1 is absent.
    first_c2 = res.stacks[1, 0, 5].astype(int)
    assert first_c2[12:20, 12:20].mean() > 100


def test_probs_covering_a_region_give_the_same_mask_channel():
    """Stage-1 probabilities of a crop of the study (a region, padded outside) sit where they belong."""
    hu, labels = labelled_volume()
    boxes = boxes_from_labels(labels, "uid")
    whole = build_stacks(hu, lowres_probs(labels), boxes, crop_cfg(margin=0.5))
    region = np.array([0, S, -8, H - 24, 6, W + 10])  # reaches outside the study on two sides
    part = crop_region(labels, region, 0)
    part = part[:, : part.shape[1] // 2 * 2, : part.shape[2] // 2 * 2]
    region[3], region[5] = region[2] + part.shape[1], region[4] + part.shape[2]
    cropped = build_stacks(hu, lowres_probs(part), boxes, crop_cfg(margin=0.5), region)
    assert np.array_equal(cropped.stacks[:, :, :5], whole.stacks[:, :, :5])  # CT channels: untouched
    diff = np.abs(cropped.stacks[:2, :, 5].astype(int) - whole.stacks[:2, :, 5].astype(int))
    assert diff.mean() < 3 and np.percentile(diff, 99) <= 64  # only interpolation at the mask's edges


def test_float_probs_match_uint8_probs():
    hu, labels = labelled_volume()
    probs = lowres_probs(labels)
    boxes = boxes_from_labels(labels, "uid")
    a = build_stacks(hu, probs, boxes, crop_cfg())
    b = build_stacks(hu, probs.astype(np.float32) / 255.0, boxes, crop_cfg())
    assert np.abs(a.stacks.astype(int) - b.stacks.astype(int)).max() <= 1


def test_dataframe_and_array_boxes_agree():
    hu, labels = labelled_volume()
    frame = boxes_from_labels(labels, "uid")
    array = frame[["z0", "z1", "y0", "y1", "x0", "x1"]].to_numpy()
    a = build_stacks(hu, lowres_probs(labels), frame, crop_cfg())
    b = build_stacks(hu, lowres_probs(labels), array, crop_cfg())
    assert np.array_equal(a.stacks, b.stacks) and np.array_equal(a.slices, b.slices)
    shuffled = frame.sample(frac=1.0, random_state=0)  # rows found by name, not position
    assert np.array_equal(build_stacks(hu, lowres_probs(labels), shuffled, crop_cfg()).stacks, a.stacks)
    with pytest.raises(ValueError, match="several studies"):
        build_stacks(hu, lowres_probs(labels), pd.concat([frame, frame.assign(StudyInstanceUID="x")]),
                     crop_cfg())


def test_marker_inside_the_box_appears_at_its_place_in_the_crop():
    hu = np.full((S, H, W), -1000, dtype=np.int16)  # air: 0 in the default window
    hu[:, 22:24, 36:38] = 1500  # marker near the top-right corner of the box
    hu[:, 2:4, 2:4] = 1500  # marker far outside the crop window
    box = np.array([10, 20, 20, 30, 20, 40])  # 10 rows x 20 columns: square side 26
    boxes = empty_boxes()
    boxes[3] = box
    res = build_stacks(hu, no_probs(), boxes, crop_cfg(size=52, margin=0.15))
    top, left, side = square_window(box[2:], 0.15, (H, W))
    assert side == 26 and (top, left) == (12, 17)  # square, centred on the box
    image = res.stacks[3, 7, 2].astype(int)
    ys, xs = np.nonzero(image > 128)
    # Each original pixel is 2 x 2 output pixels (52 / 26).
    assert ys.min() >= (22 - top) * 2 - 1 and ys.max() <= (24 - top) * 2
    assert xs.min() >= (36 - left) * 2 - 1 and xs.max() <= (38 - left) * 2
    assert image.sum() < 5 * 255 * 16  # only one marker: the far one is outside


def test_missing_vertebra_gives_zero_stack_and_flag():
    hu, labels = labelled_volume()
    frame = boxes_from_labels(labels, "uid")
    assert (frame["status"] == "missing").sum() == 5
    res = build_stacks(hu, lowres_probs(labels), frame, crop_cfg())
    assert res.missing.tolist() == [False, False, True, True, True, True, True]
    assert res.stacks[2:].max() == 0 and np.all(res.slices[2:] == -1)
    assert res.stacks[:2].max() > 0
    empty = build_stacks(hu, lowres_probs(labels), frame.iloc[:0], crop_cfg())
    assert empty.missing.all() and empty.stacks.max() == 0


def test_minmax_scales_each_stack_item_to_full_range():
    rng = np.random.default_rng(0)
    hu = rng.integers(100, 111, size=(S, H, W)).astype(np.int16)  # 10 HU of contrast only
    boxes = empty_boxes()
    boxes[4] = [5, 25, 10, 50, 10, 50]
    windowed = build_stacks(hu, no_probs(), boxes, crop_cfg())
    assert np.ptp(windowed.stacks[4, :, :5]) <= 3  # the HU window flattens it
    res = build_stacks(hu, no_probs(), boxes, crop_cfg(minmax=True))
    ct = res.stacks[4, :, :5]
    assert np.all(ct.min(axis=(1, 2, 3)) == 0) and np.all(ct.max(axis=(1, 2, 3)) == 255)


def test_vertebra_at_image_edge_and_degenerate_boxes():
    hu = np.full((S, 40, W), 1000, dtype=np.int16)  # not square: 40 rows, 64 columns
    boxes = empty_boxes()
    boxes[0] = [0, 10, 0, 12, 0, 12]  # image corner: the window shifts inside
    boxes[1] = [5, 9, 0, 40, 0, 64]  # whole image: taller than the image, padded with air
    boxes[2] = [5, 5, 10, 10, 20, 20]  # zero-size box on one slice
    boxes[3] = [20, 30, 30, 30, 10, 50]  # zero height
    res = build_stacks(hu, no_probs((7, 20, 20, 32)), boxes, crop_cfg())
    assert not res.missing[:4].any() and res.missing[4:].all()
    assert square_window(boxes[0, 2:], 0.15, (40, W))[:2] == (0, 0)
    assert res.stacks[0, :, :5].min() > 0  # no air: the window stayed inside the image
    whole = res.stacks[1, 0, 2].astype(int)
    assert whole[0].max() == 0 and whole[-1].max() == 0  # padded rows above and below
    assert whole[16].min() > 0  # middle rows are the image
    assert np.all(res.slices[2] == 5)


def test_centre_slices_and_bad_inputs():
    assert centre_slices(3, 3, 4).tolist() == [3, 3, 3, 3]
    assert centre_slices(0, 28, 15).tolist() == list(range(0, 29, 2))
    hu = np.zeros((S, H, W), dtype=np.int16)
    with pytest.raises(ValueError, match="probs"):
        build_stacks(hu, np.zeros((6, 4, 4, 4), np.uint8), empty_boxes(), crop_cfg())
    with pytest.raises(ValueError, match="boxes"):
        build_stacks(hu, no_probs(), np.zeros((7, 4)), crop_cfg())


def test_real_ct_mask_channel_lies_on_bone(real_ct_dir, real_ct_study):
    """On scanner data the mask channel (from 4x-coarser probabilities) covers bright bone."""
    from common.nifti import load_rsna_mask

    labels = load_rsna_mask(real_ct_dir.parent / "segmentation.nii.gz", real_ct_study)
    spine = np.where(labels == 32, 1, np.where(labels == 33, 2, 0)).astype(np.uint8)  # T12, T11
    s, h, w = spine.shape
    onehot = np.stack([spine == c + 1 for c in range(7)]).astype(np.float32)
    probs = np.round(onehot.reshape(7, s, h // 4, 4, w // 4, 4).mean(axis=(3, 5)) * 255).astype(np.uint8)
    res = build_stacks(real_ct_study.hu, probs, boxes_from_labels(spine, "real"), crop_cfg(size=64))
    assert res.missing.tolist() == [False, False] + [True] * 5
    for c in (0, 1):
        ct, mask = res.stacks[c, :, 2].astype(float), res.stacks[c, :, 5]
        inside, outside = ct[mask > 200].mean(), ct[mask < 20].mean()
        assert inside > outside + 20, (c, inside, outside)
