"""A BERT encoder (Flax linen) with sentence-transformers' mean pooling and an optional head.

The architecture is BERT's (Devlin, Chang, Lee & Toutanova, "BERT: Pre-training of Deep
Bidirectional Transformers for Language Understanding", 2018, arXiv:1810.04805), computed as
Hugging Face `transformers.BertModel` does, so that Hugging Face checkpoints load unchanged
(`jaxpeft.models.hf_loader.load_bert`):

  h_0 = LayerNorm(E_word[ids] + E_pos[0..L-1] + E_type[token_type_ids])
  for each layer (post-LN):
    a   = softmax(Q K^T / sqrt(d_head) + mask) V        with Q, K, V = h W_q + b_q, ...
    h'  = LayerNorm(h + a W_o + b_o)
    h   = LayerNorm(h' + GELU(h' W_1 + b_1) W_2 + b_2)   GELU is the exact erf form
  sentence embedding e = sum_t m_t h_t / max(sum_t m_t, 1e-9)   (m: attention mask)
  optionally           e = e / max(||e||_2, 1e-12)

Mean pooling over the real (unpadded) tokens and the L2 normalisation are the `Pooling` and
`Normalize` modules of the sentence-transformers pipeline of all-MiniLM-L6-v2 (Reimers &
Gurevych, "Sentence-BERT", 2019, arXiv:1908.10084), with the same epsilons. BERT's pooler (a tanh
dense layer on [CLS], trained for next-sentence prediction) does not enter the embedding; with
`add_pooling_layer=True` the model carries it as `transformers.BertModel` does (params
`pooler/dense`, loaded from the checkpoint, so that adapters trained on it import) and
`pooler_output` computes `tanh(h_L[:, 0] W_p + b_p)`.

Soft prompts (`jaxpeft.adapters.methods.prompt_tuning`, a module hook on `embeddings/word_embeddings`):
when the word-embedding output has p more tokens than `input_ids`, [P; E_word[ids]], the model
does what Hugging Face PEFT does for prompt tuning of a BERT encoder (peft/peft_model.py,
`PeftModelForSequenceClassification.forward`: the prompts are concatenated in front of
`inputs_embeds`, the attention mask gets p leading ones and `token_type_ids` p leading zeros, and
`position_ids` are dropped, so `BertEmbeddings` numbers the whole sequence):

  h_0 = LayerNorm([P; E_word[ids]] + E_pos[0..p+L-1] + E_type[[0]*p; token_type_ids])
  m   = [1]*p; attention_mask          (the mask every layer attends with, and the pooling mask)

So the prompts get positions 0..p-1 and token type 0, and the text's positions shift by p; the
length limit is p + L <= max_position_embeddings. The sentence embedding averages over that
extended mask, prompts included: it is sentence-transformers' mean pooling given the mask the
encoder used (sentence-transformers itself has no soft-prompt support: its `Pooling` sees a mask
shorter than the token embeddings and falls back to all ones, which would also average padding).

With `num_classes` set, the model returns logits of a dropout + dense head on the sentence
embedding instead of the embedding itself.

Parameter paths ('/'-joined, as adapter target regexes see them):

  embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding
  embeddings/layer_norm/{scale,bias}
  encoder/layer_{i}/attention/{query,key,value,output}/{kernel,bias}   kernels (d_in, d_out)
  encoder/layer_{i}/attention_layer_norm/{scale,bias}
  encoder/layer_{i}/mlp/intermediate/{kernel,bias}                     (hidden, intermediate)
  encoder/layer_{i}/mlp/output/{kernel,bias}                           (intermediate, hidden)
  encoder/layer_{i}/output_layer_norm/{scale,bias}
  pooler/dense/{kernel,bias}                                           only with add_pooling_layer
  classifier/dense/{kernel,bias}                                       only with num_classes

so LoRA on the attention query and value projections is `r".*attention/(query|value)/kernel"`.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpeft import canonical_dot
from jaxpeft.models import activations

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": activations.gelu,
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
}
_POOLING_EPS = 1e-9  # sentence_transformers.models.Pooling clamps the token count to this.
_NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize's default eps.


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The architecture fields of a Hugging Face BERT `config.json` (same names)."""

  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
          f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
          f"{self.num_attention_heads}; BERT splits the hidden size evenly across heads."
      )
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; use one of {sorted(_ACTIVATIONS)}.")

  @classmethod
  def from_dict(cls, config: Mapping[str, Any]) -> "BertConfig":
    """Reads the fields it knows from a `config.json` dict; other keys are ignored.

    Raises:
      ValueError: the config is not an absolute-position BERT encoder.
    """
    model_type = config.get("model_type", "bert")
    position_type = config.get("position_embedding_type", "absolute")
    if model_type != "bert" or position_type != "absolute":
      raise ValueError(
          f"config.json describes model_type={model_type!r} with position_embedding_type="
          f"{position_type!r}; jaxpeft.models.bert implements only 'bert' with 'absolute'"
          " position embeddings."
      )
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in names})


