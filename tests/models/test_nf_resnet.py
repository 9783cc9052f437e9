"""NF-ResNet (Brock et al. 2021a): structure, counts, signal propagation at init, API contract."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import normfree
from normfree.models.nf_resnet import NFResNetBlock

ALPHA = 0.2


def _set_skip_gains(model: torch.nn.Module, value: float) -> None:
    with torch.no_grad():
        for _, block in model.residual_blocks():
            block.skip_gain.gain.fill_(value)


def test_nf_resnet50_parameter_count_matches_official() -> None:
    model = normfree.create_model("nf_resnet50")
    n = sum(p.numel() for p in model.parameters())
    # 25.56M: official parameter count incl. WS gains/biases and skip gains (deepmind-nfnets §3)
    assert round(n / 1e6, 2) == 25.56
    blocks = [b for _, b in model.residual_blocks()]
    assert len(blocks) == 16
    # one scalar SkipInit gain per block, initialised to 0
    assert all(b.skip_gain.gain.shape == () and b.skip_gain.gain.item() == 0.0 for b in blocks)


def _official_se_nf_resnet_params(depths: tuple[int, ...], se_ratio: float, classes: int) -> int:
    """Parameter count of DeepMind's ``NFResNet(use_se=True)`` from its definition: every
    ``WSConv2D`` holds ``w`` (out·in·k²), ``gain`` and ``bias`` (out each); each ``NFResBlock``
    holds conv0/conv1/conv2 (1×1, 3×3, 1×1 at width ``out/4``), a 1×1 ``conv_shortcut`` when the
    shape changes, ``SqueezeExcite(out_ch, out_ch, se_ratio)`` = two biased 1×1 convs through
    ``int(out_ch·se_ratio)`` hidden channels, and one scalar skip gain."""

    def ws(i: int, o: int, k: int) -> int:
        return o * i * k * k + 2 * o

    total, in_ch = ws(3, 64, 7), 64
    for depth, out_ch in zip(depths, (256, 512, 1024, 2048)):
        for b in range(depth):
            width, hidden = out_ch // 4, int(out_ch * se_ratio)
            total += ws(in_ch, width, 1) + ws(width, width, 3) + ws(width, out_ch, 1)
            total += ws(in_ch, out_ch, 1) if b == 0 else 0
            total += (out_ch * hidden + hidden) + (hidden * out_ch + out_ch) + 1
            in_ch = out_ch
    return total + 2048 * classes + classes


@pytest.mark.parametrize("se_ratio", [0.25, 0.0625])
def test_se_nf_resnet_parameter_count_matches_official_formula(se_ratio: float) -> None:
    # SE hidden width comes from the block's *output* channels (official NFResBlock, timm):
    # the first block of every stage (in_ch != out_ch) tells the two apart.
    model = normfree.create_model("nf_resnet26", use_se=True, se_ratio=se_ratio)
    n = sum(p.numel() for p in model.parameters())
    assert n == _official_se_nf_resnet_params((2, 2, 2, 2), se_ratio, 1000)
    block = model.stages[0][0]
    assert block.attn_last.fc1.out_channels == int(256 * se_ratio)


def test_beta_schedule_follows_expected_variance_with_resets() -> None:
    model = normfree.create_model("nf_resnet50")
    expected_multipliers, var = [], 1.0
    for depth in (3, 4, 6, 3):
        for b in range(depth):
            expected_multipliers.append(var**-0.5)  # the branch input is divided by sqrt(Var)
            var = (1.0 if b == 0 else var) + ALPHA**2  # reset after each transition block
    got = [b.beta_multiplier for _, b in model.residual_blocks()]
    assert got == pytest.approx(expected_multipliers, rel=1e-12)
    # block-output variances 1.04, 1.08, 1.12 | 1.04 … 1.16 | …
    assert model.expected_variances[:3] == pytest.approx([1.04, 1.08, 1.12])
    assert model.expected_variances[3:7] == pytest.approx([1.04, 1.08, 1.12, 1.16])


def _block_output_stats(model: torch.nn.Module, x: torch.Tensor) -> tuple[list[float], list[float]]:
    variances, sq_means = [], []

    def record(module: torch.nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        variances.append(out.var(dim=(0, 2, 3), unbiased=False).mean().item())
        sq_means.append(out.mean(dim=(0, 2, 3)).pow(2).mean().item())

    hooks = [block.register_forward_hook(record) for _, block in model.residual_blocks()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return variances, sq_means


def test_signal_propagation_at_init_follows_one_plus_k_alpha_squared() -> None:
    """Paper §4/Fig. 2: with Scaled WS and SkipInit gains forced to 1, the average channel
    variance of block outputs is 1 + k·α² within a stage (reset at transitions), and the
    average squared channel mean stays small. Tolerance 10% (issue 3)."""
    torch.manual_seed(0)
    model = normfree.create_model("nf_resnet50").eval()
    _set_skip_gains(model, 1.0)
    # 128 px: at smaller sizes the last stage's 2×2 maps are dominated by SAME zero padding
    x = torch.randn(4, 3, 128, 128)
    variances, sq_means = _block_output_stats(model, x)
    expected = model.expected_variances
    for got, want in zip(variances, expected):
        assert got == pytest.approx(want, rel=0.10)
    assert max(sq_means) < 0.1


def test_he_init_variant_shows_mean_shift() -> None:
    """Without WS ("NF, He-init") the squared channel mean grows through the network."""
    torch.manual_seed(0)
    ws = normfree.create_model("nf_resnet_cifar56", skipinit_init=1.0).eval()
    he = normfree.create_model("nf_resnet_cifar56", skipinit_init=1.0, use_ws=False).eval()
    x = torch.randn(16, 3, 16, 16)
    _, ws_means = _block_output_stats(ws, x)
    _, he_means = _block_output_stats(he, x)
    assert he_means[-1] > 10 * he_means[0]
    assert max(ws_means) < 0.1 < he_means[-1]


@pytest.mark.parametrize("name", ["nf_resnet_cifar20", "nf_resnet26"])
def test_batch_independent_in_eval_and_train(name: str, batch_gap: Callable[..., float]) -> None:
    torch.manual_seed(0)
    model = normfree.create_model(name, num_classes=5, skipinit_init=0.5, drop_rate=0.0,
                                  stochdepth_rate=0.0)
    x = torch.randn(8, 3, 32, 32)
    for mode in (False, True):
        assert batch_gap(model.train(mode), x) <= 1e-5


def test_small_variant_forward_features_and_intermediates() -> None:
    model = normfree.create_model("nf_resnet_cifar20", num_classes=7, in_chans=1, width=2)
    x = torch.randn(2, 1, 8, 8)
    feats = model.forward_intermediates(x, intermediates_only=True)
    assert [f.shape[1] for f in feats] == [fi.num_chs for fi in model.feature_info]
    assert [8 // f.shape[-1] for f in feats] == [fi.reduction for fi in model.feature_info]
    assert model(x).shape == (2, 7)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 128)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    assert model.classifier_parameter_names() == ["head.fc.weight", "head.fc.bias"]


def test_wrong_input_channels_is_a_clear_error() -> None:
    model = normfree.create_model("nf_resnet_cifar20")
    with pytest.raises(ValueError, match="expects 3 input channels"):
        model(torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        model(torch.randn(3, 8, 8))


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(KeyError, match="nf_resnet50"):
        normfree.create_model("nf_resnet5O")


def test_invalid_small_depth() -> None:
    with pytest.raises(ValueError, match="6n\\+2"):
        from normfree.models.layouts import cifar_depths

        cifar_depths(21)


def test_stochastic_depth_rates_per_block() -> None:
    model = normfree.create_model("nf_resnet50", stochdepth_rate=0.1)
    rates = [b.drop_path.drop_rate for _, b in model.residual_blocks()]
    assert rates == pytest.approx([0.1 * i / 16 for i in range(16)])


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_and_channels_last_and_autocast() -> None:
    torch.manual_seed(0)
    model = normfree.create_model("nf_resnet_cifar20", skipinit_init=1.0).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
        scripted = torch.jit.script(model)
        torch.testing.assert_close(scripted(x), ref, rtol=1e-5, atol=1e-5)
        cl = model.to(memory_format=torch.channels_last)
        torch.testing.assert_close(cl(x.to(memory_format=torch.channels_last)), ref,
                                   rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.05)


def test_batch_size_one_train_step_and_grad_checkpointing() -> None:
    torch.manual_seed(0)
    model = normfree.create_model("nf_resnet_cifar20", num_classes=3, skipinit_init=1.0)
    model.train()
    x, y = torch.randn(1, 3, 8, 8), torch.tensor([1])
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-7)


def test_block_is_residual_block_with_probe() -> None:
    model = normfree.create_model("nf_resnet_cifar20")
    blocks = [b for _, b in model.residual_blocks()]
    assert all(isinstance(b, NFResNetBlock) for b in blocks)
    assert [b.is_transition for b in blocks] == [False] * 3 + [True, False, False] * 2


@pytest.mark.parametrize("name", ["nf_resnet_cifar20", "bn_resnet_cifar20", "fixup_resnet_cifar20"])
def test_torch_compile_matches_eager(name: str) -> None:
    """Dynamo traces the models (backend="eager": graph capture without slow codegen on CPU)."""
    torch.manual_seed(0)
    model = normfree.create_model(name).eval()
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
