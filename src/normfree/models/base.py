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

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from normfree.nn.residual import ResidualBlock

__all__ = [
    "FeatureInfo",
    "FeatureInfoList",
    "ModelMeta",
    "NormFreeModel",
    "check_image_batch",
    "feature_take_indices",
]


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
SMALL_IMAGE_MAX = 64  # models whose test size is at most this are small-image (CIFAR) models


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
        crop_pct / interpolation / mean / std: the evaluation preprocessing; ``None`` derives
            it (:meth:`data_config`).
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
    crop_pct: float | None = None
    interpolation: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def with_updates(self, **changes: Any) -> ModelMeta:
        return replace(self, **changes)

    @property
    def small_image(self) -> bool:
        """A small-image (CIFAR-style, 32 px) model rather than an ImageNet one."""
        return self.test_size <= SMALL_IMAGE_MAX

    def data_config(self, in_chans: int = 3) -> dict[str, Any]:
        """The model's input preprocessing with timm's ``pretrained_cfg`` keys.

        ImageNet models: train at ``train_size``, evaluate at ``test_size`` after resizing the
        short side to ``size + 32`` and centre-cropping (the official NFNet eval
        ``resize_crop_32``, Brock et al. 2021b, and :mod:`normfree.data`'s image-folder eval),
        i.e. ``crop_pct = size / (size + 32)``; bicubic resizing; ImageNet mean/std.
        Small-image models: the whole 32 px image (``crop_pct = 1``), bilinear, CIFAR-10
        mean/std. Fields set on the meta take precedence.
        """
        small = self.small_image
        size, test = self.train_size, self.test_size
        if self.crop_pct is not None:
            crop, test_crop = self.crop_pct, self.crop_pct
        elif small:
            crop, test_crop = 1.0, 1.0
        else:
            crop, test_crop = size / (size + 32), test / (test + 32)
        return {
            "input_size": (in_chans, size, size),
            "test_input_size": (in_chans, test, test),
            "interpolation": self.interpolation or ("bilinear" if small else "bicubic"),
            "crop_pct": crop,
            "test_crop_pct": test_crop,
            "crop_mode": "center",
            "mean": self.mean or (CIFAR10_MEAN if small else IMAGENET_MEAN),
            "std": self.std or (CIFAR10_STD if small else IMAGENET_STD),
        }


class FeatureInfo(dict):
    """One feature map offered to a downstream head (detection, segmentation): a dict with
    timm's keys ``module`` (``"stem"`` or ``"stages.S"``), ``num_chs`` and ``reduction``, also
    readable as attributes (``info.num_chs``)."""

    def __init__(self, module: str, num_chs: int, reduction: int, **extra: Any) -> None:
        super().__init__(module=module, num_chs=num_chs, reduction=reduction, **extra)

    @property
    def module(self) -> str:
        return self["module"]

    @property
    def num_chs(self) -> int:
        return self["num_chs"]

    @property
    def reduction(self) -> int:
        return self["reduction"]

    def __repr__(self) -> str:
        return f"FeatureInfo({dict.__repr__(self)})"


