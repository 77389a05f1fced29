"""Model merging and task vectors, on full parameter trees and on adapters' weight-space updates.

    from jaxpeft import merging
    merged = merging.ties(base, [finetuned_a, finetuned_b], weights=1.0, density=0.2)

Every method takes parameter pytrees and returns one, works leaf by leaf under ``jax.jit`` (sharded
inputs stay sharded; task vectors are streamed, never held as N full trees) and names the offending leaf
when the trees do not match. One method per module; each docstring has the math, the paper and the
reference code it equals.
"""

from jaxpeft.merging.atlas import atlas_merge, fit_atlas
from jaxpeft.merging.checksum import base_checksum, check_base
from jaxpeft.merging.dare import dare
from jaxpeft.merging.fisher import empirical_fisher, expected_fisher, fisher_merge
from jaxpeft.merging.linear import linear
from jaxpeft.merging.lora_updates import combine, combined_deltas, deltas
from jaxpeft.merging import scalearn
from jaxpeft.merging.regmean import gram_matrices, regmean
from jaxpeft.merging.soups import greedy_soup, uniform_soup
from jaxpeft.merging.sparse_fine_tuning import compose, sparse_difference
from jaxpeft.merging.task_arithmetic import task_arithmetic
from jaxpeft.merging.task_vectors import add_task_vectors, task_vector
from jaxpeft.merging.ties import ties, ties_deltas

__all__ = [
    "add_task_vectors",
    "atlas_merge",
    "base_checksum",
    "check_base",
    "combine",
    "combined_deltas",
    "compose",
    "dare",
    "deltas",
    "empirical_fisher",
    "expected_fisher",
    "fisher_merge",
    "fit_atlas",
    "gram_matrices",
    "greedy_soup",
    "linear",
    "regmean",
    "scalearn",
    "sparse_difference",
    "task_arithmetic",
    "task_vector",
    "ties",
    "ties_deltas",
    "uniform_soup",
]
