"""Stage-1 pieces that need no dataset: model, loss, Dice, augmentation, boxes, resampling."""
import warnings

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from common.volume import crop_region, resample, resample_labels
from stage1_seg.augment import augment_pair, mixup
from stage1_seg.boxes import boxes_from_labels, vertebra_boxes, z_iou
from stage1_seg.config import AugmentConfig, ModelConfig, PreprocessConfig, Stage1Config
from stage1_seg.data import preprocess_hu
from stage1_seg.model import build_model, class_probs
from stage1_seg.train import dice_counts, dice_metrics, seg_loss, supervised_loss


def test_model_weights_file(tmp_path):
    # A 2D timm file for the encoder's timm twin: every tensor ends up in the 3D encoder, kernels inflated.
    torch.manual_seed(1)
    source = timm.create_model("tf_efficientnetv2_b0", pretrained=False).state_dict()
    torch.save(source, tmp_path / "enc2d.pt")
    cfg = ModelConfig(encoder="tu-tf_efficientnetv2_b0", in_channels=3, decoder_channels=(32, 16, 16, 8, 8),
                      weights_file=str(tmp_path / "enc2d.pt"))
    loaded = build_model(cfg).encoder.model.state_dict()
    for key, value in loaded.items():
        if value.ndim == 5:
            assert torch.allclose(value.sum(2), source[key], atol=1e-6), key
        else:
            assert torch.equal(value, source[key]), key
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        build_model(ModelConfig(encoder="tu-tf_efficientnetv2_b0", weights_file=str(tmp_path / "nope.pt")))


def test_dice_is_computed_per_class():
    target = torch.zeros(1, 7, 4, 4, 4)
    target[0, 0, :2] = 1  # C1 present, perfectly predicted
    target[0, 1, 2:] = 1  # C2 present, missed entirely
    probs = torch.zeros_like(target)
    probs[0, 0, :2] = 0.9
    metrics = dice_metrics(dice_counts(probs, target))
    assert metrics["dice_C1"] == pytest.approx(1.0)
    assert metrics["dice_C2"] == pytest.approx(0.0)
    # classes absent from truth and prediction count as perfect
    assert metrics["dice_C3"] == pytest.approx(1.0)
    assert metrics["mean_dice"] == pytest.approx(6 / 7)


def test_losses_prefer_the_right_answer():
    target = (torch.rand(2, 7, 8, 8, 8) > 0.7).float()
    good = (target * 2 - 1) * 6
    bad = -good
    dice_only = [seg_loss(x, target, 0.0, 1.0) for x in (good, bad)]
    assert dice_only[0] < 0.05 < 0.9 < dice_only[1]
    assert seg_loss(good, target, 0.5, 0.5) < seg_loss(bad, target, 0.5, 0.5)


def test_softmax_head_loss_prefers_the_right_answer_and_gives_seven_maps():
    labels = torch.randint(0, 8, (2, 8, 8, 8))                    # 0 background, 1..7 = C1..C7
    onehot = F.one_hot(labels, 8).permute(0, 4, 1, 2, 3).float()
    target = onehot[:, 1:]
    good, bad = onehot * 12 - 6, (1 - onehot) * 12 - 6
    losses = [seg_loss(x, target, 0.5, 0.5, "softmax") for x in (good, bad)]
    assert losses[0] < 0.05 < 2.0 < losses[1]
    probs = class_probs(good, "softmax")
    assert probs.shape == (2, 7, 8, 8, 8) and float(probs.sum(1).max()) <= 1 + 1e-6
    assert torch.equal(probs.argmax(1)[labels > 0] + 1, labels[labels > 0])
    assert float(probs.sum(1)[labels == 0].max()) < 0.01            # background is nobody's vertebra
    with pytest.raises(ValueError, match="model.head"):
        build_model(ModelConfig(head="tanh"))


SMALL = dict(encoder="tu-tf_efficientnetv2_b0", decoder_channels=(16, 16, 8, 8, 8))


