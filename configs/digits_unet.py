r"""A small UNet segmenting the digits: pretrain on clean images, then adapt to rotated ones.

The task is `jaxpeft_digits_segmentation` (per pixel: 0 background, digit + 1 on its strokes; see
`jaxpeft.data.digits_segmentation`); the shifted domain is `config.dataset.shift='rotate90'` (images
and their label maps rotated 90 degrees counter-clockwise). Every method adapts the 3x3 convolutions
(`down_*`, `bottleneck`, `up_*`) and keeps the 1x1 head of the pretrained model:

  pretrain   every parameter, clean images (run it first)
  full       every parameter, rotated images
  lora_c     LoRA-C as released (= convLoRA): loralib's ConvLoRA on each conv kernel's (k I) x (k O)
             matricisation, rank 4, inner width r k (conv_lora, default variant 'loralib')
  lora_c_layer_rank     the same with inner width r (conv_lora variant 'layer_rank')
  cp_lora    CP-LoRA: a rank-4 CP decomposition of each kernel update (cp_lora)
  conv_dora_layer_rank  DoRA's magnitude/direction split over lora_c_layer_rank (conv_dora variant
             'layer_rank')
  tlora      TLoRA: a tensor-ring-matrix transform of each folded kernel + a tensor-ring residual (tlora)

Shift and learning rates were chosen on a validation slice, never on the test split: pretrain on
clean 'train[:85%]', adapt for 300 steps on the shifted 'train[:85%]', mean IoU on the shifted
'train[85%:]' (`python -m experiments.lr_sweep --config=digits_unet ...`; tables and commands in
experiments/results/lr_sweep_unet.md). The pretrained model's validation mean IoU is 0.90 on clean
images, 0.004 on inverted and 0.10 on rotated ones. Inversion (1 - intensity, the earlier target)
adds to each first-layer response an offset that only the frozen biases could cancel: after 300
steps LoRA-C with inner width r reached 0.07 / 0.09 / 0.13 at learning rates 3e-3 / 1e-2 / 3e-2 (full fine-tuning
0.15 / 0.46 / 0.64 at 3e-4 / 1e-3 / 3e-3), so the comparison only told the adapters failed. Rotated
digits keep their intensities and need re-oriented filters, which every method learns in 300 steps
(validation mean IoU 0.83-0.90 at the chosen rates). Each method's rate is the best of its grid
(adapters 1e-2, 3e-2, 1e-1; full fine-tuning 1e-3, 3e-3, 1e-2, 3e-2). The sweep ran before the
conv_lora variants were renamed after the released code (2026-12): its `lora_c` is today's
`lora_c_layer_rank`, its `convlora` today's `lora_c`, its `conv_dora` today's `conv_dora_layer_rank`.

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

RECIPE = digits_recipe.Recipe(
    name="digits_unet",
    dataset="jaxpeft_digits_segmentation",
    model={"name": "unet", "num_classes": 11, "features": (16, 32, 64)},
    smoke_model={"features": (4, 4, 4)},
    source={"shift": "", "foreground_threshold": 0.5},
    target={"shift": "rotate90", "foreground_threshold": 0.5},
    keep_fresh="",
    fan_in_axes=((CONV_3X3, 3),),  # Flax Conv kernels (kh, kw, in, out)
    methods={  # learning rates: the validation sweep's choices (module docstring)
        digits_recipe.PRETRAIN: Method(".*", 3e-3),
        "full": Method(".*", 1e-2),
        "lora_c": Method("", 3e-2, "conv_lora", CONV_3X3, {"variant": "loralib"}),
        "lora_c_layer_rank": Method("", 3e-2, "conv_lora", CONV_3X3, {"variant": "layer_rank"}),
        "cp_lora": Method("", 1e-1, "cp_lora", CONV_3X3),
        "conv_dora_layer_rank": Method("", 3e-2, "conv_dora", CONV_3X3, {"variant": "layer_rank"}),
        "tlora": Method("", 3e-2, "tlora", CONV_3X3),
    },
    num_train_steps={digits_recipe.PRETRAIN: 600, "adapt": 300},
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg` = '<method>' or '<method>:smoke' (see the module docstring; default 'pretrain')."""
  return digits_recipe.build(RECIPE, arg)
