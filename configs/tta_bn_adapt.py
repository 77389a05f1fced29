"""Test-time adaptation with `jaxpeft.tta.bn_adapt` (authors' defaults); see launch/adapt.py.

  python -m launch.adapt --config=configs/tta_bn_adapt.py --config.pretrained=workdir/fashion_resnet \
      --workdir=workdir/tta_bn_adapt
"""

import ml_collections

from configs import tta_common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return tta_common.base("bn_adapt", arg)