@pytest.mark.parametrize("head", ["sigmoid", "softmax"])
def test_prior_sets_the_initial_foreground_probability(head):
    torch.manual_seed(0)
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        default = class_probs(build_model(ModelConfig(head=head, **SMALL)).eval()(x), head)
        primed = class_probs(build_model(ModelConfig(head=head, prior=0.002, **SMALL)).eval()(x), head)
    assert float(default.mean()) > 0.1                     # the layer's own start: far from the data
    assert 0.0005 < float(primed.mean()) < 0.01             # starts near the prior asked for
    with pytest.raises(ValueError, match="model.prior"):
        build_model(ModelConfig(prior=0.5, **SMALL))


def test_deep_supervision_trains_coarse_heads_and_leaves_inference_alone():
    torch.manual_seed(0)
    cfg = ModelConfig(deep_supervision=2, **SMALL)
    model = build_model(cfg)
    plain = build_model(ModelConfig(**SMALL))
    # the extra heads are the only extra weights: checkpoints without them keep their keys
    assert set(model.state_dict()) - set(plain.state_dict()) == {
        "aux_heads.0.weight", "aux_heads.0.bias", "aux_heads.1.weight", "aux_heads.1.bias"}
    x = torch.rand(2, 1, 32, 32, 32)
    logits, coarse = model.train()(x)
    assert logits.shape == (2, 7, 32, 32, 32) and [c.shape[2:] for c in coarse] == [(16,) * 3, (8,) * 3]
    assert model.eval()(x).shape == (2, 7, 32, 32, 32)
    # the loss weighs the coarse outputs against the averaged-down target, and they get gradients
    target = torch.zeros(2, 7, 32, 32, 32)
    target[:, 3, 8:24, 8:24, 8:24] = 1
    stage1 = Stage1Config(model=cfg)
    loss = supervised_loss(model.train()(x), target, stage1)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.aux_heads.parameters())
    perfect = (target * 2 - 1) * 8
    coarse_right = [F.adaptive_avg_pool3d(perfect, s) for s in (16, 8)]
    coarse_wrong = [-c for c in coarse_right]
    assert supervised_loss((perfect, coarse_right), target, stage1) < 0.05
    assert supervised_loss((perfect, coarse_wrong), target, stage1) > 0.3
    assert supervised_loss(perfect, target, stage1) == seg_loss(perfect, target, 0.5, 0.5)
    with pytest.raises(ValueError, match="deep_supervision"):
        build_model(ModelConfig(deep_supervision=5, **SMALL))


def test_half_resolution_head_keeps_the_output_size_and_drops_only_the_last_block():
    torch.manual_seed(0)
    full = build_model(ModelConfig(**SMALL))
    half = build_model(ModelConfig(head_stride=2, deep_supervision=2, prior=0.01, **SMALL))
    # the full-resolution decoder block is gone, the head reads the 1/2-resolution features
    assert len(half.decoder.blocks) == len(full.decoder.blocks) - 1
    assert not any(k.startswith("decoder.blocks.4.") for k in half.state_dict())
    assert half.segmentation_head[0].in_channels == SMALL["decoder_channels"][-2]
    x = torch.rand(2, 1, 32, 32, 32)
    logits, coarse = half.train()(x)
    assert logits.shape == (2, 7, 32, 32, 32) and [c.shape[2:] for c in coarse] == [(8,) * 3, (4,) * 3]
    with torch.no_grad():
        out = half.eval()(x)
    assert out.shape == (2, 7, 32, 32, 32)
    assert 0.005 < float(torch.sigmoid(out).mean()) < 0.02             # the prior reaches the new head
    # upsampled from 16^3: neighbouring voxel pairs differ far less than a random map's would
    assert (out[..., 1:] - out[..., :-1]).abs().mean() < 0.3 * out.std()   # 0.4 with head_stride 1
    target = torch.zeros(2, 7, 32, 32, 32)
    target[:, 2, 8:24, 8:24, 8:24] = 1
    loss = supervised_loss(half.train()(x), target, Stage1Config(model=ModelConfig(head_stride=2, **SMALL)))
    loss.backward()
    assert half.segmentation_head[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="head_stride"):
        build_model(ModelConfig(head_stride=4, **SMALL))
    with pytest.raises(ValueError, match="deep_supervision"):   # one decoder output fewer to supervise
        build_model(ModelConfig(head_stride=2, deep_supervision=4, **SMALL))


