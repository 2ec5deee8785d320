"""Pure functions from hidden states or accumulated statistics to redundancy measures, one file per measure
(the numbering follows framework.md): geometric (1), proximal (2), informational (3), functional (4),
var (5), cka (6)."""

from skipit.measures.cka import cka_from_grams, decision_stability, linear_cka, select_redundant, spearman
from skipit.measures.functional import (
    hidden_distance,
    hidden_distance_from_rho,
    kl_from_logits,
    lipschitz_bound,
    lipschitz_estimate,
    tv_from_logits,
)
from skipit.measures.geometric import (
    angular_distance,
    block_influence,
    bootstrap_mean,
    cosine,
    distances,
    normalised_cosine_distance,
)
from skipit.measures.informational import (
    conditional_entropy,
    gaussian_conditional_entropy,
    gaussian_entropy,
    informational_by_layer,
    pca_scores,
    plugin_entropy,
    quantize,
    redundancy_score,
)
from skipit.measures.proximal import bin_index, histogram, tail_probability
from skipit.measures.var import var_from_sums, vision_attention_terms

__all__ = [
    "angular_distance",
    "bin_index",
    "block_influence",
    "bootstrap_mean",
    "cka_from_grams",
    "conditional_entropy",
    "cosine",
    "decision_stability",
    "distances",
    "gaussian_conditional_entropy",
    "gaussian_entropy",
    "hidden_distance",
    "hidden_distance_from_rho",
    "histogram",
    "informational_by_layer",
    "kl_from_logits",
    "linear_cka",
    "lipschitz_bound",
    "lipschitz_estimate",
    "normalised_cosine_distance",
    "pca_scores",
    "plugin_entropy",
    "quantize",
    "redundancy_score",
    "select_redundant",
    "spearman",
    "tail_probability",
    "tv_from_logits",
    "var_from_sums",
    "vision_attention_terms",
]
