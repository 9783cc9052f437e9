"""The model zoo. Importing this package registers every family."""

# Families register themselves on import (one module per family): NF-ResNets, NFNets F0–F7(+),
# NF-RegNets B0–B8; baselines: Fixup and BN / WS+GN / GN / LN / GN+PN / LN+PN / SkipInit / ReZero
# pre-activation ResNets; MSR ResNets; EfficientNets B0–B5 (G1/G16 × BN/GN/LN+PN).
from normfree.models import (  # noqa: F401
    efficientnet,
    fixup,
    msr_resnet,
    nf_regnet,
    nf_resnet,
    nfnet,
    resnet,
    skipinit_resnet,
)
from normfree.models.base import FeatureInfo, ModelMeta, NormFreeModel
from normfree.models.flops import count_flops, count_params
from normfree.models.registry import (
    UnknownModelError,
    create_model,
    list_models,
    model_entrypoint,
    register_model,
)

__all__ = [
    "FeatureInfo",
    "ModelMeta",
    "NormFreeModel",
    "UnknownModelError",
    "count_flops",
    "count_params",
    "create_model",
    "list_models",
    "model_entrypoint",
    "register_model",
]
