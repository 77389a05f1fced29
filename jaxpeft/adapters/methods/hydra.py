"""Hydra: a parallel (LoRA-like) and a sequential low-rank branch on one linear layer, mergeable.

Paper: Kim, Yang, Kim, Hong, Park, "Hydra: Multi-head Low-rank Adaptation for Parameter Efficient
Fine-tuning", 2023, arXiv:2309.06922. Reference implementation followed: the authors' extremebird/Hydra
(``vtab1k/hydra.py``: ``Hydra_layer``, ``forward_vit_hydra_ffn``, ``reparameterize``).

Math, on the folded ``(d_in, d_out)`` kernel ``W`` and the layer's bias ``b`` (Flax layout ``y = x W + b``),
following the reference forward ``fc(x) + par(x) + seq(fc(x))`` with ``Hydra_layer(x) = s up(down(x))``::

    y' = x W + b + s * ((x a_p + c_p) b_p + d_p) + s * (((x W + b) a_s + c_s) b_s + d_s)   (two branches)
    W' = W + s * (a_p b_p + W a_s b_s)                                                    (merged kernel)
    b' = b + s * (b a_s b_s + c_p b_p + d_p + c_s b_s + d_s)                              (merged bias)

    a_p: (d_in, r)   parallel down-projection, reads the layer input   (torch: hydra_*_par.down_proj.weight.T)
    b_p: (r, d_out)  parallel up-projection                             (torch: hydra_*_par.up_proj.weight.T)
    a_s: (d_out, r)  sequential down-projection, reads the base output  (torch: hydra_*_seq.down_proj.weight.T)
    b_s: (r, d_out)  sequential up-projection                           (torch: hydra_*_seq.up_proj.weight.T)
    c_p: (r,), d_p: (d_out,), c_s: (r,), d_s: (d_out,)   the branches' biases
                     (torch: hydra_*_par.down_proj.bias, .up_proj.bias, hydra_*_seq.down_proj.bias, .up_proj.bias)

The merge is the reference's ``reparameterize(W0, b0, Wp, bp, Ws, bs, scale)``. The sequential branch reads
the *biased* base output, so the base bias enters the merged bias through ``b a_s b_s`` (the core's
``adapts_bias`` hook updates the kernel's sibling leaf ``bias``). On a layer without a bias the branch
biases are not created (``c, d`` dropped from the formulas): the reference would merge ``s (c_p b_p + d_p +
c_s b_s + d_s)`` into a new bias, and a bias-free Flax layer has no leaf to hold it.

``s = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``); the reference's free ``scale`` hyperparameter is
``alpha / r``, so set ``alpha = scale * rank`` (reference default ``scale = 1``: ``alpha = rank``).

Init (as the reference ``Hydra_layer``): down-projections Xavier-uniform, ``U(-c, c)`` with
``c = sqrt(6 / (fan_in + fan_out))`` (``a_p``: ``fan_in + fan_out = d_in + r``; ``a_s``: ``d_out + r``);
up-projections and all branch biases zero, so ``W' = W`` and ``b' = b`` exactly at init.

Trainable parameters per ``(d_in, d_out)`` matrix: ``r (d_in + d_out) + 2 r d_out``, plus ``2 r + 2 d_out``
branch biases when the layer has a bias; no frozen leaves.
Merge: yes (above). Unmerge: ``W = (W' - s a_p b_p) (I + s a_s b_s)^{-1}`` and
``b = (b' - s (c_p b_p + d_p + c_s b_s + d_s)) (I + s a_s b_s)^{-1}`` need the inverse of a ``d_out x d_out``
matrix (Woodbury: ``I - s a_s (I_r + s b_s a_s)^{-1} b_s``, an ``r x r`` solve), which exists unless ``-1/s``
is an eigenvalue of ``b_s a_s``.

Not followed from the reference code: its ``set_hydraWeight`` merges the attention projection with the MLP's
``fc2`` weight (a copy-paste slip; ``reparameterize`` itself is what is implemented here), and its dropout acts
on the down-projection's output, while the activation-hook mode here drops the branch input as PEFT does.

Activation-hook mode (``jaxpeft.adapters.factored``): ``branch`` returns the input-dependent part
``s (x a_p) b_p + s ((x W) a_s) b_s`` without forming the ``(d_in, d_out)`` update (``branch`` does not
receive the base output, so ``x W`` is computed a second time); the front-end adds the constant ``b' - b``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpeft.adapters.core import AdapterMethod, Leaves, Target, register_method
from jaxpeft.canonical_dot import matmul


def _xavier_uniform(rng: jax.Array, fan_in: int, fan_out: int) -> jax.Array:
  """PyTorch ``xavier_uniform_`` for a ``(fan_out, fan_in)`` weight, returned transposed ``(fan_in, fan_out)``."""
  bound = (6.0 / (fan_in + fan_out)) ** 0.5
  return jax.random.uniform(rng, (fan_in, fan_out), jnp.float32, -bound, bound)


def _undo_sequential(m: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
  """``m (I + s a_s b_s)^{-1}`` for rows ``m`` of length ``d_out`` (Woodbury, an ``r x r`` solve)."""
  s, a_s, b_s = target.scaling, leaves["a_s"], leaves["b_s"]
  small = jnp.eye(target.rank, dtype=jnp.float32) + s * (b_s @ a_s)
  return m - s * ((m @ a_s) @ jnp.linalg.solve(small, b_s))


def _branch_bias(leaves: Leaves) -> jax.Array:
  """The constant the branch biases add (before scaling): ``c_p b_p + d_p + c_s b_s + d_s``."""
  return leaves["c_p"] @ leaves["b_p"] + leaves["d_p"] + leaves["c_s"] @ leaves["b_s"] + leaves["d_s"]


@register_method("hydra")
class Hydra(AdapterMethod):
  """``W' = W + s (a_p b_p + W a_s b_s)``, ``b' = b + s (b a_s b_s + branch biases)``. See the module docstring."""

  inits = ("default",)
  needs_matrix = True

  adapts_bias = True

  def init(self, rng: jax.Array, kernel: jax.Array, target: Target) -> Leaves:
    d_in, d_out = target.matrix_shape
    r = target.rank
    key_p, key_s = jax.random.split(rng)
    leaves = {
        "a_p": _xavier_uniform(key_p, d_in, r),
        "b_p": jnp.zeros((r, d_out), jnp.float32),
        "a_s": _xavier_uniform(key_s, d_out, r),
        "b_s": jnp.zeros((r, d_out), jnp.float32),
    }
    if target.bias_path is not None:
      leaves |= {
          "c_p": jnp.zeros((r,), jnp.float32),
          "d_p": jnp.zeros((d_out,), jnp.float32),
          "c_s": jnp.zeros((r,), jnp.float32),
          "d_s": jnp.zeros((d_out,), jnp.float32),
      }
    return leaves

  def apply(self, kernel: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
    s = target.scaling
    return kernel + s * (leaves["a_p"] @ leaves["b_p"]) + s * ((kernel @ leaves["a_s"]) @ leaves["b_s"])

  def unmerge(self, merged: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
    return _undo_sequential(merged - target.scaling * (leaves["a_p"] @ leaves["b_p"]), leaves, target)

  def apply_bias(self, bias: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
    s = target.scaling
    return bias + s * ((bias @ leaves["a_s"]) @ leaves["b_s"]) + s * _branch_bias(leaves)

  def unmerge_bias(self, merged_bias: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
    return _undo_sequential(merged_bias - target.scaling * _branch_bias(leaves), leaves, target)

  def branch(self, x: jax.Array, kernel: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
    s = target.scaling
    return matmul(matmul(x, leaves["a_p"]) * s, leaves["b_p"]) + matmul(
        matmul(matmul(x, kernel), leaves["a_s"]) * s, leaves["b_s"]
    )
