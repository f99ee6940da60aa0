"""Mixed precision policy: always on CUDA, opt-in on CPU (bf16 kernels do not repeat bit for bit)."""
import torch

from common.device import amp_available, autocast_context

CPU = torch.device("cpu")


def test_cpu_stays_fp32_unless_asked():
    assert amp_available(CPU) is False
    with autocast_context(CPU, amp_available(CPU)):
        y = torch.ones(4, 4) @ torch.ones(4, 4)
    assert y.dtype == torch.float32


def test_cpu_bf16_when_asked_and_native():
    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert amp_available(CPU, cpu_bf16=True) is native
    with autocast_context(CPU, amp_available(CPU, cpu_bf16=True)):
        y = torch.ones(4, 4) @ torch.ones(4, 4)
    assert y.dtype == (torch.bfloat16 if native else torch.float32)
