"""A faster CPU backward for the encoder's 3D depthwise convolutions.

On CPU (PyTorch's oneDNN kernels, channels-last 3D) the backward of a depthwise 3D
convolution costs 20-30 times its forward: at the demo's 64^3 cube, 1152 channels at
2^3 take 0.2 ms forward and 6.3 ms backward, 96 channels at 16^3 0.8 ms and 17 ms.
Both gradients of a stride-1, zero-padded "same" depthwise convolution have exact forms
that run on the fast forward kernels and plain tensor ops instead:

- the input gradient is the same depthwise convolution of the output gradient with the
  kernel flipped in all three axes;
- the weight gradient at each kernel offset is the sum, over the batch and every
  position, of the output gradient times the padded input shifted by that offset.

:func:`use_fast_depthwise` gives the qualifying convolutions of a model this backward.
Only fp32 CPU training takes it; CUDA, autocast, and forward passes without gradients
(validation, prediction) run the library convolution. Parameters, state-dict keys and
the forward's arithmetic are unchanged, so checkpoints move freely between the two.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


class _DepthwiseConv3d(torch.autograd.Function):
    """``F.conv3d(x, weight, bias, padding=padding, groups=channels)`` with the backward above."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                padding: tuple[int, int, int]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.has_bias = padding, bias is not None
        return F.conv3d(x, weight, bias, padding=padding, groups=weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        pd, ph, pw = ctx.padding
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv3d(grad, weight.flip(2, 3, 4), padding=ctx.padding, groups=weight.shape[0])
        if ctx.needs_input_grad[1]:
            padded = F.pad(x, (pw, pw, ph, ph, pd, pd))
            depth, height, width = grad.shape[2:]
            kd, kh, kw = weight.shape[2:]
            grad_w = torch.stack([
                (padded[:, :, a:a + depth, b:b + height, c:c + width] * grad).sum((0, 2, 3, 4))
                for a in range(kd) for b in range(kh) for c in range(kw)], dim=1).view_as(weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3, 4))
        return grad_x, grad_w, grad_b, None


class FastDepthwiseConv3d(nn.Conv3d):
    """An ``nn.Conv3d`` (depthwise, stride 1, "same" zero padding) whose fp32 CPU training
    backward is :class:`_DepthwiseConv3d`'s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type != "cpu" or x.dtype != torch.float32 or not torch.is_grad_enabled()
                or torch.is_autocast_enabled("cpu")):
            return super().forward(x)
        return _DepthwiseConv3d.apply(x, self.weight, self.bias, self.padding)


def qualifies(conv: nn.Module) -> bool:
    """A plain depthwise ``nn.Conv3d`` with stride 1, no dilation and zero "same" padding."""
    return (type(conv) in (nn.Conv3d, FastDepthwiseConv3d) and conv.groups > 1
            and conv.groups == conv.in_channels == conv.out_channels
            and conv.stride == (1, 1, 1) and conv.dilation == (1, 1, 1) and conv.padding_mode == "zeros"
            and all(k % 2 == 1 and p == k // 2 for k, p in zip(conv.kernel_size, conv.padding)))


def use_fast_depthwise(model: nn.Module, enabled: bool = True) -> int:
    """Give every qualifying convolution of ``model`` the fast backward (``enabled=False``: the
    library's again, the baseline of ``tooling.bench.stage1``); returns how many there are."""
    convs = [m for m in model.modules() if qualifies(m)]
    for conv in convs:
        conv.__class__ = FastDepthwiseConv3d if enabled else nn.Conv3d
    return len(convs)
