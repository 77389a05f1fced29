"""Test-time adaptation with `jaxpeft.tta.unmix_tns` (authors' defaults: K=16 components); see launch/adapt.py.

  python -m launch.adapt --config=configs/tta_unmix_tns.py --config.pretrained=workdir/fashion_resnet \
      --workdir=workdir/tta_unmix_tns
"""

import ml_collections

from configs import tta_common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return tta_common.base("unmix_tns", arg)
