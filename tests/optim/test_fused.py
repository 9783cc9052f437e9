"""fused_available: which optimizers PyTorch can step with its fused kernel here."""

from __future__ import annotations

import pytest
import torch
from torch.torch_version import TorchVersion

from normfree.optim import fused_available

# PyTorch added fused CPU kernels for SGD, Adam and AdamW in 2.4 (pytorch#123074, #123629)
CPU_FUSED = TorchVersion(torch.__version__) >= "2.4"


@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_kernels_follow_the_torch_release(cls: type, dtype: torch.dtype) -> None:
    params = [torch.zeros(3, 2, dtype=dtype), torch.zeros(2, dtype=dtype)]
    assert fused_available(cls, params) is CPU_FUSED
    # param groups (a list or a single tensor under "params") read the same
    groups = [{"params": params[:1]}, {"params": params[1]}]
    assert fused_available(cls, groups) is CPU_FUSED


def test_no_kernel_no_params_or_integer_params() -> None:
    assert not fused_available(torch.optim.RMSprop, [torch.zeros(2)])  # no fused option
    assert not fused_available(torch.optim.SGD, [])
    assert not fused_available(torch.optim.SGD, [torch.zeros(2), torch.zeros(2, dtype=torch.long)])


def test_mixed_kinds_agree_with_a_real_step() -> None:
    """For parameters of several dtypes (float16 has a fused CPU SGD only in some builds) the
    answer is what a real fused step over all of them does: it runs, or PyTorch refuses."""
    params = [torch.zeros(2, dtype=torch.float16, requires_grad=True),
              torch.zeros(2, requires_grad=True)]  # fmt: skip
    for p in params:
        p.grad = torch.ones_like(p)
    try:
        torch.optim.SGD(params, lr=0.5, fused=True).step()
        runs = True
    except (RuntimeError, TypeError, ValueError, NotImplementedError):
        runs = False
    assert fused_available(torch.optim.SGD, params) == runs
    if runs:  # the step really updated both
        assert all(torch.equal(p.detach().float(), torch.full((2,), -0.5)) for p in params)
