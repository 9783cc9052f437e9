"""The model zoo. Importing this package registers every family."""

from normfree.models.base import FeatureInfo, ModelMeta, NormFreeModel
from normfree.models.registry import (
    UnknownModelError,
    create_model,
    list_models,
    model_entrypoint,
    register_model,
)

# Families register themselves on import (one module per family).

__all__ = [
    "FeatureInfo",
    "ModelMeta",
    "NormFreeModel",
    "UnknownModelError",
    "create_model",
    "list_models",
    "model_entrypoint",
    "register_model",
]
