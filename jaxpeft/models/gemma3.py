"""The Gemma 3 text decoder (Flax linen), computed as Hugging Face `Gemma3ForCausalLM` does.

Gemma Team, "Gemma 3 Technical Report", 2025, arXiv:2503.19786. The reference followed is
transformers' `models/gemma3/modeling_gemma3.py` (text part only), so its checkpoints load
unchanged (`jaxpeft.models.gemma3_loader`). With d = hidden_size, H query heads, K key/value
heads (grouped-query attention: query head h reads key/value head floor(h / (H/K))), head size
d_h and positions p_t:

  RMSNorm_w(x) = x / sqrt(mean(x^2) + eps) * (1 + w)           (w stored zero-centred, as HF)
  h_0 = E[ids] * sqrt(d)                                          (scale cast to the compute dtype)
  for each layer l (local = sliding-window, global = full attention, per `layer_types`):
    x   = RMSNorm(h)
    q   = RoPE(RMSNorm_q(x W_q)),  k = RoPE(RMSNorm_k(x W_k)),  v = x W_v   (QK-norm per head)
    s   = q k^T / sqrt(query_pre_attn_scalar)
    mask: key slot j <= query slot i, and i - j < sliding_window on local layers (and, for packed
          rows, j in the same segment as i: `segment_ids`)
    a   = softmax(s + mask) v W_o
    h   = h + RMSNorm(a)
    h   = h + RMSNorm(W_down(gelu_tanh(RMSNorm(h) W_gate) * (RMSNorm(h) W_up)))
  logits = RMSNorm(h) E^T   (tied);  logits = c tanh(logits / c) if final_logit_softcapping=c

RoPE rotates the halves of each head, (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), with
angles p_t * theta^(-2i/d_h); local layers use `rope_local_base_freq`, global layers
`rope_theta` divided by the global layer's linear rope-scaling factor (the 4B/12B/27B configs
use factor 8; the other rope types of transformers are rejected).

Decoding uses an explicit KV cache (`init_cache`): arrays k, v of shape
(layers, batch, max_len, K, d_h), a `mask` (batch, max_len) of the slots holding real tokens and
the next slot `index`. A call with `cache=` writes its T new keys/values at slots index..index+T-1
and attends over all filled slots; masks are built from slot numbers (as transformers' cache does,
so left-padded prompts see the same sliding window) and RoPE from `positions`.

Parameter paths ('/'-joined, as adapter target regexes see them; `layers_{i}` becomes `layers`
with a leading layer axis when `scan_layers=True`):

  embed_tokens/embedding                                   (vocab, d)
  layers_{i}/input_layernorm/scale, post_attention_layernorm/scale,
            pre_feedforward_layernorm/scale, post_feedforward_layernorm/scale        (d,)
  layers_{i}/self_attn/{q,k,v}_proj/kernel                 (d, H*d_h), (d, K*d_h), (d, K*d_h)
  layers_{i}/self_attn/o_proj/kernel                       (H*d_h, d)
  layers_{i}/self_attn/{q,k}_norm/scale                    (d_h,)
  layers_{i}/mlp/{gate,up}_proj/kernel                     (d, intermediate)
  layers_{i}/mlp/down_proj/kernel                          (intermediate, d)
  norm/scale                                               (d,)

so LoRA on all attention projections is `r".*attn/(q|k|v|o)_proj/kernel"` and on the MLP
`r".*mlp/(gate|up|down)_proj/kernel"`. Each kernel is the transpose of the HF `weight`
(`hf_name` gives the HF name of a path).

Deviations: none in the math. Dropout is not implemented (Gemma 3 uses attention_dropout=0).
`attn_logit_softcapping` (a Gemma 2 feature, null in Gemma 3 configs) is ignored, as transformers'
Gemma 3 attention ignores it.
"""

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpeft import canonical_dot
from jaxpeft.models import gemma3_sharding

_LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclasses.dataclass(frozen=True)
class Gemma3Config:
  """The architecture fields of a Hugging Face Gemma 3 text `config.json` (same names).

  `layer_types` lists 'sliding_attention' or 'full_attention' per layer; `global_rope_scaling`
  is the linear rope-scaling factor of the global layers (1.0: none).
  """

  vocab_size: int = 262_144
  hidden_size: int = 640
  intermediate_size: int = 2048
  num_hidden_layers: int = 18
  num_attention_heads: int = 4
  num_key_value_heads: int = 1
  head_dim: int = 256
  rms_norm_eps: float = 1e-6
  query_pre_attn_scalar: float = 256
  sliding_window: int = 512
  layer_types: tuple[str, ...] = ()
  rope_theta: float = 1_000_000.0
  rope_local_base_freq: float = 10_000.0
  global_rope_scaling: float = 1.0
  max_position_embeddings: int = 32_768
  final_logit_softcapping: float | None = None
  hidden_activation: str = "gelu_pytorch_tanh"

  def __post_init__(self):
    if not self.layer_types:
      # transformers' default: every 6th layer is global.
      object.__setattr__(
          self,
          "layer_types",
          tuple(
              "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(self.num_hidden_layers)
          ),
      )
    object.__setattr__(self, "layer_types", tuple(self.layer_types))
    if len(self.layer_types) != self.num_hidden_layers or set(self.layer_types) - set(_LAYER_TYPES):
      raise ValueError(
          f"layer_types={self.layer_types} must list {self.num_hidden_layers} entries, each one of"
          f" {_LAYER_TYPES}."
      )
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f"num_attention_heads={self.num_attention_heads} is not a multiple of num_key_value_heads="
          f"{self.num_key_value_heads}; grouped-query attention needs whole groups."
      )
    if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
      raise ValueError(f"hidden_activation={self.hidden_activation!r}: Gemma 3 uses 'gelu_pytorch_tanh'.")

  @classmethod
  def from_hf_dict(cls, config: Mapping[str, Any]) -> "Gemma3Config":
    """Reads a transformers Gemma 3 text config dict (`config.json`, or its `text_config`).

    Accepts both rope formats of transformers: `rope_parameters` per layer type, and the older
    `rope_theta` / `rope_local_base_freq` / `rope_scaling`, and `sliding_window_pattern`.

    Raises:
      ValueError: not a Gemma 3 text config, or a rope type other than 'default'/'linear'.
    """
    if "text_config" in config:
      config = config["text_config"]
    model_type = config.get("model_type", "gemma3_text")
    if model_type not in ("gemma3_text", "gemma3"):
      raise ValueError(
          f"config describes model_type={model_type!r}; jaxpeft.models.gemma3 implements 'gemma3_text'."
      )
    names = {f.name for f in dataclasses.fields(cls)}
    fields = {k: v for k, v in config.items() if k in names and v is not None}
    rope = config.get("rope_parameters") or {}
    global_rope = dict(rope.get("full_attention") or {})
    if config.get("rope_scaling"):
      global_rope.update(config["rope_scaling"])
    local_rope = rope.get("sliding_attention") or {}
    if "rope_theta" in global_rope:
      fields["rope_theta"] = global_rope["rope_theta"]
    if "rope_theta" in local_rope:
      fields["rope_local_base_freq"] = local_rope["rope_theta"]
    for kind, params in (("global", global_rope), ("local", local_rope)):
      rope_type = params.get("rope_type", params.get("type", "default"))
      if rope_type not in ("default", "linear") or (kind == "local" and rope_type != "default"):
        raise ValueError(
            f"{kind} rope_type={rope_type!r} is not supported; jaxpeft implements 'default'"
            " rope on local layers and 'default' or 'linear' on global layers."
        )
    if global_rope.get("rope_type", global_rope.get("type")) == "linear":
      fields["global_rope_scaling"] = float(global_rope["factor"])
    if not config.get("layer_types") and "sliding_window_pattern" in config:
      pattern = config["sliding_window_pattern"]
      fields["layer_types"] = tuple(
          "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
          for i in range(config["num_hidden_layers"])
      )
    return cls(**fields)

  @property
  def is_local(self) -> tuple[bool, ...]:
    """Per layer: whether it is a sliding-window (local) layer."""
    return tuple(t == "sliding_attention" for t in self.layer_types)


