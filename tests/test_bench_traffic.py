"""benchmarks/bench_traffic.py: the pieces it times do the work it accounts for, and bad input
gets a one-line error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bench_traffic  # benchmarks/ (pytest's pythonpath)
from bench_traffic import main, weight_passes
from normfree.nn import ScaledStdConv2d, scaled_standardize


def test_ws_pieces_compute_the_scaled_ws_forward_and_backward(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(ScaledStdConv2d(3, 8, 3), nn.ReLU(), ScaledStdConv2d(8, 4, 1))
    outs: list[torch.Tensor] = []

    def spy(*args: object) -> torch.Tensor:
        out = scaled_standardize(*args)
        outs.append(out)
        return out

    monkeypatch.setattr(bench_traffic, "scaled_standardize", spy)
    pieces = weight_passes(model)
    assert set(pieces) == {"copy", "read", "ws forward", "ws forward+backward", "agc norms"}
    for fn in pieces.values():
        fn()
    # the forward piece is each conv's own standardization of its weight, with autograd
    for out, conv in zip(outs[:2], (model[0], model[2])):
        assert out.grad_fn is not None
        torch.testing.assert_close(out.detach(), conv.standardized_weight().detach())
    assert len(outs) == 4  # forward, then forward+backward
    assert [n.shape for n in pieces["agc norms"]()] == [(8,), (4,)]


def test_a_model_without_scaled_ws_is_refused() -> None:
    with pytest.raises(ValueError, match="no Scaled-WS"):
        weight_passes(nn.Sequential(nn.Conv2d(3, 4, 3)))


def test_cli_reports_the_bound_and_rejects_unknown_models(capsys: pytest.CaptureFixture) -> None:
    assert main(["--model", "nf_resnet_cifar20", "--rounds", "1", "--no-floor"]) == 0
    out = capsys.readouterr().out
    assert "Scaled-WS weights" in out and "total" in out and "bound ms" in out
    assert main(["--model", "no_such_model", "--no-floor"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown model" in err