class _BertModule(nn.Module):
  """Base of the BERT submodules: the architecture, the dtypes, and the layers they build alike."""

  config: BertConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def dense(self, features: int, name: str) -> nn.Dense:
    """A Dense layer with BERT's N(0, initializer_range^2) kernel init and zero bias."""
    return nn.Dense(
        features,
        dot_general=canonical_dot.dot_general,
        kernel_init=nn.initializers.normal(self.config.initializer_range),
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=name,
    )

  def layer_norm(self, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=self.config.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name=name
    )


class SelfAttention(_BertModule):
  """Multi-head self-attention with separate query/key/value/output `nn.Dense` projections."""

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, *, train: bool) -> jax.Array:
    cfg = self.config
    heads = cfg.num_attention_heads
    split = lambda y: y.reshape(*y.shape[:-1], heads, cfg.hidden_size // heads)
    q, k, v = (split(self.dense(cfg.hidden_size, name)(x)) for name in ("query", "key", "value"))
    dropout_rate = cfg.attention_probs_dropout_prob if train else 0.0
    attended = nn.dot_product_attention(
        q,
        k,
        v,
        mask=mask,
        dropout_rng=self.make_rng("dropout") if dropout_rate > 0 else None,
        dropout_rate=dropout_rate,
        deterministic=dropout_rate == 0,
        dtype=self.dtype,
    )
    return self.dense(cfg.hidden_size, "output")(attended.reshape(*x.shape[:-1], cfg.hidden_size))


class FeedForward(_BertModule):
  """The MLP branch of a layer, `dropout(act(x W_1 + b_1) W_2 + b_2)`: its input is the residual stream.

  A submodule of its own so that adapters placed around the MLP (AdaptFormer) hook exactly it. The
  dropout is the layer's (it keeps the layer's rng stream, so the masks do not depend on this split).
  """

  dropout: nn.Module | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    h = self.dense(cfg.intermediate_size, "intermediate")(x)
    h = self.dense(cfg.hidden_size, "output")(_ACTIVATIONS[cfg.hidden_act](h))
    return h if self.dropout is None else self.dropout(h)


class TransformerLayer(_BertModule):
  """One post-LN BERT layer: attention and MLP blocks, each `LayerNorm(x + Dropout(f(x)))`."""

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, *, train: bool) -> jax.Array:
    cfg = self.config
    dropout = nn.Dropout(cfg.hidden_dropout_prob, deterministic=not train)
    a = SelfAttention(cfg, self.dtype, self.param_dtype, name="attention")(x, mask, train=train)
    x = self.layer_norm("attention_layer_norm")(x + dropout(a))
    h = FeedForward(cfg, self.dtype, self.param_dtype, dropout=dropout, name="mlp")(x)
    return self.layer_norm("output_layer_norm")(x + h)


class Embeddings(_BertModule):
  """Word + absolute position + token type embeddings, then LayerNorm and dropout.

  Leading soft-prompt rows that a hook added to the word embeddings (see the module docstring)
  get positions 0..p-1 and token type 0, as in PEFT.
  """

  @nn.compact
  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array, *, train: bool):
    cfg = self.config
    embed = lambda num, name: nn.Embed(
        num,
        cfg.hidden_size,
        embedding_init=nn.initializers.normal(cfg.initializer_range),
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=name,
    )
    words = embed(cfg.vocab_size, "word_embeddings")(input_ids)
    length = words.shape[-2]
    num_prompts = length - input_ids.shape[-1]
    if num_prompts < 0:
      raise ValueError(
          f"The word embeddings have {length} tokens for {input_ids.shape[-1]} input ids; a hook on"
          " embeddings/word_embeddings may only prepend tokens (prompt tuning), not remove them."
      )
    if length > cfg.max_position_embeddings:
      prompts = f" ({num_prompts} soft prompts + {input_ids.shape[-1]} tokens)" if num_prompts else ""
      raise ValueError(
          f"Sequences of length {length}{prompts} exceed max_position_embeddings="
          f"{cfg.max_position_embeddings}; tokenize with max_len <= "
          f"{cfg.max_position_embeddings - num_prompts}."
      )
    prompt_types = jnp.zeros((*token_type_ids.shape[:-1], num_prompts), token_type_ids.dtype)
    x = (
        words
        + embed(cfg.max_position_embeddings, "position_embeddings")(jnp.arange(length))
        + embed(cfg.type_vocab_size, "token_type_embeddings")(
            jnp.concatenate([prompt_types, token_type_ids], axis=-1)
        )
    )
    x = self.layer_norm("layer_norm")(x)
    return nn.Dropout(cfg.hidden_dropout_prob, deterministic=not train)(x)


class Encoder(_BertModule):
  """The stack of `num_hidden_layers` transformer layers, named `layer_0`, `layer_1`, ..."""

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, *, train: bool) -> jax.Array:
    for i in range(self.config.num_hidden_layers):
      x = TransformerLayer(self.config, self.dtype, self.param_dtype, name=f"layer_{i}")(x, mask, train=train)
    return x