class FeatureInfoList(list):
    """A model's feature maps (a list of :class:`FeatureInfo`) with the accessors of timm's
    ``FeatureInfo``: ``channels()``, ``reduction()``, ``module_name()``, ``get(key)`` and
    ``get_dicts()`` read the entries at ``out_indices`` (all of them unless set), or at ``idx``
    (an index or a list of indices)."""

    def __init__(self, infos: Any = (), out_indices: Sequence[int] | None = None) -> None:
        super().__init__(infos)
        self._out_indices = None if out_indices is None else tuple(out_indices)

    @property
    def out_indices(self) -> tuple[int, ...]:
        return tuple(range(len(self))) if self._out_indices is None else self._out_indices

    def get(self, key: str, idx: int | Sequence[int] | None = None) -> Any:
        if idx is None:
            return [self[i][key] for i in self.out_indices]
        if isinstance(idx, Sequence):  # a list, tuple, range...: the annotation's Sequence[int]
            return [self[i][key] for i in idx]
        return self[idx][key]

    def get_dicts(
        self, keys: Sequence[str] | None = None, idx: int | Sequence[int] | None = None
    ) -> Any:
        def pick(i: int) -> dict[str, Any]:
            return dict(self[i]) if keys is None else {k: self[i][k] for k in keys}

        if idx is None:
            return [pick(i) for i in self.out_indices]
        if isinstance(idx, Sequence):
            return [pick(i) for i in idx]
        return pick(idx)

    def channels(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("module", idx)


def feature_take_indices(
    num_features: int, indices: int | Sequence[int] | None = None
) -> tuple[list[int], int]:
    """timm's rule for which feature maps to take: ``None`` all, an int ``n`` the last ``n``, a
    sequence those indices (negative ones count from the end). Returns the absolute indices and
    their maximum."""
    if indices is None:
        indices = num_features
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise ValueError(f"last-n ({indices}) is out of range (1 to {num_features})")
        take = [num_features - indices + i for i in range(indices)]
    else:
        take = []
        for i in indices:
            idx = num_features + i if i < 0 else i
            if not 0 <= idx < num_features:
                raise ValueError(
                    f"feature index {idx} is out of range (0 to {num_features - 1})"
                )
            take.append(idx)
        if not take:
            raise ValueError("indices must name at least one feature map")
    return take, max(take)


def check_image_batch(x: torch.Tensor, in_chans: int) -> None:
    """Raise ``ValueError`` unless ``x`` is a floating-point ``(N, in_chans, H, W)`` batch with
    ``H, W >= 1`` (a ``torch.fx`` leaf, so that traced models keep the check)."""
    if x.dim() != 4:
        raise ValueError(
            "expected an image batch of shape (N, C, H, W), got shape " + str(x.shape)
        )
    if x.shape[1] != in_chans:
        raise ValueError(
            "model expects " + str(in_chans) + " input channels, got "
            + str(x.shape[1]) + " (input shape " + str(x.shape) + ")"
        )
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(
            "image height and width must be at least 1 pixel (normfree models take any size "
            "from 1×1 up), got shape " + str(x.shape)
        )
    if not x.is_floating_point():
        raise ValueError(
            "expected a floating-point image batch, got dtype " + str(x.dtype)
            + ": convert it first, e.g. x.float() / 255 and normalise with the model's "
            "pretrained_cfg mean and std"
        )


torch.fx.wrap("check_image_batch")


@contextlib.contextmanager
def _buffers_kept(buffers: Sequence[torch.Tensor]) -> Iterator[None]:
    """Restore ``buffers`` on exit to their values on entry: the recomputation of a
    checkpointed block must not update running statistics a second time."""
    saved = [b.detach().clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in zip(buffers, saved):
                b.copy_(v)


class NormFreeModel(nn.Module):
    """Base class of all normfree image classifiers (see module docstring for the contract).

    Subclasses build ``stem``, ``stages``, ``final``, ``head``, set ``meta`` and ``feature_info``,
    and call ``self.init_weights()`` at the end of ``__init__`` if they need custom init.

    The model API is timm's (same names, arguments and return values): ``forward_features``,
    ``forward_head(pre_logits=)``, ``forward_intermediates``, ``prune_intermediate_layers``,
    ``reset_classifier(num_classes, global_pool)``, ``get_classifier``, ``group_matcher``,
    ``no_weight_decay``, ``set_grad_checkpointing``, ``num_features``, ``head_hidden_size``,
    ``feature_info`` and ``pretrained_cfg`` / ``default_cfg``.
    """

    # Set by subclasses (no class-level annotations: TorchScript would try to resolve them):
    # meta: ModelMeta, feature_info: list[FeatureInfo], in_chans: int, stem, stages (ModuleList of
    # Sequential), final, head (ClassifierHead).
    __jit_unused_properties__: ClassVar[list[str]] = [
        "feature_info", "pretrained_cfg", "default_cfg", "head_hidden_size",
    ]  # fmt: skip

    def __init__(self) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.in_chans = 3

    # ----------------------------------------------------------------- forward
    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(x, self.in_chans)
        return self.stem(x)

    def _run_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One stage; per-block gradient checkpointing when enabled in training.

        The backward pass runs each block's forward a second time; that recomputation keeps
        the block's buffers as the first pass left them (:func:`_buffers_kept`), so a
        BatchNorm model's running statistics (and ``num_batches_tracked``) take one update per
        step, as without checkpointing, not two."""
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            # a compiled graph recomputes functionally: its buffers update once already (and
            # Dynamo takes no custom checkpoint context)
            keep_buffers = not torch.compiler.is_compiling()
            for block in stage:
                buffers = [b for b in block.buffers() if b.numel()] if keep_buffers else []
                if buffers:
                    x = checkpoint(
                        block, x, use_reentrant=False,
                        context_fn=lambda bufs=buffers: (
                            contextlib.nullcontext(), _buffers_kept(bufs)
                        ),
                    )  # fmt: skip
                else:
                    x = checkpoint(block, x, use_reentrant=False)
            return x
        return stage(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image → last feature map (after ``final``), before pooling."""
        x = self.forward_stem(x)
        if torch.jit.is_scripting():
            for stage in self.stages:
                x = stage(x)
        else:
            for stage in self.stages:
                x = self._run_stage(stage, x)
        return self.final(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map → logits (or pooled features with ``pre_logits=True``)."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.unused
    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward pass that also returns feature maps (timm's signature and semantics).

        Feature ``0`` is the stem output and feature ``i`` the output of stage ``i - 1``, as in
        ``feature_info``.

        Args:
            x: image batch ``(N, C, H, W)``.
            indices: ``None`` takes every feature map, an int ``n`` the last ``n``, a sequence
                those indices (negative ones count from the end).
            norm: apply the model's ``final`` module (its final norm / conv + activation) to the
                last feature map when it is taken.
            stop_early: stop after the last stage needed by ``indices``.
            output_fmt: only ``"NCHW"``.
            intermediates_only: return only the list of feature maps.

        Returns:
            The list of feature maps, or ``(final_features, feature_maps)`` where
            ``final_features`` equals :meth:`forward_features` (``forward_head`` applies to it)
            when every stage ran.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        last = len(self.stages)
        take, max_index = feature_take_indices(last + 1, indices)
        intermediates = []
        x = self.forward_stem(x)
        if 0 in take:
            intermediates.append(x)
        stages = list(self.stages)[:max_index] if stop_early else list(self.stages)
        for feat_idx, stage in enumerate(stages, start=1):
            x = self._run_stage(stage, x)
            if feat_idx in take:
                intermediates.append(self.final(x) if norm and feat_idx == last else x)
        if intermediates_only:
            return intermediates
        if len(stages) == last:
            x = self.final(x)
        return x, intermediates

    def prune_intermediate_layers(
        self,
        indices: int | Sequence[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Remove the layers that the feature maps ``indices`` do not need (timm's semantics):
        the stages after the last one taken; ``final`` when it is not reached or
        ``prune_norm``; the classifier (``reset_classifier(0, '')``) when ``prune_head`` or
        when the features no longer have the classifier's width (the network ends before its
        last stage, or a channel-changing ``final`` went). ``num_features`` then reads the
        width of the last feature map kept. Returns the absolute indices kept (valid for
        :meth:`forward_intermediates` afterwards)."""
        take, max_index = feature_take_indices(len(self.stages) + 1, indices)
        width = self.feature_info[max_index]["num_chs"]
        prune_end = max_index < len(self.stages)
        self.stages = self.stages[:max_index]
        if prune_end or prune_norm:
            self.final = nn.Identity()
        # the head is rebuilt for the last map kept unless it reads that very map
        refit = prune_end or (prune_norm and width != self.head.in_features)
        if refit:
            head = self.head
            self.head = type(head)(
                width, 0, drop_rate=head.drop_rate, init_std=head.init_std, global_pool="",
            ).train(head.training)  # fmt: skip
        if prune_head or refit:
            self.reset_classifier(0, "")
        return take

    # ----------------------------------------------------------- declarations
    @property
    def feature_info(self) -> FeatureInfoList:
        """The feature maps offered as a backbone (:class:`FeatureInfo` dicts, timm's keys)."""
        return self.__dict__["_feature_info"]

    @feature_info.setter
    def feature_info(self, infos: Sequence[FeatureInfo]) -> None:
        self.__dict__["_feature_info"] = FeatureInfoList(infos)

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def num_features(self) -> int:
        """Channels of the last feature map (before pooling)."""
        return self.head.in_features

    @property
    def head_hidden_size(self) -> int:
        """Width of the pooled features the classifier reads (``forward_head(pre_logits=True)``)."""
        return self.head.pooled_features

    def get_classifier(self, name_only: bool = False) -> nn.Module | str:
        return "head.fc" if name_only else self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (e.g. for fine-tuning on a new label set); ``global_pool``
        (``"avg"``, ``"max"``, ``"avgmax"``, ``"catavgmax"`` or ``""`` for none) changes the
        pooling, ``None`` keeps it. The new classifier takes the device and dtype of the
        model's first parameter, as timm's ``reset_classifier`` (``get_device_dtype``)."""
        ref = next((p for n, p in self.named_parameters() if not n.startswith("head.")), None)
        self.head.reset(num_classes, global_pool)
        if ref is not None:
            self.head.to(device=ref.device, dtype=ref.dtype)

    def classifier_parameter_names(self) -> list[str]:
        """Names of the classifier's parameters; AGC excludes the classifier by default."""
        return [f"head.fc.{n}" for n, _ in self.head.fc.named_parameters()]

    def no_weight_decay_names(self) -> set[str]:
        """Parameters that take no weight decay: gains, biases and scalars (every tensor with
        ndim ≤ 1), as in the NFNet recipe (Brock et al. 2021b, App. C)."""
        return {n for n, p in self.named_parameters() if p.ndim <= 1}

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """timm's name for :meth:`no_weight_decay_names` (read by timm's optimizer factory)."""
        return self.no_weight_decay_names()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups in timm's format, from input to output: the stem, then one group
        per block (per stage with ``coarse=True``), then ``final``; the classifier falls in the
        last group. Used by timm's layer-wise learning-rate decay
        (``timm.optim.param_groups_layer_decay``)."""
        blocks = r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)"
        return {"stem": r"^stem", "blocks": [(blocks, None), (r"^final", (99999,))]}

    def lr_scale(self, name: str) -> float:
        """Learning-rate multiplier for a parameter (1.0 unless the method says otherwise)."""
        return 1.0

    def residual_blocks(self) -> Iterator[tuple[str, ResidualBlock]]:
        """Every residual block, in forward order, with its qualified name."""
        for name, module in self.named_modules():
            if isinstance(module, ResidualBlock):
                yield name, module

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass to save memory."""
        self.grad_checkpointing = bool(enable)

    # ------------------------------------------------------- pretrained config
    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """timm's ``pretrained_cfg`` dict: the model's real train/test input sizes, crop,
        interpolation, mean/std (:meth:`ModelMeta.data_config`), class count, pool size, first
        conv and classifier names; weight-source keys (``file``…) are set by ``create_model``."""
        cfg = self.__dict__.get("_pretrained_cfg")
        if cfg is None:
            cfg = self.__dict__["_pretrained_cfg"] = self.default_pretrained_cfg()
        return cfg

    @pretrained_cfg.setter
    def pretrained_cfg(self, cfg: dict[str, Any]) -> None:
        self.__dict__["_pretrained_cfg"] = dict(cfg)

    @property
    def default_cfg(self) -> dict[str, Any]:
        """timm's older name for :attr:`pretrained_cfg` (the same dict)."""
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, cfg: dict[str, Any]) -> None:
        self.pretrained_cfg = cfg

    def default_pretrained_cfg(self, num_classes: int | None = None) -> dict[str, Any]:
        """A fresh :attr:`pretrained_cfg` (``num_classes`` defaults to the classifier's)."""
        cfg: dict[str, Any] = dict.fromkeys(_SOURCE_KEYS)
        cfg.update(architecture=self.meta.name, tag=None, custom_load=False)
        cfg.update(self.meta.data_config(self.in_chans))
        reduction = self.feature_info[-1]["reduction"] if self.feature_info else 1
        train, test = cfg["input_size"][-1], cfg["test_input_size"][-1]
        first_conv = next(
            (f"stem.{n}" for n, m in self.stem.named_modules() if isinstance(m, nn.Conv2d)), None
        )
        cfg.update(
            min_input_size=None, fixed_input_size=False,
            num_classes=self.num_classes if num_classes is None else num_classes,
            pool_size=(-(-train // reduction),) * 2, test_pool_size=(-(-test // reduction),) * 2,
            first_conv=first_conv, classifier="head.fc", license="apache-2.0",
            paper_name=self.meta.paper or None,
        )  # fmt: skip
        return cfg

    # ----------------------------------------------------------------- weights
    def load_pretrained(
        self, checkpoint_path: str | os.PathLike[str], prefix: str = "", *,
        trust_pickle: bool = False,
    ) -> None:
        """Load a weights file, strictly, in any format :func:`normfree.load_pretrained` reads
        (normfree files and checkpoints, timm ``dm_nfnet_f*`` state dicts, ``.safetensors``,
        DeepMind's ``.npz``).

        This is timm's method for files its own loader does not read: ``timm.models.
        load_checkpoint``, and so ``timm.create_model(..., checkpoint_path=PATH)``, hands
        ``.npz`` / ``.npy`` files to ``model.load_pretrained(PATH)``. DeepMind's official
        ``F*_haiku.npz`` files are pickles and load only with ``trust_pickle=True`` (create the
        model, then call this). ``prefix`` (timm's key prefix inside an archive) must be empty.
        """
        if prefix:
            raise ValueError(f"prefix={prefix!r} is not supported: normfree reads whole files")
        from normfree.models.registry import load_weights_file  # the registry imports this module

        load_weights_file(self, checkpoint_path, trust_pickle=trust_pickle)

    def reset_parameters(self) -> None:
        """Re-initialise every submodule that defines ``reset_parameters``, then apply the
        model's own init (``init_weights``).

        Children are reset before the modules that hold them, so that a container's own init
        of its children wins (e.g. :class:`~normfree.nn.ClassifierHead` draws ``fc.weight``
        from N(0, 0.01²) or zeros, which ``nn.Linear``'s default reset would overwrite): after
        ``model.to_empty(device=...)`` this gives the same distributions as a fresh model."""
        modules = [m for m in self.modules() if m is not self]
        for module in reversed(modules):  # descendants come after their ancestors in modules()
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        self.init_weights()

    def init_weights(self) -> None:
        """Model-specific initialisation applied after the modules' own (override)."""


#: timm's weight-source keys of a ``pretrained_cfg`` (only ``file`` is used: nothing downloads)
_SOURCE_KEYS = ("url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source")
