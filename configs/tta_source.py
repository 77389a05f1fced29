"""Test-time adaptation with `jaxpeft.tta.source` (authors' defaults); see launch/adapt.py.

  python -m launch.adapt --config=configs/tta_source.py --config.pretrained=workdir/fashion_resnet \
      --workdir=workdir/tta_source
"""

import ml_collections

from configs import tta_common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return tta_common.base("source", arg)