class Pooler(_BertModule):
  """BERT's pooler, `tanh(h[:, 0] W_p + b_p)` on the first token (transformers' `BertPooler`)."""

  @nn.compact
  def __call__(self, hidden: jax.Array) -> jax.Array:
    return jnp.tanh(self.dense(self.config.hidden_size, "dense")(hidden[..., 0, :]))


class ClassificationHead(nn.Module):
  """Dropout, then a dense layer to `num_classes` logits."""

  num_classes: int
  dropout_rate: float = 0.1
  initializer_range: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(
        self.num_classes,
        dot_general=canonical_dot.dot_general,
        kernel_init=nn.initializers.normal(self.initializer_range),
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name="dense",
    )(x)


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """Mean of `hidden` (batch, length, d) over the positions where `attention_mask` is 1."""
  m = attention_mask.astype(hidden.dtype)[..., None]
  return (hidden * m).sum(axis=-2) / jnp.maximum(m.sum(axis=-2), _POOLING_EPS)


def l2_normalize(x: jax.Array) -> jax.Array:
  """`x / max(||x||_2, 1e-12)` along the last axis (torch.nn.functional.normalize)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), _NORMALIZE_EPS)


class BertEncoder(nn.Module):
  """BERT with mean pooling: sentence embeddings, or classification logits with `num_classes`.

  Attributes:
    config: the architecture (`BertConfig.from_dict(json.load(config.json))`).
    num_classes: if set, `__call__` returns logits of a `ClassificationHead` (submodule
      `classifier`) on the pooled embedding; `embed` still returns the embedding.
    normalize: L2-normalise the pooled embedding (before the head, if any); all-MiniLM-L6-v2's
      sentence-transformers pipeline does.
    add_pooling_layer: carry BERT's [CLS] pooler (submodule `pooler`, read by `pooler_output`
      only), as `transformers.BertModel(add_pooling_layer=True)` does.
    dtype: computation dtype; param_dtype: parameter dtype. float32 by default.
  """

  config: BertConfig
  num_classes: int | None = None
  normalize: bool = False
  add_pooling_layer: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.embeddings = Embeddings(self.config, **kw)
    self.encoder = Encoder(self.config, **kw)
    if self.add_pooling_layer:
      self.pooler = Pooler(self.config, **kw)
    if self.num_classes is not None:
      self.classifier = ClassificationHead(
          self.num_classes, self.config.hidden_dropout_prob, self.config.initializer_range, **kw
      )

  def embed(
      self,
      input_ids: jax.Array,
      attention_mask: jax.Array | None = None,
      token_type_ids: jax.Array | None = None,
      *,
      train: bool = False,
  ) -> jax.Array:
    """Sentence embeddings (batch, hidden) of int token ids (batch, length).

    Padding positions have `attention_mask` 0 (default: all ones); `token_type_ids` default
    to 0. `train=True` enables dropout and needs a 'dropout' rng. Soft prompts prepended by a
    prompt-tuning hook are attended to and pooled (the mask gets leading ones; module docstring).
    """
    hidden, attention_mask = self._hidden_states(input_ids, attention_mask, token_type_ids, train)
    if self.add_pooling_layer and self.is_initializing():
      self.pooler(hidden)  # Creates the pooler's parameters; the embedding does not use it.
    x = mean_pool(hidden, attention_mask)
    return l2_normalize(x) if self.normalize else x

  def pooler_output(
      self,
      input_ids: jax.Array,
      attention_mask: jax.Array | None = None,
      token_type_ids: jax.Array | None = None,
      *,
      train: bool = False,
  ) -> jax.Array:
    """`tanh(h_L[:, 0] W_p + b_p)` (batch, hidden), transformers' `pooler_output`; needs the pooler."""
    if not self.add_pooling_layer:
      raise ValueError("pooler_output needs BertEncoder(add_pooling_layer=True) (a checkpoint with a pooler).")
    return self.pooler(self._hidden_states(input_ids, attention_mask, token_type_ids, train)[0])

  def _hidden_states(self, input_ids, attention_mask, token_type_ids, train):
    """The last layer's hidden states and the attention mask extended over soft prompts, if any."""
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = self.embeddings(input_ids, token_type_ids, train=train)
    num_prompts = x.shape[-2] - input_ids.shape[-1]
    prompt_mask = jnp.ones((*attention_mask.shape[:-1], num_prompts), attention_mask.dtype)
    attention_mask = jnp.concatenate([prompt_mask, attention_mask], axis=-1)
    keys_mask = nn.make_attention_mask(jnp.ones_like(attention_mask), attention_mask)
    return self.encoder(x, keys_mask, train=train), attention_mask

  def __call__(
      self,
      input_ids: jax.Array,
      attention_mask: jax.Array | None = None,
      token_type_ids: jax.Array | None = None,
      *,
      train: bool = False,
  ) -> jax.Array:
    """`embed(...)`, followed by the classification head when `num_classes` is set."""
    x = self.embed(input_ids, attention_mask, token_type_ids, train=train)
    return x if self.num_classes is None else self.classifier(x, train=train)
