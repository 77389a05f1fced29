"""Test-time adaptation with `jaxpeft.tta.lame` (authors' defaults: rbf affinity, knn=5); see launch/adapt.py.

  python -m launch.adapt --config=configs/tta_lame.py --config.pretrained=workdir/fashion_resnet \
      --workdir=workdir/tta_lame
"""

import ml_collections

from configs import tta_common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return tta_common.base("lame", arg)
