"""Building blocks of normalizer-free networks. No knowledge of models, training or analysis."""

from normfree.nn.head import ClassifierHead
from normfree.nn.residual import (
    ExpectedVariance,
    ResidualBlock,
    SkipInitGain,
    SqueezeExcite,
    StochasticDepth,
    stochastic_depth_rates,
)

__all__ = [
    "ClassifierHead",
    "ExpectedVariance",
    "ResidualBlock",
    "SkipInitGain",
    "SqueezeExcite",
    "StochasticDepth",
    "stochastic_depth_rates",
]
