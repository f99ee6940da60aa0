"""The fast CPU backward of stage 1's depthwise convolutions gives the library's gradients."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from common.config import load_config
from configs import config_path
from stage1_seg.config import Stage1Config
from stage1_seg.depthwise import FastDepthwiseConv3d, _DepthwiseConv3d, qualifies, use_fast_depthwise
from stage1_seg.model import build_model
from stage1_seg.train import supervised_loss


@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_backward_passes_gradcheck(kernel, channels_last, bias):
    gen = torch.Generator().manual_seed(kernel)
    x = torch.randn(2, 3, 3, 4, 5, dtype=torch.double, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    weight = torch.randn(3, 1, kernel, kernel, kernel, dtype=torch.double, generator=gen)
    b = torch.randn(3, dtype=torch.double, generator=gen) if bias else None
    inputs = [t.requires_grad_() for t in (x, weight, b) if t is not None]
    pad = (kernel // 2,) * 3

    def conv(*args):
        return _DepthwiseConv3d.apply(args[0], args[1], args[2] if bias else None, pad)

    assert torch.autograd.gradcheck(conv, tuple(inputs))


def _pair(channels: int = 6, kernel: int = 3, bias: bool = True) -> tuple[nn.Conv3d, nn.Conv3d]:
    torch.manual_seed(0)
    library = nn.Conv3d(channels, channels, kernel, padding=kernel // 2, groups=channels, bias=bias)
    fast = copy.deepcopy(library)
    assert use_fast_depthwise(fast) == 1
    return library, fast


def test_fp32_outputs_and_gradients_match_the_library_convolution():
    library, fast = _pair()
    x = torch.randn(2, 6, 8, 9, 10).contiguous(memory_format=torch.channels_last_3d)
    grad = torch.randn(2, 6, 8, 9, 10)
    results = []
    for conv in (library, fast):
        xi = x.clone().requires_grad_()
        out = conv(xi)
        out.backward(grad)
        results.append((out.detach(), xi.grad, conv.weight.grad, conv.bias.grad))
    assert fast(x).grad_fn.name().startswith("_DepthwiseConv3d")
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_inference_and_autocast_run_the_library_convolution():
    _, fast = _pair()
    x = torch.randn(1, 6, 4, 4, 4, requires_grad=True)
    with torch.no_grad():
        assert fast(x).grad_fn is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fast(x).grad_fn.name().startswith("_DepthwiseConv3d")
    assert not fast.double()(x.double()).grad_fn.name().startswith("_DepthwiseConv3d")


@pytest.mark.parametrize("conv", [
    nn.Conv3d(4, 4, 3, padding=1, groups=4, stride=2),         # strided
    nn.Conv3d(4, 4, 3, padding=2, groups=4, dilation=2),       # dilated
    nn.Conv3d(4, 4, 3, padding=0, groups=4),                   # not "same"
    nn.Conv3d(4, 8, 3, padding=1, groups=4),                   # a channel multiplier
    nn.Conv3d(4, 4, 3, padding=1, groups=2),                   # grouped, not depthwise
    nn.Conv3d(4, 4, 3, padding=1),                             # dense
    nn.Conv3d(4, 4, 3, padding=1, groups=4, padding_mode="replicate"),
])
def test_other_convolutions_keep_the_library_backward(conv):
    assert not qualifies(conv)
    assert use_fast_depthwise(nn.Sequential(conv)) == 0 and type(conv) is nn.Conv3d


def test_built_model_trains_with_the_fast_backward_and_the_library_gradients():
    cfg = load_config(Stage1Config, config_path("demo/stage1.yaml"), ["preprocess.size=32"])
    torch.manual_seed(0)
    fast = build_model(cfg.model, pretrained_source=False).train()
    library = copy.deepcopy(fast)
    converted = use_fast_depthwise(library, enabled=False)
    assert converted > 0 and sum(isinstance(m, FastDepthwiseConv3d) for m in fast.modules()) == converted
    assert not any(isinstance(m, FastDepthwiseConv3d) for m in library.modules())
    assert fast.state_dict().keys() == library.state_dict().keys()
    x = torch.rand(2, 1, 32, 32, 32).contiguous(memory_format=torch.channels_last_3d)
    target = (torch.rand(2, 7, 32, 32, 32) > 0.9).float()
    grads = []
    for model in (fast, library):
        model.zero_grad()
        supervised_loss(model(x), target, cfg).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    scale = grads[1].abs().max()
    assert scale > 0
    assert (grads[0] - grads[1]).abs().max() <= 1e-4 * scale
