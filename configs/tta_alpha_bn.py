"""Test-time adaptation with `jaxpeft.tta.alpha_bn` (reference default alpha=0.1); see launch/adapt.py.

  python -m launch.adapt --config=configs/tta_alpha_bn.py --config.pretrained=workdir/fashion_resnet \
      --workdir=workdir/tta_alpha_bn
"""

import ml_collections

from configs import tta_common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return tta_common.base("alpha_bn", arg)
