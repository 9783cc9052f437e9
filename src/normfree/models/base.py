"""The contract every normfree model follows, so the rest of the system never guesses.

A model is ``stem → stages → final → head``:

* ``stem``: module from the image to the first feature map;
* ``stages``: an ``nn.ModuleList`` of ``nn.Sequential`` stages of blocks (residual blocks derive
  from :class:`normfree.nn.ResidualBlock`);
* ``final``: what follows the last stage before pooling (a final conv and/or activation,
  or ``nn.Identity``);
* ``head``: a :class:`normfree.nn.ClassifierHead` (pool → dropout → ``fc``).

The model *declares* what training and analysis need: its :class:`ModelMeta` (default
resolutions, regularisation, recipe hints), its classifier (excluded from AGC, Brock et al. 2021b
§4.1), the parameters that take no weight decay, per-parameter learning-rate scales (Fixup's
scalars at lr/10) and its feature maps for use as a backbone.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from normfree.nn.residual import ResidualBlock

__all__ = ["FeatureInfo", "ModelMeta", "NormFreeModel"]


@dataclass(frozen=True)
class ModelMeta:
    """What a model tells the rest of the system about itself.

    Attributes:
        name: registered name.
        family: e.g. ``"nf_resnet"``, ``"nfnet"``, ``"bn_resnet"``.
        train_size / test_size: default image sizes for training and evaluation.
        drop_rate: dropout before the classifier.
        stochdepth_rate: the network-wide stochastic-depth rate (block i gets ``rate·i/N``).
        uses_batch_stats: True for models with BatchNorm (batch dependent).
        recipe: training hints read by ``normfree.train`` (e.g. ``{"agc": False}`` for BN
            baselines, ``{"scalar_lr_scale": 0.1}`` for Fixup).
        paper: the paper the architecture comes from.
    """

    name: str
    family: str
    train_size: int = 224
    test_size: int = 224
    drop_rate: float = 0.0
    stochdepth_rate: float = 0.0
    uses_batch_stats: bool = False
    recipe: dict[str, Any] = field(default_factory=dict)
    paper: str = ""

    def with_updates(self, **changes: Any) -> ModelMeta:
        return replace(self, **changes)


@dataclass(frozen=True)
class FeatureInfo:
    """One feature map offered to a downstream head (detection, segmentation)."""

    module: str  # "stem" or "stages.S"
    num_chs: int
    reduction: int


class NormFreeModel(nn.Module):
    """Base class of all normfree image classifiers (see module docstring for the contract).

    Subclasses build ``stem``, ``stages``, ``final``, ``head``, set ``meta`` and ``feature_info``,
    and call ``self.init_weights()`` at the end of ``__init__`` if they need custom init.
    """

    # Set by subclasses (no class-level annotations: TorchScript would try to resolve them):
    # meta: ModelMeta, feature_info: list[FeatureInfo], in_chans: int, stem, stages (ModuleList of
    # Sequential), final, head (ClassifierHead).

    def __init__(self) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.in_chans = 3

    # ----------------------------------------------------------------- forward
    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(
                "expected an image batch of shape (N, C, H, W), got shape " + str(x.shape)
            )
        if x.shape[1] != self.in_chans:
            raise ValueError(
                "model expects " + str(self.in_chans) + " input channels, got "
                + str(x.shape[1]) + " (input shape " + str(x.shape) + ")"
            )
        return self.stem(x)

    def _run_stages_eager(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every stage's output; per-block gradient checkpointing when enabled in training."""
        outs = []
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for stage in self.stages:
            if use_ckpt:
                for block in stage:
                    x = checkpoint(block, x, use_reentrant=False)
            else:
                x = stage(x)
            outs.append(x)
        return outs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image → last feature map (after ``final``), before pooling."""
        x = self.forward_stem(x)
        if torch.jit.is_scripting():
            for stage in self.stages:
                x = stage(x)
        else:
            x = self._run_stages_eager(x)[-1]
        return self.final(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map → logits (or pooled features with ``pre_logits=True``)."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Multi-scale features for use as a backbone: the stem output and each stage's output,
        in the order of ``feature_info``."""
        x = self.forward_stem(x)
        return [x, *self._run_stages_eager(x)]

    # ----------------------------------------------------------- declarations
    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def num_features(self) -> int:
        return self.head.in_features

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier (e.g. for fine-tuning on a new label set)."""
        self.head.reset(num_classes)

    def classifier_parameter_names(self) -> list[str]:
        """Names of the classifier's parameters; AGC excludes the classifier by default."""
        return [f"head.fc.{n}" for n, _ in self.head.fc.named_parameters()]

    def no_weight_decay_names(self) -> set[str]:
        """Parameters that take no weight decay: gains, biases and scalars (every tensor with
        ndim ≤ 1), as in the NFNet recipe (Brock et al. 2021b, App. C)."""
        return {n for n, p in self.named_parameters() if p.ndim <= 1}

    def lr_scale(self, name: str) -> float:
        """Learning-rate multiplier for a parameter (1.0 unless the method says otherwise)."""
        return 1.0

    def residual_blocks(self) -> Iterator[tuple[str, ResidualBlock]]:
        """Every residual block, in forward order, with its qualified name."""
        for name, module in self.named_modules():
            if isinstance(module, ResidualBlock):
                yield name, module

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass to save memory."""
        self.grad_checkpointing = bool(enable)

    def reset_parameters(self) -> None:
        """Re-initialise every submodule that defines ``reset_parameters``, then apply the
        model's own init (``init_weights``)."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        self.init_weights()

    def init_weights(self) -> None:
        """Model-specific initialisation applied after the modules' own (override)."""
