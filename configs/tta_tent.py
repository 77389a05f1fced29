"""Test-time adaptation with `jaxpeft.tta.tent` (authors' defaults); see launch/adapt.py.

  python -m launch.adapt --config=configs/tta_tent.py --config.pretrained=workdir/fashion_resnet \
      --workdir=workdir/tta_tent
"""

import ml_collections

from configs import tta_common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return tta_common.base("tent", arg, optimizer={"name": "adam", "learning_rate": 1e-3})
