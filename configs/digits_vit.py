r"""A small ViT on the digits: pretrain on digits 0-4, then adapt to digits 5-9 (a new 5-class head).

Methods (the config argument; each adaptation method starts from the pretrain run's export):

  pretrain      every parameter, digits 0-4 (run it first)
  linear_probe  only the new head, digits 5-9
  full          every parameter, digits 5-9
  lora          rank-4 LoRA on the attention query and value projections, + the head
  lora_qkvo     the same LoRA on the query, key, value and output projections, + the head
  vpt_shallow   VPT-shallow: 4 prompt tokens inserted after the class token before the first block,
                + the head (4 D trainable prompt scalars)
  vpt_deep      VPT-deep: 4 prompt tokens per block, inserted before the first block and replaced
                before each later one, + the head (depth x 4 D)

Launch (the whole comparison and its table: `python -m experiments.vision_adapt`):

  python -m launch.train --config=configs/digits_vit.py:pretrain --workdir=workdir/digits_vit/pretrain
  python -m launch.train --config=configs/digits_vit.py:lora --workdir=workdir/digits_vit/lora
  python -m launch.train --config=configs/digits_vit.py:vpt_deep --workdir=workdir/digits_vit/vpt_deep

The adaptation methods read `workdir/digits_vit/pretrain/export/params` (relative to the current
directory); another pretrain run: `--config.init_from.params=/abs/path/to/export/params`.
Smoke variant (4 steps, for tests and CI): append ':smoke', e.g. `configs/digits_vit.py:lora:smoke`.
"""

import ml_collections

from configs import digits_recipe
from configs.digits_recipe import Method

QUERY_VALUE = r".*attention/(query|value)/kernel"
QUERY_KEY_VALUE_OUT = r".*attention/(query|key|value|out)/kernel"
PATCH_SIZE = 2
# VPT targets a width-D leaf of each prompted block (its first LayerNorm's scale) and hooks that block; the
# number of prompt tokens is the recipe's rank (4). Prompts go after the class token (num_prefix_tokens=1), so
# the 'cls' pooling still reads the class token; the init bound uses the model's patch size.
VPT = {"num_prefix_tokens": 1, "patch_size": PATCH_SIZE}

RECIPE = digits_recipe.Recipe(
    name="digits_vit",
    dataset="jaxpeft_digits",
    model={
        "name": "vit",
        "num_classes": 5,
        "patch_size": PATCH_SIZE,
        "hidden": 32,
        "depth": 2,
        "num_heads": 4,
        "mlp_dim": 64,
        "pool": "cls",
    },
    smoke_model={"hidden": 8, "depth": 1, "num_heads": 2, "mlp_dim": 8},
    source={"classes": (0, 1, 2, 3, 4)},
    target={"classes": (5, 6, 7, 8, 9)},
    keep_fresh="head/.*",
    # nn.MultiHeadDotProductAttention's DenseGeneral kernels: q/k/v (D, heads, D/heads), out (heads, D/heads, D).
    fan_in_axes=((r".*attention/(query|key|value)/kernel", 1), (r".*attention/out/kernel", 2)),
    # Adaptation learning rates chosen on a validation slice of train (experiments/results/lr_sweep_vit.md).
    methods={
        digits_recipe.PRETRAIN: Method(".*", 3e-3),
        "linear_probe": Method("head/.*", 1e-1),
        "full": Method(".*", 3e-2),
        "lora": Method("head/.*", 1e-1, "lora", QUERY_VALUE),
        "lora_qkvo": Method("head/.*", 3e-2, "lora", QUERY_KEY_VALUE_OUT),
        "vpt_shallow": Method("head/.*", 3e-2, "vpt", r"block_0/ln_attention/scale", VPT),
        "vpt_deep": Method("head/.*", 1e-2, "vpt", r"block_\d+/ln_attention/scale", VPT),
    },
    num_train_steps={digits_recipe.PRETRAIN: 600, "adapt": 300},
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg` = '<method>' or '<method>:smoke' (see the module docstring; default 'pretrain')."""
  return digits_recipe.build(RECIPE, arg)
