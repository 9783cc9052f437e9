"""Signal propagation analysis for any PyTorch model.

* :func:`signal_propagation` - Signal Propagation Plots (Brock, De & Smith 2021a, §3).
* :func:`propagate_moments` - moments and normalized sensitivity χ with forward-mode AD
  (Labatie 2019), :func:`fit_growth` (exponential vs power-law growth).
* :func:`power_profile` / :func:`power_decomposition` - channel-mean / instance / within-instance
  power of pre-activations (Labatie et al. 2021, Proxy Normalization).
* :func:`diagnose` - mean shift, exploding/vanishing variance, residual branches out of scale,
  batch dependence; :func:`batch_dependence`.
* :func:`plot_spp`, :func:`plot_moments`, :func:`plot_power` - figures (needs matplotlib).
* :mod:`normfree.analysis.probes` - small reference networks (BN feedforward, BN-ResNet, LN/IN).

Never imports ``normfree.train``.
"""

from normfree.analysis.batch_dependence import BatchDependence, batch_dependence
from normfree.analysis.context import analysis_mode, make_inputs
from normfree.analysis.diagnose import DiagnoseThresholds, Diagnosis, Finding, diagnose
from normfree.analysis.moments import (
    GrowthFit,
    MomentsPoint,
    MomentsResult,
    effective_rank,
    fit_growth,
    moment_stats,
    propagate_moments,
)
from normfree.analysis.plots import plot_moments, plot_power, plot_spp
from normfree.analysis.points import find_residual_blocks, glob_match, resolve_modules
from normfree.analysis.power import PowerPoint, PowerResult, power_decomposition, power_profile
from normfree.analysis.probes import FeedforwardProbe, ResNetProbe
from normfree.analysis.spp import (
    SPPPoint,
    SPPResult,
    channel_stats,
    save_results,
    signal_propagation,
    write_csv,
)

__all__ = [
    "BatchDependence",
    "DiagnoseThresholds",
    "Diagnosis",
    "FeedforwardProbe",
    "Finding",
    "GrowthFit",
    "MomentsPoint",
    "MomentsResult",
    "PowerPoint",
    "PowerResult",
    "ResNetProbe",
    "SPPPoint",
    "SPPResult",
    "analysis_mode",
    "batch_dependence",
    "channel_stats",
    "diagnose",
    "effective_rank",
    "find_residual_blocks",
    "fit_growth",
    "glob_match",
    "make_inputs",
    "moment_stats",
    "plot_moments",
    "plot_power",
    "plot_spp",
    "power_decomposition",
    "power_profile",
    "propagate_moments",
    "resolve_modules",
    "save_results",
    "signal_propagation",
    "write_csv",
]
