r"""A small UNet segmenting the digits: pretrain on clean images, then adapt to inverted ones.

The task is `jaxpeft_digits_segmentation` (per pixel: 0 background, digit + 1 on its strokes; see
`jaxpeft.data.digits_segmentation`); the shifted domain is `config.dataset.shift='invert'`
(1 - intensity). Every method adapts the 3x3 convolutions (`down_*`, `bottleneck`, `up_*`) and
keeps the 1x1 head of the pretrained model:

  pretrain   every parameter, clean images (run it first)
  full       every parameter, inverted images
  lora_c     LoRA-C: rank-4 LoRA on each conv kernel's (k I) x (k O) matricisation (conv_lora)
  convlora   convLoRA: loralib's ConvLoRA, inner width r k (conv_lora variant 'convlora')
  cp_lora    CP-LoRA: a rank-4 CP decomposition of each kernel update (cp_lora)
  conv_dora  DoRA-C: DoRA's magnitude/direction split over LoRA-C (conv_dora)
  tlora      TLoRA: a tensor-ring-matrix transform of each folded kernel + a tensor-ring residual (tlora)

Launch (the whole comparison and its table: `python -m experiments.vision_adapt`):

  python -m launch.train --config=configs/digits_unet.py:pretrain --workdir=workdir/digits_unet/pretrain
  python -m launch.train --config=configs/digits_unet.py:lora_c --workdir=workdir/digits_unet/lora_c

The adaptation methods read `workdir/digits_unet/pretrain/export/params` (relative to the current
directory); another pretrain run: `--config.init_from.params=/abs/path/to/export/params`.
Smoke variant (4 steps, for tests and CI): append ':smoke', e.g. `configs/digits_unet.py:cp_lora:smoke`.
"""

import ml_collections

from configs import digits_recipe
from configs.digits_recipe import Method

CONV_3X3 = r"(down_\d+|bottleneck|up_\d+)/conv_\d/kernel"
ADAPTER_LR = 1e-2

RECIPE = digits_recipe.Recipe(
    name="digits_unet",
    dataset="jaxpeft_digits_segmentation",
    model={"name": "unet", "num_classes": 11, "features": (16, 32, 64)},
    smoke_model={"features": (4, 4, 4)},
    source={"shift": "", "foreground_threshold": 0.5},
    target={"shift": "invert", "foreground_threshold": 0.5},
    keep_fresh="",
    fan_in_axes=((CONV_3X3, 3),),  # Flax Conv kernels (kh, kw, in, out)
    methods={
        digits_recipe.PRETRAIN: Method(".*", 3e-3),
        "full": Method(".*", 1e-3),
        "lora_c": Method("", ADAPTER_LR, "conv_lora", CONV_3X3, {"variant": "lora_c"}),
        "convlora": Method("", ADAPTER_LR, "conv_lora", CONV_3X3, {"variant": "convlora"}),
        "cp_lora": Method("", ADAPTER_LR, "cp_lora", CONV_3X3),
        "conv_dora": Method("", ADAPTER_LR, "conv_dora", CONV_3X3, {"variant": "lora_c"}),
        "tlora": Method("", ADAPTER_LR, "tlora", CONV_3X3),
    },
    num_train_steps={digits_recipe.PRETRAIN: 600, "adapt": 300},
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg` = '<method>' or '<method>:smoke' (see the module docstring; default 'pretrain')."""
  return digits_recipe.build(RECIPE, arg)
