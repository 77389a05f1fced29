"""How far a low-precision merge is from a float32 one: the error report of every merge into a rounded base.

``max_errors(got, want, config)``, over the leaves ``config`` targets (``want``'s paths)::

    max_abs = max |got - want|,   max_rel = max |got - want| / |want|,   rel_fro = ||got - want||_F / ||want||_F

``max_rel`` divides by ``max(|want|, 1e-30)``, so it is unbounded where the exact value is near zero (rounding
sends small entries to 0). Used by ``jaxpeft.adapters.low_precision_merge`` (bf16 / int8 bases) and
``jaxpeft.quantize.merge`` (NF4 / int4 / int8 ``QuantizedArray`` bases).
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.reparam import Params
from jaxpeft.adapters.selection import named_leaves, select_targets


def max_errors(got: Params, want: Params, config: AdapterConfig) -> dict[str, float]:
  """``{"max_abs", "max_rel", "rel_fro"}`` of ``got`` against ``want`` over ``config``'s targets."""
  targets = [t.path for t in select_targets(config, want)]
  got_leaves, want_leaves = dict(named_leaves(got)), dict(named_leaves(want))
  diff = [got_leaves[p].astype(jnp.float32) - want_leaves[p] for p in targets]
  want_ = [want_leaves[p] for p in targets]
  return {
      "max_abs": float(max(jnp.abs(d).max() for d in diff)),
      "max_rel": float(max((jnp.abs(d) / jnp.maximum(jnp.abs(w), 1e-30)).max() for d, w in zip(diff, want_))),
      "rel_fro": float(jnp.sqrt(sum(jnp.sum(d**2) for d in diff) / sum(jnp.sum(w**2) for w in want_))),
  }