def hf_name(path: str) -> str:
  """The transformers `Gemma3ForCausalLM` state-dict name of an unscanned parameter path.

  'layers_3/self_attn/q_proj/kernel' -> 'model.layers.3.self_attn.q_proj.weight'.
  """
  path = re.sub(r"^layers_(\d+)/", r"layers/\1/", path)
  path = re.sub(r"/(kernel|scale|embedding)$", "/weight", path)
  return "model." + path.replace("/", ".")


def hf_module_name(path: str) -> str:
  """The transformers module name of an unscanned kernel path, for `jaxpeft.adapters` PEFT export/import
  (`export_peft(..., module_name=hf_module_name)`): 'layers_0/mlp/up_proj/kernel' -> 'model.layers.0.mlp.up_proj'.
  """
  return hf_name(path).rsplit(".", 1)[0]


def init_cache(
    config: Gemma3Config, batch_size: int, max_len: int, dtype: jnp.dtype = jnp.float32
) -> dict[str, jax.Array]:
  """An empty KV cache for `max_len` slots (see the module docstring)."""
  if max_len > config.max_position_embeddings:
    raise ValueError(
        f"max_len={max_len} is longer than the model's context of {config.max_position_embeddings}"
        " tokens (max_position_embeddings); shorten the prompt or the number of new tokens."
    )
  shape = (config.num_hidden_layers, batch_size, max_len, config.num_key_value_heads, config.head_dim)
  return {
      "k": jnp.zeros(shape, dtype),
      "v": jnp.zeros(shape, dtype),
      "mask": jnp.zeros((batch_size, max_len), bool),
      "index": jnp.zeros((), jnp.int32),
  }


class RMSNorm(nn.Module):
  """x / sqrt(mean(x^2) + eps) * (1 + scale), computed in float32 and cast back."""

  eps: float
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
    y = x.astype(jnp.float32)
    y = y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + self.eps)
    return (y * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


def _rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates (batch, T, heads, d_h) by angles given as cos/sin of shape (batch, T, d_h)."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def _rope_tables(
    positions: jax.Array, head_dim: int, theta: float, scaling: float, dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array]:
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)) / scaling
  angles = positions[..., None].astype(jnp.float32) * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
  return x if cap is None else jnp.tanh(x / cap) * cap


def _dense(features: int, name: str, dtype: jnp.dtype, param_dtype: jnp.dtype) -> nn.Dense:
  """A bias-free projection, its weight gradient in canonical layout (`jaxpeft.canonical_dot`)."""
  return nn.Dense(
      features,
      use_bias=False,
      dtype=dtype,
      param_dtype=param_dtype,
      dot_general=canonical_dot.dot_general,
      name=name,
  )


class Attention(nn.Module):
  """Grouped-query attention with QK-norm, RoPE and an optional KV cache."""

  config: Gemma3Config
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, rope, mask, cache_kv=None, cache_index=None):
    c = self.config
    batch, length, _ = x.shape
    dense = lambda n, name: _dense(n, name, self.dtype, self.param_dtype)
    norm = lambda name: RMSNorm(c.rms_norm_eps, self.param_dtype, name=name)
    q = dense(c.num_attention_heads * c.head_dim, "q_proj")(x)
    k = dense(c.num_key_value_heads * c.head_dim, "k_proj")(x)
    v = dense(c.num_key_value_heads * c.head_dim, "v_proj")(x)
    q = norm("q_norm")(q.reshape(batch, length, c.num_attention_heads, c.head_dim))
    k = norm("k_norm")(k.reshape(batch, length, c.num_key_value_heads, c.head_dim))
    v = v.reshape(batch, length, c.num_key_value_heads, c.head_dim)
    q, k = _rope(q, *rope), _rope(k, *rope)
    new_kv = None
    if cache_kv is not None:
      k_all, v_all = cache_kv
      k = jax.lax.dynamic_update_slice(k_all, k.astype(k_all.dtype), (0, cache_index, 0, 0))
      v = jax.lax.dynamic_update_slice(v_all, v.astype(v_all.dtype), (0, cache_index, 0, 0))
      new_kv = (k, v)
    groups = c.num_attention_heads // c.num_key_value_heads
    q = q.reshape(batch, length, c.num_key_value_heads, groups, c.head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(q.dtype)) * c.query_pre_attn_scalar**-0.5
    scores = jnp.where(mask[:, None, None], scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(self.dtype))
    out = out.reshape(batch, length, c.num_attention_heads * c.head_dim)
    return dense(c.hidden_size, "o_proj")(out), new_kv


