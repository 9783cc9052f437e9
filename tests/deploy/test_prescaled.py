"""prepare_for_inference bakes the NF blocks' scales (γ, 1/β, α, skip gain) into their convs
(normfree.nn.prescaled): same outputs as the eval model, no Scaled-WS conv and no plain-form
block left, and the export path still traces it."""

from __future__ import annotations

import pytest
import torch

import normfree
from normfree.deploy import prepare_for_inference
from normfree.nn import ScaledStdConv2d
from normfree.nn.padding import Conv2dSame
from normfree.nn.prescaled import PrescaledConv2d, PrescaledConv2dSame, bake_block_scales
from normfree.nn.residual import NFResidualBlock, plain_forward


def _trained_like(name: str, **kwargs: object) -> torch.nn.Module:
    torch.manual_seed(0)
    model = normfree.create_model(name, num_classes=5, **kwargs)
    with torch.no_grad():  # move every scale off its init (zero skip gains would hide errors)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _block_convs(model: torch.nn.Module) -> int:
    return sum(
        isinstance(m, ScaledStdConv2d)
        for b in model.modules()
        if isinstance(b, NFResidualBlock)
        for m in b.modules()
    )


@pytest.mark.parametrize(
    ("name", "size", "kwargs"),
    [("nf_resnet_cifar20", 16, {}), ("nf_regnet_b0", 64, {}),
     ("nfnet_f0", 64, {"depths": (1, 1, 1, 1)})],  # F0's blocks, one per stage
    ids=["nf_resnet_cifar20", "nf_regnet_b0", "nfnet_f0"],
)  # fmt: skip
def test_baked_model_equals_the_eval_model(name: str, size: int, kwargs: dict) -> None:
    model = _trained_like(name, **kwargs)
    fast = prepare_for_inference(model)
    baked = [m for m in fast.modules() if isinstance(m, (PrescaledConv2d, PrescaledConv2dSame))]
    assert len(baked) == _block_convs(model) > 0  # every block conv carries its scales
    assert all(b.scales_baked for b in fast.modules() if isinstance(b, NFResidualBlock))
    if name == "nfnet_f0":  # "SAME" padding survives baking
        assert any(isinstance(m, Conv2dSame) for m in baked)
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = model(x), fast(x)
    assert expected.abs().max() > 1e-2
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the eval model's plain form agrees too (independent reference)
        with plain_forward(model):
            torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)


def test_baked_blocks_refuse_their_plain_form() -> None:
    fast = prepare_for_inference(_trained_like("nf_resnet_cifar20"))
    with pytest.raises(RuntimeError, match="apply them twice"), plain_forward(fast):
        fast(torch.randn(1, 3, 16, 16))


def test_bake_needs_eval_mode() -> None:
    model = _trained_like("nf_resnet_cifar20").train()
    with pytest.raises(ValueError, match="eval-mode"):
        bake_block_scales(model, torch.zeros(1, 3, 16, 16))


def test_baked_model_exports_with_torch_export() -> None:
    fast = prepare_for_inference(_trained_like("nf_resnet_cifar20"))
    x = torch.randn(2, 3, 16, 16)
    program = torch.export.export(fast, (x,))
    torch.testing.assert_close(program.module()(x), fast(x), rtol=1e-5, atol=1e-5)


def test_blocks_that_run_their_plain_form_stay_usable() -> None:
    # a block that never folds (a subclass with only `branch`, or one whose conv is already a
    # plain conv) passed its convs no scales: baking must not mark it as holding them
    from torch import nn

    from normfree.nn import nf_activation

    class BranchOnly(NFResidualBlock):
        def __init__(self) -> None:
            super().__init__(4, 4, 1, beta_multiplier=1.0, alpha=0.2,
                             activation=nf_activation("relu"), skipinit_init=1.0)  # fmt: skip
            self.conv = ScaledStdConv2d(4, 4, 3)

        def branch(self, out: torch.Tensor) -> torch.Tensor:
            return self.conv(out)

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    custom = nn.Sequential(nn.Conv2d(3, 4, 1), BranchOnly()).eval()
    surgery = _trained_like("nf_resnet26")
    block = next(m for m in surgery.modules() if isinstance(m, NFResidualBlock))
    block.conv2 = block.conv2.to_conv2d()  # one conv already plain: the block cannot fold
    for model, inputs in ((custom, x), (surgery, torch.randn(2, 3, 32, 32))):
        with torch.no_grad():
            want = model(inputs)
            got = prepare_for_inference(model)(inputs)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_wrapper_whose_first_conv_is_not_the_input_conv_folds_and_exports(tmp_path) -> None:
    """The recording forward took its channels from the first conv in module order: a wrapper
    registering a neck conv before its backbone could not be folded, nor exported even with
    the input shape given ("expects 3 input channels, got 64")."""
    from torch import nn

    from normfree.deploy import export_model

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.neck = nn.Conv2d(64, 8, 1)  # registered first, reads the backbone's output
            self.backbone = _trained_like("nf_resnet_cifar20")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.neck(self.backbone.forward_features(x))

    model = Wrapper().eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
        for fast in (prepare_for_inference(model), prepare_for_inference(model, x)):
            assert any(isinstance(m, PrescaledConv2d) for m in fast.modules())
            torch.testing.assert_close(fast(x), want, rtol=1e-5, atol=1e-5)
    result = export_model(model, tmp_path / "w.pt2", (3, 16, 16))
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4
    with pytest.raises(TypeError, match="example_input must be a tensor"):
        prepare_for_inference(model, [x])  # type: ignore[arg-type]
