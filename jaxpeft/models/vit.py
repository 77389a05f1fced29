"""A small Vision Transformer (Flax linen), sized for 8x8 images such as the scikit-learn digits.

The architecture is ViT's (Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for
Image Recognition at Scale", 2020, arXiv:2010.11929) with pre-LN blocks, as in the paper's
Eq. 1-4 and the big_vision / vision_transformer reference code:

  z_0 = [x_cls; P(x)] + E_pos                    P: non-overlapping p x p patches -> D (a Conv)
  z'  = z + MHA(LN(z))                           per block
  z   = z' + MLP(LN(z'))                         MLP: Dense(mlp_dim) -> GELU -> Dense(D)
  y   = head(LN(z_L)[0])                         class-token pooling ('mean': mean over tokens)

Visual prompts (`jaxpeft.adapters.methods.vpt`, a module hook on the blocks) enter after the position
embedding, right after the first `num_prefix_tokens` tokens (the VPT option: 1 for the class token
of 'cls', 0 for 'mean'). 'cls' pooling reads z_L[0], still the class token; 'mean' pooling averages
every token, prompts included, which is the default output of the VPT reference code for
mean-pooled backbones (KMnP/vpt, src/models/vit_prompt/vit_mae.py, VIT_POOL_TYPE 'original'; its
'img_pool' variant would average the patches alone).

The head is one Dense layer, as ViT uses when fine-tuning (the paper's pre-training MLP head is
replaced by a linear layer for downstream tasks), so a linear probe is `trainable.base='head/.*'`.
No dropout: the model is the same function in train and eval.

Parameter paths ('/'-joined, as adapter target regexes see them):

  patch_embed/{kernel (p, p, C, D), bias}        cls_token (1, 1, D)   pos_embedding (1, T, D)
  block_{i}/ln_attention/{scale,bias}            block_{i}/mlp/ln/{scale,bias}   (the MLP's LayerNorm)
  block_{i}/attention/{query,key,value}/kernel   (D, heads, D/heads)   DenseGeneral: fan_in_axes=1
  block_{i}/attention/out/kernel                 (heads, D/heads, D)   DenseGeneral: fan_in_axes=2
  block_{i}/mlp/{fc1,fc2}/{kernel,bias}          norm/{scale,bias}     head/{kernel,bias}

so LoRA on the attention query and value projections is targets=r".*attention/(query|value)/kernel"
with fan_in_axes=((r".*attention/(query|key|value)/kernel", 1), (r".*attention/out/kernel", 2)).
"""

import flax.linen as nn
import jax.numpy as jnp

from jaxpeft import canonical_dot
from jaxpeft.models import activations

POOLINGS = ("cls", "mean")


class FeedForward(nn.Module):
  """The MLP branch of a pre-LN block, `fc2(GELU(fc1(LN(z))))`: its input is the residual stream z.

  Its own submodule (LayerNorm included) so that adapters placed around the MLP branch (AdaptFormer,
  whose reference adapter reads the residual stream before the block's second LayerNorm) hook exactly it.
  """

  mlp_dim: int

  @nn.compact
  def __call__(self, z: jnp.ndarray) -> jnp.ndarray:
    y = nn.Dense(self.mlp_dim, dot_general=canonical_dot.dot_general, name="fc1")(nn.LayerNorm(name="ln")(z))
    return nn.Dense(z.shape[-1], dot_general=canonical_dot.dot_general, name="fc2")(activations.gelu(y))


class EncoderBlock(nn.Module):
  """Pre-LN transformer block: z + MHA(LN(z)), then + MLP(LN(.))."""

  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, z: jnp.ndarray) -> jnp.ndarray:
    y = nn.LayerNorm(name="ln_attention")(z)
    z = z + nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads,
        qkv_dot_general=canonical_dot.dot_general,
        out_dot_general=canonical_dot.dot_general,
        name="attention",
    )(y, y)
    return z + FeedForward(self.mlp_dim, name="mlp")(z)


class ViT(nn.Module):
  """Vision Transformer classifier (see the module docstring).

  Attributes:
    num_classes: number of output logits.
    patch_size: side p of the square patches; the image sides must be multiples of it.
    hidden: token width D (a multiple of `num_heads`).
    depth: number of transformer blocks.
    num_heads: attention heads per block.
    mlp_dim: hidden width of each block's MLP.
    pool: 'cls' (a learned class token, ViT's default) or 'mean' (mean over the patch tokens, and
      over VPT's prompt tokens when it inserts them).
  """

  num_classes: int
  patch_size: int = 2
  hidden: int = 32
  depth: int = 2
  num_heads: int = 4
  mlp_dim: int = 64
  pool: str = "cls"

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    del train  # No dropout: the same function in train and eval.
    if self.pool not in POOLINGS:
      raise ValueError(f"ViT pool={self.pool!r}: use one of {POOLINGS}.")
    if self.hidden % self.num_heads:
      raise ValueError(f"ViT hidden={self.hidden} is not divisible by num_heads={self.num_heads}.")
    if x.ndim != 4 or x.shape[1] % self.patch_size or x.shape[2] % self.patch_size:
      raise ValueError(
          f"ViT expects images (batch, height, width, channels) with height and width multiples of"
          f" patch_size={self.patch_size}; got shape {x.shape}. Change config.model.patch_size."
      )
    p = self.patch_size
    x = nn.Conv(self.hidden, (p, p), strides=(p, p), padding="VALID", name="patch_embed")(x)
    z = x.reshape(x.shape[0], -1, self.hidden)
    if self.pool == "cls":
      cls = self.param("cls_token", nn.initializers.zeros, (1, 1, self.hidden))
      z = jnp.concatenate([jnp.broadcast_to(cls, (z.shape[0], 1, self.hidden)), z], axis=1)
    z = z + self.param("pos_embedding", nn.initializers.normal(0.02), (1, z.shape[1], self.hidden))
    for i in range(self.depth):
      z = EncoderBlock(self.num_heads, self.mlp_dim, name=f"block_{i}")(z)
    z = nn.LayerNorm(name="norm")(z)
    pooled = z[:, 0] if self.pool == "cls" else z.mean(axis=1)
    return nn.Dense(self.num_classes, dot_general=canonical_dot.dot_general, name="head")(pooled)
