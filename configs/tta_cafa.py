"""Test-time adaptation with `jaxpeft.tta.cafa` (Adam(1e-3), epsilon=1e-5); see launch/adapt.py.

The source class statistics come from `clean_images` labelled training images (at least 2 per class).

  python -m launch.adapt --config=configs/tta_cafa.py --config.pretrained=workdir/fashion_resnet \
      --workdir=workdir/tta_cafa
"""

import ml_collections

from configs import tta_common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = tta_common.base("cafa", arg, clean_images=4096)
  if arg == "smoke":
    config.clean_images = 160  # enough for every class to appear twice
  return config
