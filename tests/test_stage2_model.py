"""Stage-2 model shapes, pooling, local ImageNet weights through timm, and augmentation consistency."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from stage2_cls.augment import StackAugmenter, mixup
from stage2_cls.config import AugmentConfig, ModelConfig, Stage2Config
from timm.models import adapt_input_conv

from common.config import load_config
from common.pretrained import PretrainedError, PretrainedFileNotFound
from stage2_cls.model import (build_model, focus_on_mask, noisy_or_logit, predict_logits, vertebra_logit,
                              vertebra_probability)


def small_cfg(**kw) -> ModelConfig:
    base = dict(backbone="convnext_atto", lstm_hidden=16, dropout=0.1, drop_path=0.0)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_vertebra_probability_and_logit_agree(pooling):
    """Shapes and gradients are checked for every model in test_models.py; here the pooling heads."""
    torch.manual_seed(0)
    out = build_model(small_cfg(pooling=pooling))(torch.rand(2, 5, 6, 32, 32))
    if pooling == "attention":
        assert torch.allclose(out["attention"].sum(1), torch.ones(2))
    prob = vertebra_probability(out)
    assert prob.shape == (2,) and ((prob > 0) & (prob < 1)).all()
    assert torch.allclose(torch.sigmoid(vertebra_logit(out)), prob, atol=1e-6)


@pytest.mark.parametrize("model_type", [1, 2])
def test_flip_tta_averages_four_views_and_is_invariant_to_flipping_the_input(model_type):
    torch.manual_seed(0)
    model = build_model(small_cfg(type=model_type)).eval()
    x = torch.rand(2, 7, 3, 6, 32, 32) if model_type == 2 else torch.rand(2, 3, 6, 32, 32)
    args = (torch.zeros(2, 7, dtype=torch.bool),) if model_type == 2 else ()
    keys = ("vertebra_logit", "overall_logit") if model_type == 2 else ("vertebra_logit",)
    with torch.no_grad():
        plain = predict_logits(model, x, *args, tta="none")
        assert torch.allclose(torch.sigmoid(plain["vertebra_logit"]), vertebra_probability(model(x, *args)), atol=1e-6)
        views = [model(torch.flip(x, d) if d else x, *args) for d in ((), (-1,), (-2,), (-2, -1))]
        flips = predict_logits(model, x, *args, tta="flips")
        by_hand = torch.stack([vertebra_logit(v) for v in views]).mean(0)
        assert torch.allclose(flips["vertebra_logit"], by_hand, atol=1e-6)
        if model_type == 2:
            assert torch.allclose(flips["overall_logit"], torch.stack([v["overall_logit"] for v in views]).mean(0),
                                  atol=1e-6)
        for dims in ((-1,), (-2,)):  # a flipped input gives the same average, not the same single view
            flipped = torch.flip(x, dims)
            for key in keys:
                assert torch.allclose(predict_logits(model, flipped, *args, tta="flips")[key], flips[key], atol=1e-5)
                assert not torch.allclose(predict_logits(model, flipped, *args, tta="none")[key], plain[key],
                                          atol=1e-5)
    with pytest.raises(ValueError, match="unknown stage-2 tta"):
        predict_logits(model, x, *args, tta="rot90")


def test_mean_pooling_is_mean_of_slice_probabilities():
    out = {"slice_logits": torch.tensor([[0.0, 2.0, -2.0], [30.0, -30.0, 0.0]])}
    expected = torch.sigmoid(out["slice_logits"]).mean(1)
    assert torch.allclose(vertebra_probability(out), expected)
    assert torch.allclose(torch.sigmoid(vertebra_logit(out)), expected, atol=1e-6)
    assert torch.isfinite(vertebra_logit({"slice_logits": torch.full((1, 4), 200.0)})).all()


@pytest.mark.parametrize("model_type", [1, 2])
def test_prior_sets_the_initial_vertebra_probability(model_type):
    torch.manual_seed(0)
    x = torch.rand(2, 7, 5, 6, 32, 32) if model_type == 2 else torch.rand(2, 5, 6, 32, 32)
    args = (torch.zeros(2, 7, dtype=torch.bool),) if model_type == 2 else ()
    with torch.no_grad():
        default = vertebra_probability(build_model(small_cfg(type=model_type)).eval()(x, *args))
        primed = vertebra_probability(build_model(small_cfg(type=model_type, prior=0.14)).eval()(x, *args))
    assert float((default - 0.5).abs().max()) < 0.1
    assert float((primed - 0.14).abs().max()) < 0.05
    with pytest.raises(ValueError, match="model.prior"):
        build_model(small_cfg(prior=1.5))


def test_noisy_or_logit_matches_the_probability_formula_and_skips_missing():
    logits = torch.tensor([[-2.0, -1.0, 0.5, -3.0], [-30.0, -30.0, -30.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    missing = torch.tensor([[False, False, False, True], [False, False, False, True], [True] * 4])
    p = torch.sigmoid(logits).double()
    expected = 1 - torch.where(missing, torch.ones_like(p), 1 - p).prod(dim=1)
    got = torch.sigmoid(noisy_or_logit(logits, missing).double())
    assert torch.allclose(got[:2], expected[:2], rtol=1e-4)
    assert float(got[1]) < 1e-12                         # three confident negatives, the positive one missing
    assert torch.isfinite(noisy_or_logit(logits, missing)).all() and float(got[2]) < 1e-5  # nothing present


def test_noisy_or_head_starts_at_the_noisy_or_of_its_vertebrae_and_trains_them():
    torch.manual_seed(0)
    x = torch.rand(2, 7, 4, 6, 32, 32)
    missing = torch.zeros(2, 7, dtype=torch.bool)
    missing[1, 5:] = True
    model = build_model(small_cfg(type=2, overall_head="noisy_or")).eval()
    out = model(x, missing)
    p = vertebra_probability(out).double()
    expected = 1 - torch.where(missing, torch.ones_like(p), 1 - p).prod(dim=1)
    assert torch.allclose(torch.sigmoid(out["overall_logit"].double()), expected, atol=1e-5)
    out["overall_logit"].sum().backward()                # patient_overall's loss alone reaches the vertebra head
    assert model.vertebra.head.weight.grad.abs().sum() > 0
    free = build_model(small_cfg(type=2)).eval()
    out = free(x, missing)
    out["overall_logit"].sum().backward()
    assert free.vertebra.head.weight.grad is None or free.vertebra.head.weight.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="pooling"):
        build_model(small_cfg(type=2, pooling="attention"))
    with pytest.raises(ValueError, match="overall_head"):
        build_model(small_cfg(type=2, overall_head="max"))


def test_focus_keeps_the_ct_near_the_grown_mask_and_blanks_the_rest():
    images = torch.rand(3, 6, 24, 24) * 0.5 + 0.5
    images[:, 5] = 0.0
    images[:, 5, 10:14, 10:14] = 0.8                    # the vertebra's mask
    out = focus_on_mask(images, 3)
    assert torch.equal(out[:, 5], images[:, 5])          # the mask channel is untouched
    assert torch.equal(out[:, :5, 7:17, 7:17], images[:, :5, 7:17, 7:17])   # mask grown by 3 px: whole
    assert out[:, :5, :6].abs().max() == 0 and out[:, :5, :, 18:].abs().max() == 0  # beyond it: blank
    assert torch.equal(focus_on_mask(images, 0), images)
    faint = images.clone()
    faint[:, 5] = 0.0
    faint[:, 5, 12, 12] = 0.1                            # a faint mask: CT kept at 0.4 of its value
    assert torch.allclose(focus_on_mask(faint, 1)[:, :5, 12, 12], 0.4 * faint[:, :5, 12, 12])


@pytest.mark.parametrize("model_type", [1, 2])
def test_focus_reaches_both_model_types_and_ignores_ct_far_from_the_mask(model_type):
    torch.manual_seed(0)
    shape = (1, 7, 3, 6, 32, 32) if model_type == 2 else (1, 3, 6, 32, 32)
    x = torch.rand(shape)
    x[..., 5, :, :] = 0.0
    x[..., 5, 12:20, 12:20] = 1.0
    changed = x.clone()
    changed[..., :5, :4, :] = torch.rand_like(changed[..., :5, :4, :])  # CT far from the mask
    args = (torch.zeros(1, 7, dtype=torch.bool),) if model_type == 2 else ()
    with torch.no_grad():
        focused = build_model(small_cfg(type=model_type, focus=2)).eval()
        assert torch.equal(focused(x, *args)["slice_logits"], focused(changed, *args)["slice_logits"])
        plain = build_model(small_cfg(type=model_type)).eval()
        assert not torch.equal(plain(x, *args)["slice_logits"], plain(changed, *args)["slice_logits"])
    with pytest.raises(ValueError, match="model.focus"):
        build_model(small_cfg(focus=-1))


@pytest.mark.parametrize("backbone", ["convnext_atto", "regnetx_002"])
def test_global_pool_setting_reaches_the_backbone(tmp_path, backbone):
    """model.global_pool is timm's pooling of each slice's feature map, built from scratch or from
    local weights; "avgmax" is the mean of "avg" and "max" on the same weights."""
    x = torch.rand(3, 6, 64, 64)
    torch.manual_seed(0)
    models = {pool: build_model(small_cfg(backbone=backbone, global_pool=pool)).backbone.eval()
              for pool in ("avg", "max", "avgmax")}
    state = models["avg"].state_dict()
    for m in models.values():
        m.load_state_dict(state)
    with torch.no_grad():
        feats = {pool: m(x) for pool, m in models.items()}
    assert feats["avg"].shape == feats["max"].shape == feats["avgmax"].shape
    assert not torch.allclose(feats["avg"], feats["max"])
    if backbone == "regnetx_002":  # pooling straight onto the features: avgmax is exactly their mean
        torch.testing.assert_close(feats["avgmax"], (feats["avg"] + feats["max"]) / 2)
    rgb = timm.create_model(backbone, pretrained=False)
    path = tmp_path / f"{backbone}.pth"
    torch.save(rgb.state_dict(), path)
    loaded = build_model(small_cfg(backbone=backbone, weights_file=str(path), global_pool="max")).backbone
    assert "max" in repr(loaded) and loaded(x).shape == feats["max"].shape
    with pytest.raises(Exception, match="global_pool"):
        load_config(Stage2Config, None, ["model.global_pool=median"])


def test_rejects_wrong_input_rank():
    with pytest.raises(ValueError, match="B, S, C, H, W"):
        build_model(small_cfg())(torch.rand(2, 6, 32, 32))


def test_local_weights_adapt_a_three_channel_stem(tmp_path):
    torch.manual_seed(0)
    rgb = timm.create_model("convnext_atto", pretrained=False)  # an ImageNet-shaped file: 3 channels, 1000 classes
    path = tmp_path / "atto_rgb.pth"
    torch.save(rgb.state_dict(), path)
    model = build_model(small_cfg(weights_file=str(path)))
    stem = model.backbone.state_dict()["stem.0.weight"]
    assert stem.shape[1] == 6
    assert torch.equal(stem, adapt_input_conv(6, rgb.state_dict()["stem.0.weight"]))  # timm's own adaptation
    key = "stages.1.blocks.0.conv_dw.weight"
    assert torch.equal(model.backbone.state_dict()[key], rgb.state_dict()[key])
    # the ImageNet head is dropped: the same tensors as a backbone built without pretrained weights
    assert model.backbone.state_dict().keys() == build_model(small_cfg()).backbone.state_dict().keys()
    with pytest.raises(PretrainedFileNotFound, match="absent.pth"):
        build_model(small_cfg(weights_file=str(tmp_path / "absent.pth")))
    torch.save({"unrelated.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(PretrainedError, match="other.pth.*another architecture"):
        build_model(small_cfg(weights_file=str(tmp_path / "other.pth")))


def test_rebuilding_ignores_the_pretrained_source(tmp_path):
    cfg = small_cfg(pretrained=True, weights_file=str(tmp_path / "gone.pth"))
    with pytest.raises(PretrainedFileNotFound):
        build_model(cfg)
    model = build_model(cfg, pretrained_source=False)  # as rebuild_model does: the checkpoint has the weights
    assert model(torch.rand(1, 3, 6, 32, 32))["slice_logits"].shape == (1, 3)


def test_geometric_augmentation_is_identical_across_channels_and_slices():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (48, 48), dtype=np.uint8)
    stack = np.broadcast_to(image, (7, 6, 48, 48)).copy()
    only_geometry = AugmentConfig(flip_p=0.5, ssr_p=1.0, distortion_p=1.0, cutout_p=1.0,
                                  brightness_contrast_p=0.0, blur_noise_p=0.0, shuffle_p=0.0)
    augment = StackAugmenter(only_geometry)
    changed = 0
    for _ in range(5):
        out = augment(stack)
        assert out.shape == stack.shape and out.dtype == np.uint8
        assert (out == out[:1, :1]).all()  # every slice and channel moved the same way
        changed += int(not np.array_equal(out[0, 0], image))
    assert changed == 5


def test_intensity_augmentation_spares_the_mask_channel():
    stack = np.full((3, 6, 32, 32), 100, np.uint8)
    cfg = AugmentConfig(flip_p=0.0, ssr_p=0.0, distortion_p=0.0, cutout_p=0.0,
                        brightness_contrast_p=1.0, blur_noise_p=1.0, shuffle_p=0.0)
    out = StackAugmenter(cfg)(stack)
    assert (out[:, 5] == 100).all()
    assert not (out[:, :5] == 100).all()


def test_slice_shuffle_permutes_whole_slices():
    stack = np.arange(5, dtype=np.uint8)[:, None, None, None] * np.ones((5, 6, 8, 8), np.uint8)
    cfg = AugmentConfig(flip_p=0.0, ssr_p=0.0, distortion_p=0.0, cutout_p=0.0,
                        brightness_contrast_p=0.0, blur_noise_p=0.0, shuffle_p=1.0)
    np.random.seed(3)
    out = StackAugmenter(cfg)(stack)
    order = out[:, 0, 0, 0]
    assert sorted(order.tolist()) == list(range(5)) and order.tolist() != list(range(5))
    assert (out == order[:, None, None, None]).all()


def test_mixup_mixes_with_a_permutation():
    np.random.seed(0)
    x = torch.arange(4, dtype=torch.float32)[:, None].repeat(1, 3)
    mixed, perm, lam = mixup(x, alpha=1.0)
    assert 0.0 <= lam <= 1.0 and sorted(perm.tolist()) == [0, 1, 2, 3]
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[perm])


class _SameStackTwice(torch.utils.data.Dataset):
    """Two items, both the same stack, augmented: what two workers draw for one sample."""

    def __init__(self, stack: np.ndarray, augment: StackAugmenter) -> None:
        self.stack, self.augment = stack, augment

    def reseed(self, seed: int) -> None:
        self.augment.reseed(seed)

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.from_numpy(self.augment(self.stack))}


def _draws(stack: np.ndarray) -> list[bytes]:
    from common.trainer import TrainConfig, chunk_seed, training_loader

    cfg = TrainConfig(batch_size=1, num_workers=2, seed=5)
    dataset = _SameStackTwice(stack, StackAugmenter(AugmentConfig(mixup_p=0.0)))  # the real augmentation
    draws = []
    for chunk in range(2):
        for batch in training_loader(dataset, cfg, 2, chunk_seed(cfg.seed, chunk, 0)):
            draws.append(batch["image"].numpy().tobytes())
    return draws


def test_augmentation_differs_per_worker_and_chunk_and_repeats_on_rerun():
    rng = np.random.default_rng(0)
    stack = rng.integers(0, 255, (4, 6, 32, 32), dtype=np.uint8)
    first, second = _draws(stack), _draws(stack)
    assert len(first) == 4 and len(set(first)) == 4  # 2 workers x 2 chunks: four different draws
    assert first == second  # the same four on a rerun


def test_each_transform_gets_its_own_generator():
    """Two flips with the same probability must not always fire together."""
    augment = StackAugmenter(AugmentConfig(flip_p=0.5, ssr_p=0.0, distortion_p=0.0, cutout_p=0.0,
                                           brightness_contrast_p=0.0, blur_noise_p=0.0, shuffle_p=0.0))
    image = np.arange(16 * 16, dtype=np.uint8).reshape(16, 16)
    stack = np.broadcast_to(image, (1, 6, 16, 16)).copy()
    outcomes = set()
    for seed in range(12):
        augment.reseed(seed)
        out = augment(stack)[0, 0]
        outcomes.add((bool(np.array_equal(out, image[:, ::-1]) or np.array_equal(out, image[::-1, ::-1])),
                      bool(np.array_equal(out, image[::-1]) or np.array_equal(out, image[::-1, ::-1]))))
    assert len(outcomes) >= 3  # horizontal-only or vertical-only flips happen too
