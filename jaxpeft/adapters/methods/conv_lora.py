"""LoRA-C and convLoRA: LoRA on a 2-D convolution kernel through loralib's kernel-interleaved matricisation.

Papers:
  * Ding, Cao, Xie, Fan, Wang, Lu, "LoRA-C: Parameter-Efficient Fine-Tuning of Robust CNN for IoT Devices",
    2024, arXiv:2410.16954 (code: github.com/alexyyds2024/lora-C).
  * Aleem, Dietlmeier, Arazo, Little, "ConvLoRA and AdaBN based Domain Adaptation via Self-Training", ISBI 2024,
    arXiv:2402.04964 (code: github.com/aleemsidra/ConvLoRA).
  * Both are the baselines of Minoccheri, Hodgman, Ma, Merchant, Wittrup, Williamson, Najarian, "LoRA-based
    methods on Unet for transfer learning in Subarachnoid Hematoma Segmentation", 2025, arXiv:2508.01772,
    which builds its DoRA variants on them (``jaxpeft.adapters.methods.conv_dora``).
Reference implementation followed: ``loralib.ConvLoRA`` (microsoft/LoRA, PyPI ``loralib`` 0.1.2), which both
authors' repositories vendor unchanged.

Math, for a square 2-D kernel with ``k = kh = kw`` (PyTorch weight ``W_t: (O, I, k, k)``)::

    Delta W_t = s * reshape(B A, (O, I, k, k))       B: (O k, q),  A: (q, I k),  s = alpha / r
    q = r k     variant "loralib"     (default: loralib ConvLoRA exactly, lora_A (r k, I k), lora_B (O k, r k);
                                       the released LoRA-C and convLoRA code)
    q = r       variant "layer_rank"  (inner width r: one rank r for the whole layer, our reading of Ding et
                                       al.'s "layer-wise, not kernel-unit" rank; no released code does this)

``reshape`` is the row-major ``view`` of the ``(O k, I k)`` product onto the weight buffer, as loralib does (it
is not a permutation-based matricisation: rows and columns mix output/input channels with kernel taps).
The rank of ``Delta W`` as an ``(O k) x (I k)`` matrix is at most ``q``.

Flax layout: the kernel is ``(kh, kw, I, O)`` = ``W_t.permute(2, 3, 1, 0)``; the leaves are stored transposed
like LoRA's (``a: (I k, q) = lora_A.T``, ``b: (q, O k) = lora_B.T``), so ``Delta K = permute(reshape((a b)ᵀ,
(O, I, k, k)), (2, 3, 1, 0))``. Grouped convolutions (``feature_group_count``) work on the kernel as stored:
``I`` is the per-group input width. Stride, padding and dilation belong to the unchanged Flax ``Conv`` module.

Init (loralib): ``a ~ U(-1/sqrt(I k), 1/sqrt(I k))`` (PyTorch ``kaiming_uniform_(a=sqrt(5))`` on ``lora_A`` of
fan-in ``I k``), ``b = 0``; ``init="random"`` also draws ``b ~ U(-1/sqrt(q), 1/sqrt(q))`` (tests).
Param count: ``q k (I + O)``, i.e. ``r k^2 (I + O)`` ("loralib") or ``r k (I + O)`` ("layer_rank").

Sources checked (verification pass): the LoRA-C authors' code ``alexyyds2024/lora-C``, ``loralib/layers.py``
(``ConvLoRA``: ``lora_A (r k, I k)``, ``lora_B (O k / groups, r k)``, ``(B A).view(W.shape) * alpha / r``, A kaiming
``a=sqrt(5)``, B zero; used for every 3x3 and 1x1 conv of ``model/resnet_lora.py``) and Aleem et al.'s
``aleemsidra/ConvLoRA``, ``LoRA/loralib/layers.py`` (the same ``ConvLoRA`` and a ``Conv2d`` with the same shapes)
both equal loralib's ``ConvLoRA`` -- our variant ``"loralib"`` exactly (tested against loralib in
``tests/adapters/methods/conv_lora_test.py``). So, as released, LoRA-C and convLoRA are the same update, and the default
is that update. The variants are named after what they compute: "loralib" is the released code;
"layer_rank" [reconstructed] is a second reading of the LoRA-C abstract ("performs low-rank decomposition in
convolutional layers rather than kernel units", "analyzes two different rank settings"), an inner width of
``r`` instead of ``r k`` (the full texts of arXiv:2410.16954 and arXiv:2508.01772 were not readable here).
Until 2026-12 the variants were named "lora_c" (= "layer_rank", then the default) and "convlora" (= "loralib");
configs naming them get an error saying so.
Hugging Face PEFT's Conv2d LoRA is a third matricisation (``(O) x (I k k)``: a k x k conv to ``r`` channels,
then a 1 x 1 conv); it is ``method="lora"`` with ``fan_in_axes=3`` in jaxpeft, not one of these variants.
The update is merged (``W + Delta W``); there is no activation-hook form (the reshape has no conv-branch form).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpeft.adapters.core import AdapterMethod, Leaves, Target, register_method

VARIANTS = ("loralib", "layer_rank")
RENAMED_VARIANTS = {"lora_c": "layer_rank", "convlora": "loralib"}  # names before 2026-12
_INITS = ("default", "random")


def conv_shape(target: Target) -> tuple[int, int, int]:
  """``(k, I, O)`` of a square 2-D Flax conv kernel ``(k, k, I, O)`` (the ``"square_conv2d"`` layout)."""
  shape = target.layer_shape
  return shape[0], shape[2], shape[3]


def inner_width(target: Target) -> int:
  """``q``: ``r k`` for the released code ("loralib"), ``r`` for "layer_rank"."""
  k, _, _ = conv_shape(target)
  return target.rank * (k if target.option("variant") == "loralib" else 1)


def check_variant(target: Target, variants: tuple[str, ...]) -> None:
  """Refuses an unknown ``variant`` option, naming the new name of a pre-2026-12 one."""
  variant = target.option("variant")
  if variant in variants:
    return
  renamed = (
      f" Variant {variant!r} was renamed {RENAMED_VARIANTS[variant]!r} (same update)."
      if variant in RENAMED_VARIANTS
      else ""
  )
  raise ValueError(
      f"{target.path}: unknown conv LoRA variant {variant!r}; expected one of {variants} "
      f"(options={{'variant': ...}}).{renamed}"
  )


def conv_lora_init(rng: jax.Array, target: Target) -> Leaves:
  """``{"a": (I k, q), "b": (q, O k)}`` as loralib initialises ``lora_A.T`` and ``lora_B.T``."""
  k, c_in, c_out = conv_shape(target)
  q = inner_width(target)
  key_a, key_b = jax.random.split(rng)
  bound_a = 1.0 / jnp.sqrt(c_in * k)
  a = jax.random.uniform(key_a, (c_in * k, q), jnp.float32, -bound_a, bound_a)
  if target.init == "random":
    bound_b = 1.0 / jnp.sqrt(q)
    b = jax.random.uniform(key_b, (q, c_out * k), jnp.float32, -bound_b, bound_b)
  else:
    b = jnp.zeros((q, c_out * k), jnp.float32)
  return {"a": a, "b": b}


def conv_lora_delta(leaves: Leaves, target: Target) -> jax.Array:
  """``Delta K`` folded to ``(k*k*I, O)`` (see the module docstring)."""
  k, c_in, c_out = conv_shape(target)
  delta_t = (leaves["a"] @ leaves["b"]).T.reshape(c_out, c_in, k, k)  # loralib: (B @ A).view(W_t.shape)
  return target.scaling * delta_t.transpose(2, 3, 1, 0).reshape(k * k * c_in, c_out)


@register_method("conv_lora")
class ConvLoRA(AdapterMethod):
  """``W' = W + s * view(B A)`` on a conv kernel; ``options={"variant": "loralib" | "layer_rank"}``."""

  option_defaults = {"variant": "loralib"}
  inits = _INITS
  layout = "square_conv2d"
  layout_hint = "Use cp_lora for 1-D/3-D or non-square kernels."

  def validate(self, target: Target) -> None:
    check_variant(target, VARIANTS)

  def init(self, rng: jax.Array, kernel: jax.Array, target: Target) -> Leaves:
    return conv_lora_init(rng, target)

  def delta(self, leaves: Leaves, target: Target) -> jax.Array:
    return conv_lora_delta(leaves, target)
