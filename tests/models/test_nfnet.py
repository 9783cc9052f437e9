"""NFNet F0–F7 / F0+–F7+ (Brock et al. 2021b): official structure, parameter tree, published
parameter and MAC counts, expected-variance schedule, SkipInit identity at init, API contract."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import normfree
from normfree.models import count_flops, count_params
from normfree.models.nfnet import NFNET_VARIANTS, NFNet, NFNetBlock
from normfree.nn import AvgPool2dSame, ScaledStdConv2d, SqueezeExcite

ALPHA = 0.2
GELU_GAMMA = 1.7015043497085571  # official base.nonlinearities['gelu']
TSV = Path(__file__).parent / "data" / "dm_nfnet_f0_params.tsv"

# Published table (nfnets/README.md, paper Table 2; F7 from the official count_flops):
# variant -> (params in M, rounding digits, MACs in B at the test size)
PUBLISHED = {
    "F0": (71.5, 1, 12.38),
    "F1": (132.6, 1, 35.54),
    "F2": (193.8, 1, 62.59),
    "F3": (254.9, 1, 114.76),
    "F4": (316.1, 1, 215.24),
    "F5": (377.2, 1, 289.76),
    "F6": (438.4, 1, 377.28),
    "F7": (499.50, 2, 478.78),
}


def _meta_model(name: str, **kwargs) -> NFNet:
    with torch.device("meta"):
        return normfree.create_model(name, **kwargs)


def _reference_counts(widths, depths, size: int) -> tuple[int, float]:
    """Independent closed form of the official parameter tree and ``NFNet.count_flops``."""
    params, macs, h = 0, 0.0, float(size)

    def conv(cin, cout, k, groups=1, stride=1):
        nonlocal params, macs, h
        params += k * k * cin // groups * cout + 2 * cout  # w, gain, bias
        macs += k * k * cin / groups * cout * h * h / stride**2

    for cin, cout, stride in ((3, 16, 2), (16, 32, 1), (32, 64, 1), (64, widths[0] // 2, 2)):
        conv(cin, cout, 3, stride=stride)
        h /= stride
    ch = widths[0] // 2
    for s, (width, depth) in enumerate(zip(widths, depths)):
        for b in range(depth):
            stride = 2 if (b == 0 and s > 0) else 1
            groups = int(width * 0.5) // 128
            mid = 128 * groups
            conv(ch, mid, 1)
            conv(mid, mid, 3, groups, stride)
            h /= stride
            conv(mid, mid, 3, groups)
            conv(mid, width, 1)
            if stride > 1 or ch != width:
                conv(ch, width, 1)
            hidden = width // 2
            params += 2 * width * hidden + hidden + width + 1  # SE fcs and skip_gain
            macs += 2 * width * hidden
            ch = width
    conv(ch, 2 * ch, 1)
    params += 2 * ch * 1000 + 1000
    macs += 2 * ch * 1000
    return params, macs


# ------------------------------------------------------------------------- parameter tree
def _official_key(module: str, param: str, depths) -> str:
    """Our parameter name for a row of the official Haiku tree (module paths such as
    ``NFNet/~/nf_block_3/~/conv1``; see normfree.checkpoints.deepmind)."""
    parts = module.split("/~/")
    if parts[1].startswith("stem_conv"):
        return f"stem.conv{int(parts[1][9:]) + 1}.{ {'w': 'weight'}.get(param, param) }"
    if parts[1] == "final_conv":
        return f"final.conv.{ {'w': 'weight'}.get(param, param) }"
    if parts[1] == "linear":
        return f"head.fc.{ {'w': 'weight', 'b': 'bias'}[param] }"
    index = 0 if parts[1] == "nf_block" else int(parts[1][len("nf_block_") :])
    stage = next(s for s in range(4) if index < sum(depths[: s + 1]))
    prefix = f"stages.{stage}.{index - sum(depths[:stage])}"
    if len(parts) == 2:
        assert param == "skip_gain"
        return f"{prefix}.skip_gain.gain"
    conv = {"conv0": "conv1", "conv1": "conv2", "conv1b": "conv2b", "conv2": "conv3",
            "conv_shortcut": "downsample.conv"}  # fmt: skip
    if parts[2] in conv:
        return f"{prefix}.{conv[parts[2]]}.{ {'w': 'weight'}.get(param, param) }"
    fc = {"linear": "attn_last.fc1", "linear_1": "attn_last.fc2"}[parts[3]]
    return f"{prefix}.{fc}.{ {'w': 'weight', 'b': 'bias'}[param] }"


def _official_shape(module: str, param: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if param == "w" and len(shape) == 4:  # HWIO -> OIHW
        return (shape[3], shape[2], shape[0], shape[1])
    if param == "w" and "squeeze_excite" in module:  # (in, out) linear -> 1x1 conv
        return (shape[1], shape[0], 1, 1)
    if param == "w":  # classifier (in, out) -> (out, in)
        return (shape[1], shape[0])
    return shape


def test_f0_parameter_tree_maps_one_to_one_onto_the_official_tree() -> None:
    model = _meta_model("nfnet_f0")
    ours = {n: tuple(p.shape) for n, p in model.named_parameters()}
    depths = NFNET_VARIANTS["F0"].depths
    official = {}
    for line in TSV.read_text().splitlines():
        module, param, shape = line.split("\t")
        dims = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
        official[_official_key(module, param, depths)] = _official_shape(module, param, dims)
    assert len(official) == 233 == len(ours)
    assert official == ours
    assert sum(math.prod(s) for s in official.values()) == 71_489_284 == count_params(model)


# ---------------------------------------------------------------------- published counts
@pytest.mark.parametrize("variant", list(PUBLISHED))
def test_published_parameter_and_mac_counts(variant: str) -> None:
    v = NFNET_VARIANTS[variant]
    model = _meta_model(f"nfnet_{variant.lower()}")
    assert model.meta.test_size == v.test_size
    params = count_params(model)
    macs = count_flops(model, v.test_size)
    want_params, digits, want_macs = PUBLISHED[variant]
    assert round(params / 1e6, digits) == want_params
    assert round(macs / 1e9, 2) == want_macs
    # exact agreement with an independent closed form of the official counting
    ref_params, ref_macs = _reference_counts((256, 512, 1536, 1536), v.depths, v.test_size)
    assert params == ref_params
    assert macs == round(ref_macs)


def test_plus_variants_are_wider_and_round_group_widths_down() -> None:
    names = normfree.list_models("nfnet_f*")
    assert names == sorted(
        [f"nfnet_f{i}" for i in range(8)] + [f"nfnet_f{i}_plus" for i in range(8)]
    )
    model = _meta_model("nfnet_f0_plus")
    assert [fi.num_chs for fi in model.feature_info] == [192, 384, 768, 2048, 2048]
    first = model.stages[0][0]
    # int(384·0.5) = 192 -> 1 group of 128 (official rounding), not 192
    assert (first.width, first.groups) == (128, 1)
    assert [model.stages[s][0].groups for s in range(4)] == [1, 3, 8, 8]
    ref_params, ref_macs = _reference_counts((384, 768, 2048, 2048), (1, 2, 6, 3), 256)
    assert count_params(model) == ref_params
    assert count_flops(model, 256) == round(ref_macs)
    assert model.meta.name == "nfnet_f0_plus" and model.meta.test_size == 256


# ------------------------------------------------------------------------------ structure
def test_f0_structure_and_metadata() -> None:
    model = _meta_model("nfnet_f0")
    stem = model.stem
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in
            (stem.conv1, stem.conv2, stem.conv3, stem.conv4)] == \
        [(3, 16, 2), (16, 32, 1), (32, 64, 1), (64, 128, 2)]  # fmt: skip
    # γ-activations between the convs, none after the last one
    assert [n for n, _ in stem.named_children()] == [
        "conv1", "act1", "conv2", "act2", "conv3", "act3", "conv4"]  # fmt: skip
    assert all(stem.get_submodule(f"conv{i}").same_padding for i in range(1, 5))
    assert [fi.num_chs for fi in model.feature_info] == [128, 256, 512, 1536, 1536]
    assert [fi.reduction for fi in model.feature_info] == [4, 4, 8, 16, 32]
    assert [model.stages[s][0].groups for s in range(4)] == [1, 2, 6, 6]
    assert [model.stages[s][0].width for s in range(4)] == [128, 256, 768, 768]
    blocks = [b for _, b in model.residual_blocks()]
    assert len(blocks) == 12 and all(isinstance(b, NFNetBlock) for b in blocks)
    # shortcut: pooled 1x1 conv at strided blocks, plain 1x1 conv on a channel change, else x
    first = model.stages[0][0]
    assert isinstance(first.downsample.pool, torch.nn.Identity)
    for s in (1, 2, 3):
        pool = model.stages[s][0].downsample.pool
        assert isinstance(pool, AvgPool2dSame) and (pool.kernel_size, pool.stride) == (2, 2)
        assert all(b.downsample is None for b in model.stages[s][1:])
    for b in blocks:
        se = b.attn_last
        assert isinstance(se, SqueezeExcite) and se.gate_gain == 2.0
        assert isinstance(se.act, torch.nn.ReLU)  # unscaled ReLU inside the SE
        assert se.fc1.out_channels == b.conv3.out_channels // 2
        assert b.conv2b is not None and b.conv2b.groups == b.conv2.groups
        assert b.act.name == "gelu" and b.act.gamma == GELU_GAMMA
        assert isinstance(b.act.act, torch.nn.GELU) and b.act.act.approximate == "tanh"
        assert b.alpha == ALPHA and b.skip_gain.gain.shape == ()
    assert model.final.conv.out_channels == 3072
    assert model.head.fc.in_features == 3072 and model.head.init_std == 0.01
    # stochastic depth rate·i/N over all blocks, default 0.25 (official training config)
    assert [b.drop_path.drop_rate for b in blocks] == pytest.approx(
        [0.25 * i / 12 for i in range(12)]
    )
    meta = model.meta
    assert (meta.family, meta.train_size, meta.test_size, meta.drop_rate, meta.stochdepth_rate) == (
        "nfnet", 192, 256, 0.2, 0.25)  # fmt: skip
    assert model.head.drop_rate == 0.2
    assert "2102.06171" in meta.paper


def test_variant_metadata_follows_official_table() -> None:
    for variant in NFNET_VARIANTS:
        fn = normfree.models.model_entrypoint(f"nfnet_{variant.lower()}")
        assert fn.__doc__ and variant in fn.__doc__
    assert NFNET_VARIANTS["F3"].depths == (4, 8, 24, 12)
    assert [NFNET_VARIANTS[k].drop_rate for k in NFNET_VARIANTS] == [0.2, 0.3, 0.4, 0.4] + [0.5] * 4
    assert [NFNET_VARIANTS[k].train_size for k in NFNET_VARIANTS] == [
        192, 224, 256, 320, 384, 416, 448, 480]  # fmt: skip


def test_beta_schedule_follows_expected_variance_with_resets() -> None:
    model = _meta_model("nfnet_f1")
    expected, var = [], 1.0
    for depth in NFNET_VARIANTS["F1"].depths:
        for b in range(depth):
            expected.append(var**-0.5)
            var = (1.0 if b == 0 else var) + ALPHA**2
    assert [b.beta_multiplier for _, b in model.residual_blocks()] == pytest.approx(expected, 1e-12)
    assert model.expected_variances[:2] == pytest.approx([1.04, 1.08])
    assert model.expected_variances[2:6] == pytest.approx([1.04, 1.08, 1.12, 1.16])


# ------------------------------------------------------------------ numerics on a tiny NFNet
def _tiny(**kwargs) -> NFNet:
    cfg = dict(depths=(1, 2, 1, 1), widths=(32, 64, 96, 96), group_size=8, num_classes=5,
               stem_channels=(8, 8, 16))  # fmt: skip
    cfg.update(kwargs)
    return NFNet(**cfg)


def _avg_pool_same_reference(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
    """Loop over windows of a TF 'SAME' pool, averaging in-bounds elements only."""
    h, w = x.shape[-2:]
    oh, ow = -(-h // s), -(-w // s)
    top = max((oh - 1) * s + k - h, 0) // 2
    left = max((ow - 1) * s + k - w, 0) // 2
    out = torch.empty(*x.shape[:-2], oh, ow, dtype=x.dtype)
    for i in range(oh):
        for j in range(ow):
            r0, c0 = i * s - top, j * s - left
            win = x[..., max(r0, 0) : min(r0 + k, h), max(c0, 0) : min(c0 + k, w)]
            out[..., i, j] = win.mean(dim=(-2, -1))
    return out


@pytest.mark.parametrize("size,k,s", [((7, 8), 2, 2), ((5, 5), 2, 2), ((8, 8), 2, 2),
                                      ((7, 6), 3, 2), ((4, 5), 3, 3)])  # fmt: skip
def test_avg_pool_same_excludes_padding(size, k, s) -> None:
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(AvgPool2dSame(k, s)(x), _avg_pool_same_reference(x, k, s),
                               rtol=1e-6, atol=1e-6)  # fmt: skip


def _ws(conv: ScaledStdConv2d) -> torch.Tensor:
    w = conv.weight
    centered = w - w.mean(dim=(1, 2, 3), keepdim=True)
    n_var = centered.pow(2).sum(dim=(1, 2, 3), keepdim=True)
    return centered * torch.rsqrt(n_var.clamp_min(1e-4)) * conv.gain.view(-1, 1, 1, 1)


def _conv_same(x: torch.Tensor, conv: ScaledStdConv2d) -> torch.Tensor:
    k, s = conv.kernel_size[0], conv.stride[0]
    pads = []
    for n in (x.shape[-1], x.shape[-2]):
        total = max((-(-n // s) - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    return F.conv2d(F.pad(x, pads), _ws(conv), conv.bias, s, groups=conv.groups)


def test_block_forward_matches_an_explicit_reference() -> None:
    """Official NFBlock order on an odd-sized input (SAME padding and pool on odd sizes)."""
    torch.manual_seed(0)
    block = NFNetBlock(16, 32, stride=2, beta_multiplier=0.8, alpha=ALPHA, group_size=8,
                       drop_path_rate=0.3)  # fmt: skip
    with torch.no_grad():
        block.skip_gain.gain.fill_(0.7)
        for p in block.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    block.eval()
    x = torch.randn(2, 16, 7, 7)

    def act(t):
        return F.gelu(t, approximate="tanh") * GELU_GAMMA

    out = act(x) * 0.8
    shortcut = _conv_same(_avg_pool_same_reference(out, 2, 2), block.downsample.conv)
    r = _conv_same(out, block.conv1)
    r = _conv_same(act(r), block.conv2)
    r = _conv_same(act(r), block.conv2b)
    r = _conv_same(act(r), block.conv3)
    se = block.attn_last
    g = F.relu(F.conv2d(r.mean(dim=(2, 3), keepdim=True), se.fc1.weight, se.fc1.bias))
    r = r * (2 * torch.sigmoid(F.conv2d(g, se.fc2.weight, se.fc2.bias)))
    expected = r * 0.7 * ALPHA + shortcut
    with torch.no_grad():
        got = block(x)
    assert got.shape == (2, 32, 4, 4)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_skipinit_blocks_output_their_shortcut_at_init() -> None:
    torch.manual_seed(0)
    model = _tiny().eval()
    seen = []

    def hook(block, inputs, output):
        x = inputs[0]
        if block.downsample is None:
            assert torch.equal(output, x)
        else:
            shortcut = block.downsample(block.act(x) * block.beta_multiplier)
            # γ/β rides in the shortcut conv's weight (folded scales): equal up to rounding
            torch.testing.assert_close(output, shortcut, rtol=1e-6, atol=1e-6)
        seen.append(block)

    handles = [b.register_forward_hook(hook) for _, b in model.residual_blocks()]
    with torch.no_grad():
        model(torch.randn(2, 3, 33, 33))
    for h in handles:
        h.remove()
    assert len(seen) == 5


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_tiny_nfnet_is_batch_independent_scriptable_and_trains_at_batch_one() -> None:
    torch.manual_seed(0)
    model = _tiny(skipinit_init=1.0, drop_rate=0.0, stochdepth_rate=0.0).eval()
    x = torch.randn(8, 3, 35, 35)  # odd size: SAME padding and pooling on odd maps
    with torch.no_grad():
        full = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(8)])
        torch.testing.assert_close(single, full, rtol=1e-5, atol=1e-6)
        scripted = torch.jit.script(model)
        torch.testing.assert_close(scripted(x), full, rtol=1e-5, atol=1e-5)
        cl = model.to(memory_format=torch.channels_last)
        torch.testing.assert_close(cl(x.to(memory_format=torch.channels_last)), full,
                                   rtol=1e-4, atol=1e-4)  # fmt: skip
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
        assert torch.isfinite(low).all()
        torch.testing.assert_close(low.float(), full, rtol=0.1, atol=0.05)
    model.train()
    loss = F.cross_entropy(model(x[:1]), torch.tensor([2]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_nfnet_f0_forward_intermediates_and_classifier_reset() -> None:
    """One real forward of the full F0 on a 64×64 image."""
    torch.manual_seed(0)
    model = normfree.create_model("nfnet_f0").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_intermediates(x, intermediates_only=True)
        logits = model.forward_head(model.final(feats[-1]))
    assert [f.shape[1] for f in feats] == [fi.num_chs for fi in model.feature_info]
    assert [64 // f.shape[-1] for f in feats] == [fi.reduction for fi in model.feature_info]
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()
    model.reset_classifier(10)
    assert model.num_classes == 10 and model.head.fc.weight.shape == (10, 3072)
    assert model.classifier_parameter_names() == ["head.fc.weight", "head.fc.bias"]
    assert 0.007 < model.head.fc.weight.std().item() < 0.013  # N(0, 0.01), 30720 draws
    with torch.no_grad():
        assert model(x).shape == (1, 10)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (1, 3072)


def test_bad_configurations_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="one entry per stage"):
        NFNet(depths=(1, 2), widths=(256,), strides=(1, 2))
    with pytest.raises(ValueError, match="group size"):
        NFNet(depths=(1,), widths=(64,), strides=(1,))  # int(64·0.5) < 128
    with pytest.raises(ValueError, match="at least one block"):
        NFNet(depths=(0, 1, 1, 1), widths=(256, 512, 1536, 1536))
    for bad in (0, -8, 1.5):  # 0 was a ZeroDivisionError, -8 blamed the bottleneck width
        with pytest.raises(ValueError, match="group_size must be a positive int"):
            NFNet(depths=(1, 1, 1, 1), widths=(256, 512, 1536, 1536), group_size=bad)
    with pytest.raises(TypeError):
        normfree.create_model("nfnet_f0", not_an_option=1)


@pytest.mark.parametrize(
    "name", ["nf_resnet_cifar20", "nfnet_f0", "nf_regnet_b0", "efficientnet_b0_g16_gn"]
)
def test_an_activation_that_halves_the_channels_is_refused(name: str) -> None:
    """``glu`` is in the official γ table, but it splits the channels in two: a model built
    with it used to fail in its first conv with a shape error."""
    with pytest.raises(ValueError, match=r"'glu' halves the channels.*keeps them: .*relu"):
        normfree.create_model(name, activation="glu")
    with pytest.raises(ValueError, match="unknown activation 'nope'"):
        normfree.create_model(name, activation="nope")


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -0.1])
def test_alpha_must_be_finite_and_non_negative(alpha: float) -> None:
    """NaN slipped through ``alpha < 0`` and gave NaN outputs."""
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        normfree.create_model("nf_resnet_cifar20", alpha=alpha)