class Mlp(nn.Module):
  """GeGLU: W_down(gelu_tanh(x W_gate) * x W_up)."""

  config: Gemma3Config
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = lambda n, name: _dense(n, name, self.dtype, self.param_dtype)
    gate = dense(self.config.intermediate_size, "gate_proj")(x)
    up = dense(self.config.intermediate_size, "up_proj")(x)
    return dense(self.config.hidden_size, "down_proj")(nn.gelu(gate, approximate=True) * up)


class DecoderLayer(nn.Module):
  """One Gemma 3 block; `layer` carries this layer's `is_local` flag and cache slices.

  Written as (carry, scanned) -> (carry, scanned output) so it runs under `nn.scan` unchanged.
  """

  config: Gemma3Config
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, h, layer, shared):
    c = self.config
    norm = lambda name: RMSNorm(c.rms_norm_eps, self.param_dtype, name=name)
    local = layer["is_local"]
    rope = tuple(jnp.where(local, a, b) for a, b in zip(shared["rope_local"], shared["rope_global"]))
    mask = jnp.where(local, shared["mask_local"], shared["mask_global"])
    cache_kv = (layer["k"], layer["v"]) if "k" in layer else None
    attn = Attention(c, self.dtype, self.param_dtype, name="self_attn")
    a, new_kv = attn(norm("input_layernorm")(h), rope, mask, cache_kv, shared.get("index"))
    h = h + norm("post_attention_layernorm")(a)
    m = Mlp(c, self.dtype, self.param_dtype, name="mlp")(norm("pre_feedforward_layernorm")(h))
    h = h + norm("post_feedforward_layernorm")(m)
    return h, ({} if new_kv is None else {"k": new_kv[0], "v": new_kv[1]})


