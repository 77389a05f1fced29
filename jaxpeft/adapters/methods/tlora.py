"""TLoRA: a tensor-ring-matrix *transform* of the pretrained weight plus a tensor-ring *residual*.

Paper: Tao, Takida, Murata, Zhao, Mitsufuji, "Transformed Low-rank Adaptation via Tensor Decomposition and Its
Applications to Text-to-image Models", ICCV 2025, arXiv:2501.08727 (Sec. 3: Eq. "y' = (W_0 T + Delta) x", the
TRM transform with Proposition 1's identity init, the TR residual with one zero core).
Reference implementation followed: the authors' released code (README "Code for the paper ... ICCV-25"), read in
the copy ``marcocst/PEFTDiff``, ``subject-driven-generation/utils/attention_processor.py``
(``TTMLoRALinearLayer``, ``ttm_to_matrix``, ``ttv_to_matrix``); the paper's Sec. 3 was read through a
reproduction note of it (equations for TRM, Proposition 1, the TR residual and its zero-core init).
Tensor-ring format: Zhao et al., "Tensor Ring Decomposition", 2016, arXiv:1606.05535.

Math, in PyTorch layout (``W_0: (d_out, d_in)``, ``y = W_0 x``) as in the paper and the reference::

    W' = W_0 T + s Delta                                    s = alpha / r  (alpha / sqrt(r) with use_rslora)
    T[(i_1..i_D), (j_1..j_D)]     = tr(G_1[i_1, j_1] ... G_D[i_D, j_D])            G_d: (n_d, n_d, t, t)
    Delta[(o_1..o_E), (i_1..i_D)] = tr(B_1[o_1] ... B_E[o_E] C_1[i_1] ... C_D[i_D])  B_e: (q_e, r, r), C_d: (n_d, r, r)

(``options["residual"] = "tr"``, the paper's residual and the reference's ``addition_part="ttv"``), or the
reference's two other residuals: ``"trm"`` (``addition_part="ttm"``), a tensor-ring matrix like ``T``, and
``"lora"`` (``addition_part="lora"``, the reference script's default), a plain low-rank product::

    Delta[(o_1..o_D), (i_1..i_D)] = tr(H_1[o_1, i_1] ... H_D[o_D, i_D])                H_d: (q_d, n_d, r, r)
    Delta = lora_b @ lora_a                                         lora_b: (d_out, r), lora_a: (r, d_in)

``d_in = n_1 ... n_D`` (``options["in_modes"]``), ``d_out = q_1 ... q_E`` (``options["out_modes"]``); by default
both are a balanced split into ``options["order"]`` factors. Multi-indices are row-major (``i_1`` slowest), as
the reference's ``reshape`` (the paper writes little-endian; on learned cores this is only a relabelling).
``t = options["transform_rank"]`` (default 1 as in the reference: ``t = 1`` is its Kronecker-product
transform ``T = G_1 (x) ... (x) G_D``), ``r = config.rank``.

Flax layout: the folded kernel is ``K = W_0ᵀ: (d_in, d_out)``, so ``K' = Tᵀ K + s Deltaᵀ``; the cores are stored
in the reference's layout above. A Flax conv kernel ``(kh, kw, I, O)`` is folded to ``(kh*kw*I, O)``, i.e.
``T`` mixes kernel taps and input channels (the reference only adapts attention projections).

Init (the reference): ``G_d[:, :, a, b] = I / t`` for all ``a, b`` (Proposition 1: ``T = I``). Residual "tr":
``B_1 = 0``, ``B_e ~ N(0, (sqrt(q_e) / r^2)^2)`` for ``e > 1``, ``C_d ~ N(0, 1 / n_d)``; residual "trm":
``H_1 = 0``, ``H_d ~ N(0, 1 / (3 n_d r^2))`` for ``d > 1``; residual "lora": ``lora_b = 0``,
``lora_a ~ N(0, 1 / (3 d_in))`` (both normals are PyTorch's ``kaiming_normal_(a=sqrt(5))``, std
``1 / sqrt(3 fan_in)``). So ``W' = W_0`` at init. ``init="random"`` (tests) also draws the zero core and adds
``N(0, (0.1 / t)^2)`` noise to the transform cores.
Param count: ``t^2 sum_d n_d^2`` + ``r^2 (sum_e q_e + sum_d n_d)`` ("tr"), ``r^2 sum_d n_d q_d`` ("trm") or
``r (d_in + d_out)`` ("lora").
Merge: ``K'`` is dense. Unmerge: ``K = T^{-T} (K' - s Deltaᵀ)`` (a linear solve; ``T`` is invertible near ``I``).

Deviations: the reference's default scale is rsLoRA's ``alpha / sqrt(r)`` with ``alpha = 1``; here the scale
follows ``config.use_rslora`` like every jaxpeft method (set ``use_rslora=True, alpha=1`` for the reference's
default). The paper's identity / orthogonality regularisers of ``T`` are not used by the reference's
subject-driven training script and are not provided.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxpeft.adapters.core import AdapterMethod, Leaves, Target, register_method

_INITS = ("default", "random")
RESIDUALS = ("tr", "trm", "lora")


def balanced_modes(n: int, order: int) -> tuple[int, ...]:
  """``n`` split into ``order`` factors (prime factors, largest first, each to the smallest bucket), descending."""
  primes, rest, p = [], n, 2
  while p * p <= rest:
    while rest % p == 0:
      primes.append(p)
      rest //= p
    p += 1
  if rest > 1:
    primes.append(rest)
  buckets = [1] * order
  for prime in sorted(primes, reverse=True):
    buckets[buckets.index(min(buckets))] *= prime
  return tuple(sorted(buckets, reverse=True))


def modes(target: Target) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """``(in_modes, out_modes)`` of the folded ``(d_in, d_out)`` kernel."""
  d_in, d_out = target.matrix_shape
  order = target.option("order")
  in_modes = tuple(target.option("in_modes") or balanced_modes(d_in, order))
  out_modes = tuple(target.option("out_modes") or balanced_modes(d_out, order))
  return in_modes, out_modes


def core_shapes(target: Target) -> dict[str, tuple[int, ...]]:
  """Leaf name -> shape of every core (see the module docstring)."""
  (in_modes, out_modes), t, r = modes(target), target.option("transform_rank"), target.rank
  shapes = {f"transform_{d}": (n, n, t, t) for d, n in enumerate(in_modes)}
  if target.option("residual") == "tr":
    shapes.update({f"residual_out_{e}": (q, r, r) for e, q in enumerate(out_modes)})
    shapes.update({f"residual_in_{d}": (n, r, r) for d, n in enumerate(in_modes)})
  elif target.option("residual") == "lora":
    d_in, d_out = target.matrix_shape
    shapes.update({"lora_a": (r, d_in), "lora_b": (d_out, r)})
  else:
    shapes.update({f"residual_{d}": (q, n, r, r) for d, (n, q) in enumerate(zip(in_modes, out_modes))})
  return shapes


def ring_matrix(cores: list[jax.Array]) -> jax.Array:
  """``M[(i_1..i_D), (j_1..j_D)] = tr(X_1[i_1, j_1] ... X_D[i_D, j_D])`` for cores ``X_d: (p_d, q_d, a, a)``."""
  out = cores[0]
  for core in cores[1:]:
    rows, cols, a, _ = out.shape
    p, q, _, b = core.shape
    out = jnp.einsum("ijab,klbc->ikjlac", out, core).reshape(rows * p, cols * q, a, b)
  return jnp.einsum("ijaa->ij", out)


def transform(leaves: Leaves, target: Target) -> jax.Array:
  """``T``, shape ``(d_in, d_in)``."""
  return ring_matrix([leaves[f"transform_{d}"] for d in range(len(modes(target)[0]))])


def residual(leaves: Leaves, target: Target) -> jax.Array:
  """``s Delta``, shape ``(d_out, d_in)`` (PyTorch layout)."""
  (in_modes, out_modes), (d_in, d_out) = modes(target), target.matrix_shape
  if target.option("residual") == "tr":  # a TR vector over (o_1..o_E, i_1..i_D): a ring matrix with one column
    vector_cores = [leaves[f"residual_out_{e}"] for e in range(len(out_modes))] + [
        leaves[f"residual_in_{d}"] for d in range(len(in_modes))
    ]
    delta = ring_matrix([c[:, None] for c in vector_cores]).reshape(d_out, d_in)
  elif target.option("residual") == "lora":
    delta = leaves["lora_b"] @ leaves["lora_a"]
  else:
    delta = ring_matrix([leaves[f"residual_{d}"] for d in range(len(in_modes))])
  return target.scaling * delta


def _init_core(key: jax.Array, name: str, shape: tuple[int, ...], target: Target) -> jax.Array:
  random = target.init == "random"
  if name.startswith("transform_"):
    n, _, t, _ = shape
    identity = jnp.broadcast_to(jnp.eye(n, dtype=jnp.float32)[:, :, None, None] / t, shape)
    return identity + (0.1 / t) * jax.random.normal(key, shape) if random else identity
  if name in ("residual_out_0", "residual_0", "lora_b") and not random:
    return jnp.zeros(shape, jnp.float32)
  r = target.rank
  if name.startswith("residual_out_"):
    std = math.sqrt(shape[0]) / r**2
  elif name.startswith("residual_in_"):
    std = 1.0 / math.sqrt(shape[0])
  elif name in ("lora_a", "lora_b"):
    std = 1.0 / math.sqrt(3 * shape[1])
  else:
    std = 1.0 / math.sqrt(3 * shape[1] * r * r)
  return std * jax.random.normal(key, shape, jnp.float32)


@register_method("tlora")
class TLoRA(AdapterMethod):
  """``W' = W_0 T + s Delta`` (``K' = Tᵀ K + s Deltaᵀ`` in Flax layout). See the module docstring."""

  inits = _INITS
  needs_matrix = True

  option_defaults = {"order": 3, "transform_rank": 1, "residual": "tr", "in_modes": None, "out_modes": None}

  def validate(self, target: Target) -> None:
    if target.option("residual") not in RESIDUALS:
      raise ValueError(
          f"{target.path}: unknown TLoRA residual {target.option('residual')!r}; expected one of "
          f"{RESIDUALS} (options={{'residual': ...}})."
      )
    order, t = target.option("order"), target.option("transform_rank")
    if not (isinstance(order, int) and order >= 1 and isinstance(t, int) and t >= 1):
      raise ValueError(
          f"{target.path}: TLoRA options order and transform_rank must be positive ints, got "
          f"order={order!r}, transform_rank={t!r}."
      )
    (d_in, d_out), (in_modes, out_modes) = target.matrix_shape, modes(target)
    same_length = len(in_modes) == len(out_modes) or target.option("residual") == "tr"
    if math.prod(in_modes) != d_in or math.prod(out_modes) != d_out or not same_length:
      raise ValueError(
          f"{target.path}: TLoRA modes must multiply to the folded kernel shape ({d_in}, {d_out}) "
          f"(and have equal lengths for residual 'trm'), got in_modes={in_modes}, "
          f"out_modes={out_modes}; set options in_modes / out_modes."
      )

  def init(self, rng: jax.Array, kernel: jax.Array, target: Target) -> Leaves:
    shapes = core_shapes(target)
    keys = jax.random.split(rng, len(shapes))
    return {name: _init_core(key, name, shape, target) for key, (name, shape) in zip(keys, shapes.items())}

  def apply(self, kernel: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
    return transform(leaves, target).T @ kernel + residual(leaves, target).T

  def unmerge(self, merged: jax.Array, leaves: Leaves, target: Target) -> jax.Array:
    return jnp.linalg.solve(transform(leaves, target).T, merged - residual(leaves, target).T)