def test_loss_at_head_scores_the_half_resolution_logits_against_the_averaged_down_target():
    torch.manual_seed(0)
    cfg = ModelConfig(head_stride=2, deep_supervision=1, prior=0.01, **SMALL)
    upsampled = build_model(cfg)
    at_head = build_model(ModelConfig(head_stride=2, deep_supervision=1, prior=0.01, loss_at_head=True, **SMALL))
    assert set(at_head.state_dict()) == set(upsampled.state_dict())     # checkpoints load either way
    at_head.load_state_dict(upsampled.state_dict())
    x = torch.rand(2, 1, 32, 32, 32)
    logits, coarse = at_head.train()(x)
    assert logits.shape == (2, 7, 16, 16, 16) and [c.shape[2:] for c in coarse] == [(8,) * 3]
    full, full_coarse = upsampled.train()(x)
    # the same network: upsampling the head's logits gives the other model's training output
    assert torch.allclose(F.interpolate(logits, size=(32,) * 3, mode="trilinear", align_corners=False), full,
                          atol=1e-5)
    assert torch.allclose(coarse[0], full_coarse[0], atol=1e-5)
    with torch.no_grad():   # validation and inference see full-size logits either way
        assert torch.allclose(at_head.eval()(x), upsampled.eval()(x), atol=1e-5)
    # the loss averages the target down to the logits it is given, as for the coarse outputs
    target = torch.zeros(2, 7, 32, 32, 32)
    target[:, 4, 9:23, 7:25, 8:24] = 1
    stage1 = Stage1Config(model=ModelConfig(head_stride=2, loss_at_head=True, **SMALL))
    half_truth = F.adaptive_avg_pool3d(target, (16,) * 3)
    assert torch.equal(supervised_loss(logits, target, stage1), seg_loss(logits, half_truth, 0.5, 0.5))
    perfect = (half_truth * 2 - 1) * 8
    assert supervised_loss(perfect, target, stage1) < supervised_loss(-perfect, target, stage1) - 0.3
    loss = supervised_loss(at_head.train()(x), target, stage1)
    loss.backward()
    assert at_head.segmentation_head[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="loss_at_head needs model.head_stride 2"):
        build_model(ModelConfig(loss_at_head=True, **SMALL))


