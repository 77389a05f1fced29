"""Test-time adaptation with `jaxpeft.tta.ostta` (defaults of the reference: Adam(1e-3), diversity 0.5).

  python -m launch.adapt --config=configs/tta_ostta.py --config.pretrained=workdir/fashion_resnet \
      --workdir=workdir/tta_ostta
"""

import ml_collections

from configs import tta_common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return tta_common.base("ostta", arg)