class Gemma3(nn.Module):
  """Gemma 3 causal LM. `__call__(input_ids, ...) -> logits` or `(logits, cache)` with a cache.

  Attributes:
    config: the architecture.
    scan_layers: run the layers with `nn.scan` (parameters stacked under `layers/`).
    remat: gradient checkpointing: each layer runs under `nn.remat` (`jax.checkpoint`) with the policy
      `nothing_saveable`, so the backward pass keeps only each layer's input (the residual stream) and
      recomputes the layer's activations. The layer's parameters are inputs of the checkpointed function,
      referenced by the backward pass, never stored again as residuals; no weight-sized product (such as a
      frozen kernel times an adapter factor inside the layer) is saved either. The same numbers, less memory,
      about one more forward pass of compute.
    dtype: the compute dtype; parameters are kept in `param_dtype`.
    tensor_parallel_rules: how a `data` x `model` mesh splits the parameters (`gemma3_sharding.RULES`).
  """

  tensor_parallel_rules: ClassVar[gemma3_sharding.Rules] = gemma3_sharding.RULES
  config: Gemma3Config
  scan_layers: bool = False
  remat: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
      self,
      input_ids: jax.Array,
      attention_mask: jax.Array | None = None,
      positions: jax.Array | None = None,
      segment_ids: jax.Array | None = None,
      cache: dict[str, jax.Array] | None = None,
  ):
    """Logits (batch, T, vocab) for `input_ids` (batch, T).

    Args:
      input_ids: int token ids.
      attention_mask: (batch, T), 1 for real tokens, 0 for padding (default: all real).
      positions: (batch, T) RoPE positions (default: the slot numbers, i.e. 0..T-1 plus the
        cache's `index`).
      segment_ids: (batch, T) ints: which packed example each token belongs to; a token attends only to
        tokens of its own segment (default: one segment per row). Pass per-segment `positions` with them.
      cache: a KV cache from `init_cache` (or a previous call); the new one is returned too.
    """
    c = self.config
    batch, length = input_ids.shape
    start = jnp.zeros((), jnp.int32) if cache is None else cache["index"]
    if cache is None and length > c.max_position_embeddings:
      raise ValueError(
          f"input length {length} is longer than the model's context of {c.max_position_embeddings}"
          " tokens (max_position_embeddings); truncate the input."
      )
    if attention_mask is None:
      attention_mask = jnp.ones((batch, length), bool)
    attention_mask = attention_mask.astype(bool)
    if positions is None:
      positions = jnp.broadcast_to(start + jnp.arange(length), (batch, length))
    query_slots = start + jnp.arange(length)
    if cache is None:
      key_valid, key_slots = attention_mask, query_slots
    else:
      key_valid = jax.lax.dynamic_update_slice(cache["mask"], attention_mask, (0, start))
      key_slots = jnp.arange(cache["mask"].shape[1])
    causal = key_slots[None, :] <= query_slots[:, None]
    mask_global = causal[None] & key_valid[:, None, :]
    if segment_ids is not None:
      if cache is not None:
        raise ValueError(
            "segment_ids (packed sequences) are for training; decode one sequence per row with a cache."
        )
      mask_global &= segment_ids[:, :, None] == segment_ids[:, None, :]
    mask_local = mask_global & (query_slots[:, None] - key_slots[None, :] < c.sliding_window)[None]
    shared = {
        "rope_local": _rope_tables(positions, c.head_dim, c.rope_local_base_freq, 1.0, self.dtype),
        "rope_global": _rope_tables(positions, c.head_dim, c.rope_theta, c.global_rope_scaling, self.dtype),
        "mask_local": mask_local,
        "mask_global": mask_global,
    }
    layers = {"is_local": jnp.asarray(c.is_local)}
    if cache is not None:
      shared["index"] = start
      layers.update(k=cache["k"], v=cache["v"])

    embed = nn.Embed(
        c.vocab_size,
        c.hidden_size,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        embedding_init=nn.initializers.normal(0.02),
        name="embed_tokens",
    )
    h = embed(input_ids) * jnp.asarray(math.sqrt(c.hidden_size), self.dtype)
    layer_class = DecoderLayer
    if self.remat:
      layer_class = nn.remat(
          DecoderLayer, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=not self.scan_layers
      )
    if self.scan_layers:
      scanned = nn.scan(
          layer_class,
          variable_axes={"params": 0},
          split_rngs={"params": True},
          in_axes=(0, nn.broadcast),
          length=c.num_hidden_layers,
      )
      h, new_layers = scanned(c, self.dtype, self.param_dtype, name="layers")(h, layers, shared)
    else:
      outputs = []
      for i in range(c.num_hidden_layers):
        layer = jax.tree.map(lambda a, i=i: a[i], layers)
        h, out = layer_class(c, self.dtype, self.param_dtype, name=f"layers_{i}")(h, layer, shared)
        outputs.append(out)
      new_layers = jax.tree.map(lambda *a: jnp.stack(a), *outputs)
    h = RMSNorm(c.rms_norm_eps, self.param_dtype, name="norm")(h)
    logits = _softcap(embed.attend(h).astype(jnp.float32), c.final_logit_softcapping)
    if cache is None:
      return logits
    return logits, {"k": new_layers["k"], "v": new_layers["v"], "mask": key_valid, "index": start + length}


def stack_layers(params: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
  """Unscanned params (`layers_{i}`) -> scanned params (`layers` with a leading layer axis)."""
  params = dict(params)
  per_layer = [params.pop(f"layers_{i}") for i in range(num_layers)]
  params["layers"] = jax.tree.map(lambda *a: jnp.stack(a), *per_layer)
  return params


def unstack_layers(params: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
  """Scanned params (`layers`) -> unscanned params (`layers_{i}`)."""
  params = dict(params)
  stacked = params.pop("layers")
  for i in range(num_layers):
    params[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
  return params


def from_config_dict(config: Sequence[tuple[str, Any]] | Mapping[str, Any], **kwargs: Any) -> Gemma3:
  """`Gemma3(Gemma3Config(**config), **kwargs)`: the registry's constructor."""
  return Gemma3(Gemma3Config(**dict(config)), **kwargs)