@pytest.mark.parametrize("threads,depth", [(2, 16), (2, 15), (1, 16), (4, 16)])
def test_warp_in_depth_slabs_gives_grid_samples_values(threads, depth):
    from stage1_seg.augment import _elastic_offsets, warp_volume
    torch.manual_seed(1)
    volume = torch.rand(3, depth, 12, 10)
    theta = torch.tensor([[0.9, -0.3, 0.0, 0.1], [0.3, 0.9, 0.0, -0.05], [0.0, 0.0, 1.1, 0.2]])
    grid = F.affine_grid(theta[None], [1, 1, depth, 12, 10], align_corners=False)
    grid = grid + _elastic_offsets((depth, 12, 10), 0.05)
    expected = F.grid_sample(volume[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        warped = warp_volume(volume, grid)
    finally:
        torch.set_num_threads(before)
    assert warped.shape == volume.shape
    assert torch.equal(warped, expected)


def test_augment_keeps_shapes_and_alignment():
    torch.manual_seed(0)
    image = torch.zeros(1, 16, 32, 32)
    image[0, 4:12, 8:20, 10:22] = 1.0
    target = torch.zeros(7, 16, 32, 32)
    target[2] = image[0]
    cfg = AugmentConfig(flip_p=1.0, affine_p=1.0, elastic_p=1.0, intensity_p=0.0)
    for _ in range(5):
        img, tgt = augment_pair(image, target, cfg)
        assert img.shape == image.shape and tgt.shape == target.shape
        # the label still sits on the object after the joint warp
        assert torch.allclose(img[0], tgt[2], atol=1e-5)
        assert tgt[[0, 1, 3, 4, 5, 6]].abs().max() == 0


def test_augment_batch_draws_each_sample_on_its_own_and_keeps_it_aligned():
    from stage1_seg.augment import augment_batch
    image = torch.zeros(1, 16, 32, 32)
    image[0, 4:12, 8:20, 10:22] = 1.0
    target = torch.zeros(7, 16, 32, 32)
    target[2] = image[0]
    batch_image, batch_target = image.expand(3, -1, -1, -1, -1), target.expand(3, -1, -1, -1, -1)
    cfg = AugmentConfig(flip_p=0.5, affine_p=1.0, elastic_p=1.0, intensity_p=0.0)
    torch.manual_seed(5)
    img, tgt = augment_batch(batch_image, batch_target, cfg)
    assert img.shape == batch_image.shape and tgt.shape == batch_target.shape
    assert not torch.equal(img[0], img[1]) and not torch.equal(img[1], img[2])   # three samples, three draws
    assert torch.allclose(img[:, 0], tgt[:, 2], atol=1e-5)                      # each label on its object
    # the same draws, in the same order, as augmenting the samples one by one (as the loader did)
    torch.manual_seed(5)
    one_by_one = [augment_pair(image, target, cfg) for _ in range(3)]
    assert torch.equal(img, torch.stack([p[0] for p in one_by_one]))
    assert torch.equal(tgt, torch.stack([p[1] for p in one_by_one]))


def test_training_batch_augments_mixes_and_repeats_the_window_reproducibly():
    from common.trainer import seed_everything
    from stage1_seg.train import training_batch
    cfg = Stage1Config(model=ModelConfig(in_channels=3, **SMALL))
    batch = {"image": torch.rand(2, 1, 16, 16, 16), "target": (torch.rand(2, 7, 16, 16, 16) > 0.9).float()}
    draws = []
    for seed in (11, 11, 12):   # the trainer seeds every period between validations like this
        seed_everything(seed)
        draws.append(training_batch(cfg, batch, torch.device("cpu")))
    image, target = draws[0]
    assert image.shape == (2, 3, 16, 16, 16) and target.shape == (2, 7, 16, 16, 16)
    assert torch.equal(image[:, 0], image[:, 2])                 # the augmented window, repeated
    assert not torch.equal(image[:, :1], batch["image"])         # augmented
    assert torch.equal(draws[1][0], image) and torch.equal(draws[1][1], target)   # a rerun draws the same
    assert not torch.equal(draws[2][0], image)                    # another period draws anew


def test_no_flip_along_head_feet_axis():
    image = torch.zeros(1, 8, 8, 8)
    image[0, 0] = 1.0  # the top slice marked
    cfg = AugmentConfig(flip_p=1.0, flip_ap_p=1.0, affine_p=0.0, elastic_p=0.0, intensity_p=0.0)
    img, _ = augment_pair(image, torch.zeros(7, 8, 8, 8), cfg)
    assert img[0, 0].min() == 1.0 and img[0, 1:].max() == 0.0


def test_flips_are_left_right_unless_front_back_is_asked():
    image = torch.zeros(1, 4, 8, 8)
    image[0, 2, 1, 1] = 1.0   # one voxel: slice 2, row 1 (front), column 1
    target = torch.zeros(7, 4, 8, 8)
    target[3] = image[0]
    still = dict(affine_p=0.0, elastic_p=0.0, intensity_p=0.0)

    def where(cfg):
        img, tgt = augment_pair(image, target, AugmentConfig(**still, **cfg))
        assert torch.equal(img[0], tgt[3])   # the label moves with the image
        return tuple(int(i) for i in torch.nonzero(img[0])[0])

    assert where({"flip_p": 1.0}) == (2, 1, 6)                       # columns mirrored, rows kept
    assert where({"flip_p": 0.0, "flip_ap_p": 1.0}) == (2, 6, 1)     # rows mirrored when asked
    assert where({"flip_p": 1.0, "flip_ap_p": 1.0}) == (2, 6, 6)
    assert AugmentConfig().flip_ap_p == 0.0
    torch.manual_seed(0)
    rows = {where({})[1] for _ in range(20)}   # the defaults: the front stays in front
    assert rows == {1}


def test_mixup_mixes_image_and_target_alike():
    torch.manual_seed(3)
    image = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1, 1).expand(4, 1, 4, 4, 4) / 3
    target = image.expand(4, 7, 4, 4, 4)  # the target is the image: mixed alike, they stay equal
    mixed_img, mixed_tgt = mixup(image, target, p=1.0)
    assert not torch.allclose(mixed_img, image)
    assert torch.allclose(mixed_tgt, mixed_img.expand_as(mixed_tgt))
    # each sample is a convex mix of exactly two samples: lam * own + (1 - lam) * another
    values = mixed_img[:, 0, 0, 0, 0]
    assert ((values >= 0) & (values <= 1)).all()
    untouched = mixup(image, target, p=0.0)
    assert untouched[0] is image and untouched[1] is target


def test_resampling_labels_never_averages_ids():
    labels = np.zeros((20, 40, 40), np.uint8)
    labels[:10] = 1
    labels[10:] = 7
    fractions = resample_labels(labels, (8, 16, 16))
    assert fractions.shape == (7, 8, 16, 16)
    assert np.allclose(fractions.sum(0), 1.0, atol=1e-5)
    assert fractions[3:6].max() == 0  # no C4..C6 appears between C1 and C7
    grown = resample(torch.ones(1, 4, 4, 4), (8, 6, 2))
    assert grown.shape == (1, 8, 6, 2) and torch.allclose(grown, torch.ones_like(grown))


def test_preprocess_window_range():
    hu = np.full((10, 20, 20), -1000, np.int16)
    hu[:, 5:15, 5:15] = 1500
    cube, region = preprocess_hu(hu, (1.0, 1.0, 1.0), PreprocessConfig(size=32, crop_mm=0))
    assert cube.shape == (32, 32, 32) and cube.dtype == np.float32
    assert cube.min() == 0.0 and cube.max() == pytest.approx(1.0)
    assert region.tolist() == [0, 10, 0, 20, 0, 20]


def _neck_study():
    """A wide field of view (1.5 mm pixels, 300 mm) with a small neck off-centre, and a table under it."""
    hu = np.full((40, 200, 200), -1000, np.int16)
    yy, xx = np.mgrid[:200, :200]
    hu[:, ((yy - 80) / 40.0) ** 2 + ((xx - 130) / 45.0) ** 2 <= 1] = 40  # the neck
    hu[:, 150:156, 20:180] = 300  # the table: wide but thin
    labels = np.zeros(hu.shape, np.uint8)
    for c in range(7):
        labels[4 + 5 * c: 8 + 5 * c, 85:95, 125:137] = c + 1
    hu[labels > 0] = 700
    return hu, labels


def test_neck_crop_centres_on_the_neck_and_maps_boxes_back():
    hu, labels = _neck_study()
    cfg = PreprocessConfig(size=32, crop_mm=120)
    cube, region = preprocess_hu(hu, (2.0, 1.5, 1.5), cfg)
    assert region[3] - region[2] == region[5] - region[4] == 80  # 120 mm at 1.5 mm per pixel
    assert abs((region[2] + region[3]) / 2 - 80) <= 2 and abs((region[4] + region[5]) / 2 - 130) <= 2
    # the cube is the crop: the neck fills it instead of a fifth of it
    assert (cube > 0.25).mean() > 0.6  # 14 % of the whole image is neck
    # labels preprocessed like the image and read back through the region give the true boxes
    target = resample_labels(crop_region(labels, region, 0), (32, 32, 32))
    pred = vertebra_boxes(target, labels.shape, "u", threshold=0.5, fallback=0.5, min_voxels=1, region=region)
    truth = boxes_from_labels(labels, "u")
    coords = ["z0", "z1", "y0", "y1", "x0", "x1"]
    assert np.abs(pred[coords].to_numpy() - truth[coords].to_numpy()).max() <= 3  # a cube voxel is 2.5 px


def test_boxes_map_back_to_original_coordinates():
    labels = np.zeros((60, 64, 64), np.uint8)
    labels[10:20, 16:32, 20:40] = 3
    truth = boxes_from_labels(labels, "u")
    row = truth.iloc[2]
    assert (row.z0, row.z1, row.y0, row.y1, row.x0, row.x1) == (10, 19, 16, 32, 20, 40)
    low = np.zeros((7, 30, 32, 32), np.float32)
    low[2, 5:10, 8:16, 10:20] = 0.9
    low[4, 0, 0, 0] = 0.1  # only at the fallback threshold, too small
    pred = vertebra_boxes(low, labels.shape, "u", min_voxels=2)
    assert pred.iloc[2].status == "found" and pred.iloc[4].status == "missing"
    # a crisp 0.9 plateau crosses the 0.2 threshold a fifth of a cube voxel (half a slice) outside it
    assert abs(pred.iloc[2].z0 - row.z0) <= 1 and abs(pred.iloc[2].z1 - row.z1) <= 1
    assert (pred.iloc[2].y0, pred.iloc[2].y1, pred.iloc[2].x0, pred.iloc[2].x1) == (16, 32, 20, 40)
    weak = low.copy()
    weak[2] *= 0.1
    assert vertebra_boxes(weak, labels.shape, "u").iloc[2].status == "weak"
    with pytest.raises(ValueError, match="expected probabilities"):
        vertebra_boxes(low[:3], labels.shape, "u")


def test_stray_voxels_do_not_stretch_a_box():
    probs = np.zeros((7, 32, 32, 32), np.float32)
    probs[6, 20:26, 10:20, 10:20] = 0.9   # C7 where it belongs
    probs[6, 2:4, 2:4, 2:4] = 0.9         # a false blob far up the neck
    row = vertebra_boxes(probs, (64, 64, 64), "u").iloc[6]
    assert abs(row.z0 - 40) <= 1 and abs(row.z1 - 51) <= 1 and row.voxels == 6 * 10 * 10


def test_a_vertebra_bleeding_into_its_neighbour_does_not_take_its_slices():
    # C3 owns cube planes 10-15, C4 planes 16-21; C3's probability leaks at 0.3 over C4's
    # planes, where C4 is sure (0.9): per-class thresholding would stretch C3 over C4.
    probs = np.zeros((7, 32, 16, 16), np.float32)
    probs[2, 10:16, 4:12, 4:12] = 0.9
    probs[2, 16:22, 4:12, 4:12] = 0.3
    probs[3, 16:22, 4:12, 4:12] = 0.9
    rows = vertebra_boxes(probs, (64, 32, 32), "u")
    c3, c4 = rows.iloc[2], rows.iloc[3]
    assert c3.z1 < c4.z0 + 2 and c3.z1 <= 32 and c4.z0 >= 31
    assert z_iou((c3.z0, c3.z1), (20, 31)) >= 0.8 and z_iou((c4.z0, c4.z1), (32, 43)) >= 0.8


def test_slice_ranges_are_finer_than_a_cube_voxel():
    # A vertebra on study slices 37..58 of 128 at 8 slices per cube voxel: the cube holds its
    # fractions (soft edges), and the refined range lands within a slice or two of the truth,
    # where whole cube voxels could only give 32..63.
    labels = np.zeros((128, 16, 16), np.uint8)
    labels[37:59, 4:12, 4:12] = 5
    low = resample_labels(labels, (16, 16, 16))
    row = vertebra_boxes(low, labels.shape, "u", threshold=0.5, fallback=0.5, min_voxels=1).iloc[4]
    assert abs(row.z0 - 37) <= 2 and abs(row.z1 - 58) <= 2


def _box_frame(z0, z1, status=None):
    from common.constants import VERTEBRAE
    import pandas as pd
    status = status or ["found"] * 7
    return pd.DataFrame({"StudyInstanceUID": "u", "vertebra": list(VERTEBRAE), "z0": z0, "z1": z1,
                         "y0": 0, "y1": 8, "x0": 0, "x1": 8, "voxels": 10, "status": status})


def test_box_offsets_undo_a_systematic_shift():
    from stage1_seg.boxes import apply_box_offsets, fit_box_offsets, z_errors
    rng = np.random.default_rng(0)
    true = np.stack([np.arange(7) * 10 + 5, np.arange(7) * 10 + 14], axis=1)
    shift = np.array([[-2.0, -2.0]] * 6 + [[1.0, 3.0]])             # cube voxels; C7 its own bias
    vox = 2.0                                                          # study slices per cube voxel
    errors = []
    for _ in range(9):
        pred = true + np.round((shift + rng.integers(-1, 2, size=(7, 2)) * 0.5) * vox).astype(int)
        errors.append(z_errors(pred, true, vox))
    errors[0][3] = np.nan                                              # a vertebra the truth lacks
    offsets = fit_box_offsets(np.stack(errors), min_count=5)
    assert np.allclose(offsets, shift, atol=0.5)
    # applied to a study whose boxes carry the same shift, the true ranges come back
    pred = true + np.round(shift * vox).astype(int)
    fixed = apply_box_offsets(_box_frame(pred[:, 0], pred[:, 1]), offsets, vox, n_slices=90)
    assert np.abs(fixed[["z0", "z1"]].to_numpy() - true).max() <= 1
    # too few studies with a vertebra: no offset for it
    assert not fit_box_offsets(np.stack(errors[:3]), min_count=5).any()
    # a vertebra no study has gets 0, quietly (no All-NaN warning in the user's log)
    errors = np.stack(errors)
    errors[:, 2] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        offsets = fit_box_offsets(errors, min_count=5)
    assert (offsets[2] == 0).all() and np.allclose(offsets[3:], shift[3:], atol=0.5)


def test_box_offsets_leave_missing_rows_and_stay_inside_the_study():
    from stage1_seg.boxes import apply_box_offsets
    status = ["missing"] + ["found"] * 5 + ["weak"]
    frame = _box_frame([-1, 0, 10, 20, 30, 40, 50], [-1, 9, 19, 29, 39, 49, 59], status)
    offsets = np.array([[5.0, 5.0]] * 7)
    out = apply_box_offsets(frame, offsets, 1.0, n_slices=60)
    assert out.loc[0, ["z0", "z1"]].tolist() == [-1, -1]               # missing stays missing
    assert out.loc[1, ["z0", "z1"]].tolist() == [0, 4]                 # clipped at the first slice
    assert out.loc[6, ["z0", "z1"]].tolist() == [45, 54]               # weak rows move too
    out = apply_box_offsets(frame, -offsets * 3, 1.0, n_slices=60)
    assert out["z1"].max() == 59 and (out["z0"] <= out["z1"]).all()


def test_box_offsets_file_round_trip_and_bad_files(tmp_path):
    from stage1_seg.boxes import read_box_offsets, write_box_offsets
    offsets = np.arange(14, dtype=float).reshape(7, 2) / 4
    write_box_offsets(tmp_path / "o.json", offsets, studies=12)
    assert np.allclose(read_box_offsets(tmp_path / "o.json"), offsets)
    (tmp_path / "bad.json").write_text('{"z0": [1, 2], "z1": [1, 2]}')
    with pytest.raises(ValueError, match="bad.json"):
        read_box_offsets(tmp_path / "bad.json")
    (tmp_path / "cut.json").write_text('{"z0": [1, 2')
    with pytest.raises(ValueError, match="cut.json: not a box-offsets file"):
        read_box_offsets(tmp_path / "cut.json")


def test_fitted_box_offsets_are_applied_as_the_file_holds_them(tmp_path):
    """Prediction applies the offsets exactly as box_offsets.json stores them (rounded), the file
    make_submission applies: a fit of 1/3 voxel must not be used at full precision here and
    rounded there, or a range on a rounding boundary differs by a slice between the two."""
    import pandas as pd

    from stage1_seg.boxes import OFFSETS_FILE, read_box_offsets
    from stage1_seg.predict import box_offsets

    truth = np.array([[10 + 20 * c, 19 + 20 * c] for c in range(7)])
    frame = pd.DataFrame({"z0": truth[:, 0] + 1, "z1": truth[:, 1] + 2})  # 1 and 2 slices late
    studies = [(frame, 3.0, 160, truth)] * 5                              # 3 slices a cube voxel
    offsets, fitted_on = box_offsets(Stage1Config(), tmp_path, studies)
    assert fitted_on == 5
    stored = read_box_offsets(tmp_path / OFFSETS_FILE)
    assert np.array_equal(offsets, stored)
    assert np.allclose(stored, [[0.333, 0.667]] * 7)
